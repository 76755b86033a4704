"""Checks of the pipeline's array inputs: shapes, finiteness, label values and binary masks."""

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .info import ModelInfo


def square_array(array, name: str, sizes: Sequence[int]) -> torch.Tensor:
    """A finite 2D square float32 tensor of one of ``sizes``, or InputError naming ``name``."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    try:
        array = np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"The {name} is not a numeric array.") from None
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] not in sizes:
        allowed = " or ".join(f"{s}x{s}" for s in sizes)
        raise InputError(f"The {name} has shape {array.shape}; this model needs a 2D {allowed} array.")
    if not np.isfinite(array).all():
        raise InputError(f"The {name} contains NaN or infinite values.")
    return torch.from_numpy(array.astype(np.float32))


def anatomy_labels(anatomy, info: ModelInfo) -> torch.Tensor:
    """The label map checked against the model's labels; labels it was trained without become background."""
    labels = square_array(anatomy, "anatomy label map", [info.image_size])
    values = {float(v) for v in torch.unique(labels).tolist()}
    ignored = info.ignored_label_values()
    allowed = {0.0} | {float(v) for v in info.accepted_label_values()}
    unknown = sorted(values - allowed)
    if unknown:
        shown = ", ".join(f"{v:g}" for v in unknown[:5])
        raise InputError(
            f"The anatomy label map contains values {shown} that this model does not know "
            f"(allowed: {', '.join(f'{v:g}' for v in sorted(allowed))})."
        )
    for value in ignored:  # labels the model was trained without are background to it
        labels[labels == value] = 0
    return labels


def pathology_mask(mask, index: int, info: ModelInfo) -> torch.Tensor:
    """A binary region at latent size (an image-size mask is max-pooled: any pixel in the region counts)."""
    mask = square_array(mask, f"pathology mask {index + 1}", [info.image_size, info.latent_size])
    if not torch.isin(mask, torch.tensor([0.0, 1.0])).all():
        raise InputError(f"The pathology mask {index + 1} must be binary (0 and 1 only).")
    if mask.shape[0] != info.latent_size:
        # A latent pixel is regenerated if any of its image pixels is in the region.
        factor = info.image_size // info.latent_size
        mask = F.max_pool2d(mask[None, None], kernel_size=factor)[0, 0]
    if not mask.any():
        raise InputError(f"The pathology mask {index + 1} is empty.")
    return mask
