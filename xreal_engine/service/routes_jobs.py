"""Job endpoints: submit, list, status, cancel, delete, push, result files, progress events."""

from __future__ import annotations

import asyncio
import io
import json
import re
import secrets
import shutil
import time
import uuid
import zipfile
from pathlib import Path
from typing import Optional

from fastapi import APIRouter, Body, Depends, File, Form, Query, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from ..control_spec import ControlRequest, check_requests, needs_file, parse_name_and_scale
from ..errors import InputError, XRealError, shown
from ..model.sampling import MAX_SEED, SamplingParameters
from .dependencies import EngineContext, context_of, job_or_404, known_form_fields, protected, service_of
from .errors import ApiError, client_names, scrub, storage_refusal
from .pacs_access import fetch_source, require_pacs
from .settings import MAX_PATHOLOGIES
from .spec import JobSpec, prepare_job
from .store import FINAL_STATES, QUEUED, RUNNING, SUCCEEDED, QueueFull, new_job_id
from .uploads import store_control_upload, store_upload
from .views import JsonErrorFileResponse, describe_job
from .worker import JobService

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
RESULT_MEDIA_TYPES = {".dcm": "application/dicom", ".png": "image/png", ".json": "application/json"}
SSE_REPEAT_SECONDS = 1.0
# The fields of POST /jobs (submit_job's form parameters); any other field name is refused, so that
# a misspelt setting ("step") is never silently replaced by the model's default.
JOB_FIELDS = ("anatomy", "pathology", "finding", "image", "seed", "steps", "anatomy_steps", "guidance", "eta",
              "sampler", "fast", "request_id", "push_to", "source", "study", "series", "instance", "control",
              "control_file", "control_stages", "keep_outside_region")
REPEATABLE_JOB_FIELDS = ("pathology", "finding", "control", "control_file")  # the list parameters below

router = APIRouter()
only_job_fields = known_form_fields("job", JOB_FIELDS, REPEATABLE_JOB_FIELDS)


@router.post("/jobs", status_code=202, dependencies=[*protected, Depends(only_job_fields)],
             summary="Submit a generation job",
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
    sampler: Optional[str] = Form(None, description="ddim (XReal's, the default), dpmpp or unipc."),
    fast: Optional[bool] = Form(None, description="Fill unset settings from the fast preset (see GET info)."),
    request_id: Optional[str] = Form(None, description="Client id for idempotent retries (letters, digits, . _ : -; up to 128)."),
    push_to: Optional[str] = Form(None, description="Name of a configured PACS destination to send the result to."),
    source: Optional[str] = Form(None, description="Edit mode: fetch the image from this configured PACS source."),
    study: Optional[str] = Form(None, description="With 'source': Study Instance UID."),
    series: Optional[str] = Form(None, description="With 'source': Series Instance UID."),
    instance: Optional[str] = Form(None, description="With 'source': SOP Instance UID (optional)."),
    control: list[str] = Form([], description="A ControlNet to steer with, NAME or NAME:SCALE (repeat the field): sobel, canny, texture, lungs, attention; scale 0..2 (default: the model's)."),
    control_file: list[UploadFile] = File([], description="The file of each 'control' that takes one, in the same order (lungs takes none): a reference X-ray for sobel/canny/texture, a map image or a fixation CSV (x,y,duration) for attention."),
    control_stages: Optional[str] = Form(None, description="The stages the controls steer: anatomy, pathology or both (the default)."),
    keep_outside_region: Optional[bool] = Form(None, description="Keep the previous image outside each feathered pathology region (default: the model's; off in XReal)."),
):
    context, service = context_of(request), service_of(request)
    if request_id is not None and not REQUEST_ID_PATTERN.fullmatch(request_id):
        raise ApiError(400, "bad_request_id", "The request_id must be 1 to 128 letters, digits, '.', '_', ':' or '-'.")
    if request_id is not None:
        existing = service.store.get_by_request_id(request_id)
        if existing is not None:
            response.status_code = 200
            return describe_job(service, existing)
    if service.model_state == "failed":
        raise ApiError(503, "model_unavailable", service.model_error or "The model could not be loaded.")
    problem = service.store.problem()
    if problem is not None:
        raise storage_refusal(problem)
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
        raise ApiError(400, "missing_anatomy", "The request is missing 'anatomy' (the anatomy label map file).")
    try:  # the one sampling policy: same defaults, rules and sentences as the CLI
        parameters = SamplingParameters.from_public(context.model_info.defaults, {
            "seed": secrets.randbelow(MAX_SEED + 1) if seed is None else seed, "steps": steps,
            "anatomy_steps": anatomy_steps, "guidance": guidance, "eta": eta, "sampler": sampler, "fast": fast,
            "control_stages": control_stages, "keep_outside_region": keep_outside_region})
    except InputError as error:
        raise ApiError(422, "parameter_out_of_range", str(error)) from None
    controls = _control_uploads(context, control, control_file)
    if push_to:
        require_pacs(context.pacs, context.pacs_config, push_to, "destination", "push_to")

    folder = service.store.incoming_dir / uuid.uuid4().hex
    job_id = None
    try:
        folder.mkdir()
        spec = _stored_spec(context, folder, parameters, anatomy, list(zip(pathology, finding)), image, push_to,
                            source, study, series, instance, controls)
        try:
            spec, prepared = prepare_job(spec, folder, context.model_info)
        except XRealError as error:  # the shared validation (masks, labels, shapes, findings), without the model
            message = _in_client_names(scrub(str(error), folder), spec, anatomy, pathology, image, controls)
            raise ApiError(422, "invalid_input", message) from None
        job_id = new_job_id()
        folder.rename(_reserve_job_dir(service, job_id) / "inputs")
        job, created = service.submit(job_id, request_id, spec, list(prepared.warnings))
        if not created:  # a concurrent retry with the same request_id won the race
            shutil.rmtree(service.store.job_dir(job_id), ignore_errors=True)
            response.status_code = 200
        job_id = None  # queued: its folder stays
        return describe_job(service, job)
    except QueueFull:
        raise _queue_full(service) from None
    except OSError as error:  # the uploads could not be stored: disk full, read-only, data directory gone
        raise storage_refusal(error) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if job_id is not None:  # refused after its folder was made: nothing is left behind
            shutil.rmtree(service.store.job_dir(job_id), ignore_errors=True)


@router.get("/jobs", dependencies=protected, summary="List jobs, newest first")
def list_jobs(request: Request, state: Optional[str] = Query(None, description="Only jobs in this state."),
              limit: int = Query(100, ge=1, le=1000)):
    service = service_of(request)
    if state is not None and state not in (QUEUED, RUNNING, *FINAL_STATES):
        raise ApiError(400, "bad_state", f"Unknown state '{shown(state)}'; use queued, running, succeeded, failed or cancelled.")
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
    context, service = context_of(request), service_of(request)
    job = job_or_404(service, job_id)
    if job["state"] != SUCCEEDED:
        raise ApiError(409, "no_result", f"The job is {job['state']}; only a succeeded job's result can be sent.")
    require_pacs(context.pacs, context.pacs_config, destination, "destination", "destination")
    report = service.push_result(job_id, destination)
    service.store.set_push_report(job_id, report)
    return describe_job(service, service.store.get(job_id))


@router.get("/jobs/{job_id}/files/{name:path}", dependencies=protected, summary="Download one result file")
def download_file(request: Request, job_id: str, name: str):
    service = service_of(request)
    job = job_or_404(service, job_id)
    if name not in job["files"]:
        raise ApiError(404, "file_not_found",
                       f"The job has no result file '{shown(name, 80)}'; its files are listed in its status.")
    path = service.store.result_dir(job_id) / name
    if not path.is_file():
        raise _result_gone(name)
    media_type = RESULT_MEDIA_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")
    return JsonErrorFileResponse(path, media_type=media_type, filename=Path(name).name)


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
            if not (result_dir / name).is_file():
                raise _result_gone(name)
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


def _control_uploads(context: EngineContext, fields: list, files: list) -> list:
    """(name, upload or None, scale) per ``control`` field, paired in order with the ``control_file`` uploads of
    the controls that take a file; names, scales and the model's ControlNets checked before anything is stored."""
    try:
        parsed = [parse_name_and_scale(text) for text in fields]
        for name, scale in parsed:
            context.model_info.controlnet_scale(name, scale)
    except InputError as error:
        raise ApiError(422, "invalid_control", str(error)) from None
    with_file = [name for name, _ in parsed if needs_file(name)]
    if len(with_file) != len(files):
        raise ApiError(400, "control_files_mismatch",
                       f"Send one 'control_file' per control that takes a file, in the same order ({len(with_file)} "
                       f"such controls, {len(files)} files); lungs takes none.")
    uploads = iter(files)
    controls = [(name, next(uploads) if needs_file(name) else None, scale) for name, scale in parsed]
    try:  # the same control twice, and the same checks as the CLI's (a placeholder stands for each upload)
        check_requests([ControlRequest(name, Path("upload") if upload else None, scale)
                        for name, upload, scale in controls])
    except InputError as error:
        raise ApiError(422, "invalid_control", str(error)) from None
    return controls


def _stored_spec(context: EngineContext, folder: Path, parameters: SamplingParameters, anatomy, regions, image,
                 push_to, source, study, series, instance, controls=()) -> JobSpec:
    """Store the uploads (or fetch the PACS source) in ``folder``: the spec before validation."""
    anatomy_name = store_upload(anatomy, "anatomy upload", "anatomy", folder) if anatomy else None
    pathologies = [(store_upload(upload, f"pathology mask {k}", f"pathology-{k}", folder), name)
                   for k, (upload, name) in enumerate(regions, start=1)]
    image_name = store_upload(image, "image to edit", "image", folder) if image else None
    source_record = None
    if source is not None:
        image_name, source_record = fetch_source(context.pacs, context.pacs_config, source, study, series, instance,
                                                 folder)
    stored_controls = [(name, store_control_upload(upload, name, f"control-{k}", folder) if upload else None, scale)
                       for k, (name, upload, scale) in enumerate(controls, start=1)]
    return JobSpec.build(anatomy=anatomy_name, pathologies=pathologies, image=image_name, parameters=parameters,
                         push_to=push_to, source=source_record, controls=stored_controls)


def _in_client_names(message: str, spec: JobSpec, anatomy, pathology, image, controls) -> str:
    """``message`` with the server's names of the uploads (``anatomy.png``, ``pathology-1.png``) replaced by
    the names the client sent them under, so the user reads about the files they chose."""
    pairs = [(spec.anatomy, anatomy), *((name, upload) for (name, _), upload in zip(spec.pathologies, pathology)),
             (spec.image, image),
             *((stored, upload) for (_, stored, _), (_, upload, _) in zip(spec.controls, controls))]
    uploads = {shown(upload.filename, 80): stored for stored, upload in pairs
               if stored and upload is not None and upload.filename}
    return client_names(uploads)(message)  # the one replacement rule (POST /batches uses it too)


def _result_gone(name: str) -> ApiError:
    """A listed result file that is no longer on disk (removed by hand, or by retention meanwhile)."""
    return ApiError(404, "file_not_found", f"The result file '{shown(name, 80)}' is no longer on the engine's disk; "
                                           "generate the image again.")


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _queue_full(service: JobService) -> ApiError:
    retry_after = max(1, int(round(service.store.recent_duration() or 30.0)))
    return ApiError(429, "queue_full",
                    f"The engine already has {service.max_queued_jobs} jobs waiting; try again in about "
                    f"{retry_after} seconds.", {"Retry-After": str(retry_after)})


def _reserve_job_dir(service: JobService, job_id: str) -> Path:
    job_dir = service.store.job_dir(job_id)
    job_dir.mkdir(parents=True)
    return job_dir
