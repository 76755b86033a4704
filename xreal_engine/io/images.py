"""Reading the X-ray to edit (DICOM DX/CR/SC, PNG, NRRD, NIfTI) as float32 grey values in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from .formats import check_image_header
from .masks import to_2d


def read_source_image(path: Path):
    """Read the X-ray to edit: (pixels float32 [0,1], pixel spacing or None, pydicom dataset or None)."""
    path = Path(path)
    fmt = check_image_header(path, f"The image file {path.name}")
    if fmt == "dicom":
        from .dicom import read_xray

        xray = read_xray(path)
        spacing = tuple(xray.pixel_spacing_mm) if xray.spacing_from_file else None  # None: not recorded
        return xray.pixels.astype(np.float32), spacing, xray.dataset
    if fmt == "png":
        return _read_png_xray(path), None, None
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"The image file {path.name} is not a readable image (PNG, NRRD, NIfTI or DICOM).") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"The image file {path.name} is a colour image; give a grayscale X-ray.")
    array = to_2d(sitk.GetArrayFromImage(image), f"The image file {path.name}", what="X-ray")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(f"The image file {path.name} contains NaN or infinite values.")
    spacing = image.GetSpacing()
    return _to_unit_range(array), (float(spacing[1]), float(spacing[0])), None  # SimpleITK spacing is (x, y)


def _to_unit_range(array: np.ndarray) -> np.ndarray:
    """Grey values to float32 [0,1]: 8-bit levels kept exactly, other integer depths stretched to the range used."""
    if array.dtype == np.uint8:
        return (array / 255.0).astype(np.float32)
    if np.issubdtype(array.dtype, np.floating) and array.min() >= 0 and array.max() <= 1:
        return array.astype(np.float32)
    array = array.astype(np.float64)
    low, high = float(array.min()), float(array.max())
    return ((array - low) / (high - low) if high > low else np.zeros_like(array)).astype(np.float32)


def _read_png_xray(path: Path) -> np.ndarray:
    """A PNG X-ray as float32 [0,1]: 8-bit grey levels kept exactly, 16-bit stretched, grey RGB/palette accepted."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            if picture.mode in ("P", "LA", "PA"):
                picture = picture.convert("RGBA" if "A" in picture.mode else "RGB")
            array = np.asarray(picture)
    except Image.DecompressionBombError:
        raise InputError(f"The image file {path.name} announces an image too large to decode.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError(f"The image file {path.name} is not a readable PNG.") from None
    if array.ndim == 3:
        colour = array[..., :3].astype(np.int32)
        if np.any(colour != colour[..., :1]):
            raise InputError(f"The image file {path.name} is a colour image; give a grayscale X-ray.")
        array = array[..., 0]
    return _to_unit_range(array)
