"""Retrying PACS operations.

Transient failures (connection refused or reset, timeouts, HTTP 408/429/5xx, DIMSE
association failures, "out of resources") raise TransientPacsError and are retried
with exponential backoff; permanent ones (unknown node, HTTP 401/403/404,
association rejected permanently) raise PacsError and are not.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from .config import PacsError, TransientPacsError

LOGGER = logging.getLogger(__name__)


def with_retries(operation: Callable, description: str, retries: int = 3, backoff_s: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep):
    """Run ``operation()``; retry TransientPacsError up to ``retries`` more times, waiting
    ``backoff_s``, 2x, 4x ... in between. Returns ``(result, attempts)``.

    The final error names the operation, the last cause and the number of attempts.
    """
    attempts = 0
    while True:
        attempts += 1
        try:
            return operation(), attempts
        except TransientPacsError as error:
            if attempts > retries:
                tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
                raise TransientPacsError(f"{description} failed after {tries}: {error}",
                                         attempts=attempts, instance_level=error.instance_level) from None
            delay = backoff_s * 2 ** (attempts - 1)
            LOGGER.info("%s: attempt %d failed (%s); retrying in %.1f s", description, attempts, error, delay)
            sleep(delay)
        except PacsError as error:
            error.attempts = attempts
            raise
