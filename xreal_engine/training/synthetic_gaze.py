"""Synthetic gaze for the attention ControlNet: no eye-tracking data (REFLACX, EGD-CXR) exists here.

RadGazeGen's HVA-CN learns from radiologists' fixations, which cluster on what is abnormal. The
stand-in keeps that one property, "where the map is high, the finding is", and makes it true by
construction:

- **cardiomegaly**: fixations spread over the heart (the finding is the heart's size);
- **otherwise**: *focused gaze*, 1-2 clusters of fixations around random points of the lungs, as a
  reader dwells on a suspected opacity; and, for a share of these images, a **counterfactual
  opacity** painted into the training image where that gaze is (the image brightened towards
  white by the blurred gaze map, inside the lungs), prompted as the opacity finding. The first
  version drew fixations on the lungs' brightest pixels of unchanged images; those lie on the
  same edges in every image, so the map told the ControlNet nothing and its effect was nil
  (MODEL_CARD.md). Painted opacities are a stand-in for real findings: the ControlNet learns
  *where* to put an opacity, the UNet and the prompt what it looks like.

``evaluate --controllability`` draws its test maps with ``synthetic_fixations`` too (never painted:
the model must make the opacity), so training and measure see the same kind of map.
"""

from __future__ import annotations

import numpy as np

MIN_LUNG_FRACTION = 0.02  # a segmented "lung" smaller than this share of the image is no lung
DEFAULTS = {
    "fixations_inside": (30, 60),  # fixations in the finding region (inclusive range)
    "fixations_outside": (2, 6),  # stray ones anywhere else
    "duration_s": (0.15, 0.6),  # uniform; REFLACX fixations are mostly 0.1-0.6 s
    "gaze_clusters": (1, 2),  # focused gaze: this many points of the lungs looked at
    "cluster_spread": (0.04, 0.10),  # each cluster's standard deviation, as a fraction of the image side
    "opacity_probability": 0.8,  # share of focused-gaze images given a painted opacity
    "opacity_amplitude": (0.2, 0.5),  # how far towards white the gaze map's peak is brightened
    "opacity_finding": "pneumonia",  # the prompt of an image with a painted opacity
}


def gaze_settings(settings: dict | None) -> dict:
    """The config's ``attention`` block over ``DEFAULTS`` (one place for every default)."""
    return {**DEFAULTS, **dict(settings or {})}


def _focused_points(lungs: np.ndarray, count: int, rng: np.random.Generator, settings: dict) -> np.ndarray:
    """``count`` (x, y) points around 1-2 random lung pixels, each inside the lungs."""
    ys, xs = np.nonzero(lungs)
    low, high = settings["gaze_clusters"]
    centres = rng.choice(len(xs), size=int(rng.integers(int(low), int(high) + 1)))
    side = max(lungs.shape)
    spreads = rng.uniform(*map(float, settings["cluster_spread"]), len(centres)) * side
    points = []
    while len(points) < count:  # rejection sampling: a point outside the lungs is drawn again
        k = int(rng.integers(len(centres)))
        x = xs[centres[k]] + rng.normal(0.0, spreads[k])
        y = ys[centres[k]] + rng.normal(0.0, spreads[k])
        row, col = int(round(y)), int(round(x))
        if 0 <= row < lungs.shape[0] and 0 <= col < lungs.shape[1] and lungs[row, col]:
            points.append((x, y))
    return np.asarray(points, dtype=np.float64)


def synthetic_fixations(labels: np.ndarray, finding: str, rng: np.random.Generator,
                        settings: dict | None = None) -> np.ndarray | None:
    """Made-up fixations (n, 3: x, y, duration s) for one image; None if it has neither heart nor lungs."""
    settings = gaze_settings(settings)
    labels = np.asarray(labels)
    heart, lungs = labels == 3, np.isin(labels, (1, 2))
    low, high = settings["fixations_inside"]
    inside_count = int(rng.integers(int(low), int(high) + 1))
    if "cardiomegaly" in finding and heart.any():
        region = heart
        ys, xs = np.nonzero(heart)
        picked = rng.choice(len(xs), size=inside_count)
        inside = np.column_stack([xs[picked], ys[picked]]).astype(np.float64)
        inside += rng.uniform(-0.5, 0.5, inside.shape)
    elif lungs.mean() >= MIN_LUNG_FRACTION:
        region = lungs
        inside = _focused_points(lungs, inside_count, rng, settings)
    else:
        return None
    points = [inside]
    out_low, out_high = settings["fixations_outside"]
    outside_count = int(rng.integers(int(out_low), int(out_high) + 1))
    out_ys, out_xs = np.nonzero(~region)
    if outside_count and len(out_xs):
        stray = rng.choice(len(out_xs), size=outside_count)
        points.append(np.column_stack([out_xs[stray], out_ys[stray]]).astype(np.float64))
    points = np.concatenate(points)
    d_low, d_high = settings["duration_s"]
    return np.column_stack([points, rng.uniform(float(d_low), float(d_high), len(points))])


def synthetic_attention(labels: np.ndarray, finding: str, rng: np.random.Generator,
                        settings: dict | None = None) -> np.ndarray | None:
    """``synthetic_fixations`` blurred into a map in [0, 1] the way a fixation CSV is (None: no region)."""
    from ..io.controls import attention_from_fixations

    fixations = synthetic_fixations(labels, finding, rng, settings)
    return None if fixations is None else attention_from_fixations(fixations, np.asarray(labels).shape)


def painted_opacity(image: np.ndarray, heat: np.ndarray, labels: np.ndarray, amplitude: float) -> np.ndarray:
    """The image brightened towards white by ``amplitude * heat`` inside the (slightly softened) lungs."""
    from skimage.filters import gaussian

    lungs = gaussian(np.isin(labels, (1, 2)).astype(np.float64), sigma=1.0, preserve_range=True)
    image = np.asarray(image, dtype=np.float64)
    return np.clip(image + amplitude * heat * lungs * (1.0 - image), 0.0, 1.0).astype(np.float32)


def attention_example(image: np.ndarray, labels: np.ndarray, finding: str, rng: np.random.Generator,
                      settings: dict | None = None):
    """One training example: (image, possibly with a painted opacity; attention map; prompt) or None."""
    settings = gaze_settings(settings)
    heat = synthetic_attention(labels, finding, rng, settings)
    if heat is None:
        return None
    focused = not ("cardiomegaly" in finding and (np.asarray(labels) == 3).any())
    if focused and rng.random() < float(settings["opacity_probability"]):
        amplitude = float(rng.uniform(*map(float, settings["opacity_amplitude"])))
        return painted_opacity(image, heat, labels, amplitude), heat, str(settings["opacity_finding"])
    return np.asarray(image, dtype=np.float32), heat, finding
