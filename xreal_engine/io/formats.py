"""File formats: the one sniff (from the bytes, never the name) and header-only size checks.

Every reader of user files asks here first, so a DICOM is recognised the same way by the
mask reader, the X-ray reader and the service's upload check, and an image whose header
announces a huge or 3D size is refused before a single pixel is decoded.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

from ..errors import InputError

# The one size rule for every image and mask read or written: sides of MIN_IMAGE_SIDE..MAX_IMAGE_SIDE
# pixels. The largest is above any radiograph (a 43 cm CR at 0.1 mm is 4300) and small enough to refuse
# decompression bombs before decoding; the smallest is where a chest stops being recognisable.
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 32, 6000
HEAD_BYTES = 4096
FORMAT_NAMES = "PNG, NRRD, NIfTI or DICOM"


def sniff_format(head: bytes) -> str | None:
    """'png', 'dicom', 'nrrd', 'nifti.gz' or 'nifti' from a file's first bytes; None if none of them."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"NRRD000"):
        return "nrrd"
    if head.startswith(b"\x1f\x8b"):
        return "nifti.gz"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    return None


def sniff_file(path: Path) -> str | None:
    """The format of a file on disk (InputError if it cannot be opened)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path.name} is a directory, not a file.")
    if not path.is_file():
        raise InputError(f"{path.name} does not exist.")
    try:
        with open(path, "rb") as handle:
            return sniff_format(handle.read(HEAD_BYTES))
    except OSError as error:
        raise InputError(f"{path.name} cannot be read ({error.strerror or error}).") from None


class ImageTooLarge(InputError):
    """An image whose header announces more than MAX_IMAGE_SIDE pixels on a side (refused before decoding)."""


def header_sizes(path: Path, fmt: str) -> list[int]:
    """Image dimensions from the header only (PNG's IHDR, SimpleITK's ImageIO, pydicom without pixels); [] if unreadable."""
    if fmt == "png":
        with open(path, "rb") as handle:
            head = handle.read(24)
        return list(struct.unpack(">II", head[16:24])) if len(head) == 24 and head[12:16] == b"IHDR" else []
    if fmt == "dicom":
        import pydicom

        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - unreadable headers are refused later by the reader, with the reason
            return []
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        return [int(dataset.get("Columns", 0) or 0), int(dataset.get("Rows", 0) or 0)] + ([frames] if frames > 1 else [])
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return []
    return [int(size) for size in reader.GetSize()]


def check_image_header(path: Path, what: str | None = None) -> str:
    """Sniff ``path`` and refuse, from its header alone, images too large or with more than one slice.

    Returns the sniffed format. Any other format is refused here, for every reader: SimpleITK would read
    many more (MetaImage, TIFF, JPEG), some of them with headers that name another file to read.
    """
    path = Path(path)
    name = what or path.name
    fmt = sniff_file(path)
    if fmt is None:
        raise InputError(f"{name} is not a {FORMAT_NAMES} file (other formats are not read); save it as one of "
                         "those.")
    if fmt == "nrrd":
        _refuse_detached_nrrd(path, name)
    if fmt == "dicom":
        _refuse_deflated_dicom(path, name)
    if fmt in ("nifti", "nifti.gz"):
        _refuse_far_nifti_voxels(path, name, fmt == "nifti.gz")
    sizes = header_sizes(path, fmt)
    if any(side > MAX_IMAGE_SIDE for side in sizes[:2]):
        raise ImageTooLarge(f"{name} is {' x '.join(str(s) for s in sizes)} pixels; the engine accepts at most "
                            f"{MAX_IMAGE_SIDE} pixels per side.")
    if len(sizes) > 2 and any(side > 1 for side in sizes[2:]) and fmt != "dicom":
        slices = 1
        for side in sizes[2:]:
            slices *= side
        raise InputError(f"{name} is a 3D volume with {slices} slices; give a single 2D image.")
    if fmt in ("nifti", "nifti.gz") and nifti_has_non_finite(path, fmt == "nifti.gz"):
        raise InputError(f"{name} contains NaN or infinite values; save it with finite numbers only.")
    return fmt


MAX_NRRD_HEADER_BYTES = 1 << 20
_NRRD_DATA_FILE_FIELDS = ("data file", "datafile")


def _refuse_detached_nrrd(path: Path, name: str) -> None:
    """Refuse a NRRD whose pixels live in another file (its ``data file:`` field).

    ITK would open whatever path that field names, absolute or relative, so an uploaded header
    could make the engine read any file the server can read and return it as pixels. Only
    NRRDs that carry their own data (Slicer's .nrrd and .seg.nrrd) are accepted.
    """
    with open(path, "rb") as handle:
        raw = handle.read(MAX_NRRD_HEADER_BYTES + 1)
    header = raw.replace(b"\r", b"")
    end = header.find(b"\n\n")
    if end < 0 and len(raw) > MAX_NRRD_HEADER_BYTES:
        raise InputError(f"{name} has a NRRD header longer than {MAX_NRRD_HEADER_BYTES >> 20} MiB; it is not a valid image.")
    lines = header[: end if end >= 0 else len(header)].split(b"\n")
    for line in lines[1:]:
        if line.startswith(b"#"):
            continue
        field = " ".join(line.split(b":", 1)[0].decode("latin-1").lower().split())
        if field in _NRRD_DATA_FILE_FIELDS:
            raise InputError(f"{name} is a NRRD header whose pixels are in a separate data file; save the image "
                             "as a single .nrrd file (data included).")


DEFLATED_TRANSFER_SYNTAX = "1.2.840.10008.1.2.1.99"


def _refuse_deflated_dicom(path: Path, name: str) -> None:
    """Refuse Deflated Explicit VR Little Endian, from the file meta alone (read without inflating).

    Reading any of its header inflates the whole data set in memory, and a 2 MB upload can inflate to
    gigabytes. No modality writes it for radiographs or SEGs; the usual transfer syntaxes are read.
    """
    from pydicom.filereader import read_file_meta_info

    try:
        syntax = str(read_file_meta_info(path).get("TransferSyntaxUID", "") or "")
    except Exception:  # noqa: BLE001 - an unreadable meta header is refused by the reader, with the reason
        return
    if syntax == DEFLATED_TRANSFER_SYNTAX:
        raise InputError(f"{name} uses the Deflated transfer syntax, which the engine does not read; save it "
                         "uncompressed, or as JPEG, JPEG 2000 or RLE.")


# NIfTI-1: the header is 348 bytes; extensions may follow before the voxels (vox_offset). More than this
# before the voxels is no image anyone wrote, and would have to be decompressed to reach them.
MAX_NIFTI_VOXEL_OFFSET = 1 << 20


def _nifti_layout(header: bytes) -> tuple[str, float]:
    """(byte order for struct, vox_offset) of a NIfTI-1 header (struct.error if it is too short)."""
    endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
    return endian, struct.unpack(endian + "f", header[108:112])[0]


def _refuse_far_nifti_voxels(path: Path, name: str, compressed: bool) -> None:
    try:
        with (gzip.open if compressed else open)(path, "rb") as handle:
            _endian, offset = _nifti_layout(handle.read(348))
    except (OSError, EOFError, zlib.error, struct.error):
        return  # unreadable: the reader refuses it with its own reason
    if not 0 <= offset <= MAX_NIFTI_VOXEL_OFFSET:  # also NaN
        raise InputError(f"{name} is a NIfTI file whose header puts its voxels {offset:g} bytes in; it is not a "
                         "valid image.")


# NIfTI-1 datatype codes of floating-point voxels -> numpy dtype.
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def nifti_has_non_finite(path: Path, compressed: bool) -> bool:
    """True if a float NIfTI-1 file holds NaN or infinity, read from the raw voxels a chunk at a time.

    SimpleITK reads NaN voxels of a .nii as 0, so a reader cannot see them once decoded.
    Reads at most the voxels the header announces (call it after the size check).
    """
    import numpy as np

    try:
        with (gzip.open if compressed else open)(path, "rb") as handle:
            header = handle.read(348)
            endian, offset = _nifti_layout(header)
            rank, *dims = struct.unpack(endian + "8h", header[40:56])
            datatype = struct.unpack(endian + "h", header[70:72])[0]
            if datatype not in _NIFTI_FLOAT_TYPES or not 1 <= rank <= 7:
                return False
            dtype = np.dtype(endian + _NIFTI_FLOAT_TYPES[datatype])
            remaining = dtype.itemsize * int(np.prod([max(1, d) for d in dims[:rank]], dtype=np.int64))
            skip = int(offset) - 348  # up to vox_offset
            while skip > 0 and (gap := handle.read(min(skip, 1 << 20))):
                skip -= len(gap)
            while remaining > 0 and (chunk := handle.read(min(remaining, dtype.itemsize << 18))):
                remaining -= len(chunk)
                values = np.frombuffer(chunk[: len(chunk) - len(chunk) % dtype.itemsize], dtype)
                if not np.isfinite(values).all():
                    return True
    except (OSError, EOFError, zlib.error, struct.error, ValueError):
        return False  # unreadable: the reader refuses it with its own reason
    return False
