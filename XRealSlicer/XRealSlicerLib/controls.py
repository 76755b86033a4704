"""The Generate section's ControlNet controls (RadGazeGen's radiomics and attention maps) without Slicer.

Two controls come from the panel: the loaded X-ray (the canvas pixels) as the reference of a radiomics
map (``sobel``, ``canny`` or ``texture``), and the painted "Attention" segments, sent as a 0/1 mask that
the engine blurs into the attention map (``xreal_engine.io.controls.attention_from_region``: the one
blur rule). Which controls a model has, and their default scales, come from its ``/info``
(``controlnets``); names, the scale range and its sentence come from ``xreal_engine.control_spec``
(stdlib only, bundled beside the module), so nothing here has a rule of its own. No Qt here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from xreal_engine.control_spec import CONTROL_NAMES, CONTROL_SCALE_RANGE, REFERENCE_CONTROLS, check_scale
from xreal_engine.errors import InputError

from .request import normalized_image

ATTENTION = "attention"
DEFAULT_SCALE = 1.0  # a model that lists a ControlNet without a scale (ModelInfo's own default)
# How the panel's list names the radiomics maps (xreal_engine/io/controls.py computes them).
REFERENCE_LABELS = {"sobel": "Sobel edges", "canny": "Canny edges", "texture": "Texture (local entropy)"}
REFERENCE_FILE = "reference.nrrd"
ATTENTION_FILE = "attention.nrrd"


def model_controlnets(info: Optional[Mapping]) -> Dict[str, float]:
    """The model's ControlNets and their default scales from ``/info`` (or the model's own file).

    Read from ``info["controlnets"]`` or ``info["model"]["controlnets"]``, each ``{name: scale}`` or
    ``{name: {"scale": scale}}`` (``xreal_model.json``'s form); names this module does not know are left out.
    """
    info = info or {}
    found = info.get("controlnets")
    if found is None:
        found = (info.get("model") or {}).get("controlnets")
    if not isinstance(found, Mapping):
        return {}
    scales = {}
    for name, entry in found.items():
        if name not in CONTROL_NAMES:
            continue
        scale = entry.get("scale", DEFAULT_SCALE) if isinstance(entry, Mapping) else entry
        try:
            scales[name] = check_scale(DEFAULT_SCALE if scale is None else scale, name)
        except InputError:
            scales[name] = DEFAULT_SCALE  # a newer engine's odd entry: the panel keeps a valid default
    return scales


def reference_choices(controlnets: Mapping[str, float]) -> List[Tuple[str, str]]:
    """(control, label) of the radiomics maps the model has, in the engine's order."""
    return [(name, REFERENCE_LABELS.get(name, name)) for name in REFERENCE_CONTROLS if name in controlnets]


def node_defaults(controlnets: Mapping[str, float], reference_control: Optional[str]) -> dict:
    """Parameter-node values for a newly connected model: its radiomics map (the current one if it has it)
    and the default scales; without a radiomics ControlNet the reference is off (its checkbox is disabled, so
    a scene's ticked one could not be unticked)."""
    choices = [name for name, _label in reference_choices(controlnets)]
    control = reference_control if reference_control in choices else (choices[0] if choices else "")
    values = reference_values(controlnets, control)
    if not choices:
        values["useReference"] = False
    if ATTENTION in controlnets:
        values["attentionScale"] = controlnets[ATTENTION]
    return values


def reference_values(controlnets: Mapping[str, float], control: str) -> dict:
    """Parameter-node values when ``control`` becomes the radiomics map: it, at the model's default scale."""
    values = {"referenceControl": control or ""}
    if control in controlnets:
        values["referenceScale"] = controlnets[control]
    return values


@dataclass
class PlannedControl:
    """One control of a job: its name, the pixels to send and its scale."""

    name: str
    pixels: np.ndarray  # reference: float32 [0, 1]; attention: uint8 0/1 (the engine blurs a two-level map)
    scale: float
    file_name: str


def plan_controls(controlnets: Mapping[str, float], *, use_reference: bool = False,
                  reference_control: Optional[str] = None, reference_scale: Optional[float] = None,
                  reference: Optional[np.ndarray] = None, attention: Optional[np.ndarray] = None,
                  attention_scale: Optional[float] = None) -> List[PlannedControl]:
    """The controls a run sends, checked against the model; InputError with one sentence otherwise.

    ``reference``: the loaded X-ray's pixels (the canvas), used when ``use_reference``; ``attention``: the
    union of the painted attention segments (None when none is painted). A scale left None is the model's.
    """
    planned = []
    if use_reference:
        available = [name for name, _label in reference_choices(controlnets)]
        if not available:
            raise InputError("This model has no radiomics ControlNet (sobel, canny or texture); untick "
                             "'Use the loaded X-ray as radiomics reference'.")
        name = reference_control or available[0]
        if name not in available:
            raise InputError(f"This model has no {name} ControlNet; it has {', '.join(available)}.")
        planned.append(PlannedControl(name, reference_pixels(reference), _scale(reference_scale, name, controlnets),
                                      REFERENCE_FILE))
    if attention is not None and np.asarray(attention).any():
        if ATTENTION not in controlnets:
            raise InputError("This model has no attention ControlNet, so the painted 'Attention' segment cannot "
                             "steer it; delete that segment or use a model with an attention ControlNet.")
        mask = np.asarray(attention) != 0
        if mask.all():
            raise InputError("The 'Attention' segment covers the whole image, which draws attention nowhere in "
                             "particular; paint only the region to look at.")
        planned.append(PlannedControl(ATTENTION, mask.astype(np.uint8), _scale(attention_scale, ATTENTION,
                                                                               controlnets), ATTENTION_FILE))
    return planned


def _scale(value: Optional[float], name: str, controlnets: Mapping[str, float]) -> float:
    return check_scale(controlnets.get(name, DEFAULT_SCALE) if value is None else value, name)


def reference_pixels(pixels: Optional[np.ndarray]) -> np.ndarray:
    """The loaded X-ray as the radiomics reference: one 2D image, float32 in [0, 1] (min-max)."""
    if pixels is None:
        raise InputError("Select the X-ray to use as radiomics reference as the canvas first (Canvas section).")
    return normalized_image(
        pixels, not_2d="The radiomics reference must be a single 2D X-ray; the canvas has the shape {}.",
        blank="The canvas is blank, so it cannot be the radiomics reference; load an X-ray as the canvas "
              "or untick 'Use the loaded X-ray as radiomics reference'.")


def scale_range() -> Tuple[float, float]:
    """The parameter node's range of a scale spin box: the engine's (``control_spec.CONTROL_SCALE_RANGE``)."""
    return float(CONTROL_SCALE_RANGE[0]), float(CONTROL_SCALE_RANGE[1])
