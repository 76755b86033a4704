"""``train calibrate-controller`` (training/calibration.py): the anatomy controller's brightness bias removed.

A tiny controller trained for two steps on 4 real wingspan images is calibrated: only the bias of the
decoder's last convolution changes, by one offset for every channel, and the calibrated controller's rough
images then have the training images' mean brightness; refusals are one sentence and write nothing.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from test_autoencoder_finetune import config_file, data  # noqa: F401  (the module's 4-image data fixture)
from xreal_engine.cli import main
from xreal_engine.training.calibration import CALIBRATION_FILE, decoder_outputs, fit_offset
from xreal_engine.training.data import make_dataset, read_records


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
    out.mkdir()
    (out / "kept.txt").write_text("x")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("{}")
    assert main(["train", "calibrate-controller", "--anatomy-controller", str(tmp_path / "c"), "--data", str(data),
                 "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]
