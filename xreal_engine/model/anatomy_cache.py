"""Reuse of the anatomy stage across jobs that share it (``XRealPipeline.enable_anatomy_stage_cache``).

Why: a clinician regenerating with another pathology region or finding at the same seed, ``evaluate``'s
pathology run (the same anatomy and seed as its first anatomy-only image), a batch of counterfactual
findings on one anatomy: each re-runs the same anatomy stage, about 40 % of a one-region image. That
stage is a pure function of the label map, the random generator's state, the settings it reads, the
networks it calls (and their weights) and the CPU thread count (float32 sums depend on it), so its
result can be reused bit for bit when all of those match; the generator is then put into the state
the stage would have left it in, so the pathology stages draw the very same numbers.

Only with a caller's ``torch.Generator`` in the default ``rng="generator"`` order: ``rng="original"``
draws from the global RNG, whose state is not part of the request. Off unless enabled, because a key
cannot see weights changed outside PyTorch's in-place counters (e.g. a module's ``.data`` replaced).
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections import OrderedDict
from typing import Iterable, Optional

import torch

# Settings the anatomy stage does not read (everything else in SamplingParameters is part of the key, so a
# setting added later is safe by default: it can only cause a miss, never a wrong reuse). The seed is
# covered by the generator's state.
PATHOLOGY_ONLY_SETTINGS = ("guidance_scale", "keep_outside_region", "seed")
DEFAULT_ENTRIES = 4  # images per pipeline; an entry is two images, a few MB at 512 px
IDENTITY_ATTRIBUTE = "_xreal_cache_identity"


@dataclasses.dataclass(frozen=True)
class AnatomyStageResult:
    x_hat: torch.Tensor  # (1, 3, S, S) the anatomy controller's image
    x_a_gen: torch.Tensor  # (1, 3, S, S) the anatomy stage's image
    generator_state: torch.Tensor  # the generator's state after the stage


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to("cpu").contiguous().numpy().tobytes()


def module_fingerprint(module) -> str:
    """Identity, place and weight-change counters of a network: in-place updates (an optimizer step,
    ``load_state_dict``) bump a tensor's ``_version``, so a trained-on module never matches its old key.
    The identity is a tag given on first sight together with ``id()``: the address alone may be reused by a
    later module, the tag alone is shared by a deep copy."""
    if module is None:
        return "none"
    identity = getattr(module, IDENTITY_ATTRIBUTE, None)
    if identity is None:
        identity = uuid.uuid4().hex
        setattr(module, IDENTITY_ATTRIBUTE, identity)
    tensors = list(module.parameters()) + list(module.buffers()) if isinstance(module, torch.nn.Module) else []
    try:
        versions = sum(t._version for t in tensors)
    except RuntimeError:  # inference tensors keep no counter: such a module never matches
        versions = uuid.uuid4().hex
    placement = {(str(t.device), str(t.dtype)) for t in tensors}
    return f"{type(module).__name__}@{identity}/{id(module)}:v{versions}:{sorted(placement)}"


def numerics_settings() -> list:
    """Process-wide switches that change float arithmetic (TF32, matmul precision, deterministic kernels)."""
    return [torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
            torch.are_deterministic_algorithms_enabled()]


class AnatomyStageCache:
    """A small least-recently-used map from an anatomy-stage key to its result."""

    def __init__(self, entries: int = DEFAULT_ENTRIES):
        if isinstance(entries, bool) or not isinstance(entries, int) or entries < 1:
            raise ValueError(f"The anatomy-stage cache needs at least 1 entry; got {entries!r}.")
        self.entries = entries
        self._results: "OrderedDict[str, AnatomyStageResult]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._results)

    @staticmethod
    def key(labels: torch.Tensor, generator: torch.Generator, parameters, networks: Iterable,
            settings: Iterable = (), control_maps: Iterable[torch.Tensor] = ()) -> str:
        """The sha256 of everything the anatomy stage's result depends on.

        ``networks``: the modules the stage runs (their fingerprints); ``settings``: further values that
        change its arithmetic (device, thread count, schedule, model info, control names and scales);
        ``control_maps``: the control images that steer the stage.
        """
        digest = hashlib.sha256()
        read = {k: v for k, v in dataclasses.asdict(parameters).items() if k not in PATHOLOGY_ONLY_SETTINGS}
        for part in (repr(sorted(read.items())), repr(list(settings)),
                     repr([module_fingerprint(n) for n in networks]), str(tuple(labels.shape)), str(labels.dtype)):
            digest.update(part.encode() + b"\0")
        digest.update(_tensor_bytes(labels))
        digest.update(_tensor_bytes(generator.get_state()))
        for control_map in control_maps:
            digest.update(str(tuple(control_map.shape)).encode())
            digest.update(_tensor_bytes(control_map.float()))
        return digest.hexdigest()

    def get(self, key: str) -> Optional[AnatomyStageResult]:
        """A copy of the stored result (callers may not change the stored tensors), or None."""
        result = self._results.get(key)
        if result is None:
            return None
        self._results.move_to_end(key)
        return AnatomyStageResult(result.x_hat.clone(), result.x_a_gen.clone(), result.generator_state.clone())

    def put(self, key: str, x_hat: torch.Tensor, x_a_gen: torch.Tensor, generator: torch.Generator) -> None:
        self._results[key] = AnatomyStageResult(x_hat.clone(), x_a_gen.clone(), generator.get_state().clone())
        self._results.move_to_end(key)
        while len(self._results) > self.entries:
            self._results.popitem(last=False)

    def clear(self) -> None:
        self._results.clear()
