"""Storing one upload under a server-chosen name, after checking its content type, format and size.

The format comes from the bytes (``io/formats.py``'s one sniff), never from the client's
name or content type, and an image whose header announces more than ``MAX_IMAGE_SIDE``
pixels per side, or a 3D volume, is refused before a single pixel is decoded
(``io/formats.check_image_header``, the same check the readers make).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fastapi import UploadFile

from ..errors import InputError
from ..io.formats import HEAD_BYTES, ImageTooLarge, check_image_header, sniff_format
from .errors import ApiError

# Declared content types we accept; the bytes are checked as well (see io/formats.sniff_format).
ACCEPTED_CONTENT_TYPES = {
    "", "application/octet-stream", "image/png", "application/dicom", "image/dicom", "image/x-nrrd",
    "application/x-nrrd", "application/gzip", "application/x-gzip", "application/x-nifti", "image/x-nifti",
    "application/x-nifti-gz",
}
SUFFIXES = {"png": ".png", "dicom": ".dcm", "nifti.gz": ".nii.gz", "nifti": ".nii"}


def suffix_for(fmt: str, client_name: str | None) -> str:
    """The server-side suffix; the client's name only decides between .nrrd and .seg.nrrd."""
    if fmt == "nrrd":
        return ".seg.nrrd" if (client_name or "").lower().endswith(".seg.nrrd") else ".nrrd"
    return SUFFIXES[fmt]


def _check_client_name(client_name: str, what: str) -> None:
    # folders, or anything not printable: control characters, escape sequences, bidirectional overrides
    if any(bad in client_name for bad in ("/", "\\")) or not client_name.isprintable() or client_name in (".", ".."):
        raise ApiError(400, "bad_filename",
                       f"The {what} has a file name with folders or control characters; send a plain file name.")


def store_upload(upload: UploadFile, what: str, stem: str, folder: Path) -> str:
    """Copy one upload to ``folder/<stem><suffix>`` after checking type, format and size; return the name."""
    client_name = upload.filename or ""
    _check_client_name(client_name, what)
    content_type = (upload.content_type or "").split(";")[0].strip().lower()
    if content_type not in ACCEPTED_CONTENT_TYPES:
        raise ApiError(415, "unsupported_media_type",
                       f"The {what} was sent as '{content_type}'; send a PNG, NRRD, NIfTI or DICOM file.")
    upload.file.seek(0)
    head = upload.file.read(HEAD_BYTES)
    if not head:
        raise ApiError(422, "empty_file", f"The {what} is an empty file.")
    fmt = sniff_format(head)
    if fmt is None:
        raise ApiError(415, "unsupported_format",
                       f"The {what} is not a PNG, NRRD, NIfTI or DICOM file; export it in one of these formats.")
    name = stem + suffix_for(fmt, upload.filename)
    target = folder / name
    upload.file.seek(0)
    with open(target, "wb") as out:
        shutil.copyfileobj(upload.file, out, 1 << 20)
    try:
        check_image_header(target, f"The {what}")
    except ImageTooLarge as error:
        raise ApiError(422, "image_too_large", str(error)) from None
    except InputError as error:
        raise ApiError(422, "invalid_input", str(error)) from None
    return name


# A fixation CSV (the attention control's gaze data) is text, not an image; these types may carry it.
CSV_CONTENT_TYPES = {"", "application/octet-stream", "text/csv", "text/plain", "application/csv",
                     "application/vnd.ms-excel"}


def store_control_upload(upload: UploadFile, control: str, stem: str, folder: Path) -> str:
    """A control's file: an image (as ``store_upload``), or for ``attention`` also a fixation CSV.

    A CSV is anything the image sniff does not recognise, stored as ``<stem>.csv`` up to the fixation
    file limit; its content is checked by io/controls.py's reader with the other inputs.
    """
    from ..io.controls import MAX_FIXATION_FILE_BYTES

    what = f"{control} control file"
    upload.file.seek(0)
    head = upload.file.read(HEAD_BYTES)
    if control != "attention" or sniff_format(head) is not None:
        return store_upload(upload, what, stem, folder)
    client_name = upload.filename or ""
    _check_client_name(client_name, what)
    content_type = (upload.content_type or "").split(";")[0].strip().lower()
    if content_type not in CSV_CONTENT_TYPES:
        raise ApiError(415, "unsupported_media_type",
                       f"The {what} was sent as '{content_type}'; send an image or a fixation CSV (text/csv).")
    if not head:
        raise ApiError(422, "empty_file", f"The {what} is an empty file.")
    name = stem + ".csv"
    upload.file.seek(0)
    with open(folder / name, "wb") as out:
        copied = 0
        for block in iter(lambda: upload.file.read(1 << 20), b""):
            copied += len(block)
            if copied > MAX_FIXATION_FILE_BYTES:
                raise ApiError(413, "file_too_large", f"The {what} is larger than "
                               f"{MAX_FIXATION_FILE_BYTES // (1024 * 1024)} MB.")
            out.write(block)
    return name
