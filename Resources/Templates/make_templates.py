"""Rebuild the anatomy templates and example pathology masks from the wingspan training masks (MIT).

Run once by the maintainers: ``.venv/bin/python Resources/Templates/make_templates.py ../shared/data/cxr``.
The product never runs it (it reads the PNGs written here).

Templates are chosen from the *training* split only, spread over the cardiothoracic ratio so
that users start from a range of hearts; masks with heavy lung/heart overlap are skipped.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

HERE = Path(__file__).resolve().parent
COUNT = 5


def overlap_fraction(bits: np.ndarray) -> float:
    """Fraction of heart pixels that annotators also drew as lung (bit 4 = heart, bits 1/2 = lungs)."""
    heart = (bits & 4) > 0
    return float(((bits & 3) > 0)[heart].mean()) if heart.any() else 1.0


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Binary dilation by a square of side 2*pixels+1 (PIL's max filter; no SciPy needed)."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.filter(ImageFilter.MaxFilter(2 * pixels + 1))) > 0


def main(cxr_dir: Path) -> None:
    rows = [r for r in csv.DictReader((cxr_dir / "manifest.csv").open())
            if r["subset"] == "wingspan" and r["split"] == "train" and r["ctr"]]
    candidates = []
    for row in rows:
        labels = np.asarray(Image.open(cxr_dir / "wingspan" / "labels" / f"{row['image']}.png"))
        bits = np.asarray(Image.open(cxr_dir / "wingspan" / "anatomy_bits" / f"{row['image']}.png"))
        if set(np.unique(labels)) == {0, 1, 2, 3} and overlap_fraction(bits) < 0.02:
            candidates.append((float(row["ctr"]), row["image"], labels))
    candidates.sort()
    # anatomy_01: the median heart (the `make demo` template), then the spread from small to large hearts.
    quantiles = [0.5, 0.1, 0.3, 0.7, 0.9]
    chosen = [candidates[int(q * (len(candidates) - 1))] for q in quantiles[:COUNT]]
    sources = []
    for index, (ctr, image_id, labels) in enumerate(chosen, start=1):
        Image.fromarray(labels.astype(np.uint8)).save(HERE / f"anatomy_{index:02d}.png")
        sources.append(f"anatomy_{index:02d}.png  wingspan {image_id}  CTR {ctr:.3f}")

    labels = chosen[0][2]
    heart = labels == 3
    cardiomegaly = dilate(heart, 14)
    Image.fromarray(cardiomegaly.astype(np.uint8)).save(HERE / "pathology_cardiomegaly.png")

    # Pneumonia: an ellipse in the lower third of the right lung (label 2, image left), kept inside the lung.
    right_lung = labels == 2
    rows_idx, cols_idx = np.nonzero(right_lung)
    top, bottom = rows_idx.min(), rows_idx.max()
    centre_row = top + 0.72 * (bottom - top)
    in_band = right_lung[int(centre_row)]
    centre_col = np.nonzero(in_band)[0].mean()
    yy, xx = np.mgrid[: labels.shape[0], : labels.shape[1]]
    ellipse = ((yy - centre_row) / (0.16 * (bottom - top))) ** 2 + ((xx - centre_col) / 18.0) ** 2 <= 1.0
    pneumonia = ellipse & right_lung
    Image.fromarray(pneumonia.astype(np.uint8)).save(HERE / "pathology_pneumonia.png")
    print("\n".join(sources))
    print(f"cardiomegaly region {int(cardiomegaly.sum())} px (heart {int(heart.sum())} px); pneumonia {int(pneumonia.sum())} px")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "data" / "cxr"))
