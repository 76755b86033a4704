"""What every endpoint shares: the engine's context on ``app.state``, the bearer scheme, job lookup."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request, Security
from fastapi.security import HTTPBearer

from ..errors import shown
from .errors import ApiError
from .settings import ServiceSettings
from .worker import JobService

JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")

# Documents the bearer scheme on the OpenAPI page; the check itself is GuardMiddleware's.
bearer = HTTPBearer(auto_error=False, description="The engine's access token (when one is configured).")
protected = [Security(bearer)]


@dataclass(frozen=True)
class EngineContext:
    """What create_app resolved once at start-up (``app.state.context``)."""

    settings: ServiceSettings
    model_info: object
    data_dir: Path
    pacs: object  # the PACS functions (pacs_access.load_pacs), None without PACS support
    pacs_config: object


def context_of(request: Request) -> EngineContext:
    return request.app.state.context


def service_of(request: Request) -> JobService:
    return request.app.state.service


def known_form_fields(what: str, fields: tuple, repeatable: tuple):
    """A dependency refusing (400) a form field the endpoint does not know, or a single-valued one sent twice.

    FastAPI would take the last of two values silently (``steps=5`` and ``steps=7`` runs 7 steps), and a
    misspelt setting ("step") must never be replaced by the default; ``repeatable``: the list fields.
    """
    async def check(request: Request) -> None:
        form = await request.form()
        names = [name for name, _ in form.multi_items()]
        unknown = sorted(set(names) - set(fields))
        if unknown:
            raise ApiError(400, "unknown_field", f"The {what} has a field the engine does not know: "
                                                 f"'{shown(unknown[0])}'; the fields are {', '.join(fields)}.")
        repeated = next((name for k, name in enumerate(names) if name in names[:k] and name not in repeatable), None)
        if repeated is not None:
            raise ApiError(400, "repeated_field", f"The {what} has the field '{repeated}' more than once; send it once "
                                                  f"(only {', '.join(repeatable)} may repeat).")
    return check


def job_or_404(service: JobService, job_id: str) -> dict:
    job = service.store.get(job_id) if JOB_ID_PATTERN.fullmatch(job_id) else None
    if job is None:
        raise ApiError(404, "job_not_found", f"There is no job '{shown(job_id, 40)}' (it may have been deleted or purged).")
    return job
