"""The panel's sampling settings (Steps, Anatomy steps, Guidance, Seed, Sampler, Fast preview, where the
ControlNets steer) by the engine's one sampling policy.

Nothing here has its own ranges or rules: they come from ``xreal_engine.model.sampling`` (stdlib only,
bundled beside the module), so a request from Slicer resolves to exactly what the CLI and the service
resolve for the same values, and a bad value is refused with the engine's own sentence before upload.

The parameter node's ranges (``node_range``) are the policy's ranges, except where a Qt spin box cannot
hold them (the seed: the policy allows 2**32 - 1, a QSpinBox holds a C int).
"""

from __future__ import annotations

from typing import List, Mapping, Optional, Tuple

from xreal_engine.model.sampling import (
    CONTROL_STAGES,
    DEFAULT_CONTROL_STAGES,
    FAST_PRESET,
    MODEL_DEFAULT_NAMES,
    SAMPLERS,
    SETTINGS,
    SamplingParameters,
    anatomy_steps_for,
    check_model_defaults,
)

# Parameter-node field -> the policy's setting name.
NODE_FIELDS = {"steps": "num_inference_steps", "anatomySteps": "anatomy_steps", "guidance": "guidance_scale",
               "seed": "seed"}
# The sampling fields of the engine's POST /jobs (public names; xreal_engine.client.EngineClient.submit).
REQUEST_FIELDS = ("steps", "anatomy_steps", "guidance", "eta", "seed", "sampler", "fast")
# What "Fast preview" leaves to the engine's preset (FAST_PRESET, public names): the settings the preset sets, and
# the anatomy steps, which follow the step count.
FAST_FIELDS = tuple(sorted({SETTINGS[name].public_name if name in SETTINGS else name for name in FAST_PRESET}
                           | {"anatomy_steps"}))
# How the panel's Sampler list names the policy's samplers (a sampler without a label shows its own name).
SAMPLER_LABELS = {"ddim": "DDIM (XReal's sampler)", "dpmpp": "DPM-Solver++ 2M (fewer steps)",
                  "unipc": "UniPC (fewer steps)"}
DEFAULT_SAMPLER = SAMPLERS[0]  # XReal's DDIM: what the policy uses when a request names none
# How the panel's "Controls steer" list names the policy's control stages.
CONTROL_STAGE_LABELS = {"both": "Both stages", "anatomy": "The anatomy stage", "pathology": "The pathology stages"}


def sampler_choices(info: Optional[Mapping] = None) -> List[Tuple[str, str]]:
    """(sampler, label) for the panel's list: the connected engine's samplers (``/info`` choices), else the
    policy's, in that order (the first, XReal's DDIM, is the default)."""
    names = list(((info or {}).get("choices") or {}).get("sampler") or SAMPLERS)
    return [(str(name), SAMPLER_LABELS.get(str(name), str(name))) for name in names]


def control_stage_choices() -> List[Tuple[str, str]]:
    """(stages, label) for the panel's list: the policy's control stages, its default first."""
    names = [DEFAULT_CONTROL_STAGES] + [name for name in CONTROL_STAGES if name != DEFAULT_CONTROL_STAGES]
    return [(name, CONTROL_STAGE_LABELS.get(name, name)) for name in names]


# The largest value a QSpinBox takes (a C int). Slicer's QSliderOrSpinBoxToIntConnector sets the spin box's
# range from the field's WithinRange and uses 2**31 - 1 as the ceiling it "was unable to set higher than"
# (Slicer Base/Python/slicer/parameterNodeWrapper/guiConnectors.py).
SPIN_BOX_INT_MAX = 2**31 - 1


def node_range(field: str) -> Tuple[float, float]:
    """(low, high) of a parameter-node field: the policy's range, capped where a QSpinBox cannot hold it."""
    setting = SETTINGS[NODE_FIELDS[field]]
    high = min(setting.high, SPIN_BOX_INT_MAX) if setting.kind is int else setting.high
    return setting.kind(setting.low), setting.kind(high)


def model_defaults(info: Optional[Mapping] = None) -> dict:
    """The connected model's sampling defaults from ``/info``, completed and checked by the policy.

    No engine yet (``info`` None): XReal's own defaults. Settings a newer engine knows and this
    module does not are left out; a bad default is InputError with the engine's sentence.
    """
    given = dict((info or {}).get("defaults") or {})
    return check_model_defaults({name: value for name, value in given.items() if name in MODEL_DEFAULT_NAMES})


def node_defaults(defaults: Mapping) -> dict:
    """Parameter-node values for a model's (checked) defaults: what the panel shows after connecting."""
    return {field: defaults[name] for field, name in NODE_FIELDS.items() if name in defaults}


# The panel before any engine is connected: XReal's defaults.
NODE_DEFAULTS = node_defaults(model_defaults())


def resolve(defaults: Mapping, *, steps=None, anatomy_steps=None, guidance=None, eta=None,
            seed=None, sampler=None, fast: bool = False, control_stages=None) -> SamplingParameters:
    """The panel's values resolved exactly as the engine resolves them (None = the model's default).

    Unset anatomy steps follow the step count (the model's fraction of the schedule); ``fast`` fills
    unset settings from the fast preset; InputError with the engine's sentence for a value out of range.
    """
    return SamplingParameters.from_public(defaults, {"steps": steps, "anatomy_steps": anatomy_steps,
                                                     "guidance": guidance, "eta": eta, "seed": seed,
                                                     "sampler": sampler, "fast": True if fast else None,
                                                     "control_stages": control_stages})


def panel_parameters(defaults: Mapping, *, steps=None, anatomy_steps=None, guidance=None, sampler=None,
                     fast: bool = False, seed=None, control_stages=None) -> SamplingParameters:
    """What the Generate section asks for. Fast preview: the preset chooses the steps, anatomy steps and
    sampler (the panel disables those three), the panel's guidance, seed and control stages still apply."""
    if fast:
        return resolve(defaults, guidance=guidance, seed=seed, fast=True, control_stages=control_stages)
    return resolve(defaults, steps=steps, anatomy_steps=anatomy_steps, guidance=guidance, sampler=sampler, seed=seed,
                   control_stages=control_stages)


def request_values(parameters: SamplingParameters, seed: Optional[int] = None, fast: bool = False) -> dict:
    """One job's sampling fields for the engine (public names), with ``seed`` for this job if given.

    ``fast``: ``fast=True`` is sent instead of the settings the preset decides (``FAST_FIELDS``), so the
    engine applies its own preset; ``parameters`` (resolved here with the same policy) is what it resolves.
    """
    if seed is not None:
        parameters = parameters.with_seed(seed)
    public = parameters.to_public()
    values = {name: public[name] for name in REQUEST_FIELDS if public.get(name) is not None}
    if fast:
        for name in FAST_FIELDS:
            values.pop(name, None)
        values["fast"] = True
    return values


def anatomy_steps_after_steps_change(defaults: Mapping, old_steps: Optional[int], new_steps: int,
                                     anatomy_steps: int) -> int:
    """The Anatomy steps to show when the user changes Steps from ``old_steps`` to ``new_steps``.

    Anatomy steps that follow the model's fraction of the schedule (the value ``anatomy_steps_for``
    gives for ``old_steps``, or no previous step count) keep following it; a value the user set
    explicitly is kept as it is (the engine's rules refuse it at Generate if it exceeds the steps).
    """
    if old_steps is None or anatomy_steps == anatomy_steps_for(old_steps, defaults):
        return anatomy_steps_for(new_steps, defaults)
    return anatomy_steps
