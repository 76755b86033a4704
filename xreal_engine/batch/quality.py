"""The per-image quality check: did the generated image follow the requested anatomy?

The shipped anatomy segmenter (``training/segmenter.py``, trained on real images only) segments the
result as written (the input grid; the segmenter resamples to its own size), and the Dice of each
requested structure is what ``generate_to_directory`` puts into ``provenance.json`` under ``quality``::

    {"anatomy_dice": {"left lung": 0.91, "right lung": 0.93, "heart": 0.89}, "segmenter": "small-128px-3fa2c1d9e0ab"}

Structures absent from the request are not scored. With a minimum (``--min-dice``) an image whose
lowest Dice is below it is refused before anything is written (:class:`QualityRejected`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError, XRealError
from ..model.info import weights_hash
from ..training.segmenter import (SHIPPED_SEGMENTER_DIR, STRUCTURES, Segmenter, check_segmenter_files,
                                  dice_per_structure, labels_to_channels)


def check_min_dice(value: Optional[float], name: str = "--min-dice") -> Optional[float]:
    """The one range of a minimum Dice (0..1), for every place that takes one (CLI flags, the service)."""
    if value is not None and not 0 <= value <= 1:
        raise InputError(f"{name} must be from 0 to 1, not {value:g}.")
    return value


def check_segmenter(directory: Path) -> Path:
    """``--segmenter`` before a batch writes anything (its workers load it only later)."""
    return check_segmenter_files(directory)


class QualityRejected(XRealError):
    """The image did not follow the anatomy well enough; it was not written."""

    job_error_code = "quality_rejected"  # the service's error code of such a job (a dropped batch row)

    def __init__(self, quality: dict, minimum: float):
        self.quality = quality
        low = {name: dice for name, dice in quality["anatomy_dice"].items() if dice < minimum}
        super().__init__("anatomy not followed: Dice " + ", ".join(f"{n} {d:.3f}" for n, d in low.items())
                         + f" below --min-dice {minimum:g}")


class AnatomyCheck:
    """Callable for ``generate_to_directory(..., quality=check)``: (image, requested labels) -> quality dict."""

    def __init__(self, segmenter: Segmenter, identifier: str, min_dice: Optional[float] = None):
        self.segmenter = segmenter
        self.identifier = identifier
        self.min_dice = min_dice

    @classmethod
    def load(cls, directory: Optional[Path] = None, device: str = "cpu", min_dice: Optional[float] = None):
        directory = Path(directory) if directory is not None else SHIPPED_SEGMENTER_DIR
        segmenter = Segmenter.load(directory, device=device)
        return cls(segmenter, segmenter_id(segmenter, directory), min_dice)

    def __call__(self, image: np.ndarray, anatomy: np.ndarray) -> dict:
        predicted = self.segmenter.segment(np.asarray(image, dtype=np.float32)[None])[0]
        scores = dice_per_structure(predicted, labels_to_channels(np.asarray(anatomy)))
        requested = {name for value, name in STRUCTURES.items() if (anatomy == value).any()}
        quality = {"anatomy_dice": {name: round(dice, 4) for name, dice in scores.items() if name in requested},
                   "segmenter": self.identifier}
        if self.min_dice is not None and quality["anatomy_dice"] and \
                min(quality["anatomy_dice"].values()) < self.min_dice:
            raise QualityRejected(quality, self.min_dice)
        return quality


@functools.lru_cache(maxsize=4)
def _loaded(directory: str, device: str) -> AnatomyCheck:
    return AnatomyCheck.load(Path(directory) if directory else None, device=device)


def shared_check(device: str, min_dice: Optional[float] = None, directory: Optional[Path] = None) -> AnatomyCheck:
    """A check whose segmenter is loaded once per process and device (the service's worker runs many jobs)."""
    loaded = _loaded(str(directory) if directory else "", str(device))
    return AnatomyCheck(loaded.segmenter, loaded.identifier, min_dice)


def segmenter_id(segmenter: Segmenter, directory: Path) -> str:
    """``<preset>-<size>px-<first 12 hex of the weights hash>``: which segmenter gave the numbers."""
    return f"{segmenter.config.get('preset', 'custom')}-{segmenter.image_size}px-{weights_hash(directory)[:12]}"
