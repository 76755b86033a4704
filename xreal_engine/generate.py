"""One generation job: input files -> validated masks -> XReal pipeline -> result directory.

The CLI (``xreal-engine generate``) and the service's worker both run a job through
:func:`prepare_request` (reads and validates everything; no model needed, so the
service can refuse bad input before queueing) and :func:`generate_to_directory`
(runs the model and writes the result directory all at once or not at all).

Grids: the masks are drawn on an *input grid* (the anatomy file's, or the source
X-ray's in edit mode). The model works on its own square grid
(``model_info.image_size``); inputs are resampled to it and the generated image is
resampled back, so the DICOM pair lands on the same pixels and field of view the
user drew on. In edit mode the source pixels outside the (slightly widened)
pathology regions are kept as they were.

Controls (optional ControlNets, io/controls.py): each map is computed at the model's size in
``prepare_request`` (a source of another size is resampled and a warning says so); provenance
records each control's source file name, its sha256, its scale and the stages it steered, and the
SEG records the attention map's region (map >= 0.5) as a segment.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import __version__
from .errors import InputError, ModelError
from .files import check_new_directory, staged_directory
from .io.controls import check_requests, load_control
from .io.images import read_source_image
from .model.info import canonical_finding
from .model.sampling import SamplingParameters

ProgressFn = Callable[[str, int, int], None]
# (result on the input grid, requested anatomy labels) -> provenance['quality']; may raise to refuse the
# result before anything is written (the batch runner's anatomy check: batch/quality.py).
QualityFn = Callable[[np.ndarray, np.ndarray], dict]

# Edit mode: how far (in input pixels, relative to the image size) the generated
# region is blended into the untouched source around each pathology region.
EDIT_FEATHER_FRACTION = 0.01


@dataclass
class GenerationRequest:
    """What the user asked for, as files on disk (paths chosen by the caller, never by a remote client)."""

    anatomy_path: Optional[Path]
    pathologies: list = field(default_factory=list)  # [(mask path, finding)]
    image_path: Optional[Path] = None  # edit mode: the X-ray to edit (PNG / NRRD / NIfTI / DICOM)
    seed: int = 0
    # Sampling settings by public name (steps, anatomy_steps, guidance, eta, soft_mask_value, sampler, fast);
    # missing or None = the model's default. model/sampling.py, the one policy, resolves and checks them.
    sampling: dict = field(default_factory=dict)
    controls: list = field(default_factory=list)  # [io.controls.ControlRequest]: ControlNets to steer with


EDIT_KEEPS_ANATOMY = ("An edit keeps the X-ray's own anatomy: the anatomy map places the regions and adds its "
                      "segments to seg.dcm, it does not change the image.")


@dataclass
class PreparedRequest:
    """A request whose inputs were read and validated; ready for the model."""

    request: GenerationRequest
    anatomy: Optional[np.ndarray]  # (rows, cols) uint8 labels on the input grid, None in edit mode without anatomy
    pathologies: list  # [masks.Pathology] on the input grid
    pixel_spacing_mm: tuple
    source_pixels: Optional[np.ndarray]  # edit mode: (rows, cols) float32 in [0, 1]
    source_dataset: object  # edit mode from DICOM: the source pydicom Dataset (patient/study are reused)
    parameters: SamplingParameters  # resolved and checked, seed included
    warnings: list
    controls: list = field(default_factory=list)  # [io.controls.LoadedControl], maps on the model grid, scales resolved

    @property
    def shape(self) -> tuple:
        if self.source_pixels is not None:
            return tuple(self.source_pixels.shape)
        return tuple(self.anatomy.shape)

    @property
    def edit_mode(self) -> bool:
        return self.source_pixels is not None


# ----------------------------------------------------------------------------- inputs


def prepare_request(request: GenerationRequest, model_info) -> PreparedRequest:
    """Read and validate every input of ``request`` against ``model_info``; raise InputError if unusable."""
    from .io import masks as mask_io

    parameters = SamplingParameters.from_public(model_info.defaults, {**request.sampling, "seed": request.seed})
    edit_mode = request.image_path is not None
    regions = [(Path(path), canonical_finding(finding, model_info.findings, removal_allowed=edit_mode))
               for path, finding in request.pathologies]

    source_pixels = source_dataset = None
    source_spacing = None
    if request.image_path is not None:
        source_pixels, source_spacing, source_dataset = read_source_image(Path(request.image_path))
        if not request.pathologies:
            raise InputError("Edit mode needs at least one pathology region to add or remove a finding in.")

    fov = float(getattr(model_info, "field_of_view_mm", 400.0) or 400.0)
    if request.anatomy_path is None:
        if source_pixels is None:
            raise InputError("An anatomy label map is required to generate an image.")
        anatomy = None
        pathologies = [
            mask_io.Pathology(mask=_read_edit_region(path, source_pixels.shape), finding=finding,
                              name=finding or "removed finding")
            for path, finding in regions
        ]
        warnings = []
        spacing = source_spacing or (fov / source_pixels.shape[0], fov / source_pixels.shape[1])
    else:
        mask_set = mask_io.load_masks(
            Path(request.anatomy_path),
            regions,
            known_labels=set(model_info.accepted_label_values()),
            label_warnings={int(k): v for k, v in (model_info.label_warnings or {}).items()},
            default_field_of_view_mm=fov,
        )
        anatomy, pathologies, warnings = mask_set.anatomy, list(mask_set.pathologies), list(mask_set.warnings)
        spacing = tuple(mask_set.pixel_spacing_mm)
        if source_pixels is not None:
            if tuple(source_pixels.shape) != tuple(anatomy.shape):
                raise InputError(
                    f"The anatomy mask is {anatomy.shape[1]}x{anatomy.shape[0]} pixels but the image to edit is "
                    f"{source_pixels.shape[1]}x{source_pixels.shape[0]}; draw the masks on the image itself."
                )
            spacing = source_spacing or spacing
            warnings.append(EDIT_KEEPS_ANATOMY)
    grid = tuple(source_pixels.shape) if source_pixels is not None else tuple(anatomy.shape)
    if grid[0] != grid[1]:
        warnings.append(f"The input is {grid[1]} x {grid[0]} pixels, not square; the model works on a square image, "
                        f"so the X-ray is made stretched to a square and resized back ({max(grid) / min(grid):.2f}x "
                        "along one axis); draw on a square canvas for an undistorted image.")
    if source_pixels is not None and source_spacing is None:
        warnings.append(f"The X-ray to edit records no pixel spacing; the results assume {spacing[0]:.4g} x "
                        f"{spacing[1]:.4g} mm per pixel (rows x columns), not a calibrated spacing.")
    controls = _prepare_controls(request, model_info, parameters, anatomy, grid, warnings)
    return PreparedRequest(
        request=request,
        anatomy=anatomy,
        pathologies=pathologies,
        pixel_spacing_mm=tuple(float(s) for s in spacing),
        source_pixels=source_pixels,
        source_dataset=source_dataset,
        parameters=parameters,
        warnings=warnings,
        controls=controls,
    )


def _prepare_controls(request: GenerationRequest, model_info, parameters, anatomy, input_shape, warnings) -> list:
    """Each control's map on the model grid with its scale resolved; names, scales and the model's ControlNets
    are checked before any file is read."""
    requests = check_requests(request.controls)
    scales = [model_info.controlnet_scale(control.name, control.scale) for control in requests]
    if requests and request.image_path is not None and parameters.control_stages == "anatomy":
        raise InputError("Editing an X-ray has no anatomy stage for the controls to steer; use control stages "
                         "'pathology' or 'both'.")
    if requests and not request.pathologies and parameters.control_stages == "pathology":
        raise InputError("Without a pathology region there is no pathology stage for the controls to steer; use "
                         "control stages 'anatomy' or 'both', or add a region.")
    loaded = []
    for control, scale in zip(requests, scales):
        result = load_control(control, size=int(model_info.image_size), input_shape=input_shape, labels=anatomy,
                              labels_path=request.anatomy_path)
        result.scale = scale
        warnings.extend(result.warnings)
        loaded.append(result)
    return loaded


def _read_edit_region(path: Path, shape: tuple) -> np.ndarray:
    """A pathology region for edit mode without an anatomy map: a binary mask on the image grid."""
    from .io.masks import read_pathology_mask

    region = read_pathology_mask(path)
    if region.shape != tuple(shape):
        raise InputError(
            f"The pathology mask {path.name} is {region.shape[1]}x{region.shape[0]} pixels but the image to edit is "
            f"{shape[1]}x{shape[0]}; draw the region on the image itself."
        )
    if not region.any():
        raise InputError(f"The pathology mask {path.name} is empty; draw the region to edit.")
    return region


# ----------------------------------------------------------------------------- the job


def generate_to_directory(pipe, prepared: PreparedRequest, out_dir: Path, progress: Optional[ProgressFn] = None,
                          quality: Optional[QualityFn] = None) -> dict:
    """Run the model for ``prepared`` and write the result directory atomically; return the provenance."""
    import torch

    from .io import dicom
    from .io.masks import resample_to_grid

    out_dir = Path(out_dir)
    check_new_directory(out_dir)
    info = pipe.model_info
    size = int(info.image_size)
    params = prepared.parameters
    started = time.time()

    model_grid = (size, size)
    anatomy = None
    if prepared.anatomy is not None:
        anatomy = resample_to_grid(prepared.anatomy, model_grid, "labels")
    pathologies = [
        (resample_to_grid(p.mask.astype(np.uint8), model_grid, "mask") > 0, p.finding) for p in prepared.pathologies
    ]
    image = None
    if prepared.edit_mode:
        image = np.clip(resample_to_grid(prepared.source_pixels, model_grid, "image"), 0.0, 1.0).astype(np.float32)

    device = pipe.device
    generator = torch.Generator(device=device).manual_seed(params.seed)
    from .model.controlnets import PreparedControl

    controls = [PreparedControl(c.name, torch.from_numpy(np.ascontiguousarray(c.map, dtype=np.float32)), c.scale)
                for c in prepared.controls]
    output = pipe(anatomy, pathologies=pathologies, image=image, parameters=params, generator=generator,
                  callback=progress, controls=controls)
    generated = np.asarray(output.image, dtype=np.float32)
    if not np.isfinite(generated).all():
        raise ModelError("The model produced invalid values (NaN or infinity); try another seed or float32.")

    result = np.clip(resample_to_grid(generated, prepared.shape, "image"), 0.0, 1.0).astype(np.float32)
    if prepared.edit_mode:
        result = _keep_source_outside_regions(prepared.source_pixels, result, [p.mask for p in prepared.pathologies])

    findings = [p.finding for p in prepared.pathologies]
    provenance = {
        "engine": "xreal-engine",
        "engine_version": __version__,
        "model_id": info.model_id,
        "weights_hash": getattr(pipe, "weights_hash", None),
        "mode": "edit" if prepared.edit_mode else "generate",
        **params.to_public(),  # seed, steps, anatomy_steps, guidance, eta, soft_mask_value
        "findings": findings,
        "inputs": _inputs_provenance(prepared.request),
        "controls": [_control_provenance(c, params, prepared.edit_mode) for c in prepared.controls],
        **({"source_image": _source_provenance(prepared)} if prepared.edit_mode else {}),
        "device": str(device),
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "unet_runtime": getattr(pipe, "unet_runtime", "eager"),  # eager, frozen (--freeze) or compiled (--compile)
        # The anatomy stage was an earlier job's, bit for bit (model/anatomy_cache.py: the service, batches).
        "anatomy_stage_reused": bool(getattr(output, "anatomy_stage_reused", False)),
        # CPU float32 sums in a thread-count-dependent order: 1 and 2 threads differ by up to 1 grey level.
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "input_grid": {"rows": prepared.shape[0], "columns": prepared.shape[1], "pixel_spacing_mm": list(prepared.pixel_spacing_mm)},
        "model_grid": {"rows": size, "columns": size},
        "warnings": list(prepared.warnings),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }

    if quality is not None and prepared.anatomy is not None:
        provenance["quality"] = quality(result, prepared.anatomy)
    segments = _segment_specs(prepared)
    with staged_directory(out_dir) as staging:
        provenance["generation_seconds"] = round(time.time() - started, 3)
        uids = dicom.write_dicom_pair(
            staging, result, prepared.pixel_spacing_mm, segments, provenance, source=prepared.source_dataset
        )
        provenance["dicom"] = uids
        _write_preview(staging / "preview.png", result)
        _write_segments(staging, segments)
        (staging / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance


def _inputs_provenance(request: GenerationRequest) -> dict:
    """The sha256 of the anatomy map and of each pathology mask (in the order of ``findings``): which files
    made the image, so a dataset can be checked against its inputs. Not their names (they may carry a
    patient's name)."""
    from .io.controls import file_sha256

    return {"anatomy_sha256": file_sha256(request.anatomy_path) if request.anatomy_path else None,
            "pathology_sha256": [file_sha256(Path(path)) for path, _ in request.pathologies]}


def _source_provenance(prepared: PreparedRequest) -> dict:
    """What provenance records of the edited X-ray: the file's sha256 and, for a DICOM, its SOP Instance UID
    (which the SC also references). Not its file name, which may carry a patient's name."""
    from .io.controls import file_sha256

    dataset = prepared.source_dataset
    return {"sha256": file_sha256(prepared.request.image_path),
            "sop_instance_uid": str(dataset.SOPInstanceUID) if dataset is not None and "SOPInstanceUID" in dataset
            else None}


def _control_provenance(control, params, edit_mode: bool) -> dict:
    """What provenance records of one control: its source (file name only), the file's sha256, scale and the
    stages it steered ("anatomy", "pathology" or "both"; an edit has no anatomy stage, so "both" is "pathology")."""
    stages = "pathology" if edit_mode and params.control_stages == "both" else params.control_stages
    return {"name": control.name, "source": control.source_name, "source_sha256": control.source_sha256,
            "scale": control.scale, "stages": stages}


def _keep_source_outside_regions(source: np.ndarray, generated: np.ndarray, regions: list) -> np.ndarray:
    """Edit mode: generated pixels inside the regions, the untouched source outside, a soft seam between."""
    import SimpleITK as sitk

    union = np.zeros(source.shape, dtype=np.uint8)
    for region in regions:
        union |= region.astype(np.uint8)
    feather = max(1.0, EDIT_FEATHER_FRACTION * max(source.shape))
    widened = sitk.BinaryDilate(sitk.GetImageFromArray(union), [int(round(feather))] * 2)
    blurred = sitk.SmoothingRecursiveGaussian(sitk.Cast(widened, sitk.sitkFloat32), feather / 2)
    alpha = np.clip(sitk.GetArrayFromImage(blurred), 0.0, 1.0)
    union = union.astype(bool)
    alpha[union] = 1.0
    return (alpha * generated + (1.0 - alpha) * source).astype(np.float32)


def _segment_specs(prepared: PreparedRequest) -> list:
    """One segment per anatomy structure present, then one per pathology region (in request order)."""
    from .io.dicom import SegmentSpec

    specs = []
    if prepared.anatomy is not None:
        for label in sorted(int(v) for v in np.unique(prepared.anatomy) if v != 0):
            specs.append(SegmentSpec(mask=prepared.anatomy == label, label=label))
    for pathology in prepared.pathologies:
        if pathology.finding:
            specs.append(SegmentSpec(mask=pathology.mask.astype(bool), finding=pathology.finding))
        else:  # edit mode removed whatever was in this region
            specs.append(SegmentSpec(mask=pathology.mask.astype(bool), removal=True))
    from .io.masks import resample_to_grid

    for control in prepared.controls:  # where the attention map is high, on the input grid
        if control.name == "attention":
            specs.append(SegmentSpec(mask=resample_to_grid(control.region().astype(np.uint8), prepared.shape, "mask") > 0,
                                     attention=True))
    return specs


def _write_preview(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), mode="L").save(path)


def _write_segments(out_dir: Path, segments: list) -> None:
    """Plain per-segment masks + segments.json, for Slicers that have no DICOM-SEG loader."""
    from PIL import Image

    from .io import dicom

    (out_dir / "segments").mkdir()
    entries = []
    names = dicom.segment_labels(segments, key="name")
    for number, (spec, name) in enumerate(zip(segments, names), start=1):
        entry = spec.vocabulary_entry()
        filename = f"segments/{number:02d}_{''.join(c if c.isalnum() else '_' for c in name.lower())}.png"
        Image.fromarray(spec.mask.astype(np.uint8) * 255, mode="L").save(out_dir / filename)
        entries.append(
            {
                "segment_number": number,
                "name": name,
                "kind": spec.kind,
                "label": spec.label,
                "finding": spec.finding,
                "color": entry.get("color"),
                "category": entry.get("category"),
                "type": entry.get("type"),
                "anatomic_region": entry.get("anatomic_region"),
                "file": filename,
            }
        )
    (out_dir / "segments.json").write_text(json.dumps({"segments": entries}, indent=2) + "\n")


