"""Model directories: xreal_model.json, resolve_model, random models, weights hash, the `info` command."""

import json

import pytest
import torch

from xreal_engine import cli
from xreal_engine.model import architecture, info as models
from xreal_engine.model.sampling import XREAL_DEFAULTS
from xreal_engine.errors import ModelError
from xreal_engine.model.info import ModelInfo, resolve_model, weights_hash
from xreal_engine.model.random_model import create_random_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return create_random_model(tmp_path_factory.mktemp("models") / "tiny", model_id="tiny-test")


def test_model_info_round_trip(tmp_path):
    info = ModelInfo(model_id="x", findings=["cardiomegaly"], label_warnings={4: "aorta ignored"},
                     defaults={"num_inference_steps": 20, "anatomy_steps": 10})
    info.save(tmp_path)
    loaded = ModelInfo.load(tmp_path)
    assert loaded == info
    assert loaded.defaults == {**XREAL_DEFAULTS, "num_inference_steps": 20, "anatomy_steps": 10}
    assert loaded.label_warnings == {"4": "aorta ignored"}
    assert loaded.pixel_spacing_mm == pytest.approx(400.0 / 256)
    data = json.loads((tmp_path / models.MODEL_INFO_FILE).read_text())
    assert list(data)[:2] == ["format_version", "model_id"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image_size": 100, "latent_size": 64}, "not a multiple"),
        ({"anatomy_labels": {"7": "spleen"}}, "anatomy label '7'"),
        ({"defaults": {"anatomy_steps": 500}}, "anatomy_steps"),
        ({"defaults": {"cfg": 3}}, "unknown settings"),
        ({"format_version": 2}, "format_version"),
        ({"findings": "cardiomegaly"}, "findings"),
        ({"colour": "red"}, "unknown fields"),
    ],
)
def test_bad_metadata_is_refused_naming_the_file(tmp_path, change, message):
    data = {**ModelInfo(model_id="x").to_dict(), **change}
    (tmp_path / models.MODEL_INFO_FILE).write_text(json.dumps(data))
    with pytest.raises(ModelError) as error:
        ModelInfo.load(tmp_path)
    assert message in str(error.value) and models.MODEL_INFO_FILE in str(error.value)


def test_resolve_model(model_dir, tmp_path, monkeypatch):
    assert resolve_model(str(model_dir)) == model_dir.resolve()
    with pytest.raises(ModelError, match="neither 'demo' nor an existing directory"):
        resolve_model(tmp_path / "missing")
    for empty in ("", "  "):  # not the current folder
        with pytest.raises(ModelError, match="The model name is empty"):
            resolve_model(empty)
    with pytest.raises(ModelError, match="xreal_model.json is missing"):
        resolve_model(tmp_path)
    ModelInfo(model_id="half").save(tmp_path)
    with pytest.raises(ModelError, match="model_index.json is missing"):
        resolve_model(tmp_path)

    monkeypatch.setattr(models, "DEMO_MODEL_DIR", tmp_path / "no-demo")
    with pytest.raises(ModelError, match="demo model is not installed"):
        resolve_model("demo")
    monkeypatch.setattr(models, "DEMO_MODEL_DIR", model_dir)
    assert resolve_model("demo") == model_dir


def test_random_model_is_complete_and_hashed(model_dir, tmp_path):
    info = ModelInfo.load(model_dir)
    assert (info.model_id, info.image_size, info.latent_size) == ("tiny-test", 64, 16)
    assert "cardiomegaly" in info.findings
    vocab = (model_dir / "tokenizer" / "vocab.txt").read_text().split()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and "cardiomegaly" in vocab
    with pytest.raises(ModelError, match="not empty"):
        create_random_model(model_dir)

    digest = weights_hash(model_dir)
    assert len(digest) == 64 and digest == weights_hash(model_dir)
    other = create_random_model(tmp_path / "other", seed=1)
    assert weights_hash(other) != digest
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no .safetensors"):
        weights_hash(tmp_path / "empty")


def test_full_preset_is_the_official_architecture():
    """Parameter counts of the official XReal networks (fixtures README), built without memory on 'meta'."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    configs = architecture.component_configs("full")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs["unet"])
        autoencoder = AutoencoderKL(**configs["autoencoder"])
        text_encoder = LDMBertModel(LDMBertConfig(**configs["text_encoder"]))

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(unet) == 518_166_659
    assert count(autoencoder) == 55_312_063
    assert count(text_encoder) == 582_087_482
    assert unet.config.sample_size == 64 and text_encoder.config.max_position_embeddings == 150
    with pytest.raises(ModelError, match="Unknown model preset"):
        architecture.component_configs("huge")


def test_info_command(model_dir, capsys):
    assert cli.main(["info", "--model", str(model_dir), "--json", "--hash"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["model_id"] == "tiny-test"
    assert described["components"]["unet"]["class"] == "UNet2DConditionModel"
    unet_parameters = sum(p.numel() for p in __import__("diffusers").UNet2DConditionModel.from_pretrained(
        model_dir / "unet").parameters())
    assert described["components"]["unet"]["parameters"] == unet_parameters
    assert described["weights_sha256"] == weights_hash(model_dir)
    assert described["defaults"]["num_inference_steps"] == 10

    assert cli.main(["info", "--model", str(model_dir)]) == 0
    text = capsys.readouterr().out
    assert "UNet2DConditionModel" in text and "cardiomegaly" in text and "anatomy_steps = 5" in text

    assert cli.main(["info", "--model", str(model_dir / "nowhere")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "neither 'demo' nor an existing directory" in error


def test_a_saved_model_directory_follows_the_umask_not_safetensors_0600(tmp_path):
    """safetensors writes 0600; a model directory (random, converted, trained) is meant to be shared."""
    import os
    import stat

    from xreal_engine.model.random_model import create_random_model

    previous = os.umask(0o022)
    try:
        model = create_random_model(tmp_path / "tiny", preset="tiny")
    finally:
        os.umask(previous)
    weights = list(model.rglob("*.safetensors"))
    assert weights and {stat.S_IMODE(path.stat().st_mode) for path in model.rglob("*") if path.is_file()} == {0o644}

