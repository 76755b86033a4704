"""What both transports share about the DICOM instances they move: the text of a storage
status (C-STORE, STOW-RS), which instance of a series edit mode fetches, and writing the
fetched one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import InputError
from .config import PacsError, PacsNode

# Single-frame projection X-rays that edit mode can start from.
XRAY_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image (For Presentation)",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image (For Processing)",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image",
}


def storage_status_text(code: int) -> str:
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))[1] or "Success"
    return f"0x{code:04X} {meaning}"


def pick_xray(candidates: list[dict], node: PacsNode, study: str, series: str, instance: str | None) -> dict:
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
        # A PACS that answers Photometric Interpretation shows colour images (an RGB screenshot SC) before
        # they are fetched; one that does not is trusted until the image is read.
        grey = str(item.get("photometric") or "MONOCHROME").strip().upper().startswith("MONOCHROME")
        return item.get("sop_class_uid") in XRAY_SOP_CLASSES and item.get("rows") and (frames in (None, "", 1, "1")) \
            and grey

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


def write_atomically(dest_dir: Path, sop_instance_uid: str, write: Callable[[Path], None]) -> Path:
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
