"""Endpoints about the engine itself: health (open), info, shutdown."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .. import __version__
from .dependencies import context_of, protected, service_of
from .views import model_description

log = logging.getLogger("xreal_engine.server")

router = APIRouter()


@router.get("/health", summary="Liveness, model state and storage (no token needed)",
            responses={503: {"description": "Unhealthy: jobs cannot be stored; 'storage_error' says why."}})
def health(request: Request):
    """``status`` is "ok", or "unhealthy" (HTTP 503) while the data directory or database cannot be written."""
    service = service_of(request)
    problem = service.store.problem()
    message = None if problem is None else str(problem)
    body = {"status": "ok" if problem is None else "unhealthy", "engine_version": __version__,
            "model": service.model_state, "model_error": service.model_error, "storage_error": message}
    if problem is None:
        return body
    return JSONResponse({**body, "error": {"code": "unhealthy", "message": message}}, status_code=503)


@router.get("/info", dependencies=protected, summary="Engine version, device, model, labels, findings, limits")
def info(request: Request):
    context = context_of(request)
    nodes = context.pacs.list_nodes(context.pacs_config) if context.pacs is not None else []
    return model_description(context.settings, context.model_info, service_of(request), nodes)


@router.post("/shutdown", status_code=202, dependencies=protected,
             summary="Stop the engine cleanly (a running job ends as interrupted)")
def shutdown(request: Request):
    log.info("shutdown requested over HTTP")
    request.app.state.request_shutdown()
    return {"status": "shutting down"}
