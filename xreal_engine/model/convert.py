"""Official XReal (CompVis layout) checkpoints -> an XRealSlicer model directory.

The original code loads every checkpoint with ``strict=False``, so a wrong key silently
leaves random weights. This converter is the opposite: every architecture setting is read
from tensor shapes, every converted tensor must land in a diffusers/transformers module
parameter, and every checkpoint tensor of a component must be used, or the conversion is
refused with a ``ModelError`` naming the keys. Checkpoints are read with
``torch.load(weights_only=True)`` (no pickled code runs) and memory-mapped when possible,
so the 6.7 GB official backbone does not need to be copied into RAM twice.

Why this file is long: it is one audited mapping, CompVis keys -> diffusers keys, for the three
checkpoints, with the shape inference each part needs; the parts are read and checked together.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
import warnings
from pathlib import Path

import torch

from ..errors import InputError, ModelError
from ..files import check_new_directory, staged_directory
from .architecture import scheduler_config

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
FIRST_STAGE_PREFIX = "first_stage_model."
BERT_PREFIX = "cond_stage_model.transformer."
# Buffers of CompVis DDPM/LatentDiffusion that are derived from the noise schedule.
DDPM_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "scale_factor", "logvar",
}
# Lightning training of the autoencoders stores the LPIPS/discriminator loss next to the model.
AUTOENCODER_IGNORED_PREFIXES = ("loss.",)

# x_transformer (CompVis BERTEmbedder) fixes the head width at 64; only heads x 64 is stored.
BERT_HEAD_DIM = 64
DEFAULT_SCALE_FACTOR = 0.18215  # XReal's LatentDiffusion config; not stored in the checkpoint
OFFICIAL_ATTENTION_HEADS = 8

# XReal's LDM was trained on MIMIC-CXR images paired with their text labels (paper, section 3),
# i.e. the 14 CheXpert-labeller classes; the paper prompts with the bare label ("cardiomegaly").
# Prompts are lower-cased by the tokenizer.
MIMIC_CXR_LABELS = [
    "no finding", "atelectasis", "cardiomegaly", "consolidation", "edema", "enlarged cardiomediastinum",
    "fracture", "lung lesion", "lung opacity", "pleural effusion", "pleural other", "pneumonia",
    "pneumothorax", "support devices",
]


# --------------------------------------------------------------------------------------------
# small helpers


def _describe_keys(keys) -> str:
    """'a, b, c (+N more; M in all)': enough to see what is wrong without flooding one line."""
    keys = sorted(keys)
    shown = ", ".join(keys[:5])
    more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
    return f"{shown}{more} ({len(keys)} in all)"


def _load_state_dict(path: Path, role: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint without running pickled code; accept a Lightning dict or a bare state dict."""
    if not path.is_file():
        raise InputError(f"The {role} checkpoint {path} does not exist or is not a file.")
    try:
        with warnings.catch_warnings():  # torch warns in several lines about a damaged file's odd "protocol"
            warnings.simplefilter("ignore", UserWarning)
            try:  # memory-mapped: the official backbone is 6.7 GB
                checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) torch.save files cannot be memory-mapped
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):  # random or damaged bytes, not a pickle with objects in it
            raise ModelError(f"The {role} checkpoint {path} cannot be read as a PyTorch weights file (it is "
                             "damaged or not a file written by torch.save).") from None
        raise ModelError(
            f"The {role} checkpoint {path} cannot be read as a PyTorch weights file: it holds pickled Python "
            "objects besides tensors, which are not loaded for safety; if you trust its source, re-save only "
            "its tensors with torch.save({'state_dict': checkpoint['state_dict']}, path) and convert that file."
        ) from None
    except Exception as error:  # noqa: BLE001 - any unreadable file is a user-facing refusal
        # torch's own reader errors (truncated zip, bad magic) say what is wrong; others are internal noise.
        lines = str(error).strip().splitlines() if isinstance(error, (RuntimeError, OSError)) else []
        detail = f" ({lines[0].split('. ')[0][:200]})" if lines else " (it is not a file written by torch.save)"
        raise ModelError(f"The {role} checkpoint {path} cannot be read as a PyTorch weights file{detail}.") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ModelError(f"The {role} checkpoint {path} holds no state dict of tensors.")
    not_tensors = [key for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ModelError(f"The {role} checkpoint {path} has entries that are not tensors: {_describe_keys(not_tensors)}.")
    return checkpoint


ROLE_KEY_PREFIX = {"backbone UNet": UNET_PREFIX, "backbone text encoder": BERT_PREFIX}


def _shape(state: dict, key: str, role: str) -> tuple:
    if key not in state:
        full_key = ROLE_KEY_PREFIX.get(role, "") + key
        raise ModelError(f"The {role} has no tensor {full_key}, so it is not an XReal/CompVis checkpoint.")
    return tuple(state[key].shape)


def _indices(state: dict, pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (a regex with one group) over the keys."""
    regex = re.compile(pattern)
    return sorted({int(match.group(1)) for key in state if (match := regex.match(key))})


def _build_and_load(model_class, config, converted: dict, source: dict, role: str, source_prefix: str = ""):
    """Instantiate ``model_class`` without allocating weights, then load ``converted`` strictly.

    Refuses when the converted names do not match the module exactly (missing / unexpected) or
    when a source tensor was not used by any converted tensor (compared by storage, so views
    made by the conversion count as used). Unexpected keys are named by their checkpoint name.
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_class(config) if not isinstance(config, dict) else model_class(**config)
    expected = set(model.state_dict().keys())
    source_name_by_storage = {tensor.untyped_storage().data_ptr(): key for key, tensor in source.items()}
    missing = expected - set(converted)
    unexpected = [
        source_prefix + source_name_by_storage.get(converted[key].untyped_storage().data_ptr(), key)
        for key in set(converted) - expected
    ]
    used_storages = {tensor.untyped_storage().data_ptr() for tensor in converted.values()}
    unused = [source_prefix + key for key, tensor in source.items() if tensor.untyped_storage().data_ptr() not in used_storages]
    problems = []
    if unexpected or unused:
        problems.append(f"tensors it does not understand: {_describe_keys(set(unexpected) | set(unused))}")
    if missing:
        problems.append(f"no tensors for these weights (diffusers names): {_describe_keys(missing)}")
    if problems:
        raise ModelError(f"The {role} checkpoint does not match an XReal/CompVis layout; it has " + "; and ".join(problems) + ".")
    weights = {key: tensor.to(torch.float32).contiguous() for key, tensor in converted.items()}
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise ModelError(f"The {role} checkpoint has tensors of the wrong shape: {detail[:400]}") from None
    model.eval()
    return model


def _conversion_key_error(role: str, error: KeyError) -> ModelError:
    return ModelError(f"The {role} checkpoint lacks the tensor {error.args[0]!s}, so it is not an XReal/CompVis checkpoint.")


# --------------------------------------------------------------------------------------------
# autoencoders (LDM first stage and anatomy controller)


def infer_autoencoder_ddconfig(state: dict, role: str) -> dict:
    """CompVis ``ddconfig`` of an AutoencoderKL (unprefixed keys), read from tensor shapes."""
    ch, in_channels = _shape(state, "encoder.conv_in.weight", role)[:2]
    levels = _indices(state, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise ModelError(f"The {role} has no encoder.down.* blocks, so it is not a CompVis AutoencoderKL.")
    ch_mult = [_shape(state, f"encoder.down.{level}.block.0.conv1.weight", role)[0] // ch for level in levels]
    num_res_blocks = len(_indices(state, r"encoder\.down\.0\.block\.(\d+)\."))
    z_channels = _shape(state, "decoder.conv_in.weight", role)[1]
    encoder_out = _shape(state, "encoder.conv_out.weight", role)[0]
    embed_dim = _shape(state, "quant_conv.weight", role)[0] // 2
    if embed_dim != z_channels or encoder_out != 2 * z_channels:
        raise ModelError(
            f"The {role} has embed_dim {embed_dim} and z_channels {z_channels} (encoder output {encoder_out}); "
            "only the KL autoencoder with equal values (double_z) converts to diffusers."
        )
    attention_levels = _indices(state, r"encoder\.down\.(\d+)\.attn\.")
    if attention_levels:
        raise ModelError(
            f"The {role} has attention inside encoder levels {attention_levels} (encoder.down.*.attn); "
            "XReal's autoencoders have none and this converter does not support them."
        )
    return {
        "double_z": True, "z_channels": z_channels, "in_channels": in_channels,
        "out_ch": _shape(state, "decoder.conv_out.weight", role)[0], "ch": ch, "ch_mult": ch_mult,
        "num_res_blocks": num_res_blocks, "attn_resolutions": [], "embed_dim": embed_dim,
    }


def convert_autoencoder(state: dict, image_size: int, role: str, scaling_factor: float):
    """CompVis AutoencoderKL state dict (unprefixed) -> diffusers AutoencoderKL, verified."""
    from diffusers import AutoencoderKL
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import (
        convert_ldm_vae_checkpoint,
        create_vae_diffusers_config,
    )

    state = {key: value for key, value in state.items() if not key.startswith(AUTOENCODER_IGNORED_PREFIXES)}
    ddconfig = infer_autoencoder_ddconfig(state, role)
    original_config = {"model": {"params": {"first_stage_config": {"params": {
        "embed_dim": ddconfig["embed_dim"], "ddconfig": ddconfig}}}}}
    config = create_vae_diffusers_config(original_config, image_size=image_size)
    config["scaling_factor"] = scaling_factor
    try:
        converted = convert_ldm_vae_checkpoint(dict(state), config)
    except KeyError as error:
        raise _conversion_key_error(role, error) from None
    return _build_and_load(AutoencoderKL, config, converted, state, role)


# --------------------------------------------------------------------------------------------
# UNet


def infer_unet_params(state: dict, attention_heads: int, role: str = "backbone UNet") -> dict:
    """CompVis ``UNetModel`` parameters (keys without ``model.diffusion_model.``) from tensor shapes.

    Only the number of attention heads leaves no trace in the shapes; it is an argument.
    """
    model_channels, in_channels = _shape(state, "input_blocks.0.0.weight", role)[:2]
    time_embed_dim = _shape(state, "time_embed.0.weight", role)[0]
    if time_embed_dim != 4 * model_channels:
        raise ModelError(f"The {role} has a time embedding of width {time_embed_dim}, not 4 x {model_channels}.")
    input_blocks = _indices(state, r"input_blocks\.(\d+)\.")
    # Walk the encoder: res blocks (optionally followed by a transformer) until a downsample op.
    levels: list[list[int]] = [[]]
    for block in input_blocks[1:]:
        if f"input_blocks.{block}.0.op.weight" in state:
            levels.append([])
        else:
            levels[-1].append(block)
    blocks_per_level = {len(level) for level in levels}
    if len(blocks_per_level) != 1 or 0 in blocks_per_level:
        raise ModelError(f"The {role} has an irregular number of res blocks per level ({[len(l) for l in levels]}).")
    num_res_blocks = blocks_per_level.pop()
    channel_mult, attention_resolutions = [], []
    for level_index, level in enumerate(levels):
        first = level[0]
        width = _shape(state, f"input_blocks.{first}.0.out_layers.3.weight", role)[0]
        if width % model_channels:
            raise ModelError(f"The {role} has a level of width {width}, not a multiple of {model_channels}.")
        channel_mult.append(width // model_channels)
        with_attention = [f"input_blocks.{block}.1.norm.weight" in state for block in level]
        if any(with_attention) != all(with_attention):
            raise ModelError(f"The {role} has attention in only some blocks of level {level_index}.")
        if all(with_attention):
            attention_resolutions.append(2**level_index)
    emb_out = _shape(state, f"input_blocks.{levels[0][0]}.0.emb_layers.1.weight", role)[0]
    if emb_out != channel_mult[0] * model_channels:
        raise ModelError(f"The {role} uses scale-shift time conditioning (use_scale_shift_norm), which XReal does not.")
    if "middle_block.1.norm.weight" not in state:
        raise ModelError(f"The {role} has no middle-block transformer (middle_block.1), so it is not a text-conditioned UNet.")
    context_dim = _shape(state, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", role)[1]
    transformer_depth = len(_indices(state, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    use_linear = len(_shape(state, "middle_block.1.proj_in.weight", role)) == 2
    middle_width = _shape(state, "middle_block.1.norm.weight", role)[0]
    for width in {model_channels * mult for mult in channel_mult} | {middle_width}:
        if width % attention_heads:
            raise ModelError(f"--attention-heads {attention_heads} does not divide the UNet width {width}.")
    return {
        "in_channels": in_channels, "out_channels": _shape(state, "out.2.weight", role)[0],
        "model_channels": model_channels, "channel_mult": channel_mult, "num_res_blocks": num_res_blocks,
        "attention_resolutions": attention_resolutions, "num_heads": attention_heads,
        "transformer_depth": transformer_depth, "context_dim": context_dim, "use_linear_in_transformer": use_linear,
    }


def convert_unet(state: dict, attention_heads: int, image_size: int, vae_ch_mult: list[int], role: str = "backbone UNet"):
    """CompVis UNetModel state dict (unprefixed) -> diffusers UNet2DConditionModel, verified."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config,
    )

    unet_params = infer_unet_params(state, attention_heads, role)
    original_config = {"model": {"params": {
        "unet_config": {"params": unet_params},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": vae_ch_mult}}},
    }}}
    # diffusers wants the PIXEL size and divides by the autoencoder's downsampling factor.
    config = create_unet_diffusers_config(original_config, image_size=image_size)
    try:
        converted = convert_ldm_unet_checkpoint(
            dict(state), config, extract_ema=False, skip_extract_state_dict=True
        )
    except KeyError as error:
        raise _conversion_key_error(role, error) from None
    return _build_and_load(UNet2DConditionModel, config, converted, state, role, UNET_PREFIX)


# --------------------------------------------------------------------------------------------
# LDM-BERT text encoder (x_transformer TransformerWrapper -> diffusers LDMBertModel)

_BERT_LAYER_MAP = {
    # (sub-layer parity, original suffix) -> LDMBertEncoderLayer suffix
    (0, "0.weight"): "self_attn_layer_norm.weight",
    (0, "0.bias"): "self_attn_layer_norm.bias",
    (0, "1.to_q.weight"): "self_attn.q_proj.weight",
    (0, "1.to_k.weight"): "self_attn.k_proj.weight",
    (0, "1.to_v.weight"): "self_attn.v_proj.weight",
    (0, "1.to_out.weight"): "self_attn.out_proj.weight",
    (0, "1.to_out.bias"): "self_attn.out_proj.bias",
    (1, "0.weight"): "final_layer_norm.weight",
    (1, "0.bias"): "final_layer_norm.bias",
    (1, "1.net.0.0.weight"): "fc1.weight",
    (1, "1.net.0.0.bias"): "fc1.bias",
    (1, "1.net.2.weight"): "fc2.weight",
    (1, "1.net.2.bias"): "fc2.bias",
}
_BERT_TOP_MAP = {
    "token_emb.weight": "model.embed_tokens.weight",
    "pos_emb.emb.weight": "model.embed_positions.weight",
    "norm.weight": "model.layer_norm.weight",
    "norm.bias": "model.layer_norm.bias",
    "to_logits.weight": "to_logits.weight",
    "to_logits.bias": "to_logits.bias",
}
_BERT_LAYER_KEY = re.compile(r"attn_layers\.layers\.(\d+)\.(.+)")


def convert_ldm_bert_state_dict(state: dict) -> dict[str, torch.Tensor]:
    """Rename x_transformer keys (without ``cond_stage_model.transformer.``) to LDMBertModel keys.

    x_transformer interleaves attention (even index) and feed-forward (odd index) sub-layers, each
    ``[pre-LayerNorm, module]``; LDMBert has one encoder layer per pair. Unknown keys are kept under
    their original name so that the strict load reports them as unexpected.
    """
    converted = {}
    for key, tensor in state.items():
        match = _BERT_LAYER_KEY.fullmatch(key)
        if key in _BERT_TOP_MAP:
            converted[_BERT_TOP_MAP[key]] = tensor
        elif match and (int(match.group(1)) % 2, match.group(2)) in _BERT_LAYER_MAP:
            index = int(match.group(1))
            converted[f"model.layers.{index // 2}.{_BERT_LAYER_MAP[(index % 2, match.group(2))]}"] = tensor
        else:
            converted[f"cond_stage_model.transformer.{key}"] = tensor
    return converted


def infer_ldm_bert_config(state: dict, role: str = "backbone text encoder"):
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig

    vocab_size, width = _shape(state, "token_emb.weight", role)
    positions = _shape(state, "pos_emb.emb.weight", role)[0]
    sub_layers = _indices(state, r"attn_layers\.layers\.(\d+)\.")
    if not sub_layers or len(sub_layers) % 2 or sub_layers != list(range(len(sub_layers))):
        raise ModelError(f"The {role} has attention/feed-forward sub-layers {sub_layers[:6]}..., not complete pairs.")
    attention_inner = _shape(state, "attn_layers.layers.0.1.to_q.weight", role)[0]
    if attention_inner % BERT_HEAD_DIM:
        raise ModelError(f"The {role} has an attention width {attention_inner} that is not a multiple of {BERT_HEAD_DIM}.")
    return LDMBertConfig(
        vocab_size=vocab_size, max_position_embeddings=positions, encoder_layers=len(sub_layers) // 2,
        encoder_ffn_dim=_shape(state, "attn_layers.layers.1.1.net.0.0.weight", role)[0],
        encoder_attention_heads=attention_inner // BERT_HEAD_DIM, head_dim=BERT_HEAD_DIM, d_model=width,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, activation_function="gelu",
    )


def convert_text_encoder(state: dict, role: str = "backbone text encoder"):
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

    config = infer_ldm_bert_config(state, role)
    converted = convert_ldm_bert_state_dict(state)
    return _build_and_load(LDMBertModel, config, converted, state, role, BERT_PREFIX)


# --------------------------------------------------------------------------------------------
# tokenizer and scheduler


def load_tokenizer(tokenizer_path: Path, vocab_size: int, max_length: int):
    """BertTokenizer from a vocab.txt or a directory holding one; must match the text encoder."""
    from transformers import BertTokenizer

    vocab_file = tokenizer_path / "vocab.txt" if tokenizer_path.is_dir() else tokenizer_path
    if not vocab_file.is_file():
        raise InputError(f"The tokenizer {tokenizer_path} is neither a vocab.txt file nor a directory holding one.")
    try:
        tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True, model_max_length=max_length)
    except Exception as error:  # noqa: BLE001
        raise InputError(f"The tokenizer vocabulary {vocab_file} cannot be read ({error}).") from None
    if len(tokenizer) != vocab_size:
        raise InputError(
            f"The tokenizer vocabulary {vocab_file} has {len(tokenizer)} entries but the text encoder was "
            f"trained with {vocab_size} (the official model uses bert-base-uncased's 30522)."
        )
    return tokenizer


def make_scheduler(betas: torch.Tensor, alphas_cumprod: torch.Tensor | None):
    """DDIMScheduler equal to XReal's DDIM: scaled_linear, steps offset 1, first alpha_prev = alphas_cumprod[0].

    The start/end are read from the checkpoint's ``betas`` buffer; the buffer must be such a
    schedule (else refuse). XRealPipeline derives the exact float64-then-float32 ``alphas_cumprod``
    from the config, so the checkpoint's buffer is checked against that derivation.
    """
    from diffusers import DDIMScheduler

    betas64 = betas.detach().to(torch.float64)
    steps = betas64.numel()
    beta_start = float(f"{betas64[0].item():.6g}")
    beta_end = float(f"{betas64[-1].item():.6g}")
    expected = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    if not torch.allclose(betas64, expected, rtol=1e-5, atol=0):
        raise ModelError(
            "The backbone's betas buffer is not a sqrt-linear ('scaled_linear') schedule, which is the only one XReal uses."
        )
    scheduler = DDIMScheduler(**scheduler_config(beta_start, beta_end, steps))
    if alphas_cumprod is not None:
        # XRealPipeline recomputes the float64 cumprod from (beta_start, beta_end): it must equal the buffer.
        from .architecture import original_alphas_cumprod

        recomputed = original_alphas_cumprod(beta_start, beta_end, steps).to(torch.float32)
        relative = ((recomputed - alphas_cumprod.to(torch.float32)) / alphas_cumprod.to(torch.float32)).abs().max()
        if not relative <= 1e-6:
            raise ModelError(
                f"The backbone's alphas_cumprod buffer differs from the schedule {beta_start}..{beta_end} by {relative:.1e} (relative)."
            )
    return scheduler


# --------------------------------------------------------------------------------------------
# the whole conversion


def split_backbone(state: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Backbone keys by component (prefix removed); refuse keys that belong to none."""
    parts = {"unet": {}, "first_stage": {}, "text_encoder": {}, "buffers": {}}
    unknown = []
    for key, tensor in state.items():
        if key.startswith(UNET_PREFIX):
            parts["unet"][key[len(UNET_PREFIX):]] = tensor
        elif key.startswith(FIRST_STAGE_PREFIX):
            parts["first_stage"][key[len(FIRST_STAGE_PREFIX):]] = tensor
        elif key.startswith(BERT_PREFIX):
            parts["text_encoder"][key[len(BERT_PREFIX):]] = tensor
        elif key.startswith(EMA_PREFIX):
            continue  # LitEma shadow copy: the original inference never uses it (no ema_scope)
        elif key in DDPM_BUFFERS:
            parts["buffers"][key] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ModelError(f"The backbone checkpoint has keys of no known XReal component: {_describe_keys(unknown)}.")
    for part, prefix in (("unet", UNET_PREFIX), ("text_encoder", BERT_PREFIX)):
        if not parts[part]:
            raise ModelError(f"The backbone checkpoint has no {prefix}* tensors, so it is not an XReal LatentDiffusion checkpoint.")
    if "betas" not in parts["buffers"]:
        raise ModelError("The backbone checkpoint has no betas buffer, so its noise schedule is unknown.")
    return parts


def official_findings() -> list[str]:
    """The MIMIC-CXR labels that xreal_engine/vocabulary.json can code (the SEG needs a code per finding)."""
    from .. import vocabulary

    known = {vocabulary.normalise_name(name) for name in vocabulary.finding_names()}
    findings = [label for label in MIMIC_CXR_LABELS if vocabulary.normalise_name(label) in known]
    skipped = [label for label in MIMIC_CXR_LABELS if label not in findings]
    if skipped:
        logger.info("Findings the model was trained on but the vocabulary cannot code yet (left out): %s", ", ".join(skipped))
    return findings


def build_model_info(model_id: str, image_size: int, latent_size: int, scale_factor: float, description: str):
    """``xreal_model.json`` of converted official weights: all four anatomy labels (the anatomy controller
    was trained on lungs, heart and aorta), the MIMIC-CXR findings, the original sampling defaults."""
    from .info import DEFAULT_ANATOMY_LABELS, ModelInfo
    from .sampling import XREAL_DEFAULTS

    return ModelInfo(
        model_id=model_id, description=description, image_size=image_size, latent_size=latent_size,
        scale_factor=scale_factor, anatomy_labels=dict(DEFAULT_ANATOMY_LABELS), label_warnings={},
        findings=official_findings(), defaults=dict(XREAL_DEFAULTS),
    )


def convert_components(
    backbone: Path,
    anatomy_controller: Path,
    tokenizer: Path,
    autoencoder: Path | None = None,
    attention_heads: int = OFFICIAL_ATTENTION_HEADS,
    image_size: int = 256,
) -> tuple[dict, dict]:
    """Load and convert all checkpoints; returns (components, facts) without writing anything."""
    backbone, anatomy_controller, tokenizer = Path(backbone), Path(anatomy_controller), Path(tokenizer)
    if attention_heads < 1:
        raise InputError(f"--attention-heads must be a positive integer, not {attention_heads}.")
    if not tokenizer.exists():
        raise InputError(f"The tokenizer {tokenizer} does not exist.")
    parts = split_backbone(_load_state_dict(backbone, "backbone"))
    anatomy_state = _load_state_dict(anatomy_controller, "anatomy controller")

    # The original builds the first stage from ldm_ae.pth, then loads the backbone with strict=False,
    # which overwrites first_stage_model.*: the backbone's copy wins, key by key.
    first_stage = {}
    if autoencoder is not None:
        separate = _load_state_dict(Path(autoencoder), "autoencoder")
        first_stage.update({k: v for k, v in separate.items() if not k.startswith(AUTOENCODER_IGNORED_PREFIXES)})
        overridden = [k for k in parts["first_stage"] if k in first_stage and not torch.equal(first_stage[k], parts["first_stage"][k])]
        if overridden:
            logger.warning(
                "The backbone's first_stage_model differs from %s in %d tensors; the backbone's copy is used, as in the original code.",
                autoencoder, len(overridden),
            )
    first_stage.update(parts["first_stage"])
    if not first_stage:
        raise InputError("The backbone holds no first_stage_model.* weights, so --autoencoder (ldm_ae.pth) is required.")

    scale_factor = float(parts["buffers"]["scale_factor"]) if "scale_factor" in parts["buffers"] else DEFAULT_SCALE_FACTOR
    vae = convert_autoencoder(first_stage, image_size, "autoencoder (first stage)", scale_factor)
    anatomy = convert_autoencoder(anatomy_state, image_size, "anatomy controller", scale_factor)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if 2 ** (len(anatomy.config.block_out_channels) - 1) != factor:
        raise ModelError("The anatomy controller and the LDM autoencoder downsample by different factors.")
    if image_size % factor or image_size < factor:
        raise InputError(f"--image-size {image_size} is not a multiple of the autoencoder's factor {factor}.")
    vae_ch_mult = [c // vae.config.block_out_channels[0] for c in vae.config.block_out_channels]
    unet = convert_unet(parts["unet"], attention_heads, image_size, vae_ch_mult)
    if unet.config.in_channels != vae.config.latent_channels:
        raise ModelError(
            f"The UNet takes {unet.config.in_channels} channels but the autoencoder's latent has {vae.config.latent_channels}."
        )
    text_encoder = convert_text_encoder(parts["text_encoder"])
    if text_encoder.config.d_model != unet.config.cross_attention_dim:
        raise ModelError(
            f"The text encoder width {text_encoder.config.d_model} differs from the UNet's context width {unet.config.cross_attention_dim}."
        )
    bert_tokenizer = load_tokenizer(tokenizer, text_encoder.config.vocab_size, text_encoder.config.max_position_embeddings)
    scheduler = make_scheduler(parts["buffers"]["betas"], parts["buffers"].get("alphas_cumprod"))
    components = {
        "vae": vae, "anatomy_controller": anatomy, "unet": unet, "text_encoder": text_encoder,
        "tokenizer": bert_tokenizer, "scheduler": scheduler,
    }
    facts = {"image_size": image_size, "latent_size": image_size // factor, "scale_factor": scale_factor}
    return components, facts


def _save_model_directory(components: dict, model_info, target: Path) -> None:
    """Write the diffusers layout (safetensors) + xreal_model.json through XRealPipeline."""
    from .pipeline import XRealPipeline

    pipe = XRealPipeline(**components, model_info=model_info)
    pipe.save_pretrained(target, safe_serialization=True)


def convert_checkpoints(
    backbone,
    anatomy_controller,
    tokenizer,
    out_dir,
    autoencoder=None,
    attention_heads: int = OFFICIAL_ATTENTION_HEADS,
    model_id: str | None = None,
    image_size: int = 256,
) -> Path:
    """Convert the official XReal checkpoints into a model directory at ``out_dir``.

    Written into a temporary sibling and renamed into place, so a refusal leaves nothing behind.
    """
    out_dir = Path(out_dir)
    check_new_directory(out_dir)
    if not out_dir.parent.is_dir():
        raise InputError(f"The parent folder of the output {out_dir} does not exist.")
    components, facts = convert_components(
        backbone, anatomy_controller, tokenizer, autoencoder=autoencoder,
        attention_heads=attention_heads, image_size=image_size,
    )
    model_info = build_model_info(
        model_id or "xreal-official", facts["image_size"], facts["latent_size"], facts["scale_factor"],
        f"XReal weights converted from {Path(backbone).name} and {Path(anatomy_controller).name}.",
    )
    with staged_directory(out_dir) as staging:
        _save_model_directory(components, model_info, staging)
    return out_dir


# --------------------------------------------------------------------------------------------
# command line


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", required=True, type=Path, help="LDM backbone checkpoint (backbone.pth)")
    parser.add_argument("--autoencoder", type=Path, default=None,
                        help="LDM autoencoder checkpoint (ldm_ae.pth); the backbone's own copy takes precedence")
    parser.add_argument("--anatomy-controller", required=True, type=Path, help="anatomy controller checkpoint")
    parser.add_argument("--tokenizer", required=True, type=Path,
                        help="bert-base-uncased vocab.txt or a directory holding it (never downloaded)")
    parser.add_argument("--attention-heads", type=int, default=OFFICIAL_ATTENTION_HEADS,
                        help="UNet attention heads; no tensor shape records it (official model: 8)")
    parser.add_argument("--image-size", type=int, default=256, help="image size in pixels the model was trained at")
    parser.add_argument("--model-id", default=None, help="model id written to xreal_model.json")
    parser.add_argument("--out", required=True, type=Path, help="model directory to create")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = convert_checkpoints(
        args.backbone, args.anatomy_controller, args.tokenizer, args.out, autoencoder=args.autoencoder,
        attention_heads=args.attention_heads, model_id=args.model_id, image_size=args.image_size,
    )
    print(f"Converted model written to {out}")
    return 0
