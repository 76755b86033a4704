"""Slicer segments -> the engine's generation request (label map + pathology masks + files).

The GUI hands over one array per segment, exactly as
``slicer.util.arrayFromSegmentBinaryLabelmap(seg, segmentId, canvas)`` returns it
((1, rows, columns) on the canvas grid), so overlapping segments (a nodule inside
a lung) are kept: the anatomy becomes one exclusive label map, every pathology
keeps its own mask, the "Attention" segments become one attention region. The checks mirror the engine's so the user hears about a
problem before anything is uploaded; the engine still checks everything again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from xreal_engine.errors import InputError

from .vocabulary import ANATOMY, ATTENTION, PATHOLOGY, Vocabulary

REMOVE_FINDING = "no finding"  # vocabulary entry (SNOMED "Normal"): in edit mode, remove what is in the region


@dataclass
class SegmentInput:
    """One Slicer segment as the GUI reads it."""

    name: str
    array: np.ndarray  # (1, rows, columns) or (rows, columns), non-zero inside
    terminology: str = ""
    finding: Optional[str] = None  # chosen in the panel; overrides what the terminology says
    visible: bool = True  # hidden in the views: still sent (hiding is a display setting), but said so


@dataclass
class CanvasGeometry:
    """The canvas volume: numpy shape (slices, rows, columns) and Slicer spacing (column, row, slice) in mm."""

    shape: Tuple[int, ...]
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    name: str = "canvas"


@dataclass
class GenerationInputs:
    """Validated masks on the canvas grid, ready to be written for upload."""

    anatomy: Optional[np.ndarray]  # (rows, columns) uint8 labels; None in edit mode without anatomy
    pathologies: List[Tuple[np.ndarray, str, str]]  # (mask bool (rows, columns), finding, segment name)
    pixel_spacing_mm: Tuple[float, float]  # (row, column), as DICOM Pixel Spacing
    warnings: List[str] = field(default_factory=list)
    attention: Optional[np.ndarray] = None  # bool (rows, columns): the painted attention segments; None if none


@dataclass
class RequestFiles:
    """What is uploaded to the engine for one job."""

    anatomy_path: Optional[Path]
    pathologies: List[Tuple[Path, str]]  # (mask file, finding)
    image_path: Optional[Path] = None  # edit mode source
    parameters: Dict[str, object] = field(default_factory=dict)  # seed, steps, anatomy_steps, guidance, eta
    push_to: Optional[str] = None  # a PACS destination configured in the engine
    source: Optional[Dict[str, str]] = None  # edit an image the engine fetches: {"source", "study", "series", "instance"}
    controls: List[Tuple[str, Optional[Path], Optional[float]]] = field(default_factory=list)  # (name, file, scale)
    control_stages: Optional[str] = None  # where the controls steer (sent only with controls)


def canvas_rows_columns(canvas: CanvasGeometry) -> Tuple[int, int]:
    """(rows, columns) of a 2D canvas; InputError for anything that is not a single 2D image."""
    shape = tuple(int(s) for s in canvas.shape)
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3 and shape[0] == 1 and shape[1] > 1 and shape[2] > 1:
        return shape[1], shape[2]
    if len(shape) == 3 and shape[0] > 1:
        raise InputError(
            f"The canvas volume '{canvas.name}' has {shape[0]} slices; XReal works on a single 2D image, "
            "so create a blank canvas, load a template or pick a 2D X-ray."
        )
    raise InputError(f"The canvas volume '{canvas.name}' is not a 2D image (its shape is {shape}).")


def _segment_plane(segment: SegmentInput, rows: int, columns: int, canvas_name: str) -> np.ndarray:
    array = np.asarray(segment.array)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.shape != (rows, columns):
        raise InputError(
            f"The segment '{segment.name}' is on a grid of shape {tuple(np.asarray(segment.array).shape)}, not on the "
            f"{columns}x{rows} canvas '{canvas_name}'; read it with the canvas as reference volume."
        )
    return array != 0


def _note_if_hidden(segment: SegmentInput, mask: np.ndarray, warnings: List[str]) -> None:
    """A hidden segment that is sent: hiding is only a display setting in Slicer, so say it is used."""
    if not segment.visible and mask.any():
        warnings.append(f"The segment '{segment.name}' is hidden but painted, so it is used; delete it or erase it "
                        "to leave it out.")


def build_inputs(
    segments: Sequence[SegmentInput],
    canvas: CanvasGeometry,
    vocabulary: Vocabulary,
    model_labels: Sequence[int],
    model_findings: Sequence[str],
    edit_mode: bool = False,
) -> GenerationInputs:
    """Turn segments into the engine's inputs, or raise InputError with one sentence the user can act on."""
    rows, columns = canvas_rows_columns(canvas)
    known_labels = {int(label) for label in model_labels}
    known_findings = {f.lower(): f for f in model_findings}
    anatomy_masks: Dict[int, np.ndarray] = {}
    pathologies: List[Tuple[np.ndarray, str, str]] = []
    attention: Optional[np.ndarray] = None
    warnings: List[str] = []

    for segment in segments:
        mask = _segment_plane(segment, rows, columns, canvas.name)
        meaning = vocabulary.classify(segment.name, segment.terminology)
        if not mask.any() and (meaning is None or meaning.kind in (PATHOLOGY, ATTENTION)):
            # before any finding check: an unpainted segment (e.g. the new "Pathology" without a finding yet)
            # is nothing the engine would get, so it cannot stop Generate
            warnings.append(f"The segment '{segment.name}' is empty and was left out.")
            continue
        if meaning is not None and meaning.kind == ATTENTION:  # sent as the attention control (planning)
            _note_if_hidden(segment, mask, warnings)
            attention = mask if attention is None else (attention | mask)
            continue
        if segment.finding is not None and (meaning is None or meaning.kind == PATHOLOGY):
            chosen = segment.finding.strip()
            if not chosen:
                raise InputError(f"The pathology segment '{segment.name}' has no finding; choose one in the Finding list.")
            entry = vocabulary.finding_entry(chosen)
            finding = entry["name"] if entry else chosen
        elif meaning is None:
            raise InputError(
                f"The painted segment '{segment.name}' has no finding: select it in the segment list and choose "
                "its finding beside the list (or delete the segment)."
            )
        elif meaning.kind == ANATOMY:
            if meaning.label not in known_labels:
                if mask.any():
                    warnings.append(f"This model has no label for '{segment.name}'; that segment is ignored.")
                continue
            _note_if_hidden(segment, mask, warnings)
            previous = anatomy_masks.get(meaning.label)
            anatomy_masks[meaning.label] = mask if previous is None else (previous | mask)
            continue
        else:
            finding = meaning.finding or ""
        if finding.lower() == REMOVE_FINDING and finding.lower() not in known_findings:
            if not edit_mode:
                raise InputError(f"The segment '{segment.name}' is marked '{finding}', which removes a finding; "
                                 "that works only when editing an X-ray.")
            model_finding = ""  # edit mode: inpaint the region without a finding (the engine's removal)
        elif finding.lower() in known_findings:
            model_finding = known_findings[finding.lower()]
        else:
            known = ", ".join(model_findings) or "none"
            raise InputError(
                f"The finding '{finding}' of segment '{segment.name}' is not known to this model; it knows: {known}."
            )
        _note_if_hidden(segment, mask, warnings)
        pathologies.append((mask, model_finding, segment.name))

    anatomy = None
    if any(m.any() for m in anatomy_masks.values()):
        anatomy = np.zeros((rows, columns), dtype=np.uint8)
        for label in sorted(anatomy_masks):  # heart (3) over lungs, aorta (4) over heart
            anatomy[anatomy_masks[label]] = label
    elif not edit_mode:
        names = ", ".join(t.name for t in vocabulary.anatomy_templates(sorted(known_labels)))
        raise InputError(f"The anatomy is empty: paint at least one of {names} before generating.")
    if edit_mode and not pathologies:
        raise InputError("Editing an X-ray needs at least one painted pathology segment with a finding.")

    spacing = tuple(float(s) for s in canvas.spacing)
    return GenerationInputs(
        anatomy=anatomy,
        pathologies=pathologies,
        pixel_spacing_mm=(spacing[1], spacing[0]),
        warnings=warnings,
        attention=attention,
    )


def _write_image(array: np.ndarray, spacing_row_column: Tuple[float, float], path: Path) -> Path:
    """Write a 2D array as NRRD, keeping the pixel spacing (SimpleITK is bundled with Slicer)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing((float(spacing_row_column[1]), float(spacing_row_column[0])))
    sitk.WriteImage(image, str(path), True)
    return path


def write_request_files(
    inputs: GenerationInputs,
    out_dir: Path,
    parameters: Optional[Dict[str, object]] = None,
    edit_image: Optional[np.ndarray] = None,
    edit_image_file: Optional[Path] = None,
    controls: Sequence = (),
) -> RequestFiles:
    """Write the masks (and the edit-mode image, and the controls' images) as NRRD files with spacing into
    ``out_dir``. ``controls``: ``XRealSlicerLib.controls.PlannedControl`` of the run.

    ``edit_image_file`` (the source DICOM file, when the canvas came from the DICOM
    database) is preferred over ``edit_image`` pixels so the result joins the source's study.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    anatomy_path = None
    if inputs.anatomy is not None:
        anatomy_path = _write_image(inputs.anatomy.astype(np.uint8), inputs.pixel_spacing_mm, out_dir / "anatomy.nrrd")
    pathology_files = []
    for index, (mask, finding, _name) in enumerate(inputs.pathologies, start=1):
        path = _write_image(mask.astype(np.uint8), inputs.pixel_spacing_mm, out_dir / f"pathology_{index:02d}.nrrd")
        pathology_files.append((path, finding))
    image_path = None
    if edit_image_file is not None:
        image_path = Path(edit_image_file)
    elif edit_image is not None:
        image_path = _write_image(normalized_image(edit_image), inputs.pixel_spacing_mm, out_dir / "image.nrrd")
    written = [(control.name, _write_image(control.pixels, inputs.pixel_spacing_mm, out_dir / control.file_name),
                control.scale) for control in controls]
    return RequestFiles(anatomy_path, pathology_files, image_path, dict(parameters or {}), controls=written)


# ITU-R BT.601 luma weights: how an RGB (screenshot, PNG export) X-ray becomes one grey value per pixel.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def grey_pixels(pixels: np.ndarray) -> np.ndarray:
    """An RGB(A) image as Slicer's ``arrayFromVolume`` gives it for a vector volume, (slices, rows, columns,
    components), as grey (slices, rows, columns) float32; a scalar image is returned as it is.

    An RGB PNG X-ray loads as a vector volume, which cannot be a canvas: the module converts it with this.
    Alpha is ignored; two components (grey + alpha) keep the grey.
    """
    array = np.asarray(pixels)
    if array.ndim != 4:
        return array
    components = array.shape[-1]
    if components == 1 or components == 2:
        return array[..., 0].astype(np.float32)
    if components in (3, 4):
        rgb = array[..., :3].astype(np.float64)
        return (rgb @ np.asarray(LUMA_WEIGHTS)).astype(np.float32)
    raise InputError(f"The image has {components} components per pixel; only grey, RGB and RGBA can be converted.")


def normalized_image(pixels: np.ndarray, not_2d: str = "The image to edit must be a single 2D image; its shape is {}.",
                     blank: str = "The image to edit is blank (all pixels have the same value).") -> np.ndarray:
    """A 2D X-ray as float32 in [0, 1] (min-max), the form the engine edits and takes as a radiomics reference.

    ``not_2d`` (formatted with the shape) and ``blank`` are the sentences for the two refusals.
    """
    array = np.asarray(pixels, dtype=np.float64)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise InputError(not_2d.format(array.shape))
    low, high = float(array.min()), float(array.max())
    if not np.isfinite([low, high]).all() or high <= low:
        raise InputError(blank)
    return ((array - low) / (high - low)).astype(np.float32)


def blank_canvas(rows: int, columns: int, field_of_view_mm: float) -> Tuple[np.ndarray, Tuple[float, float, float]]:
    """A blank canvas at the model's geometry: pixels (1, rows, columns) and Slicer spacing (column, row, 1)."""
    spacing = float(field_of_view_mm) / float(max(rows, columns))
    return np.zeros((1, rows, columns), dtype=np.float32), (spacing, spacing, 1.0)


def canvas_ijk_to_ras(spacing: Sequence[float]) -> np.ndarray:
    """The canvas geometry shared with the engine's SC/SEG: identity LPS at origin 0, i.e. diag(-sx, -sy, 1, 1)."""
    return np.diag([-float(spacing[0]), -float(spacing[1]), float(spacing[2]) if len(spacing) > 2 else 1.0, 1.0])


def template_segments(label_map: np.ndarray) -> Dict[int, np.ndarray]:
    """Split a template label map (rows, columns) into one (1, rows, columns) mask per label present."""
    label_map = np.asarray(label_map)
    if label_map.ndim == 3 and label_map.shape[0] == 1:
        label_map = label_map[0]
    return {int(v): (label_map == v)[np.newaxis].astype(np.uint8) for v in np.unique(label_map) if v != 0}


def read_template(path: Path) -> Tuple[np.ndarray, Tuple[float, float]]:
    """Read an anatomy template label map (PNG/NRRD) -> (labels (rows, columns) uint8, spacing (row, column) or None)."""
    import SimpleITK as sitk

    path = Path(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"The template {path.name} is not a readable image.") from None
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() != 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise InputError(f"The template {path.name} is not a 2D label map.")
    spacing = image.GetSpacing()
    has_spacing = path.suffix.lower() != ".png"
    return array.astype(np.uint8), ((float(spacing[1]), float(spacing[0])) if has_spacing else None)
