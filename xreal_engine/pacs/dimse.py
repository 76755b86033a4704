"""DIMSE transport (pynetdicom): C-STORE push, C-FIND + C-GET or C-MOVE fetch."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from ..errors import InputError
from .config import PacsError, PacsNode, TransientPacsError
from .instances import pick_xray, storage_status_text, write_atomically
from .retry import with_retries

# pynetdicom logs query identifiers at INFO; they may not reach the engine's logs whatever level the
# service runs at.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

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
    try:
        association = application_entity.associate(node.host, node.port, contexts=contexts, ae_title=node.called_aet,
                                                   ext_neg=ext_neg, evt_handlers=evt_handlers)
    except socket.gaierror:  # a host name that does not resolve: a set-up error, not retried
        raise PacsError(f"PACS '{node.name}': cannot reach {node.address} for {action} (host not found); check "
                        "its host in the PACS configuration.") from None
    if association.is_established:
        return association
    if association.is_aborted and association.rejected_contexts and not association.accepted_contexts:
        classes = ", ".join(sorted({str(context.abstract_syntax) for context in association.rejected_contexts}))
        raise PacsError(f"PACS '{node.name}' ({node.address}) accepts none of the proposed SOP classes for {action} "
                        f"({classes}).")
    answer = association.acceptor.primitive if association.is_rejected else _late_rejection(association)
    if answer is not None:
        reason = f"{getattr(answer, 'reason_str', 'no reason given')}"
        if getattr(answer, "result", None) == 0x01:
            raise PacsError(f"PACS '{node.name}' ({node.address}) rejected the association for {action} "
                            f"permanently: {reason}.")
        raise TransientPacsError(f"{node.address} rejected the association for {action} for now: {reason}.")
    raise TransientPacsError(f"cannot open a DICOM association with {node.address} for {action} "
                             "(connection refused, aborted or timed out).")


def _late_rejection(association):
    """The A-ASSOCIATE-RJ that pynetdicom received but did not act on, or None.

    A race in pynetdicom 3.0 (acse.py, ``_negotiate_as_requestor``): when the peer sends its
    rejection and closes the connection before the requesting thread looks at the socket, the
    thread sees "not connected" and aborts, leaving the rejection unread in the DUL's queue
    (``DULServiceProvider.receive_pdu``). On a busy machine that turned a permanent refusal into
    a retried "connection refused"; reading the queue restores the peer's own answer.
    """
    from pynetdicom.pdu_primitives import A_ASSOCIATE

    while True:
        primitive = association.dul.receive_pdu(wait=False)
        if primitive is None:
            return None
        if isinstance(primitive, A_ASSOCIATE) and getattr(primitive, "result", None) in (0x01, 0x02):
            return primitive


class DimseSender:
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
            raise TransientPacsError(f"{self.node.address} answered C-STORE {storage_status_text(code)}{comment}.",
                                     instance_level=True)
        category = code_to_category(code)
        if category in ("Success", "Warning"):
            return "accepted", f"C-STORE status {storage_status_text(code)}{comment}"
        return "failed", f"C-STORE status {storage_status_text(code)}{comment}"

    def close(self) -> None:
        if self.association is not None:
            if self.association.is_established:
                self.association.release()
            self.association = None


def _no_answer(node: PacsNode, action: str) -> TransientPacsError:
    """A query/retrieve that got no final status: most often the PACS does not know our AE title."""
    return TransientPacsError(f"{node.address} gave no {action} answer, the association was aborted or timed out "
                              f"(does the PACS know calling AE title {node.calling_aet}?).")


def fetch_dimse(node: PacsNode, study: str, series: str, instance, dest_dir: Path, retries, backoff_s) -> Path:
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
    for keyword in ("SOPClassUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames", "PhotometricInterpretation"):
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
                        "photometric": identifier.get("PhotometricInterpretation"),
                    })
        finally:
            association.release()
        if final_status is None:
            raise _no_answer(node, "C-FIND")
        if code_to_category(final_status) not in ("Success", "Pending"):
            raise PacsError(f"PACS '{node.name}' refused the C-FIND query with status 0x{final_status:04X}.")
        return matches

    candidates, _ = with_retries(find, f"Searching PACS '{node.name}'", retries, backoff_s)
    chosen = pick_xray(candidates, node, study, series, instance)
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
            raise _no_answer(node, action)
        raise PacsError(f"PACS '{node.name}' did not send the instance on {action} (status 0x{final_status:04X}).")

    data, _ = with_retries(retrieve, f"Retrieving from PACS '{node.name}'", retries, backoff_s)
    return write_atomically(dest_dir, chosen["sop_instance_uid"], lambda path: path.write_bytes(data))
