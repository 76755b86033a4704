"""Controllability of a model's ControlNets, measured as RadGazeGen's Table 2 does (``evaluate --controllability``).

Each held-out image of the split is a request: its anatomy label map is the anatomy, the image itself
the reference of the radiomics maps. Every seed generates the image once without any control and once
per ControlNet with that control's map, and the control's own measure is taken WITH and WITHOUT it:

- ``sobel`` / ``canny`` / ``texture``: SSIM (scikit-image) between the map of the reference and the same
  map computed from the generated image. Without = the same seed and anatomy, no control.
- ``lungs``: Dice of the lungs (left and right together) segmented by the shipped segmenter against the
  requested lungs.
- ``attention``: the share of the image change that falls where the attention map is high
  (``io.controls.ATTENTION_REGION_LEVEL``). With = change |with control - without| (same seed); without
  = the change another seed makes without control (|seed s - seed s + SEED_OFFSET|); the region's share
  of the image is what evenly spread change would give. No gaze data exists here: the maps are a
  focused synthetic gaze on part of the test image's lungs (``training.synthetic_gaze``, as in
  training, but the test image is never painted: the model must put the change there).

The generations are anatomy-only (no pathology region), at the model's sampling defaults unless told.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..control_spec import check_name, check_scale
from ..errors import InputError
from ..model.info import missing_controlnet_sentence

SEED_OFFSET = 1000  # the "other seed" of the attention baseline
SHEET_ROWS = 6
MEASURES = {"sobel": "ssim", "canny": "ssim", "texture": "ssim", "lungs": "dice", "attention": "change_share"}


def parse_controls(texts, available: dict) -> list[tuple[str, float | None]]:
    """``NAME[:SCALE]`` words (none: every ControlNet of the model) -> [(name, scale or None = default)]."""
    chosen = []
    for text in texts or [f"{name}" for name in available]:
        name, _, scale = str(text).partition(":")
        name = check_name(name)
        if name not in available:
            raise InputError(missing_controlnet_sentence(name, available))
        chosen.append((name, check_scale(scale, name) if scale else None))
    if not chosen:
        raise InputError("This model has no ControlNets to measure; train one with `xreal-engine train controlnet`.")
    return chosen


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(np.asarray(a, np.float64), np.asarray(b, np.float64), data_range=1.0))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = float(a.sum() + b.sum())
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def change_share(change: np.ndarray, region: np.ndarray) -> float | None:
    total = float(change.sum())
    return None if total <= 0 else float(change[region].sum() / total)


def control_for(name: str, reference: np.ndarray, labels: np.ndarray, rng, size: int) -> np.ndarray:
    """The map a user would give for this test image: its radiomics map, its lungs, or a focused gaze on its lungs."""
    from ..io.controls import control_map
    from .controlnet import attention_settings
    from .synthetic_gaze import synthetic_attention

    if name == "attention":
        settings = attention_settings()
        heat = synthetic_attention(labels, settings["opacity_finding"], rng, settings)
        if heat is None:
            raise InputError("A test image has no lungs for its attention map.")
        return control_map(name, attention=heat, size=size)
    return control_map(name, reference=reference, labels=labels, size=size)


def _summary(values) -> dict | None:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4), "n": len(values)}


def measure_controllability(pipe, segmenter, samples, controls, parameters, seeds: int = 1, out_dir: Path | None = None,
                            progress: bool = True) -> dict:
    """Generate with and without each control for every sample and seed; the report's ``controllability`` dict."""
    from tqdm import tqdm

    from ..io.controls import ATTENTION_REGION_LEVEL, control_map
    from .segmenter import load_image, load_labels

    size = int(pipe.model_info.image_size)
    uses_attention = any(name == "attention" for name, _ in controls)
    total = len(samples) * seeds * (1 + len(controls) + (1 if uses_attention else 0))
    bar = tqdm(total=total, desc="controllability", unit="image", disable=not progress)

    def generate(labels, seed, control=None):
        output = pipe(labels, parameters=parameters, generator=torch.Generator(device=pipe.device).manual_seed(seed),
                      controls=None if control is None else [control])
        bar.update(1)
        return np.asarray(output.image, dtype=np.float64)

    per_image, sheet = {name: [] for name, _ in controls}, []
    started = time.monotonic()
    for index, sample in enumerate(samples):
        reference = load_image(sample.image_path, size)
        labels = load_labels(sample.label_path, size)
        lungs = np.isin(labels, (1, 2))
        maps = {name: control_for(name, reference, labels, np.random.default_rng([17, index]), size)
                for name, _ in controls}
        for seed in range(seeds):
            plain = generate(labels, seed)
            other = generate(labels, seed + SEED_OFFSET) if uses_attention else None
            row = [reference, plain]
            for name, scale in controls:
                steered = generate(labels, seed, (name, maps[name], scale))
                row += [maps[name], steered]
                record = {"id": sample.sample_id, "seed": seed}
                if MEASURES[name] == "ssim":
                    record["with"] = ssim(maps[name], control_map(name, reference=steered, size=size))
                    record["without"] = ssim(maps[name], control_map(name, reference=plain, size=size))
                elif name == "lungs":
                    segmented = segmenter.segment(np.stack([steered, plain]).astype(np.float32))
                    record["with"] = dice(segmented[0, 0] | segmented[0, 1], lungs)
                    record["without"] = dice(segmented[1, 0] | segmented[1, 1], lungs)
                else:
                    region = maps[name] >= ATTENTION_REGION_LEVEL
                    record["with"] = change_share(np.abs(steered - plain), region)
                    record["without"] = change_share(np.abs(other - plain), region)
                    record["region_area_fraction"] = float(region.mean())
                    record["mean_brightness_in_region"] = {"with": float(steered[region].mean()),
                                                           "without": float(plain[region].mean())}
                per_image[name].append(record)
            if len(sheet) < SHEET_ROWS and seed == 0:
                sheet.append(row)
    bar.close()

    result = {"protocol": "RadGazeGen Table 2: each control's own measure with vs without its ControlNet "
                          "(same seed and anatomy); attention maps synthetic (training/synthetic_gaze.py)",
              "images": len(samples), "seeds": seeds, "seconds": round(time.monotonic() - started, 1), "controls": {}}
    for name, scale in controls:
        records = per_image[name]
        gains = [r["with"] - r["without"] for r in records if r["with"] is not None and r["without"] is not None]
        entry = {
            "measure": MEASURES[name], "scale": pipe.model_info.controlnets.get(name, 1.0) if scale is None else scale,
            "with": _summary(r["with"] for r in records), "without": _summary(r["without"] for r in records),
            "gain": _summary(gains), "improved_fraction": round(float(np.mean([g > 0 for g in gains])), 4) if gains else None,
            "per_image": records,
        }
        if name == "attention":
            entry["region_area_fraction"] = _summary(r["region_area_fraction"] for r in records)
            entry["mean_brightness_in_region"] = {
                key: _summary(r["mean_brightness_in_region"][key] for r in records) for key in ("with", "without")}
        result["controls"][name] = entry
    if out_dir is not None and sheet:
        write_sheet(sheet, Path(out_dir) / "controllability_sheet.png")
    return result


def write_sheet(rows: list[list[np.ndarray]], path: Path) -> None:
    """Per row: reference, without control, then (map, with control) per control; grey tiles side by side."""
    tiles = [np.concatenate([np.clip(tile, 0, 1) for tile in row], axis=1) for row in rows]
    Image.fromarray((np.concatenate(tiles, axis=0) * 255).round().astype(np.uint8)).save(path)


def format_controllability(result: dict) -> str:
    lines = []
    for name, entry in result["controls"].items():
        with_, without = entry["with"], entry["without"]
        if with_ and without:
            lines.append(f"{name} ({entry['measure']}, scale {entry['scale']:g}): without {without['mean']:.3f} -> "
                         f"with {with_['mean']:.3f} (improved in {entry['improved_fraction']:.0%})")
        else:
            lines.append(f"{name}: no measurable change")
    return "\n".join(lines)


def run(args, check_arguments, report_file: str) -> int:
    """``evaluate --controllability`` / ``--control NAME[:SCALE]``: only this protocol, into a new report directory.

    ``check_arguments`` and ``report_file`` are evaluate's (passed in: evaluate imports this module).
    """
    import json

    from ..files import staged_directory
    from ..model.info import ModelInfo, resolve_model
    from ..model.loading import configure_threads
    from ..model.pipeline import XRealPipeline
    from ..model.sampling import SamplingParameters
    from .segmenter import Segmenter, read_layout

    check_arguments(args)
    configure_threads(args.threads)
    samples = read_layout(args.data, args.split)[: args.limit]
    if not samples:
        raise InputError(f"{args.data} has no {args.split!r} images with left lung, right lung and heart masks.")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model_dir = resolve_model(args.model)
    info = ModelInfo.load(model_dir)  # refuse a missing ControlNet or bad settings before loading anything
    controls = parse_controls(args.control, info.controlnets)
    parameters = SamplingParameters.resolve(info.defaults, num_inference_steps=args.steps,
                                            anatomy_steps=args.anatomy_steps, sampler=args.sampler, fast=args.fast)
    pipe = XRealPipeline.from_pretrained(model_dir).to(device)
    segmenter = Segmenter.load(args.segmenter, device=device)
    with staged_directory(args.out) as staging:  # the report appears whole or not at all
        result = measure_controllability(pipe, segmenter, samples, controls, parameters, seeds=args.seeds,
                                         out_dir=staging)
        report = {"model": {"model_id": pipe.model_info.model_id, "image_size": pipe.model_info.image_size},
                  "settings": {"split": args.split, "limit": args.limit, "device": device,
                               "threads": torch.get_num_threads(), **parameters.without_seed()},
                  "controllability": result}
        (staging / report_file).write_text(json.dumps(report, indent=2) + "\n")
    print(format_controllability(result))
    print(f"report: {args.out / report_file}")
    return 0
