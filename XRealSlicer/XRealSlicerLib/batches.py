"""Variations and Interpolate as one engine batch (``POST /batches``), with the one-by-one runner as fallback.

A run of several images is what the engine's batch endpoint is for: one upload, the engine queues every
row, runs the quality check on each image (its Dice against the drawn anatomy lands in each result's
provenance, and the results list shows it) and reports the whole run's progress. :class:`BatchRunner`
is a drop-in :class:`~XRealSlicerLib.jobs.JobRunner`: the same events on the same queue, each result
downloaded and delivered as soon as its row finishes. A single image, a run that pushes to a PACS or
edits a PACS source (rows have neither) and an engine without the endpoint (404) run one job after the other
as before; ControlNet controls travel in the rows (the manifest's ``controls`` key). No Qt here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from xreal_engine.client import BATCH_FINAL_STATES, EngineError, EngineUnreachable
from xreal_engine.errors import XRealError

from .jobs import CANCELLED, DONE, DOWNLOADING, FAILED, QUEUED, RUNNING, SUBMITTING, UNREACHABLE_GRACE_SECONDS, \
    JobEvent, JobRunner, JobSpec, error_text, format_duration
from .parameters import REQUEST_FIELDS
from .results import read_result

NO_BATCH_ENDPOINT = (404, 405)  # an engine older than the batch endpoint


def can_batch(jobs: Sequence[JobSpec]) -> bool:
    """Whether a run goes to the engine as one batch: several images, none pushed to a PACS and none editing
    a PACS source (batch rows carry neither; submit() does). Controls travel in the rows."""
    return len(jobs) > 1 and all(not job.files.push_to and not job.files.source for job in jobs)


def batch_rows(jobs: Sequence[JobSpec]) -> List[dict]:
    """The planned jobs as rows for ``EngineClient.submit_batch(rows=...)``; a row's name is the job's label."""
    rows = []
    for job in jobs:
        files = job.files
        row = {"name": job.label}
        if files.anatomy_path is not None:
            row["anatomy"] = str(files.anatomy_path)
        row["pathologies"] = [{"mask": str(path), "finding": finding} for path, finding in files.pathologies]
        if files.image_path is not None:
            row["image"] = str(files.image_path)
        row.update({name: value for name, value in files.parameters.items()
                    if name in REQUEST_FIELDS and value is not None})
        if files.controls:  # the manifest's control form; the engine resolves None scales to the model's
            row["controls"] = [{"name": name, "file": str(path) if path else None, "scale": scale}
                               for name, path, scale in files.controls]
            if files.control_stages:
                row["control_stages"] = files.control_stages
        rows.append(row)
    return rows


def row_jobs(status: dict, jobs: Sequence[JobSpec]) -> List[Tuple[JobSpec, dict]]:
    """Each planned job with its row of a batch status (matched by name; rows the status leaves out are
    skipped)."""
    by_name = {str(row.get("name")): row for row in status.get("rows") or []}
    return [(job, by_name[job.label]) for job in jobs if job.label in by_name]


def batch_event(status: dict) -> JobEvent:
    """The panel's progress for a batch: images finished of all, the whole run's fraction and time left."""
    counts = status.get("counts") or {}
    total = int(status.get("rows_total") or len(status.get("rows") or []) or 1)
    finished = sum(int(counts.get(state) or 0) for state in ("succeeded", "failed", "cancelled"))
    running = int(counts.get("running") or 0)
    eta = status.get("eta_seconds")
    return JobEvent(RUNNING if running else QUEUED, min(finished, total - 1), total,
                    fraction=float(status.get("progress") or 0.0),
                    eta_seconds=float(eta) if eta is not None else None)


def failures_text(status: dict) -> Optional[str]:
    """One sentence for the rows that failed (None when none did)."""
    failed = [row for row in status.get("rows") or [] if row.get("state") == "failed"]
    if not failed:
        return None
    reasons = "; ".join(f"{row.get('name')}: {_row_error(row)}" for row in failed)
    total = int(status.get("rows_total") or len(status.get("rows") or []))
    return f"{len(failed)} of {total} images failed ({reasons})."


def _row_error(row: dict) -> str:
    error = row.get("error")
    message = error.get("message") if isinstance(error, dict) else error
    if row.get("dropped"):
        return message or "it did not follow the anatomy well enough"
    return str(message or "the engine reported that it failed")


class BatchRunner(JobRunner):
    """Runs a run's jobs as one engine batch when it can (:func:`can_batch`), else one by one (JobRunner)."""

    def __init__(self, client, poll_interval: float = 0.5, describe_engine: str = "the engine",
                 quality_check: bool = True):
        super().__init__(client, poll_interval, describe_engine)
        self.quality_check = quality_check
        self.batch_id: Optional[str] = None

    def _run(self, jobs: List[JobSpec]) -> None:
        if not can_batch(jobs) or not hasattr(self.client, "submit_batch"):
            super()._run(jobs)
            return
        try:
            self._run_batch(jobs)
        except XRealError as error:
            self._emit(JobEvent(FAILED, message=str(error)))
        except Exception as error:  # never a traceback in the panel
            self._emit(JobEvent(FAILED, message=f"Unexpected problem while running the batch: {error}"))

    def _run_batch(self, jobs: List[JobSpec]) -> None:
        count, started = len(jobs), time.monotonic()
        self._emit(JobEvent(SUBMITTING, 0, count, message=f"Uploading the {count} requests as one batch ..."))
        try:
            status = self.client.submit_batch(rows=batch_rows(jobs), formats=("results",),
                                              quality_check=self.quality_check)
        except EngineUnreachable as error:
            self._emit(JobEvent(FAILED, 0, count, message=f"{self.describe_engine} is not reachable: "
                                                          f"{error_text(error)}"))
            return
        except EngineError as error:
            if error.status in NO_BATCH_ENDPOINT:
                super()._run(jobs)  # an older engine: one job after the other
                return
            self._emit(JobEvent(FAILED, 0, count, message=error_text(error)))
            return
        self.batch_id = str(status.get("id"))
        finished = False
        try:
            finished = self._follow(jobs, started)
        finally:
            if not finished:  # stopped early (a failed download, the engine gone, a crash): stop its rows too
                self._stop_batch()

    def _stop_batch(self) -> None:
        """Cancel the batch's queued rows now and its running one within a diffusion step."""
        try:
            self.client.cancel_batch(self.batch_id)
        except (EngineError, EngineUnreachable):
            pass  # finished already, or the engine is gone: nothing left to stop

    def _follow(self, jobs: List[JobSpec], started: float) -> bool:
        """Poll the batch, deliver each result as its row finishes; True when the batch ran to its end."""
        count = len(jobs)
        delivered: Dict[str, bool] = {}
        unreachable_since = None
        while True:
            if self._cancel.is_set():
                self._emit(JobEvent(RUNNING, 0, count, message="Cancelling ..."))
                self._stop_batch()
                self._emit(JobEvent(CANCELLED, 0, count, message="Cancelled."))
                return True
            try:
                status = self.client.batch_status(self.batch_id)
                unreachable_since = None
            except EngineUnreachable as error:
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > UNREACHABLE_GRACE_SECONDS:
                    self._emit(JobEvent(FAILED, 0, count, message=f"{self.describe_engine} stopped answering during "
                                        f"the batch ({error_text(error)}); start it again and press Generate."))
                    return False
                time.sleep(self.poll_interval)
                continue
            except EngineError as error:
                self._emit(JobEvent(FAILED, 0, count, message=error_text(error)))
                return False
            for spec, row in row_jobs(status, jobs):
                if row.get("state") == "succeeded" and not delivered.get(spec.label):
                    delivered[spec.label] = True
                    if not self._deliver(spec, row, len(delivered) - 1, count):
                        return False
            if status.get("state") in BATCH_FINAL_STATES:
                break
            self._emit(batch_event(status))
            time.sleep(self.poll_interval)
        if status.get("state") == "cancelled":
            self._emit(JobEvent(CANCELLED, count - 1, count, message="Cancelled on the engine."))
        elif failures_text(status):
            self._emit(JobEvent(FAILED, count - 1, count, message=failures_text(status)))
        else:
            self._emit(JobEvent(DONE, count - 1, count, fraction=1.0,
                                message=f"Done in {format_duration(time.monotonic() - started)}."))
        return True

    def _deliver(self, spec: JobSpec, row: dict, index: int, count: int) -> bool:
        """Download a finished row's result and hand it to the panel; False (reported) if that failed."""
        job = {"id": str(row.get("job")), "state": "succeeded"}
        try:
            self.client.download_all(job["id"], spec.result_dir)
        except (EngineError, EngineUnreachable) as error:
            self._emit(JobEvent(FAILED, index, count, label=spec.label,
                                message=f"The result {spec.label} could not be downloaded: {error_text(error)}"))
            return False
        result = read_result(Path(spec.result_dir), job)
        self.results.append(result)
        self._emit(JobEvent(DOWNLOADING, index, count, fraction=(index + 1) / count, result=result, label=spec.label,
                            message=f"Result {index + 1} of {count} is ready."))
        return True
