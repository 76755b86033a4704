"""The engine service's FastAPI application: ``create_app(settings)``.

The Slicer module never runs the model in Slicer's process; it talks to this service,
either a process it starts on the same machine or a GPU server next to the PACS
(``xreal-engine serve``, see ``serve.py``). The model loads in the background:
``GET /api/v1/health`` reports ``"model": "loading" | "ready" | "failed"``; jobs submitted
while it loads are queued.

Security (``middleware.py``, threat model in docs/architecture.md): only Host names of the
address listened on; no requests from other web origins; any ``/api/v1`` endpoint except
``health`` requires the token, when one is configured, as ``Authorization: Bearer <token>``;
state-changing requests must carry ``X-XReal-Client`` (or the token, or a JSON body).
``/docs`` (Swagger UI, its files served from ``/docs/assets``, nothing from elsewhere) and
``/openapi.json`` describe the API and are open.

Every refusal is ``{"error": {"code": ..., "message": ...}}`` with a 4xx status:
400 malformed request or Host, 401 token, 403 cross-origin or plain form request, 404 unknown
job or file, 409 wrong job state, 411/413 body length, 415 file format, 422 unusable content
(labels, shapes, finding, parameter range), 429 queue full (Retry-After); and 503 model failed
to load or storage unavailable, 507 disk full. Uploads are stored under names the server
chooses; a client's filename is never used as a path.

Files, lower to higher (each imports only files named before it): settings, errors, spec,
store, worker, uploads, pacs_access, middleware, views, dependencies, batches, routes_engine,
routes_jobs, routes_batches, app, serve. Batches (``batches.py``) are many jobs from one manifest, checked by
``batch/manifest.py`` like generate-batch's.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi_offline import FastAPIOffline
from starlette.middleware.cors import CORSMiddleware

from .. import __version__
from . import routes_batches, routes_engine, routes_jobs
from .batches import BatchService
from .dependencies import EngineContext
from .errors import install_error_handlers
from .middleware import GuardMiddleware
from .pacs_access import load_pacs
from .settings import API_PREFIX, CLIENT_HEADER, ServiceSettings
from .store import JobStore
from .worker import JobService, run_generation


DOCS_ASSETS_URL = "/docs/assets"


def create_app(settings: ServiceSettings) -> FastAPI:
    """The FastAPI application; the job service starts and stops with it (lifespan)."""
    from ..model.info import ModelInfo, resolve_model
    from ..model.loading import load_pipeline

    model_dir = resolve_model(settings.model)
    model_info = ModelInfo.load(model_dir)
    data_dir = Path(settings.data_dir).resolve()
    pacs, pacs_config = load_pacs(settings)
    store = JobStore(data_dir)  # StorageError (one sentence) if the data directory cannot be written

    def push(destination: str, result_dir: Path) -> dict:
        return pacs.push_result(destination, result_dir, config=pacs_config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service = JobService(
            store,
            # The anatomy-stage cache: a Slicer user regenerating at the same seed with another region or
            # finding waits only for the pathology stage (model/anatomy_cache.py).
            load_pipeline=lambda: load_pipeline(str(model_dir), settings.device, settings.dtype,
                                                runtime=settings.unet_runtime).enable_anatomy_stage_cache(),
            run_job=run_generation,
            max_queued_jobs=settings.max_queued_jobs,
            retention_hours=settings.retention_hours,
            push=push if pacs is not None else None,
        )
        service.start()
        app.state.service = service
        app.state.batches = BatchService(service, model_info, model_dir)
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)
            store.close()

    # The OpenAPI page with Swagger UI served by the engine itself (fastapi-offline's copy): FastAPI's own
    # /docs loads it from a CDN, i.e. a download at run time and third-party script beside the token.
    app = FastAPIOffline(
        docs_url="/docs", redoc_url=None, static_url=DOCS_ASSETS_URL,
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
    if settings.allowed_origins:  # inside the guard, which has refused every other origin already
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.web_origins()),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", CLIENT_HEADER])
    app.add_middleware(GuardMiddleware, settings=settings)
    install_error_handlers(app)
    app.include_router(routes_engine.router, prefix=API_PREFIX)
    app.include_router(routes_jobs.router, prefix=API_PREFIX)
    app.include_router(routes_batches.router, prefix=API_PREFIX)
    return app
