"""The service's use of PACS nodes: loading them at start-up, checking a named node, fetching a source."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..errors import XRealError
from .errors import ApiError, scrub
from .settings import ServiceSettings
from .spec import PacsSource

log = logging.getLogger("xreal_engine.server")


def load_pacs(settings: ServiceSettings):
    """(the PACS functions the app uses, as a namespace; its configuration).

    Loaded once at start-up, so a broken --pacs-config stops ``serve`` with its message.
    """
    from types import SimpleNamespace

    from ..pacs.config import TransientPacsError, list_nodes, load_config
    from ..pacs.transfer import fetch_source, push_result

    pacs = SimpleNamespace(push_result=push_result, fetch_source=fetch_source, list_nodes=list_nodes,
                           TransientPacsError=TransientPacsError)
    return pacs, load_config(settings.pacs_config)


def require_pacs(pacs, pacs_config, name: str, purpose: str, parameter: str) -> None:
    """Refuse (422) a job naming a PACS node this engine cannot use for ``purpose``."""
    if pacs is None:
        raise ApiError(422, "pacs_unavailable",
                       f"This engine has no PACS support installed; submit without '{parameter}'.")
    try:
        pacs_config.node(name, purpose)
    except XRealError as error:
        raise ApiError(422, "unknown_pacs", str(error)) from None


def fetch_source(pacs, pacs_config, name: str, study: str | None, series: str | None,
                 instance: str | None, folder: Path) -> tuple[str, PacsSource]:
    """Edit mode from a PACS: fetch the image into ``folder``; return (server file name, source record)."""
    if not study or not series:
        raise ApiError(400, "incomplete_source", "A PACS 'source' needs 'study' and 'series' UIDs.")
    require_pacs(pacs, pacs_config, name, "source", "source")
    fetch_dir = folder / "source"
    fetch_dir.mkdir()
    try:
        path = pacs.fetch_source(name, study, series, instance, dest_dir=fetch_dir, config=pacs_config)
    except XRealError as error:  # a transient PACS error is an outage (502); others are the request's fault
        status = 502 if isinstance(error, getattr(pacs, "TransientPacsError", ())) else 422
        raise ApiError(status, "source_unavailable", scrub(str(error), folder)) from None
    except Exception:  # noqa: BLE001 - a PACS outage is the user's to act on, not a crash
        log.warning("fetching an edit-mode source from a PACS failed", exc_info=True)
        raise ApiError(502, "source_unavailable",
                       f"The image could not be fetched from the PACS source '{name}'; check that it is reachable.") from None
    target = folder / "image.dcm"
    shutil.move(str(path), target)
    shutil.rmtree(fetch_dir, ignore_errors=True)
    return target.name, PacsSource(source=name, study=study, series=series, instance=instance)
