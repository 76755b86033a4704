"""Start and stop the bundled engine as a background process (the "Local" engine mode).

Why a separate process with its own Python: torch, diffusers and a CUDA runtime
never enter Slicer's interpreter (no package conflicts, and an out-of-memory in
the engine cannot take Slicer down). The engine binds an ephemeral loopback port
(``--port 0``) and prints it on its first stdout line; we read that line, wait
for ``/health``, and stop it through the API (``shutdown``), falling back to
terminate/kill so no orphan process is left behind. The engine also runs with
``--exit-with-stdin`` on a pipe we hold open: if Slicer crashes, the pipe closes
and the engine shuts itself down.

``spawn`` is injectable: inside Slicer the GUI passes ``make_spawn(startup environment)``
so the engine does not inherit Slicer's PYTHONPATH and library paths.
"""

from __future__ import annotations

import collections
import os
import re
import secrets
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Deque, Dict, List, Optional

from xreal_engine.errors import InputError, ModelError

from .enginepath import find_engine_root

PORT_PATTERNS = (
    re.compile(r"^\s*(\d{2,5})\s*$"),  # just the number
    re.compile(r"https?://[^\s/:]+:(\d{2,5})"),  # a URL
    re.compile(r"\bport\b\D{0,3}(\d{2,5})", re.IGNORECASE),  # "port 8123", "port=8123"
)
LOG_LINES_KEPT = 400
# Generous waits: a loaded machine (a CPU engine busy with a diffusion step, a CI runner) is slow, not broken.
# Every wait ends as soon as the process exits or answers; only a stuck engine uses them up.
START_TIMEOUT_SECONDS = 180.0  # model loading included
STOP_TIMEOUT_SECONDS = 60.0  # graceful shutdown (it may finish a diffusion step first), then terminate/kill
FORCED_STOP_SECONDS = 10.0  # after terminate, and again after kill
POLL_SECONDS = 0.25


def parse_port_line(line: str) -> Optional[int]:
    """The port announced by ``xreal-engine serve --port 0`` on a stdout line, or None."""
    line = line.strip()
    if line.startswith("{"):
        import json

        try:
            value = json.loads(line).get("port")
            return int(value) if value else None
        except (ValueError, AttributeError):
            return None
    for pattern in PORT_PATTERNS:
        match = pattern.search(line)
        if match:
            port = int(match.group(1))
            if 0 < port < 65536:
                return port
    return None


def engine_command(python: str, model: str, data_dir: Path, host: str = "127.0.0.1",
                   device: str = "auto", pacs_config: Optional[Path] = None) -> List[str]:
    """The command line that starts the bundled engine with ``python`` (the engine's own environment).

    The access token is not on it: it goes in ``XREAL_ENGINE_TOKEN`` (see ``EngineLauncher.environment``),
    because a command line is visible to every local user in ``ps`` and a token starting with ``-``
    would be read by argparse as an option.
    """
    command = [str(python), "-u", "-m", "xreal_engine.cli", "serve", "--host", host, "--port", "0",
               "--model", str(model), "--data-dir", str(data_dir), "--exit-with-stdin"]
    if device and device != "auto":
        command += ["--device", device]
    if pacs_config:
        command += ["--pacs-config", str(pacs_config)]
    return command


def make_spawn(base_environment: Optional[Dict[str, str]] = None) -> Callable:
    """A spawn function: ``args`` with stdout+stderr merged into one text pipe, in ``base_environment``.

    stdin is a pipe that stays open for the life of the process (see ``--exit-with-stdin``).

    Inside Slicer the base is ``slicer.util.startupEnvironment()`` (read on the main thread),
    i.e. the environment Slicer was started from, without Slicer's own PYTHONPATH and
    library paths -- what ``launchConsoleProcess(useStartupEnvironment=True)`` uses, but safe
    to call from a worker thread and the same in every Slicer version.
    """

    def spawn(args: List[str], env_update: Dict[str, str], cwd: Optional[str]):
        env = dict(os.environ if base_environment is None else base_environment)
        env.update(env_update)
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                                universal_newlines=True, bufsize=1, env=env, cwd=cwd, **kwargs)

    return spawn


default_spawn = make_spawn()


class EngineLauncher:
    """One local engine process: ``start()`` -> base URL, ``stop()`` -> gone."""

    def __init__(self, python: str, model: str, data_dir: Path, token: Optional[str] = None, device: str = "auto",
                 spawn: Callable = default_spawn, engine_root: Optional[Path] = None,
                 client_factory: Optional[Callable] = None, pacs_config: Optional[Path] = None,
                 start_timeout: float = START_TIMEOUT_SECONDS, stop_timeout: float = STOP_TIMEOUT_SECONDS):
        self.python = str(python)
        self.model = model
        self.data_dir = Path(data_dir)
        self.token = token or secrets.token_urlsafe(24)  # loopback still gets a token: other local users
        self.device = device
        self.pacs_config = pacs_config  # None: the engine's default (~/.config/xreal-engine/pacs.json)
        self.spawn = spawn
        self.engine_root = Path(engine_root) if engine_root else find_engine_root()
        self.client_factory = client_factory
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.process = None
        self.port: Optional[int] = None
        self.log_lines: Deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self._port_found = threading.Event()
        self._reader: Optional[threading.Thread] = None

    @property
    def base_url(self) -> Optional[str]:
        return f"http://127.0.0.1:{self.port}" if self.port else None

    def command(self) -> List[str]:
        return engine_command(self.python, self.model, self.data_dir, device=self.device,
                              pacs_config=self.pacs_config)

    def environment(self) -> Dict[str, str]:
        """PYTHONPATH points at the bundled engine; nothing of Slicer's own environment is needed."""
        return {"PYTHONPATH": str(self.engine_root), "PYTHONUNBUFFERED": "1", "PYTHONNOUSERSITE": "1",
                "XREAL_ENGINE_TOKEN": self.token}

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: Optional[float] = None, progress: Optional[Callable[[str], None]] = None) -> str:
        """Start the engine and wait until it answers ``/health``; ModelError with its last output otherwise.

        ``timeout`` (default ``start_timeout``) bounds the whole start; it ends early when the engine
        answers or exits.
        """
        timeout = self.start_timeout if timeout is None else timeout
        if self.is_running():
            return self.base_url
        if not Path(self.python).exists():
            raise InputError(f"The engine Python '{self.python}' does not exist; set it in the Engine section.")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = None
        self._port_found.clear()
        self.log_lines.clear()
        self.process = self.spawn(self.command(), self.environment(), str(self.data_dir))
        self._reader = threading.Thread(target=self._read_output, args=(progress,), name="xreal-engine-output",
                                        daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        try:
            while not self._port_found.wait(POLL_SECONDS):
                if self.process.poll() is not None:
                    self._reader.join(2.0)
                    raise ModelError(f"The local engine stopped while starting: {self.last_output()}")
                if time.monotonic() > deadline:
                    raise ModelError(f"The local engine did not announce its port within {timeout:.0f} s: "
                                     f"{self.last_output()}")
            self.wait_healthy(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop(timeout=5.0)
            raise
        return self.base_url

    def wait_healthy(self, timeout: float) -> dict:
        """Poll ``/health`` until it answers or ``timeout`` passes."""
        from xreal_engine.client import EngineError, EngineUnreachable

        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                return client.health()
            except (EngineUnreachable, EngineError) as error:
                if isinstance(error, EngineError) and error.code == "unhealthy":  # e.g. its data folder is unwritable
                    raise ModelError(f"The local engine cannot store its jobs: {error.message}") from None
                if self.process.poll() is not None:
                    raise ModelError(f"The local engine stopped while starting: {self.last_output()}") from None
                if time.monotonic() > deadline:
                    raise ModelError(f"The local engine did not become ready within {timeout:.0f} s: "
                                     f"{self.last_output()}") from None
                _wait(self.process, POLL_SECONDS)  # the next try, or at once the news that it exited

    def client(self, timeout: float = 30.0):
        if self.client_factory is not None:
            return self.client_factory(self.base_url, self.token)
        from xreal_engine.client import EngineClient

        return EngineClient(self.base_url, self.token, timeout=timeout)

    def _read_output(self, progress: Optional[Callable[[str], None]]) -> None:
        """Drain the engine's output (so its pipe never fills); the first port line gives the URL."""
        stream = self.process.stdout
        if stream is None:
            return
        for line in iter(stream.readline, ""):
            line = line.rstrip("\r\n")
            self.log_lines.append(line)
            if not self._port_found.is_set():
                port = parse_port_line(line)
                if port:
                    self.port = port
                    self._port_found.set()
            if progress is not None:
                try:
                    progress(line)
                except Exception:  # a GUI callback must never kill the reader
                    pass

    def last_output(self, lines: int = 5) -> str:
        tail = [line for line in list(self.log_lines)[-lines:] if line.strip()]
        return " | ".join(tail) if tail else "no output"

    def stop(self, timeout: Optional[float] = None) -> None:
        """Ask the engine to shut down through the API; terminate, then kill, if it does not.

        The graceful wait (``timeout``, default ``stop_timeout``) ends as soon as the process exits.
        """
        timeout = self.stop_timeout if timeout is None else timeout
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            if self.port:
                try:
                    self.client(timeout=3.0).shutdown()
                except Exception:  # unreachable or already going: fall through
                    pass
            if process.stdin is not None:  # --exit-with-stdin: the same request, even if HTTP is stuck
                try:
                    process.stdin.close()
                except OSError:
                    pass
            _wait(process, timeout)
        if process.poll() is None:
            process.terminate()
            _wait(process, FORCED_STOP_SECONDS)
        if process.poll() is None:
            process.kill()
            _wait(process, FORCED_STOP_SECONDS)
        if self._reader is not None:
            self._reader.join(2.0)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self.process = None
        self.port = None


def _wait(process, timeout: float) -> None:
    """Wait until ``process`` exits, at most ``timeout`` seconds (returns at once when it does)."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


# ----------------------------------------------------------------------------- first-use install


def venv_python(venv_dir: Path) -> Path:
    """The interpreter of a virtual environment on this platform."""
    venv_dir = Path(venv_dir)
    return venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def create_venv_command(base_python: str, venv_dir: Path) -> List[str]:
    """Create the engine's private environment (keeps torch and friends out of Slicer's Python)."""
    return [str(base_python), "-m", "venv", str(venv_dir)]


def install_requirements_command(python: str, requirements_file: Path) -> List[str]:
    return [str(python), "-m", "pip", "install", "--upgrade", "--progress-bar", "off", "-r", str(requirements_file)]


CHECK_IMPORTS = ("torch", "diffusers", "transformers", "highdicom", "fastapi", "fastapi_offline", "uvicorn", "SimpleITK",
                 "PIL")  # one module a release added (fastapi_offline) makes an older environment install again


def check_requirements_command(python: str) -> List[str]:
    """Exit 0 only if the engine's heavy requirements import in ``python``."""
    code = "import importlib, sys; [importlib.import_module(m) for m in %r]" % (CHECK_IMPORTS,)
    return [str(python), "-c", code]


def requirements_installed(python: str, environment: Optional[Dict[str, str]] = None, timeout: float = 120.0) -> bool:
    """True if ``python`` can run the engine (a blocking check: call it from a worker thread).

    ``environment`` must be the one the engine will run in (inside Slicer: the startup
    environment); Slicer's own PYTHONHOME/PYTHONPATH would break another interpreter.
    """
    if not Path(python).exists():
        return False
    try:
        result = subprocess.run(check_requirements_command(python), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=timeout,
                                env=None if environment is None else dict(environment, PYTHONNOUSERSITE="1"))
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


MIN_ENGINE_PYTHON = (3, 10)


def find_base_python(environment: Dict[str, str], timeout: float = 30.0) -> Optional[str]:
    """A Python >= 3.10 on the PATH of ``environment`` to build the engine's private environment from, or None.

    Not Slicer's PythonSlicer: that is a launcher, and a virtual environment made from it
    cannot find its standard library outside Slicer's launcher environment.
    """
    import shutil

    names = ("python3", "python", "py") if os.name == "nt" else ("python3", "python")
    check = "import sys; sys.exit(0 if sys.version_info[:2] >= %r else 1)" % (MIN_ENGINE_PYTHON,)
    for name in names:
        path = shutil.which(name, path=environment.get("PATH", ""))
        if not path:
            continue
        command = [path] + (["-3"] if name == "py" else []) + ["-c", check]
        try:
            if subprocess.run(command, env=dict(environment), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL, timeout=timeout).returncode == 0:
                return path
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None
