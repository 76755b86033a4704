"""Batches in the service: a manifest and the files it names -> one ordinary job per row, queued all at once.

The manifest is read and checked by generate-batch's own code (``batch/manifest.py``: ``read_manifest``,
``check_rows``), so a row is refused with the same sentence and row number over HTTP as on the command
line; problems name the files as the manifest does, never by a server path. A value is looked up among
the uploaded files by the path the manifest gives (the part's filename is only a key, never a path);
a value without folder and suffix is one of the engine's templates. Nothing is queued unless every row
is good and all of them fit the queue (``JobStore.add_batch``: one transaction).

Each row runs as a job whose spec names its batch (``spec.BatchMember``) through the one worker, with
the quality check of generate-batch (``batch/quality.py``). When every row is final, ``dataset.zip`` is
built once from the finished results with ``batch/exports.py`` (the layout of ``generate-batch --out``)
and kept beside the batch (``DATA_DIR/batches/<id>/``) until its jobs are purged.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import threading
import time
import uuid
import zipfile
from dataclasses import replace
from pathlib import Path

from ..batch.exports import SUMMARY_FILE, summary, write_exports
from ..batch.manifest import MAX_PROBLEMS_SHOWN, BatchRow, check_rows, find_templates, read_manifest
from ..batch.worker import IMAGES_DIR
from ..errors import InputError, shown
from .errors import ApiError, client_names, scrub
from .spec import BatchMember, JobSpec
from .store import CANCELLED, FAILED, FINAL_STATES, QUEUED, RUNNING, SUCCEEDED, QueueFull, clear_job_dir, new_job_id
from .views import _iso
from .worker import JobService, list_result_files

DATASET_ZIP = "dataset.zip"
FAILURES_FILE = "failures.csv"  # the columns of generate-batch's failures.csv
FAILURE_COLUMNS = ("row", "name", "kind", "reason")
QUALITY_REJECTED = "quality_rejected"  # a job's error code when its image failed --min-dice (a dropped row)
ORPHAN_CHECK_SECONDS = 60.0


class BatchService:
    """Batches on top of a :class:`JobService`: submit, describe, cancel, delete, the dataset."""

    def __init__(self, service: JobService, model_info, model_dir: Path):
        self.service, self.store, self.model_info = service, service.store, model_info
        self.model_dir = Path(model_dir)
        self.batches_dir = self.store.batches_dir  # private, as the store makes it
        self._weights_hash = None
        self._building = threading.Lock()  # one dataset built at a time (they are rare and disk-bound)
        self._quality: dict = {}  # job id -> provenance["quality"] of a succeeded job (it never changes)
        self._orphans_checked = 0.0

    # -- submit ---------------------------------------------------------------------------------
    def plan(self, folder: Path, manifest: Path, uploads: dict) -> list:
        """[(BatchRow, PreparedRequest, warnings)] of a stored manifest, or ApiError 422 naming every bad row.

        ``uploads``: the manifest's path of each uploaded file -> where it is stored in ``folder``.
        """
        from ..generate import prepare_request

        folder = Path(folder).resolve()
        try:
            rows, problems = read_manifest(manifest)
        except InputError as error:
            raise ApiError(422, "invalid_manifest", str(error)) from None
        self._check_room(len(rows) + len(problems))  # before the rows' files are read
        templates = _templates_folder()
        in_client_names = client_names(uploads)
        mapped = []
        for row in rows:
            try:
                mapped.append(_uploaded_row(row, folder, uploads, templates))
            except InputError as error:
                problems.append(f"row {row.row}: {error}")
        problems += check_rows(mapped, self.model_info)

        def readable(text: str) -> str:  # the manifest's file names, never a server path
            text = in_client_names(text)
            if templates is not None:
                text = text.replace(str(templates) + os.sep, "")
            return scrub(text, folder)

        if problems:
            raise self._refusal(sorted((readable(p) for p in problems), key=_row_number))
        if not mapped:
            raise ApiError(422, "invalid_manifest", "The manifest has no rows; nothing was queued.")
        planned = []
        for row in mapped:
            prepared = prepare_request(row.request(), self.model_info)
            planned.append((row, prepared, [readable(warning) for warning in prepared.warnings]))
        return planned

    @staticmethod
    def _refusal(problems: list) -> ApiError:
        shown_problems = "; ".join(problem.rstrip(".") for problem in problems[:MAX_PROBLEMS_SHOWN])
        more = f"; and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        return ApiError(422, "invalid_manifest",
                        f"{len(problems)} manifest row{'s have problems' if len(problems) != 1 else ' has a problem'}; "
                        f"nothing was queued: {shown_problems}{more}.", details={"rows": problems})

    def _check_room(self, rows: int) -> None:
        """422 for a batch larger than the queue can ever hold, 429 for one that does not fit now."""
        service = self.service
        if rows > service.max_queued_jobs:
            raise ApiError(422, "batch_too_large",
                           f"The batch has {rows} rows but this engine queues at most {service.max_queued_jobs} "
                           "jobs (serve --max-queued-jobs); split the manifest, or run xreal-engine generate-batch on "
                           "the server (README: Synthetic datasets).")
        free = max(0, service.max_queued_jobs - self.store.queued_count())
        if rows > free:
            retry = max(1, int(round((self.store.recent_duration() or 30.0) * (rows - free))))
            raise ApiError(429, "queue_full",
                           f"The batch has {rows} rows but the engine's queue has room for {free} more jobs now "
                           f"(at most {service.max_queued_jobs} wait); nothing was queued. Try again in about "
                           f"{retry} seconds.", {"Retry-After": str(retry)})

    def submit(self, planned: list, request_id, *, formats: list, quality_check: bool, min_dice) -> tuple:
        """Queue one job per planned row, all or none -> (batch, created). ApiError 422/429 if they do not fit."""
        service, store = self.service, self.store
        self._check_room(len(planned))
        batch_id = new_job_id()
        jobs, made, created = [], [], False
        try:
            for row, prepared, warnings in planned:
                job_id = new_job_id()
                inputs = store.inputs_dir(job_id)
                inputs.mkdir(parents=True)
                made.append(job_id)
                jobs.append((job_id, _row_spec(row, prepared, inputs, batch_id, quality_check, min_dice), warnings))
            settings = {"formats": formats, "quality_check": quality_check, "min_dice": min_dice}
            batch, created = store.add_batch(batch_id, request_id, settings, jobs, service.max_queued_jobs, 1)
        except QueueFull:  # filled up by another request since the check above: the same refusal
            self._check_room(len(jobs))
            raise ApiError(429, "queue_full", "The engine's queue is full; nothing was queued. Try again later.",
                           {"Retry-After": "30"}) from None
        finally:
            if not created:  # refused, failed or a retry of a known request_id: nothing is left behind
                for job_id in made:
                    shutil.rmtree(store.job_dir(job_id), ignore_errors=True)
        service.wake()
        return batch, created

    # -- status ---------------------------------------------------------------------------------
    def get(self, batch_id: str) -> dict:
        self._purge_orphans()
        batch = self.store.get_batch(batch_id) if _is_id(batch_id) else None
        if batch is None:
            raise ApiError(404, "batch_not_found",
                           f"There is no batch '{shown(batch_id, 40)}' (it may have been deleted or purged).")
        return batch

    def list(self, limit: int = 100) -> list:
        self._purge_orphans()
        return [self.describe(batch, rows=False) for batch in self.store.list_batches(limit)]

    def describe(self, batch: dict, rows: bool = True) -> dict:
        """The public view of a batch: counts, progress, ETA and (with ``rows``) every row's state and Dice."""
        jobs = self.store.batch_jobs(batch["id"])
        counts = dict.fromkeys((QUEUED, RUNNING, SUCCEEDED, FAILED, "dropped", CANCELLED), 0)
        row_views, done, running_left, per_job, last_queued = [], 0.0, 0.0, self.store.recent_duration(), None
        for job in jobs:
            state, member = job["state"], job["spec"].batch
            dropped = state == FAILED and job["error_code"] == QUALITY_REJECTED
            counts["dropped" if dropped else state] += 1
            fraction = 1.0 if state in FINAL_STATES else 0.0
            if state == RUNNING:
                live = self.service.live(job["id"])
                fraction = live.fraction() if live is not None else 0.0
                eta = live.eta_seconds() if live is not None else None
                running_left += eta if eta is not None else (per_job or 0.0)
                if per_job is None and live is not None and eta is not None:
                    per_job = time.monotonic() - live.started + eta
            elif state == QUEUED:
                last_queued = job["seq"]
            done += fraction
            if rows:
                row_views.append({
                    "row": member.row, "name": member.name, "job": job["id"], "state": state, "dropped": dropped,
                    "progress": round(fraction, 4),
                    "error": {"code": job["error_code"], "message": job["error_message"]} if job["error_message"] else None,
                    "quality": self._quality_of(job) if state == SUCCEEDED else None,
                })
        total = batch["rows_total"]
        active = counts[QUEUED] + counts[RUNNING]
        eta = None
        if active and per_job is not None:
            eta = round(running_left + per_job * (self.store.queued_up_to(last_queued) if last_queued else 0), 1)
        if active:
            state = RUNNING if counts[QUEUED] < len(jobs) else QUEUED
        else:
            state = CANCELLED if counts[CANCELLED] else "finished"
        finished_at = max((job["finished_at"] or 0 for job in jobs), default=None) if not active else None
        problem = self.store.problem() if active else None
        view = {
            "id": batch["id"], "request_id": batch["request_id"], "state": state, "rows_total": total,
            "counts": counts, "deleted_rows": total - len(jobs),
            "progress": round(done / total, 4) if total else 1.0, "eta_seconds": 0.0 if not active else eta,
            "created_at": _iso(batch["created_at"]), "finished_at": _iso(finished_at or None),
            "formats": batch["settings"].get("formats", ["results"]),
            "quality_check": batch["settings"].get("quality_check", True),
            "min_dice": batch["settings"].get("min_dice"),
            "dataset_ready": (self.batches_dir / batch["id"] / DATASET_ZIP).is_file(),
            "storage_problem": str(problem) if problem is not None else None,  # queued rows wait while it lasts
        }
        if rows:
            view["rows"] = sorted(row_views, key=lambda r: r["row"])
        return view

    def _quality_of(self, job: dict):
        if job["id"] not in self._quality:
            try:
                provenance = json.loads((self.store.result_dir(job["id"]) / "provenance.json").read_text())
            except (OSError, ValueError):
                return None
            self._quality[job["id"]] = provenance.get("quality")
        return self._quality[job["id"]]

    # -- cancel, delete ---------------------------------------------------------------------------
    def cancel(self, batch: dict) -> None:
        """Queued rows are cancelled at once (one statement), the running one within one diffusion step."""
        for job_id in self.store.cancel_queued_in_batch(batch["id"]):
            clear_job_dir(self.store.job_dir(job_id))
        for job in self.store.batch_jobs(batch["id"]):
            if job["state"] == RUNNING:
                self.service.cancel(job["id"])

    def delete(self, batch: dict, timeout: float = 30.0) -> bool:
        """Cancel, then remove every job, the dataset and the batch. False if a row did not stop in time."""
        self.cancel(batch)
        for job in self.store.batch_jobs(batch["id"]):
            if not self.service.delete(job["id"], timeout=timeout):
                return False
        self.store.delete_batch(batch["id"])
        shutil.rmtree(self.batches_dir / batch["id"], ignore_errors=True)
        return True

    def _purge_orphans(self) -> None:
        """Batches whose jobs were all purged by retention go too (checked at most once a minute)."""
        if time.monotonic() - self._orphans_checked < ORPHAN_CHECK_SECONDS:
            return
        self._orphans_checked = time.monotonic()
        for batch_id in self.store.batches_without_jobs():
            self.store.delete_batch(batch_id)
            shutil.rmtree(self.batches_dir / batch_id, ignore_errors=True)

    # -- the dataset ------------------------------------------------------------------------------
    def dataset(self, batch: dict) -> Path:
        """``dataset.zip`` of a batch whose rows are all final, built on the first request and kept."""
        view = self.describe(batch, rows=False)
        if view["counts"][QUEUED] or view["counts"][RUNNING]:
            raise ApiError(409, "not_finished",
                           f"The batch is not finished ({view['counts'][SUCCEEDED]} of {view['rows_total']} rows "
                           "done); the dataset is built when every row is.")
        target = self.batches_dir / batch["id"] / DATASET_ZIP
        with self._building:
            if not target.is_file():
                self._build(batch, target)
        return target

    def _build(self, batch: dict, target: Path) -> None:
        """Lay out generate-batch's output directory from the results, export, zip it, keep only the zip."""
        from ..model.info import weights_hash

        work = target.parent / f".build-{uuid.uuid4().hex}"
        partial = target.with_name(f".{DATASET_ZIP}.{uuid.uuid4().hex}.tmp")
        jobs = self.store.batch_jobs(batch["id"])
        settings = batch["settings"]
        try:
            rows, failures = [], {}
            for job in jobs:
                member = job["spec"].batch
                rows.append(BatchRow(row=member.row, name=member.name, anatomy=None, seed=job["spec"].parameters.seed))
                if job["state"] == SUCCEEDED:
                    _link_tree(self.store.result_dir(job["id"]), work / IMAGES_DIR / member.name)
                elif job["state"] == FAILED:
                    failures[member.name] = {"row": member.row, "name": member.name,
                                             "kind": "dropped" if job["error_code"] == QUALITY_REJECTED else "failed",
                                             "reason": job["error_message"] or ""}
            (work / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
            formats = settings.get("formats", ["results"])
            records = write_exports(work, rows, formats, self.model_info)
            if self._weights_hash is None:
                self._weights_hash = weights_hash(self.model_dir)
            dataset = summary({}, model_info=self.model_info, weights_hash=self._weights_hash,
                              model=self.model_info.model_id, rows=rows, records=records, failures=failures,
                              formats=formats, quality_check=settings.get("quality_check", True),
                              min_dice=settings.get("min_dice"),
                              last_run={"backend": "service", "batch": batch["id"]})
            (work / SUMMARY_FILE).write_text(json.dumps(dataset, indent=2) + "\n")
            if failures:
                (work / FAILURES_FILE).write_text(_failures_csv(failures))
            with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
                for name in list_result_files(work):
                    archive.write(work / name, arcname=name)
            os.replace(partial, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(OSError):
                partial.unlink()


# ----------------------------------------------------------------------------- helpers


def _templates_folder():
    with contextlib.suppress(InputError):
        return find_templates().resolve()
    return None


def _uploaded_row(row: BatchRow, folder: Path, uploads: dict, templates) -> BatchRow:
    """The row with each file replaced by the uploaded file the manifest names (InputError if it was not sent)."""

    def stored(value):
        if value is None:
            return None
        path = Path(value)
        if templates is not None and path.resolve().parent == templates:
            return value  # a template name, resolved by read_manifest
        try:
            key = path.relative_to(folder).as_posix()
        except ValueError:
            raise InputError("a file is named by a path outside the uploaded files (an absolute path or '..'); "
                             "name each file as its 'file' part is named.") from None
        if key not in uploads:
            raise InputError(f"the file '{shown(key)}' was not uploaded (send it as a 'file' part with that filename).")
        return str(uploads[key])

    return replace(row, anatomy=stored(row.anatomy), image=stored(row.image),
                   pathologies=tuple((stored(mask), finding) for mask, finding in row.pathologies),
                   controls=tuple((name, stored(file), scale) for name, file, scale in row.controls))


def _row_spec(row: BatchRow, prepared, inputs: Path, batch_id: str, quality_check: bool, min_dice) -> JobSpec:
    """The row's files linked into its job's inputs under the names a job uses, and its spec."""

    def place(source, stem: str):
        if source is None:
            return None
        name = stem + _suffix(Path(source))
        _link(Path(source), inputs / name)
        return name

    spec = JobSpec.build(anatomy=place(row.anatomy, "anatomy"), image=place(row.image, "image"),
                         parameters=prepared.parameters,
                         pathologies=[(place(mask, f"pathology-{k}"), region.finding) for k, ((mask, _), region)
                                      in enumerate(zip(row.pathologies, prepared.pathologies), start=1)],
                         controls=[(name, place(file, f"control-{k}"), scale)
                                   for k, (name, file, scale) in enumerate(row.controls, start=1)])
    return replace(spec, batch=BatchMember(batch_id=batch_id, row=row.row, name=row.name,
                                           quality_check=quality_check, min_dice=min_dice))


def _suffix(path: Path) -> str:
    """'.seg.nrrd' of 'file-0003.seg.nrrd', '.png' of 'anatomy_01.png'."""
    name = path.name
    return name[name.index("."):] if "." in name else ""


def _link(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:  # another file system (the templates), or no hard links
        shutil.copyfile(source, dest)


def _link_tree(source: Path, dest: Path) -> None:
    for name in list_result_files(source):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        _link(source / name, dest / name)


def _failures_csv(failures: dict) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FAILURE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for entry in sorted(failures.values(), key=lambda e: int(e["row"])):
        writer.writerow(entry)
    return buffer.getvalue()


def _row_number(problem: str) -> int:
    head = problem.split(":", 1)[0].removeprefix("row ")
    return int(head) if head.isdigit() else 0


def _is_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)
