"""Control maps for the optional ControlNets (RadGazeGen's Rad-CN and HVA-CN controls on the XReal model).

Every map is float32 in [0, 1] on the model's square grid (``size`` x ``size``), the image size the
ControlNets take (their conditioning embedding downsamples by 4 to the latent). One rule for each map:

- ``sobel``: Sobel gradient magnitude of a reference X-ray, stretched so its 99.5th percentile is 1.
- ``canny``: Canny edges (0/1) of a reference X-ray, Gaussian sigma ``CANNY_SIGMA_FRACTION`` of the side.
- ``texture``: a grey-level texture map, the local Shannon entropy (scikit-image ``rank.entropy``) of the
  8-bit reference in a disk of radius ``TEXTURE_RADIUS_FRACTION`` of the side, divided by its maximum of 8 bits.
  (RadGazeGen's "GL" map; pyradiomics' voxel maps have no Python 3.11 build, so they are not used.)
- ``lungs``: the lung mask (labels 1 and 2) of the anatomy label map.
- ``attention``: a visual-attention heatmap: gaze fixations (x, y, duration) placed on the image grid and
  blurred with a Gaussian of sigma ``ATTENTION_SIGMA_FRACTION`` of the image side, or a painted region
  blurred the same way; divided by its maximum.

Reference images are resampled to the model grid *before* filtering, so a map always has the scale the
ControlNet was trained at. The module needs numpy, scikit-image and SimpleITK only (no torch), so training
and the Slicer-free parts can import it. Every refusal is an ``InputError`` of one sentence. The names, the
scale range and the ``NAME[:PATH][:SCALE]`` syntax are the standard-library rules of ``control_spec.py``,
re-exported here.
"""

from __future__ import annotations

import csv
import hashlib
import io as _io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..control_spec import (  # noqa: F401  (re-exported: the interface of this module)
    CONTROL_NAMES,
    CONTROL_SCALE_RANGE,
    REFERENCE_CONTROLS,
    ControlRequest,
    check_name,
    check_request,
    check_requests,
    check_scale,
    parse_control,
)
from ..errors import InputError, shown

__all__ = [  # the names the training code, generate and the service use (control_spec's rules included)
    "ATTENTION_SIGMA_FRACTION", "CONTROL_NAMES", "CONTROL_SCALE_RANGE", "ControlRequest", "LoadedControl",
    "attention_from_fixations", "attention_from_region", "attention_sigma", "canny_map", "check_name",
    "check_request", "check_requests", "check_scale", "control_map", "file_sha256", "load_control", "lung_map",
    "parse_control", "read_fixations_csv", "sobel_map", "texture_map",
]

ATTENTION_SIGMA_FRACTION = 0.03  # Gaussian sigma of an attention map, as a fraction of the image side
CANNY_SIGMA_FRACTION = 1.0 / 128.0  # Canny's Gaussian sigma, as a fraction of the side (2 px at 256)
TEXTURE_RADIUS_FRACTION = 1.0 / 64.0  # local-entropy disk radius, as a fraction of the side (4 px at 256)
SOBEL_PERCENTILE = 99.5
ATTENTION_REGION_LEVEL = 0.5  # the attention region recorded in the SEG is where the map is at least this

FIXATION_SUFFIX = ".csv"
MAX_FIXATION_FILE_BYTES = 20 * 1024 * 1024
MAX_FIXATIONS = 100_000
FIXATION_COLUMNS = ("x", "y", "duration")
REFLACX_COLUMNS = ("average_x_position", "average_y_position", "timestamp_start_fixation", "timestamp_end_fixation")
CSV_LAYOUT = ("columns x,y,duration (pixels, seconds) or REFLACX's average_x_position, average_y_position, "
              "timestamp_start_fixation, timestamp_end_fixation")


@dataclass
class LoadedControl:
    """A control map ready for the model grid, with what provenance records of its source."""

    name: str
    map: np.ndarray  # float32 (size, size) in [0, 1]
    scale: Optional[float]
    source_name: Optional[str]  # file name only (never a server path)
    source_sha256: Optional[str]
    warnings: list = field(default_factory=list)

    def region(self) -> np.ndarray:
        """Where the map is high: the attention region the SEG records (on the model grid)."""
        return self.map >= ATTENTION_REGION_LEVEL


# ----------------------------------------------------------------------------- maps


def _resample(image: np.ndarray, size: int, kind: str = "image") -> np.ndarray:
    from .masks import resample_to_grid

    return resample_to_grid(image, (size, size), kind)


def _unit(image: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)


def sobel_map(image: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude, stretched so its ``SOBEL_PERCENTILE`` is 1 (flat image -> zeros)."""
    from skimage.filters import sobel

    magnitude = sobel(_unit(image))
    top = float(np.percentile(magnitude, SOBEL_PERCENTILE))
    if top <= 1e-8:
        return np.zeros(magnitude.shape, dtype=np.float32)
    return np.clip(magnitude / top, 0.0, 1.0).astype(np.float32)


def canny_map(image: np.ndarray) -> np.ndarray:
    """Canny edges as 0/1, sigma ``CANNY_SIGMA_FRACTION`` of the image side (at least 1 pixel)."""
    from skimage.feature import canny

    picture = _unit(image)
    sigma = max(1.0, CANNY_SIGMA_FRACTION * max(picture.shape))
    return canny(picture, sigma=sigma).astype(np.float32)


def texture_map(image: np.ndarray) -> np.ndarray:
    """Local grey-level entropy in a disk of radius ``TEXTURE_RADIUS_FRACTION`` of the side, in [0, 1]."""
    from skimage.filters.rank import entropy
    from skimage.morphology import disk

    picture = np.round(_unit(image) * 255.0).astype(np.uint8)
    radius = max(2, int(round(TEXTURE_RADIUS_FRACTION * max(picture.shape))))
    return np.clip(entropy(picture, disk(radius)) / 8.0, 0.0, 1.0).astype(np.float32)


def lung_map(labels: np.ndarray) -> np.ndarray:
    """1 inside the lungs (anatomy labels 1 left, 2 right), 0 elsewhere."""
    labels = np.asarray(labels)
    return np.isin(labels, (1, 2)).astype(np.float32)


def _blurred(heat: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.filters import gaussian

    soft = gaussian(np.asarray(heat, dtype=np.float64), sigma=max(float(sigma), 1e-3), mode="constant", cval=0.0,
                    preserve_range=True)
    top = float(soft.max())
    if top <= 0:
        return np.zeros(soft.shape, dtype=np.float32)
    return np.clip(soft / top, 0.0, 1.0).astype(np.float32)


def attention_sigma(shape) -> float:
    """The attention blur for an image of ``shape``: ``ATTENTION_SIGMA_FRACTION`` of its longer side."""
    return ATTENTION_SIGMA_FRACTION * max(int(shape[0]), int(shape[1]))


def attention_from_fixations(fixations: np.ndarray, shape, sigma: Optional[float] = None) -> np.ndarray:
    """Fixations (n, 3) = x, y (pixels, column and row) and duration -> blurred heatmap in [0, 1] on ``shape``.

    Each fixation adds its duration at its pixel; fixations outside the image are dropped.
    """
    fixations = np.asarray(fixations, dtype=np.float64).reshape(-1, 3)
    rows, cols = int(shape[0]), int(shape[1])
    heat = np.zeros((rows, cols), dtype=np.float64)
    x = np.round(fixations[:, 0]).astype(np.int64)
    y = np.round(fixations[:, 1]).astype(np.int64)
    inside = (x >= 0) & (x < cols) & (y >= 0) & (y < rows)
    np.add.at(heat, (y[inside], x[inside]), fixations[inside, 2])
    return _blurred(heat, attention_sigma(shape) if sigma is None else sigma)


def attention_from_region(mask: np.ndarray, sigma: Optional[float] = None) -> np.ndarray:
    """A painted region (bool) blurred into a soft attention map in [0, 1] (1 deep inside the region)."""
    mask = np.asarray(mask).astype(bool)
    return _blurred(mask.astype(np.float64), attention_sigma(mask.shape) if sigma is None else sigma)


def control_map(name: str, *, reference: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None,
                attention: Optional[np.ndarray] = None, size: int) -> np.ndarray:
    """The map of control ``name`` at ``size`` x ``size``: float32 in [0, 1].

    ``reference``: a grey X-ray in [0, 1] (sobel, canny, texture), resampled to the grid before filtering;
    ``labels``: the anatomy label map (lungs), resampled by nearest neighbour; ``attention``: an attention
    heatmap already built (attention), resampled linearly.
    """
    name = check_name(name)
    size = int(size)
    if name in REFERENCE_CONTROLS:
        if reference is None:
            raise InputError(f"The {name} control needs a reference X-ray.")
        picture = np.clip(_resample(np.asarray(reference, dtype=np.float32), size), 0.0, 1.0)
        return {"sobel": sobel_map, "canny": canny_map, "texture": texture_map}[name](picture)
    if name == "lungs":
        if labels is None:
            raise InputError("The lungs control needs an anatomy label map.")
        lungs = lung_map(_resample(np.asarray(labels).astype(np.uint8), size, "labels"))
        if not lungs.any():
            raise InputError("The anatomy label map has no lungs (labels 1 and 2) for the lungs control.")
        return lungs
    if attention is None:
        raise InputError("The attention control needs an attention map.")
    return np.clip(_resample(np.asarray(attention, dtype=np.float32), size), 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- files


def read_fixations_csv(path) -> np.ndarray:
    """A fixation CSV -> (n, 3) float64 x, y, duration; ``CSV_LAYOUT`` or one sentence of refusal."""
    path = Path(path)
    what = f"The fixation file {shown(path.name)}"
    try:
        if path.stat().st_size > MAX_FIXATION_FILE_BYTES:
            raise InputError(f"{what} is larger than {MAX_FIXATION_FILE_BYTES // (1024 * 1024)} MB.")
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{what} is not a text CSV; give {CSV_LAYOUT}.") from None
    except OSError:
        raise InputError(f"{what} cannot be read.") from None
    try:
        reader = csv.DictReader(_io.StringIO(text))
        header = [str(column).strip().lower() for column in (reader.fieldnames or [])]
        rows = list(reader)
    except csv.Error:
        raise InputError(f"{what} is not a readable CSV; give {CSV_LAYOUT}.") from None
    repeated = sorted({column for column in header if header.count(column) > 1})
    if repeated:
        raise InputError(f"{what} has the column {shown(repeated[0])} twice; give each column once.")
    if set(FIXATION_COLUMNS) <= set(header):
        layout = FIXATION_COLUMNS
    elif set(REFLACX_COLUMNS) <= set(header):
        layout = REFLACX_COLUMNS
    else:
        raise InputError(f"{what} is not the documented fixation CSV; give {CSV_LAYOUT}.")
    if not rows:
        raise InputError(f"{what} has no fixations.")
    if len(rows) > MAX_FIXATIONS:
        raise InputError(f"{what} has more than {MAX_FIXATIONS} fixations.")
    values = np.empty((len(rows), len(layout)), dtype=np.float64)
    for index, row in enumerate(rows):
        lowered = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
        for column, key in enumerate(layout):
            try:
                values[index, column] = float(str(lowered.get(key, "")).strip())
            except ValueError:
                raise InputError(f"{what} row {index + 2} has a {key} that is not a number.") from None
    if not np.isfinite(values).all():
        raise InputError(f"{what} contains NaN or infinite values.")
    if layout == REFLACX_COLUMNS:
        values = np.column_stack([values[:, 0], values[:, 1], values[:, 3] - values[:, 2]])
    if (values[:, 2] < 0).any():
        raise InputError(f"{what} has a fixation with a negative duration.")
    if not (values[:, 2] > 0).any():
        raise InputError(f"{what} has no fixation with a positive duration.")
    return values


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _size_text(shape) -> str:
    return f"{int(shape[1])}x{int(shape[0])}"


def _read_attention_image(path: Path) -> np.ndarray:
    """An attention map image: two grey levels = a painted region (blurred), more = a heatmap (kept)."""
    from .images import read_source_image

    pixels = np.asarray(read_source_image(path)[0], dtype=np.float64)
    levels = np.unique(pixels)
    if levels.size < 2:
        raise InputError(f"The attention map {shown(path.name)} has a single grey level (nothing painted, or all of "
                         "it); paint the region to look at.")
    if levels.size == 2:
        return attention_from_region(pixels == levels[1])
    low, high = float(levels[0]), float(levels[-1])
    return ((pixels - low) / (high - low)).astype(np.float32)


def load_control(request: ControlRequest, *, size: int, input_shape, labels: Optional[np.ndarray] = None,
                 labels_path: Optional[Path] = None) -> LoadedControl:
    """Read ``request``'s source and build its map at ``size``.

    ``input_shape`` is the grid the masks are drawn on (fixation coordinates are pixels of it). A source
    image of another size is resampled to the model grid and a warning says so.
    """
    request = check_request(request)
    name, warnings = request.name, []
    source_name = source_sha = None
    if name == "lungs":
        if labels_path is not None and Path(labels_path).is_file():
            source_name, source_sha = Path(labels_path).name, file_sha256(labels_path)
        return LoadedControl(name, control_map(name, labels=labels, size=size), request.scale, source_name,
                             source_sha, warnings)
    path = Path(request.source)
    if path.is_dir():
        raise InputError(f"The {name} control file {shown(path.name)} is a directory; give a file.")
    if not path.is_file():
        head, _, tail = str(path).rpartition(":")
        if head and Path(head).is_file():  # NAME:FILE:SCALE with a scale that is no number
            raise InputError(f"The {name} control's scale '{shown(tail)}' is not a number (write {name}:FILE:SCALE, "
                             "e.g. 0.5).")
        raise InputError(f"The {name} control file {shown(path.name)} does not exist.")
    source_name, source_sha = path.name, file_sha256(path)
    if name == "attention" and path.suffix.lower() == FIXATION_SUFFIX:
        fixations = read_fixations_csv(path)
        heat = attention_from_fixations(fixations, input_shape)
        if not heat.any():
            raise InputError(f"None of the fixations in {shown(path.name)} fall inside the {_size_text(input_shape)} image.")
        if min(input_shape) > 2 and fixations[:, :2].min() >= 0 and fixations[:, :2].max() <= 1:
            warnings.append(f"Every fixation in {shown(path.name)} lies within 1 pixel of the top-left corner; the "
                            "coordinates are read as pixels of the image, so normalised (0..1) coordinates must be "
                            f"multiplied by its size ({_size_text(input_shape)}).")
        outside = int(np.sum((fixations[:, 0] < -0.5) | (fixations[:, 0] >= input_shape[1] - 0.5)
                             | (fixations[:, 1] < -0.5) | (fixations[:, 1] >= input_shape[0] - 0.5)))
        if outside:
            warnings.append(f"{outside} of the {len(fixations)} fixations in {shown(path.name)} lie outside the "
                            f"{_size_text(input_shape)} image and were left out.")
        return LoadedControl(name, control_map(name, attention=heat, size=size), request.scale, source_name,
                             source_sha, warnings)
    if name == "attention":
        source = _read_attention_image(path)
    else:
        from .images import read_source_image

        source = np.asarray(read_source_image(path)[0], dtype=np.float32)
    if tuple(source.shape) != tuple(int(s) for s in input_shape):
        warnings.append(f"The {name} control {shown(path.name)} is {_size_text(source.shape)} pixels, not the "
                        f"{_size_text(input_shape)} of the image; it was resampled to the model's {size}x{size}.")
    if name == "attention":
        return LoadedControl(name, control_map(name, attention=source, size=size), request.scale, source_name,
                             source_sha, warnings)
    return LoadedControl(name, control_map(name, reference=source, size=size), request.scale, source_name, source_sha,
                         warnings)
