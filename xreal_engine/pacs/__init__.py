"""PACS destinations and sources: DICOMweb (dicomweb-client) and DIMSE (pynetdicom).

Pushes results (SC + SEG) to a configured PACS and pulls a source X-ray from one
for edit mode. Transient failures (connection refused or reset, timeouts, HTTP
408/429/5xx, DIMSE association failures, "out of resources") are retried with
exponential backoff; permanent ones (unknown node, HTTP 401/403/404, association
rejected permanently) are not. Local files are only ever read.

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
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ..errors import InputError, XRealError

LOGGER = logging.getLogger(__name__)
# pynetdicom logs query identifiers at INFO and dicomweb-client request headers (credentials) at
# DEBUG; neither may reach the engine's logs whatever level the service runs at.
for _library in ("pynetdicom", "dicomweb_client"):
    logging.getLogger(_library).setLevel(logging.WARNING)

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

# Single-frame projection X-rays that edit mode can start from.
XRAY_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image (For Presentation)",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image (For Processing)",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image",
}
# HTTP answers that say the destination itself is wrong (URL, credentials): stop at once.
DESTINATION_LEVEL_HTTP_STATUSES = {401, 403, 404, 405}


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


# --------------------------------------------------------------------------- configuration


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


def _resolve_config(config) -> PacsConfig:
    if isinstance(config, PacsConfig):
        return config
    if isinstance(config, dict):
        return parse_config(config)
    return load_config(config)  # None or a path


def list_nodes(config=None) -> list[dict]:
    """The configured nodes without secrets, for /api/v1/info and the Slicer module."""
    config = _resolve_config(config)
    return [
        {"name": node.name, "type": node.type, "can_push": node.can_push, "can_fetch": node.can_fetch,
         "address": node.address}
        for node in sorted(config.nodes.values(), key=lambda node: node.name)
    ]


# --------------------------------------------------------------------------- retries


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


# --------------------------------------------------------------------------- DICOMweb


def _http_message(response) -> str:
    """The PACS's own explanation of an HTTP error, shortened to one line."""
    reason = f"HTTP {response.status_code} {response.reason or ''}".strip()
    detail = ""
    try:
        body = response.json()
        if isinstance(body, dict):
            detail = " ".join(str(body[key]) for key in ("Message", "Details") if body.get(key))
    except ValueError:
        detail = (response.text or "").strip().splitlines()[0] if (response.text or "").strip() else ""
    detail = " ".join(detail.split())[:200]
    return f"{reason}: {detail}" if detail else reason


def _verify_tls_adapter(verify: bool | str):
    """An HTTPS adapter that always verifies with ``verify``.

    ``session.verify`` alone is not enough: requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE
    from the environment override it (requests issue #3829), so a configured CA bundle or
    ``verify_tls: false`` would be silently ignored on machines that set those variables.
    """
    from requests.adapters import HTTPAdapter

    class VerifyingAdapter(HTTPAdapter):
        def send(self, request, **kwargs):
            kwargs["verify"] = verify
            return super().send(request, **kwargs)

    return VerifyingAdapter()


def _dicomweb_client(node: PacsNode, session):
    """A dicomweb-client for ``node`` on ``session`` (a requests.Session the caller closes)."""
    from dicomweb_client.api import DICOMwebClient

    if node.verify_tls is not True:  # True is requests' default (system CAs or REQUESTS_CA_BUNDLE)
        session.mount("https://", _verify_tls_adapter(node.verify_tls))
    client = DICOMwebClient(url=node.url, session=session, headers=dict(node.headers), timeout=node.timeout_s)
    client.set_http_retry_params(retry=False)  # we retry ourselves, counting attempts and covering network errors
    return client


def _tls_reason(error: Exception) -> str:
    """The short reason of a TLS failure (e.g. 'certificate verify failed: self-signed certificate')."""
    text = str(error)
    for marker in ("certificate verify failed", "wrong version number", "hostname mismatch"):
        if marker in text:
            start = text.index(marker)
            return text[start:].split(" (_ssl")[0].split("')")[0].rstrip(")")[:120]
    return "TLS handshake failed"


def _call_dicomweb(node: PacsNode, action: str, call: Callable):
    """Run one DICOMweb request, turning requests' exceptions into (transient) PacsErrors."""
    import requests

    try:
        return call()
    except requests.Timeout:
        raise TransientPacsError(f"{node.address} did not answer {action} within {node.timeout_s:g} s.") from None
    except requests.exceptions.SSLError as error:  # permanent until someone fixes the set-up: not retried
        raise PacsError(f"PACS '{node.name}': TLS with {node.address} failed for {action} ({_tls_reason(error)}); "
                        "if the PACS uses its own certificate authority, set verify_tls to the path of its "
                        "CA bundle in the PACS configuration.") from None
    except requests.ConnectionError as error:
        cause = "connection refused" if "refused" in str(error).lower() else "connection failed or was reset"
        raise TransientPacsError(f"cannot reach {node.address} for {action} ({cause}).") from None
    except requests.HTTPError as error:
        response = error.response
        message = _http_message(response)
        if response.status_code in (408, 429) or response.status_code >= 500:
            raise TransientPacsError(f"{node.address} answered {action} with {message}.") from None
        refusal = PacsError(f"PACS '{node.name}' refused {action}: {message}.")
        refusal.response = response  # lets STOW-RS read an instance-level FailedSOPSequence
        raise refusal from None
    except requests.RequestException as error:
        raise PacsError(f"PACS '{node.name}' request for {action} failed ({type(error).__name__}).") from None


def _storage_status_text(code: int) -> str:
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))[1] or "Success"
    return f"0x{code:04X} {meaning}"


def _stow_outcome(response_dataset, sop_instance_uid: str, http_status: int) -> tuple[str, str]:
    """Read one instance's fate from a STOW-RS response (Referenced / Failed SOP Sequence)."""
    for item in getattr(response_dataset, "FailedSOPSequence", []) or []:
        if getattr(item, "ReferencedSOPInstanceUID", None) == sop_instance_uid:
            reason = getattr(item, "FailureReason", None)
            text = _storage_status_text(int(reason)) if reason is not None else "no reason given"
            return "failed", f"HTTP {http_status}; failure reason {text}"
    for item in getattr(response_dataset, "ReferencedSOPSequence", []) or []:
        if getattr(item, "ReferencedSOPInstanceUID", None) == sop_instance_uid:
            warning = getattr(item, "WarningReason", None)
            if warning is not None:
                return "accepted", f"HTTP {http_status}; warning {_storage_status_text(int(warning))}"
            return "accepted", f"HTTP {http_status}; stored"
    return "failed", f"HTTP {http_status}; the PACS did not list this instance as stored"


class _DicomwebSender:
    """STOW-RS, one instance per request so that every instance gets its own status and retries."""

    def __init__(self, node: PacsNode, datasets):
        import requests

        self.node = node
        self.session = requests.Session()
        self.client = _dicomweb_client(node, self.session)

    def send(self, dataset) -> tuple[str, str]:
        import pydicom
        import requests

        uid = str(dataset.SOPInstanceUID)
        try:
            response = _call_dicomweb(self.node, "STOW-RS", lambda: self.client.store_instances([dataset]))
            if "ReferencedSOPSequence" not in response and "FailedSOPSequence" not in response:
                return "accepted", "HTTP 200; the PACS returned no per-instance status"
            return _stow_outcome(response, uid, 200)
        except PacsError as error:
            # An instance-level refusal (e.g. 409 with a FailedSOPSequence) fails this instance only.
            response = getattr(error, "response", None)
            if isinstance(error, TransientPacsError) or response is None or \
                    response.status_code in DESTINATION_LEVEL_HTTP_STATUSES:
                raise
            try:
                body = pydicom.Dataset.from_json(response.json())
                status, detail = _stow_outcome(body, uid, response.status_code)
                return status, detail if status == "failed" else _http_message(response)
            except (ValueError, TypeError, KeyError, requests.RequestException):
                return "failed", _http_message(response)

    def close(self) -> None:
        self.session.close()


# --------------------------------------------------------------------------- DIMSE

UNCOMPRESSED_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
RETRIEVE_TRANSFER_SYNTAXES = UNCOMPRESSED_TRANSFER_SYNTAXES + (
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.5",  # RLE lossless
)


def _associate(node: PacsNode, contexts, action: str, ext_neg=None, evt_handlers=None):
    """Open an association; a refused connection, an abort or a transient rejection may be retried."""
    from pynetdicom import AE

    application_entity = AE(ae_title=node.calling_aet)
    for timeout_name in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(application_entity, timeout_name, node.timeout_s)
    association = application_entity.associate(node.host, node.port, contexts=contexts, ae_title=node.called_aet,
                                               ext_neg=ext_neg, evt_handlers=evt_handlers)
    if association.is_established:
        return association
    if association.is_aborted and association.rejected_contexts and not association.accepted_contexts:
        classes = ", ".join(sorted({str(context.abstract_syntax) for context in association.rejected_contexts}))
        raise PacsError(f"PACS '{node.name}' ({node.address}) accepts none of the proposed SOP classes for {action} "
                        f"({classes}).")
    if association.is_rejected:
        answer = association.acceptor.primitive
        reason = f"{getattr(answer, 'reason_str', 'no reason given')}"
        if getattr(answer, "result", None) == 0x01:
            raise PacsError(f"PACS '{node.name}' ({node.address}) rejected the association for {action} "
                            f"permanently: {reason}.")
        raise TransientPacsError(f"{node.address} rejected the association for {action} for now: {reason}.")
    raise TransientPacsError(f"cannot open a DICOM association with {node.address} for {action} "
                             "(connection refused, aborted or timed out).")


class _DimseSender:
    """C-STORE over one association (opened lazily, reopened after a failure)."""

    def __init__(self, node: PacsNode, datasets):
        from pynetdicom import build_context

        self.node = node
        syntaxes_by_class: dict[str, list[str]] = {}
        for dataset in datasets:
            syntaxes = syntaxes_by_class.setdefault(str(dataset.SOPClassUID), [])
            for syntax in (str(dataset.file_meta.TransferSyntaxUID),) + UNCOMPRESSED_TRANSFER_SYNTAXES:
                if syntax not in syntaxes:
                    syntaxes.append(syntax)
        if len(syntaxes_by_class) > 128:
            raise InputError("Cannot push more than 128 different SOP classes over one DICOM association.")
        self.contexts = [build_context(sop_class, syntaxes) for sop_class, syntaxes in syntaxes_by_class.items()]
        self.association = None

    def send(self, dataset) -> tuple[str, str]:
        from pynetdicom.status import code_to_category

        if self.association is None or not self.association.is_established:
            self.association = _associate(self.node, self.contexts, "C-STORE")
        try:
            status = self.association.send_c_store(dataset)
        except ValueError as error:  # no accepted presentation context for this SOP class / transfer syntax
            return "failed", f"the PACS accepted no presentation context for this object ({error})"
        except (RuntimeError, OSError):
            status = None
        if not status or "Status" not in status:
            self.close()
            raise TransientPacsError(f"{self.node.address} gave no C-STORE answer (association aborted or timed out).")
        code = int(status.Status)
        comment = f" ({status.ErrorComment})" if "ErrorComment" in status else ""
        if 0xA700 <= code <= 0xA7FF:
            raise TransientPacsError(f"{self.node.address} answered C-STORE {_storage_status_text(code)}{comment}.",
                                     instance_level=True)
        category = code_to_category(code)
        if category in ("Success", "Warning"):
            return "accepted", f"C-STORE status {_storage_status_text(code)}{comment}"
        return "failed", f"C-STORE status {_storage_status_text(code)}{comment}"

    def close(self) -> None:
        if self.association is not None:
            if self.association.is_established:
                self.association.release()
            self.association = None


# --------------------------------------------------------------------------- push


def _read_for_push(path: Path):
    """Read a DICOM file to send; refuse anything that is not a complete DICOM instance."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file.")
    try:
        dataset = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as error:
        raise InputError(f"{path} is not a readable DICOM file ({type(error).__name__}).") from None
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if keyword not in dataset:
            raise InputError(f"{path} has no {keyword}, so it cannot be stored in a PACS.")
    if "TransferSyntaxUID" not in getattr(dataset, "file_meta", {}):
        raise InputError(f"{path} has no DICOM file meta information (Transfer Syntax UID).")
    return dataset


def push_files(name, files: Iterable, config=None, retries: int = 3, backoff_s: float = 1.0) -> dict:
    """Send DICOM files to destination ``name``; returns a per-instance report.

    ``{"destination", "type", "instances": [{"sop_instance_uid", "file", "status":
    "accepted"|"failed", "detail", "attempts"}], "accepted", "failed", "ok"}``. Every file is
    read and checked before anything is sent. An instance the PACS refuses is
    reported as failed and the push goes on; when the destination itself cannot be
    used (unreachable after all retries, wrong URL or credentials) a PacsError is
    raised whose ``report`` lists what was sent so far ("not sent" for the rest).
    """
    node = _resolve_config(config).node(name, "destination")
    paths = [Path(path) for path in files]
    if not paths:
        raise InputError("No DICOM files were given to push.")
    datasets = [_read_for_push(path) for path in paths]
    report = {"destination": node.name, "type": node.type, "instances": [], "accepted": 0, "failed": 0}
    sender = (_DicomwebSender if node.type == "dicomweb" else _DimseSender)(node, datasets)
    try:
        for index, (path, dataset) in enumerate(zip(paths, datasets)):
            entry = {"sop_instance_uid": str(dataset.SOPInstanceUID), "file": str(path)}
            try:
                (status, detail), attempts = with_retries(
                    lambda: sender.send(dataset), f"Pushing {path.name} to PACS '{node.name}'", retries, backoff_s)
            except PacsError as error:
                report["instances"].append({**entry, "status": "failed", "detail": str(error),
                                            "attempts": error.attempts})
                if error.instance_level:  # the PACS is there but refused this object: go on with the next one
                    continue
                for later_path, later in zip(paths[index + 1:], datasets[index + 1:]):
                    report["instances"].append({"sop_instance_uid": str(later.SOPInstanceUID), "file": str(later_path),
                                                "status": "failed", "detail": "not sent", "attempts": 0})
                _count(report)
                error.report = report
                raise
            report["instances"].append({**entry, "status": status, "detail": detail, "attempts": attempts})
    finally:
        sender.close()
    _count(report)
    LOGGER.info("Pushed to PACS '%s': %d accepted, %d failed", node.name, report["accepted"], report["failed"])
    return report


def _count(report: dict) -> None:
    report["accepted"] = sum(item["status"] == "accepted" for item in report["instances"])
    report["failed"] = len(report["instances"]) - report["accepted"]
    report["ok"] = report["failed"] == 0


RESULT_FILES = ("sc.dcm", "seg.dcm")  # SC first: the SEG references it


def push_result(name, result_dir, config=None, retries: int = 3, backoff_s: float = 1.0) -> dict:
    """Push a result directory's sc.dcm and seg.dcm to destination ``name``."""
    result_dir = Path(result_dir)
    missing = [file_name for file_name in RESULT_FILES if not (result_dir / file_name).is_file()]
    if missing:
        raise InputError(f"Result directory {result_dir} has no {' or '.join(missing)}.")
    return push_files(name, [result_dir / file_name for file_name in RESULT_FILES], config, retries, backoff_s)


# --------------------------------------------------------------------------- fetch


def _check_uid(value, parameter: str) -> str:
    from pydicom.uid import RE_VALID_UID

    if not isinstance(value, str) or len(value) > 64 or not RE_VALID_UID.match(value):
        raise InputError(f"{parameter} must be a DICOM UID (digits and dots), not {value!r}.")
    return value


def _pick_xray(candidates: list[dict], node: PacsNode, study: str, series: str, instance: str | None) -> dict:
    """Choose the requested instance, or the first single-frame X-ray of the series by Instance Number."""
    where = f"series {series} of study {study} on PACS '{node.name}'"
    if instance is not None:
        candidates = [item for item in candidates if item.get("sop_instance_uid") == instance]
        if not candidates:
            raise PacsError(f"Instance {instance} was not found in {where}.")
    if not candidates:
        raise PacsError(f"No instances were found in {where}.")

    def is_single_frame_xray(item: dict) -> bool:
        frames = item.get("frames")
        return item.get("sop_class_uid") in XRAY_SOP_CLASSES and item.get("rows") and (frames in (None, "", 1, "1"))

    xrays = [item for item in candidates if is_single_frame_xray(item)]
    if not xrays:
        what = f"Instance {instance}" if instance else f"No instance of {where}"
        raise InputError(f"{what} is {'not ' if instance else ''}a single-frame X-ray image (CR, DX or Secondary "
                         f"Capture){' in ' + where if instance else ''}, so it cannot be edited.")

    def order(item: dict):
        try:
            number = int(item.get("instance_number"))
        except (TypeError, ValueError):
            number = 2**31
        return (number, item["sop_instance_uid"])

    return sorted(xrays, key=order)[0]


def _qido_value(item: dict, tag: str):
    values = item.get(tag, {}).get("Value")
    return values[0] if values else None


def _fetch_dicomweb(node: PacsNode, study: str, series: str, instance, dest_dir: Path, retries, backoff_s) -> Path:
    import requests

    with requests.Session() as session:
        client = _dicomweb_client(node, session)
        search_filters = {"SOPInstanceUID": instance} if instance else None
        found, _ = with_retries(lambda: _call_dicomweb(node, "QIDO-RS", lambda: client.search_for_instances(
            study_instance_uid=study, series_instance_uid=series, search_filters=search_filters,
            fields=["SOPClassUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames"])),
            f"Searching PACS '{node.name}'", retries, backoff_s)
        candidates = [{
            "sop_instance_uid": _qido_value(item, "00080018"),
            "sop_class_uid": _qido_value(item, "00080016"),
            "instance_number": _qido_value(item, "00200013"),
            "rows": _qido_value(item, "00280010"),
            "frames": _qido_value(item, "00280008"),
        } for item in found]
        chosen = _pick_xray(candidates, node, study, series, instance)
        dataset, _ = with_retries(lambda: _call_dicomweb(node, "WADO-RS", lambda: client.retrieve_instance(
            study, series, chosen["sop_instance_uid"])), f"Retrieving from PACS '{node.name}'", retries, backoff_s)

    def write(path: Path) -> None:
        dataset.save_as(path, enforce_file_format=True)

    return _write_atomically(dest_dir, chosen["sop_instance_uid"], write)


def _fetch_dimse(node: PacsNode, study: str, series: str, instance, dest_dir: Path, retries, backoff_s) -> Path:
    from pydicom import Dataset
    from pynetdicom import AE, build_context, build_role, evt
    from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,
                                      StudyRootQueryRetrieveInformationModelGet,
                                      StudyRootQueryRetrieveInformationModelMove)
    from pynetdicom.status import code_to_category

    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study
    query.SeriesInstanceUID = series
    query.SOPInstanceUID = instance or ""
    for keyword in ("SOPClassUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames"):
        setattr(query, keyword, None)

    def find() -> list[dict]:
        association = _associate(node, [build_context(StudyRootQueryRetrieveInformationModelFind)], "C-FIND")
        matches, final_status = [], None
        try:
            for status, identifier in association.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if not status or "Status" not in status:
                    break
                final_status = int(status.Status)
                if code_to_category(final_status) == "Pending" and identifier is not None:
                    matches.append({
                        "sop_instance_uid": str(identifier.get("SOPInstanceUID", "")),
                        "sop_class_uid": str(identifier.get("SOPClassUID", "")),
                        "instance_number": identifier.get("InstanceNumber"),
                        "rows": identifier.get("Rows"),
                        "frames": identifier.get("NumberOfFrames"),
                    })
        finally:
            association.release()
        if final_status is None:
            raise TransientPacsError(f"{node.address} gave no C-FIND answer, the association was aborted or timed out "
                                     f"(does the PACS know calling AE title {node.calling_aet}?).")
        if code_to_category(final_status) not in ("Success", "Pending"):
            raise PacsError(f"PACS '{node.name}' refused the C-FIND query with status 0x{final_status:04X}.")
        return matches

    candidates, _ = with_retries(find, f"Searching PACS '{node.name}'", retries, backoff_s)
    chosen = _pick_xray(candidates, node, study, series, instance)
    sop_class = chosen["sop_class_uid"]

    wanted = chosen["sop_instance_uid"]
    received: dict[str, bytes] = {}
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID, identifier.SeriesInstanceUID, identifier.SOPInstanceUID = study, series, wanted

    def store(event) -> int:
        """The PACS's C-STORE sub-operation: keep the bytes of the instance we asked for."""
        if str(event.request.AffectedSOPInstanceUID) == wanted:
            received[wanted] = event.encoded_dataset()
        return 0x0000

    def final_status_of(responses) -> int | None:
        final_status = None
        for status, _identifier in responses:
            if status and "Status" in status:
                final_status = int(status.Status)
        return final_status

    def get() -> int | None:
        contexts = [build_context(StudyRootQueryRetrieveInformationModelGet),
                    build_context(sop_class, list(RETRIEVE_TRANSFER_SYNTAXES))]
        association = _associate(node, contexts, "C-GET", ext_neg=[build_role(sop_class, scp_role=True)],
                                 evt_handlers=[(evt.EVT_C_STORE, store)])
        try:
            return final_status_of(association.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))
        finally:
            association.release()

    def move() -> int | None:
        receiver = AE(ae_title=node.calling_aet)
        receiver.add_supported_context(sop_class, list(RETRIEVE_TRANSFER_SYNTAXES))
        for timeout_name in ("acse_timeout", "dimse_timeout", "network_timeout"):
            setattr(receiver, timeout_name, node.timeout_s)
        try:
            server = receiver.start_server((node.move_bind_address, node.move_port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, store)])
        except OSError as error:
            raise PacsError(f"Cannot listen on {node.move_bind_address}:{node.move_port} for the C-MOVE from PACS "
                            f"'{node.name}' ({error.strerror or error}).") from None
        try:
            association = _associate(node, [build_context(StudyRootQueryRetrieveInformationModelMove)], "C-MOVE")
            try:
                return final_status_of(association.send_c_move(identifier, node.calling_aet,
                                                               StudyRootQueryRetrieveInformationModelMove))
            finally:
                association.release()
        finally:
            server.shutdown()

    def retrieve() -> bytes:
        action = node.retrieve.upper()
        final_status = move() if node.retrieve == "c-move" else get()
        if wanted in received:
            return received[wanted]
        if final_status is None:
            raise TransientPacsError(f"{node.address} gave no {action} answer, the association was aborted or timed "
                                     f"out (does the PACS know calling AE title {node.calling_aet}?).")
        raise PacsError(f"PACS '{node.name}' did not send the instance on {action} (status 0x{final_status:04X}).")

    data, _ = with_retries(retrieve, f"Retrieving from PACS '{node.name}'", retries, backoff_s)
    return _write_atomically(dest_dir, chosen["sop_instance_uid"], lambda path: path.write_bytes(data))


def _write_atomically(dest_dir: Path, sop_instance_uid: str, write: Callable[[Path], None]) -> Path:
    """Write ``<SOP Instance UID>.dcm`` via a temporary file, so a failure leaves no partial file."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / f"{sop_instance_uid}.dcm"
    handle, temporary = tempfile.mkstemp(prefix=".fetch-", suffix=".dcm", dir=dest_dir)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def fetch_source(name, study, series, instance=None, dest_dir=None, config=None, retries: int = 3,
                 backoff_s: float = 1.0) -> Path:
    """Fetch one X-ray from source ``name`` for edit mode and return the written file's path.

    QIDO-RS + WADO-RS for DICOMweb, C-FIND + C-GET for DIMSE. Without ``instance``
    the first single-frame X-ray of the series (lowest Instance Number) is taken.
    ``dest_dir`` defaults to a new temporary directory (the caller removes it).
    """
    node = _resolve_config(config).node(name, "source")
    study = _check_uid(study, "The study UID (--study)")
    series = _check_uid(series, "The series UID (--series)")
    if instance is not None:
        instance = _check_uid(instance, "The instance UID (--instance)")
    dest_dir = Path(dest_dir) if dest_dir is not None else Path(tempfile.mkdtemp(prefix="xreal-source-"))
    fetch = _fetch_dicomweb if node.type == "dicomweb" else _fetch_dimse
    path = fetch(node, study, series, instance, dest_dir, retries, backoff_s)
    LOGGER.info("Fetched one instance from PACS '%s'", node.name)
    return path


# --------------------------------------------------------------------------- the `push` command


def _expand_push_paths(paths) -> list[Path]:
    """A result directory stands for its sc.dcm and seg.dcm; files are taken as given."""
    expanded: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            missing = [file_name for file_name in RESULT_FILES if not (path / file_name).is_file()]
            if missing:
                raise InputError(f"Result directory {path} has no {' or '.join(missing)}.")
            expanded.extend(path / file_name for file_name in RESULT_FILES)
        else:
            expanded.append(path)
    return expanded


def format_report(report: dict) -> str:
    """A plain-text table: one line per instance."""
    rows = [("SOP Instance UID", "file", "status", "attempts", "detail")]
    rows += [(item["sop_instance_uid"], Path(item["file"]).name, item["status"], str(item.get("attempts", "")),
              item["detail"]) for item in report["instances"]]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    lines.append(f"{report['accepted']} accepted, {report['failed']} failed (destination '{report['destination']}', "
                 f"{report['type']})")
    return "\n".join(lines)


def configure_parser(parser) -> None:
    parser.add_argument("paths", nargs="*", metavar="RESULT_DIR_OR_FILES",
                        help="result directories (their sc.dcm and seg.dcm are sent) or DICOM files")
    parser.add_argument("--to", dest="destination", metavar="NAME", help="configured destination to send to")
    parser.add_argument("--pacs-config", metavar="FILE",
                        help=f"PACS configuration (JSON or YAML); default ${CONFIG_ENV} or {DEFAULT_CONFIG_PATH}")
    parser.add_argument("--retries", type=int, default=3, help="extra attempts after a transient failure (default 3)")
    parser.add_argument("--list", action="store_true", help="list the configured PACS nodes and exit")


def run(args) -> int:
    config = load_config(args.pacs_config)
    if args.list:
        for node in list_nodes(config):
            roles = "/".join(role for role, allowed in (("push", node["can_push"]), ("fetch", node["can_fetch"]))
                             if allowed)
            print(f"{node['name']}\t{node['type']}\t{roles}\t{node['address']}")
        return 0
    if not args.destination:
        raise InputError("Name a destination with --to NAME (see --list).")
    if not args.paths:
        raise InputError("Give at least one result directory or DICOM file to push.")
    if args.retries < 0:
        raise InputError("--retries must be 0 or more.")
    config.node(args.destination, "destination")  # an unknown name is the first thing to report
    try:
        report = push_files(args.destination, _expand_push_paths(args.paths), config, retries=args.retries)
    except PacsError as error:
        if error.report:
            print(format_report(error.report))
        raise
    print(format_report(report))
    return 0 if report["failed"] == 0 else 1
