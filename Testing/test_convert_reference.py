"""The official-checkpoint converter against the golden outputs of the original XReal code.

The fixture checkpoints (tiny config, random weights, CompVis key layout) are converted with
``attention_heads=4`` (the fixture's value; the official model uses 8) and every component
output saved by the original code is reproduced to 1e-4 through the plain diffusers /
transformers classes loaded from the written model directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xreal_engine.model.convert import convert_checkpoints, convert_components
from xreal_engine.errors import InputError, ModelError

ATOL = 1e-4
FIXTURE_HEADS = 4
FIXTURE_IMAGE_SIZE = 64
PROMPTS = {"cardiomegaly": "cardiomegaly", "empty": "", "pleural_effusion": "Pleural Effusion"}


def checkpoint_paths(fixtures_dir: Path) -> dict[str, Path]:
    folder = fixtures_dir / "checkpoints"
    return {
        "backbone": folder / "backbone.pth",
        "autoencoder": folder / "ldm_ae.pth",
        "anatomy_controller": folder / "anatomy_controller.pth",
        "tokenizer": fixtures_dir / "tokenizer",
    }


@pytest.fixture(scope="module")
def model_dir(fixtures_dir, tmp_path_factory) -> Path:
    paths = checkpoint_paths(fixtures_dir)
    out = tmp_path_factory.mktemp("converted") / "xreal-fixture"
    result = convert_checkpoints(
        paths["backbone"], paths["anatomy_controller"], paths["tokenizer"], out,
        autoencoder=paths["autoencoder"], attention_heads=FIXTURE_HEADS, model_id="fixture",
        image_size=FIXTURE_IMAGE_SIZE,
    )
    assert result == out
    return out


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


# ------------------------------------------------------------------ layout and plain-class loading


def test_model_directory_layout_and_metadata(model_dir):
    for name in ("vae", "anatomy_controller", "unet", "text_encoder", "tokenizer", "scheduler"):
        assert (model_dir / name).is_dir(), name
    assert list((model_dir / "unet").glob("*.safetensors")), "weights must be safetensors"
    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "XRealPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    info = json.loads((model_dir / "xreal_model.json").read_text())
    assert info["model_id"] == "fixture"
    assert (info["image_size"], info["latent_size"]) == (64, 16)
    assert info["scale_factor"] == pytest.approx(0.18215)
    assert info["anatomy_labels"] == {"1": "left lung", "2": "right lung", "3": "heart", "4": "aorta"}
    assert {"cardiomegaly", "pneumonia", "pleural effusion"} <= set(info["findings"])
    assert info["defaults"] == {"num_inference_steps": 100, "anatomy_steps": 50, "eta": 1.0,
                                "guidance_scale": 7.0, "soft_mask_value": 0.2}
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")], "staging directory left behind"


def test_unet_config_inferred_from_shapes(fixtures_dir, model_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    reference = json.loads((fixtures_dir / "config.json").read_text())["unet"]
    assert list(unet.config.block_out_channels) == [32, 32]
    assert list(unet.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert list(unet.config.up_block_types) == ["CrossAttnUpBlock2D", "UpBlock2D"]
    assert unet.config.layers_per_block == reference["num_res_blocks"]
    assert unet.config.cross_attention_dim == reference["context_dim"]
    assert unet.config.attention_head_dim == reference["num_heads"]
    assert unet.config.sample_size == 16


# ------------------------------------------------------------------ component outputs


@pytest.mark.parametrize("component, prefix", [("vae", "ae"), ("anatomy_controller", "ac")])
def test_autoencoders_reproduce_reference(fixtures_dir, model_dir, component, prefix):
    from diffusers import AutoencoderKL

    reference = load_file(fixtures_dir / "ae.safetensors")
    autoencoder = AutoencoderKL.from_pretrained(model_dir / component).eval()
    with torch.inference_mode():
        posterior = autoencoder.encode(reference[f"{prefix}_input"]).latent_dist
        decoded = autoencoder.decode(posterior.mode()).sample
    assert max_abs(posterior.mean, reference[f"{prefix}_posterior_mean"]) <= ATOL
    assert max_abs(posterior.logvar, reference[f"{prefix}_posterior_logvar"]) <= ATOL
    assert max_abs(posterior.mode(), reference[f"{prefix}_mode"]) <= ATOL
    assert max_abs(decoded, reference[f"{prefix}_decode_of_mode"]) <= ATOL


def test_text_encoder_and_tokenizer_reproduce_reference(fixtures_dir, model_dir):
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel
    from transformers import BertTokenizer

    reference = load_file(fixtures_dir / "bert.safetensors")
    tokenizer = BertTokenizer.from_pretrained(model_dir / "tokenizer")
    text_encoder = LDMBertModel.from_pretrained(model_dir / "text_encoder").eval()
    assert text_encoder.config.max_position_embeddings == 150
    assert tokenizer.model_max_length == 150
    for name, prompt in PROMPTS.items():
        ids = tokenizer(prompt, padding="max_length", max_length=150, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(ids, reference[f"ids_{name}"]), name
        with torch.inference_mode():
            embedding = text_encoder(ids)[0]  # no attention mask, as in the original
        assert max_abs(embedding, reference[f"emb_{name}"]) <= ATOL, name


def test_unet_reproduces_reference_at_batch_2_and_1(fixtures_dir, model_dir):
    from diffusers import UNet2DConditionModel

    reference = load_file(fixtures_dir / "unet.safetensors")
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").eval()
    with torch.inference_mode():
        eps = unet(reference["x"], reference["t"], encoder_hidden_states=reference["context"]).sample
        eps_b1 = unet(reference["x_b1"], reference["t_b1"], encoder_hidden_states=reference["context_b1"]).sample
    assert max_abs(eps, reference["eps"]) <= ATOL
    assert max_abs(eps_b1, reference["eps_b1"]) <= ATOL


def test_scheduler_is_the_original_ddim_schedule(fixtures_dir, model_dir):
    from diffusers import DDIMScheduler

    reference = load_file(fixtures_dir / "schedule.safetensors")
    scheduler = DDIMScheduler.from_pretrained(model_dir / "scheduler")
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.0015, 0.0295)
    assert scheduler.config.steps_offset == 1 and scheduler.config.set_alpha_to_one is False
    assert scheduler.config.clip_sample is False and scheduler.config.prediction_type == "epsilon"
    scheduler.set_timesteps(100)
    assert torch.equal(scheduler.timesteps.flip(0), reference["ddim_timesteps"])
    relative = ((scheduler.alphas_cumprod - reference["model_alphas_cumprod"]) / reference["model_alphas_cumprod"]).abs()
    assert relative.max().item() < 2e-6


# ------------------------------------------------------------------ traps listed in the fixture README


def test_ema_copy_is_not_used(fixtures_dir, model_dir):
    state = torch.load(checkpoint_paths(fixtures_dir)["backbone"], map_location="cpu", weights_only=True)["state_dict"]
    unet_weights = {}
    for path in (model_dir / "unet").glob("*.safetensors"):
        unet_weights.update(load_file(path))
    live = state["model.diffusion_model.input_blocks.0.0.weight"]
    ema = state["model_ema.diffusion_modelinput_blocks00weight"]
    assert not torch.equal(live, ema), "the fixture's EMA copy must differ"
    assert torch.equal(unet_weights["conv_in.weight"], live)
    assert torch.equal(unet_weights["conv_out.weight"], state["model.diffusion_model.out.2.weight"])


def test_backbone_autoencoder_overrides_separate_file(fixtures_dir, tmp_path):
    paths = checkpoint_paths(fixtures_dir)
    separate = torch.load(paths["autoencoder"], map_location="cpu", weights_only=True)
    changed = {key: value + 1.0 if value.is_floating_point() else value for key, value in separate["state_dict"].items()}
    modified = tmp_path / "ldm_ae_modified.pth"
    torch.save({"state_dict": changed}, modified)
    components, _ = convert_components(
        paths["backbone"], paths["anatomy_controller"], paths["tokenizer"], autoencoder=modified,
        attention_heads=FIXTURE_HEADS, image_size=FIXTURE_IMAGE_SIZE,
    )
    reference = load_file(fixtures_dir / "ae.safetensors")
    with torch.inference_mode():
        posterior = components["vae"].encode(reference["ae_input"]).latent_dist
    assert max_abs(posterior.mean, reference["ae_posterior_mean"]) <= ATOL
    backbone = torch.load(paths["backbone"], map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(components["vae"].encoder.conv_in.weight, backbone["first_stage_model.encoder.conv_in.weight"])


# ------------------------------------------------------------------ refusals


def _converted_with_backbone(fixtures_dir: Path, tmp_path: Path, state: dict, with_autoencoder: bool = True) -> Path:
    paths = checkpoint_paths(fixtures_dir)
    broken = tmp_path / "backbone_broken.pth"
    torch.save({"state_dict": state}, broken)
    out = tmp_path / "out"
    convert_checkpoints(broken, paths["anatomy_controller"], paths["tokenizer"], out,
                        autoencoder=paths["autoencoder"] if with_autoencoder else None,
                        attention_heads=FIXTURE_HEADS, image_size=FIXTURE_IMAGE_SIZE)
    return out


@pytest.fixture(scope="module")
def backbone_state(fixtures_dir) -> dict:
    return torch.load(checkpoint_paths(fixtures_dir)["backbone"], map_location="cpu", weights_only=True)["state_dict"]


# (checkpoint key, what the one-sentence refusal must name)
REMOVED_KEYS = [
    ("model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
     "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"),
    ("model.diffusion_model.output_blocks.2.0.skip_connection.weight", "up_blocks.1.resnets.0.conv_shortcut.weight"),
    ("cond_stage_model.transformer.attn_layers.layers.1.1.net.2.bias", "model.layers.0.fc2.bias"),
    ("first_stage_model.decoder.up.1.block.0.conv2.weight", "decoder.up_blocks.1.resnets.0.conv2.weight"),
]
RENAMED_KEYS = [
    ("model.diffusion_model.input_blocks.1.0.in_layers.2.weight", "model.diffusion_model.input_blocks.1.0.in_layer.2.weight"),
    ("cond_stage_model.transformer.attn_layers.layers.0.1.to_q.weight",
     "cond_stage_model.transformer.attn_layers.layers.0.1.query.weight"),
    ("first_stage_model.encoder.mid.attn_1.q.weight", "first_stage_model.encoder.mid.attn_1.query.weight"),
]


@pytest.mark.parametrize("removed, named", REMOVED_KEYS)
def test_checkpoint_with_a_key_removed_is_refused_naming_it(fixtures_dir, tmp_path, backbone_state, removed, named):
    assert removed in backbone_state
    state = {key: value for key, value in backbone_state.items() if key != removed}
    # Without --autoencoder: with it, the original fills a missing first_stage_model key from ldm_ae.pth.
    with pytest.raises(ModelError) as error:
        _converted_with_backbone(fixtures_dir, tmp_path, state, with_autoencoder=False)
    message = str(error.value)
    assert named in message and "\n" not in message, message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("old, new", RENAMED_KEYS)
def test_checkpoint_with_a_renamed_key_is_refused_naming_it(fixtures_dir, tmp_path, backbone_state, old, new):
    state = {(new if key == old else key): value for key, value in backbone_state.items()}
    with pytest.raises(ModelError) as error:
        _converted_with_backbone(fixtures_dir, tmp_path, state)
    message = str(error.value)
    # Either the renamed tensor is named as not understood, or the tensor the shapes are read from as absent.
    named = new.replace("first_stage_model.", "") if new.startswith("first_stage_model.") else new
    assert named in message or old in message, message
    assert not (tmp_path / "out").exists()


def test_missing_first_stage_key_is_taken_from_the_separate_autoencoder(fixtures_dir, tmp_path, backbone_state):
    """The original loads ldm_ae.pth, then the backbone with strict=False: keys it lacks keep ldm_ae's values."""
    removed = "first_stage_model.decoder.up.1.block.0.conv2.weight"
    state = {key: value for key, value in backbone_state.items() if key != removed}
    out = _converted_with_backbone(fixtures_dir, tmp_path, state, with_autoencoder=True)
    assert (out / "vae").is_dir()


def test_unrelated_state_dict_is_refused(fixtures_dir, tmp_path):
    unrelated = {"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8), "fc.bias": torch.zeros(10)}
    with pytest.raises(ModelError) as error:
        _converted_with_backbone(fixtures_dir, tmp_path, unrelated)
    assert "conv1.weight" in str(error.value) and "fc.bias" in str(error.value)


def test_unrelated_anatomy_controller_is_refused(fixtures_dir, tmp_path):
    paths = checkpoint_paths(fixtures_dir)
    unrelated = tmp_path / "resnet.pth"
    torch.save({"layer1.0.conv1.weight": torch.zeros(4, 4, 3, 3)}, unrelated)
    with pytest.raises(ModelError, match="anatomy controller"):
        convert_components(paths["backbone"], unrelated, paths["tokenizer"], autoencoder=paths["autoencoder"],
                           attention_heads=FIXTURE_HEADS, image_size=FIXTURE_IMAGE_SIZE)


def test_pickle_that_needs_code_is_refused(fixtures_dir, tmp_path):
    paths = checkpoint_paths(fixtures_dir)
    pickled = tmp_path / "object.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": shutil.rmtree}, pickled)  # not weights-only
    with pytest.raises(ModelError, match="pickled Python objects") as error:
        convert_components(pickled, paths["anatomy_controller"], paths["tokenizer"], attention_heads=FIXTURE_HEADS)
    assert "\n" not in str(error.value)


def test_file_that_is_not_a_checkpoint_is_refused(fixtures_dir, tmp_path):
    paths = checkpoint_paths(fixtures_dir)
    not_weights = tmp_path / "notes.pth"
    not_weights.write_text("these are not weights")
    with pytest.raises(ModelError, match="notes.pth cannot be read"):
        convert_components(paths["backbone"], not_weights, paths["tokenizer"], attention_heads=FIXTURE_HEADS)
    # Random bytes (a download cut short, the wrong file) are not called a pickle with objects in it.
    noise = tmp_path / "noise.pth"
    noise.write_bytes(bytes(range(128, 256)) * 3)
    for damaged in (noise, paths["anatomy_controller"].read_bytes()[:1000]):
        if isinstance(damaged, bytes):
            (tmp_path / "cut.pth").write_bytes(damaged)
            damaged = tmp_path / "cut.pth"
        with pytest.raises(ModelError, match="cannot be read as a PyTorch weights file") as error:
            convert_components(paths["backbone"], damaged, paths["tokenizer"], attention_heads=FIXTURE_HEADS)
        assert "pickled Python objects" not in str(error.value) and "\n" not in str(error.value), error.value


def test_attention_heads_that_do_not_divide_the_width_are_refused(fixtures_dir):
    paths = checkpoint_paths(fixtures_dir)
    with pytest.raises(ModelError, match="attention-heads 5"):
        convert_components(paths["backbone"], paths["anatomy_controller"], paths["tokenizer"],
                           attention_heads=5, image_size=FIXTURE_IMAGE_SIZE)


def test_tokenizer_of_the_wrong_size_is_refused(fixtures_dir, tmp_path):
    paths = checkpoint_paths(fixtures_dir)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "heart"]) + "\n")
    with pytest.raises(InputError, match="6 entries"):
        convert_components(paths["backbone"], paths["anatomy_controller"], vocab,
                           attention_heads=FIXTURE_HEADS, image_size=FIXTURE_IMAGE_SIZE)


def test_existing_output_directory_is_refused(fixtures_dir, tmp_path):
    paths = checkpoint_paths(fixtures_dir)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(InputError, match="already exists"):
        convert_checkpoints(paths["backbone"], paths["anatomy_controller"], paths["tokenizer"], out)
    assert (out / "keep.txt").read_text() == "user data"


# ------------------------------------------------------------------ command line


def _engine_command() -> list[str]:
    script = Path(sys.executable).with_name("xreal-engine")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "xreal_engine.cli"]


def _run_cli(arguments: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(_engine_command() + arguments, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow  # starts a process
def test_cli_convert_end_to_end(fixtures_dir, tmp_path):
    paths = checkpoint_paths(fixtures_dir)
    out = tmp_path / "cli-model"
    result = _run_cli([
        "convert", "--backbone", str(paths["backbone"]), "--autoencoder", str(paths["autoencoder"]),
        "--anatomy-controller", str(paths["anatomy_controller"]), "--tokenizer", str(paths["tokenizer"] / "vocab.txt"),
        "--attention-heads", "4", "--image-size", "64", "--model-id", "cli-fixture", "--out", str(out),
    ])
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    info = json.loads((out / "xreal_model.json").read_text())
    assert info["model_id"] == "cli-fixture" and info["latent_size"] == 16
    for name in ("vae", "anatomy_controller", "unet", "text_encoder", "tokenizer", "scheduler"):
        assert (out / name).is_dir(), name


@pytest.mark.slow  # starts a process
def test_cli_convert_bad_path_is_one_line_and_exit_2(fixtures_dir, tmp_path):
    paths = checkpoint_paths(fixtures_dir)
    out = tmp_path / "never"
    result = _run_cli([
        "convert", "--backbone", str(tmp_path / "missing_backbone.pth"),
        "--anatomy-controller", str(paths["anatomy_controller"]), "--tokenizer", str(paths["tokenizer"]),
        "--out", str(out),
    ])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing_backbone.pth" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_converted_directory_loads_as_xreal_pipeline_with_the_exact_schedule(fixtures_dir, model_dir):
    from xreal_engine.model.pipeline import XRealPipeline

    reference = load_file(fixtures_dir / "schedule.safetensors")
    pipe = XRealPipeline.from_pretrained(model_dir)
    assert pipe.model_info.model_id == "fixture"
    assert torch.equal(pipe.scheduler.alphas_cumprod, reference["model_alphas_cumprod"])
