"""The engine service's FastAPI application: ``create_app(settings)``.

The Slicer module never runs the model in Slicer's process; it talks to this service,
either a process it starts on the same machine or a GPU server next to the PACS
(``xreal-engine serve``, see ``serve.py``). The model loads in the background:
``GET /api/v1/health`` reports ``"model": "loading" | "ready" | "failed"``; jobs submitted
while it loads are queued.

Security: any ``/api/v1`` endpoint except ``health`` requires the token, when one is
configured, as ``Authorization: Bearer <token>`` (``middleware.py``). ``/docs`` and
``/openapi.json`` describe the API and are open.

Every refusal is ``{"error": {"code": ..., "message": ...}}`` with a 4xx status:
400 malformed request, 401 token, 404 unknown job or file, 409 wrong job state,
411/413 body length, 415 file format, 422 unusable content (labels, shapes, finding,
parameter range), 429 queue full (Retry-After), 503 model failed to load. Uploads are
stored under names the server chooses; a client's filename is never used as a path.

Files, lower to higher (each imports only files named before it): settings, errors, spec,
store, worker, uploads, pacs_access, middleware, views, dependencies, routes_engine,
routes_jobs, app, serve.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from .. import __version__
from . import routes_engine, routes_jobs
from .dependencies import EngineContext
from .errors import install_error_handlers
from .middleware import GuardMiddleware
from .pacs_access import load_pacs
from .settings import API_PREFIX, ServiceSettings
from .store import JobStore
from .worker import JobService, run_generation


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
    app.state.context = EngineContext(settings=settings, model_info=model_info, data_dir=data_dir, pacs=pacs,
                                      pacs_config=pacs_config)
    app.state.request_shutdown = lambda: None  # serve.run replaces both with the server's
    app.state.exiting = lambda: False
    app.add_middleware(GuardMiddleware, settings=settings)
    install_error_handlers(app)
    app.include_router(routes_engine.router, prefix=API_PREFIX)
    app.include_router(routes_jobs.router, prefix=API_PREFIX)
    return app
