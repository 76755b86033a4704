"""Writing result directories all at once or not at all.

Every command that produces a directory (a generation result, a converted model, a
prepared data set) writes into a hidden temporary sibling and renames it into place,
so an error or a kill never leaves a half-written directory where the user looks.
A place that cannot be written (read-only, full, below a regular file) is refused
before any work with one sentence (:class:`~.errors.StorageError`), never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import InputError, StorageError, os_reason

# A name that becomes a file or folder name as it is (a batch row, a training image id): it starts with a
# letter or digit and has no separator, so it can never leave the folder it is put in.
PLAIN_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_new_directory(out_dir: Path) -> None:
    """Refuse an output that exists and is not an empty directory, or that cannot be created.

    Nothing of the user's is overwritten, and a place that cannot be written is refused
    now, before the work, by creating and removing a probe folder where it would go.
    """
    out_dir = Path(out_dir)
    if str(out_dir) in ("", "."):
        raise InputError("Give the output directory a name (--out DIR); the current folder is not used.")
    if out_dir.exists() and not out_dir.is_dir():
        kind = "a file" if out_dir.is_file() else "not a folder (a device or another special file)"
        raise InputError(f"The output directory {out_dir} is {kind}; choose a new directory.")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"The output directory {out_dir} already exists and is not empty; choose a new one.")
    existing = out_dir if out_dir.exists() else out_dir.parent
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent  # the nearest part of the path that exists (a file blocks the rest)
    if not existing.is_dir():
        raise StorageError(f"The output directory {out_dir} cannot be created: {existing} is a file, not a folder.",
                           os_reason(NotADirectoryError(20, "")))
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".xreal-probe-", dir=existing))
    except OSError as error:
        raise _storage_error(out_dir, error) from None


@contextlib.contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir``; on success it becomes ``out_dir``, on any error it is removed.

    An OSError while staging (disk full, read-only, ...) becomes a StorageError naming ``out_dir``.
    """
    out_dir = Path(out_dir)
    check_new_directory(out_dir)
    created = [parent for parent in out_dir.parents if not parent.exists()]  # removed again on failure
    staging = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = _new_sibling(out_dir)
        yield staging
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(staging, out_dir)
    except OSError as error:
        raise _storage_error(out_dir, error) from None
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if not out_dir.exists():
            for parent in created:  # innermost first; only folders this call made, and only if empty
                with contextlib.suppress(OSError):
                    parent.rmdir()


def _new_sibling(out_dir: Path) -> Path:
    """A new hidden folder beside ``out_dir`` with the mode a plain mkdir gives (the user's umask), which
    it keeps when renamed; ``tempfile.mkdtemp`` would make every result 0700."""
    while True:
        staging = out_dir.parent / f".{out_dir.name}.partial-{secrets.token_hex(4)}"
        try:
            staging.mkdir()
            return staging
        except FileExistsError:
            continue


def give_umask_modes(folder: Path) -> None:
    """Every file below ``folder`` gets the mode a plain ``open`` would give it (0666 less the umask).

    safetensors writes its files 0600, which would keep a trained model from the colleagues it is
    meant for; everything else a command writes already follows the umask.
    """
    mode = 0o666 & ~_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def _umask() -> int:
    try:  # Linux says it without changing it (os.umask would, for a moment, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _storage_error(out_dir: Path, error: OSError) -> StorageError:
    reason = os_reason(error)
    return StorageError(f"The output directory {out_dir} cannot be written: {reason}.", reason)
