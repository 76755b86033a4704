"""The worker of the engine service: the bounded queue, one worker thread, cancel and live progress.

One worker thread per device runs jobs in submission order; the queue is bounded
(``QueueFull`` -> HTTP 429). Progress of the running job is kept in memory only: after a
crash that job is failed anyway (see ``store.py`` for the restart policy).

The worker thread never dies: every exception around claiming, running and finishing a job
is caught and logged; the job is failed with one sentence. While the store cannot be written
(``JobStore.problem``) it claims nothing, and a final state it could not record is kept in
memory and written as soon as the store accepts writes again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import Cancelled, StorageError, XRealError, os_reason
from .errors import scrub
from .spec import JobSpec, prepare_job
from .store import CANCELLED, FAILED, INTERRUPTED_MESSAGE, RUNNING, SUCCEEDED, JobStore, clear_job_dir

log = logging.getLogger("xreal_engine.jobs")

PURGE_INTERVAL_SECONDS = 600.0
STORAGE_RETRY_SECONDS = 1.0  # how often a worker that cannot store looks again


@dataclass
class LiveProgress:
    """Progress of the running job; ``expected_steps`` covers all diffusion stages.

    The time left is the time per step actually run times the steps left. A stage that jumps from its
    first to its last step in one report (an anatomy stage reused from the cache, model/anatomy_cache.py)
    counts as done but not as timed, so it does not make the rest of the job look instant.
    """

    expected_steps: int
    started: float = field(default_factory=time.monotonic)
    stage: str = "starting"
    step: int = 0
    total: int = 0
    steps_in_finished_stages: int = 0
    timed_steps: int = 0  # steps that took their own time (reported one at a time)
    timed_seconds: float = 0.0
    _last_done: int = 0
    _last_report: float = field(default=0.0, init=False)

    def __post_init__(self):
        self._last_report = self.started

    def update(self, stage: str, step: int, total: int) -> None:
        if stage != self.stage and self.stage != "starting":
            self.steps_in_finished_stages += self.total
        self.stage, self.step, self.total = stage, step, total
        now, done = time.monotonic(), self.steps_done()
        if done - self._last_done == 1:
            self.timed_steps += 1
            self.timed_seconds += now - self._last_report
        if done != self._last_done:
            self._last_done, self._last_report = done, now

    def steps_done(self) -> int:
        return self.steps_in_finished_stages + self.step

    def fraction(self) -> float:
        return min(1.0, self.steps_done() / self.expected_steps) if self.expected_steps else 0.0

    def eta_seconds(self) -> float | None:
        if self.timed_steps == 0:
            return None
        left = max(0, self.expected_steps - self.steps_done())
        return self.timed_seconds / self.timed_steps * left


# generate(pipe, spec, inputs_dir, result_dir, progress) -> provenance dict
RunJob = Callable[[object, JobSpec, Path, Path, Callable[[str, int, int], None]], dict]


class JobService:
    """The queue, the single worker thread, cancel flags and live progress.

    ``load_pipeline()`` is called once in the worker thread (so the HTTP side answers
    while a big model loads); ``run_job`` performs one job. ``push(destination, result_dir)``
    is called after success when the job asks for it; its report is stored, its failure
    does not fail the job.
    """

    def __init__(self, store: JobStore, *, load_pipeline: Callable[[], object], run_job: RunJob,
                 max_queued_jobs: int, retention_hours: float,
                 push: Callable[[str, Path], dict] | None = None):
        self.store = store
        self.max_queued_jobs = max_queued_jobs
        self.retention_hours = retention_hours
        self._load_pipeline = load_pipeline
        self._run_job = run_job
        self._push = push
        self._pipe = None
        self.model_state = "loading"  # loading | ready | failed
        self.model_error: str | None = None
        self._work_available = threading.Event()  # set on submit; no lost wake-ups unlike a bare Condition
        self._stop = threading.Event()
        self._cancel_requested: set[str] = set()
        self._live: dict[str, LiveProgress] = {}
        self._finished = threading.Condition()
        self._last_purge = 0.0
        self._unrecorded: dict[str, tuple[str, dict]] = {}  # job id -> final state the store refused
        self._storage_problem: str | None = None  # the last storage problem logged
        self._thread = threading.Thread(target=self._worker, name="xreal-worker", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        interrupted = self.store.recover_after_restart()
        if interrupted:
            log.warning("%d job(s) were running when the engine stopped; marked failed (interrupted)", interrupted)
        self.purge_expired()
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current diffusion step; the running job ends as interrupted."""
        self._stop.set()
        self._work_available.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- API used by the server ---------------------------------------------------------------
    @property
    def device(self) -> str | None:
        """The loaded pipeline's device ('cpu', 'cuda:0'); None while there is no pipeline."""
        device = getattr(self._pipe, "device", None)
        return None if device is None else str(device)

    def submit(self, job_id: str, request_id: str | None, spec: JobSpec, warnings: list[str]) -> tuple[dict, bool]:
        average = self.store.recent_duration() or 30.0
        retry_after = max(1, int(round(average)))
        job, created = self.store.add(job_id, request_id, spec, warnings, self.max_queued_jobs, retry_after)
        if created:
            log.info("job %s queued", job_id)
            self._work_available.set()
        return job, created

    def wake(self) -> None:
        """Jobs were queued without ``submit`` (a batch, all at once): look for work now."""
        self._work_available.set()

    def live(self, job_id: str) -> LiveProgress | None:
        return self._live.get(job_id)

    def cancel(self, job_id: str) -> dict | None:
        """Queued -> cancelled now; running -> cancelled within one diffusion step."""
        if self.store.cancel_if_queued(job_id):
            clear_job_dir(self.store.job_dir(job_id))
            log.info("job %s cancelled while queued", job_id)
        else:
            job = self.store.get(job_id)
            if job is None:
                return None
            if job["state"] == RUNNING:
                self._cancel_requested.add(job_id)
        return self.store.get(job_id)

    def wait_until_not_running(self, job_id: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._finished:
            while True:
                job = self.store.get(job_id)
                if job is None or job["state"] != RUNNING:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._finished.wait(min(remaining, 0.5))

    def delete(self, job_id: str, timeout: float = 30.0) -> bool:
        """Cancel if needed, then remove the job and its files. False if it did not stop in time."""
        self.cancel(job_id)
        if not self.wait_until_not_running(job_id, timeout):
            return False
        self.store.delete(job_id)
        log.info("job %s deleted", job_id)
        return True

    def purge_expired(self, now: float | None = None) -> int:
        """Delete finished jobs older than the retention period (``now`` defaults to the clock)."""
        self._last_purge = time.monotonic()
        if self.retention_hours <= 0:
            return 0
        now = time.time() if now is None else now
        expired = self.store.expired(now - self.retention_hours * 3600)
        for job_id in expired:
            self.store.delete(job_id)
        if expired:
            log.info("retention: purged %d finished job(s)", len(expired))
        return len(expired)

    # -- worker -----------------------------------------------------------------------------
    def _worker(self) -> None:
        try:
            self._pipe = self._load_pipeline()
            self.model_state = "ready"
            log.info("model ready")
        except Exception as error:  # noqa: BLE001 - any load failure becomes a readable state
            self.model_state = "failed"
            self.model_error = _readable(error, "The model could not be loaded")
            log.error("model could not be loaded: %s", self.model_error)
        while not self._stop.is_set():
            try:
                idle = self._work_once()
            except Exception:  # noqa: BLE001 - the worker must survive anything and keep serving
                log.exception("the worker hit an unexpected problem; it carries on")
                idle = STORAGE_RETRY_SECONDS
            if idle:
                self._work_available.wait(timeout=idle)

    def _work_once(self) -> float:
        """Record what is pending, then run one job; returns how long to wait for work (0: look again now)."""
        self._work_available.clear()  # cleared before looking, so a submit after the look wakes us
        if self._unrecorded and not self._record_unrecorded():
            return STORAGE_RETRY_SECONDS
        problem = self.store.problem()
        if (problem and problem.reason) != self._storage_problem:  # logged when it changes, not every second
            self._storage_problem = problem and problem.reason
            if problem is None:
                log.info("the data directory can be written again; queued jobs run")
            else:
                log.error("queued jobs wait: %s", problem)
        if problem is not None:
            return STORAGE_RETRY_SECONDS
        if time.monotonic() - self._last_purge > PURGE_INTERVAL_SECONDS:
            self.purge_expired()
        job = self.store.claim_next()
        if job is None:
            return 5.0
        try:
            state, fields = self._execute(job)
        except Exception as error:  # noqa: BLE001 - whatever went wrong, the job ends failed with one sentence
            log.exception("job %s failed with an unexpected error", job["id"])
            state, fields = FAILED, {"error_code": "engine_error", "error_message": _readable(error)}
        finally:
            self._live.pop(job["id"], None)
            self._cancel_requested.discard(job["id"])
        self._record(job["id"], state, fields)
        return 0.0

    def _record(self, job_id: str, state: str, fields: dict) -> None:
        """Store a job's final state; if the store refuses, keep it to write when the store recovers."""
        try:
            self.store.finish(job_id, state, **fields)
        except StorageError as error:
            log.error("job %s ended %s but the store cannot record it (%s); retrying", job_id, state, error.reason)
            self._unrecorded[job_id] = (state, fields)
        finally:
            with self._finished:
                self._finished.notify_all()

    def _record_unrecorded(self) -> bool:
        """Write the final states the store refused earlier; True when none is left."""
        for job_id, (state, fields) in list(self._unrecorded.items()):
            try:
                self.store.finish(job_id, state, **fields)
            except StorageError:
                return False
            del self._unrecorded[job_id]
            log.info("job %s: its final state (%s) is recorded now", job_id, state)
        with self._finished:
            self._finished.notify_all()
        return True

    def _execute(self, job: dict) -> tuple[str, dict]:
        """Run one claimed job; returns (final state, the store's finish fields)."""
        job_id, spec = job["id"], job["spec"]
        if self.model_state != "ready":
            return FAILED, {"error_code": "model_unavailable", "error_message": self.model_error}
        live = LiveProgress(expected_steps=spec.expected_steps)
        self._live[job_id] = live

        def progress(stage: str, step: int, total: int) -> None:
            if job_id in self._cancel_requested:
                raise Cancelled("The job was cancelled.")
            if self._stop.is_set():
                raise _Interrupted()
            live.update(stage, step, total)

        log.info("job %s started", job_id)
        started = time.monotonic()
        try:
            provenance = self._run_job(self._pipe, spec, self.store.inputs_dir(job_id),
                                       self.store.result_dir(job_id), progress)
        except Cancelled:
            self._discard_result(job_id)
            log.info("job %s cancelled", job_id)
            return CANCELLED, {"error_code": "cancelled", "error_message": "The job was cancelled."}
        except _Interrupted:
            self._discard_result(job_id)
            log.info("job %s interrupted by shutdown", job_id)
            return FAILED, {"error_code": "interrupted", "error_message": INTERRUPTED_MESSAGE}
        except (StorageError, OSError) as error:  # the result could not be written: the engine's disk, not the input
            self._discard_result(job_id)
            reason = error.reason if isinstance(error, StorageError) else os_reason(error)
            self.store.note_failure(reason)
            log.error("job %s failed: its result could not be stored (%s)", job_id, reason)
            return FAILED, {"error_code": "storage_error",
                            "error_message": f"The engine could not store the result: {reason}."}
        except XRealError as error:
            self._discard_result(job_id)
            log.warning("job %s failed: %s", job_id, type(error).__name__)
            # a batch row's image that failed its quality check is "quality_rejected" (batch/quality.py)
            return FAILED, {"error_code": getattr(error, "job_error_code", "generation_failed"),
                            "error_message": scrub(str(error), self.store.data_dir)}
        except Exception as error:  # noqa: BLE001 - the service must keep serving
            self._discard_result(job_id)
            log.exception("job %s failed with an unexpected error", job_id)
            _release_device_memory()
            return FAILED, {"error_code": "engine_error", "error_message": _readable(error)}
        clear_job_dir(self.store.job_dir(job_id), keep=("result",))
        files = list_result_files(self.store.result_dir(job_id))
        push_report = self._push_result(job_id, spec)
        log.info("job %s succeeded in %.1f s", job_id, time.monotonic() - started)
        return SUCCEEDED, {"files": files, "dicom": (provenance or {}).get("dicom"), "push_report": push_report}

    def _push_result(self, job_id: str, spec: JobSpec) -> dict | None:
        if not spec.push_to:
            return None
        return self.push_result(job_id, spec.push_to)

    def push_result(self, job_id: str, destination: str) -> dict:
        """Send a finished job's SC + SEG to a PACS destination; failures are reported, never raised."""
        if self._push is None:
            return {"ok": False, "destination": destination, "message": "PACS support is not available."}
        if job_id in self._live:
            self._live[job_id].update("pushing", 0, 1)
        try:
            report = dict(self._push(destination, self.store.result_dir(job_id)))
            report.setdefault("ok", not report.get("failed"))
        except Exception as error:  # noqa: BLE001 - a failed push is reported, the result stays
            log.warning("job %s: push to a PACS destination failed", job_id)
            # What was sent before it stopped (the SC may be in the PACS already), then why it stopped.
            report = {**dict(getattr(error, "report", None) or {}), "ok": False,
                      "message": _readable(error, "The result could not be sent")}
        for instance in report.get("instances", []):  # file names only: no server paths in the API
            if isinstance(instance, dict) and instance.get("file"):
                instance["file"] = Path(str(instance["file"])).name
        report.setdefault("destination", destination)
        return report

    def _discard_result(self, job_id: str) -> None:
        clear_job_dir(self.store.job_dir(job_id))


class _Interrupted(Exception):
    """Raised from the progress callback when the service shuts down."""


def list_result_files(result_dir: Path) -> list[str]:
    """Relative POSIX paths of every file in a result directory, sorted."""
    return sorted(path.relative_to(result_dir).as_posix() for path in result_dir.rglob("*") if path.is_file())


def _readable(error: BaseException, prefix: str = "The generation failed") -> str:
    """One sentence for users; out-of-memory gets its own advice. Never a traceback."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, XRealError):
        return text
    if isinstance(error, OSError):
        return f"{prefix} because the engine could not use its files: {os_reason(error)}."
    if type(error).__name__ == "OutOfMemoryError" or "out of memory" in text.lower():
        return ("The engine ran out of memory while generating; use fewer concurrent jobs, "
                "a smaller model or a device with more memory.")
    return f"{prefix} because of an internal engine error ({type(error).__name__}); the engine log has details."


def _release_device_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort only
        pass



def run_generation(pipe, spec: JobSpec, inputs_dir: Path, result_dir: Path, progress) -> dict:
    """The real job: validate the stored inputs again (cheap) and run the generation."""
    from ..generate import generate_to_directory

    _, prepared = prepare_job(spec, inputs_dir, pipe.model_info)
    quality = None
    if spec.batch is not None and spec.batch.quality_check:  # a batch row: the segmenter's Dice, as generate-batch
        from ..batch.quality import shared_check

        quality = shared_check(str(pipe.device), spec.batch.min_dice)
    return generate_to_directory(pipe, prepared, result_dir, progress=progress, quality=quality)
