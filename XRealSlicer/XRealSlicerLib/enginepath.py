"""Where the bundled engine lives, so the module can use its stdlib parts and launch it.

Two layouts are supported, and both put the ``xreal_engine`` package in the
directory that *contains* the module's ``XRealSlicer.py``'s parent or beside it:

- installed extension: CMake copies ``xreal_engine/`` into Slicer's
  ``qt-scripted-modules`` directory, beside ``XRealSlicer.py``;
- source checkout: ``XRealSlicer/XRealSlicer.py`` and ``xreal_engine/`` are
  siblings under the repository root.

Only ``xreal_engine.client``, ``xreal_engine.errors``, ``xreal_engine.model.sampling``,
``xreal_engine.control_spec`` and ``vocabulary.json`` are used inside Slicer; everything heavy runs in the separate
engine process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

LIB_DIR = Path(__file__).resolve().parent
MODULE_DIR = LIB_DIR.parent  # the directory holding XRealSlicer.py


def find_engine_root(module_dir: Optional[Path] = None) -> Path:
    """The directory that contains the ``xreal_engine`` package (put it on PYTHONPATH to run it)."""
    module_dir = Path(module_dir) if module_dir else MODULE_DIR
    override = os.environ.get("XREALSLICER_ENGINE_ROOT")
    candidates = ([Path(override)] if override else []) + [module_dir, module_dir.parent]
    for candidate in candidates:
        if (candidate / "xreal_engine" / "__init__.py").is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"The bundled XReal engine (xreal_engine/) was not found beside {module_dir}; reinstall the extension."
    )


def ensure_engine_importable() -> Path:
    """Make ``import xreal_engine.client`` work (the package import itself needs no torch)."""
    root = find_engine_root()
    if str(root) not in sys.path and not any(Path(p).resolve() == root for p in sys.path if p):
        sys.path.append(str(root))
    return root


def vocabulary_path() -> Path:
    """The one vocabulary file shared with the engine (segment names, colours, codes)."""
    return find_engine_root() / "xreal_engine" / "vocabulary.json"


def templates_dir(module_dir: Optional[Path] = None) -> Optional[Path]:
    """Anatomy templates: the module's installed Resources, else the checkout's top-level Resources."""
    module_dir = Path(module_dir) if module_dir else MODULE_DIR
    for candidate in (module_dir / "Resources" / "Templates", module_dir.parent / "Resources" / "Templates"):
        if candidate.is_dir():
            return candidate
    return None


def requirements_path(module_dir: Optional[Path] = None) -> Path:
    """The engine's requirements for the local mode (installed into the engine's own Python)."""
    module_dir = Path(module_dir) if module_dir else MODULE_DIR
    return module_dir / "Resources" / "requirements.txt"
