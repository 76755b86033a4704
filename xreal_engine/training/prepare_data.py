"""``xreal-engine prepare-data``: ``../shared/data/cxr`` (or a copy of its layout) -> the training ``DATA/`` layout.

Every item is checked (PNG headers, sizes, label maps, ids) before anything is written; the output is written
all at once or not at all (``files.staged_directory``). Split out of ``data.py``, which reads the layout.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError
from ..files import check_new_directory, staged_directory
from .data import (FINDINGS_FILE, MAX_LABEL, SPLITS, check_item_files, check_sample_id, csv_rows, decoded_pixels,
                   opened_image, refuse_repeated_ids)

# Subsets of ../shared/data/cxr whose licences allow redistributing a model trained on them.
MANIFEST_COLUMNS = ("subset", "image", "split")
PERMISSIVE_SUBSETS = ("wingspan", "hannover_unlabeled")
CARDIOMEGALY_CTR = 0.5
CARDIOMEDIASTINUM = 5  # the highest value of the shared data's label maps (label_map.json)


# covid_seg_nc's pathology_bits (README of ../shared/data/cxr) -> the vocabulary's finding, first match wins:
# consolidation, the denser opacity, names an image wherever it is drawn (13 train images, 12 of them with
# ground-glass opacity too), else ground-glass opacity (23). Effusion (4) and pneumothorax (8) have one region
# each in the whole set: too few to learn, so they name no image.
PATHOLOGY_BITS = ((2, "consolidation"), (1, "ground-glass opacity"))


def _region_finding(bits_path: Path) -> str:
    """The image's finding from its drawn regions (``PATHOLOGY_BITS``), "" when none is drawn."""
    if not bits_path.is_file():
        return ""
    bits = np.asarray(Image.open(bits_path)).astype(np.int64)
    return next((name for bit, name in PATHOLOGY_BITS if ((bits & bit) > 0).any()), "")


def _finding(row: dict, cxr_dir: Path | None = None) -> str:
    """Image-level finding from the shared manifest (issue 4): CTR > 0.5 = cardiomegaly, Hannover = pneumonia,
    covid_seg_nc = its drawn finding (consolidation, else ground-glass opacity)."""
    if row["subset"] == "covid_seg_nc" and cxr_dir is not None:
        return _region_finding(cxr_dir / row["subset"] / "pathology_bits" / f"{row['image']}.png")
    if row["subset"] == "wingspan":
        if not row.get("ctr"):
            return ""
        return "cardiomegaly" if float(row["ctr"]) > CARDIOMEGALY_CTR else "no finding"
    if row["subset"] == "hannover_unlabeled":
        return "pneumonia"
    return (row.get("finding") or "").strip().lower()


def _manifest_rows(manifest: Path) -> list:
    """The shared data's manifest rows, checked: UTF-8, its columns, plain image ids, known splits."""
    columns, rows = csv_rows(manifest)
    missing = [column for column in MANIFEST_COLUMNS if column not in columns]
    if missing:
        raise InputError(f"{manifest} lacks the columns {', '.join(missing)} (it needs {', '.join(MANIFEST_COLUMNS)}).")
    if not rows:
        raise InputError(f"{manifest} has no rows.")
    for number, row in enumerate(rows, start=2):
        check_sample_id(row["image"], manifest, number)
        if row["split"] not in SPLITS:
            raise InputError(f"{manifest} row {number}: the split {row['split']!r} is not one of {', '.join(SPLITS)}.")
        if (row.get("ctr") or "").strip() and not _is_number(row["ctr"]):
            raise InputError(f"{manifest} row {number}: the cardiothoracic ratio (ctr) {row['ctr']!r} is not a number.")
    return rows


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


INTENSITY_MODES = ("percentile", "none")
STRETCH_PERCENTILES = (0.5, 99.5)


def stretch_intensity(pixels: np.ndarray) -> np.ndarray:
    """Stretch the 0.5th..99.5th percentile to the full range of the dtype (clipped): the sources differ wildly in exposure."""
    top = float(np.iinfo(pixels.dtype).max)
    low, high = np.percentile(pixels, STRETCH_PERCENTILES)
    if high <= low:
        return pixels.copy()
    stretched = (pixels.astype(np.float64) - low) * (top / (high - low))
    return np.clip(np.rint(stretched), 0, top).astype(pixels.dtype)


def _write_image(source: Path, target: Path, intensity: str) -> None:
    """Copy the PNG as it is (``none``) or percentile-stretched, keeping its bit depth (8 or 16 bit grey)."""
    if intensity == "none":
        decoded_pixels(source, f"The image {source}")  # decodes: a damaged file is refused here, not in training
        shutil.copyfile(source, target)
        return
    what = f"The image {source}"
    if opened_image(source, what).mode in ("I;16", "I;16B", "I"):
        pixels = decoded_pixels(source, what).astype(np.uint16)
    else:
        pixels = decoded_pixels(source, what, "L")
    Image.fromarray(stretch_intensity(pixels)).save(target)


def prepare_data(
    cxr_dir: str | Path, out_dir: str | Path, subsets=PERMISSIVE_SUBSETS, intensity: str = "percentile"
) -> dict:
    """Convert ``../shared/data/cxr`` (or a copy) into the training layout; returns counts per split.

    Written into a temporary sibling and renamed, so a failed run leaves nothing behind.
    Label value 5 (cardiomediastinum, covid_seg_nc only) is not an XReal label and becomes background; a
    value above 5 is no label of the shared data at all, and its label map is refused.
    ``intensity="percentile"`` stretches every image (see ``stretch_intensity``); ``"none"`` copies it unchanged.
    """
    if intensity not in INTENSITY_MODES:
        raise InputError(f"--intensity must be one of {', '.join(INTENSITY_MODES)}, not {intensity!r}.")
    cxr_dir, out_dir = Path(cxr_dir), Path(out_dir)
    manifest = cxr_dir / "manifest.csv"
    if not manifest.is_file():
        raise InputError(f"{cxr_dir} is not the shared CXR data directory: manifest.csv is missing.")
    check_new_directory(out_dir)
    rows = _manifest_rows(manifest)
    known = sorted({row["subset"] for row in rows})
    unknown = [s for s in subsets if s not in known]
    if unknown:
        raise InputError(f"--subsets names {', '.join(unknown)}, which {manifest} does not have (it has {', '.join(known)}).")
    rows = [row for row in rows if row["subset"] in subsets]
    refuse_repeated_ids([row["image"] for row in rows], manifest)
    for row in rows:  # every item checked before anything is written
        source = cxr_dir / row["subset"]
        image, label = source / "images" / f"{row['image']}.png", source / "labels" / f"{row['image']}.png"
        if not image.is_file():
            raise InputError(f"{manifest} lists {row['image']!r} in {row['subset']}, but {image} does not exist.")
        check_item_files(row["image"], image, label if label.is_file() else None)

    counts: dict[str, int] = {}
    with staged_directory(out_dir) as staging:  # all or nothing, with the user's umask (mkdtemp would make it 0700)
        (staging / "images").mkdir()
        (staging / "labels").mkdir()
        with (staging / FINDINGS_FILE).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "split", "finding"])
            for row in rows:
                source = cxr_dir / row["subset"]
                _write_image(source / "images" / f"{row['image']}.png", staging / "images" / f"{row['image']}.png", intensity)
                label_path = source / "labels" / f"{row['image']}.png"
                if label_path.is_file():
                    labels = decoded_pixels(label_path, f"The label map {label_path}").copy()
                    unknown = sorted(int(v) for v in np.unique(labels) if v > CARDIOMEDIASTINUM)
                    if unknown:  # not a value of the shared data's label_map.json: a damaged or foreign map
                        raise InputError(f"The label map {label_path} holds the values {unknown[:8]}, which are no "
                                         f"labels of {cxr_dir}/label_map.json (0..{CARDIOMEDIASTINUM}); fix the file "
                                         "or leave its subset out; nothing was written.")
                    labels[labels > MAX_LABEL] = 0  # the cardiomediastinum is no XReal label (above)
                    if labels.any():
                        Image.fromarray(labels.astype(np.uint8)).save(staging / "labels" / f"{row['image']}.png")
                writer.writerow([row["image"], row["split"], _finding(row, cxr_dir)])
                counts[row["split"]] = counts.get(row["split"], 0) + 1
    return counts


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cxr", required=True, type=Path, help="the shared CXR directory (with manifest.csv)")
    parser.add_argument("--out", required=True, type=Path, help="new directory for the training layout")
    parser.add_argument(
        "--subsets",
        default=",".join(PERMISSIVE_SUBSETS),
        help="comma-separated subsets to include (default: the permissively licensed wingspan,hannover_unlabeled)",
    )
    parser.add_argument(
        "--intensity",
        choices=INTENSITY_MODES,
        default="percentile",
        help="percentile (default): stretch each image's 0.5th..99.5th percentile to the full grey range; none: copy as is",
    )


def run(args: argparse.Namespace) -> int:
    subsets = tuple(s.strip() for s in args.subsets.split(",") if s.strip())
    if not subsets:
        raise InputError("--subsets is empty; name at least one subset, e.g. wingspan.")
    counts = prepare_data(args.cxr, args.out, subsets, args.intensity)
    not_permissive = [s for s in subsets if s not in PERMISSIVE_SUBSETS]
    if not_permissive:
        print(f"note: {', '.join(not_permissive)} is not permissively licensed; do not redistribute models trained on it.")
    summary = ", ".join(f"{split} {counts.get(split, 0)}" for split in SPLITS)
    print(f"Wrote {sum(counts.values())} images to {args.out} ({summary}).")
    return 0
