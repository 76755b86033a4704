"""Realism metrics for ``evaluate``: do generated images look like the held-out real radiographs?

No downloaded network (the field's FID extractors download Inception weights at run time), so:

- sharpness: mean gradient magnitude and variance of the Laplacian (grey levels 0..255, both sets at the
  model's pixel size), reported as generated / real ratios and their geometric mean;
- exposure: the fractions of burnt-white (>= 250) and black (<= 5) pixels, also for the lower third
  (where an over-exposed abdomen shows), and the distance between the grey-level histograms;
- a Fréchet distance between the shipped anatomy segmenter's bottleneck features (mean-pooled) of
  generated and real images, with the same distance between two real held-out splits as its floor
  (the sets are small, so the number only compares models measured with the same protocol).

Every function takes (N, H, W) float arrays in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch

BURNT_WHITE = 250 / 255
BLACK = 5 / 255
HISTOGRAM_BINS = 64


def _grey_levels(images: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(images, dtype=np.float64), 0, 1) * 255.0


def sharpness(images: np.ndarray) -> dict:
    """Mean over images of the mean gradient magnitude and of the Laplacian's variance (grey levels)."""
    from scipy import ndimage

    grey = _grey_levels(images)
    gradient, laplacian = [], []
    for image in grey:
        dy, dx = np.gradient(image)
        gradient.append(float(np.hypot(dx, dy).mean()))
        laplacian.append(float(ndimage.laplace(image, mode="reflect").var()))
    return {"mean_gradient_magnitude": float(np.mean(gradient)), "laplacian_variance": float(np.mean(laplacian))}


def exposure(images: np.ndarray) -> dict:
    """Burnt-white and black pixel fractions, whole image and lower third."""
    images = np.asarray(images, dtype=np.float64)
    lower = images[:, 2 * images.shape[1] // 3:, :]
    return {
        "burnt_white_fraction": float((images >= BURNT_WHITE).mean()),
        "burnt_white_fraction_lower_third": float((lower >= BURNT_WHITE).mean()),
        "black_fraction": float((images <= BLACK).mean()),
        "mean_intensity": float(images.mean()),
    }


def histogram_distance(generated: np.ndarray, real: np.ndarray) -> dict:
    """Total-variation distance of the grey-level histograms (0 same, 1 disjoint) and the 1-D Wasserstein
    distance in grey levels (how far, on average, intensity has to move)."""
    from scipy.stats import wasserstein_distance

    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    a = np.histogram(np.clip(generated, 0, 1), bins=edges)[0].astype(np.float64)
    b = np.histogram(np.clip(real, 0, 1), bins=edges)[0].astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2 * 255.0
    return {"total_variation": float(0.5 * np.abs(a / a.sum() - b / b.sum()).sum()),
            "wasserstein_grey_levels": float(wasserstein_distance(centres, centres, a, b))}


def bottleneck_module(network: torch.nn.Module) -> torch.nn.Module:
    """The innermost layer of a MONAI UNet (its ``model`` nests Sequential(down, SkipConnection, up))."""
    from monai.networks.layers.simplelayers import SkipConnection

    module = network.model
    while isinstance(module, torch.nn.Sequential) and isinstance(module[1], SkipConnection):
        module = module[1].submodule
    return module


def segmenter_features(segmenter, images: np.ndarray) -> np.ndarray:
    """(N, C) mean-pooled bottleneck activations of the segmenter for (N, H, W) images."""
    features = []
    hook = bottleneck_module(segmenter.network).register_forward_hook(
        lambda module, inputs, output: features.append(output.float().mean(dim=(-2, -1)).cpu()))
    try:
        segmenter.probabilities(images)
    finally:
        hook.remove()
    return torch.cat(features).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, C) feature sets (MONAI's FID formula)."""
    from monai.metrics.fid import get_fid_score

    score = get_fid_score(torch.as_tensor(a), torch.as_tensor(b))
    # With fewer images than features the covariances are singular and sqrtm may return tiny imaginary parts.
    return float((score.real if torch.is_complex(score) else score).item())


def geometric_mean(values) -> float | None:
    values = [v for v in values if v is not None]
    if not values or min(values) <= 0:
        return None
    return float(np.exp(np.mean(np.log(values))))


def realism_report(generated: np.ndarray, real: np.ndarray, segmenter=None, floor_real: np.ndarray | None = None) -> dict:
    """All realism numbers of ``generated`` against ``real`` (the same held-out split).

    ``floor_real``: another real held-out split; the Fréchet distance between it and ``real`` is the floor
    that generated images can at best reach with these sample sizes.
    """
    generated_sharpness, real_sharpness = sharpness(generated), sharpness(real)
    ratios = {name: (generated_sharpness[name] / real_sharpness[name] if real_sharpness[name] > 0 else None)
              for name in generated_sharpness}
    report = {
        "images": {"generated": int(len(generated)), "real": int(len(real))},
        "sharpness": {"generated": generated_sharpness, "real": real_sharpness, "ratio": ratios,
                      "ratio_geometric_mean": geometric_mean(ratios.values())},
        "exposure": {"generated": exposure(generated), "real": exposure(real)},
        "histogram_distance": histogram_distance(generated, real),
    }
    if segmenter is not None:
        real_features = segmenter_features(segmenter, real)
        report["segmenter_frechet_distance"] = frechet_distance(segmenter_features(segmenter, generated), real_features)
        if floor_real is not None and len(floor_real) > 1:
            report["segmenter_frechet_distance_real_floor"] = frechet_distance(
                segmenter_features(segmenter, floor_real), real_features)
            report["segmenter_frechet_floor_images"] = int(len(floor_real))
    return report


def summary_line(realism: dict) -> str:
    """One line for the terminal and the contact sheet."""
    sharp, exp = realism["sharpness"], realism["exposure"]
    geo = sharp["ratio_geometric_mean"]
    text = (f"sharpness ratio {geo:.2f}" if geo is not None else "sharpness ratio n/a") + (
        f" (gradient {sharp['ratio']['mean_gradient_magnitude']:.2f}, Laplacian var {sharp['ratio']['laplacian_variance']:.3f})"
        f"; burnt white {exp['generated']['burnt_white_fraction']:.1%} vs real {exp['real']['burnt_white_fraction']:.1%}"
        f"; black {exp['generated']['black_fraction']:.1%} vs {exp['real']['black_fraction']:.1%}"
        f"; histogram TV {realism['histogram_distance']['total_variation']:.3f}")
    if "segmenter_frechet_distance" in realism:
        text += f"; segmenter FD {realism['segmenter_frechet_distance']:.2f}"
        if "segmenter_frechet_distance_real_floor" in realism:
            text += f" (real floor {realism['segmenter_frechet_distance_real_floor']:.2f})"
    return text
