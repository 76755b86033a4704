"""Several jobs from one drawing: "Generate variations" and "Interpolate pathology" (paper Fig. 3).

Variations keep the masks and use N consecutive seeds. Interpolation keeps the
anatomy and the seed, and moves the pathology mask along a drawn path: one job
per position, so the only thing that changes between images is where the finding is.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np

from xreal_engine.errors import InputError

MAX_SEED = 2**32 - 1
MAX_SERIES_LENGTH = 64


def variation_seeds(first_seed: int, count: int) -> List[int]:
    """``count`` consecutive seeds starting at ``first_seed`` (wrapping inside the engine's seed range)."""
    count = int(count)
    if not 1 <= count <= MAX_SERIES_LENGTH:
        raise InputError(f"The number of variations must be between 1 and {MAX_SERIES_LENGTH}; got {count}.")
    return [(int(first_seed) + index) % (MAX_SEED + 1) for index in range(count)]


def ras_to_pixel(points_ras: np.ndarray, ras_to_ijk: np.ndarray) -> np.ndarray:
    """Markups points (N, 3) in RAS -> (N, 2) pixel positions (row, column) on the canvas."""
    points = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
    homogeneous = np.hstack([points, np.ones((len(points), 1))])
    ijk = homogeneous @ np.asarray(ras_to_ijk, dtype=np.float64).T
    return np.stack([ijk[:, 1], ijk[:, 0]], axis=1)  # (j, i) = (row, column)


def positions_along_path(path_rc: np.ndarray, count: int) -> np.ndarray:
    """``count`` positions evenly spaced by arc length along a polyline of (row, column) points."""
    path = np.asarray(path_rc, dtype=np.float64).reshape(-1, 2)
    count = int(count)
    if not 2 <= count <= MAX_SERIES_LENGTH:
        raise InputError(f"The number of interpolation steps must be between 2 and {MAX_SERIES_LENGTH}; got {count}.")
    if len(path) < 2:
        raise InputError("The interpolation path needs at least two points; place them with the Markups toolbar.")
    lengths = np.linalg.norm(np.diff(path, axis=0), axis=1)
    total = float(lengths.sum())
    if total <= 0:
        raise InputError("The interpolation path has no length; place its points at different positions.")
    cumulative = np.concatenate([[0.0], np.cumsum(lengths)])
    targets = np.linspace(0.0, total, count)
    rows = np.interp(targets, cumulative, path[:, 0])
    columns = np.interp(targets, cumulative, path[:, 1])
    return np.stack([rows, columns], axis=1)


def shift_mask(mask: np.ndarray, d_row: int, d_column: int) -> np.ndarray:
    """Translate a 2D mask by whole pixels, filling with 0 (what leaves the canvas is cut off)."""
    mask = np.asarray(mask)
    out = np.zeros_like(mask)
    rows, columns = mask.shape
    src_r = slice(max(0, -d_row), min(rows, rows - d_row))
    dst_r = slice(max(0, d_row), min(rows, rows + d_row))
    src_c = slice(max(0, -d_column), min(columns, columns - d_column))
    dst_c = slice(max(0, d_column), min(columns, columns + d_column))
    if src_r.start < src_r.stop and src_c.start < src_c.stop:
        out[dst_r, dst_c] = mask[src_r, src_c]
    return out


def interpolated_masks(mask: np.ndarray, positions_rc: Sequence[Sequence[float]]) -> List[np.ndarray]:
    """The pathology mask moved so its centroid sits on each position (row, column)."""
    mask = np.asarray(mask) != 0
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if not mask.any():
        raise InputError("The pathology segment to move is empty; paint it before interpolating.")
    centroid = np.argwhere(mask).mean(axis=0)
    moved = []
    for index, (row, column) in enumerate(positions_rc, start=1):
        shifted = shift_mask(mask, int(round(row - centroid[0])), int(round(column - centroid[1])))
        if not shifted.any():
            raise InputError(f"Position {index} of the interpolation path moves the pathology off the canvas.")
        moved.append(shifted)
    return moved
