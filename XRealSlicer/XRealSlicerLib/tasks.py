"""Blocking work (engine start, connection checks, installs) off the GUI thread.

``BackgroundCall(fn, *args)`` runs ``fn(call, *args)`` in a daemon thread (``call`` is the
BackgroundCall itself, so ``fn`` can ``call.report(line)``); the GUI's ``QTimer`` calls
``poll()`` on the main thread, which returns None while running and the finished
call (``.ok``, ``.value`` or ``.error``) exactly once. Lines a task wants shown
(e.g. pip's output) go through ``report(line)`` into ``lines``, a queue drained
the same way. No Qt here.
"""

from __future__ import annotations

import queue
import subprocess
import threading
from typing import Callable, List, Optional


class BackgroundCall:
    """One function call in a worker thread, with its outcome handed back to the main thread."""

    def __init__(self, function: Callable, *args, name: str = "xreal-task", **kwargs):
        """Start ``function(self, *args, **kwargs)`` in a thread (the attributes exist before it runs)."""
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.ok: Optional[bool] = None
        self.value = None
        self.error: Optional[BaseException] = None
        self._delivered = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(function, args, kwargs), name=name, daemon=True)
        self._thread.start()

    def report(self, line: str) -> None:
        self.lines.put(line)

    def _run(self, function, args, kwargs) -> None:
        try:
            self.value = function(self, *args, **kwargs)
            self.ok = True
        except BaseException as error:  # handed to the GUI, which shows it
            self.error = error
            self.ok = False
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def new_lines(self) -> List[str]:
        lines = []
        while True:
            try:
                lines.append(self.lines.get_nowait())
            except queue.Empty:
                return lines

    def poll(self) -> Optional["BackgroundCall"]:
        """Self once, when finished; None before (and after it was delivered)."""
        if self._done.is_set() and not self._delivered:
            self._delivered = True
            return self
        return None

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._done.wait(timeout)


def run_logged(command: List[str], report: Callable[[str], None], spawn: Optional[Callable] = None,
               env_update: Optional[dict] = None) -> int:
    """Run ``command`` to completion, feeding every output line to ``report``; returns the exit code.

    ``spawn`` is the GUI's ``launchConsoleProcess`` wrapper (clean environment); this
    function reads the pipe itself, so it works the same in every Slicer version.
    """
    if spawn is None:
        from .launcher import default_spawn

        spawn = default_spawn
    process = spawn(command, dict(env_update or {}), None)
    for line in iter(process.stdout.readline, ""):
        report(line.rstrip("\r\n"))
    process.stdout.close()
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
