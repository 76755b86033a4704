"""``train calibrate-controller`` (training/calibration.py): the anatomy controller's brightness bias removed.

A tiny controller trained for two steps on 4 real wingspan images is calibrated: only the bias of the
decoder's last convolution changes, by one offset for every channel, and the calibrated controller's rough
images then have the training images' mean brightness; refusals are one sentence and write nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from test_autoencoder_finetune import config_file, data  # noqa: F401  (the module's 4-image data fixture)
from xreal_engine.cli import main
from xreal_engine.training.calibration import CALIBRATION_FILE, decoder_outputs, fit_offset
from xreal_engine.training.data import make_dataset, read_records

DEMO_CONTROLLER = Path(__file__).resolve().parents[1] / "xreal_engine" / "demo_model" / "anatomy_controller"


def test_offset_matches_the_mean_of_the_clamped_output():
    rng = np.random.default_rng(0)
    outputs = rng.uniform(-0.2, 1.3, size=(4, 8, 8))
    for goal in (0.05, 0.5, 0.95):
        offset = fit_offset(outputs, np.full_like(outputs, goal))
        assert abs(np.clip(outputs + offset, 0, 1).mean() - goal) < 1e-9


def test_calibrated_controller_has_the_training_brightness(data, tmp_path, capsys):  # noqa: F811
    base = tmp_path / "controller"
    assert main(["train", "anatomy-controller", "--data", str(data), "--out", str(base), "--config",
                 str(config_file(tmp_path)), "--max-steps", "2"]) == 0
    out = tmp_path / "calibrated"
    assert main(["train", "calibrate-controller", "--anatomy-controller", str(base / "model"), "--data", str(data),
                 "--out", str(out), "--image-size", "32"]) == 0
    assert "Calibrated on 4 training images" in capsys.readouterr().out

    before = load_file(str(base / "model" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(out / "model" / "diffusion_pytorch_model.safetensors"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["decoder.conv_out.bias"]
    shift = after["decoder.conv_out.bias"] - before["decoder.conv_out.bias"]
    report = json.loads((out / "model" / CALIBRATION_FILE).read_text())
    assert torch.allclose(shift, torch.full_like(shift, report["offset"]), atol=1e-6)

    dataset = make_dataset(read_records(data, "train", require_labels=True), 32, with_label=True, augment=False)
    outputs, targets = decoder_outputs(AutoencoderKL.from_pretrained(out / "model").eval(), dataset)
    assert abs(np.clip(outputs, 0, 1).mean() - targets.mean()) < 1e-4
    assert abs(report["after"]["mean"] - report["before"]["real_mean"]) < 1e-4


def test_refusals_write_nothing(data, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert main(["train", "calibrate-controller", "--anatomy-controller", str(tmp_path / "nosuch"), "--data", str(data),
                 "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "is not an AutoencoderKL directory" in error and "Traceback" not in error
    assert not out.exists()
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(
        (DEMO_CONTROLLER / "config.json").read_text())  # no weights beside it
    for controller, message in (("unet", "is not an AutoencoderKL directory"), ("broken", "could not be loaded")):
        assert main(["train", "calibrate-controller", "--anatomy-controller", str(tmp_path / controller),
                     "--data", str(data), "--out", str(out)]) == 2
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error
        assert not out.exists()
    for size in ("0", "2", "130", "4097"):  # the demo controller downsamples by 4: 8..4096 in steps of 4
        assert main(["train", "calibrate-controller", "--anatomy-controller", str(DEMO_CONTROLLER), "--data", str(data),
                     "--out", str(out), "--image-size", size]) == 2
        assert "multiple of 4 from 8 to 4096" in capsys.readouterr().err
    out.mkdir()
    (out / "kept.txt").write_text("x")
    assert main(["train", "calibrate-controller", "--anatomy-controller", str(DEMO_CONTROLLER), "--data", str(data),
                 "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]


def test_smallest_image_size_and_the_default(data, tmp_path):  # noqa: F811
    """The lower end of --image-size (8 for the demo controller) works; without it, the config's sample_size."""
    from xreal_engine.training.calibration import check_controller

    assert check_controller(DEMO_CONTROLLER, None) == 128 and check_controller(DEMO_CONTROLLER, 4096) == 4096
    out = tmp_path / "small"
    assert main(["train", "calibrate-controller", "--anatomy-controller", str(DEMO_CONTROLLER), "--data", str(data),
                 "--out", str(out), "--image-size", "8"]) == 0
    assert json.loads((out / "model" / CALIBRATION_FILE).read_text())["images"] == 4
