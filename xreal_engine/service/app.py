"""The engine service: ``xreal-engine serve`` (FastAPI + uvicorn) and its app factory.

The Slicer module never runs the model in Slicer's process; it talks to this service,
either a process it starts on the same machine or a GPU server next to the PACS.

Start-up contract for launchers: the FIRST line on stdout is ``XREAL_ENGINE_URL=<url>``
(e.g. ``XREAL_ENGINE_URL=http://127.0.0.1:43125``), printed as soon as the socket listens,
so ``--port 0`` can pick a free port. Everything else (logs) goes to stderr. The model
loads in the background: ``GET /api/v1/health`` reports ``"model": "loading" | "ready" |
"failed"``; jobs submitted while it loads are queued. Stop it with ``POST /api/v1/shutdown``
(or SIGTERM/Ctrl-C).

Security: loopback by default; any other address needs a token (``--token`` or
``XREAL_ENGINE_TOKEN``), which every ``/api/v1`` endpoint except ``health`` then requires as
``Authorization: Bearer <token>`` (constant-time comparison). ``/docs`` and
``/openapi.json`` describe the API and are open.

Every refusal is ``{"error": {"code": ..., "message": ...}}`` with a 4xx status:
400 malformed request, 401 token, 404 unknown job or file, 409 wrong job state,
411/413 body length, 415 file format, 422 unusable content (labels, shapes, finding,
parameter range), 429 queue full (Retry-After), 503 model failed to load. Uploads are
stored under names the server chooses; a client's filename is never used as a path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hmac
import io
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import socket
import struct
import sys
import time
import threading
import uuid
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from fastapi import APIRouter, Body, FastAPI, File, Form, Query, Request, Security, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import InputError, XRealError
from ..model.sampling import MAX_SEED, SamplingParameters
from .worker import FINAL_STATES, QUEUED, RUNNING, SUCCEEDED, JobService, JobStore, QueueFull, new_job_id

log = logging.getLogger("xreal_engine.server")

API_PREFIX = "/api/v1"
DEFAULT_PORT = 8000  # the Slicer module's default remote URL is http://127.0.0.1:8000
DEFAULT_MAX_UPLOAD_BYTES = 100 * 1024 * 1024
DEFAULT_MAX_QUEUED_JOBS = 16
DEFAULT_RETENTION_HOURS = 72.0
MAX_PATHOLOGIES = 16
MAX_IMAGE_SIDE = 6000  # pixels; larger than any radiograph, small enough to refuse decompression bombs
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
# Declared content types we accept; the bytes are checked as well (see _sniff_format).
ACCEPTED_CONTENT_TYPES = {
    "", "application/octet-stream", "image/png", "application/dicom", "image/dicom", "image/x-nrrd",
    "application/x-nrrd", "application/gzip", "application/x-gzip", "application/x-nifti", "image/x-nifti",
    "application/x-nifti-gz",
}
RESULT_MEDIA_TYPES = {".dcm": "application/dicom", ".png": "image/png", ".json": "application/json"}
SSE_REPEAT_SECONDS = 1.0


@dataclass
class ServiceSettings:
    """Everything ``serve`` is configured with."""

    model: str = "demo"
    device: str = "auto"
    dtype: str = "auto"
    data_dir: Path = Path("xreal-engine-data")
    token: Optional[str] = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_queued_jobs: int = DEFAULT_MAX_QUEUED_JOBS
    retention_hours: float = DEFAULT_RETENTION_HOURS
    pacs_config: Optional[Path] = None


class ApiError(Exception):
    """A refusal that becomes a JSON error response."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# ----------------------------------------------------------------------------- middleware


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


# ----------------------------------------------------------------------------- uploads


def _sniff_format(head: bytes) -> str | None:
    """The file format from its first bytes (never from the client's name or content type)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"NRRD000"):
        return "nrrd"
    if head.startswith(b"\x1f\x8b"):
        return "nifti.gz"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    return None


def _suffix_for(fmt: str, client_name: str | None) -> str:
    """The server-side suffix; the client's name only decides between .nrrd and .seg.nrrd."""
    if fmt == "nrrd":
        return ".seg.nrrd" if (client_name or "").lower().endswith(".seg.nrrd") else ".nrrd"
    return {"png": ".png", "dicom": ".dcm", "nifti.gz": ".nii.gz", "nifti": ".nii"}[fmt]


def _image_side_lengths(path: Path, fmt: str) -> list[int]:
    """Image dimensions from the header only, so a decompression bomb is refused before decoding."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if fmt == "png" and len(head) >= 24:
        return list(struct.unpack(">II", head[16:24]))
    if fmt == "nrrd":
        for line in head.split(b"\n"):
            if line.lower().startswith(b"sizes:"):
                return [int(v) for v in line.split(b":", 1)[1].split() if v.isdigit()]
        return []
    if fmt in ("nifti", "nifti.gz"):
        if fmt == "nifti.gz":
            try:
                with gzip.open(path, "rb") as stream:
                    head = stream.read(348)
            except (OSError, EOFError):
                return []
        if len(head) < 56:
            return []
        for order in ("<", ">"):
            dims = struct.unpack(order + "8h", head[40:56])
            if 1 <= dims[0] <= 7:
                return [d for d in dims[1:1 + dims[0]]]
        return []
    if fmt == "dicom":
        import pydicom

        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - unreadable headers are refused later by the reader
            return []
        return [int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)]
    return []


def _store_upload(upload: UploadFile, what: str, stem: str, folder: Path) -> str:
    """Copy one upload to ``folder/<stem><suffix>`` after checking type, format and size; return the name."""
    client_name = upload.filename or ""
    if any(bad in client_name for bad in ("/", "\\", "\x00")) or client_name in (".", ".."):
        raise ApiError(400, "bad_filename",
                       f"The {what} has a file name with folders or control characters; send a plain file name.")
    content_type = (upload.content_type or "").split(";")[0].strip().lower()
    if content_type not in ACCEPTED_CONTENT_TYPES:
        raise ApiError(415, "unsupported_media_type",
                       f"The {what} was sent as '{content_type}'; send a PNG, NRRD, NIfTI or DICOM file.")
    upload.file.seek(0)
    head = upload.file.read(4096)
    if not head:
        raise ApiError(422, "empty_file", f"The {what} is an empty file.")
    fmt = _sniff_format(head)
    if fmt is None:
        raise ApiError(415, "unsupported_format",
                       f"The {what} is not a PNG, NRRD, NIfTI or DICOM file; export it in one of these formats.")
    name = stem + _suffix_for(fmt, upload.filename)
    target = folder / name
    upload.file.seek(0)
    with open(target, "wb") as out:
        shutil.copyfileobj(upload.file, out, 1 << 20)
    sides = _image_side_lengths(target, fmt)
    if any(side > MAX_IMAGE_SIDE for side in sides):
        raise ApiError(422, "image_too_large",
                       f"The {what} is {' x '.join(str(s) for s in sides)} pixels; the engine accepts at most "
                       f"{MAX_IMAGE_SIDE} pixels per side.")
    return name


def _scrub(message: str, folder: Path) -> str:
    """Remove server paths from a validation message, keeping the server-chosen file name."""
    return message.replace(str(folder) + os.sep, "").replace(str(folder), "")


# ----------------------------------------------------------------------------- job running


def build_generation_request(spec: dict, inputs_dir: Path):
    """The GenerationRequest of a stored job spec (file names are the server's own)."""
    from ..generate import GenerationRequest

    parameters = spec["parameters"]
    return GenerationRequest(
        anatomy_path=inputs_dir / spec["anatomy"] if spec.get("anatomy") else None,
        pathologies=[(inputs_dir / name, finding) for name, finding in spec["pathologies"]],
        image_path=inputs_dir / spec["image"] if spec.get("image") else None,
        seed=parameters["seed"],
        num_inference_steps=parameters.get("num_inference_steps"),
        anatomy_steps=parameters.get("anatomy_steps"),
        guidance_scale=parameters.get("guidance_scale"),
        eta=parameters.get("eta"),
        soft_mask_value=parameters.get("soft_mask_value"),
    )


def run_generation(pipe, spec: dict, inputs_dir: Path, result_dir: Path, progress) -> dict:
    """The worker's job: validate the stored inputs again (cheap) and run the real generation."""
    from ..generate import generate_to_directory, prepare_request

    prepared = prepare_request(build_generation_request(spec, inputs_dir), pipe.model_info)
    return generate_to_directory(pipe, prepared, result_dir, progress=progress)


# ----------------------------------------------------------------------------- presentation


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def describe_job(service: JobService, job: dict) -> dict:
    """The public view of a job (no server paths)."""
    spec = job["spec"]
    state = job["state"]
    view = {
        "id": job["id"],
        "request_id": job["request_id"],
        "state": state,
        "stage": None,
        "step": None,
        "total": None,
        "progress": None,
        "eta_seconds": None,
        "queue_position": None,
        "run_seconds": (round(job["finished_at"] - job["started_at"], 3)
                        if job["finished_at"] is not None and job["started_at"] is not None else None),
        "created_at": _iso(job["created_at"]),
        "started_at": _iso(job["started_at"]),
        "finished_at": _iso(job["finished_at"]),
        "mode": spec.get("mode"),
        "parameters": spec.get("parameters"),
        "findings": [finding for _, finding in spec.get("pathologies", [])],
        "warnings": job["warnings"],
        "error": {"code": job["error_code"], "message": job["error_message"]} if job["error_message"] else None,
        "files": job["files"],
        "dicom": job["dicom"],
        "source": spec.get("source"),
        "push_to": spec.get("push_to"),
        "push": job["push_report"],
    }
    if state == QUEUED:
        position = service.store.queue_position(job["seq"])
        view.update(queue_position=position, progress=0.0, stage="queued")
        average = service.store.recent_duration()
        if average is not None:
            view["eta_seconds"] = round(average * position, 1)
    elif state == RUNNING:
        live = service.live(job["id"])
        if live is not None:
            eta = live.eta_seconds()
            view.update(stage=live.stage, step=live.step, total=live.total, progress=round(live.fraction(), 4),
                        eta_seconds=None if eta is None else round(eta, 1))
        else:
            view.update(stage="starting", progress=0.0)
    elif state == SUCCEEDED:
        view.update(stage="done", progress=1.0, eta_seconds=0.0)
    return view


def model_description(settings: ServiceSettings, model_info, service: JobService | None,
                      pacs_nodes: list | None = None) -> dict:
    """Model, labels and findings with their codes, defaults and limits (GET info)."""
    from ..model.sampling import limits
    from ..vocabulary import anatomy_entry, finding_entry

    def code_of(lookup, key):
        try:
            entry = lookup(key)
        except XRealError:
            return None
        return {"category": entry.get("category"), "type": entry.get("type"),
                "type_modifier": entry.get("type_modifier"), "color": entry.get("color"),
                "display_name": entry.get("display_name")}

    labels = []
    for value, name in sorted(model_info.anatomy_labels.items(), key=lambda item: int(item[0])):
        labels.append({"value": int(value), "name": name, "warning": model_info.label_warnings.get(str(value)),
                       **(code_of(anatomy_entry, int(value)) or {})})
    findings = [{"name": name, **(code_of(finding_entry, name) or {})} for name in model_info.findings]
    pipe = getattr(service, "_pipe", None)
    return {
        "engine": "xreal-engine",
        "engine_version": __version__,
        "api_version": 1,
        "device": str(pipe.device) if pipe is not None else settings.device,
        "model_state": service.model_state if service else "loading",
        "model": {"id": model_info.model_id, "description": model_info.description,
                  "image_size": model_info.image_size, "field_of_view_mm": model_info.field_of_view_mm},
        "anatomy_labels": labels,
        "findings": findings,
        "defaults": dict(model_info.defaults),
        "limits": {
            "max_upload_bytes": settings.max_upload_bytes,
            "max_queued_jobs": settings.max_queued_jobs,
            "max_pathologies": MAX_PATHOLOGIES,
            "max_image_side": MAX_IMAGE_SIDE,
            "retention_hours": settings.retention_hours,
            "parameters": limits(),
        },
        "pacs": pacs_nodes,
    }


# ----------------------------------------------------------------------------- PACS hooks


def load_pacs(settings: ServiceSettings):
    """(pacs module, its configuration), or (None, None) when PACS support is not installed.

    Loaded once at start-up, so a broken --pacs-config stops ``serve`` with its message.
    """
    try:
        from .. import pacs
    except ImportError:
        return None, None
    return pacs, pacs.load_config(settings.pacs_config)


def _require_pacs(pacs, pacs_config, name: str, purpose: str, parameter: str) -> None:
    """Refuse (422) a job naming a PACS node this engine cannot use for ``purpose``."""
    if pacs is None:
        raise ApiError(422, "pacs_unavailable",
                       f"This engine has no PACS support installed; submit without '{parameter}'.")
    try:
        pacs_config.node(name, purpose)
    except XRealError as error:
        raise ApiError(422, "unknown_pacs", str(error)) from None


# ----------------------------------------------------------------------------- the app


def create_app(settings: ServiceSettings) -> FastAPI:
    """The FastAPI application; the job service starts and stops with it (lifespan)."""
    from ..model.info import ModelInfo, resolve_model
    from ..model.loading import load_pipeline

    model_dir = resolve_model(settings.model)
    model_info = ModelInfo.load(model_dir)
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)

    pacs, pacs_config = load_pacs(settings)

    def push(destination: str, result_dir: Path) -> dict:
        return pacs.push_result(destination, result_dir, config=pacs_config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        store = JobStore(data_dir)
        service = JobService(
            store,
            load_pipeline=lambda: load_pipeline(str(model_dir), settings.device, settings.dtype),
            run_job=run_generation,
            max_queued_jobs=settings.max_queued_jobs,
            retention_hours=settings.retention_hours,
            push=push if pacs is not None else None,
        )
        service.start()
        app.state.service = service
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)
            store.close()

    app = FastAPI(
        title="XReal engine",
        version=__version__,
        description="Synthetic chest X-rays from anatomy and pathology masks (XReal latent diffusion). "
                    "Results are DICOM Secondary Capture + Segmentation objects marked synthetic.",
        lifespan=lifespan,
    )
    app.state.request_shutdown = lambda: None
    app.state.exiting = lambda: False
    app.add_middleware(GuardMiddleware, settings=settings)
    _install_error_handlers(app)
    app.include_router(_api_router(settings, model_info, data_dir, pacs, pacs_config), prefix=API_PREFIX)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        log.info("refused %s %s: %d %s", request.method, request.url.path, error.status, error.code)  # no content
        return error_response(error.status, error.code, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        return error_response(400, "bad_request", _validation_message(error))

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


FIELD_DESCRIPTIONS = {
    "anatomy": "the anatomy label map file",
    "pathology": "a pathology mask file",
    "finding": "a finding name",
    "image": "the image to edit",
}


def _validation_message(error: RequestValidationError) -> str:
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


def _api_router(settings: ServiceSettings, model_info, data_dir: Path, pacs, pacs_config) -> APIRouter:
    # Documents the bearer scheme on the OpenAPI page; the check itself is GuardMiddleware's.
    bearer = HTTPBearer(auto_error=False, description="The engine's access token (when one is configured).")
    router = APIRouter()
    protected = [Security(bearer)]

    def service_of(request: Request) -> JobService:
        return request.app.state.service

    def job_or_404(service: JobService, job_id: str) -> dict:
        job = service.store.get(job_id) if JOB_ID_PATTERN.match(job_id) else None
        if job is None:
            raise ApiError(404, "job_not_found", f"There is no job {job_id[:40]!r} (it may have been deleted or purged).")
        return job

    @router.get("/health", summary="Liveness and model state (no token needed)")
    def health(request: Request):
        service = service_of(request)
        return {"status": "ok", "engine_version": __version__, "model": service.model_state,
                "model_error": service.model_error}

    @router.get("/info", dependencies=protected, summary="Engine version, device, model, labels, findings, limits")
    def info(request: Request):
        nodes = pacs.list_nodes(pacs_config) if pacs is not None else []
        return model_description(settings, model_info, service_of(request), nodes)

    @router.post("/jobs", status_code=202, dependencies=protected, summary="Submit a generation job",
                 responses={200: {"description": "A job with this request_id already exists; it is returned."},
                            429: {"description": "The queue is full; retry after Retry-After seconds."}})
    def submit_job(
        request: Request,
        response: Response,
        anatomy: Optional[UploadFile] = File(None, description="Anatomy label map: PNG, NRRD, NIfTI, .seg.nrrd or DICOM-SEG (0 background, 1 left lung, 2 right lung, 3 heart, 4 aorta)."),
        pathology: list[UploadFile] = File([], description="Pathology masks (repeat the field); each needs a 'finding' in the same order."),
        finding: list[str] = Form([], description="Finding of the pathology mask at the same position (repeat the field); '' removes a finding in edit mode."),
        image: Optional[UploadFile] = File(None, description="Edit mode: the X-ray to edit (DICOM, PNG, NRRD)."),
        seed: Optional[int] = Form(None, description="Random seed 0..2**32-1 (default: a random one, reported back)."),
        steps: Optional[int] = Form(None, description="DDIM steps per stage, 1..1000 (default: the model's)."),
        anatomy_steps: Optional[int] = Form(None, description="Anatomy-stage steps that follow the mask, 0..steps (default: the model's share of steps, e.g. 50 of 100)."),
        guidance: Optional[float] = Form(None, description="Classifier-free guidance scale, 0..50."),
        eta: Optional[float] = Form(None, description="DDIM eta, 0..1."),
        request_id: Optional[str] = Form(None, description="Client id for idempotent retries (letters, digits, . _ : -; up to 128)."),
        push_to: Optional[str] = Form(None, description="Name of a configured PACS destination to send the result to."),
        source: Optional[str] = Form(None, description="Edit mode: fetch the image from this configured PACS source."),
        study: Optional[str] = Form(None, description="With 'source': Study Instance UID."),
        series: Optional[str] = Form(None, description="With 'source': Series Instance UID."),
        instance: Optional[str] = Form(None, description="With 'source': SOP Instance UID (optional)."),
    ):
        service = service_of(request)
        if request_id is not None and not REQUEST_ID_PATTERN.match(request_id):
            raise ApiError(400, "bad_request_id",
                           "The request_id must be 1 to 128 letters, digits, '.', '_', ':' or '-'.")
        if request_id is not None:
            existing = service.store.get_by_request_id(request_id)
            if existing is not None:
                response.status_code = 200
                return describe_job(service, existing)
        if service.model_state == "failed":
            raise ApiError(503, "model_unavailable", service.model_error or "The model could not be loaded.")
        if service.store.queued_count() >= service.max_queued_jobs:
            raise _queue_full(service)
        if len(pathology) != len(finding):
            raise ApiError(400, "findings_mismatch",
                           f"Send one 'finding' per 'pathology' mask ({len(pathology)} masks, {len(finding)} findings).")
        if len(pathology) > MAX_PATHOLOGIES:
            raise ApiError(422, "too_many_pathologies",
                           f"At most {MAX_PATHOLOGIES} pathology regions per job ({len(pathology)} were sent).")
        if image is not None and source is not None:
            raise ApiError(400, "image_and_source", "Send either an 'image' to edit or a PACS 'source', not both.")
        if anatomy is None and image is None and source is None:
            raise ApiError(400, "missing_anatomy",
                           "The request is missing 'anatomy' (the anatomy label map file).")
        try:  # the one sampling policy: same defaults, rules and sentences as the CLI
            parameters = SamplingParameters.from_public(model_info.defaults, {
                "seed": secrets.randbelow(MAX_SEED + 1) if seed is None else seed, "steps": steps,
                "anatomy_steps": anatomy_steps, "guidance": guidance, "eta": eta})
        except InputError as error:
            raise ApiError(422, "parameter_out_of_range", str(error)) from None
        if push_to:
            _require_pacs(pacs, pacs_config, push_to, "destination", "push_to")

        folder = data_dir / "incoming" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        try:
            spec = {
                "anatomy": _store_upload(anatomy, "anatomy upload", "anatomy", folder) if anatomy else None,
                "pathologies": [[_store_upload(upload, f"pathology mask {k}", f"pathology-{k}", folder), name]
                                for k, (upload, name) in enumerate(zip(pathology, finding), start=1)],
                "image": _store_upload(image, "image to edit", "image", folder) if image else None,
                "push_to": push_to or None,
                "source": None,
            }
            if source is not None:
                spec["image"], spec["source"] = _fetch_source(pacs, pacs_config, source, study, series, instance, folder)
            prepared = _prepare(spec, parameters, model_info, folder)
            spec["parameters"] = prepared.parameters.to_dict()
            spec["pathologies"] = [[name, pathology.finding]  # canonical finding names, as in provenance
                                   for (name, _), pathology in zip(spec["pathologies"], prepared.pathologies)]
            spec["mode"] = "edit" if prepared.edit_mode else "generate"
            stages = len(spec["pathologies"]) + (0 if prepared.edit_mode else 1)
            spec["expected_steps"] = stages * prepared.parameters.num_inference_steps
            job_id = new_job_id()
            folder.rename(_reserve_job_dir(service, job_id) / "inputs")
            try:
                job, created = service.submit(job_id, request_id, spec, list(prepared.warnings))
            except BaseException:
                shutil.rmtree(service.store.job_dir(job_id), ignore_errors=True)
                raise
            if not created:  # a concurrent retry with the same request_id won the race
                shutil.rmtree(service.store.job_dir(job_id), ignore_errors=True)
                response.status_code = 200
            return describe_job(service, job)
        except QueueFull:
            raise _queue_full(service) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @router.get("/jobs", dependencies=protected, summary="List jobs, newest first")
    def list_jobs(request: Request, state: Optional[str] = Query(None, description="Only jobs in this state."),
                  limit: int = Query(100, ge=1, le=1000)):
        service = service_of(request)
        if state is not None and state not in (QUEUED, RUNNING, *FINAL_STATES):
            raise ApiError(400, "bad_state", f"Unknown state '{state[:40]}'; use queued, running, succeeded, failed or cancelled.")
        return {"jobs": [describe_job(service, job) for job in service.store.list(state, limit)]}

    @router.get("/jobs/{job_id}", dependencies=protected, summary="Job status, progress, ETA, results")
    def job_status(request: Request, job_id: str):
        service = service_of(request)
        return describe_job(service, job_or_404(service, job_id))

    @router.post("/jobs/{job_id}/cancel", dependencies=protected,
                 summary="Cancel a queued job, or a running one within one diffusion step")
    def cancel_job(request: Request, job_id: str):
        service = service_of(request)
        job = job_or_404(service, job_id)
        if job["state"] in (SUCCEEDED, "failed"):
            raise ApiError(409, "already_finished", f"The job already {job['state']}; there is nothing to cancel.")
        job = service.cancel(job_id) or job
        return describe_job(service, job)

    @router.delete("/jobs/{job_id}", status_code=204, dependencies=protected,
                   summary="Delete a job and its files (a running job is cancelled first)")
    def delete_job(request: Request, job_id: str):
        service = service_of(request)
        job_or_404(service, job_id)
        if not service.delete(job_id, timeout=30.0):
            raise ApiError(409, "still_running", "The job is still stopping; try deleting it again in a few seconds.")
        return Response(status_code=204)

    @router.post("/jobs/{job_id}/push", dependencies=protected,
                 summary="Send a finished job's SC + SEG to a configured PACS destination (report per instance)")
    def push_job(request: Request, job_id: str,
                 destination: str = Body(..., embed=True, description="Name of a configured PACS destination.")):
        service = service_of(request)
        job = job_or_404(service, job_id)
        if job["state"] != SUCCEEDED:
            raise ApiError(409, "no_result", f"The job is {job['state']}; only a succeeded job's result can be sent.")
        _require_pacs(pacs, pacs_config, destination, "destination", "destination")
        report = service.push_result(job_id, destination)
        service.store.set_push_report(job_id, report)
        return describe_job(service, service.store.get(job_id))

    @router.get("/jobs/{job_id}/files/{name:path}", dependencies=protected, summary="Download one result file")
    def download_file(request: Request, job_id: str, name: str):
        service = service_of(request)
        job = job_or_404(service, job_id)
        if name not in job["files"]:
            raise ApiError(404, "file_not_found",
                           f"The job has no result file '{name[:80]}'; its files are listed in its status.")
        path = service.store.result_dir(job_id) / name
        media_type = RESULT_MEDIA_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")
        return FileResponse(path, media_type=media_type, filename=Path(name).name)

    @router.get("/jobs/{job_id}/result.zip", dependencies=protected, summary="Download all result files as one zip")
    def download_zip(request: Request, job_id: str):
        service = service_of(request)
        job = job_or_404(service, job_id)
        if job["state"] != SUCCEEDED:
            raise ApiError(409, "no_result", f"The job is {job['state']}; results exist only for succeeded jobs.")
        buffer = io.BytesIO()
        result_dir = service.store.result_dir(job_id)
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name in job["files"]:
                archive.write(result_dir / name, arcname=name)
        return Response(buffer.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="xreal-{job_id}.zip"'})

    @router.get("/jobs/{job_id}/events", dependencies=protected, summary="Progress as server-sent events",
                response_class=StreamingResponse)
    async def job_events(request: Request, job_id: str):
        service = service_of(request)
        await run_in_threadpool(job_or_404, service, job_id)
        exiting = request.app.state.exiting

        async def stream():
            last_key, last_sent = None, 0.0
            while True:
                job = await run_in_threadpool(service.store.get, job_id)
                if job is None:
                    yield _sse("deleted", {"id": job_id})
                    return
                view = describe_job(service, job)
                key = (view["state"], view["stage"], view["step"])
                now = time.monotonic()
                if view["state"] in FINAL_STATES:
                    yield _sse("end", view)
                    return
                if key != last_key or now - last_sent > SSE_REPEAT_SECONDS:  # the repeat doubles as keep-alive
                    yield _sse("progress", view)
                    last_key, last_sent = key, now
                if exiting():
                    return
                await asyncio.sleep(0.2)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.post("/shutdown", status_code=202, dependencies=protected,
                 summary="Stop the engine cleanly (a running job ends as interrupted)")
    def shutdown(request: Request):
        log.info("shutdown requested over HTTP")
        request.app.state.request_shutdown()
        return {"status": "shutting down"}

    return router


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _queue_full(service: JobService) -> ApiError:
    retry_after = max(1, int(round(service.store.recent_duration() or 30.0)))
    return ApiError(429, "queue_full",
                    f"The engine already has {service.max_queued_jobs} jobs waiting; try again in about "
                    f"{retry_after} seconds.", {"Retry-After": str(retry_after)})


def _prepare(spec: dict, parameters, model_info, folder: Path):
    """Run the shared validation (masks, labels, shapes, findings) without the model."""
    from ..generate import prepare_request

    spec = dict(spec, parameters=parameters.to_dict())
    try:
        return prepare_request(build_generation_request(spec, folder), model_info)
    except XRealError as error:
        raise ApiError(422, "invalid_input", _scrub(str(error), folder)) from None


def _fetch_source(pacs, pacs_config, name: str, study: str | None, series: str | None,
                  instance: str | None, folder: Path) -> tuple[str, dict]:
    """Edit mode from a PACS: fetch the image into ``folder``; return (server file name, source record)."""
    if not study or not series:
        raise ApiError(400, "incomplete_source", "A PACS 'source' needs 'study' and 'series' UIDs.")
    _require_pacs(pacs, pacs_config, name, "source", "source")
    fetch_dir = folder / "source"
    fetch_dir.mkdir()
    try:
        path = pacs.fetch_source(name, study, series, instance, dest_dir=fetch_dir, config=pacs_config)
    except XRealError as error:  # a transient PACS error is an outage (502); others are the request's fault
        status = 502 if isinstance(error, getattr(pacs, "TransientPacsError", ())) else 422
        raise ApiError(status, "source_unavailable", _scrub(str(error), folder)) from None
    except Exception:  # noqa: BLE001 - a PACS outage is the user's to act on, not a crash
        log.warning("fetching an edit-mode source from a PACS failed", exc_info=True)
        raise ApiError(502, "source_unavailable",
                       f"The image could not be fetched from the PACS source '{name}'; check that it is reachable.") from None
    target = folder / "image.dcm"
    shutil.move(str(path), target)
    shutil.rmtree(fetch_dir, ignore_errors=True)
    return target.name, {"source": name, "study": study, "series": series, "instance": instance}


def _reserve_job_dir(service: JobService, job_id: str) -> Path:
    job_dir = service.store.job_dir(job_id)
    job_dir.mkdir(parents=True)
    return job_dir


# ----------------------------------------------------------------------------- serve command


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others need a token)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}; 0 picks a free one). The first stdout line is XREAL_ENGINE_URL=<url>.")
    parser.add_argument("--model", default="demo", help="'demo' (the shipped demo model) or a model directory")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, float32 on CPU), float32, float16, bfloat16")
    parser.add_argument("--data-dir", type=Path, default=Path("xreal-engine-data"),
                        help="where the job database, uploads and results live (default ./xreal-engine-data)")
    parser.add_argument("--token", default=None,
                        help="access token required on every endpoint except health (default: $XREAL_ENGINE_TOKEN)")
    parser.add_argument("--max-upload-bytes", type=int, default=DEFAULT_MAX_UPLOAD_BYTES,
                        help="largest accepted job request, all files together (default 100 MiB)")
    parser.add_argument("--max-queued-jobs", type=int, default=DEFAULT_MAX_QUEUED_JOBS,
                        help="jobs that may wait in the queue; more are refused with 429 (default 16)")
    parser.add_argument("--retention-hours", type=float, default=DEFAULT_RETENTION_HOURS,
                        help="finished jobs and their results are deleted after this many hours (0 keeps them; default 72)")
    parser.add_argument("--pacs-config", type=Path, default=None, help="PACS configuration file for push_to / source")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--exit-with-stdin", action="store_true",
                        help="shut down when standard input closes: a launcher keeps it open, so the engine "
                             "never outlives it, even after a crash")


def settings_from_args(args) -> ServiceSettings:
    token = args.token if args.token is not None else os.environ.get("XREAL_ENGINE_TOKEN") or None
    if not is_loopback(args.host) and not token:
        raise InputError(
            f"Refusing to listen on {args.host} without an access token; pass --token or set XREAL_ENGINE_TOKEN "
            "(or listen on 127.0.0.1).")
    if token is not None and len(token) < 8:
        raise InputError("The access token is too short; use at least 8 characters.")
    for name in ("max_upload_bytes", "max_queued_jobs"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1.")
    if args.retention_hours < 0:
        raise InputError("--retention-hours must be 0 (keep forever) or more.")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port} is not a port number (0..65535).")
    return ServiceSettings(model=args.model, device=args.device, dtype=args.dtype, data_dir=args.data_dir,
                           token=token, max_upload_bytes=args.max_upload_bytes,
                           max_queued_jobs=args.max_queued_jobs, retention_hours=args.retention_hours,
                           pacs_config=args.pacs_config)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if os.name != "nt":  # on Windows SO_REUSEADDR would let a second process share the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as error:
        sock.close()
        raise InputError(f"Cannot listen on {host}:{port} ({error.strerror or error}).") from None
    sock.listen(128)  # connections queue from now on, so a launcher may connect as soon as it reads the URL
    return sock


def run(args) -> int:
    import uvicorn

    settings = settings_from_args(args)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # per-object chatter, UIDs only
    app = create_app(settings)  # resolves the model directory: a wrong --model fails here
    sock = _listen(args.host, args.port)
    port = sock.getsockname()[1]
    url_host = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host
    print(f"XREAL_ENGINE_URL=http://{url_host}:{port}", flush=True)
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=5,
                            log_level=args.log_level)
    server = uvicorn.Server(config)
    app.state.request_shutdown = lambda: setattr(server, "should_exit", True)
    app.state.exiting = lambda: server.should_exit
    if args.exit_with_stdin:
        threading.Thread(target=_shutdown_at_stdin_eof, args=(app.state.request_shutdown,), daemon=True,
                         name="xreal-stdin-watch").start()
    server.run(sockets=[sock])
    return 0


def _shutdown_at_stdin_eof(request_shutdown) -> None:
    """Block until the launcher closes our stdin (or dies), then shut down like ``POST /shutdown``."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    log.info("standard input closed: the launcher is gone, shutting down")
    request_shutdown()
