"""The request guard: who may call (Host, Origin, token, request shape) and how big a body may be.

All of it runs before FastAPI reads a request body, in one pure ASGI middleware (not
BaseHTTPMiddleware) so server-sent events stream freely. In order:

1. Host: only the names of the address the engine listens on (DNS rebinding, ``--allow-host``).
2. Origin: a request that a web page sent (``Origin``, or ``Sec-Fetch-Site: cross-site`` /
   ``same-site``) is refused unless its origin is the engine's own or listed with ``--allow-origin``.
3. Token: every ``/api/v1`` endpoint but ``health`` needs ``Authorization: Bearer <token>``.
4. Shape: a state-changing request (POST, PUT, PATCH, DELETE) must be one a browser would
   have to ask permission for first (a CORS preflight, never granted to other origins): it
   carries ``Authorization``, ``X-XReal-Client`` or a JSON body.
5. Body: ``POST /jobs`` and ``POST /batches`` (the uploads) need a Content-Length up to ``--max-upload-bytes``
   and a complete multipart body (its closing boundary); every other request at most ``MAX_SMALL_BODY_BYTES``,
   counted as it arrives when there is no Content-Length.
"""

from __future__ import annotations

import hmac
import urllib.parse

from ..errors import shown
from .errors import BodyRefused, error_response
from .settings import API_PREFIX, CLIENT_HEADER, MAX_SMALL_BODY_BYTES, ServiceSettings

STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
UPLOAD_PATHS = (f"{API_PREFIX}/jobs", f"{API_PREFIX}/batches")  # POSTed as multipart with files


def token_matches(expected: str | None, authorization: str | None) -> bool:
    """True when no token is configured or the header carries it (constant-time comparison)."""
    if not expected:
        return True
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8"), expected.encode("utf-8"))


def host_name(host_header: str | None) -> str | None:
    """The name in a Host header without its port ('[::1]:8000' -> '::1'); None if malformed."""
    if not host_header:
        return None
    try:
        parsed = urllib.parse.urlsplit("//" + host_header)
        parsed.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        return None
    return (parsed.hostname or "").lower() or None


class GuardMiddleware:
    """Refuse, before any body is read, what the module docstring lists; watch the bodies it lets through."""

    def __init__(self, app, settings: ServiceSettings):
        self.app = app
        self.settings = settings
        self.hosts = settings.accepted_hosts()
        self.origins = set(settings.web_origins())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, self._watched(scope, headers, receive), send)

    def _refusal(self, scope, headers: dict):
        path, method = scope.get("path", ""), scope.get("method", "GET")
        host = host_name(headers.get("host"))
        if host is None or ("*" not in self.hosts and host not in self.hosts):
            return error_response(
                400, "host_not_allowed",
                f"This engine answers requests addressed to {', '.join(self.hosts)}; the request named "
                f"'{shown(headers.get('host', ''))}' (start the engine with --allow-host NAME to accept it).")
        origin = headers.get("origin")
        same_origin = origin is not None and origin.lower() in (f"http://{headers['host']}".lower(),
                                                                f"https://{headers['host']}".lower())
        allowed_origin = origin is not None and (same_origin or origin in self.origins)
        from_page = origin is not None or headers.get("sec-fetch-site") in ("cross-site", "same-site")
        if from_page and not allowed_origin:
            return error_response(
                403, "cross_origin_refused",
                "This engine does not accept requests from web pages of other sites"
                + (f" (origin '{shown(origin)}')" if origin else "")
                + "; start it with --allow-origin ORIGIN to allow one.")
        if allowed_origin and method == "OPTIONS" and "access-control-request-method" in headers:
            return None  # a CORS preflight of an allowed origin: CORSMiddleware answers it
        if path.startswith(API_PREFIX + "/") and path != f"{API_PREFIX}/health":
            if not token_matches(self.settings.token, headers.get("authorization")):
                sent = headers.get("authorization")
                return error_response(
                    401, "unauthorized",
                    "The access token sent is not this engine's; use the token it was started with."
                    if sent and sent.lower().startswith("bearer ") else
                    "This engine requires an access token; send it as 'Authorization: Bearer <token>'.",
                    {"WWW-Authenticate": "Bearer"})
        if method in STATE_CHANGING and not _needs_preflight(headers):
            return error_response(
                403, "client_header_required",
                f"Send state-changing requests with an '{CLIENT_HEADER}: 1' header (or a JSON body); "
                "this keeps web pages from using the engine.")
        length = headers.get("content-length")
        limit, too_large = self._body_limit(scope)
        if method == "POST" and path in UPLOAD_PATHS and (length is None or not length.isdigit()):
            return error_response(411, "length_required",
                                  f"Send the {'batch' if path.endswith('/batches') else 'job'} as a multipart "
                                  "request with a Content-Length header.")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return error_response(413, "too_large", too_large)
        return None

    def _body_limit(self, scope) -> tuple[int, str]:
        """(most bytes the request's body may have, the sentence refusing more)."""
        if scope.get("method") == "POST" and scope.get("path") in UPLOAD_PATHS:
            return self.settings.max_upload_bytes, (
                f"The upload is larger than this engine accepts: at most {self.settings.max_upload_bytes} bytes "
                "per job or batch. Use smaller or compressed files (or split the batch).")
        return MAX_SMALL_BODY_BYTES, (f"The request body is too large: {shown(scope.get('path', ''), 80)} takes at "
                                      f"most {MAX_SMALL_BODY_BYTES} bytes (only job submissions carry files).")

    def _watched(self, scope, headers: dict, receive):
        """``receive`` that refuses a too-long body (no Content-Length) or a multipart body without its end."""
        limit, too_large = self._body_limit(scope)
        boundary = None
        if scope.get("method") == "POST" and scope.get("path") in UPLOAD_PATHS:
            boundary = _multipart_boundary(headers.get("content-type", ""))
        close = b"--" + boundary + b"--" if boundary else None
        state = {"received": 0, "tail": b"", "closed": close is None}

        async def watched_receive():
            message = await receive()
            if message["type"] != "http.request":
                return message
            chunk = message.get("body", b"")
            state["received"] += len(chunk)
            if state["received"] > limit:
                raise BodyRefused(413, "too_large", too_large)
            if not state["closed"]:
                window = state["tail"] + chunk
                state["closed"] = close in window
                state["tail"] = window[-(len(close) - 1):]
                if not message.get("more_body", False) and not state["closed"]:
                    raise BodyRefused(400, "incomplete_body",
                                      "The multipart body is incomplete (its closing boundary is missing); "
                                      "nothing was queued. Send the whole request again.")
            return message

        return watched_receive


def _needs_preflight(headers: dict) -> bool:
    """True for a request a browser could not send cross-origin without a CORS preflight."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    return ("authorization" in headers or CLIENT_HEADER.lower() in headers
            or content_type == "application/json" or content_type.endswith("+json"))


def _multipart_boundary(content_type: str) -> bytes | None:
    kind, _, parameters = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    for parameter in parameters.split(";"):
        name, _, value = parameter.strip().partition("=")
        if name.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("latin-1")
    return None


