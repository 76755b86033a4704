"""Exceptions whose message is meant for the user.

The CLI prints ``str(error)`` as one line and exits non-zero; the service turns
them into 4xx JSON errors. Anything else is a bug and is reported as such.
"""

import errno


class XRealError(Exception):
    """Base class: a problem the user can act on, described in one sentence."""


class InputError(XRealError):
    """Bad input: a file, a mask, a parameter or a finding the model cannot use."""


class ModelError(XRealError):
    """A model directory or checkpoint that cannot be loaded or converted."""


class Cancelled(XRealError):
    """The caller cancelled a running generation (raised from the progress callback)."""


class StorageError(XRealError):
    """Files or a database that cannot be written: disk full, read-only, no permission, gone.

    ``reason`` is the short phrase of :func:`os_reason` (e.g. "the disk is full"), for
    callers that word their own sentence (the service never shows its server paths).
    """

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message

    @property
    def disk_full(self) -> bool:
        return self.reason in (DISK_FULL, _OS_REASONS[errno.EDQUOT])


DISK_FULL = "the disk is full"


# What an OSError means for someone who only wanted a file written, by errno.
_OS_REASONS = {
    errno.ENOSPC: DISK_FULL,
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted (permissions, or a file marked immutable)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENOENT: "a folder on the path does not exist",
    errno.EISDIR: "it is a folder, not a file",
    errno.EEXIST: "it already exists",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EIO: "the disk reported an input/output error",
}


def os_reason(error: OSError) -> str:
    """A short phrase for an OSError ("the disk is full"), never a traceback.

    Libraries that re-raise an OSError with their own message (pydicom names the tag it was
    writing) drop its errno: the first errno along the chain of causes decides.
    """
    cause = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _OS_REASONS:
            return _OS_REASONS[cause.errno]
        cause = cause.__cause__ or cause.__context__
    return shown(getattr(error, "strerror", None) or type(error).__name__, 120)


def os_sentence(error: OSError, action: str = "The file could not be written") -> str:
    """One sentence for an OSError: ``action``, the file it concerns (if known) and the reason."""
    where = f" ({shown(error.filename, 200)})" if getattr(error, "filename", None) else ""
    return f"{action}{where}: {os_reason(error)}."


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of a library's error, shortened: the part of a multi-line message a sentence can quote."""
    lines = str(error).strip().splitlines()
    return shown(lines[0] if lines else type(error).__name__, limit)


def shown(text, limit: int = 60) -> str:
    """User text as it may be echoed in a message: control characters escaped, long text shortened."""
    text = str(text)
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."
