"""Exceptions whose message is meant for the user.

The CLI prints ``str(error)`` as one line and exits non-zero; the service turns
them into 4xx JSON errors. Anything else is a bug and is reported as such.
"""


class XRealError(Exception):
    """Base class: a problem the user can act on, described in one sentence."""


class InputError(XRealError):
    """Bad input: a file, a mask, a parameter or a finding the model cannot use."""


class ModelError(XRealError):
    """A model directory or checkpoint that cannot be loaded or converted."""


class Cancelled(XRealError):
    """The caller cancelled a running generation (raised from the progress callback)."""


def shown(text, limit: int = 60) -> str:
    """User text as it may be echoed in a message: control characters escaped, long text shortened."""
    text = str(text)
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."
