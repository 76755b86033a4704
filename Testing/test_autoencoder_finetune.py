"""Decoder fine-tuning (training/adversarial.py) and counterfactual anatomy augmentation (training/counterfactual.py).

Tiny networks on 4 real wingspan images: ``train autoencoder --init-from --train decoder`` with the edge loss
and the patch discriminator leaves the encoder (the latent space) bit-identical and resumes; the warps keep
image and label map consistent.
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
from safetensors.torch import load_file

from xreal_engine.cli import main
from xreal_engine.errors import InputError
from xreal_engine.training.adversarial import edge_loss, freeze_for
from xreal_engine.training.counterfactual import RandCounterfactualAnatomyd, displacement, warp

TINY = {
    "image_size": 32, "augment": False,
    "model": {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 3, "norm_num_groups": 8},
    "training": {"batch_size": 2, "learning_rate": 1.0e-3, "kl_weight": 1.0e-6, "max_steps": 6,
                 "checkpoint_every": 3, "log_every": 1, "seed": 0},
}


@pytest.fixture(scope="module")
def data(shared_dir, tmp_path_factory) -> Path:
    cxr = shared_dir / "data" / "cxr"
    out = tmp_path_factory.mktemp("data")
    (out / "images").mkdir()
    (out / "labels").mkdir()
    with (cxr / "manifest.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "train" and r["subset"] == "wingspan"][:4]
    with (out / "findings.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "split", "finding"])
        for row in rows:
            for kind in ("images", "labels"):
                shutil.copyfile(cxr / "wingspan" / kind / f"{row['image']}.png", out / kind / f"{row['image']}.png")
            writer.writerow([row["image"], "train", ""])
    return out


def config_file(tmp_path: Path, **training) -> Path:
    config = json.loads(json.dumps(TINY))
    config["training"].update(training)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def weights(model_dir: Path) -> dict:
    return load_file(str(model_dir / "diffusion_pytorch_model.safetensors"))


def test_decoder_finetune_keeps_the_encoder_and_resumes(data, tmp_path):
    base = tmp_path / "base"
    assert main(["train", "autoencoder", "--data", str(data), "--out", str(base), "--config",
                 str(config_file(tmp_path)), "--max-steps", "2"]) == 0
    config = config_file(tmp_path, adversarial_start=2, discriminator_channels=8, discriminator_layers=2)
    out = tmp_path / "decoder"
    common = ["train", "autoencoder", "--data", str(data), "--out", str(out), "--config", str(config),
              "--init-from", str(base / "model"), "--train", "decoder", "--edge-loss-weight", "1",
              "--adversarial-weight", "0.5"]
    assert main(common + ["--max-steps", "4"]) == 0
    assert main(common + ["--max-steps", "6", "--resume"]) == 0
    before, after = weights(base / "model"), weights(out / "model")
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    resolved = yaml.safe_load((out / "config.yaml").read_text())["training"]
    assert resolved["train"] == "decoder" and resolved["adversarial_weight"] == 0.5


def test_init_from_must_be_an_autoencoder(data, tmp_path, capsys):
    code = main(["train", "autoencoder", "--data", str(data), "--out", str(tmp_path / "x"), "--config",
                 str(config_file(tmp_path)), "--init-from", str(tmp_path)])
    assert code != 0 and "is not an AutoencoderKL directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_anatomy_controller_trains_with_counterfactual_warps(data, tmp_path):
    config = json.loads(json.dumps(TINY))
    config["counterfactual"] = {"prob": 1.0}
    path = tmp_path / "ac.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", "anatomy-controller", "--data", str(data), "--out", str(tmp_path / "ac"),
                 "--config", str(path), "--max-steps", "2"]) == 0


def test_freeze_for_decoder_leaves_only_the_decoder_trainable():
    from diffusers import AutoencoderKL

    model = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=3)
    trainable = {id(p) for p in freeze_for(model, "decoder")}
    assert trainable and all(id(p) not in trainable for p in model.encoder.parameters())
    assert all(id(p) in trainable for p in model.decoder.parameters())
    with pytest.raises(InputError, match="--train must be one of all, decoder"):
        freeze_for(model, "encoder")


def test_edge_loss_punishes_blur():
    image = torch.zeros(1, 1, 16, 16)
    image[..., 8:] = 1.0
    blurred = torch.nn.functional.avg_pool2d(image, 5, stride=1, padding=2, count_include_pad=False)
    assert float(edge_loss(image, image)) == 0.0
    assert float(edge_loss(blurred, image)) > 0.05


def chest():
    yy, xx = np.mgrid[:64, :64]
    labels = np.zeros((64, 64), np.float32)
    labels[((xx - 20) / 9) ** 2 + ((yy - 30) / 18) ** 2 <= 1] = 2
    labels[((xx - 44) / 9) ** 2 + ((yy - 30) / 18) ** 2 <= 1] = 1
    labels[((xx - 36) / 8) ** 2 + ((yy - 42) / 7) ** 2 <= 1] = 3
    return torch.as_tensor(labels)


def test_warps_scale_the_heart_and_narrow_the_lungs():
    labels = chest()
    identity = displacement(labels)
    assert torch.count_nonzero(identity) == 0
    heart = warp(labels[None], displacement(labels, heart_scale=1.25), "nearest")[0]
    assert 1.4 < float((heart == 3).sum() / (labels == 3).sum()) < 1.75  # ~1.25^2
    lungs = warp(labels[None], displacement(labels, lung_width=0.8), "nearest")[0]
    for value in (1, 2):
        assert 0.7 < float((lungs == value).sum() / (labels == value).sum()) < 0.9
    assert set(torch.unique(heart).tolist()) <= {0.0, 1.0, 2.0, 3.0}  # nearest: no label is invented


def test_random_transform_warps_image_and_labels_alike():
    labels = chest()
    item = {"image": (labels / 3.0)[None], "label": labels[None]}
    torch.manual_seed(0)
    warped = RandCounterfactualAnatomyd(prob=1.0)(item)
    # the image was drawn from the labels (heart = white), so the warped heart is white in both
    heart = warped["label"] == 3
    assert float(warped["image"][heart].mean()) > 0.95
    assert abs(float((warped["image"] > 0.99).sum()) / float(heart.sum()) - 1) < 0.1
    assert RandCounterfactualAnatomyd(prob=0.0)(item) is item
