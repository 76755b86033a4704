"""Refusals: ``ApiError``, the one JSON error shape, and the app's exception handlers.

Every refusal is ``{"error": {"code": ..., "message": ...}}``; no handler ever shows a
traceback or a server path. (Only a request too malformed for the HTTP server itself, e.g. a
non-numeric Content-Length, gets uvicorn's plain-text 400 before the application sees it.)
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import StorageError, os_reason, shown

log = logging.getLogger("xreal_engine.server")

FIELD_DESCRIPTIONS = {
    "anatomy": "the anatomy label map file",
    "pathology": "a pathology mask file",
    "finding": "a finding name",
    "image": "the image to edit",
    "manifest": "the batch manifest, a CSV or JSONL file",
}


class ApiError(Exception):
    """A refusal that becomes a JSON error response."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None, details: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}
        self.details = details or {}  # more keys of the error object, e.g. a manifest's "rows" problems


class BodyRefused(StarletteHTTPException):
    """Raised while a request body arrives (middleware.py): FastAPI passes HTTPExceptions through."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(status, detail=message)
        self.code = code


def storage_refusal(error: StorageError | OSError, data_dir: Path | None = None) -> ApiError:
    """507 when the disk is full, else 503, for a request the engine cannot store; never a server path."""
    if not isinstance(error, StorageError):
        error = StorageError(f"The engine cannot store the request: {os_reason(error)}.", os_reason(error))
    message = scrub(str(error), data_dir) if data_dir is not None else str(error)
    return ApiError(507 if error.disk_full else 503, "insufficient_storage" if error.disk_full else "storage_unavailable",
                    f"{message} Nothing was changed; try again when GET /api/v1/health reports the engine healthy.",
                    {"Retry-After": "30"})


def error_response(status: int, code: str, message: str, headers: dict | None = None,
                   details: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {**(details or {}), "code": code, "message": message}}, status_code=status,
                        headers=headers)


def scrub(message: str, folder: Path) -> str:
    """Remove server paths from a validation message, keeping the server-chosen file name."""
    return message.replace(str(folder) + os.sep, "").replace(str(folder), "")


def client_names(uploads: dict):
    """text -> text with each stored upload, by full path or bare name ('file-0001.png'), as the manifest names it.

    One pass, so a manifest name that looks like another stored file's name is not replaced again; a bare
    name only where it stands alone (not inside a longer name).
    """
    keys = {}
    for key, path in uploads.items():
        keys[str(path)] = keys[Path(path).name] = key
    if not keys:
        return lambda text: text
    pattern = re.compile("|".join(
        re.escape(name) if name.startswith(os.sep) else rf"(?<![\w.-]){re.escape(name)}(?![\w-])"
        for name in sorted(keys, key=len, reverse=True)))
    return lambda text: pattern.sub(lambda match: keys[match.group(0)], text)


def _logged_path(request: Request) -> str:
    """The request path as the log may show it: a client's escape sequences or forged lines stay inert."""
    return shown(request.url.path, 200)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        log.info("refused %s %s: %d %s", request.method, _logged_path(request), error.status, error.code)  # no content
        return error_response(error.status, error.code, error.message, error.headers, error.details)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        return error_response(400, "bad_request", validation_message(error))

    @app.exception_handler(StorageError)
    async def storage_error(request: Request, error: StorageError):
        log.error("refused %s %s: %s", request.method, _logged_path(request), error.reason)
        refusal = storage_refusal(error, request.app.state.context.data_dir)
        return error_response(refusal.status, refusal.code, refusal.message, refusal.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        if isinstance(error, BodyRefused):
            return error_response(error.status_code, error.code, str(error.detail))
        path = shown(request.url.path, 80)
        messages = {404: f"There is no endpoint at {path}; the API is described at /docs.",
                    405: f"{request.method} is not allowed on {path}; the API is described at /docs."}
        message = messages.get(error.status_code, str(error.detail))
        if error.status_code == 400:
            message = unreadable_body_message(request, error)
        return error_response(error.status_code, "http_error", message, getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        log.exception("unexpected error while handling %s %s", request.method, _logged_path(request))
        return error_response(500, "internal_error",
                              "The engine hit an unexpected problem; the engine log has the details.")


# What FastAPI says when parsing a body raised something else; the cause (``__cause__``) says more.
_GENERIC_BODY_DETAILS = {"", "Bad Request", "There was an error parsing the body"}


def unreadable_body_message(request: Request, error: StarletteHTTPException) -> str:
    """One sentence for a 400 raised while reading the body: the real reason (a multipart limit, JSON
    nested too deeply, bytes that are not UTF-8) and what to send instead."""
    cause, detail = error.__cause__, str(error.detail or "")
    if isinstance(cause, RecursionError):
        reason = "it is nested too deeply"
    elif isinstance(cause, UnicodeDecodeError):
        reason = "it is not UTF-8 text"
    elif detail not in _GENERIC_BODY_DETAILS:
        reason = shown(detail.rstrip("."), 120)  # Starlette's multipart limits: too many fields, part too large
    else:
        reason = None
    sent_json = "json" in request.headers.get("content-type", "").lower()
    hint = "send a JSON object" if sent_json else "send the job as multipart/form-data"
    return "The request body could not be read" + (f" ({reason})" if reason else "") + f"; {hint}."


def validation_message(error: RequestValidationError) -> str:
    """One sentence for the first problem FastAPI found."""
    problems = error.errors()
    if not problems:
        return "The request is malformed."
    problem = problems[0]
    location = [str(part) for part in problem.get("loc", ()) if part not in ("body", "query", "path")]
    name = shown(location[0]) if location else "request"
    kind = problem.get("type", "")
    if kind == "json_invalid":
        detail = (problem.get("ctx") or {}).get("error") or "invalid JSON"
        where = f" at character {shown(location[0])}" if location else ""
        return f"The request body is not valid JSON ({shown(detail)}{where})."
    if kind in ("model_attributes_type", "dict_type"):
        return "The request body must be a JSON object, e.g. {\"destination\": \"NAME\"}."
    if kind == "missing":
        return f"The request is missing '{name}' ({FIELD_DESCRIPTIONS.get(name, 'a required field')})."
    if "int" in kind:
        return f"The parameter '{name}' must be a whole number."
    if "float" in kind:
        return f"The parameter '{name}' must be a number."
    if name in ("anatomy", "pathology", "image"):
        return f"'{name}' must be sent as a file upload ({FIELD_DESCRIPTIONS[name]})."
    return f"The parameter '{name}' is not valid: {shown(problem.get('msg', 'invalid value'), 120)}."
