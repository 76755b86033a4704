"""Batch endpoints: submit a manifest with its files, status, cancel, delete, and the finished dataset.zip.

Thin: the work is ``batches.py``'s. The guard (``middleware.py``) treats ``POST /batches`` like
``POST /jobs``: token, Origin/Host, the client header, a Content-Length up to ``--max-upload-bytes``
and a complete multipart body, all before the body is read.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import PurePosixPath
from typing import Optional

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile

from ..errors import InputError, StorageError, shown
from ..batch.exports import FORMATS
from .batches import BatchService
from .dependencies import known_form_fields, protected, service_of
from .errors import ApiError, storage_refusal
from .routes_jobs import REQUEST_ID_PATTERN
from .views import JsonErrorFileResponse
from .uploads import store_control_upload, store_upload

# The fields of POST /batches; any other is refused (a misspelt "format" must not silently mean the default).
BATCH_FIELDS = ("manifest", "file", "formats", "quality_check", "min_dice", "request_id")
REPEATABLE_BATCH_FIELDS = ("file",)
MANIFEST_SUFFIXES = {".csv": ".csv", ".jsonl": ".jsonl", ".ndjson": ".jsonl"}

router = APIRouter()
only_batch_fields = known_form_fields("batch", BATCH_FIELDS, REPEATABLE_BATCH_FIELDS)


def batches_of(request: Request) -> BatchService:
    return request.app.state.batches


@router.post("/batches", status_code=202, dependencies=[*protected, Depends(only_batch_fields)],
             summary="Submit a batch: a manifest (one job per row) and the files it names",
             responses={200: {"description": "A batch with this request_id already exists; it is returned."},
                        422: {"description": "A row is bad (every bad row is listed in error.rows); nothing queued."},
                        429: {"description": "The rows do not fit the queue now; retry after Retry-After seconds."}})
def submit_batch(
    request: Request,
    response: Response,
    manifest: UploadFile = File(..., description="CSV or JSONL manifest, one row per image (the columns of "
                                                 "xreal-engine generate-batch --manifest)."),
    file: list[UploadFile] = File([], description="Every file the manifest names (repeat the field); each part's "
                                                  "filename is the path as the manifest writes it, e.g. masks/a.png."),
    formats: Optional[str] = Form(None, description="Exports in dataset.zip besides the results, comma-separated: "
                                                    "monai, imagefolder, nnunet."),
    quality_check: Optional[bool] = Form(None, description="Segment every image and record its anatomy Dice "
                                                           "(default true)."),
    min_dice: Optional[float] = Form(None, description="Drop images whose Dice for a requested structure is below "
                                                       "this, 0..1."),
    request_id: Optional[str] = Form(None, description="Client id for idempotent retries (letters, digits, . _ : -)."),
):
    from ..batch.quality import check_min_dice

    batches, service = batches_of(request), service_of(request)
    if request_id is not None and not REQUEST_ID_PATTERN.fullmatch(request_id):
        raise ApiError(400, "bad_request_id", "The request_id must be 1 to 128 letters, digits, '.', '_', ':' or '-'.")
    if request_id is not None:
        existing = service.store.get_batch_by_request_id(request_id)
        if existing is not None:
            response.status_code = 200
            return batches.describe(existing)
    if service.model_state == "failed":
        raise ApiError(503, "model_unavailable", service.model_error or "The model could not be loaded.")
    problem = service.store.problem()
    if problem is not None:
        raise storage_refusal(problem)
    chosen = check_formats(formats)
    quality = True if quality_check is None else quality_check
    try:
        check_min_dice(min_dice, "min_dice")
    except InputError as error:
        raise ApiError(422, "parameter_out_of_range", str(error)) from None
    if min_dice is not None and not quality:
        raise ApiError(422, "min_dice_without_check", "min_dice needs the quality check; leave quality_check true.")
    suffix = manifest_suffix(manifest.filename)

    folder = service.store.incoming_dir / uuid.uuid4().hex
    try:
        folder.mkdir()
        manifest_path = folder / f"manifest{suffix}"
        manifest.file.seek(0)
        with open(manifest_path, "wb") as out:
            shutil.copyfileobj(manifest.file, out, 1 << 20)
        uploads = {}
        for number, upload in enumerate(file, start=1):
            key = upload_key(upload.filename)
            if key in uploads:
                raise ApiError(400, "duplicate_file", f"Two 'file' parts are named '{shown(key)}'; send each file once.")
            upload.filename = key.rpartition("/")[2]  # store_upload refuses folders; the key keeps the manifest's path
            what, stem = f"file '{shown(key)}'", f"file-{number:04d}"
            if key.lower().endswith(".csv"):  # only an attention control takes a CSV (fixations); prepare_request checks use
                uploads[key] = folder / store_control_upload(upload, "attention", stem, folder)
            else:
                uploads[key] = folder / store_upload(upload, what, stem, folder)
        planned = batches.plan(folder, manifest_path, uploads)
        batch, created = batches.submit(planned, request_id, formats=chosen, quality_check=quality, min_dice=min_dice)
        if not created:
            response.status_code = 200
        return batches.describe(batch)
    except (OSError, StorageError) as error:  # the uploads could not be stored: disk full, read-only, gone
        raise storage_refusal(error) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@router.get("/batches", dependencies=protected, summary="List batches, newest first (without their rows)")
def list_batches(request: Request, limit: int = Query(100, ge=1, le=1000)):
    return {"batches": batches_of(request).list(limit)}


@router.get("/batches/{batch_id}", dependencies=protected,
            summary="Batch status: rows done / failed / queued, progress, ETA, every row's job and Dice")
def batch_status(request: Request, batch_id: str):
    batches = batches_of(request)
    return batches.describe(batches.get(batch_id))


@router.post("/batches/{batch_id}/cancel", dependencies=protected,
             summary="Cancel a batch: its queued rows now, the running one within one diffusion step")
def cancel_batch(request: Request, batch_id: str):
    batches = batches_of(request)
    batch = batches.get(batch_id)
    batches.cancel(batch)
    return batches.describe(batch)


@router.delete("/batches/{batch_id}", status_code=204, dependencies=protected,
               summary="Delete a batch, its jobs and its dataset (running rows are cancelled first)")
def delete_batch(request: Request, batch_id: str):
    batches = batches_of(request)
    if not batches.delete(batches.get(batch_id)):
        raise ApiError(409, "still_running", "A row of the batch is still stopping; try deleting it again in a few seconds.")
    return Response(status_code=204)


@router.get("/batches/{batch_id}/dataset.zip", dependencies=protected,
            summary="The finished batch as generate-batch's output directory, zipped (results + exports + dataset.json)")
def download_dataset(request: Request, batch_id: str):
    batches = batches_of(request)
    batch = batches.get(batch_id)
    try:
        path = batches.dataset(batch)
    except (OSError, StorageError) as error:
        raise storage_refusal(error) from None
    return JsonErrorFileResponse(path, media_type="application/zip", filename=f"xreal-batch-{batch['id']}.zip")


def check_formats(text) -> list:
    """``formats`` of a batch ('monai,nnunet'): the per-image results always, then the named exports."""
    formats = ["results"]
    for name in (part.strip() for part in (text or "").split(",")):
        if name and name not in FORMATS:
            raise ApiError(422, "unknown_format", f"The format '{shown(name)}' is not one of {', '.join(FORMATS)}.")
        if name and name not in formats:
            formats.append(name)
    return formats


def manifest_suffix(filename) -> str:
    suffix = PurePosixPath(filename or "").suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ApiError(415, "unsupported_manifest",
                       "The manifest must be a .csv or .jsonl file (its filename says which).")
    return MANIFEST_SUFFIXES[suffix]


def upload_key(filename) -> str:
    """The manifest's path of an uploaded file ('masks/a.png'): a key to look up, never used as a path."""
    text = filename or ""
    parts = PurePosixPath(text).parts
    if (not text or "\\" in text or "\x00" in text or text.startswith("/") or any(p in ("..", ".") for p in parts)
            or any(ord(c) < 32 for c in text)):
        raise ApiError(400, "bad_filename",
                       f"A 'file' part is named '{shown(text)}'; name each file by the relative path the manifest "
                       "uses (no '..', no absolute path).")
    return PurePosixPath(*parts).as_posix()
