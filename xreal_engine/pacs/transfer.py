"""Pushing results to a PACS destination and fetching an edit-mode source from a PACS source,
over either transport; and the ``push`` command."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Iterable

from ..errors import InputError
from .config import CONFIG_ENV, DEFAULT_CONFIG_PATH, PacsError, list_nodes, load_config, resolve_config
from .dicomweb import DicomwebSender, fetch_dicomweb
from .dimse import DimseSender, fetch_dimse
from .retry import with_retries

LOGGER = logging.getLogger(__name__)


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
    node = resolve_config(config).node(name, "destination")
    paths = [Path(path) for path in files]
    if not paths:
        raise InputError("No DICOM files were given to push.")
    datasets = [_read_for_push(path) for path in paths]
    report = {"destination": node.name, "type": node.type, "instances": [], "accepted": 0, "failed": 0}
    sender = (DicomwebSender if node.type == "dicomweb" else DimseSender)(node, datasets)
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


def _result_files(result_dir: Path) -> list[Path]:
    """A result directory's sc.dcm and seg.dcm, in that order; a directory without them is refused."""
    missing = [file_name for file_name in RESULT_FILES if not (result_dir / file_name).is_file()]
    if missing:
        raise InputError(f"Result directory {result_dir} has no {' or '.join(missing)}.")
    return [result_dir / file_name for file_name in RESULT_FILES]


def push_result(name, result_dir, config=None, retries: int = 3, backoff_s: float = 1.0) -> dict:
    """Push a result directory's sc.dcm and seg.dcm to destination ``name``."""
    return push_files(name, _result_files(Path(result_dir)), config, retries, backoff_s)


# --------------------------------------------------------------------------- fetch


def _check_uid(value, parameter: str) -> str:
    from pydicom.uid import RE_VALID_UID

    if not isinstance(value, str) or len(value) > 64 or not RE_VALID_UID.fullmatch(value):
        raise InputError(f"{parameter} must be a DICOM UID (digits and dots), not {value!r}.")
    return value


def fetch_source(name, study, series, instance=None, dest_dir=None, config=None, retries: int = 3,
                 backoff_s: float = 1.0) -> Path:
    """Fetch one X-ray from source ``name`` for edit mode and return the written file's path.

    QIDO-RS + WADO-RS for DICOMweb, C-FIND + C-GET for DIMSE. Without ``instance``
    the first single-frame X-ray of the series (lowest Instance Number) is taken.
    ``dest_dir`` defaults to a new temporary directory (the caller removes it).
    """
    node = resolve_config(config).node(name, "source")
    study = _check_uid(study, "The study UID (--study)")
    series = _check_uid(series, "The series UID (--series)")
    if instance is not None:
        instance = _check_uid(instance, "The instance UID (--instance)")
    dest_dir = Path(dest_dir) if dest_dir is not None else Path(tempfile.mkdtemp(prefix="xreal-source-"))
    fetch = fetch_dicomweb if node.type == "dicomweb" else fetch_dimse
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
            expanded.extend(_result_files(path))
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
