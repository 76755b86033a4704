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
"""

from __future__ import annotations

import datetime as _dt
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import __version__
from .cli import add_request_arguments, check_request_arguments
from .errors import InputError, ModelError, XRealError
from .files import check_new_directory, staged_directory

ProgressFn = Callable[[str, int, int], None]

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
    num_inference_steps: Optional[int] = None  # None = the model's default
    anatomy_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    eta: Optional[float] = None
    soft_mask_value: Optional[float] = None


@dataclass
class PreparedRequest:
    """A request whose inputs were read and validated; ready for the model."""

    request: GenerationRequest
    anatomy: Optional[np.ndarray]  # (rows, cols) uint8 labels on the input grid, None in edit mode without anatomy
    pathologies: list  # [masks.Pathology] on the input grid
    pixel_spacing_mm: tuple
    source_pixels: Optional[np.ndarray]  # edit mode: (rows, cols) float32 in [0, 1]
    source_dataset: object  # edit mode from DICOM: the source pydicom Dataset (patient/study are reused)
    parameters: dict  # resolved sampling parameters
    warnings: list

    @property
    def shape(self) -> tuple:
        if self.source_pixels is not None:
            return tuple(self.source_pixels.shape)
        return tuple(self.anatomy.shape)

    @property
    def edit_mode(self) -> bool:
        return self.source_pixels is not None


# ----------------------------------------------------------------------------- parameters

PARAMETER_LIMITS = {
    "num_inference_steps": (1, 1000),
    "anatomy_steps": (0, 1000),
    "guidance_scale": (0.0, 50.0),
    "eta": (0.0, 1.0),
    "soft_mask_value": (0.0, 1.0),
    "seed": (0, 2**32 - 1),
}


def resolve_parameters(request: GenerationRequest, model_info) -> dict:
    """Fill unset parameters from the model's defaults and check every range."""
    defaults = dict(model_info.defaults)
    parameters = {"seed": request.seed}
    for name in ("num_inference_steps", "anatomy_steps", "guidance_scale", "eta", "soft_mask_value"):
        value = getattr(request, name)
        parameters[name] = defaults[name] if value is None else value
    for name, (low, high) in PARAMETER_LIMITS.items():
        value = parameters[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise InputError(f"The parameter {name} must be a number; got {value!r}.")
        if not low <= value <= high:
            raise InputError(f"The parameter {name} must be between {low} and {high}; got {value}.")
    for name in ("num_inference_steps", "anatomy_steps", "seed"):
        if float(parameters[name]) != int(parameters[name]):
            raise InputError(f"The parameter {name} must be a whole number; got {parameters[name]}.")
        parameters[name] = int(parameters[name])
    if parameters["anatomy_steps"] > parameters["num_inference_steps"]:
        raise InputError(
            f"Anatomy steps ({parameters['anatomy_steps']}) cannot exceed the number of steps "
            f"({parameters['num_inference_steps']})."
        )
    return parameters


# ----------------------------------------------------------------------------- inputs


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_source_image(path: Path):
    """Read the X-ray to edit: (pixels float32 [0,1], pixel spacing or None, pydicom dataset or None)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"The image file {path.name} does not exist.")
    if _is_dicom(path):
        from .dicom import read_xray

        xray = read_xray(path)
        return xray.pixels.astype(np.float32), tuple(xray.pixel_spacing_mm), xray.dataset
    if path.suffix.lower() == ".png":
        return _read_png_xray(path), None, None
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"The image file {path.name} is not a readable image (PNG, NRRD, NIfTI or DICOM).") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"The image file {path.name} is a colour image; give a grayscale X-ray.")
    from .masks import to_2d

    array = to_2d(sitk.GetArrayFromImage(image), f"The image file {path.name}", what="X-ray")
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
    except (UnidentifiedImageError, OSError):
        raise InputError(f"The image file {path.name} is not a readable PNG.") from None
    if array.ndim == 3:
        colour = array[..., :3].astype(np.int32)
        if np.any(colour != colour[..., :1]):
            raise InputError(f"The image file {path.name} is a colour image; give a grayscale X-ray.")
        array = array[..., 0]
    return _to_unit_range(array)


def prepare_request(request: GenerationRequest, model_info) -> PreparedRequest:
    """Read and validate every input of ``request`` against ``model_info``; raise InputError if unusable."""
    from . import masks as mask_io

    parameters = resolve_parameters(request, model_info)
    known_findings = list(model_info.findings)
    for _, finding in request.pathologies:
        _check_finding(finding, known_findings, edit_mode=request.image_path is not None)

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
            mask_io.Pathology(mask=_read_edit_region(Path(path), source_pixels.shape), finding=finding, name=finding or "removed finding")
            for path, finding in request.pathologies
        ]
        warnings = []
        spacing = source_spacing or (fov / source_pixels.shape[0], fov / source_pixels.shape[1])
    else:
        mask_set = mask_io.load_masks(
            Path(request.anatomy_path),
            [(Path(path), finding) for path, finding in request.pathologies],
            known_labels={int(label) for label in model_info.anatomy_labels},
            label_warnings={int(k): v for k, v in (model_info.label_warnings or {}).items()},
            known_findings=known_findings + [""],
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
    return PreparedRequest(
        request=request,
        anatomy=anatomy,
        pathologies=pathologies,
        pixel_spacing_mm=tuple(float(s) for s in spacing),
        source_pixels=source_pixels,
        source_dataset=source_dataset,
        parameters=parameters,
        warnings=warnings,
    )


def _check_finding(finding: str, known_findings: list, edit_mode: bool) -> None:
    if finding == "" and edit_mode:
        return  # edit mode: remove whatever is in the region
    if finding.lower() not in {f.lower() for f in known_findings}:
        known = ", ".join(known_findings) or "none"
        raise InputError(f"This model does not know the finding '{finding}'; it knows: {known}.")


def _read_edit_region(path: Path, shape: tuple) -> np.ndarray:
    """A pathology region for edit mode without an anatomy map: a binary mask on the image grid."""
    from .masks import read_pathology_mask

    region = read_pathology_mask(path)
    if region.shape != tuple(shape):
        raise InputError(
            f"The pathology mask {path.name} is {region.shape[1]}x{region.shape[0]} pixels but the image to edit is "
            f"{shape[1]}x{shape[0]}; draw the region on the image itself."
        )
    if not region.any():
        raise InputError(f"The pathology mask {path.name} is empty; draw the region to edit.")
    return region


# ----------------------------------------------------------------------------- model


def select_device(device: str = "auto", dtype: str = "auto"):
    """Map the CLI's ``--device`` / ``--dtype`` words to torch objects: CUDA + float16 when there, else CPU + float32."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was requested but no CUDA GPU is available; use --device cpu.")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError(f"Unknown device '{device}'; use auto, cpu or cuda.")
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        torch_dtype = torch.float16 if device.startswith("cuda") else torch.float32
    elif dtype in names:
        torch_dtype = names[dtype]
    else:
        raise InputError(f"Unknown dtype '{dtype}'; use auto, float32, float16 or bfloat16.")
    if device == "cpu" and torch_dtype == torch.float16:
        raise InputError("float16 is not supported on the CPU; use float32 or bfloat16.")
    return torch.device(device), torch_dtype


def load_pipeline(model: str = "demo", device: str = "auto", dtype: str = "auto"):
    """Load a model directory (or the shipped demo model) onto the chosen device."""
    from .models import resolve_model, weights_hash
    from .pipeline import XRealPipeline

    model_dir = resolve_model(model)
    torch_device, torch_dtype = select_device(device, dtype)
    try:
        pipe = XRealPipeline.from_pretrained(str(model_dir))
    except XRealError:
        raise
    except Exception as error:  # a broken directory: say which, not a traceback
        raise ModelError(f"The model at {model_dir} could not be loaded: {error}") from error
    pipe = pipe.to(torch_device, torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.weights_hash = weights_hash(model_dir)
    return pipe


# ----------------------------------------------------------------------------- the job


def generate_to_directory(pipe, prepared: PreparedRequest, out_dir: Path, progress: Optional[ProgressFn] = None) -> dict:
    """Run the model for ``prepared`` and write the result directory atomically; return the provenance."""
    import torch

    from . import dicom
    from .masks import resample_to_grid

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
    generator = torch.Generator(device=device.type if device.type != "cuda" else device).manual_seed(params["seed"])
    output = pipe(
        anatomy,
        pathologies=pathologies,
        image=image,
        num_inference_steps=params["num_inference_steps"],
        anatomy_steps=params["anatomy_steps"],
        eta=params["eta"],
        guidance_scale=params["guidance_scale"],
        soft_mask_value=params["soft_mask_value"],
        generator=generator,
        callback=progress,
    )
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
        "seed": params["seed"],
        "steps": params["num_inference_steps"],
        "anatomy_steps": params["anatomy_steps"],
        "guidance": params["guidance_scale"],
        "eta": params["eta"],
        "soft_mask_value": params["soft_mask_value"],
        "findings": findings,
        "device": str(device),
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "input_grid": {"rows": prepared.shape[0], "columns": prepared.shape[1], "pixel_spacing_mm": list(prepared.pixel_spacing_mm)},
        "model_grid": {"rows": size, "columns": size},
        "warnings": list(prepared.warnings),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }

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
    from .dicom import SegmentSpec

    specs = []
    if prepared.anatomy is not None:
        for label in sorted(int(v) for v in np.unique(prepared.anatomy) if v != 0):
            specs.append(SegmentSpec(mask=prepared.anatomy == label, label=label))
    for pathology in prepared.pathologies:
        if pathology.finding:
            specs.append(SegmentSpec(mask=pathology.mask.astype(bool), finding=pathology.finding))
        else:  # edit mode removed whatever was in this region
            specs.append(SegmentSpec(mask=pathology.mask.astype(bool), removal=True))
    return specs


def _write_preview(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), mode="L").save(path)


def _write_segments(out_dir: Path, segments: list) -> None:
    """Plain per-segment masks + segments.json, for Slicers that have no DICOM-SEG loader."""
    from PIL import Image

    (out_dir / "segments").mkdir()
    entries = []
    for number, spec in enumerate(segments, start=1):
        entry = spec.vocabulary_entry()
        name = entry["name"]
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


# ----------------------------------------------------------------------------- CLI


def configure_parser(parser) -> None:
    parser.add_argument("--model", default="demo", help="model directory, or 'demo' for the shipped demo model (default)")
    add_request_arguments(parser)
    parser.add_argument("--pacs-config", type=Path, help="PACS configuration file (see xreal-engine push --help)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, float32 on CPU), float32, float16, bfloat16")


def run(args) -> int:
    check_request_arguments(args)
    select_device(args.device, args.dtype)  # refuse a bad --device/--dtype before any work
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    out_dir = args.out
    check_new_directory(out_dir)

    pacs_config = None
    if args.source is not None or args.push_to is not None:
        from .pacs import load_config

        pacs_config = load_config(args.pacs_config)
        if args.push_to is not None:
            pacs_config.node(args.push_to, "destination")  # an unknown destination is refused before any work

    import tempfile

    with tempfile.TemporaryDirectory(prefix="xreal-source-") as fetch_dir:
        image_path = args.image
        if args.source is not None:
            from .pacs import fetch_source

            image_path = fetch_source(
                args.source, args.study, args.series, args.instance, dest_dir=Path(fetch_dir), config=pacs_config
            )
        request = GenerationRequest(
            anatomy_path=args.anatomy,
            pathologies=list(zip(args.pathology_mask, args.finding)),
            image_path=image_path,
            seed=seed,
            num_inference_steps=args.steps,
            anatomy_steps=args.anatomy_steps,
            guidance_scale=args.guidance,
            eta=args.eta,
        )
        from .models import ModelInfo, resolve_model

        model_info = ModelInfo.load(resolve_model(args.model))
        prepared = prepare_request(request, model_info)
        for warning in prepared.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"Loading model {model_info.model_id} ...", file=sys.stderr)
        pipe = load_pipeline(args.model, args.device, args.dtype)
        print(f"Generating on {pipe.device} (seed {seed}) ...", file=sys.stderr)
        with _ProgressBars() as progress:
            provenance = generate_to_directory(pipe, prepared, out_dir, progress=progress)
    print(f"Wrote {out_dir}/: sc.dcm, seg.dcm, preview.png, provenance.json, segments.json "
          f"({provenance['generation_seconds']:.1f} s)")
    if args.push_to is None:
        return 0
    from .pacs import format_report, push_result

    report = push_result(args.push_to, out_dir, config=pacs_config)  # the local result stays whatever happens
    print(format_report(report))
    return 0 if report["failed"] == 0 else 1


class _ProgressBars:
    """One tqdm bar per pipeline stage, on stderr."""

    def __init__(self):
        self._bar = None
        self._stage = None

    def __call__(self, stage: str, step: int, total: int) -> None:
        from tqdm import tqdm

        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = tqdm(total=total, desc=f"{stage:>10}", unit="step", file=sys.stderr, leave=True)
        self._bar.n = step
        self._bar.refresh()

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
