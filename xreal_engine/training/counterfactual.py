"""Counterfactual anatomy augmentation for the anatomy controller: enlarged hearts, narrowed lungs.

Users draw hearts larger and lungs narrower than any training mask, and an anatomy controller that
has only seen real (label map, image) pairs keeps drawing the anatomy it knows (issue 15: a heart
drawn 1.25x wider grew 1.22x and beat the source anatomy in half the cases). This transform warps
the image and its label map with one smooth displacement field, so the pair stays consistent:

- heart: scaled about its centroid by s (inside the heart exactly; the weight falls off smoothly
  outside, pushing the lungs aside), s drawn from ``heart_scale``;
- lungs: each narrowed about its own centre by s from ``lung_width`` (horizontal only).

Along every ray the warp is monotone for these ranges, so nothing folds. Labels are resampled with
nearest neighbour (no label is invented), images bilinearly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.transforms import RandomizableTrait

HEART, LUNGS = 3, (1, 2)
FALLOFF = 0.5  # width of the smooth fall-off outside the scaled structure, in units of its half-extent


def _weight(rho: torch.Tensor) -> torch.Tensor:
    """1 inside the (normalised) structure, a Gaussian fall-off outside."""
    return torch.where(rho <= 1, torch.ones_like(rho), torch.exp(-((rho - 1) ** 2) / (2 * FALLOFF**2)))


def _extent(mask: torch.Tensor):
    """(cx, cy, half width, half height) of a boolean (H, W) mask, or None when empty."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(xs) < 4:
        return None
    xs, ys = xs.float(), ys.float()
    return xs.mean(), ys.mean(), (xs.max() - xs.min()) / 2 + 1, (ys.max() - ys.min()) / 2 + 1


def displacement(labels: torch.Tensor, heart_scale: float = 1.0, lung_width: float = 1.0) -> torch.Tensor:
    """(H, W, 2) input-pixel offsets (dx, dy) for each output pixel: input = output + offset."""
    height, width = labels.shape
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                          indexing="ij")
    offset = torch.zeros(height, width, 2)
    if heart_scale != 1.0 and (extent := _extent(labels == HEART)) is not None:
        cx, cy, ax, ay = extent
        rho = torch.sqrt(((x - cx) / (ax * heart_scale)) ** 2 + ((y - cy) / (ay * heart_scale)) ** 2)
        w = _weight(rho) * (1 / heart_scale - 1)
        offset[..., 0] += (x - cx) * w
        offset[..., 1] += (y - cy) * w
    if lung_width != 1.0:
        for value in LUNGS:
            extent = _extent(labels == value)
            if extent is None:
                continue
            cx, cy, ax, ay = extent
            rho = torch.sqrt(((x - cx) / (ax * lung_width)) ** 2 + ((y - cy) / ay) ** 2)
            offset[..., 0] += (x - cx) * _weight(rho) * (1 / lung_width - 1)
    return offset


def warp(array: torch.Tensor, offset: torch.Tensor, mode: str) -> torch.Tensor:
    """(C, H, W) array resampled at output + offset (border padding)."""
    channels, height, width = array.shape
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                          indexing="ij")
    gx = (x + offset[..., 0]) / (width - 1) * 2 - 1
    gy = (y + offset[..., 1]) / (height - 1) * 2 - 1
    grid = torch.stack([gx, gy], dim=-1)[None]
    return F.grid_sample(array[None].float(), grid, mode=mode, padding_mode="border", align_corners=True)[0]


class RandCounterfactualAnatomyd(RandomizableTrait):
    """Dict transform on {"image": (1, H, W), "label": (1, H, W)}: with ``prob``, one counterfactual warp.

    Uses torch's global RNG (seeded by the trainer), so runs are reproducible; the MONAI trait keeps
    CacheDataset from caching its result.
    """

    def __init__(self, prob: float = 0.5, heart_scale=(0.9, 1.35), lung_width=(0.75, 1.0)):
        self.prob, self.heart_scale, self.lung_width = float(prob), tuple(heart_scale), tuple(lung_width)

    def __call__(self, item: dict) -> dict:
        if float(torch.rand(())) >= self.prob:
            return item
        image, label = torch.as_tensor(item["image"]), torch.as_tensor(item["label"])
        draw = lambda bounds: float(bounds[0] + (bounds[1] - bounds[0]) * torch.rand(()))  # noqa: E731
        kind = float(torch.rand(()))
        heart = draw(self.heart_scale) if kind < 2 / 3 else 1.0  # heart, lungs, or both (1/3 each)
        lungs = draw(self.lung_width) if kind >= 1 / 3 else 1.0
        offset = displacement(label[0], heart, lungs)
        item = dict(item)
        item["image"] = warp(image, offset, "bilinear").clamp(0, 1)
        item["label"] = warp(label, offset, "nearest")
        return item
