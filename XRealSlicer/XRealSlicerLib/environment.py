"""The local engine's private Python environment: where it goes, how it is made, and how it is removed.

The environment holds PyTorch, diffusers and friends: several GB. It belongs in the user's *local*
application data, never beside Slicer's settings file: on Windows that file lives in the roaming
profile, which is copied to and from a server at every log-on. The folder is configurable in the
panel, and "Remove engine environment" deletes it again (the Extensions Index review asks that large
downloads can be removed). Only a folder this module made (it carries ``MARKER_FILE``) or the old
default location is ever deleted.

The install runs in a worker thread: it returns an outcome constant and the GUI, on the main thread,
turns it into a translated sentence (Slicer's ``_()`` must not be called from a worker thread).
No Qt here.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional

from xreal_engine.errors import InputError

from .launcher import create_venv_command, find_base_python, install_requirements_command, requirements_installed, \
    venv_python
from .tasks import run_logged

APP_FOLDER = "XRealSlicer"
ENVIRONMENT_FOLDER = "engine-venv"
MARKER_FILE = "xrealslicer-engine-environment.txt"
MARKER_TEXT = ("This Python environment was created by the XRealSlicer extension for its local engine.\n"
               "Remove it from the XReal module (Engine > Remove engine environment) or delete this folder.\n")

# Outcomes of install_environment, translated by the GUI.
INSTALLED = "installed"
NO_BASE_PYTHON = "no base python"
VENV_FAILED = "venv failed"
PIP_FAILED = "pip failed"
NOT_IMPORTABLE = "not importable"


def local_data_dir(environ: Mapping[str, str] = os.environ, platform: str = sys.platform,
                   home: Optional[Path] = None) -> Path:
    """This user's local (never roaming) application-data folder for XRealSlicer."""
    home = Path(home) if home is not None else Path.home()
    if platform.startswith("win"):
        base = environ.get("LOCALAPPDATA")
        return (Path(base) if base else home / "AppData" / "Local") / APP_FOLDER
    if platform == "darwin":
        return home / "Library" / "Application Support" / APP_FOLDER
    base = environ.get("XDG_DATA_HOME")
    return (Path(base) if base and Path(base).is_absolute() else home / ".local" / "share") / APP_FOLDER


def default_environment_dir(environ: Mapping[str, str] = os.environ, platform: str = sys.platform,
                            home: Optional[Path] = None) -> Path:
    return local_data_dir(environ, platform, home) / ENVIRONMENT_FOLDER


def legacy_environment_dir(settings_file: Path) -> Path:
    """Where versions before 0.2 put the environment: beside Slicer's settings file (roaming on Windows)."""
    return Path(settings_file).parent / APP_FOLDER / ENVIRONMENT_FOLDER


def is_engine_environment(path: Path, legacy: Optional[Path] = None) -> bool:
    """A virtual environment this module made (marker file), or the one at the old default location."""
    path = Path(path)
    if not (path / "pyvenv.cfg").is_file():
        return False
    if (path / MARKER_FILE).is_file():
        return True
    return legacy is not None and _same(path, legacy)


def environment_in_use(configured: Path, legacy: Optional[Path] = None) -> Path:
    """The environment the local engine runs in: the configured one, or, until it is created there, an
    environment still at the old location (so an update does not download several GB again)."""
    configured = Path(configured)
    if venv_python(configured).exists() or legacy is None:
        return configured
    if venv_python(legacy).exists() and is_engine_environment(legacy, legacy):
        return Path(legacy)
    return configured


def removable_environments(configured: Path, legacy: Optional[Path] = None) -> list:
    """The environments "Remove engine environment" deletes: those of ours that exist."""
    found = []
    for path in [Path(configured)] + ([Path(legacy)] if legacy is not None else []):
        if is_engine_environment(path, legacy) and not any(_same(path, other) for other in found):
            found.append(path)
    return found


def remove_environment(path: Path, legacy: Optional[Path] = None) -> None:
    """Delete an environment this module made (blocking; call it from a worker thread)."""
    path = Path(path)
    if not is_engine_environment(path, legacy):
        raise InputError(f"{path} is not an engine environment made by XRealSlicer; it was not removed.")
    shutil.rmtree(path)
    parent = path.parent
    if parent.name == APP_FOLDER and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


def install_environment(report: Callable[[str], None], spawn: Callable, python: str, venv_dir: Path,
                        requirements: Path, environment: Mapping[str, str],
                        find_python: Optional[Callable] = None, check: Optional[Callable] = None) -> str:
    """Worker thread, first use: create the private environment if needed, then pip install the requirements.

    The environment is made from a system Python 3.10+, not from PythonSlicer (a launcher: a virtual
    environment made from it cannot find its standard library outside Slicer). Returns an outcome constant.
    """
    find_python, check = find_python or find_base_python, check or requirements_installed
    venv_dir = Path(venv_dir)
    if not Path(python).exists() and _same(Path(python), venv_python(venv_dir)):
        base = find_python(dict(environment))
        if base is None:
            return NO_BASE_PYTHON
        venv_dir.parent.mkdir(parents=True, exist_ok=True)
        if run_logged(create_venv_command(base, venv_dir), report, spawn) != 0:
            return VENV_FAILED
        (venv_dir / MARKER_FILE).write_text(MARKER_TEXT, encoding="utf-8")
        python = str(venv_python(venv_dir))
    if run_logged(install_requirements_command(python, requirements), report, spawn) != 0:
        return PIP_FAILED
    if not check(python, dict(environment)):
        return NOT_IMPORTABLE
    return INSTALLED


def _same(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return Path(a) == Path(b)

