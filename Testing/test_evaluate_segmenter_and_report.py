"""Evaluation: the anatomy segmenter (training, shipped weights) and the `evaluate` report on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from xreal_engine import cli
from xreal_engine.training.evaluate import (
    CONTACT_SHEET_FILE,
    REPORT_FILE,
    enlarge_heart,
    ms_ssim,
    ms_ssim_settings,
    narrow_lungs,
    pathology_region,
)
from xreal_engine.training.segmenter import (
    STRUCTURES,
    Segmenter,
    build_network,
    load_arrays,
    mean_dice,
    read_layout,
    save_segmenter,
    train_segmenter,
)


@pytest.fixture(scope="module")
def data_dir(shared_dir, tmp_path_factory):
    """The wingspan subset in the training layout (DATA/images, labels, findings.csv), via prepare-data."""
    from xreal_engine.training.prepare_data import prepare_data

    out_dir = tmp_path_factory.mktemp("data") / "wingspan"
    prepare_data(shared_dir / "data" / "cxr", out_dir, subsets=("wingspan",))
    return out_dir


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from xreal_engine.model.random_model import create_random_model

    return create_random_model(tmp_path_factory.mktemp("models") / "tiny", preset="tiny")


@pytest.fixture(scope="module")
def untrained_segmenter(tmp_path_factory):
    torch.manual_seed(0)
    config = {"preset": "tiny", "image_size": 64, "trained_on": "nothing (random weights)"}
    return save_segmenter(build_network("tiny"), config, tmp_path_factory.mktemp("seg") / "untrained")


def test_layout_keeps_only_images_with_lungs_and_heart(data_dir):
    samples = read_layout(data_dir, "train")
    assert len(samples) == 205
    labels = np.asarray(Image.open(samples[0].label_path))
    assert {1, 2, 3} <= set(np.unique(labels).tolist())


def test_segmenter_training_loss_goes_down_and_directory_loads(data_dir, tmp_path):
    config = train_segmenter(data_dir, tmp_path / "seg", size=64, epochs=12, batch_size=6, learning_rate=1e-2,
                             preset="tiny", limit=6, progress=False)
    losses = config["epoch_losses"]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.95 * np.mean(losses[:3]), losses
    assert set(config["test_dice_real"]) == set(STRUCTURES.values())
    segmenter = Segmenter.load(tmp_path / "seg")
    masks = segmenter.segment(np.random.default_rng(0).random((2, 96, 96), dtype=np.float32))
    assert masks.shape == (2, 3, 96, 96) and masks.dtype == bool


def test_shipped_segmenter_segments_real_test_images(data_dir):
    """The shipped weights are the ceiling of every generated-image number: they must be good on real images."""
    segmenter = Segmenter.load()
    images, labels = load_arrays(read_layout(data_dir, "test"), segmenter.image_size)
    dice = mean_dice(segmenter, images, labels)
    assert all(value > 0.85 for value in dice.values()), dice


def test_counterfactual_edits_change_the_right_structure(data_dir):
    labels = np.asarray(Image.open(read_layout(data_dir, "test")[0].label_path)).astype(np.int64)
    bigger = enlarge_heart(labels)
    assert 1.4 < (bigger == 3).sum() / (labels == 3).sum() < 1.7  # 1.25² ≈ 1.56
    narrower = narrow_lungs(labels)
    for value in (1, 2):
        width = np.ptp(np.nonzero(labels == value)[1])
        assert np.ptp(np.nonzero(narrower == value)[1]) < 0.9 * width
    assert ((narrower == 3) == (labels == 3)).all()
    region = pathology_region(labels, "cardiomegaly")
    assert region[labels == 3].all() and region.mean() < 0.5


@pytest.mark.parametrize("size", [64, 128, 256])
def test_ms_ssim_settings_are_valid_at_model_sizes(size):
    settings = ms_ssim_settings(size)
    assert abs(sum(settings["weights"]) - 1) < 1e-6
    image = np.random.default_rng(1).random((size, size), dtype=np.float32)
    assert ms_ssim(image, image) == pytest.approx(1.0, abs=1e-4)
    assert ms_ssim(image, np.random.default_rng(2).random((size, size), dtype=np.float32)) < 0.5


def test_evaluate_tiny_model_writes_well_formed_report(tiny_model, untrained_segmenter, data_dir, tmp_path):
    out = tmp_path / "report"
    code = cli.main(["evaluate", "--model", str(tiny_model), "--data", str(data_dir), "--split", "test",
                     "--limit", "3", "--steps", "3", "--segmenter", str(untrained_segmenter), "--out", str(out)])
    assert code == 0
    report = json.loads((out / REPORT_FILE).read_text())
    from xreal_engine import __version__
    from xreal_engine.model.info import weights_hash

    assert report["model"]["weights_hash"] == weights_hash(tiny_model)  # which weights, not only which model_id
    assert report["model"]["engine_version"] == __version__
    assert report["settings"]["images"] == 3 and report["settings"]["num_inference_steps"] == 3
    assert report["settings"]["unet_runtime"] == "frozen"  # many images from one process, on a CPU
    for key in ("anatomy_dice_generated", "baseline_dice_real_own_mask", "baseline_dice_real_other_mask"):
        assert set(report[key]) == set(STRUCTURES.values())
        for summary in report[key].values():
            assert 0.0 <= summary["mean"] <= 1.0
    assert report["anatomy_dice_generated"]["heart"]["n"] == 6  # 3 anatomies x 2 seeds
    assert 0.0 <= report["ms_ssim_between_seeds"]["mean"] <= 1.0 and report["ms_ssim_between_seeds"]["n"] == 3
    assert report["pathology"], "no pathology run was reported"
    for values in report["pathology"].values():
        assert 0.0 <= values["fraction_of_change_inside_region"]["mean"] <= 1.0
        assert 0.0 < values["region_area_fraction"]["mean"] < 1.0
        assert values["mean_change_inside_region"]["mean"] >= 0.0
    assert set(report["counterfactuals"]) == {"heart enlarged by a quarter", "lungs narrowed"}
    for values in report["counterfactuals"].values():
        assert 0.0 <= values["follows_request_fraction"] <= 1.0
        assert 0.0 <= values["dice_vs_request"]["mean"] <= 1.0
    for record in report["per_image"]:  # an image counts as following only if it drew the request at all
        for run in record["counterfactuals"].values():
            assert run["follows_request"] == (run["dice_vs_request"] > run["dice_vs_source_anatomy"]
                                              and run["dice_vs_request"] >= 0.5)
    assert len(report["per_image"]) == 3
    realism = report["realism"]
    assert realism["images"] == {"generated": 6, "real": 3}
    assert realism["sharpness"]["ratio_geometric_mean"] > 0
    assert 0.0 <= realism["exposure"]["generated"]["burnt_white_fraction"] <= 1.0
    assert 0.0 <= realism["histogram_distance"]["total_variation"] <= 1.0
    assert realism["segmenter_frechet_distance"] >= 0 and realism["segmenter_frechet_distance_real_floor"] >= 0
    sheet = Image.open(out / CONTACT_SHEET_FILE)
    # 6 columns, 3 rows, and the realism summary wrapped below them
    assert sheet.size[0] == 6 * 128 and sheet.size[1] > 16 + 3 * 128
    assert np.asarray(sheet).std() > 10  # images and outlines, not a blank canvas
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left behind


def test_evaluate_refuses_bad_requests_with_one_line(tiny_model, untrained_segmenter, data_dir, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    base = ["evaluate", "--model", str(tiny_model), "--data", str(data_dir), "--segmenter", str(untrained_segmenter)]
    cases = [
        (base + ["--out", str(tmp_path / "full")], "not empty"),
        (base + ["--out", str(tmp_path / "a"), "--seeds", "0"], "--seeds"),
        (base + ["--out", str(tmp_path / "b"), "--split", "nonexistent"], "no 'nonexistent' images"),
        (["evaluate", "--model", str(tiny_model), "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "c")],
         "findings.csv"),
        (base[:-1] + [str(tmp_path / "noseg"), "--out", str(tmp_path / "d")], "holds no segmenter"),
    ]
    for argv, expected in cases:
        assert cli.main(argv) == 2
        error = capsys.readouterr().err.strip()
        assert expected in error and len(error.splitlines()) == 1, error
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--batch-size", "0", "--batch-size must be at least 1, not 0."),
    ("--epochs", "0", "--epochs must be at least 1, not 0."),
    ("--limit", "0", "--limit must be at least 1, not 0."),
    ("--limit", "-1", "--limit must be at least 1, not -1."),
    ("--learning-rate", "-1", "--learning-rate must be a positive number, not -1.0."),
    ("--learning-rate", "nan", "--learning-rate must be a positive number, not nan."),
    ("--size", "0", "--size must be a multiple of 16 and at least 32, not 0."),
    ("--device", "tpu", "Unknown device 'tpu'; use auto, cpu or cuda."),
    ("--threads", "0", "--threads must be a whole number of at least 1, not 0."),
])
def test_train_segmenter_refuses_bad_numbers_with_one_line(data_dir, tmp_path, capsys, option, value, message):
    out = tmp_path / "seg"
    assert cli.main(["train", "segmenter", "--data", str(data_dir), "--out", str(out), option, value]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(message) and len(error.splitlines()) == 1, error
    assert not out.exists()
