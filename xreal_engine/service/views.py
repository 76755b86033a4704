"""What the API shows: the public view of a job and the engine description (no server paths)."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone

from fastapi.responses import FileResponse

from .. import __version__
from ..control_spec import CONTROL_SCALE_RANGE
from ..errors import XRealError
from ..io.formats import MAX_IMAGE_SIDE
from .settings import MAX_PATHOLOGIES, ServiceSettings
from .store import QUEUED, RUNNING, SUCCEEDED
from .worker import JobService


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
        "mode": spec.mode,
        "parameters": spec.parameters.to_dict(),
        "findings": [finding for _, finding in spec.pathologies],
        "warnings": job["warnings"],
        "error": {"code": job["error_code"], "message": job["error_message"]} if job["error_message"] else None,
        "files": job["files"],
        "dicom": job["dicom"],
        "source": asdict(spec.source) if spec.source else None,
        "push_to": spec.push_to,
        "push": job["push_report"],
        "batch": asdict(spec.batch) if spec.batch else None,  # the batch row this job is (routes_batches.py)
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
    from ..model.sampling import choices, limits
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
    return {
        "engine": "xreal-engine",
        "engine_version": __version__,
        "api_version": 1,
        "device": (service.device if service else None) or settings.device,
        "model_state": service.model_state if service else "loading",
        "model": {"id": model_info.model_id, "description": model_info.description,
                  "image_size": model_info.image_size, "field_of_view_mm": model_info.field_of_view_mm},
        "anatomy_labels": labels,
        "findings": findings,
        "defaults": dict(model_info.defaults),
        "controlnets": dict(model_info.controlnets),  # control name -> default scale (the 'control' field)
        "limits": {
            "max_upload_bytes": settings.max_upload_bytes,
            "max_queued_jobs": settings.max_queued_jobs,
            "max_pathologies": MAX_PATHOLOGIES,
            "max_image_side": MAX_IMAGE_SIDE,
            "retention_hours": settings.retention_hours,
            "parameters": limits(),
            "control_scale": list(CONTROL_SCALE_RANGE),
        },
        "choices": choices(),  # samplers and the fast preset
        "pacs": pacs_nodes,
    }


class JsonErrorFileResponse(FileResponse):
    """A FileResponse (Range requests included) whose Range refusals are JSON like every other error.

    Starlette answers a malformed Range with a text/plain 400 and an unsatisfiable one with an empty
    416; those two are rewritten here, headers (Content-Range) kept, so a client parses one format.
    """

    async def __call__(self, scope, receive, send):
        refusal = {}

        async def send_json_refusals(message):
            if message["type"] == "http.response.start" and message["status"] in (400, 416):
                refusal.update(message)
                return
            if refusal and message["type"] == "http.response.body":
                status, text = refusal["status"], message.get("body", b"").decode("utf-8", "replace").strip()
                reason = (f"The Range header is not valid ({text.removeprefix('Range header: ')})." if status == 400
                          else "The requested byte range lies outside the file.")
                body = json.dumps({"error": {"code": "bad_range" if status == 400 else "range_not_satisfiable",
                                             "message": reason}}).encode()
                headers = [(k, v) for k, v in refusal.get("headers", []) if k.lower() not in (b"content-type",
                                                                                            b"content-length")]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await super().__call__(scope, receive, send_json_refusals)
