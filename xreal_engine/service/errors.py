"""Refusals: ``ApiError``, the one JSON error shape, and the app's exception handlers.

Every refusal is ``{"error": {"code": ..., "message": ...}}``; no handler ever shows a
traceback or a server path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("xreal_engine.server")

FIELD_DESCRIPTIONS = {
    "anatomy": "the anatomy label map file",
    "pathology": "a pathology mask file",
    "finding": "a finding name",
    "image": "the image to edit",
}


class ApiError(Exception):
    """A refusal that becomes a JSON error response."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def scrub(message: str, folder: Path) -> str:
    """Remove server paths from a validation message, keeping the server-chosen file name."""
    return message.replace(str(folder) + os.sep, "").replace(str(folder), "")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        log.info("refused %s %s: %d %s", request.method, request.url.path, error.status, error.code)  # no content
        return error_response(error.status, error.code, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        return error_response(400, "bad_request", validation_message(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        messages = {404: f"There is no endpoint at {request.url.path}; the API is described at /docs.",
                    405: f"{request.method} is not allowed on {request.url.path}; the API is described at /docs."}
        message = messages.get(error.status_code, str(error.detail))
        if error.status_code == 400:
            message = "The request body could not be read; send the job as multipart/form-data."
        return error_response(error.status_code, "http_error", message, getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        log.exception("unexpected error while handling %s %s", request.method, request.url.path)
        return error_response(500, "internal_error",
                              "The engine hit an unexpected problem; the engine log has the details.")


def validation_message(error: RequestValidationError) -> str:
    """One sentence for the first problem FastAPI found."""
    problems = error.errors()
    if not problems:
        return "The request is malformed."
    problem = problems[0]
    location = [str(part) for part in problem.get("loc", ()) if part not in ("body", "query", "path")]
    name = location[0] if location else "request"
    kind = problem.get("type", "")
    if kind == "missing":
        return f"The request is missing '{name}' ({FIELD_DESCRIPTIONS.get(name, 'a required field')})."
    if "int" in kind:
        return f"The parameter '{name}' must be a whole number."
    if "float" in kind:
        return f"The parameter '{name}' must be a number."
    if name in ("anatomy", "pathology", "image"):
        return f"'{name}' must be sent as a file upload ({FIELD_DESCRIPTIONS[name]})."
    return f"The parameter '{name}' is not valid: {problem.get('msg', 'invalid value')}."
