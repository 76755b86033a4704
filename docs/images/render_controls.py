"""Draw every control map of one training X-ray into docs/images/controls.png, for README.md (maintainers only).

The maps are the engine's own (``xreal_engine.io.controls``), at the model's image size (256): a Sobel,
Canny and texture map of the X-ray, the lung mask of its anatomy label map, and two attention maps: from
gaze fixations (a handful written here for the picture: this project has no gaze data) and from a painted
region. The X-ray must be from the TRAINING split (``findings.csv``), so no held-out image is shown.

    .venv/bin/python docs/images/render_controls.py /work/data/permissive ws_0002 docs/images/controls.png
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from xreal_engine.io.controls import attention_from_fixations, attention_from_region, control_map

SIZE = 256
CAPTION = 22  # pixels of caption under each tile
# Illustrative fixations (x, y in pixels of the 256 grid, seconds): the heart border and the lower right lung.
FIXATIONS = np.array([[150, 170, 0.8], [160, 180, 0.5], [140, 160, 0.3], [80, 150, 0.4], [75, 190, 0.3],
                      [120, 90, 0.1]])


def split_of(data_dir: Path, image_id: str) -> str:
    with open(data_dir / "findings.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["id"] == image_id:
                return row["split"]
    raise SystemExit(f"{image_id} is not in {data_dir / 'findings.csv'}.")


def tile(array: np.ndarray, caption: str) -> Image.Image:
    picture = Image.new("L", (SIZE, SIZE + CAPTION), 255)
    picture.paste(Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)), (0, 0))
    ImageDraw.Draw(picture).text((6, SIZE + 5), caption, fill=0)
    return picture


def main(data_dir: str, image_id: str, out: str) -> None:
    data = Path(data_dir)
    if split_of(data, image_id) != "train":
        raise SystemExit(f"{image_id} is not in the training split; pick a training image for the docs.")
    xray = np.asarray(Image.open(data / "images" / f"{image_id}.png").convert("L"), dtype=np.float32) / 255.0
    labels = np.asarray(Image.open(data / "labels" / f"{image_id}.png"))
    painted = np.zeros(xray.shape, bool)
    painted[140:200, 120:190] = True
    maps = [
        (xray, f"reference X-ray ({image_id}, train)"),
        (control_map("sobel", reference=xray, size=SIZE), "sobel"),
        (control_map("canny", reference=xray, size=SIZE), "canny"),
        (control_map("texture", reference=xray, size=SIZE), "texture (local entropy)"),
        (control_map("lungs", labels=labels, size=SIZE), "lungs (labels 1 + 2)"),
        (control_map("attention", attention=attention_from_fixations(FIXATIONS, xray.shape), size=SIZE),
         "attention: 6 fixations"),
        (control_map("attention", attention=attention_from_region(painted), size=SIZE), "attention: painted region"),
    ]
    tiles = [tile(array, caption) for array, caption in maps]
    columns = 4
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("L", (columns * (SIZE + 4), rows * (SIZE + CAPTION + 4)), 255)
    for index, picture in enumerate(tiles):
        sheet.paste(picture, ((index % columns) * (SIZE + 4), (index // columns) * (SIZE + CAPTION + 4)))
    sheet.save(out, optimize=True)
    print(f"Wrote {out} ({sheet.size[0]}x{sheet.size[1]}).")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
