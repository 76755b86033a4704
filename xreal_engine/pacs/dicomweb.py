"""DICOMweb transport (dicomweb-client on a requests session): STOW-RS push, QIDO-RS + WADO-RS fetch."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from .config import PacsError, PacsNode, TransientPacsError
from .instances import pick_xray, storage_status_text, write_atomically
from .retry import with_retries

# dicomweb-client logs request headers (credentials) at DEBUG; they may not reach the engine's logs
# whatever level the service runs at.
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)

# HTTP answers that say the destination itself is wrong (URL, credentials): stop at once.
DESTINATION_LEVEL_HTTP_STATUSES = {401, 403, 404, 405}


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
    except (ValueError, TypeError, AttributeError, KeyError):  # dicomweb-client parsing an answer that is no DICOM
        raise PacsError(f"PACS '{node.name}' answered {action} with something that is not a DICOM response "
                        "(is the URL the DICOMweb root, not a login page or proxy?).") from None


def _stow_outcome(response_dataset, sop_instance_uid: str, http_status: int) -> tuple[str, str]:
    """Read one instance's fate from a STOW-RS response (Referenced / Failed SOP Sequence)."""
    for item in getattr(response_dataset, "FailedSOPSequence", []) or []:
        if getattr(item, "ReferencedSOPInstanceUID", None) == sop_instance_uid:
            reason = getattr(item, "FailureReason", None)
            text = storage_status_text(int(reason)) if reason is not None else "no reason given"
            return "failed", f"HTTP {http_status}; failure reason {text}"
    for item in getattr(response_dataset, "ReferencedSOPSequence", []) or []:
        if getattr(item, "ReferencedSOPInstanceUID", None) == sop_instance_uid:
            warning = getattr(item, "WarningReason", None)
            if warning is not None:
                return "accepted", f"HTTP {http_status}; warning {storage_status_text(int(warning))}"
            return "accepted", f"HTTP {http_status}; stored"
    return "failed", f"HTTP {http_status}; the PACS did not list this instance as stored"


class DicomwebSender:
    """STOW-RS, one instance per request so that every instance gets its own status and retries."""

    def __init__(self, node: PacsNode, datasets):
        import requests

        self.node = node
        self.session = requests.Session()
        self.last_response = None  # dicomweb-client hides the HTTP answer; the hook keeps it for send()
        self.session.hooks["response"].append(lambda response, *args, **kwargs: setattr(self, "last_response",
                                                                                        response))
        self.client = _dicomweb_client(node, self.session)

    def send(self, dataset) -> tuple[str, str]:
        import pydicom
        import requests

        uid = str(dataset.SOPInstanceUID)
        try:
            response = _call_dicomweb(self.node, "STOW-RS", lambda: self.client.store_instances([dataset]))
            if "ReferencedSOPSequence" not in response and "FailedSOPSequence" not in response:
                answer = self.last_response
                if answer is not None and answer.content:  # a body, but no DICOM: a login page, a proxy's
                    kind = (answer.headers.get("Content-Type") or "no content type").split(";")[0]
                    return "failed", f"HTTP {answer.status_code} with a {kind} answer, not a STOW-RS response"
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


def _qido_value(item: dict, tag: str):
    values = item.get(tag, {}).get("Value")
    return values[0] if values else None


def fetch_dicomweb(node: PacsNode, study: str, series: str, instance, dest_dir: Path, retries, backoff_s) -> Path:
    import requests

    with requests.Session() as session:
        client = _dicomweb_client(node, session)
        search_filters = {"SOPInstanceUID": instance} if instance else None
        found, _ = with_retries(lambda: _call_dicomweb(node, "QIDO-RS", lambda: client.search_for_instances(
            study_instance_uid=study, series_instance_uid=series, search_filters=search_filters,
            fields=["SOPClassUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames", "PhotometricInterpretation"])),
            f"Searching PACS '{node.name}'", retries, backoff_s)
        candidates = [{
            "sop_instance_uid": _qido_value(item, "00080018"),
            "sop_class_uid": _qido_value(item, "00080016"),
            "instance_number": _qido_value(item, "00200013"),
            "rows": _qido_value(item, "00280010"),
            "frames": _qido_value(item, "00280008"),
            "photometric": _qido_value(item, "00280004"),
        } for item in found]
        chosen = pick_xray(candidates, node, study, series, instance)
        dataset, _ = with_retries(lambda: _call_dicomweb(node, "WADO-RS", lambda: client.retrieve_instance(
            study, series, chosen["sop_instance_uid"])), f"Retrieving from PACS '{node.name}'", retries, backoff_s)

    def write(path: Path) -> None:
        dataset.save_as(path, enforce_file_format=True)

    return write_atomically(dest_dir, chosen["sop_instance_uid"], write)
