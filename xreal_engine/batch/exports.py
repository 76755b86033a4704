"""What a training framework reads: label maps, MONAI datalist, HF imagefolder, nnU-Net pairs, dataset.json.

The per-image result directories (``OUT/images/<name>/``) are the record of what is finished; every
export is rebuilt from them at the end of each run, so a restarted run's exports cover all finished
rows. Images are each result's ``preview.png`` (8-bit, on the grid the masks were drawn on; the 16-bit
original is ``sc.dcm``), hard-linked where the file system allows. Two label maps per image, values
numbered consecutively from 1 (background 0, as nnU-Net requires), their tables in every export and in
dataset.json: ``OUT/labels/<name>.png`` the anatomy structures of the model (the label of the nnU-Net
export), ``OUT/findings/<name>.png`` the pathology regions by finding (a finding region usually covers an
organ, e.g. cardiomegaly the heart, so one map cannot hold both).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .. import __version__
from ..files import staged_directory
from .worker import IMAGES_DIR, is_finished

FORMATS = ("results", "monai", "imagefolder", "nnunet")
LABELS_DIR = "labels"
FINDINGS_DIR = "findings"
SUMMARY_FILE = "dataset.json"
DATALIST_FILE = "datalist.json"


def write_text_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temporary sibling renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(text.encode("utf-8") if isinstance(text, str) else text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def png_bytes(array: np.ndarray) -> bytes:
    """An 8-bit grey PNG of ``array`` (label maps, masks), in memory."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def label_tables(model_info) -> tuple:
    """(anatomy table, finding table): label map value of every name, background 0."""
    anatomy = ["background"] + [model_info.anatomy_labels[str(v)] for v in model_info.label_values()]
    findings = ["background"] + list(model_info.findings)
    return ({name: value for value, name in enumerate(anatomy)}, {name: value for value, name in enumerate(findings)})


def label_maps(result_dir: Path, tables: tuple) -> tuple:
    """The result's segments (segments.json + segments/*.png) as (anatomy, findings) uint8 label maps."""
    from PIL import Image

    result_dir = Path(result_dir)
    segments = json.loads((result_dir / "segments.json").read_text())["segments"]
    shape = Image.open(result_dir / "preview.png").size[::-1]
    maps = (np.zeros(shape, np.uint8), np.zeros(shape, np.uint8))
    for segment in segments:  # removed-finding and attention-control regions are in neither map
        kind = ("anatomy", "pathology").index(segment["kind"]) if segment["kind"] in ("anatomy", "pathology") else None
        name = segment["name"] if kind == 0 else segment["finding"]
        if kind is not None and name in tables[kind]:
            maps[kind][np.asarray(Image.open(result_dir / segment["file"])) > 0] = tables[kind][name]
    return maps


def finished_records(rows: list, out_dir: Path) -> list:
    """One record per finished row, in plan order: paths (relative to OUT) and the metadata of its image."""
    records = []
    for row in rows:
        result_dir = Path(out_dir) / IMAGES_DIR / row.name
        if not is_finished(result_dir):
            continue
        provenance = json.loads((result_dir / "provenance.json").read_text())
        dice = (provenance.get("quality") or {}).get("anatomy_dice")
        records.append({
            "name": row.name,
            "image": f"{IMAGES_DIR}/{row.name}/preview.png",
            "label": f"{LABELS_DIR}/{row.name}.png",
            "findings_label": f"{FINDINGS_DIR}/{row.name}.png",
            "seed": provenance["seed"],
            "findings": [f for f in provenance.get("findings", []) if f],
            "mode": provenance.get("mode"),
            # How it was sampled and steered, so a framework can select images by it (scales, stages, sampler).
            "sampler": provenance.get("sampler"),
            "steps": provenance.get("steps"),
            "guidance": provenance.get("guidance"),
            "controls": [{key: control.get(key) for key in ("name", "scale", "stages", "source")}
                         for control in provenance.get("controls") or []],
            "template": row.design.get("template"),
            "heart_scale": row.design.get("heart_scale"),
            "lung_width": row.design.get("lung_width"),
            "anatomy_dice": dice,
            "anatomy_dice_min": min(dice.values()) if dice else None,
            "segmenter": (provenance.get("quality") or {}).get("segmenter"),
            "model_id": provenance.get("model_id"),
            "weights_hash": provenance.get("weights_hash"),
        })
    return records


def write_label_maps(out_dir: Path, records: list, tables: tuple) -> None:
    """OUT/labels/<name>.png and OUT/findings/<name>.png for every finished row without them (they never change)."""
    for record in records:
        paths = (Path(out_dir) / record["label"], Path(out_dir) / record["findings_label"])
        if all(path.is_file() for path in paths):
            continue
        for path, labels in zip(paths, label_maps(Path(out_dir) / IMAGES_DIR / record["name"], tables)):
            write_text_atomic(path, png_bytes(labels))


def _link(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _replace_directory(target: Path, build) -> None:
    """Build a new ``target`` beside it (all at once, files.staged_directory), then swap it in."""
    target = Path(target)
    fresh = target.with_name(f".{target.name}.new")
    shutil.rmtree(fresh, ignore_errors=True)
    with staged_directory(fresh) as staging:
        build(staging)
        for folder in [staging, *(path for path in staging.rglob("*") if path.is_dir())]:
            folder.chmod(0o755)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(fresh, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(fresh, target)


def _metadata(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in ("image", "label", "findings_label")}


def export_monai(out_dir: Path, records: list, tables: tuple, model_id: str) -> None:
    """OUT/datalist.json, Decathlon style: ``monai.data.load_decathlon_datalist(path)`` resolves the paths."""
    datalist = {
        "name": f"xreal-engine synthetic chest X-rays ({model_id})",
        "description": "Generated by xreal-engine generate-batch; see dataset.json for provenance.",
        "modality": {"0": "X-ray"},
        "labels": {str(value): name for name, value in tables[0].items()},
        "finding_labels": {str(value): name for name, value in tables[1].items()},
        "numTraining": len(records),
        "training": [{"image": r["image"], "label": r["label"], "findings_label": r["findings_label"],
                      **_metadata(r)} for r in records],
    }
    write_text_atomic(Path(out_dir) / DATALIST_FILE, json.dumps(datalist, indent=1) + "\n")


def export_imagefolder(out_dir: Path, records: list) -> None:
    """OUT/imagefolder/train/<name>.png + label_maps/ + finding_maps/ + metadata.jsonl (datasets' imagefolder)."""

    def build(staging: Path) -> None:
        train = staging / "train"
        (train / "label_maps").mkdir(parents=True)
        (train / "finding_maps").mkdir()
        lines = []
        for r in records:
            _link(Path(out_dir) / r["image"], train / f"{r['name']}.png")
            _link(Path(out_dir) / r["label"], train / "label_maps" / f"{r['name']}.png")
            _link(Path(out_dir) / r["findings_label"], train / "finding_maps" / f"{r['name']}.png")
            lines.append(json.dumps({"file_name": f"{r['name']}.png",
                                     "label_map_file_name": f"label_maps/{r['name']}.png",
                                     "finding_map_file_name": f"finding_maps/{r['name']}.png", **_metadata(r)}))
        (train / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))

    _replace_directory(Path(out_dir) / "imagefolder", build)


def export_nnunet(out_dir: Path, records: list, tables: tuple) -> None:
    """OUT/nnunet/imagesTr/<name>_0000.png + labelsTr/<name>.png (anatomy) + dataset.json (nnU-Net v2 layout)."""

    def build(staging: Path) -> None:
        (staging / "imagesTr").mkdir()
        (staging / "labelsTr").mkdir()
        for r in records:
            _link(Path(out_dir) / r["image"], staging / "imagesTr" / f"{r['name']}_0000.png")
            _link(Path(out_dir) / r["label"], staging / "labelsTr" / f"{r['name']}.png")
        dataset = {"channel_names": {"0": "X-ray"}, "labels": tables[0], "numTraining": len(records),
                   "file_ending": ".png", "overwrite_image_reader_writer": "NaturalImage2DIO"}
        (staging / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")

    _replace_directory(Path(out_dir) / "nnunet", build)


def summary(previous: dict, *, model_info, weights_hash: str, model: str, rows: list, records: list,
            failures: dict, formats: list, quality_check: bool, min_dice, last_run: dict) -> dict:
    """The provenance summary of the whole output directory (OUT/dataset.json)."""
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    kinds = [entry["kind"] for entry in failures.values()]
    findings = {}
    for record in records:
        for finding in record["findings"] or ["none"]:
            findings[finding] = findings.get(finding, 0) + 1
    checked = [r["anatomy_dice"] for r in records if r["anatomy_dice"]]
    structures = sorted({name for dice in checked for name in dice})
    quality = {
        "check": bool(quality_check),  # every image made with the shipped segmenter's check, or none
        "checked": len(checked),
        "segmenter": next((r["segmenter"] for r in records if r["segmenter"]), None),
        "min_dice": min_dice,
        "anatomy_dice_mean": {s: round(float(np.mean([d[s] for d in checked if s in d])), 4) for s in structures},
        "anatomy_dice_min": {s: round(float(np.min([d[s] for d in checked if s in d])), 4) for s in structures},
    }
    return {
        "format_version": 1,
        "what": "synthetic chest X-ray data set made by xreal-engine generate-batch (not for clinical use)",
        "engine": "xreal-engine",
        "engine_version": __version__,
        "model_id": model_info.model_id,
        "weights_hash": weights_hash,
        "model": model,
        "counts": {"rows": len(rows), "finished": len(records), "failed": kinds.count("failed"),
                   "dropped": kinds.count("dropped"),
                   "pending": len(rows) - len(records) - len(kinds)},
        "findings": findings,
        "quality": quality,
        "labels": {str(value): name for name, value in label_tables(model_info)[0].items()},
        "finding_labels": {str(value): name for name, value in label_tables(model_info)[1].items()},
        "formats": list(formats),
        "created": previous.get("created", now),
        "updated": now,
        "last_run": last_run,
    }


def write_exports(out_dir: Path, rows: list, formats: list, model_info) -> list:
    """Label maps and every chosen export for the finished rows; returns their records."""
    tables = label_tables(model_info)
    records = finished_records(rows, out_dir)
    if set(formats) - {"results"}:
        write_label_maps(out_dir, records, tables)
    if "monai" in formats:
        export_monai(out_dir, records, tables, model_info.model_id)
    if "imagefolder" in formats:
        export_imagefolder(out_dir, records)
    if "nnunet" in formats:
        export_nnunet(out_dir, records, tables)
    return records
