"""The controls' names, the range of their scale and the ``NAME[:PATH][:SCALE]`` syntax, in one place.

Standard library only: the CLI's ``submit``, the service's request checks, ``xreal_model.json``'s
validation (model/info.py) and the Slicer module read these rules without numpy or torch. The maps
themselves are computed in :mod:`xreal_engine.io.controls`, which re-exports everything here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import InputError, shown

CONTROL_NAMES = ("sobel", "canny", "texture", "lungs", "attention")
CONTROL_SCALE_RANGE = (0.0, 2.0)  # the one place for the range of a control's scale (both ends allowed)
REFERENCE_CONTROLS = ("sobel", "canny", "texture")  # computed from a reference X-ray
FILELESS_CONTROLS = ("lungs",)  # computed from the anatomy label map of the request


@dataclass(frozen=True)
class ControlRequest:
    """One control asked for: its name, its source file (None for ``lungs``) and scale (None = the model's)."""

    name: str
    source: Optional[Path] = None
    scale: Optional[float] = None


def check_name(name) -> str:
    """A control name, lower-cased; an unknown one is refused with the list of known ones."""
    key = str(name).strip().lower()
    if key not in CONTROL_NAMES:
        raise InputError(f"Unknown control '{shown(name)}'; the controls are {', '.join(CONTROL_NAMES)}.")
    return key


def check_scale(value, name: str = "control") -> float:
    """A control scale as a float inside ``CONTROL_SCALE_RANGE`` (both ends included)."""
    low, high = CONTROL_SCALE_RANGE
    sentence = f"from {low:g} to {high:g}"
    if isinstance(value, bool):
        raise InputError(f"The {name} scale {shown(value)} is not a number; give one {sentence}.")
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise InputError(f"The {name} scale '{shown(value)}' is not a number; give one {sentence}.") from None
    if not math.isfinite(scale) or not low <= scale <= high:
        raise InputError(f"The {name} scale {shown(value)} is outside [{low:g}, {high:g}]; give one {sentence}.")
    return scale


def check_request(request: ControlRequest) -> ControlRequest:
    """Name, scale and whether a source file is needed, checked without reading any file."""
    name = check_name(request.name)
    scale = None if request.scale is None else check_scale(request.scale, name)
    if name in REFERENCE_CONTROLS and request.source is None:
        raise InputError(f"The {name} control needs a reference X-ray: write {name}:FILE[:SCALE].")
    if name == "attention" and request.source is None:
        raise InputError("The attention control needs a map image or a fixation CSV: write attention:FILE[:SCALE].")
    if name in FILELESS_CONTROLS and request.source is not None:
        raise InputError(f"The {name} control is computed from the anatomy label map; write {name}[:SCALE] "
                         "without a file.")
    return ControlRequest(name=name, source=None if request.source is None else Path(request.source), scale=scale)


def check_requests(requests) -> list:
    """Each request checked; the same control twice is refused (their residuals would just add up)."""
    checked = [check_request(request) for request in requests]
    names = [request.name for request in checked]
    for name in names:
        if names.count(name) > 1:
            raise InputError(f"The {name} control is given more than once; give each control once.")
    return checked


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_control(text) -> ControlRequest:
    """``NAME[:PATH][:SCALE]`` -> ControlRequest (``sobel:ref.png:0.5``, ``lungs``, ``attention:fix.csv``).

    A last part that reads as a number is the scale; everything between the name and it is the
    path (so a path may itself contain ':').
    """
    parts = str(text).split(":")
    name = check_name(parts[0])
    rest = parts[1:]
    scale = None
    if rest and _is_number(rest[-1].strip()):
        scale = check_scale(rest[-1].strip(), name)
        rest = rest[:-1]
    path = ":".join(rest)
    if rest and not path:
        raise InputError(f"The control '{shown(text)}' has an empty file name; write {name}:FILE[:SCALE].")
    return check_request(ControlRequest(name=name, source=Path(path) if path else None, scale=scale))


def needs_file(name: str) -> bool:
    """Whether control ``name`` is computed from a file the request sends (all but ``lungs``)."""
    return check_name(name) not in FILELESS_CONTROLS


def parse_name_and_scale(text) -> tuple:
    """``NAME[:SCALE]`` -> (name, scale or None): a control as the service's ``control`` field names it (its
    file travels in its own upload field)."""
    name, _, scale = str(text).partition(":")
    name = check_name(name)
    return name, (check_scale(scale.strip(), name) if scale.strip() else None)

