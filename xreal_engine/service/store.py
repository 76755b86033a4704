"""The job store of the engine service: every job row in SQLite, and the job folders.

Why SQLite (WAL) under ``--data-dir``: job state must survive a crash or ``kill -9``.
Every state change is one committed transaction, so after a restart the table is the
truth. Files live next to it::

    DATA_DIR/jobs.sqlite3
    DATA_DIR/jobs/<id>/inputs/    the uploads, under names the server chose
    DATA_DIR/jobs/<id>/result/    written by generate_to_directory (temp dir, then rename)
    DATA_DIR/incoming/            uploads of requests still being validated

Uploads are deleted when a job finishes (only ``result/`` stays until the retention purge).

Why this file is long: the jobs table, its state transitions and the job folders change together in
one transaction each, so keeping them in one class keeps every state change and its files in one place.

Storage failures: every SQLite error becomes a :class:`~..errors.StorageError` (one sentence,
no path); :meth:`JobStore.problem` says why jobs cannot be stored right now (the data
directory or database gone, replaced, read-only, the disk full, or the last write failed
and a probe write still fails), for the health endpoint, submissions and the worker.

Restart policy (documented choice): queued jobs stay queued and run; a job that was
*running* when the engine died is marked failed with an "interrupted" message instead of
being re-queued, because a job that killed the engine (out of memory, a driver crash)
would otherwise kill it again on every restart. The user simply submits it again.

A job is a dict of its row; its ``spec`` is a :class:`~.spec.JobSpec` (stored as JSON).

Batches (``routes_batches.py``): a ``batches`` row per manifest; its jobs are ordinary jobs whose spec
names the batch (``spec.batch.batch_id``, indexed), queued all in one transaction or not at all.

Why this file is long: it is the one owner of the database, so every SQL statement of the service
(jobs and batches, the schema, the storage checks) is read in one place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import stat
import threading
import time
import uuid
from pathlib import Path

from ..errors import DISK_FULL, StorageError, os_reason, shown
from .settings import MIN_FREE_BYTES
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
CREATE TABLE IF NOT EXISTS write_probe (id INTEGER PRIMARY KEY, written_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT NOT NULL UNIQUE,
    request_id    TEXT UNIQUE,
    created_at    REAL NOT NULL,
    rows_total    INTEGER NOT NULL,
    settings      TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_batch ON jobs (json_extract(spec, '$.batch.batch_id'));
"""
BATCH_OF_JOB = "json_extract(spec, '$.batch.batch_id')"  # the indexed expression above


class QueueFull(Exception):
    """The bounded queue has no room; ``retry_after`` is a hint in seconds."""

    def __init__(self, retry_after: int):
        super().__init__("queue full")
        self.retry_after = retry_after


def _make_private(data_dir: Path, *folders: Path, database: Path) -> None:
    """The data directory (0700 when the engine creates it), its folders (0700) and the job database
    (0600; SQLite gives its WAL files the database's mode) readable by this user only: they hold the
    uploads, an edited patient's X-ray among them, and the results, so no other local user may read them."""
    if not data_dir.exists():
        data_dir.mkdir(parents=True, mode=0o700)
    _refuse_foreign(data_dir)
    for folder in folders:
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)  # also when an older engine made it with the umask's mode
    os.close(os.open(database, os.O_CREAT | os.O_RDWR, 0o600))
    os.chmod(database, 0o600)


def _refuse_foreign(data_dir: Path) -> None:
    """The data directory must be this user's, and no one else may write it: another user who can rename
    its folders could swap ``jobs/`` for one they read. Group or other write permission is taken away
    (a umask of 002 gives it); a directory of another user is refused."""
    if os.name != "posix":
        return
    status = data_dir.stat()
    if status.st_uid != os.getuid():
        raise StorageError(f"The data directory {data_dir} belongs to another user; give a directory of your own "
                           "(--data-dir).", "the data directory belongs to another user")
    if status.st_mode & 0o022:
        os.chmod(data_dir, stat.S_IMODE(status.st_mode) & ~0o022)


class JobStore:
    """All job rows, behind one lock (short statements; the service is one process)."""

    def __init__(self, data_dir: Path):
        """Open (or create) the store; StorageError with one sentence if it cannot be written."""
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.incoming_dir = self.data_dir / "incoming"
        self.batches_dir = self.data_dir / "batches"
        self.db_path = self.data_dir / "jobs.sqlite3"
        self._lock = threading.RLock()
        self._failure: str | None = None  # the reason of the last failed database access, until a probe succeeds
        try:
            _make_private(self.data_dir, self.jobs_dir, self.incoming_dir, self.batches_dir, database=self.db_path)
        except OSError as error:
            raise StorageError(f"The data directory {self.data_dir} cannot be used: {os_reason(error)}.",
                               os_reason(error)) from None
        try:
            self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None, timeout=30)
        except sqlite3.Error as error:
            raise StorageError(f"The job database {self.db_path} cannot be opened: {database_reason(error)}.",
                               database_reason(error)) from None
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._probe()  # a read-only database opens without complaint; a write tells
        except (sqlite3.Error, OSError) as error:
            self._db.close()
            reason = database_reason(error) if isinstance(error, sqlite3.Error) else os_reason(error)
            raise StorageError(f"The data directory {self.data_dir} cannot be written: {reason}.", reason) from None
        self._identity = _identity(self.db_path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _access(self):
        """The lock, and any SQLite error as a StorageError (remembered until a probe write succeeds)."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as error:
                self._failure = database_reason(error)
                raise StorageError(f"The job database cannot be used: {self._failure}.", self._failure) from None

    def _probe(self) -> None:
        """Write a row and a file, as a job would (sqlite3.Error or OSError if either fails)."""
        self._db.execute("INSERT OR REPLACE INTO write_probe (id, written_at) VALUES (1, ?)", (time.time(),))
        probe = self.jobs_dir / f".write-probe-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"probe")
        finally:
            probe.unlink(missing_ok=True)

    def note_failure(self, reason: str) -> None:
        """A write of the data directory failed elsewhere (a result): report it until a probe succeeds."""
        with self._lock:
            self._failure = reason

    def problem(self) -> StorageError | None:
        """None while jobs can be stored; else why not, as a StorageError (one sentence, no server path).

        Asked by the health endpoint, by every submission and by the worker before it claims a job.
        """
        with self._lock:
            if not self.data_dir.is_dir():
                return StorageError("The data directory has been deleted or moved; restart the engine.",
                                    "the data directory is gone")
            if _identity(self.db_path) != self._identity or not self.jobs_dir.is_dir():
                return StorageError("The job database or the jobs folder has been deleted or replaced; restart "
                                    "the engine.", "the job database is gone")
            if not all(os.access(path, os.W_OK) for path in (self.db_path, self.jobs_dir, self.incoming_dir)):
                return StorageError("The data directory or the job database is not writable (read-only or "
                                    "permissions).", "the data directory is not writable")
            try:
                full = shutil.disk_usage(self.data_dir).free < MIN_FREE_BYTES
            except OSError as error:
                return StorageError(f"The data directory cannot be checked: {os_reason(error)}.", os_reason(error))
            if full:
                return StorageError(f"The disk holding the data directory is full (under "
                                    f"{MIN_FREE_BYTES // 1024} KiB free).", DISK_FULL)
            if self._failure is not None:
                try:
                    self._probe()
                except (sqlite3.Error, OSError) as error:
                    self._failure = database_reason(error) if isinstance(error, sqlite3.Error) else os_reason(error)
                    return StorageError(f"The data directory or the job database cannot be written: "
                                        f"{self._failure}.", self._failure)
                self._failure = None
        return None

    # -- paths ------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def inputs_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "inputs"

    def result_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "result"

    # -- queries ----------------------------------------------------------------------
    def get(self, job_id: str) -> dict | None:
        with self._access():
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row_to_dict(row) if row else None

    def get_by_request_id(self, request_id: str) -> dict | None:
        with self._access():
            row = self._db.execute("SELECT * FROM jobs WHERE request_id = ?", (request_id,)).fetchone()
        return _row_to_dict(row) if row else None

    def list(self, state: str | None = None, limit: int = 100) -> list[dict]:
        with self._access():
            if state:
                rows = self._db.execute(
                    "SELECT * FROM jobs WHERE state = ? ORDER BY seq DESC LIMIT ?", (state, limit)
                ).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [_row_to_dict(row) for row in rows]

    def queued_count(self) -> int:
        with self._access():
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (QUEUED,)).fetchone()[0]

    def queue_position(self, seq: int) -> int:
        """1 = next to run."""
        with self._access():
            ahead = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = ? AND seq < ?", (QUEUED, seq)
            ).fetchone()[0]
        return ahead + 1

    def recent_duration(self) -> float | None:
        """Mean run time of the last few successful jobs, for ETA and Retry-After hints."""
        with self._access():
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
        with self._access():
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

    def add_batch(self, batch_id: str, request_id: str | None, settings: dict, jobs: list,
                  max_queued: int, retry_after: int) -> tuple[dict, bool]:
        """Queue a batch and all its jobs ``[(job_id, spec, warnings), ...]`` in one transaction, or nothing.

        -> (batch, True); or the existing batch of ``request_id`` -> (batch, False). QueueFull when the
        jobs do not all fit below ``max_queued`` now: a batch is never queued in part.
        """
        with self._access():
            if request_id is not None:
                existing = self.get_batch_by_request_id(request_id)
                if existing:
                    return existing, False
            if self.queued_count() + len(jobs) > max_queued:
                raise QueueFull(retry_after)
            now = time.time()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO batches (id, request_id, created_at, rows_total, settings) "
                                 "VALUES (?, ?, ?, ?, ?)", (batch_id, request_id, now, len(jobs), json.dumps(settings)))
                self._db.executemany(
                    "INSERT INTO jobs (id, request_id, state, created_at, spec, warnings) VALUES (?, NULL, ?, ?, ?, ?)",
                    [(job_id, QUEUED, now, spec.to_json(), json.dumps(warnings)) for job_id, spec, warnings in jobs])
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            return self.get_batch(batch_id), True

    def get_batch(self, batch_id: str) -> dict | None:
        with self._access():
            row = self._db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return _batch_to_dict(row) if row else None

    def get_batch_by_request_id(self, request_id: str) -> dict | None:
        with self._access():
            row = self._db.execute("SELECT * FROM batches WHERE request_id = ?", (request_id,)).fetchone()
        return _batch_to_dict(row) if row else None

    def list_batches(self, limit: int = 100) -> list[dict]:
        with self._access():
            rows = self._db.execute("SELECT * FROM batches ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [_batch_to_dict(row) for row in rows]

    def batch_jobs(self, batch_id: str) -> list[dict]:
        """The batch's jobs that still exist (retention purges them one by one), in queue order."""
        with self._access():
            rows = self._db.execute(f"SELECT * FROM jobs WHERE {BATCH_OF_JOB} = ? ORDER BY seq", (batch_id,)).fetchall()
        return [_row_to_dict(row) for row in rows]

    def queued_up_to(self, seq: int) -> int:
        """Queued jobs that run no later than the job ``seq`` (it included): the work before it is done."""
        with self._access():
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = ? AND seq <= ?", (QUEUED, seq)).fetchone()[0]

    def cancel_queued_in_batch(self, batch_id: str) -> list[str]:
        """Cancel every queued job of the batch in one statement; returns their ids."""
        with self._access():
            ids = [row[0] for row in self._db.execute(
                f"SELECT id FROM jobs WHERE state = ? AND {BATCH_OF_JOB} = ?", (QUEUED, batch_id)).fetchall()]
            self._db.execute(
                f"UPDATE jobs SET state = ?, finished_at = ?, error_code = 'cancelled', "
                f"error_message = 'The job was cancelled before it started.' WHERE state = ? AND {BATCH_OF_JOB} = ?",
                (CANCELLED, time.time(), QUEUED, batch_id))
        return ids

    def delete_batch(self, batch_id: str) -> None:
        """Remove the batch row (its jobs are deleted one by one by the caller, like any job)."""
        with self._access():
            self._db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))

    def batches_without_jobs(self) -> list[str]:
        """Batches whose every job is gone (deleted or purged by retention): nothing is left to show."""
        with self._access():
            rows = self._db.execute(f"SELECT id FROM batches WHERE NOT EXISTS "
                                    f"(SELECT 1 FROM jobs WHERE {BATCH_OF_JOB} = batches.id)").fetchall()
        return [row[0] for row in rows]

    def claim_next(self) -> dict | None:
        """Atomically move the oldest queued job to running."""
        with self._access():
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
        with self._access():
            cursor = self._db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, error_code = 'cancelled', "
                "error_message = 'The job was cancelled before it started.' WHERE id = ? AND state = ?",
                (CANCELLED, time.time(), job_id, QUEUED),
            )
            return cursor.rowcount == 1

    def finish(self, job_id: str, state: str, *, error_code: str | None = None,
               error_message: str | None = None, files: list[str] | None = None,
               dicom: dict | None = None, push_report: dict | None = None) -> None:
        with self._access():
            self._db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, error_code = ?, error_message = ?, "
                "files = ?, dicom = ?, push_report = ? WHERE id = ?",
                (state, time.time(), error_code, error_message, json.dumps(files or []),
                 json.dumps(dicom) if dicom is not None else None,
                 json.dumps(push_report) if push_report is not None else None, job_id),
            )

    def set_push_report(self, job_id: str, push_report: dict) -> None:
        """Record the outcome of sending a finished job's result to a PACS later on."""
        with self._access():
            self._db.execute("UPDATE jobs SET push_report = ? WHERE id = ?", (json.dumps(push_report), job_id))

    def delete(self, job_id: str) -> None:
        """Remove the row first (the job disappears at once), then its files."""
        with self._access():
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def recover_after_restart(self) -> int:
        """Fail jobs left 'running' by a crash, drop half-written results and stray uploads."""
        with self._access():
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
        with self._access():
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


def _batch_to_dict(row: sqlite3.Row) -> dict:
    batch = dict(row)
    batch["settings"] = json.loads(batch["settings"])
    return batch


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


def _identity(path: Path) -> tuple | None:
    """(device, inode) of a file, None if it is gone: a deleted or replaced database changes it."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def database_reason(error: sqlite3.Error) -> str:
    """A short phrase for a SQLite error ("the disk is full"), never a traceback."""
    name = getattr(error, "sqlite_errorname", "") or ""
    if "FULL" in name:
        return DISK_FULL
    if "READONLY" in name:
        return "the job database is read-only"
    if "CANTOPEN" in name:
        return "the job database file cannot be opened"
    if "IOERR" in name:
        return "the disk refused to write the job database (read-only, immutable or failing)"
    if "CORRUPT" in name or "NOTADB" in name:
        return "the job database is damaged"
    return shown(str(error) or type(error).__name__, 120)
