"""PACS configuration: which nodes there are, what each may be used for, and how to reach it.

Configuration (``--pacs-config FILE``, else ``$XREAL_ENGINE_PACS_CONFIG``, else
``~/.config/xreal-engine/pacs.json``; JSON or YAML)::

    {"destinations": {"orthanc": {"type": "dicomweb", "url": "http://127.0.0.1:8042/dicom-web",
                                  "headers": {"Authorization": "Bearer ${PACS_TOKEN}"}}},
     "sources":      {"archive": {"type": "dimse", "host": "pacs.local", "port": 104,
                                  "called_aet": "ARCHIVE", "calling_aet": "XREAL"}},
     "nodes":        {"both": {...}}}

``destinations`` can only be pushed to, ``sources`` only fetched from, ``nodes``
both. Optional per node: ``timeout_s`` (30), ``verify_tls`` (true, or a CA bundle
path; DICOMweb only). ``${VAR}`` in header values is read from the environment so
that secrets need not sit in the file. A DIMSE source must know our calling AE
title: it is queried with C-FIND and retrieved from with C-GET (the image comes
back on the same association), or, with ``"retrieve": "c-move"``, with C-MOVE
to our calling AE title, for which the engine listens on ``move_port`` (bound to
``move_bind_address``, default 0.0.0.0) only while it fetches.

Also the package's errors, PacsError and TransientPacsError.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import XRealError

CONFIG_ENV = "XREAL_ENGINE_PACS_CONFIG"
DEFAULT_CONFIG_PATH = Path("~/.config/xreal-engine/pacs.json")
NODE_TYPES = ("dicomweb", "dimse")
SECTION_ROLES = {"destinations": (True, False), "sources": (False, True), "nodes": (True, True)}
NODE_KEYS = {
    "dicomweb": {"type", "url", "headers", "timeout_s", "verify_tls"},
    "dimse": {"type", "host", "port", "called_aet", "calling_aet", "timeout_s", "retrieve", "move_port",
              "move_bind_address"},
}
RETRIEVE_METHODS = ("c-get", "c-move")
DEFAULT_CALLING_AET = "XREAL"
DEFAULT_TIMEOUT_S = 30.0


class PacsError(XRealError):
    """A PACS could not be reached or refused the request; one sentence for the user.

    ``attempts`` says how many times the operation was tried; ``report`` holds the
    per-instance push report so far when a push stopped part-way; ``instance_level``
    marks a refusal of one object (a push goes on with the next one).
    """

    def __init__(self, message: str, attempts: int = 1, report: dict | None = None, instance_level: bool = False):
        super().__init__(message)
        self.attempts = attempts
        self.report = report
        self.instance_level = instance_level


class TransientPacsError(PacsError):
    """A failure that may pass (network, timeout, busy server): retried; raised to the caller
    once the retries are used up, so that a service can answer "PACS unavailable" (502)."""


@dataclass(frozen=True)
class PacsNode:
    """One configured PACS: where it is, how to talk to it, and what it may be used for."""

    name: str
    type: str
    can_push: bool
    can_fetch: bool
    url: str | None = None
    headers: dict = field(default_factory=dict, repr=False)  # may hold credentials: never listed or logged
    verify_tls: bool | str = True
    host: str | None = None
    port: int | None = None
    called_aet: str | None = None
    calling_aet: str = DEFAULT_CALLING_AET
    retrieve: str = "c-get"  # DIMSE sources: C-GET, or C-MOVE to our own storage SCP on move_port
    move_port: int | None = None
    move_bind_address: str = "0.0.0.0"
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def address(self) -> str:
        """Where the node is, for messages (never includes credentials)."""
        if self.type == "dicomweb":
            return self.url
        return f"{self.called_aet}@{self.host}:{self.port}"


@dataclass
class PacsConfig:
    """The configured PACS nodes by name, and the file they came from (None: no file)."""

    nodes: dict = field(default_factory=dict)
    path: Path | None = None

    def node(self, name: str, purpose: str) -> PacsNode:
        """The node called ``name`` (an optional ``dicomweb:`` / ``dimse:`` prefix must match its type)."""
        prefix, _, bare_name = name.rpartition(":") if ":" in name else ("", "", name)
        node = self.nodes.get(bare_name)
        where = f"in {self.path}" if self.path else "(no PACS configuration file was found)"
        if node is None:
            usable = [n.name for n in self.nodes.values() if (n.can_push if purpose == "destination" else n.can_fetch)]
            known = ", ".join(sorted(usable)) or "none"
            raise PacsError(f"Unknown PACS {purpose} '{bare_name}' {where}; configured {purpose}s: {known}.")
        if prefix and prefix != node.type:
            raise PacsError(f"PACS node '{bare_name}' is of type {node.type}, not {prefix}.")
        if purpose == "destination" and not node.can_push:
            raise PacsError(f"PACS node '{bare_name}' is configured as a source only and cannot be pushed to.")
        if purpose == "source" and not node.can_fetch:
            raise PacsError(f"PACS node '{bare_name}' is configured as a destination only and cannot be fetched from.")
        return node


def _expand_environment(value: str, where: str) -> str:
    """Replace ``${VAR}`` by the environment variable, refusing unset ones."""

    def replace(match: re.Match) -> str:
        variable = match.group(1)
        if variable not in os.environ:
            raise PacsError(f"{where} uses ${{{variable}}}, but that environment variable is not set.")
        return os.environ[variable]

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", replace, value)


def _check_aet(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 16 or not value.isascii() or "\\" in value:
        raise PacsError(f"{where} must be an AE title of 1 to 16 ASCII characters, not {value!r}.")
    return value.strip()


def _parse_node(name: str, entry, can_push: bool, can_fetch: bool, origin: str) -> PacsNode:
    """Validate one node entry of the configuration file."""
    where = f"PACS node '{name}' in {origin}"
    if not isinstance(entry, dict):
        raise PacsError(f"{where} must be a mapping of settings.")
    node_type = entry.get("type")
    if node_type not in NODE_TYPES:
        raise PacsError(f"{where} needs \"type\": \"dicomweb\" or \"dimse\", not {node_type!r}.")
    unknown = set(entry) - NODE_KEYS[node_type]
    if unknown:
        raise PacsError(f"{where} has unknown settings for a {node_type} node: {', '.join(sorted(unknown))}.")
    timeout_s = entry.get("timeout_s", DEFAULT_TIMEOUT_S)
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or timeout_s <= 0:
        raise PacsError(f"{where}: timeout_s must be a positive number of seconds.")
    if node_type == "dicomweb":
        url = entry.get("url")
        if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
            raise PacsError(f"{where} needs a \"url\" starting with http:// or https://.")
        if "@" in url.split("://", 1)[1].split("/", 1)[0]:
            raise PacsError(f"{where} has credentials in its url; give them as an Authorization header instead.")
        if "?" in url or "#" in url:  # the request paths are appended to it; a token there would be shown and logged
            raise PacsError(f"{where} has a query or fragment in its url; give the DICOMweb root only, and a token "
                            "as an Authorization header.")
        headers = entry.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(key, str) and isinstance(value, str)
                                                    for key, value in headers.items()):
            raise PacsError(f"{where}: headers must map header names to text values.")
        headers = {key: _expand_environment(value, f"{where} header {key}") for key, value in headers.items()}
        verify_tls = entry.get("verify_tls", True)
        if not isinstance(verify_tls, (bool, str)):
            raise PacsError(f"{where}: verify_tls must be true, false or the path of a CA bundle.")
        return PacsNode(name, node_type, can_push, can_fetch, url=url.rstrip("/"), headers=headers,
                        verify_tls=verify_tls, timeout_s=float(timeout_s))
    host, port = entry.get("host"), entry.get("port")
    if not isinstance(host, str) or not host:
        raise PacsError(f"{where} needs a \"host\".")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise PacsError(f"{where} needs a \"port\" between 1 and 65535.")
    called_aet = _check_aet(entry.get("called_aet"), f"{where} called_aet")
    calling_aet = _check_aet(entry.get("calling_aet", DEFAULT_CALLING_AET), f"{where} calling_aet")
    retrieve = entry.get("retrieve", "c-get")
    if retrieve not in RETRIEVE_METHODS:
        raise PacsError(f"{where}: retrieve must be \"c-get\" or \"c-move\", not {retrieve!r}.")
    move_port = entry.get("move_port")
    if retrieve == "c-move" and (not isinstance(move_port, int) or isinstance(move_port, bool)
                                 or not 1 <= move_port <= 65535):
        raise PacsError(f"{where} retrieves with C-MOVE and needs the \"move_port\" (1-65535) on which this engine "
                        "receives the images; the PACS must know it under the calling AE title.")
    move_bind_address = entry.get("move_bind_address", "0.0.0.0")
    if not isinstance(move_bind_address, str) or not move_bind_address:
        raise PacsError(f"{where}: move_bind_address must be an IP address to listen on.")
    return PacsNode(name, node_type, can_push, can_fetch, host=host, port=port, called_aet=called_aet,
                    calling_aet=calling_aet, retrieve=retrieve, move_port=move_port,
                    move_bind_address=move_bind_address, timeout_s=float(timeout_s))


def parse_config(data, origin: str = "the PACS configuration", path: Path | None = None) -> PacsConfig:
    """Build a PacsConfig from the already-parsed file content (a dict)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PacsError(f"{origin} must hold a mapping with \"destinations\", \"sources\" or \"nodes\".")
    unknown = set(data) - set(SECTION_ROLES)
    if unknown:
        raise PacsError(f"{origin} has unknown sections {', '.join(sorted(unknown))}; "
                        "use \"destinations\", \"sources\" or \"nodes\".")
    nodes: dict[str, PacsNode] = {}
    for section, (can_push, can_fetch) in SECTION_ROLES.items():
        entries = data.get(section) or {}
        if not isinstance(entries, dict):
            raise PacsError(f"\"{section}\" in {origin} must map node names to settings.")
        for name, entry in entries.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(name)):
                raise PacsError(f"PACS node name {name!r} in {origin} may use only letters, digits, '_', '.' and '-'.")
            if name in nodes:
                raise PacsError(f"PACS node '{name}' appears twice in {origin}; list it once under \"nodes\" "
                                "to use it both ways.")
            nodes[name] = _parse_node(name, entry, can_push, can_fetch, origin)
    return PacsConfig(nodes=nodes, path=path)


def load_config(path=None) -> PacsConfig:
    """Read the PACS configuration: ``path``, else $XREAL_ENGINE_PACS_CONFIG, else the default file.

    A missing default file means "no PACS configured"; a missing file that was
    named explicitly is an error.
    """
    explicit = path is not None or bool(os.environ.get(CONFIG_ENV))
    config_path = Path(path if path is not None else os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH).expanduser()
    if not config_path.is_file():
        if explicit and config_path.is_dir():
            raise PacsError(f"PACS configuration file {config_path} is a directory; give the JSON or YAML file.")
        if explicit:
            raise PacsError(f"PACS configuration file {config_path} does not exist.")
        return PacsConfig(nodes={}, path=None)
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PacsError(f"PACS configuration file {config_path} cannot be read ({error}).") from None
    try:
        if config_path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as error:  # json.JSONDecodeError, yaml.YAMLError
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        file_format = "YAML" if config_path.suffix.lower() in (".yaml", ".yml") else "JSON"
        raise PacsError(f"PACS configuration file {config_path} is not valid {file_format} ({first_line}).") from None
    return parse_config(data, origin=str(config_path), path=config_path)


def resolve_config(config) -> PacsConfig:
    if isinstance(config, PacsConfig):
        return config
    if isinstance(config, dict):
        return parse_config(config)
    return load_config(config)  # None or a path


def list_nodes(config=None) -> list[dict]:
    """The configured nodes without secrets, for /api/v1/info and the Slicer module."""
    config = resolve_config(config)
    return [
        {"name": node.name, "type": node.type, "can_push": node.can_push, "can_fetch": node.can_fetch,
         "address": node.address}
        for node in sorted(config.nodes.values(), key=lambda node: node.name)
    ]

