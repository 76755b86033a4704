"""`xreal-engine train controlnet`: a tiny random model's ControlNet trains, resumes and loads; refusals.

Real data (a few wingspan + Hannover images from ../shared), the real accelerate loop and MONAI
jitter; the model is the "tiny" random preset (64 px), so a run takes seconds on one core.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from xreal_engine.cli import main
from xreal_engine.model.random_model import create_random_model
from xreal_engine.training.controlnet import training_example
from xreal_engine.training.synthetic_gaze import (attention_example, gaze_settings, painted_opacity,
                                                  synthetic_attention, synthetic_fixations)

TINY_CONTROLNET = {
    "image_size": "model", "augment": True, "default_scale": 0.8,
    "attention": {"fixations_inside": [10, 12], "fixations_outside": [1, 2], "duration_s": [0.2, 0.4],
                  "gaze_clusters": [1, 1], "cluster_spread": [0.03, 0.03], "opacity_probability": 1.0,
                  "opacity_amplitude": [0.4, 0.4], "opacity_finding": "pneumonia", "lungs_from_segmenter": True},
    "training": {"batch_size": 2, "learning_rate": 1.0e-3, "prompt_dropout": 0.5, "copies": 1, "max_steps": 4,
                 "checkpoint_every": 2, "log_every": 1, "seed": 0},
}
SETTINGS = TINY_CONTROLNET["attention"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return create_random_model(tmp_path_factory.mktemp("model") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_data(shared_dir, tmp_path_factory) -> Path:
    """3 wingspan train images with label maps + 2 Hannover ones without, all in 'train'."""
    cxr = shared_dir / "data" / "cxr"
    out = tmp_path_factory.mktemp("data")
    (out / "images").mkdir()
    (out / "labels").mkdir()
    with (cxr / "manifest.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "train"]
    picked = ([r for r in rows if r["subset"] == "wingspan" and r["ctr"]][:3]
              + [r for r in rows if r["subset"] == "hannover_unlabeled"][:2])
    with (out / "findings.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "split", "finding"])
        for row in picked:
            source = cxr / row["subset"]
            shutil.copyfile(source / "images" / f"{row['image']}.png", out / "images" / f"{row['image']}.png")
            if row["subset"] == "wingspan":
                shutil.copyfile(source / "labels" / f"{row['image']}.png", out / "labels" / f"{row['image']}.png")
                finding = "cardiomegaly" if float(row["ctr"]) > 0.5 else "no finding"
            else:
                finding = "pneumonia"
            writer.writerow([row["image"], "train", finding])
    return out


def toy_anatomy(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A label map (lungs left/right, heart between) and an image that is bright only in the right lung's top."""
    labels = np.zeros((size, size), dtype=np.int64)
    labels[10:50, 6:26], labels[10:50, 38:58], labels[30:52, 24:40] = 2, 1, 3
    image = np.full((size, size), 0.2, dtype=np.float32)
    image[10:20, 6:26] = 0.9
    return labels, image


def test_synthetic_fixations_follow_the_documented_rule():
    labels, _ = toy_anatomy()
    rng = np.random.default_rng(0)
    fixations = synthetic_fixations(labels, "cardiomegaly", rng, SETTINGS)
    x, y = np.round(fixations[:, 0]).astype(int), np.round(fixations[:, 1]).astype(int)
    in_heart = labels[np.clip(y, 0, 63), np.clip(x, 0, 63)] == 3
    assert 11 <= len(fixations) <= 14 and 10 <= in_heart.sum() <= 12  # inside + a few strays
    assert ((fixations[:, 2] >= 0.2) & (fixations[:, 2] <= 0.4)).all()
    # no cardiomegaly: one focused cluster in the lungs (spread 3 % of the side = 1.9 px)
    for seed in range(10):
        fixations = synthetic_fixations(labels, "pneumonia", np.random.default_rng(seed), SETTINGS)
        inside = fixations[:10]  # the first ones are the cluster, the last 1-2 the strays
        x, y = np.round(inside[:, 0]).astype(int), np.round(inside[:, 1]).astype(int)
        assert np.isin(labels[y, x], (1, 2)).all()
        assert np.hypot(inside[:, 0] - inside[:, 0].mean(), inside[:, 1] - inside[:, 1].mean()).max() < 10
    heat = synthetic_attention(labels, "pneumonia", np.random.default_rng(1), SETTINGS)
    assert heat.shape == (64, 64) and heat.dtype == np.float32 and heat.max() == pytest.approx(1.0)
    # deterministic for a seed; no lungs and no heart -> no map (the image is skipped)
    again = synthetic_attention(labels, "pneumonia", np.random.default_rng(1), SETTINGS)
    np.testing.assert_array_equal(heat, again)
    assert synthetic_attention(np.zeros_like(labels), "pneumonia", rng, SETTINGS) is None
    # both ends of the cluster-spread range stay inside the lungs
    for spread in (0.04, 0.10):
        wide = gaze_settings({**SETTINGS, "cluster_spread": [spread, spread], "fixations_outside": [0, 0]})
        points = synthetic_fixations(labels, "", np.random.default_rng(2), wide)
        assert np.isin(labels[np.round(points[:, 1]).astype(int), np.round(points[:, 0]).astype(int)], (1, 2)).all()


def test_painted_opacity_brightens_the_lungs_where_the_gaze_is():
    labels, image = toy_anatomy()
    heat = synthetic_attention(labels, "pneumonia", np.random.default_rng(3), SETTINGS)
    painted, control, finding = attention_example(image, labels, "", np.random.default_rng(3), SETTINGS)
    np.testing.assert_array_equal(control, heat)  # the map is the gaze, painted or not
    assert finding == "pneumonia"  # the painted image is prompted as the opacity finding
    brighter = painted - image
    assert brighter.min() >= 0 and painted.max() <= 1
    peak = np.unravel_index(np.argmax(heat * np.isin(labels, (1, 2))), heat.shape)
    assert brighter[peak] > 0.2 * (1 - image[peak])  # amplitude 0.4 at the gaze's peak (lung edge softened)
    assert brighter[np.isin(labels, (0,)) & (heat < 0.05)].max() < 0.01  # outside lungs and gaze: unchanged
    # cardiomegaly: the heart is the finding; the image is not painted and the prompt stays
    kept, _, finding = attention_example(image, labels, "cardiomegaly", np.random.default_rng(3), SETTINGS)
    np.testing.assert_array_equal(kept, image)
    assert finding == "cardiomegaly"
    # probability 0: never painted
    never = gaze_settings({**SETTINGS, "opacity_probability": 0.0})
    kept, _, finding = attention_example(image, labels, "", np.random.default_rng(3), never)
    np.testing.assert_array_equal(kept, image)
    assert finding == ""
    np.testing.assert_array_equal(painted_opacity(image, np.zeros_like(heat), labels, 0.5), image)


def test_training_maps_come_from_the_image_or_the_labels():
    labels, image = toy_anatomy()
    rng = np.random.default_rng(0)
    picture, sobel, finding = training_example("sobel", image, None, "x", rng, SETTINGS)
    assert picture is image and finding == "x"
    assert sobel.shape == (64, 64) and sobel[15, 15] == 0 and sobel[20, 15] > 0.5  # an edge at row 20 only
    _, lungs, _ = training_example("lungs", image, labels, "", rng, SETTINGS)
    np.testing.assert_array_equal(lungs, np.isin(labels, (1, 2)).astype(np.float32))
    assert training_example("lungs", image, None, "", rng, SETTINGS) is None  # no label map: skipped
    assert training_example("attention", image, None, "", rng, SETTINGS) is None


@pytest.mark.slow
def test_controlnet_trains_resumes_and_loads(tiny_model, tiny_data, tmp_path):
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    config = tmp_path / "controlnet.yaml"
    config.write_text(yaml.safe_dump(TINY_CONTROLNET), encoding="utf-8")
    run_dir = tmp_path / "run"
    arguments = ["train", "controlnet", "--control", "sobel", "--model", str(tiny_model), "--data", str(tiny_data),
                 "--out", str(run_dir), "--config", str(config), "--num-threads", "1"]
    assert main(arguments) == 0
    assert main(arguments + ["--resume", "--max-steps", "6"]) == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # 5 and 6 came from the resumed run
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-4", "step-6"]

    model_dir = run_dir / "model"
    folder = model_dir / "controlnet_sobel"
    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    # An interrupted run is finished from its newest checkpoint: the same weights, no new steps.
    shutil.rmtree(model_dir)
    assert main(arguments + ["--resume", "--max-steps", "6"]) == 0
    assert len((run_dir / "log.jsonl").read_text().splitlines()) == 6
    again = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    assert {t.dtype for t in weights.values()} == {torch.float16}  # small on disk
    controlnet = ControlNetModel.from_pretrained(folder)
    assert controlnet.config.conditioning_channels == 1
    assert list(controlnet.config.conditioning_embedding_out_channels) == [16, 32, 64]
    # trained: the zero convolutions are no longer zero
    assert float(controlnet.controlnet_mid_block.weight.detach().abs().sum()) > 0
    info = json.loads((model_dir / "xreal_model.json").read_text())
    assert info["controlnets"] == {"sobel": {"scale": 0.8}}
    base = json.loads((tiny_model / "xreal_model.json").read_text())
    assert {k: v for k, v in info.items() if k != "controlnets"} == base  # the rest of the model is the base's
    for component in ("unet", "vae", "text_encoder"):
        assert (model_dir / component).is_dir()

    # OUT/model is a model directory the pipeline loads; the trained ControlNet changes the image.
    from xreal_engine.model.pipeline import XRealPipeline

    pipe = XRealPipeline.from_pretrained(model_dir)
    assert set(pipe.controlnets) == {"sobel"} and pipe.model_info.controlnets == {"sobel": 0.8}
    anatomy = np.zeros((64, 64), dtype=np.int64)
    anatomy[10:50, 6:26], anatomy[10:50, 38:58], anatomy[30:52, 24:40] = 2, 1, 3
    edges = np.zeros((64, 64), dtype=np.float32)
    edges[:, ::8] = 1.0

    def generate(controls):
        return pipe(anatomy, num_inference_steps=2, anatomy_steps=1, generator=torch.Generator().manual_seed(0),
                    controls=controls).image

    assert not np.array_equal(generate([("sobel", edges, None)]), generate(None))


@pytest.mark.slow
def test_attention_controlnet_uses_synthetic_maps_for_every_image(tiny_model, tiny_data, tmp_path):
    config = tmp_path / "controlnet.yaml"
    config.write_text(yaml.safe_dump({**TINY_CONTROLNET, "training": {**TINY_CONTROLNET["training"], "max_steps": 2}}))
    run_dir = tmp_path / "run"
    assert main(["train", "controlnet", "--control", "attention", "--model", str(tiny_model), "--data",
                 str(tiny_data), "--out", str(run_dir), "--config", str(config), "--num-threads", "1"]) == 0
    assert (run_dir / "model" / "controlnet_attention" / "config.json").is_file()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["control"] == "attention"


def test_unknown_control_is_one_sentence_and_writes_nothing(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "controlnet", "--control", "gaze", "--model", "demo", "--data", str(tiny_data),
                 "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "Unknown control 'gaze'" in error and "sobel" in error and error.count("\n") == 0
    assert not out.exists()


# ----------------------------------------------------------------------------- controllability (evaluate)


@pytest.fixture(scope="module")
def test_split(shared_dir, tmp_path_factory) -> Path:
    """2 wingspan test images with their label maps, in a 'test' split."""
    cxr = shared_dir / "data" / "cxr"
    out = tmp_path_factory.mktemp("test_data")
    (out / "images").mkdir()
    (out / "labels").mkdir()
    with (cxr / "manifest.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "test" and r["subset"] == "wingspan"][:2]
    with (out / "findings.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "split", "finding"])
        for row in rows:
            for kind in ("images", "labels"):
                shutil.copyfile(cxr / "wingspan" / kind / f"{row['image']}.png", out / kind / f"{row['image']}.png")
            writer.writerow([row["image"], "test", "cardiomegaly"])
    return out


def test_controllability_with_and_without(tiny_model, test_split, tmp_path):
    """A fresh ControlNet (zero output) leaves every measure exactly at its no-control baseline; a nudged one moves it."""
    from xreal_engine.model.controlnets import make_controlnet, save_controlnet
    from xreal_engine.model.pipeline import XRealPipeline
    from xreal_engine.model.sampling import SamplingParameters
    from xreal_engine.training.controllability import measure_controllability
    from xreal_engine.training.segmenter import Segmenter, read_layout

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    pipe = XRealPipeline.from_pretrained(model_dir)
    for name in ("sobel", "attention"):
        save_controlnet(make_controlnet(pipe.unet), model_dir, name, 1.0)
    pipe = XRealPipeline.from_pretrained(model_dir)
    samples = read_layout(test_split, "test")
    parameters = SamplingParameters.resolve(pipe.model_info.defaults, num_inference_steps=2, anatomy_steps=1)
    segmenter = Segmenter.load()
    controls = [("sobel", None), ("attention", None)]
    fresh = measure_controllability(pipe, segmenter, samples, controls, parameters, progress=False)["controls"]
    assert fresh["sobel"]["with"] == fresh["sobel"]["without"] and fresh["sobel"]["gain"]["mean"] == 0
    assert fresh["sobel"]["gain"]["n"] == 2
    assert fresh["attention"]["with"] is None  # no change at all: nothing to share out
    assert fresh["attention"]["without"]["n"] == 2  # the other seed's change is there
    with torch.no_grad():
        pipe.controlnets["sobel"].controlnet_mid_block.weight.normal_(0, 0.5)
    nudged = measure_controllability(pipe, segmenter, samples, [("sobel", 2.0)], parameters, out_dir=tmp_path,
                                     progress=False)["controls"]["sobel"]
    assert nudged["with"]["mean"] != nudged["without"]["mean"] and nudged["scale"] == 2.0
    assert (tmp_path / "controllability_sheet.png").is_file()


def test_evaluate_refuses_a_control_the_model_lacks(tiny_model, test_split, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(test_split), "--out", str(out),
                 "--control", "sobel"]) == 2
    error = capsys.readouterr().err.strip()
    assert "sobel" in error and "ControlNet" in error and error.count("\n") == 0
    assert not out.exists()
