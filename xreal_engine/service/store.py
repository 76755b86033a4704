"""The job store of the engine service: every job row in SQLite, and the job folders.

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

A job is a dict of its row; its ``spec`` is a :class:`~.spec.JobSpec` (stored as JSON).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from .spec import JobSpec

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)
INTERRUPTED_MESSAGE = (
    "This job was interrupted because the engine stopped while it was running; submit it again."
)

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
    def add(self, job_id: str, request_id: str | None, spec: JobSpec, warnings: list[str],
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
                (job_id, request_id, QUEUED, time.time(), spec.to_json(), json.dumps(warnings)),
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
    job["spec"] = JobSpec.from_json(job["spec"])
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


def new_job_id() -> str:
    return uuid.uuid4().hex
