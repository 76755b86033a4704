"""The panel's sampling settings (Steps, Anatomy steps, Guidance, Seed) by the engine's one sampling policy.

Nothing here has its own ranges or rules: they come from ``xreal_engine.model.sampling`` (stdlib only,
bundled beside the module), so a request from Slicer resolves to exactly what the CLI and the service
resolve for the same values, and a bad value is refused with the engine's own sentence before upload.

The parameter node's ranges (``node_range``) are the policy's ranges, except where a Qt spin box cannot
hold them (the seed: the policy allows 2**32 - 1, a QSpinBox holds a C int).
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

from xreal_engine.model.sampling import (
    MODEL_DEFAULT_NAMES,
    SETTINGS,
    SamplingParameters,
    anatomy_steps_for,
    check_model_defaults,
)

# Parameter-node field -> the policy's setting name.
NODE_FIELDS = {"steps": "num_inference_steps", "anatomySteps": "anatomy_steps", "guidance": "guidance_scale",
               "seed": "seed"}
# The sampling fields of the engine's POST /jobs (public names; xreal_engine.client.EngineClient.submit).
REQUEST_FIELDS = ("steps", "anatomy_steps", "guidance", "eta", "seed")
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
            seed=None) -> SamplingParameters:
    """The panel's values resolved exactly as the engine resolves them (None = the model's default).

    Unset anatomy steps follow the step count (the model's fraction of the schedule); InputError
    with the engine's sentence for a value out of range.
    """
    return SamplingParameters.from_public(defaults, {"steps": steps, "anatomy_steps": anatomy_steps,
                                                     "guidance": guidance, "eta": eta, "seed": seed})


def request_values(parameters: SamplingParameters, seed: Optional[int] = None) -> dict:
    """One job's sampling fields for the engine (public names), with ``seed`` for this job if given."""
    if seed is not None:
        parameters = parameters.with_seed(seed)
    public = parameters.to_public()
    return {name: public[name] for name in REQUEST_FIELDS if public[name] is not None}


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
