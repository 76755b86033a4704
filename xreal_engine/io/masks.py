"""Reading and validating the anatomy label map and the pathology masks.

Formats: PNG (8/16-bit label values; 0/255 or 0/1 binary masks for pathology), NRRD and
NIfTI (2D, or 3D with one slice), Slicer ``.seg.nrrd`` (segments mapped to anatomy
labels by terminology first, by name second) and DICOM-SEG (read with highdicom).

Pixels are used in file order: numpy row = image row, column = image column, as
Slicer writes a 2D canvas (``ijkToRAS = diag(-sx, -sy, 1, 1)``). Orientation
matrices are not applied, so a mask always stays on the grid of the image it was
drawn on. Every refusal is an ``InputError`` naming the file and the problem.

Why this file is long: the five mask formats share one validation path (labels, size, body region) and
the resampling to the model grid that every mask goes through; split the resampling out when it grows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import vocabulary
from ..errors import InputError, shown
from .formats import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, check_image_header

MAX_ASPECT = 2.0
BODY_MARGIN_FRACTION = 0.05  # the body is the union of organs dilated by 5 % of the image side
ANATOMY_LABELS = (1, 2, 3, 4)


@dataclass
class Pathology:
    """One pathology region (bool mask on the input grid) and the finding to put there."""

    mask: np.ndarray
    finding: str
    name: str


@dataclass
class MaskSet:
    """Validated inputs on the input grid; ``pixel_spacing_mm`` is (row, column)."""

    anatomy: np.ndarray
    pathologies: list[Pathology]
    pixel_spacing_mm: tuple[float, float]
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Segment:
    """A segment read from a .seg.nrrd or DICOM-SEG: its mask, display name and (optional) codes."""

    mask: np.ndarray
    name: str
    category: dict | None = None
    type: dict | None = None
    type_modifier: dict | None = None


# ----------------------------------------------------------------------------- reading


def to_2d(array: np.ndarray, name: str, what: str = "mask") -> np.ndarray:
    """Drop a single slice axis; refuse real volumes (``what`` names the expected input in the message)."""
    if array.ndim == 3:
        if array.shape[0] != 1:
            raise InputError(f"{name} is a 3D volume with {array.shape[0]} slices; give a single 2D {what}.")
        array = array[0]
    if array.ndim != 2:
        raise InputError(f"{name} has {array.ndim} dimensions; a {what} must be a 2D image.")
    return array


def _spacing_row_col(image: sitk.Image) -> tuple[float, float]:
    spacing = image.GetSpacing()
    return float(spacing[1]), float(spacing[0])


def _read_itk(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(
            f"{path.name} is not a readable mask (expected PNG, NRRD, NIfTI, Slicer .seg.nrrd or DICOM-SEG)."
        ) from None


def _parse_code(text: str) -> dict | None:
    """Slicer's ``scheme^value^meaning``; empty parts mean no code."""
    parts = text.split("^")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        return None
    return {"scheme": parts[0], "value": parts[1], "meaning": parts[2] if len(parts) > 2 else ""}


def _parse_terminology(tags: str) -> tuple[dict | None, dict | None, dict | None]:
    """(category, type, type modifier) from a Slicer segment's ``Tags`` (``TerminologyEntry:ctx~cat~type~mod~...``)."""
    for tag in tags.split("|"):
        key, _, value = tag.partition(":")
        if key == "TerminologyEntry":
            fields = value.split("~")
            if len(fields) >= 4:
                return _parse_code(fields[1]), _parse_code(fields[2]), _parse_code(fields[3])
    return None, None, None


def _read_seg_nrrd(path: Path, image: sitk.Image) -> list[_Segment]:
    """Segments of a Slicer ``.seg.nrrd`` (one or several layers, each segment a label value in its layer)."""
    keys = set(image.GetMetaDataKeys())
    offset = image.GetMetaData("Segmentation_ReferenceImageExtentOffset") if "Segmentation_ReferenceImageExtentOffset" in keys else "0 0 0"
    if any(int(v) != 0 for v in offset.split()):
        raise InputError(
            f"{path.name} was saved cropped to its segments (extent offset {offset}); save it with the reference image geometry."
        )
    layers = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() == 1:
        layers = layers[..., np.newaxis]
    segments = []
    index = 0
    while f"Segment{index}_ID" in keys:
        prefix = f"Segment{index}_"
        name = image.GetMetaData(prefix + "Name") if prefix + "Name" in keys else f"Segment_{index}"
        layer = int(image.GetMetaData(prefix + "Layer")) if prefix + "Layer" in keys else 0
        label_value = int(image.GetMetaData(prefix + "LabelValue")) if prefix + "LabelValue" in keys else 1
        tags = image.GetMetaData(prefix + "Tags") if prefix + "Tags" in keys else ""
        category, type_, modifier = _parse_terminology(tags)
        mask = to_2d(layers[..., layer] == label_value, path.name)
        segments.append(_Segment(mask=mask, name=name, category=category, type=type_, type_modifier=modifier))
        index += 1
    if not segments:
        raise InputError(f"{path.name} is a segmentation file without any segment.")
    return segments


def _code_dict(code) -> dict:
    return {"scheme": str(code.scheme_designator), "value": str(code.value), "meaning": str(code.meaning)}


# Segmentation Storage and Label Map Segmentation Storage (highdicom reads both).
SEGMENTATION_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")


def _add_missing_slice_thickness(dataset) -> None:
    """Pixel Measures without Slice Thickness are valid for a 2D plane (the attribute is Type 1C, for volumes),
    but highdicom's reader requires it: a placeholder (never used for one plane) lets it decode the frames."""
    groups = [*dataset.get("SharedFunctionalGroupsSequence", []), *dataset.get("PerFrameFunctionalGroupsSequence", [])]
    for group in groups:
        for measures in group.get("PixelMeasuresSequence", []):
            if "SliceThickness" not in measures:
                measures.SliceThickness = 1.0


def _read_dicom_seg(path: Path) -> tuple[list[_Segment], tuple[float, float] | None]:
    """Segments of a single-plane DICOM-SEG (any segmentation type), with its pixel spacing."""
    import highdicom as hd
    import pydicom

    try:
        dataset = pydicom.dcmread(path)
    except Exception:
        raise InputError(f"{path.name} is a corrupt DICOM file that cannot be read.") from None
    sop_class, give = dataset.get("SOPClassUID"), "give the masks as a DICOM-SEG, PNG, NRRD or NIfTI."
    if sop_class not in SEGMENTATION_SOP_CLASSES:
        raise InputError(f"{path.name} is a DICOM image, not a DICOM Segmentation "
                         f"({shown(getattr(sop_class, 'name', sop_class), 80)}); {give}" if sop_class else
                         f"{path.name} is a corrupt or incomplete DICOM file (it has no SOP Class UID); {give}")
    _add_missing_slice_thickness(dataset)
    try:
        seg = hd.seg.Segmentation.from_dataset(dataset, copy=False)
        instances = [sop for _, _, sop in seg.get_source_image_uids()]
        if len(instances) == 1:
            # One plane: where it lies does not matter, so frames that do not state that spatial locations
            # are preserved (dcmqi, and so Slicer's DICOM-SEG export, leaves the flag out) are read too.
            stack = seg.get_pixels_by_source_instance(instances, combine_segments=False, ignore_spatial_locations=True)
        else:
            stack = seg.get_volume(combine_segments=False).array
    except Exception as error:
        raise InputError(f"{path.name}: the DICOM-SEG cannot be decoded as a single 2D plane ({type(error).__name__}).") from None
    if stack.shape[0] != 1:
        raise InputError(f"{path.name} is a 3D segmentation with {stack.shape[0]} planes; give a single 2D one.")
    segments = []
    for position, number in enumerate(seg.segment_numbers):
        description = seg.get_segment_description(number)
        type_item = description.SegmentedPropertyTypeCodeSequence[0]
        modifier = None
        if "SegmentedPropertyTypeModifierCodeSequence" in type_item:
            item = type_item.SegmentedPropertyTypeModifierCodeSequence[0]
            modifier = {"scheme": item.CodingSchemeDesignator, "value": item.CodeValue, "meaning": item.CodeMeaning}
        segments.append(
            _Segment(
                mask=np.asarray(stack[0, ..., position]) > 0.5,  # binary 0/1, or fractional rescaled to [0, 1]
                name=str(description.SegmentLabel),
                category=_code_dict(description.segmented_property_category),
                type=_code_dict(description.segmented_property_type),
                type_modifier=modifier,
            )
        )
    spacing = None
    try:
        measures = dataset.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        spacing = (float(measures[0]), float(measures[1]))
    except (AttributeError, IndexError, KeyError):
        pass
    return segments, spacing


def _read_source(path: Path) -> tuple[np.ndarray | None, list[_Segment] | None, tuple[float, float] | None]:
    """(plain array, or segments; spacing or None) of any supported mask file."""
    fmt = check_image_header(path)
    if fmt == "dicom":
        segments, spacing = _read_dicom_seg(path)
        return None, segments, spacing
    if fmt == "png":
        return _read_png(path), None, None  # PNG records no spacing
    image = _read_itk(path)
    spacing = _spacing_row_col(image)
    if path.name.lower().endswith(".seg.nrrd") or "Segment0_ID" in image.GetMetaDataKeys():
        return None, _read_seg_nrrd(path, image), spacing
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path.name} is a colour (RGB) image; save masks as single-channel label images.")
    array = to_2d(sitk.GetArrayFromImage(image), path.name)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise InputError(f"{path.name} contains NaN or infinite values; masks must hold integer labels.")
        if not np.all(array == np.round(array)):
            raise InputError(f"{path.name} holds non-integer values; masks must hold integer labels.")
    return array, None, spacing


def _read_png(path: Path) -> np.ndarray:
    """PNG through Pillow, so that palette PNGs give their indices (the labels), not expanded colours."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise InputError(f"{path.name} is a colour ({mode}) image; save masks as single-channel label images.")
            return np.asarray(image)
    except Image.DecompressionBombError:
        raise InputError(f"{path.name} announces an image too large to decode (at most {MAX_IMAGE_SIDE} per side).") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError(
            f"{path.name} is not a readable mask (expected PNG, NRRD, NIfTI, Slicer .seg.nrrd or DICOM-SEG)."
        ) from None


def _check_size(shape: tuple[int, int], name: str) -> None:
    rows, cols = shape
    if min(rows, cols) < MIN_IMAGE_SIDE or max(rows, cols) > MAX_IMAGE_SIDE:
        raise InputError(f"{name} is {cols}x{rows} pixels, which cannot be a chest image (each side must be {MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE}).")
    if max(rows, cols) > MAX_ASPECT * min(rows, cols):
        raise InputError(f"{name} is {cols}x{rows} pixels, an aspect ratio beyond 1:2, which cannot be a chest image.")


def _segment_anatomy_label(segment: _Segment) -> int | None:
    """Anatomy label of a segment: by terminology codes first, by name second."""
    if segment.type is not None:
        label = vocabulary.anatomy_label_for_codes(segment.category, segment.type, segment.type_modifier)
        if label is not None:
            return label
    return vocabulary.anatomy_label_for_name(segment.name)


def _segment_is_finding(segment: _Segment) -> bool:
    if segment.type is not None and vocabulary.finding_for_codes(segment.type):
        return True
    try:
        vocabulary.finding_entry(segment.name)
        return True
    except InputError:
        return False


def _labels_from_segments(segments: list[_Segment], name: str, warnings: list[str]) -> np.ndarray:
    """Exclusive label map, painted in label order (heart over lungs, aorta over heart) as in the training data."""
    labelled = []
    for segment in segments:
        label = _segment_anatomy_label(segment)
        if label is None:
            if _segment_is_finding(segment):
                warnings.append(f"Segment '{shown(segment.name)}' in {name} is a finding, not anatomy; it was ignored for the anatomy map.")
                continue
            known = ", ".join(e["name"] for e in vocabulary.load_vocabulary()["anatomy"])
            raise InputError(f"Segment '{shown(segment.name)}' in {name} is not an anatomy structure the engine knows ({known}).")
        labelled.append((label, segment.mask))
    if not labelled:
        raise InputError(f"{name} has no anatomy segment (left lung, right lung, heart or aorta).")
    anatomy = np.zeros(labelled[0][1].shape, dtype=np.uint8)
    for label, mask in sorted(labelled, key=lambda item: item[0]):
        anatomy[mask] = label
    return anatomy


def _read_anatomy(path: Path, warnings: list[str]) -> tuple[np.ndarray, tuple[float, float] | None]:
    array, segments, spacing = _read_source(path)
    if segments is not None:
        return _labels_from_segments(segments, path.name, warnings), spacing
    if array.min() < 0 or array.max() > 255:
        raise InputError(f"{path.name} holds label values outside 0..255 (min {array.min()}, max {array.max()}); it is not a label map.")
    return array.astype(np.uint8), spacing


def read_pathology_mask(path) -> np.ndarray:
    """A binary region (bool): any non-zero pixel; for a segmentation, its single segment or the union of its segments.

    Also usable on its own, e.g. for an edit-mode region drawn on a real X-ray without an anatomy map.
    """
    path = Path(path)
    array, segments, _ = _read_source(path)
    if segments is not None:
        union = np.zeros(segments[0].mask.shape, dtype=bool)
        for segment in segments:
            union |= segment.mask
        return union
    return array != 0


# ----------------------------------------------------------------------------- validation


def _body_region(anatomy: np.ndarray) -> np.ndarray:
    """Union of lungs/heart/aorta dilated a little: a pathology must touch it."""
    organs = np.isin(anatomy, ANATOMY_LABELS).astype(np.uint8)
    radius = max(1, int(round(BODY_MARGIN_FRACTION * max(anatomy.shape))))
    dilated = sitk.BinaryDilate(sitk.GetImageFromArray(organs), [radius, radius], sitk.sitkBall)
    return sitk.GetArrayFromImage(dilated).astype(bool)


def _finding_display_name(finding: str) -> str:
    if finding == "":
        return "removed finding"
    try:
        return vocabulary.finding_entry(finding)["display_name"]
    except InputError:
        return finding


def load_masks(
    anatomy_path,
    pathologies,
    *,
    known_labels: set[int],
    label_warnings: dict[int, str] | None = None,
    default_field_of_view_mm: float = 400.0,
) -> MaskSet:
    """Read and validate the anatomy map and the (mask path, finding) pairs; raise InputError on the first problem.

    ``known_labels``: the label values the model knows (0 is always allowed).
    ``label_warnings``: labels that are accepted but earn a warning (e.g. aorta for a model trained without it).
    Findings are taken as given: the model's policy (``model.info.canonical_finding``) checks them.
    Pixel spacing comes from the anatomy file when it records one (NRRD, NIfTI, DICOM-SEG),
    else ``default_field_of_view_mm`` divided by the image size.
    """
    anatomy_path = Path(anatomy_path)
    name = anatomy_path.name
    warnings: list[str] = []
    anatomy, spacing = _read_anatomy(anatomy_path, warnings)
    _check_size(anatomy.shape, name)

    present = {int(v) for v in np.unique(anatomy)} - {0}
    if not present:
        raise InputError(f"{name} is empty: it has no anatomy label (all pixels are 0).")
    unknown = sorted(present - {int(k) for k in known_labels})
    if unknown:
        allowed = ", ".join(str(v) for v in sorted(int(k) for k in known_labels))
        raise InputError(f"{name} contains label values {unknown} that the model does not know (it knows {allowed}).")
    for label in sorted(present):
        if label_warnings and label in label_warnings:
            warnings.append(label_warnings[label])

    if spacing is None or not all(s > 0 for s in spacing):
        spacing = (default_field_of_view_mm / anatomy.shape[0], default_field_of_view_mm / anatomy.shape[1])

    body = None
    result: list[Pathology] = []
    for mask_path, finding in pathologies:
        mask_path = Path(mask_path)
        finding = "" if finding is None else str(finding)
        mask = read_pathology_mask(mask_path)
        if mask.shape != anatomy.shape:
            raise InputError(
                f"The pathology mask {mask_path.name} is {mask.shape[1]}x{mask.shape[0]} pixels but the anatomy "
                f"{name} is {anatomy.shape[1]}x{anatomy.shape[0]}; draw both on the same image."
            )
        if not mask.any():
            raise InputError(f"The pathology mask {mask_path.name} is empty; draw the region where the finding should appear.")
        if body is None:
            body = _body_region(anatomy)
        if not (mask & body).any():
            raise InputError(f"The pathology mask {mask_path.name} lies entirely outside the body (lungs, heart, aorta); draw it inside the chest.")
        result.append(Pathology(mask=mask, finding=finding, name=_finding_display_name(finding)))
    return MaskSet(anatomy=anatomy, pathologies=result, pixel_spacing_mm=(float(spacing[0]), float(spacing[1])), warnings=warnings)


# ----------------------------------------------------------------------------- resampling


def resample_to_grid(array, shape, kind: str) -> np.ndarray:
    """Resample a 2D array onto a ``shape`` grid covering the same field of view (pixel edges aligned).

    ``kind``: "labels" or "mask" use nearest neighbour (values never mix); "image" uses
    linear interpolation, after a Gaussian anti-alias filter when shrinking.
    The output keeps the input dtype for labels/masks and is float32 for images.
    """
    if kind not in ("labels", "mask", "image"):
        raise ValueError(f"kind must be 'labels', 'mask' or 'image', not {kind!r}")
    source = np.asarray(array)
    if source.ndim != 2:
        raise InputError(f"Only 2D arrays can be resampled, got shape {source.shape}.")
    rows, cols = int(shape[0]), int(shape[1])
    if source.shape == (rows, cols):
        return source.astype(np.float32) if kind == "image" else source.copy()
    out_dtype = source.dtype
    if kind == "image":
        image = sitk.GetImageFromArray(source.astype(np.float32))
        factors = (source.shape[1] / cols, source.shape[0] / rows)  # (x, y)
        sigmas = [0.5 * np.sqrt(f * f - 1.0) if f > 1.0 else 0.0 for f in factors]
        if any(s > 0 for s in sigmas):
            image = sitk.SmoothingRecursiveGaussian(image, [max(s, 1e-3) for s in sigmas])
        interpolator = sitk.sitkLinear
    else:
        work_dtype = np.uint8 if source.dtype == bool else source.dtype
        image = sitk.GetImageFromArray(source.astype(work_dtype))
        interpolator = sitk.sitkNearestNeighbor
    # Input pixels are 1 unit apart with centres at 0..n-1; output pixels cover the same extent.
    spacing = (source.shape[1] / cols, source.shape[0] / rows)
    origin = ((spacing[0] - 1.0) / 2.0, (spacing[1] - 1.0) / 2.0)
    resampled = sitk.Resample(
        image, [cols, rows], sitk.Transform(), interpolator, origin, spacing, image.GetDirection(), 0, image.GetPixelID()
    )
    result = sitk.GetArrayFromImage(resampled)
    if kind == "image":
        return result.astype(np.float32)
    return result.astype(out_dtype)
