"""Training data: the ``DATA/`` layout, its checks, MONAI loading + augmentation (``prepare_data.py`` writes it).

Layout (see ``xreal_engine/training/__init__.py``): ``images/<id>.png``, optional
``labels/<id>.png`` (0 background, 1 left lung, 2 right lung, 3 heart, 4 aorta) and
``findings.csv`` (id, split, finding). Images are grey, read as float in [0, 1];
every autoencoder of the engine takes and returns images in [0, 1].

Augmentation is deliberately mild (small rotation / scale / shift, gamma and gain
jitter) and never flips left-right: the anatomy is lateralised (heart on the image
right of a PA film) and a flipped film teaches the model a situs inversus.
"""

from __future__ import annotations

import contextlib
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError, first_line
from ..files import PLAIN_NAME_PATTERN  # an id names images/<id>.png
from ..io.formats import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, header_sizes, sniff_file

FINDINGS_FILE = "findings.csv"
SPLITS = ("train", "val", "test")
MAX_LABEL = 4


@dataclass
class Record:
    """One item of the layout."""

    sample_id: str
    split: str
    finding: str
    image: Path
    label: Path | None


def read_records(data_dir: str | Path, split: str = "train", require_labels: bool = False) -> list[Record]:
    """The items of ``split`` (with a label map if ``require_labels``); InputError if the layout is wrong."""
    data_dir = Path(data_dir)
    table = data_dir / FINDINGS_FILE
    if not table.is_file():
        raise InputError(
            f"{data_dir} is not a training data directory: {FINDINGS_FILE} is missing "
            "(write one with `xreal-engine prepare-data`)."
        )
    columns, rows = csv_rows(table)
    if not {"id", "split", "finding"} <= set(columns):
        raise InputError(f"{table} must have the columns id, split and finding.")
    refuse_repeated_ids([row["id"] for row in rows], table)
    records = []
    for number, row in enumerate(rows, start=2):
        check_sample_id(row["id"], table, number)
        if row["split"] != split:
            continue
        image = data_dir / "images" / f"{row['id']}.png"
        if not image.is_file():
            raise InputError(f"{table} lists {row['id']!r} but {image} does not exist.")
        label = data_dir / "labels" / f"{row['id']}.png"
        label = label if label.is_file() else None
        if require_labels and label is None:
            continue
        check_item_files(row["id"], image, label)
        records.append(Record(row["id"], split, (row["finding"] or "").strip().lower(), image, label))
    if not records:
        what = "items with a label map" if require_labels else "items"
        raise InputError(f"{table} has no {what} in the split {split!r}.")
    return records


def check_item_files(sample_id: str, image: Path, label: Path | None) -> None:
    """One sentence, from the PNG headers and before any work, for an item training would read wrongly.

    Every item is resized to image_size x image_size with its label map: a non-square image would be
    squashed, and a label map of another size than its image is not drawn on it.
    """
    size = _png_size(image, f"The image of {sample_id!r} ({image})")
    if size[0] != size[1]:
        raise InputError(f"The image of {sample_id!r} ({image}) is {size[0]} x {size[1]} pixels; training images "
                         "must be square (pad it to a square first, as the shared data's README describes).")
    if label is None:
        return
    if _png_size(label, f"The label map of {sample_id!r} ({label})") != size:
        width, height = _png_size(label, "")
        raise InputError(f"The label map of {sample_id!r} ({label}) is {width} x {height} pixels, its image "
                         f"{size[0]} x {size[1]}; a label map must match its image pixel for pixel.")
    mode = opened_image(label, f"The label map of {sample_id!r} ({label})").mode
    if mode not in LABEL_MODES:
        raise InputError(f"The label map of {sample_id!r} ({label}) is a {LABEL_MODE_NAMES.get(mode, mode)} PNG; "
                         f"label maps are 8-bit single-channel PNGs with the values 0..{MAX_LABEL}.")


# 8-bit grey or palette (the indices are the labels); 16-bit or colour maps would be misread.
LABEL_MODES = ("L", "P")
LABEL_MODE_NAMES = {"I;16": "16-bit", "I;16B": "16-bit", "I": "32-bit", "RGB": "colour (RGB)", "RGBA": "colour (RGBA)",
                    "LA": "grey + alpha", "1": "1-bit"}


def opened_image(path: Path, what: str):
    """The PIL image of ``path`` (header read, pixels not yet), or one sentence for a file PIL cannot read."""
    try:
        return Image.open(path)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise InputError(f"{what} cannot be read as an image ({first_line(error)}).") from None


def _png_size(path: Path, what: str) -> tuple[int, int]:
    """(width, height) from a PNG's header, within the one image side range (``io/formats.py``)."""
    if sniff_file(path) != "png":
        raise InputError(f"{what} is not a PNG file.")
    sizes = header_sizes(path, "png")
    if len(sizes) != 2:
        raise InputError(f"{what} is a damaged PNG file (its header does not read).")
    if not all(MIN_IMAGE_SIDE <= side <= MAX_IMAGE_SIDE for side in sizes):
        raise InputError(f"{what} is {sizes[0]} x {sizes[1]} pixels; each side must be "
                         f"{MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE}.")
    return sizes[0], sizes[1]


def decoded_pixels(path: Path, what: str, mode: str | None = None) -> np.ndarray:
    """The decoded pixels of a PNG (converted to ``mode`` if given); one sentence for a damaged file."""
    image = opened_image(path, what)
    try:
        return np.asarray(image.convert(mode) if mode else image)
    except (OSError, ValueError, SyntaxError) as error:  # a truncated or corrupt file decodes only this far
        raise InputError(f"{what} is a damaged image ({first_line(error)}).") from None


def load_grey(path: Path) -> np.ndarray:
    """(1, H, W) float32 in [0, 1] from an 8- or 16-bit grey (or RGB) PNG, rows top to bottom."""
    what = f"The image {path}"
    if opened_image(path, what).mode in ("I;16", "I;16B", "I"):
        array = decoded_pixels(path, what).astype(np.float32) / 65535.0
    else:
        array = decoded_pixels(path, what, "L").astype(np.float32) / 255.0
    return array[None]


def load_labels(path: Path) -> np.ndarray:
    """(1, H, W) float32 label values 0..4; InputError for other values."""
    labels = decoded_pixels(path, f"The label map {path}")
    if labels.ndim != 2:
        raise InputError(f"The label map {path} must be a single-channel PNG, not {labels.shape}.")
    if labels.max(initial=0) > MAX_LABEL:
        raise InputError(f"The label map {path} has the value {int(labels.max())}; allowed values are 0..{MAX_LABEL}.")
    return labels.astype(np.float32)[None]


def present_labels(records: list[Record]) -> set[int]:
    """Anatomy label values (1..4) drawn in at least one label map of ``records``."""
    found: set[int] = set()
    for record in records:
        if record.label is not None:
            found.update(int(v) for v in np.unique(np.asarray(Image.open(record.label))) if 0 < v <= MAX_LABEL)
    return found


class LoadRecord:
    """MONAI-style first transform: Record -> {"image", "label"?, "finding", "id"} arrays (channel first).

    MONAI's PNG reader transposes to (W, H) by default; reading with PIL keeps rows
    as rows, so no transform can silently mirror the anatomy.
    """

    def __init__(self, with_label: bool):
        self.with_label = with_label

    def __call__(self, record: Record) -> dict:
        item = {"image": load_grey(record.image), "finding": record.finding, "id": record.sample_id}
        if self.with_label:
            if record.label is None:
                raise InputError(f"The item {record.sample_id!r} has no label map in labels/.")
            item["label"] = load_labels(record.label)
        return item


def clamp_unit(array):
    """Keep intensities in [0, 1] after jitter (autoencoders work on [0, 1])."""
    return array.clamp(0.0, 1.0) if hasattr(array, "clamp") else np.clip(array, 0.0, 1.0)


def build_transforms(image_size: int, with_label: bool, augment: bool, counterfactual: dict | None = None):
    """Load, resize to image_size² and (optionally) jitter; labels use nearest neighbour throughout.

    ``counterfactual``: arguments of ``counterfactual.RandCounterfactualAnatomyd`` (enlarged hearts, narrowed
    lungs warped in image and label map alike), for the anatomy controller; None = off.
    """
    from monai.transforms import (
        Compose,
        EnsureTyped,
        Lambdad,
        RandAdjustContrastd,
        RandAffined,
        RandScaleIntensityd,
        Resized,
    )

    keys = ["image", "label"] if with_label else ["image"]
    modes = ["area", "nearest-exact"] if with_label else ["area"]
    transforms = [
        LoadRecord(with_label),
        Resized(keys=keys, spatial_size=(image_size, image_size), mode=modes),
        EnsureTyped(keys=keys, track_meta=False),
    ]
    if counterfactual and with_label:
        from .counterfactual import RandCounterfactualAnatomyd

        transforms.append(RandCounterfactualAnatomyd(**counterfactual))
    if augment:
        transforms += [
            RandAffined(
                keys=keys,
                prob=0.8,
                rotate_range=0.06,  # ~3.5 degrees
                scale_range=(0.06, 0.06),
                translate_range=(0.04 * image_size, 0.04 * image_size),
                mode=["bilinear", "nearest"] if with_label else ["bilinear"],
                padding_mode=["border", "zeros"] if with_label else ["border"],
            ),
            RandAdjustContrastd(keys="image", prob=0.5, gamma=(0.8, 1.25)),
            RandScaleIntensityd(keys="image", prob=0.3, factors=0.08),
            Lambdad(keys="image", func=clamp_unit),
        ]
    return Compose(transforms)


def make_dataset(records: list[Record], image_size: int, with_label: bool, augment: bool,
                 counterfactual: dict | None = None, seed: int | None = None):
    """A MONAI CacheDataset: files are read and resized once, the random jitter runs every epoch.

    ``seed``: the jitter's random state (MONAI's transforms do not follow numpy's or torch's global seed), so
    a pass over the items in order is the same in every run; the training loaders seed each draw instead
    (``loop.SeededDraws``)."""
    from monai.data import CacheDataset

    class ItemsDataset(CacheDataset):
        """A transform's InputError as itself: MONAI wraps it in "applying transform ..." (a RuntimeError), when
        it fills the cache and again for an item it could not cache."""

        def __getitem__(self, index):
            with _our_error_unwrapped():
                return super().__getitem__(index)

    transform = build_transforms(image_size, with_label, augment, counterfactual)
    if seed is not None:
        transform.set_random_state(seed=int(seed))
    with _our_error_unwrapped():
        return ItemsDataset(data=records, transform=transform, cache_rate=1.0, num_workers=0, progress=False)


@contextlib.contextmanager
def _our_error_unwrapped():
    try:
        yield
    except RuntimeError as error:
        cause = error
        while cause is not None and not isinstance(cause, InputError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def csv_rows(path: Path) -> tuple[list, list]:
    """(column names, rows) of a UTF-8 CSV; InputError if it is not UTF-8 text."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # a spreadsheet's byte-order mark is no column name
            reader = csv.DictReader(handle)
            return list(reader.fieldnames or []), list(reader)
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a UTF-8 CSV file.") from None


def check_sample_id(sample_id, table: Path, row_number: int) -> None:
    if not isinstance(sample_id, str) or not PLAIN_NAME_PATTERN.fullmatch(sample_id):
        raise InputError(f"{table} row {row_number}: the id {sample_id!r} is not a plain file name (letters, digits, "
                         "'.', '_', '-'; no folders).")


def refuse_repeated_ids(ids: list, table: Path) -> None:
    """One id names one file (images/<id>.png): an id listed twice would overwrite an image, or put one image
    into two splits (a test image trained on)."""
    first_row: dict = {}
    for number, sample_id in enumerate(ids, start=2):
        if sample_id in first_row:
            raise InputError(f"{table} lists {sample_id!r} twice (rows {first_row[sample_id]} and {number}); "
                             "every image id must be listed once.")
        first_row[sample_id] = number
