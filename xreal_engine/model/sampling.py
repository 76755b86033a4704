"""The one sampling policy: every sampling setting, its default, its range and its rules.

Everything that takes sampling settings — the pipeline, ``generate``, the service, ``evaluate``,
``submit`` and the Slicer module — resolves them here, so the same request gives the same
settings (and, with the same seed, the same image) however it arrives, and a bad value is
refused with the same sentence everywhere.

The rule that once lived in four places: the anatomy stage holds the drawn anatomy for the
*fraction* of the schedule that the model's defaults give (85 of 100 steps for the demo model,
50 of 100 in XReal). A request that changes only the step count keeps that fraction, like
diffusers' ControlNet pipelines keep ``control_guidance_end`` as a fraction of the schedule.

Standard library only: the Slicer module imports this file.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Mapping, Optional

from ..errors import InputError

# The diffusion schedule has 1000 training timesteps; a sampler can take at most one step per timestep.
MAX_STEPS = 1000
MAX_SEED = 2**32 - 1
# "ddim" is XReal's sampler (the default, equal to the original); the others are diffusers' multistep
# solvers (DPM-Solver++ 2M, UniPC), which need far fewer steps.
SAMPLERS = ("ddim", "dpmpp", "unipc")
# The documented fast preset (--fast): what it sets unless the request sets it too. Measured on the demo
# model in benchmarks/README.md and the model card.
FAST_PRESET = {"sampler": "dpmpp", "num_inference_steps": 10}
# Which stages the ControlNets (controls, model/controlnets.py) steer: the anatomy stage, the pathology
# stages, or both (the default: a radiomics map or an attention map describes the whole final image).
CONTROL_STAGES = ("anatomy", "pathology", "both")
DEFAULT_CONTROL_STAGES = "both"


@dataclass(frozen=True)
class Setting:
    """One sampling setting: its field name, the name users type (CLI flag / HTTP field), kind and range."""

    name: str
    public_name: str
    kind: type  # int or float
    low: float
    high: float
    meaning: str

    def check(self, value, high: Optional[float] = None, high_text: Optional[str] = None):
        """The value as ``kind``, or InputError with the one sentence every caller shows."""
        high = self.high if high is None else high
        number = (lambda x: str(int(x))) if self.kind is int else (lambda x: f"{x:g}")  # 4294967295, not 4.29e+09
        range_text = f"from {number(self.low)} to {high_text or number(high)}"
        what = "a whole number" if self.kind is int else "a number"
        sentence = f"The {self.meaning} ('{self.public_name}') must be {what} {range_text}; got {_shown(value)}."
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(sentence)
        if self.kind is int and value != int(value):
            raise InputError(sentence)
        if not self.low <= value <= high:
            raise InputError(sentence)
        return self.kind(value)


SETTINGS = {
    setting.name: setting
    for setting in (
        Setting("num_inference_steps", "steps", int, 1, MAX_STEPS, "number of steps"),
        Setting("anatomy_steps", "anatomy_steps", int, 0, MAX_STEPS, "number of anatomy steps"),
        Setting("guidance_scale", "guidance", float, 0.0, 50.0, "guidance scale"),
        Setting("eta", "eta", float, 0.0, 1.0, "DDIM eta"),
        Setting("soft_mask_value", "soft_mask_value", float, 0.0, 1.0, "soft mask value"),
        Setting("seed", "seed", int, 0, MAX_SEED, "seed"),
    )
}
# Settings a model's xreal_model.json may give defaults for (the seed has none: every run takes one).
MODEL_DEFAULT_NAMES = ("num_inference_steps", "anatomy_steps", "eta", "guidance_scale", "soft_mask_value")
# The original XReal sampling settings (design.md section 3).
XREAL_DEFAULTS = {"num_inference_steps": 100, "anatomy_steps": 50, "eta": 1.0, "guidance_scale": 7.0,
                  "soft_mask_value": 0.2}
# On/off settings (public name = field name) a model's defaults may also set; absent = off, as XReal.
# keep_outside_region: after each pathology stage, keep the previous image's pixels outside the feathered
# region (post-decode overlay, like diffusers' VaeImageProcessor.apply_overlay for inpainting): the
# pathology stage re-encodes the whole image, and one encode/decode alone changes every pixel a little
# (model/overlay.py). XReal does not do this, so converted official models keep it off.
SWITCHES = {"keep_outside_region": "keep-outside-region option"}


def public_names() -> tuple:
    """Every public name :meth:`SamplingParameters.from_public` takes (CLI flags, HTTP fields, manifest
    columns), the seed included: the numeric settings, the choices and the switches."""
    return tuple(setting.public_name for setting in SETTINGS.values()) + ("sampler", "fast", "control_stages") \
        + tuple(SWITCHES)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_model_defaults(defaults: Mapping) -> dict:
    """A model's ``defaults`` completed with XReal's and checked by the same ranges; InputError otherwise."""
    known = MODEL_DEFAULT_NAMES + tuple(SWITCHES)
    unknown = sorted(set(defaults) - set(known))
    if unknown:
        raise InputError(f"The sampling defaults have unknown settings {unknown} (known: {', '.join(known)}).")
    merged = {**XREAL_DEFAULTS, **defaults}
    checked = {name: SETTINGS[name].check(merged[name]) for name in MODEL_DEFAULT_NAMES}
    # Switches stay absent unless the model sets them, so existing xreal_model.json files read back unchanged.
    checked.update({name: check_switch(name, defaults[name]) for name in SWITCHES if name in defaults})
    steps = checked["num_inference_steps"]
    checked["anatomy_steps"] = SETTINGS["anatomy_steps"].check(checked["anatomy_steps"], steps,
                                                               f"the number of steps ({steps})")
    return checked


def check_switch(name: str, value) -> bool:
    """An on/off setting's value, or InputError with the one sentence for it."""
    if value is not True and value is not False:
        raise InputError(f"The {SWITCHES[name]} ('{name}') must be true or false; got {_shown(value)}.")
    return value


def anatomy_steps_for(steps: int, defaults: Mapping) -> int:
    """The anatomy steps that keep the model's anatomy fraction for ``steps`` steps (half rounds up)."""
    fraction = defaults["anatomy_steps"] / defaults["num_inference_steps"]
    return min(steps, int(math.floor(steps * fraction + 0.5)))


@dataclass(frozen=True)
class SamplingParameters:
    """Resolved, checked sampling settings of one generation. Build it with :meth:`resolve`."""

    num_inference_steps: int
    anatomy_steps: int
    guidance_scale: float
    eta: float
    soft_mask_value: float
    seed: Optional[int] = None  # None only where a torch.Generator is passed instead (the pipeline)
    sampler: str = "ddim"
    control_stages: str = DEFAULT_CONTROL_STAGES  # where controls apply; no effect without controls
    keep_outside_region: bool = False  # post-decode overlay after pathology stages (SWITCHES)

    def controls_in(self, stage: str) -> bool:
        """Whether the controls steer ``stage`` ("anatomy" or "pathology")."""
        return self.control_stages in (stage, "both")

    @classmethod
    def resolve(cls, defaults: Mapping, *, num_inference_steps=None, anatomy_steps=None, guidance_scale=None,
                eta=None, soft_mask_value=None, seed=None, sampler=None, fast: bool = False,
                control_stages=None, keep_outside_region=None) -> "SamplingParameters":
        """Fill what the request leaves unset from the model's ``defaults`` and check every rule.

        Unset anatomy steps follow the step count (the model's fraction of the schedule);
        given anatomy steps may not exceed the step count. ``fast`` fills unset settings from
        ``FAST_PRESET`` first (an explicit value still wins).
        """
        defaults = check_model_defaults(defaults)
        if fast is not True and fast is not False:
            raise InputError(f"The fast option must be true or false; got {_shown(fast)}.")
        if fast:
            num_inference_steps = FAST_PRESET["num_inference_steps"] if num_inference_steps is None \
                else num_inference_steps
            sampler = FAST_PRESET["sampler"] if sampler is None else sampler
        sampler = "ddim" if sampler is None else sampler
        if sampler not in SAMPLERS:
            raise InputError(f"The sampler ('sampler') must be one of {', '.join(SAMPLERS)}; got {_shown(sampler)}.")
        given = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "eta": eta,
                 "soft_mask_value": soft_mask_value}
        values = {name: SETTINGS[name].check(defaults[name] if value is None else value)
                  for name, value in given.items()}
        steps = values["num_inference_steps"]
        if anatomy_steps is None:
            values["anatomy_steps"] = anatomy_steps_for(steps, defaults)
        else:
            values["anatomy_steps"] = SETTINGS["anatomy_steps"].check(anatomy_steps, steps,
                                                                      f"the number of steps ({steps})")
        values["seed"] = None if seed is None else SETTINGS["seed"].check(seed)
        control_stages = DEFAULT_CONTROL_STAGES if control_stages is None else control_stages
        if control_stages not in CONTROL_STAGES:
            raise InputError(f"The control stages ('control_stages') must be one of {', '.join(CONTROL_STAGES)}; "
                             f"got {_shown(control_stages)}.")
        keep = defaults.get("keep_outside_region", False) if keep_outside_region is None else keep_outside_region
        return cls(**values, sampler=sampler, control_stages=control_stages,
                   keep_outside_region=check_switch("keep_outside_region", keep))

    @classmethod
    def from_public(cls, defaults: Mapping, values: Mapping) -> "SamplingParameters":
        """Resolve from public names (``steps``, ``guidance``, ...: CLI flags and HTTP fields); None = unset."""
        by_public = {setting.public_name: name for name, setting in SETTINGS.items()}
        by_public.update({name: name for name in public_names() if name not in by_public})
        unknown = sorted(set(values) - set(by_public))
        if unknown:
            raise InputError(f"Unknown sampling settings {unknown}; known: {', '.join(by_public)}.")
        return cls.resolve(defaults, **{by_public[key]: value for key, value in values.items() if value is not None})

    def with_seed(self, seed: int) -> "SamplingParameters":
        return replace(self, seed=SETTINGS["seed"].check(seed))

    def to_dict(self) -> dict:
        """Field names -> values (the service's stored job spec)."""
        return asdict(self)

    def without_seed(self) -> dict:
        """The settings that are the same for every seed of a run (reports of many images)."""
        return {name: value for name, value in asdict(self).items() if name != "seed"}

    def to_public(self) -> dict:
        """Public names -> values (provenance.json, the service's job view)."""
        return {(SETTINGS[name].public_name if name in SETTINGS else name): value
                for name, value in asdict(self).items()}


def limits() -> dict:
    """Every setting's range, for ``GET /info`` and user interfaces: {field name: [low, high]}."""
    return {name: [setting.kind(setting.low), setting.kind(setting.high)] for name, setting in SETTINGS.items()}


def choices() -> dict:
    """The settings that are a choice, and the fast preset, for ``GET /info`` and user interfaces."""
    return {"sampler": list(SAMPLERS), "fast_preset": dict(FAST_PRESET), "control_stages": list(CONTROL_STAGES),
            **{name: [False, True] for name in SWITCHES}}
