"""Post-decode overlay: outside a pathology region, keep the image the pathology stage started from.

A pathology stage re-encodes and re-decodes the WHOLE image (XReal's design), so even with every
latent outside the region held, every pixel moves a little (one encode/decode of the demo model
changes pixels by 0.0066 on average) and most of the change lands outside the region. diffusers'
inpainting pipelines paste the original pixels back after decoding (``VaeImageProcessor.apply_overlay``);
this does the same with a feathered mask so the seam is not a hard edge. It is the sampling switch
``keep_outside_region`` (model/sampling.py), off unless a model's defaults or the request turn it on.
"""

import torch
import torch.nn.functional as F


def feather_pixels(image_size: int) -> int:
    """Width of the soft border outside the region: 2 px at 128, 4 px at 256."""
    return max(1, image_size // 64)


def feathered_region(region: torch.Tensor, image_size: int) -> torch.Tensor:
    """(1, 1, S, S) weights: 1 on the (latent-size) region upsampled to the image, falling smoothly to 0
    within 2 x feather_pixels outside it (dilate, then box-blur by the same radius)."""
    mask = F.interpolate(region.float().reshape(1, 1, *region.shape[-2:]), size=(image_size, image_size),
                         mode="nearest")
    radius = feather_pixels(image_size)
    kernel = 2 * radius + 1
    dilated = F.max_pool2d(mask, kernel, stride=1, padding=radius)
    return F.avg_pool2d(dilated, kernel, stride=1, padding=radius, count_include_pad=False).clamp(0, 1)


def keep_outside(before: torch.Tensor, after: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``after`` inside the feathered region, ``before`` (exactly) where its weight is 0; (1, C, S, S) images."""
    weight = feathered_region(region.to(after.device), after.shape[-1]).to(after.dtype)
    return before * (1 - weight) + after * weight
