"""Job store and worker of the engine service.

Why SQLite (WAL) under ``--data-dir``: job state must survive a crash or ``kill -9``.
Every state change is one committed transaction, so after a restart the table is the
truth. Files live next to it::

    DATA_DIR/jobs.sqlite3
    DATA_DIR/jobs/<id>/inputs/    the uploads, under names the server chose
    DATA_DIR/jobs/<id>/result/    written by generate_to_directory (temp dir, then rename)
    DATA_DIR/incoming/            uploads of requests still being validated

Uploads are deleted when a job finishes (only ``result/`` stays until the retention purge).

Restart policy (documented choice): queued jobs stay queued and run; a job that was
*running* when the engine died is marked failed with an "interrupted" message instead of
being re-queued, because a job that killed the engine (out of memory, a driver crash)
would otherwise kill it again on every restart. The user simply submits it again.

One worker thread per device runs jobs in submission order; the queue is bounded
(``QueueFull`` -> HTTP 429). Progress of the running job is kept in memory only: after a
crash that job is failed anyway.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import Cancelled, InputError, ModelError, XRealError

log = logging.getLogger("xreal_engine.jobs")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)
INTERRUPTED_MESSAGE = (
    "This job was interrupted because the engine stopped while it was running; submit it again."
)
PURGE_INTERVAL_SECONDS = 600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT NOT NULL UNIQUE,
    request_id    TEXT UNIQUE,
    state         TEXT NOT NULL,
    created_at    REAL NOT NULL,
    started_at    REAL,
    finished_at   REAL,
    spec          TEXT NOT NULL,
    warnings      TEXT NOT NULL DEFAULT '[]',
    error_code    TEXT,
    error_message TEXT,
    files         TEXT NOT NULL DEFAULT '[]',
    dicom         TEXT,
    push_report   TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
"""


class QueueFull(Exception):
    """The bounded queue has no room; ``retry_after`` is a hint in seconds."""

    def __init__(self, retry_after: int):
        super().__init__("queue full")
        self.retry_after = retry_after


class JobStore:
    """All job rows, behind one lock (short statements; the service is one process)."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.incoming_dir = self.data_dir / "incoming"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.data_dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None, timeout=30
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- paths ------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def inputs_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "inputs"

    def result_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "result"

    # -- queries ----------------------------------------------------------------------
    def get(self, job_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row_to_dict(row) if row else None

    def get_by_request_id(self, request_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE request_id = ?", (request_id,)).fetchone()
        return _row_to_dict(row) if row else None

    def list(self, state: str | None = None, limit: int = 100) -> list[dict]:
        with self._lock:
            if state:
                rows = self._db.execute(
                    "SELECT * FROM jobs WHERE state = ? ORDER BY seq DESC LIMIT ?", (state, limit)
                ).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [_row_to_dict(row) for row in rows]

    def queued_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (QUEUED,)).fetchone()[0]

    def queue_position(self, seq: int) -> int:
        """1 = next to run."""
        with self._lock:
            ahead = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = ? AND seq < ?", (QUEUED, seq)
            ).fetchone()[0]
        return ahead + 1

    def recent_duration(self) -> float | None:
        """Mean run time of the last few successful jobs, for ETA and Retry-After hints."""
        with self._lock:
            value = self._db.execute(
                "SELECT AVG(finished_at - started_at) FROM (SELECT finished_at, started_at FROM jobs "
                "WHERE state = ? AND started_at IS NOT NULL ORDER BY seq DESC LIMIT 20)",
                (SUCCEEDED,),
            ).fetchone()[0]
        return float(value) if value is not None else None

    # -- state changes ------------------------------------------------------------------
    def add(self, job_id: str, request_id: str | None, spec: dict, warnings: list[str],
            max_queued: int, retry_after: int) -> tuple[dict, bool]:
        """Insert a queued job -> (job, True); or the existing job of ``request_id`` -> (job, False).

        The idempotency check and the queue bound are checked in the same transaction as
        the insert, so concurrent retries never create two jobs and never overfill the queue.
        """
        with self._lock:
            if request_id is not None:
                existing = self.get_by_request_id(request_id)
                if existing:
                    return existing, False
            if self.queued_count() >= max_queued:
                raise QueueFull(retry_after)
            self._db.execute(
                "INSERT INTO jobs (id, request_id, state, created_at, spec, warnings) VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, request_id, QUEUED, time.time(), json.dumps(spec), json.dumps(warnings)),
            )
            return self.get(job_id), True

    def claim_next(self) -> dict | None:
        """Atomically move the oldest queued job to running."""
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM jobs WHERE state = ? ORDER BY seq LIMIT 1", (QUEUED,)
            ).fetchone()
            if row is None:
                return None
            self._db.execute(
                "UPDATE jobs SET state = ?, started_at = ? WHERE id = ?", (RUNNING, time.time(), row["id"])
            )
            return self.get(row["id"])

    def cancel_if_queued(self, job_id: str) -> bool:
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, error_code = 'cancelled', "
                "error_message = 'The job was cancelled before it started.' WHERE id = ? AND state = ?",
                (CANCELLED, time.time(), job_id, QUEUED),
            )
            return cursor.rowcount == 1

    def finish(self, job_id: str, state: str, *, error_code: str | None = None,
               error_message: str | None = None, files: list[str] | None = None,
               dicom: dict | None = None, push_report: dict | None = None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, error_code = ?, error_message = ?, "
                "files = ?, dicom = ?, push_report = ? WHERE id = ?",
                (state, time.time(), error_code, error_message, json.dumps(files or []),
                 json.dumps(dicom) if dicom is not None else None,
                 json.dumps(push_report) if push_report is not None else None, job_id),
            )

    def set_push_report(self, job_id: str, push_report: dict) -> None:
        """Record the outcome of sending a finished job's result to a PACS later on."""
        with self._lock:
            self._db.execute("UPDATE jobs SET push_report = ? WHERE id = ?", (json.dumps(push_report), job_id))

    def delete(self, job_id: str) -> None:
        """Remove the row first (the job disappears at once), then its files."""
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def recover_after_restart(self) -> int:
        """Fail jobs left 'running' by a crash, drop half-written results and stray uploads."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE state = ?", (RUNNING,)).fetchall()
            self._db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, error_code = 'interrupted', error_message = ? "
                "WHERE state = ?",
                (FAILED, time.time(), INTERRUPTED_MESSAGE, RUNNING),
            )
            known = {row[0] for row in self._db.execute("SELECT id FROM jobs").fetchall()}
        for row in rows:
            clear_job_dir(self.job_dir(row["id"]))
        for path in self.jobs_dir.iterdir():
            if path.name not in known:
                shutil.rmtree(path, ignore_errors=True)
        for path in self.incoming_dir.iterdir():
            shutil.rmtree(path, ignore_errors=True)
        return len(rows)

    def expired(self, older_than: float) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT id FROM jobs WHERE state IN ({','.join('?' * len(FINAL_STATES))}) AND finished_at < ?",
                (*FINAL_STATES, older_than),
            ).fetchall()
        return [row["id"] for row in rows]


def _row_to_dict(row: sqlite3.Row) -> dict:
    job = dict(row)
    job["spec"] = json.loads(job["spec"])
    job["warnings"] = json.loads(job["warnings"])
    job["files"] = json.loads(job["files"])
    job["dicom"] = json.loads(job["dicom"]) if job["dicom"] else None
    job["push_report"] = json.loads(job["push_report"]) if job["push_report"] else None
    return job


def clear_job_dir(job_dir: Path, keep: tuple = ()) -> None:
    """Remove everything in a job's folder except the names in ``keep``.

    A finished job keeps only ``result``: the uploads (which may be a patient's X-ray)
    are deleted as soon as they are no longer needed. Partial results go too.
    """
    if not job_dir.is_dir():
        return
    for path in job_dir.iterdir():
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


@dataclass
class LiveProgress:
    """Progress of the running job; ``expected_steps`` covers all diffusion stages."""

    expected_steps: int
    started: float = field(default_factory=time.monotonic)
    stage: str = "starting"
    step: int = 0
    total: int = 0
    steps_in_finished_stages: int = 0

    def update(self, stage: str, step: int, total: int) -> None:
        if stage != self.stage and self.stage != "starting":
            self.steps_in_finished_stages += self.total
        self.stage, self.step, self.total = stage, step, total

    def fraction(self) -> float:
        done = self.steps_in_finished_stages + self.step
        return min(1.0, done / self.expected_steps) if self.expected_steps else 0.0

    def eta_seconds(self) -> float | None:
        fraction = self.fraction()
        if fraction <= 0:
            return None
        elapsed = time.monotonic() - self.started
        return max(0.0, elapsed * (1 - fraction) / fraction)


# generate(pipe, spec, inputs_dir, result_dir, progress) -> provenance dict
RunJob = Callable[[object, dict, Path, Path, Callable[[str, int, int], None]], dict]


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
    def submit(self, job_id: str, request_id: str | None, spec: dict, warnings: list[str]) -> tuple[dict, bool]:
        average = self.store.recent_duration() or 30.0
        retry_after = max(1, int(round(average)))
        job, created = self.store.add(job_id, request_id, spec, warnings, self.max_queued_jobs, retry_after)
        if created:
            log.info("job %s queued", job_id)
            self._work_available.set()
        return job, created

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
            if time.monotonic() - self._last_purge > PURGE_INTERVAL_SECONDS:
                self.purge_expired()
            self._work_available.clear()  # cleared before looking, so a submit after the look wakes us
            job = self.store.claim_next()
            if job is None:
                self._work_available.wait(timeout=5.0)
                continue
            self._execute(job)
            with self._finished:
                self._finished.notify_all()

    def _execute(self, job: dict) -> None:
        job_id, spec = job["id"], job["spec"]
        if self.model_state != "ready":
            self.store.finish(job_id, FAILED, error_code="model_unavailable", error_message=self.model_error)
            return
        live = LiveProgress(expected_steps=spec.get("expected_steps") or 0)
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
            self.store.finish(job_id, CANCELLED, error_code="cancelled", error_message="The job was cancelled.")
            log.info("job %s cancelled", job_id)
        except _Interrupted:
            self._discard_result(job_id)
            self.store.finish(job_id, FAILED, error_code="interrupted", error_message=INTERRUPTED_MESSAGE)
            log.info("job %s interrupted by shutdown", job_id)
        except (InputError, ModelError, XRealError) as error:
            self._discard_result(job_id)
            self.store.finish(job_id, FAILED, error_code="generation_failed", error_message=str(error))
            log.warning("job %s failed: %s", job_id, type(error).__name__)
        except Exception as error:  # noqa: BLE001 - the service must keep serving
            self._discard_result(job_id)
            self.store.finish(job_id, FAILED, error_code="engine_error", error_message=_readable(error))
            log.exception("job %s failed with an unexpected error", job_id)
            _release_device_memory()
        else:
            clear_job_dir(self.store.job_dir(job_id), keep=("result",))
            files = list_result_files(self.store.result_dir(job_id))
            push_report = self._push_result(job_id, spec)
            self.store.finish(job_id, SUCCEEDED, files=files, dicom=(provenance or {}).get("dicom"),
                              push_report=push_report)
            log.info("job %s succeeded in %.1f s", job_id, time.monotonic() - started)
        finally:
            self._live.pop(job_id, None)
            self._cancel_requested.discard(job_id)

    def _push_result(self, job_id: str, spec: dict) -> dict | None:
        destination = spec.get("push_to")
        if not destination:
            return None
        return self.push_result(job_id, destination)

    def push_result(self, job_id: str, destination: str) -> dict:
        """Send a finished job's SC + SEG to a PACS destination; failures are reported, never raised."""
        if self._push is None:
            return {"ok": False, "destination": destination, "message": "PACS support is not available."}
        if job_id in self._live:
            self._live[job_id].update("pushing", 0, 1)
        try:
            report = dict(self._push(destination, self.store.result_dir(job_id)))
            report.setdefault("ok", not report.get("failed"))
            for instance in report.get("instances", []):  # file names only: no server paths in the API
                if isinstance(instance, dict) and instance.get("file"):
                    instance["file"] = Path(str(instance["file"])).name
        except Exception as error:  # noqa: BLE001 - a failed push is reported, the result stays
            log.warning("job %s: push to a PACS destination failed", job_id)
            report = {"ok": False, "message": _readable(error, "The result could not be sent")}
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


def new_job_id() -> str:
    return uuid.uuid4().hex
