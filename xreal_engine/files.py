"""Writing result directories all at once or not at all.

Every command that produces a directory (a generation result, a converted model, a
prepared data set) writes into a hidden temporary sibling and renames it into place,
so an error or a kill never leaves a half-written directory where the user looks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import InputError


def check_new_directory(out_dir: Path) -> None:
    """Refuse an output that exists and is not an empty directory (nothing of the user's is overwritten)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"The output directory {out_dir} already exists and is not empty; choose a new one.")


@contextlib.contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir``; on success it becomes ``out_dir``, on any error it is removed."""
    out_dir = Path(out_dir)
    check_new_directory(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
