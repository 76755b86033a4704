"""Training tools: prepare-data, and smoke runs of `xreal-engine train ...` with tiny configs.

Real data (a few wingspan + Hannover images from ../shared), real MONAI transforms, real
accelerate loop; the networks are a few thousand parameters so the whole module takes
well under a minute on one core.
"""

from __future__ import annotations

import contextlib
import csv
import json
import resource
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from xreal_engine.cli import main
from xreal_engine.errors import InputError
from xreal_engine.training.data import make_dataset, read_records
from xreal_engine.training.prepare_data import prepare_data

TINY_AE = {
    "image_size": 32,
    "augment": False,
    "model": {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 3, "norm_num_groups": 8},
    "training": {"batch_size": 4, "learning_rate": 3.0e-3, "kl_weight": 1.0e-6, "max_steps": 30,
                 "checkpoint_every": 10, "log_every": 1, "seed": 0},
}
TINY_LDM = {
    "model_id": "tiny-trained", "description": "tiny smoke-test model", "image_size": 32, "augment": True,
    "scale_factor": "auto",
    "unet": {"block_out_channels": [16, 32], "attention_levels": [False, True], "layers_per_block": 1,
             "attention_heads": 2, "norm_num_groups": 8},
    "text_encoder": {"width": 16, "layers": 1, "heads": 2, "max_length": 8},
    "training": {"batch_size": 4, "learning_rate": 2.0e-3, "warmup_steps": 0, "prompt_dropout": 0.15,
                 "latent_copies": 2, "ema_decay": 0.9, "max_steps": 40, "checkpoint_every": 20, "log_every": 1,
                 "seed": 0},
}


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_data(shared_dir, tmp_path_factory) -> Path:
    """6 wingspan images with label maps (2 per finding) + 2 Hannover images without, all in 'train'."""
    cxr = shared_dir / "data" / "cxr"
    out = tmp_path_factory.mktemp("data")
    (out / "images").mkdir()
    (out / "labels").mkdir()
    with (cxr / "manifest.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "train"]
    wingspan = [r for r in rows if r["subset"] == "wingspan" and r["ctr"]]
    picked = ([r for r in wingspan if float(r["ctr"]) > 0.5][:3] + [r for r in wingspan if float(r["ctr"]) <= 0.5][:3]
              + [r for r in rows if r["subset"] == "hannover_unlabeled"][:2])
    with (out / "findings.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "split", "finding"])
        for row in picked:
            shutil.copyfile(cxr / row["subset"] / "images" / f"{row['image']}.png", out / "images" / f"{row['image']}.png")
            if row["subset"] == "wingspan":
                shutil.copyfile(cxr / row["subset"] / "labels" / f"{row['image']}.png", out / "labels" / f"{row['image']}.png")
                finding = "cardiomegaly" if float(row["ctr"]) > 0.5 else "no finding"
            else:
                finding = "pneumonia"
            writer.writerow([row["image"], "train", finding])
    return out


@pytest.fixture(scope="module")
def trained_autoencoders(tiny_data, tmp_path_factory) -> dict:
    """One autoencoder and one anatomy controller run (30 steps each), shared by the tests below."""
    root = tmp_path_factory.mktemp("runs")
    config = write_yaml(root / "ae.yaml", TINY_AE)
    runs = {}
    for kind in ("autoencoder", "anatomy-controller"):
        runs[kind] = root / kind
        code = main(["train", kind, "--data", str(tiny_data), "--out", str(runs[kind]), "--config", str(config)])
        assert code == 0
    return runs


def test_prepare_data_converts_the_shared_set(shared_dir, tmp_path):
    counts = prepare_data(shared_dir / "data" / "cxr", tmp_path / "data", subsets=("wingspan", "covid_seg_nc"))
    assert counts == {"train": 205 + 36, "val": 24 + 5, "test": 30 + 3}
    rows = list(csv.DictReader((tmp_path / "data" / "findings.csv").open()))
    by_id = {row["id"]: row for row in rows}
    manifest = {r["image"]: r for r in csv.DictReader((shared_dir / "data" / "cxr" / "manifest.csv").open())}
    for sample_id, row in by_id.items():
        source = manifest[sample_id]
        if source["subset"] == "wingspan":
            expected = "" if not source["ctr"] else ("cardiomegaly" if float(source["ctr"]) > 0.5 else "no finding")
            assert row["finding"] == expected
    # covid_seg_nc: the finding its regions show (consolidation wherever drawn, else ground-glass opacity)
    covid = [row for row in rows if row["id"].startswith("cs_") and row["split"] == "train"]
    assert sorted({row["finding"] for row in covid}) == ["consolidation", "ground-glass opacity"]
    assert sum(row["finding"] == "consolidation" for row in covid) == 13
    # covid_seg_nc's cardiomediastinum (5) is not an XReal label: it becomes background, lungs stay.
    covid_id = next(i for i in by_id if i.startswith("cs_"))
    labels = np.asarray(Image.open(tmp_path / "data" / "labels" / f"{covid_id}.png"))
    assert set(np.unique(labels)) <= {0, 1, 2} and labels.any()
    with pytest.raises(InputError, match="not empty"):
        prepare_data(shared_dir / "data" / "cxr", tmp_path / "data")
    with pytest.raises(InputError, match="nosuch"):
        prepare_data(shared_dir / "data" / "cxr", tmp_path / "other", subsets=("nosuch",))
    assert not (tmp_path / "other").exists()


def test_default_subsets_are_the_permissive_ones(shared_dir, tmp_path):
    counts = prepare_data(shared_dir / "data" / "cxr", tmp_path / "data")
    assert sum(counts.values()) == 259 + 243
    ids = [row["id"] for row in csv.DictReader((tmp_path / "data" / "findings.csv").open())]
    assert not any(i.startswith("cs_") for i in ids)
    hannover = [i for i in ids if not i.startswith("ws_")]
    assert hannover and not any((tmp_path / "data" / "labels" / f"{i}.png").exists() for i in hannover)


@pytest.fixture()
def small_cxr(shared_dir, tmp_path) -> Path:
    """A shared-layout directory with one real (dark, 8-bit) wingspan image and one synthetic 16-bit image."""
    cxr = shared_dir / "data" / "cxr"
    out = tmp_path / "cxr"
    with (cxr / "manifest.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames
        row = next(r for r in reader if r["subset"] == "wingspan" and r["split"] == "train")
    (out / "wingspan" / "images").mkdir(parents=True)
    (out / "hannover_unlabeled" / "images").mkdir(parents=True)
    shutil.copyfile(cxr / "wingspan" / "images" / f"{row['image']}.png", out / "wingspan" / "images" / f"{row['image']}.png")
    ramp = np.linspace(9000, 21000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(out / "hannover_unlabeled" / "images" / "hn_synthetic16.png")
    synthetic = dict.fromkeys(fields, "") | {"image": "hn_synthetic16", "subset": "hannover_unlabeled", "split": "train"}
    with (out / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows([row, synthetic])
    return out


def test_prepare_data_stretches_intensities_or_keeps_them(small_cxr, tmp_path):
    manifest = list(csv.DictReader((small_cxr / "manifest.csv").open()))
    sources = {r["image"]: small_cxr / r["subset"] / "images" / f"{r['image']}.png" for r in manifest}
    prepare_data(small_cxr, tmp_path / "norm")  # default: percentile
    prepare_data(small_cxr, tmp_path / "raw", intensity="none")
    for sample_id, source in sources.items():
        original = np.asarray(Image.open(source))
        stretched = np.asarray(Image.open(tmp_path / "norm" / "images" / f"{sample_id}.png"))
        raw = np.asarray(Image.open(tmp_path / "raw" / "images" / f"{sample_id}.png"))
        top = 255 if original.dtype == np.uint8 else 65535
        assert stretched.dtype == original.dtype and stretched.shape == original.shape
        # the source is dark / narrow; the 0.5th..99.5th percentile now spans the full range
        assert np.percentile(original, 99.5) < 0.5 * top
        low, high = np.percentile(stretched, (0.5, 99.5))
        assert low <= 0.01 * top and high >= 0.99 * top and stretched.max() == top
        assert np.corrcoef(original.ravel(), stretched.ravel())[0, 1] > 0.95  # a monotone stretch, same picture
        np.testing.assert_array_equal(raw, original)  # none: pixels unchanged
    with pytest.raises(InputError, match="--intensity"):
        prepare_data(small_cxr, tmp_path / "bad", intensity="zscore")


def test_augmentation_keeps_labels_exact_and_images_in_unit_range(tiny_data):
    records = read_records(tiny_data, "train", require_labels=True)
    dataset = make_dataset(records[:2], 64, with_label=True, augment=True)
    for _ in range(3):
        item = dataset[0]
        assert item["image"].shape == (1, 64, 64) and item["label"].shape == (1, 64, 64)
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
        assert set(torch.unique(item["label"]).tolist()) <= {0.0, 1.0, 2.0, 3.0}
    # no left-right flip: the heart (3) stays on the image right of the midline, where label 1 (left lung) is.
    label = dataset[0]["label"][0].numpy()
    columns = np.nonzero(label == 1)[1]
    assert columns.mean() > 32


def test_autoencoder_and_anatomy_controller_learn(trained_autoencoders):
    from diffusers import AutoencoderKL

    for kind, run_dir in trained_autoencoders.items():
        history = losses(run_dir)
        assert len(history) == 30
        assert np.mean(history[-5:]) < 0.8 * np.mean(history[:5]), kind
        model = AutoencoderKL.from_pretrained(run_dir / "model")
        assert model.config.latent_channels == 3 and model.config.block_out_channels == [8, 16]
        # only the newest checkpoints are kept (keep_checkpoints default 2)
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-20", "step-30"]


def test_resume_continues_from_the_newest_checkpoint(tiny_data, tmp_path):
    config = write_yaml(tmp_path / "ae.yaml", {**TINY_AE, "training": {**TINY_AE["training"], "max_steps": 4,
                                                                         "checkpoint_every": 2}})
    run_dir = tmp_path / "run"
    arguments = ["train", "autoencoder", "--data", str(tiny_data), "--out", str(run_dir), "--config", str(config)]
    assert main(arguments) == 0
    state = torch.load(run_dir / "checkpoints" / "step-4" / "optimizer.bin", weights_only=False)
    assert main(arguments + ["--resume", "--max-steps", "6"]) == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # 5 and 6 came from the resumed run, nothing was repeated
    assert json.loads((run_dir / "checkpoints" / "step-6" / "trainer_state.json").read_text()) == {
        "step": 6, "kind": "autoencoder"}
    # safetensors writes 0600; checkpoints and the model follow the umask like every other file written
    import os
    import stat

    umask = os.umask(0o022)
    os.umask(umask)
    written = [p for folder in ("checkpoints", "model") for p in (run_dir / folder).rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in written)
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o666 & ~umask}
    resumed = torch.load(run_dir / "checkpoints" / "step-6" / "optimizer.bin", weights_only=False)
    # Adam's step counter continued from the checkpoint instead of restarting at 0.
    first = next(iter(state["state"].values()))["step"]
    assert float(next(iter(resumed["state"].values()))["step"]) == float(first) + 2


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("kind", ["autoencoder", "anatomy-controller"])
def test_a_run_resumed_mid_epoch_equals_the_uninterrupted_run_and_a_seed_repeats_it(tiny_data, tmp_path, kind):
    """8 items, batches of 4 (2 per epoch), augmentation on (MONAI jitter, the counterfactual warp for the
    anatomy controller): stopped at step 3, in the middle of the second epoch, and resumed, the run ends with
    the same weights bit for bit as one that ran through, and a second run with the same seed too."""
    training = {**TINY_AE["training"], "max_steps": 6, "checkpoint_every": 3}
    settings = {**TINY_AE, "augment": True, "training": training}
    if kind == "anatomy-controller":
        settings["counterfactual"] = {"prob": 0.5}
    config = write_yaml(tmp_path / "ae.yaml", settings)

    def train(name, *extra):
        arguments = ["train", kind, "--data", str(tiny_data), "--out", str(tmp_path / name), "--config", str(config)]
        assert main(arguments + list(extra)) == 0
        return tmp_path / name

    through = _weights(train("through") / "model")
    again = _weights(train("again") / "model")
    train("resumed", "--max-steps", "3")
    resumed = _weights(train("resumed", "--resume") / "model")
    for other in (again, resumed):
        assert through.keys() == other.keys() and all(torch.equal(through[k], other[k]) for k in through)
    assert losses(tmp_path / "through") == losses(tmp_path / "resumed")


def _short_run(tiny_data, tmp_path):
    """A 4-step autoencoder run with checkpoints at steps 2 and 4; returns its command line and folder."""
    config = write_yaml(tmp_path / "ae.yaml", {**TINY_AE, "training": {**TINY_AE["training"], "max_steps": 4,
                                                                         "checkpoint_every": 2}})
    run_dir = tmp_path / "run"
    arguments = ["train", "autoencoder", "--data", str(tiny_data), "--out", str(run_dir), "--config", str(config)]
    assert main(arguments) == 0
    return arguments, run_dir


@pytest.mark.parametrize("damage", ["weights cut short", "state not JSON"])
def test_resume_skips_a_damaged_newest_checkpoint(tiny_data, tmp_path, capsys, damage):
    arguments, run_dir = _short_run(tiny_data, tmp_path)
    newest = run_dir / "checkpoints" / "step-4"
    shutil.copytree(newest, newest.with_name("step-4.bak"))  # a user's copy is not a checkpoint (nor a crash)
    if damage == "weights cut short":
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (newest / "trainer_state.json").write_text("{\"step\": 4", encoding="utf-8")
    before = torch.load(run_dir / "checkpoints" / "step-2" / "optimizer.bin", weights_only=False)
    capsys.readouterr()
    assert main(arguments + ["--resume", "--max-steps", "5"]) == 0
    err = capsys.readouterr().err
    assert "skipped damaged checkpoint(s) (step-4: " in err and "resuming from step-2" in err, err
    # Steps 3 and 4 were trained again from step 2's state; the log reads as one run.
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    after = torch.load(run_dir / "checkpoints" / "step-5" / "optimizer.bin", weights_only=False)
    assert float(next(iter(after["state"].values()))["step"]) == float(next(iter(before["state"].values()))["step"]) + 3
    assert (run_dir / "model" / "config.json").is_file()


def test_resume_with_every_checkpoint_damaged_is_one_sentence(tiny_data, tmp_path, capsys):
    arguments, run_dir = _short_run(tiny_data, tmp_path)
    for checkpoint in (run_dir / "checkpoints").iterdir():
        (checkpoint / "model.safetensors").write_bytes(b"not weights")
    capsys.readouterr()
    assert main(arguments + ["--resume", "--max-steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "error: No checkpoint in " in err and "step-4: " in err and "step-2: " in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG in this process, as on a full disk (no mount needed)."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_checkpoint_that_cannot_be_written_is_one_sentence_and_the_run_goes_on_later(tiny_data, tmp_path, capsys):
    arguments, run_dir = _short_run(tiny_data, tmp_path)  # checkpoints at 2 and 4
    capsys.readouterr()
    with file_size_limit(2000):
        assert main(arguments + ["--resume", "--max-steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "error: The checkpoint step-6 could not be written in " in err and "run the same command with --resume" in err
    assert "Traceback" not in err, err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2", "step-4"]  # no .partial left
    assert main(arguments + ["--resume", "--max-steps", "6"]) == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-4", "step-6"]
    # A new run that could not save its first checkpoint may be started again in its folder.
    fresh = tmp_path / "fresh"
    again = arguments[:5] + [str(fresh)] + arguments[6:]
    with file_size_limit(2000):
        assert main(again) == 2
    assert "The checkpoint step-2 could not be written" in capsys.readouterr().err
    assert main(again) == 0
    steps = [json.loads(line)["step"] for line in (fresh / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and (fresh / "model" / "config.json").is_file()
    assert main(again) == 2  # a finished run is someone's work
    assert "is not empty; choose a new one or pass --resume" in capsys.readouterr().err


def _without(mapping: dict, *path):
    copy = json.loads(json.dumps(mapping))
    target = copy
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return copy


@pytest.mark.parametrize("config, message", [
    ({**TINY_AE, "image_size": 0}, "image_size in bad.yaml must be a whole number of pixels from 32 to 6000, not 0."),
    ({**TINY_AE, "image_size": -8}, "not -8."),
    ({**TINY_AE, "image_size": "abc"}, "not 'abc'."),
    ({**TINY_AE, "image_size": 6001}, "not 6001."),
    ({**TINY_AE, "image_size": 35}, "image_size 35 in bad.yaml is not a multiple of 2, the downsampling factor"),
    ({**TINY_AE, "model": {**TINY_AE["model"], "norm_num_groups": 3}}, "The autoencoder could not be made from the model section of"),
    (_without(TINY_AE, "model"), "needs a 'model' section for `train autoencoder`"),
    (_without(TINY_AE, "training", "batch_size"), "needs training.batch_size (or --batch-size)"),
    (_without(TINY_AE, "training", "max_steps"), "needs training.max_steps (or --max-steps)"),
])
def test_a_config_that_cannot_make_its_networks_is_one_sentence_before_any_work(tiny_data, tmp_path, capsys, config,
                                                                                 message):
    bad = write_yaml(tmp_path / "bad.yaml", config)
    out = tmp_path / "run"
    assert main(["train", "autoencoder", "--data", str(tiny_data), "--out", str(out), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (out / "checkpoints").exists()


def test_both_ends_of_the_image_size_range_make_an_autoencoder(tiny_data, tmp_path):
    for size in (32, 64):  # 6000 would train for minutes; its bound is the same comparison as 6001 above
        config = write_yaml(tmp_path / f"ae{size}.yaml", {**TINY_AE, "image_size": size,
                                                           "training": {**TINY_AE["training"], "max_steps": 1}})
        assert main(["train", "autoencoder", "--data", str(tiny_data), "--out", str(tmp_path / f"r{size}"),
                     "--config", str(config)]) == 0


def test_an_ldm_run_resumed_mid_epoch_equals_the_uninterrupted_run(tiny_data, trained_autoencoders, tmp_path, capsys):
    """Latents re-encoded with the same jitter, batches from the same step, EMA and learning-rate state restored."""
    from safetensors.torch import load_file

    config = write_yaml(tmp_path / "ldm.yaml", {**TINY_LDM, "training": {**TINY_LDM["training"], "max_steps": 5,
                                                                          "checkpoint_every": 3, "warmup_steps": 4}})
    common = ["--config", str(config), "--vae", str(trained_autoencoders["autoencoder"] / "model"),
              "--anatomy-controller", str(trained_autoencoders["anatomy-controller"] / "model")]

    def train(name, *extra):
        assert main(["train", "ldm", "--data", str(tiny_data), "--out", str(tmp_path / name), *common, *extra]) == 0
        return load_file(str(tmp_path / name / "model" / "unet" / "diffusion_pytorch_model.safetensors"))

    through = train("through")
    train("resumed", "--max-steps", "3")
    # --resume continues from the same inputs or refuses: another autoencoder as --vae or --anatomy-controller
    # (the latents and the scale factor would no longer match), or another data set
    vae, controller = common[3], common[5]
    other_data = tmp_path / "other-data"
    shutil.copytree(tiny_data, other_data)
    (other_data / "findings.csv").write_text((tiny_data / "findings.csv").read_text().replace(",train,", ",test,", 1))
    for flag, (data, swapped) in {"vae": (tiny_data, [*common[:3], controller, *common[4:]]),
                                  "anatomy-controller": (tiny_data, [*common[:5], vae]),
                                  "data": (other_data, common)}.items():
        assert main(["train", "ldm", "--data", str(data), "--out", str(tmp_path / "resumed"), *swapped, "--resume"]) == 2
        assert f"--resume was given another {flag} than the run in" in capsys.readouterr().err
    resumed = train("resumed", "--resume")
    assert all(torch.equal(through[k], resumed[k]) for k in through)
    assert losses(tmp_path / "through") == losses(tmp_path / "resumed")


def test_damaged_weights_and_fewer_steps_than_made_are_one_sentence(tiny_data, trained_autoencoders, tmp_path, capsys):
    damaged = tmp_path / "vae"
    shutil.copytree(trained_autoencoders["autoencoder"] / "model", damaged)
    weights = damaged / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    ldm = write_yaml(tmp_path / "ldm.yaml", TINY_LDM)
    assert main(["train", "ldm", "--data", str(tiny_data), "--out", str(tmp_path / "ldm"), "--config", str(ldm),
                 "--vae", str(damaged), "--anatomy-controller", str(trained_autoencoders["anatomy-controller"] / "model")]) == 2
    err = capsys.readouterr().err
    assert f"The autoencoder could not be made from --vae {damaged} (" in err and err.count("\n") == 1, err
    assert main(["train", "autoencoder", "--data", str(tiny_data), "--out", str(tmp_path / "ae"),
                 "--init-from", str(damaged)]) == 2
    assert f"could not be made from --init-from {damaged} (" in capsys.readouterr().err
    arguments, run_dir = _short_run(tiny_data, tmp_path)  # at step 4
    shutil.rmtree(run_dir / "model")
    assert main(arguments + ["--resume", "--max-steps", "3"]) == 2
    assert "has already made 4 steps, more than --max-steps 3; give --max-steps 4 or more" in capsys.readouterr().err
    assert not (run_dir / "model").exists()
    assert main(arguments + ["--num-threads", "100000"]) == 2
    assert "--num-threads 100000 is more than the" in capsys.readouterr().err


def test_resume_refuses_another_kind_or_other_settings(tiny_data, tmp_path, capsys):
    arguments, run_dir = _short_run(tiny_data, tmp_path)
    capsys.readouterr()
    other_kind = ["train", "anatomy-controller"] + arguments[2:] + ["--resume"]
    assert main(other_kind) == 2
    assert "holds a `train autoencoder` run, not `train anatomy-controller`" in capsys.readouterr().err
    assert main(arguments + ["--resume", "--learning-rate", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "would change training.learning_rate from 0.003 to 0.1" in err and err.count("\n") == 1, err
    changed = yaml.safe_load(Path(arguments[-1]).read_text())
    changed["model"]["block_out_channels"] = [8, 8]
    other_config = write_yaml(tmp_path / "other.yaml", changed)
    assert main(arguments[:-1] + [str(other_config), "--resume"]) == 2
    assert "would change model.block_out_channels from [8, 16] to [8, 8]" in capsys.readouterr().err
    # Nothing was written by the refusals: the run resumes as it was, and only its length may change.
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["training"]["learning_rate"] == 0.003
    assert main(arguments + ["--resume", "--max-steps", "5", "--checkpoint-every", "1"]) == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-4", "step-5"]


def test_refusals_are_one_sentence(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "something").write_text("x")
    assert main(["train", "autoencoder", "--data", str(tiny_data), "--out", str(run_dir)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["train", "autoencoder", "--data", str(tiny_data), "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["train", "autoencoder", "--data", str(tmp_path), "--out", str(tmp_path / "n2")]) == 2
    assert "findings.csv is missing" in capsys.readouterr().err
    assert main(["train", "ldm", "--data", str(tiny_data), "--out", str(tmp_path / "n3"), "--vae", str(tmp_path),
                 "--anatomy-controller", str(tmp_path)]) == 2
    assert "is not an AutoencoderKL directory" in capsys.readouterr().err


def test_ldm_trains_and_the_model_directory_loads(tiny_data, trained_autoencoders, tmp_path):
    from xreal_engine.model.pipeline import XRealPipeline

    config = write_yaml(tmp_path / "ldm.yaml", TINY_LDM)
    run_dir = tmp_path / "ldm"
    code = main(["train", "ldm", "--data", str(tiny_data), "--out", str(run_dir), "--config", str(config),
                 "--vae", str(trained_autoencoders["autoencoder"] / "model"),
                 "--anatomy-controller", str(trained_autoencoders["anatomy-controller"] / "model")])
    assert code == 0
    history = losses(run_dir)
    assert np.mean(history[-10:]) < np.mean(history[:10])
    measured = yaml.safe_load((run_dir / "config.yaml").read_text())["scale_factor_measured"]
    # Assemble the model from the newest checkpoint (how an interrupted run is finished): no new steps,
    # the same scale factor.
    shutil.rmtree(run_dir / "model")
    assert main(["train", "ldm", "--data", str(tiny_data), "--out", str(run_dir), "--config", str(config),
                 "--vae", str(trained_autoencoders["autoencoder"] / "model"), "--resume", "--max-steps", "40",
                 "--anatomy-controller", str(trained_autoencoders["anatomy-controller"] / "model")]) == 0
    assert len(losses(run_dir)) == 40

    pipe = XRealPipeline.from_pretrained(run_dir / "model")
    info = pipe.model_info
    assert info.model_id == "tiny-trained" and info.image_size == 32 and info.latent_size == 16
    assert info.findings == ["no finding", "cardiomegaly", "pneumonia"]
    assert set(info.label_warnings) == {"4"} and "aorta" in info.label_warnings["4"]
    assert info.anatomy_labels == {"1": "left lung", "2": "right lung", "3": "heart"}
    assert info.scale_factor == pytest.approx(measured, rel=1e-4) and info.scale_factor > 0
    assert pipe.text_encoder.config.max_position_embeddings == pipe.tokenizer.model_max_length == 8
    assert pipe.tokenizer.tokenize("no finding") == ["no", "finding"]

    anatomy = np.zeros((32, 32), dtype=np.int64)
    anatomy[8:24, 4:14], anatomy[8:24, 18:28], anatomy[16:26, 12:22] = 2, 1, 3
    region = np.zeros((32, 32), dtype=np.uint8)
    region[14:28, 10:24] = 1
    out = pipe(anatomy, pathologies=[(region, "cardiomegaly")], num_inference_steps=2, anatomy_steps=1,
               generator=torch.Generator().manual_seed(0))
    assert out.image.shape == (32, 32) and np.isfinite(out.image).all()
    assert 0.0 <= out.image.min() and out.image.max() <= 1.0
    with_aorta = anatomy.copy()
    with_aorta[4:8, 14:18] = 4  # an aorta is accepted and ignored (the model has a warning for it)
    assert pipe(with_aorta, num_inference_steps=1, anatomy_steps=1).image.shape == (32, 32)


def test_ldm_fine_tunes_a_model_from_init_from(tiny_data, trained_autoencoders, tmp_path, capsys):
    """``train ldm --init-from MODEL``: its UNet and LDM-BERT go on learning; scale factor and defaults stay."""
    from safetensors.torch import load_file

    from xreal_engine.model.info import ModelInfo

    vae = str(trained_autoencoders["autoencoder"] / "model")
    controller = str(trained_autoencoders["anatomy-controller"] / "model")
    base = tmp_path / "base"
    short = {**TINY_LDM, "training": {**TINY_LDM["training"], "max_steps": 4, "checkpoint_every": 4}}
    config = write_yaml(tmp_path / "ldm.yaml", short)
    common = ["--data", str(tiny_data), "--config", str(config), "--anatomy-controller", controller]
    assert main(["train", "ldm", "--out", str(base), "--vae", vae, *common]) == 0
    info = json.loads((base / "model" / "xreal_model.json").read_text())
    info["defaults"]["anatomy_steps"] = 70  # a model's own sampling defaults survive fine-tuning
    (base / "model" / "xreal_model.json").write_text(json.dumps(info))

    tuned = tmp_path / "tuned"
    assert main(["train", "ldm", "--out", str(tuned), "--vae", vae, "--init-from", str(base / "model"), *common]) == 0
    before, after = ModelInfo.load(base / "model"), ModelInfo.load(tuned / "model")
    assert after.scale_factor == before.scale_factor and after.defaults["anatomy_steps"] == 70
    old = load_file(str(base / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    new = load_file(str(tuned / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert old.keys() == new.keys() and any(not torch.equal(old[k], new[k]) for k in old)

    # another vae would move the latent space: one sentence, nothing written
    refused = tmp_path / "refused"
    assert main(["train", "ldm", "--out", str(refused), "--vae", controller, "--init-from", str(base / "model"),
                 *common]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("xreal-engine") and "is not the vae of --init-from" in error
    assert not refused.exists()


def test_prepare_data_refuses_manifests_that_leave_their_folders_or_cannot_be_read(small_cxr, tmp_path):
    """A manifest id names files under --cxr and --out; '../x' would read and overwrite files elsewhere."""
    manifest = small_cxr / "manifest.csv"
    rows = list(csv.DictReader(manifest.open(newline="")))
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep me")
    for bad_id in (f"../../{victim.stem}", "sub/dir", "..", "a\\b"):
        rows[0]["image"] = bad_id
        with manifest.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        with pytest.raises(InputError, match="is not a plain file name"):
            prepare_data(small_cxr, tmp_path / "out")
    assert victim.read_bytes() == b"keep me" and not (tmp_path / "out").exists()
    for text, message in (("a,b\n1,2\n", "lacks the columns subset, image, split"),
                          ("subset,image,split\n", "has no rows"),
                          ("subset,image,split\nwingspan,ws_1,holdout\n", "the split 'holdout' is not one of")):
        manifest.write_text(text)
        with pytest.raises(InputError, match=message):
            prepare_data(small_cxr, tmp_path / "out")
    manifest.write_bytes(b"subset,image,split\n\x92\xff\n")
    with pytest.raises(InputError, match="is not a UTF-8 CSV file"):
        prepare_data(small_cxr, tmp_path / "out")


def test_prepare_data_and_training_refuse_items_they_would_read_wrongly(small_cxr, tmp_path, capsys):
    """Non-square, mismatched label map, sizes at and past the side range, not a PNG: one sentence, nothing written."""
    image = small_cxr / "hannover_unlabeled" / "images" / "hn_synthetic16.png"
    label = small_cxr / "hannover_unlabeled" / "labels" / "hn_synthetic16.png"
    label.parent.mkdir()
    out = tmp_path / "out"
    cases = [((64, 48), None, "is 64 x 48 pixels; training images must be square"),
             ((64, 64), (32, 32), "is 32 x 32 pixels, its image 64 x 64; a label map must match"),
             ((31, 31), None, "is 31 x 31 pixels; each side must be 32 to 6000"),
             ((6001, 6001), None, "is 6001 x 6001 pixels; each side must be 32 to 6000")]
    for image_size, label_size, message in cases:
        Image.new("I;16", image_size).save(image)
        label.unlink(missing_ok=True)
        if label_size:
            Image.new("L", label_size).save(label)
        with pytest.raises(InputError, match=message):
            prepare_data(small_cxr, out)
        assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["cxr"]  # no staging left
    image.write_bytes(b"GIF89a not a png")
    assert main(["prepare-data", "--cxr", str(small_cxr), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "The image of 'hn_synthetic16'" in err and "is not a PNG file" in err and err.count("\n") == 1, err
    # A label map with values that are no label of label_map.json (a damaged or foreign map) is refused,
    # not turned into background; 5 (the cardiomediastinum) is the highest it has and is dropped quietly.
    Image.new("I;16", (64, 64)).save(image)
    for values, refused in (((0, 1, 5), False), ((0, 1, 77), True), ((6,), True)):
        pixels = np.zeros((64, 64), np.uint8)
        for k, value in enumerate(values):
            pixels[k * 8:(k + 1) * 8] = value
        Image.fromarray(pixels).save(label)
        shutil.rmtree(out, ignore_errors=True)
        if refused:
            with pytest.raises(InputError, match=rf"holds the values \[{values[-1]}\], which are no labels of .*0..5"):
                prepare_data(small_cxr, out)
            assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["cxr"]
        else:
            assert prepare_data(small_cxr, out) == {"train": 2}
            assert set(np.unique(np.asarray(Image.open(out / "labels" / "hn_synthetic16.png")))) == {0, 1}
    # Both ends of the side range pass, the label map matching its image.
    for side in (32, 6000):
        Image.new("I;16", (side, side)).save(image)
        Image.new("L", (side, side)).save(label)
        shutil.rmtree(out, ignore_errors=True)
        assert prepare_data(small_cxr, out) == {"train": 2}
    # A training DATA folder made by hand is checked the same way, before training starts.
    Image.new("L", (64, 64)).save(out / "labels" / "hn_synthetic16.png")
    with pytest.raises(InputError, match="a label map must match its image"):
        read_records(out, "train")
    Image.new("L", (40, 64)).save(out / "images" / "hn_synthetic16.png")
    assert main(["train", "autoencoder", "--data", str(out), "--out", str(tmp_path / "run")]) == 2
    assert "is 40 x 64 pixels; training images must be square" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def _rewrite_manifest(cxr: Path, change) -> None:
    manifest = cxr / "manifest.csv"
    rows = list(csv.DictReader(manifest.open(newline="")))
    rows = change(rows) or rows
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_prepare_data_refuses_what_it_would_misread_and_reads_spreadsheet_csvs(small_cxr, tmp_path, capsys):
    out = tmp_path / "out"
    image = small_cxr / "hannover_unlabeled" / "images" / "hn_synthetic16.png"
    label = small_cxr / "hannover_unlabeled" / "labels" / "hn_synthetic16.png"
    label.parent.mkdir()
    # A byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name.
    manifest = small_cxr / "manifest.csv"
    manifest.write_bytes(b"\xef\xbb\xbf" + manifest.read_bytes())
    assert prepare_data(small_cxr, out) == {"train": 2}
    assert (out.stat().st_mode & 0o777) == 0o777 & ~_umask()  # readable as any folder the user makes
    shutil.rmtree(out)
    cases = []
    for mode, name in (("I;16", "a 16-bit PNG"), ("RGB", "a colour (RGB) PNG")):
        cases.append((lambda mode=mode: Image.new(mode, (64, 64)).save(label), f"is {name}; label maps are 8-bit"))
    cases.append((lambda: image.write_bytes(image.read_bytes()[:60]), "is a damaged image ("))
    cases.append((lambda: _rewrite_manifest(small_cxr, lambda rows: rows + [dict(rows[1], split="test")]),
                  "lists 'hn_synthetic16' twice (rows 3 and 4); every image id must be listed once"))
    cases.append((lambda: _rewrite_manifest(small_cxr, lambda rows: [dict(rows[0], ctr="abc"), rows[1]]),
                  "row 2: the cardiothoracic ratio (ctr) 'abc' is not a number"))
    pristine = image.read_bytes(), manifest.read_bytes()
    for damage, message in cases:
        image.write_bytes(pristine[0])
        manifest.write_bytes(pristine[1])
        label.unlink(missing_ok=True)
        damage()
        for intensity in ("percentile", "none"):
            assert main(["prepare-data", "--cxr", str(small_cxr), "--out", str(out), "--intensity", intensity]) == 2
            err = capsys.readouterr().err
            assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
            assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cxr"]
    # A damaged image in a DATA folder made by hand stops training with one sentence, not MONAI's traceback.
    image.write_bytes(pristine[0])
    manifest.write_bytes(pristine[1])
    prepare_data(small_cxr, out, intensity="none")
    kept = out / "images" / "hn_synthetic16.png"
    kept.write_bytes(kept.read_bytes()[:60])
    assert main(["train", "autoencoder", "--data", str(out), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"The image {kept} is a damaged image" in err.splitlines()[-1] and "Traceback" not in err, err


def _umask() -> int:
    import os

    current = os.umask(0)
    os.umask(current)
    return current


@pytest.mark.parametrize("option, value", [("--max-steps", "0"), ("--max-steps", "-3"), ("--batch-size", "0"),
                                           ("--learning-rate", "-1"), ("--learning-rate", "nan"),
                                           ("--checkpoint-every", "0"), ("--num-threads", "-2")])
def test_training_numbers_must_be_positive_before_any_work(tiny_data, tmp_path, capsys, option, value):
    out = tmp_path / "run"
    assert main(["train", "autoencoder", "--data", str(tiny_data), "--out", str(out), option, value]) == 2
    err = capsys.readouterr().err
    assert option in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_info_on_a_damaged_weights_file_is_one_line(tmp_path, capsys):
    from xreal_engine.model.random_model import create_random_model

    model = create_random_model(tmp_path / "tiny", preset="tiny")
    weights = next((model / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["info", "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert "is damaged or not a safetensors file" in err and err.count("\n") == 1, err


def test_a_run_that_failed_on_its_data_can_be_retried_in_the_same_folder(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "autoencoder", "--data", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    capsys.readouterr()
    assert not out.exists() or {p.name for p in out.iterdir()} <= {"config.yaml"}
    config = write_yaml(tmp_path / "ae.yaml", {**TINY_AE, "training": {**TINY_AE["training"], "max_steps": 1,
                                                                         "checkpoint_every": 1}})
    assert main(["train", "autoencoder", "--data", str(tiny_data), "--out", str(out), "--config", str(config)]) == 0
    (out / "notes.txt").write_text("mine")  # a folder with anything else is still refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["train", "autoencoder", "--data", str(tiny_data), "--out", str(other), "--config", str(config)]) == 2
    assert "is not empty" in capsys.readouterr().err
