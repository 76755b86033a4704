"""The token check and the upload size limit, applied before FastAPI reads a request body."""

from __future__ import annotations

import hmac

from .errors import error_response
from .settings import API_PREFIX, ServiceSettings


def token_matches(expected: str | None, authorization: str | None) -> bool:
    """True when no token is configured or the header carries it (constant-time comparison)."""
    if not expected:
        return True
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8"), expected.encode("utf-8"))


class GuardMiddleware:
    """Token check and upload size limit *before* FastAPI reads a request body.

    A pure ASGI middleware (not BaseHTTPMiddleware) so server-sent events stream freely.
    The body limit relies on Content-Length, which the server enforces as the framing,
    so a job request can never make the service read more than ``max_upload_bytes``.
    """

    def __init__(self, app, settings: ServiceSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = None
        if path.startswith(API_PREFIX + "/") and path != f"{API_PREFIX}/health":
            if not token_matches(self.settings.token, headers.get("authorization")):
                refusal = error_response(
                    401, "unauthorized",
                    "This engine requires an access token; send it as 'Authorization: Bearer <token>'.",
                    {"WWW-Authenticate": "Bearer"})
        if refusal is None and scope.get("method") == "POST" and path == f"{API_PREFIX}/jobs":
            length = headers.get("content-length")
            if length is None or not length.isdigit():
                refusal = error_response(411, "length_required",
                                         "Send the job as a multipart request with a Content-Length header.")
            elif int(length) > self.settings.max_upload_bytes:
                refusal = error_response(
                    413, "too_large",
                    f"The upload is {int(length)} bytes; this engine accepts at most "
                    f"{self.settings.max_upload_bytes} bytes per job. Use smaller or compressed files.")
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)
