"""Run engine jobs off the GUI thread and report back through a queue.

The GUI must never block: a worker thread submits, polls, downloads and parses;
every change is put on ``runner.events`` (a ``queue.Queue``) and the GUI drains
it from a ``QTimer`` on the main thread, where it alone touches Qt and MRML.
This file has no Qt: the same runner is driven by pytest against a real engine.

States: idle -> submitting -> queued -> running -> downloading -> (next job ...)
-> done | failed | cancelled.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from xreal_engine.errors import XRealError

from .parameters import REQUEST_FIELDS
from .request import RequestFiles
from .results import GenerationResult, read_result

IDLE, SUBMITTING, QUEUED, RUNNING, DOWNLOADING = "idle", "submitting", "queued", "running", "downloading"
DONE, FAILED, CANCELLED = "done", "failed", "cancelled"
FINAL = (DONE, FAILED, CANCELLED)
UNREACHABLE_GRACE_SECONDS = 10.0  # an engine restart or a slow poll is not yet "gone"
CANCEL_WAIT_SECONDS = 30.0  # a running job stops within one diffusion step


@dataclass
class JobSpec:
    """One job of a run: what to upload and where its result goes."""

    files: RequestFiles
    result_dir: Path
    label: str = ""


@dataclass
class JobEvent:
    """A change the GUI shows: state, stage/step, overall fraction and ETA, or a finished result."""

    state: str
    job_index: int = 0
    job_count: int = 1
    stage: str = ""
    step: int = 0
    total: int = 0
    fraction: float = 0.0  # of the whole run (all jobs)
    eta_seconds: Optional[float] = None
    message: str = ""
    result: Optional[GenerationResult] = None
    label: str = ""

    def status_text(self) -> str:
        """One line for the panel: which job, which stage, how far, how long still."""
        prefix = f"[{self.job_index + 1}/{self.job_count}] " if self.job_count > 1 else ""
        if self.message:
            return prefix + self.message
        text = prefix + self.state.capitalize()
        if self.stage:
            text += f": {self.stage} {self.step}/{self.total}"
        if self.eta_seconds is not None and self.state == RUNNING:
            text += f", about {format_duration(self.eta_seconds)} left"
        return text


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def job_progress(job: dict):
    """(state, stage, step, total, fraction of this job, eta seconds, error message) from a job status."""
    state = str(job.get("state") or "")
    stage = str(job.get("stage") or "")
    step = int(job.get("step") or 0)
    total = int(job.get("total") or 0)
    fraction = job.get("progress")
    if fraction is None:
        fraction = (step / total) if total else 0.0
    if state == "succeeded":
        fraction = 1.0
    eta = job.get("eta_seconds")
    error = job.get("error")
    message = str(error.get("message") or "") if isinstance(error, dict) else str(error or "")
    return state, stage, step, total, float(fraction), (float(eta) if eta is not None else None), message


class JobRunner:
    """Runs a list of jobs one after the other in a worker thread; GUI reads ``events``."""

    def __init__(self, client, poll_interval: float = 0.5, describe_engine: str = "the engine"):
        self.client = client
        self.poll_interval = poll_interval
        self.describe_engine = describe_engine
        self.events: "queue.Queue[JobEvent]" = queue.Queue()
        self.state = IDLE
        self.current_job_id: Optional[str] = None
        self.results: List[GenerationResult] = []
        self._cancel = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, jobs: List[JobSpec]) -> None:
        if self.busy:
            raise RuntimeError("a run is already in progress")
        if not jobs:
            raise ValueError("no jobs to run")
        self._cancel.clear()
        self.results = []
        self._thread = threading.Thread(target=self._run, args=(list(jobs),), name="xreal-job-runner", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Ask to stop: the running job is cancelled on the engine, the rest are not submitted."""
        self._cancel.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def drain(self) -> List[JobEvent]:
        """All events so far (the GUI's QTimer calls this on the main thread)."""
        events = []
        while True:
            try:
                events.append(self.events.get_nowait())
            except queue.Empty:
                return events

    # ------------------------------------------------------------------ worker thread

    def _emit(self, event: JobEvent) -> None:
        self.state = event.state
        self.events.put(event)

    def _run(self, jobs: List[JobSpec]) -> None:
        count = len(jobs)
        started = time.monotonic()
        try:
            for index, spec in enumerate(jobs):
                if self._cancel.is_set():
                    self._emit(JobEvent(CANCELLED, index, count, message="Cancelled."))
                    return
                result = self._run_one(spec, index, count, started)
                if result is None:
                    return  # cancelled or failed: already reported
                self.results.append(result)
                self._emit(JobEvent(DOWNLOADING, index, count, fraction=(index + 1) / count, result=result,
                                    label=spec.label, message=f"Result {index + 1} of {count} is ready."))
            self._emit(JobEvent(DONE, count - 1, count, fraction=1.0,
                                message=f"Done in {format_duration(time.monotonic() - started)}."))
        except XRealError as error:
            self._emit(JobEvent(FAILED, message=str(error)))
        except Exception as error:  # never a traceback in the panel; the GUI logs details
            self._emit(JobEvent(FAILED, message=f"Unexpected problem while running the job: {error}"))

    def _run_one(self, spec: JobSpec, index: int, count: int, started: float) -> Optional[GenerationResult]:
        from xreal_engine.client import EngineError, EngineUnreachable

        self._emit(JobEvent(SUBMITTING, index, count, fraction=index / count, label=spec.label,
                            message=f"Uploading {spec.label or 'the masks'} ..."))
        try:
            job = submit_request(self.client, spec.files)
        except EngineUnreachable as error:  # a subclass of EngineError: catch it first
            self._emit(JobEvent(FAILED, index, count, label=spec.label,
                                message=f"{self.describe_engine} is not reachable: {error_text(error)}"))
            return None
        except EngineError as error:
            self._emit(JobEvent(FAILED, index, count, message=error_text(error), label=spec.label))
            return None
        job_id = str(job.get("id") or job.get("job_id"))
        self.current_job_id = job_id
        unreachable_since = None
        while True:
            if self._cancel.is_set():
                self._emit(JobEvent(RUNNING, index, count, label=spec.label,
                                    message="Cancelling ..."))
                self._cancel_on_engine(job_id)
                self._emit(JobEvent(CANCELLED, index, count, label=spec.label, message="Cancelled."))
                return None
            try:
                job = self.client.status(job_id)
                unreachable_since = None
            except EngineUnreachable as error:
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > UNREACHABLE_GRACE_SECONDS:
                    self._emit(JobEvent(FAILED, index, count, label=spec.label,
                                        message=f"{self.describe_engine} stopped answering during the job "
                                                f"({error_text(error)}); start it again and press Generate."))
                    return None
                time.sleep(self.poll_interval)
                continue
            except EngineError as error:
                self._emit(JobEvent(FAILED, index, count, message=error_text(error), label=spec.label))
                return None
            state, stage, step, total, fraction, eta, message = job_progress(job)
            overall = (index + fraction) / count
            if state == "succeeded":
                break
            if state == "failed":
                self._emit(JobEvent(FAILED, index, count, label=spec.label,
                                    message=message or "The engine reported that the job failed."))
                return None
            if state == "cancelled":
                self._emit(JobEvent(CANCELLED, index, count, label=spec.label, message="Cancelled on the engine."))
                return None
            if eta is None and fraction > 0:
                elapsed = time.monotonic() - started
                eta = elapsed * (1.0 - overall) / max(overall, 1e-6)
            elif eta is not None and count > 1:
                eta = eta + (count - index - 1) * eta / max(1.0 - fraction, 1e-6)
            self._emit(JobEvent(RUNNING if state == "running" else QUEUED, index, count, stage=stage, step=step,
                                total=total, fraction=overall, eta_seconds=eta, label=spec.label))
            time.sleep(self.poll_interval)
        self._emit(JobEvent(DOWNLOADING, index, count, fraction=(index + 0.99) / count, label=spec.label,
                            message="Downloading the result ..."))
        try:
            self.client.download_all(job_id, spec.result_dir)
        except (EngineError, EngineUnreachable) as error:
            self._emit(JobEvent(FAILED, index, count, label=spec.label,
                                message=f"The result could not be downloaded: {error_text(error)}"))
            return None
        return read_result(spec.result_dir, job)


    def _cancel_on_engine(self, job_id: str, timeout: float = CANCEL_WAIT_SECONDS) -> None:
        """Cancel the job and wait (briefly) until the engine confirms, so the engine is free again."""
        from xreal_engine.client import EngineError, EngineUnreachable

        deadline = time.monotonic() + timeout
        try:
            self.client.cancel(job_id)
            while time.monotonic() < deadline:
                if self.client.status(job_id).get("state") in ("cancelled", "failed", "succeeded"):
                    return
                time.sleep(self.poll_interval)
        except (EngineError, EngineUnreachable):
            pass  # already finished, or the engine is gone: nothing left to stop


def error_text(error: Exception) -> str:
    """The engine's own message (one sentence) rather than the exception's repr."""
    message = getattr(error, "message", None)
    return str(message or error)


def submit_request(client, files: RequestFiles) -> dict:
    """Upload one request (anatomy, pathology masks + findings, edit image or PACS source, parameters, and the
    ControlNet controls with where they steer, only when there are any)."""
    parameters = {k: v for k, v in files.parameters.items() if k in REQUEST_FIELDS and v is not None}
    if files.controls:
        parameters.update(controls=[(name, Path(path) if path else None, scale) for name, path, scale in files.controls],
                          control_stages=files.control_stages)
    return client.submit(
        files.anatomy_path,
        [(Path(path), finding) for path, finding in files.pathologies],
        files.image_path,
        push_to=files.push_to or None,
        source=files.source or None,
        **parameters,
    )
