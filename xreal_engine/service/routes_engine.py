"""Endpoints about the engine itself: health (open), info, shutdown."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request

from .. import __version__
from .dependencies import context_of, protected, service_of
from .views import model_description

log = logging.getLogger("xreal_engine.server")

router = APIRouter()


@router.get("/health", summary="Liveness and model state (no token needed)")
def health(request: Request):
    service = service_of(request)
    return {"status": "ok", "engine_version": __version__, "model": service.model_state,
            "model_error": service.model_error}


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
