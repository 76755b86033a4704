"""Remote engine addresses, their short history, the status line, and the PACS lists from ``/info``.

Kept out of the GUI so the rules are tested: a URL must be http(s) with a host
that can be connected to (``0.0.0.0`` is a bind address, not a destination), a
non-loopback plain-http URL gets a warning because the token would travel in clear.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from xreal_engine.errors import InputError

HISTORY_LENGTH = 10
DEFAULT_REMOTE_URL = "http://127.0.0.1:8000"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def normalize_url(text: str) -> str:
    """Check and tidy an engine URL typed by the user; InputError with the reason otherwise."""
    url = (text or "").strip().rstrip("/")
    if not url:
        raise InputError("The engine URL is empty; type e.g. http://gpu-server:8000.")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InputError(f"The engine URL '{text}' must start with http:// or https://.")
    if not parts.hostname:
        raise InputError(f"The engine URL '{text}' has no host name.")
    if parts.hostname in ("0.0.0.0", "::"):
        raise InputError(f"'{parts.hostname}' is the address a server listens on, not one to connect to; "
                         "use the server's name or IP address.")
    try:
        parts.port
    except ValueError:
        raise InputError(f"The engine URL '{text}' has an invalid port.") from None
    for suffix in ("/api/v1", "/api"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url


def insecure_url_warning(url: str) -> Optional[str]:
    parts = urlsplit(url)
    if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
        return ("The connection to this engine is not encrypted (http); the token and the masks travel in clear. "
                "Use https outside a trusted network.")
    return None


def updated_history(history: Sequence[str], url: str, length: int = HISTORY_LENGTH) -> List[str]:
    """Most recent first, no duplicates, at most ``length`` entries."""
    items = [url] + [item for item in history if item and item != url]
    return items[:length]


def status_line(info: dict, url: str) -> str:
    """'Connected to URL: model M on DEVICE (engine V)' from ``/info``."""
    model = info.get("model") or {}
    model_id = model.get("id") or model.get("model_id") or "unknown model"
    device = info.get("device") or "unknown device"
    version = info.get("engine_version")
    state = info.get("model_state")
    text = f"Connected to {url}: {model_id} on {device}"
    if version:
        text += f" (engine {version})"
    if state and state not in ("ready", "loaded"):
        text += f", model {state}"
    return text


def model_findings(info: dict) -> List[str]:
    """Finding names the model knows (``/info`` lists them as objects with codes)."""
    return [str(f["name"]) if isinstance(f, dict) else str(f) for f in info.get("findings") or []]


def model_anatomy_labels(info: dict) -> Dict[int, str]:
    labels = info.get("anatomy_labels") or {}
    if isinstance(labels, list):
        return {int(entry.get("value", entry.get("label"))): str(entry.get("name", "")) for entry in labels}
    return {int(k): str(v) for k, v in labels.items()}


def model_geometry(info: dict) -> Tuple[int, float]:
    """(image size in pixels, field of view in mm) for a blank canvas at the model's geometry."""
    model = info.get("model") or {}
    size = int(model.get("image_size") or 256)
    fov = float(model.get("field_of_view_mm") or 400.0)
    return size, fov


def pacs_nodes(info: dict) -> Tuple[List[str], List[str]]:
    """(destinations, sources) configured in the engine; both empty hides the PACS feature.

    Accepts ``{"destinations": [...], "sources": [...]}`` (names or node objects) and the
    engine's node list (``xreal_engine.pacs.config.list_nodes``: ``name``, ``can_push``, ``can_fetch``),
    either directly or under ``"nodes"``.
    """
    pacs = info.get("pacs") or {}
    if isinstance(pacs, dict) and "nodes" in pacs and not ("destinations" in pacs or "sources" in pacs):
        pacs = pacs["nodes"]
    if isinstance(pacs, list):
        destinations = [n for n in pacs if not isinstance(n, dict) or n.get("can_push", True)]
        sources = [n for n in pacs if isinstance(n, dict) and n.get("can_fetch")]
    else:
        destinations, sources = pacs.get("destinations") or [], pacs.get("sources") or []
        if isinstance(destinations, dict):
            destinations = sorted(destinations)
        if isinstance(sources, dict):
            sources = sorted(sources)
    return [_node_name(n) for n in destinations], [_node_name(n) for n in sources]


def _node_name(node) -> str:
    return str(node.get("name")) if isinstance(node, dict) else str(node)


def local_model_info(model: str, engine_root: Path) -> Optional[dict]:
    """What the panel needs of a local model before its engine runs, from its ``xreal_model.json``, in the
    shape of ``/info``: the model's findings, labels, geometry, defaults and ControlNets (so the finding list, a
    blank canvas, the sampling defaults and the control widgets are right before the first Generate starts the
    engine).

    ``model`` is 'demo' (the bundled demo model) or a model directory; None when it has no readable file.
    """
    name = (model or "demo").strip()
    directory = Path(engine_root) / "xreal_engine" / "demo_model" if name == "demo" else Path(name)
    try:
        data = json.loads((directory / "xreal_model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return {
        "model": {"id": data.get("model_id"), "image_size": data.get("image_size"),
                  "field_of_view_mm": data.get("field_of_view_mm")},
        "anatomy_labels": dict(data.get("anatomy_labels") or {}),
        "findings": list(data.get("findings") or []),
        "defaults": dict(data.get("defaults") or {}),
        "controlnets": dict(data.get("controlnets") or {}),
    }
