"""``xreal-engine train``: autoencoder, anatomy-controller, ldm (and, in their own modules, the evaluation
``segmenter`` and ``calibrate-controller``).

Why this file is long: the autoencoder and LDM trainers and the command line live here; the shared loop
(Trainer, run directory, checkpoints) is in ``loop.py``, and the ControlNet trainer in ``controlnet.py``.

Every sub-command reads the DATA layout (``xreal_engine/training/__init__.py``), a small
YAML config (``xreal_engine/configs/<name>.yaml`` unless ``--config``), and writes::

    OUT/checkpoints/step-<n>/   accelerate state (weights, optimiser, RNG) + trainer_state.json
    OUT/log.jsonl               one line per logged step: step, loss, seconds
    OUT/config.yaml             the resolved config
    OUT/model/                  the result: an AutoencoderKL directory, or for ``ldm`` a full model
                                directory that ``XRealPipeline.from_pretrained`` loads

The loop runs on HuggingFace accelerate, so ``accelerate launch -m xreal_engine.cli train ...``
scales to several GPUs / nodes unchanged; mixed precision (fp16) is used on CUDA only.
``--resume`` continues from the newest checkpoint in OUT that reads, exactly: the batches, their jitter and
every random stream are those of an uninterrupted run (``loop.step_loader``).
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
from pathlib import Path

import yaml

from ..errors import InputError
from ..model.architecture import ANATOMY_LABEL_DIVISOR, scheduler_config
from .loop import (  # noqa: F401  (the shared loop; re-exported for the trainers here)
    CONFIG_DIR, TRAINER_STATE, Trainer, make_accelerator, prepare_out_dir, publish, run_inputs, seed_everything,
    INTERRUPTED_RESUME, built, set_threads, step_loader, write_resolved_config, written_or_removed,
)

SUBCOMMANDS = {
    "autoencoder": "the LDM's image autoencoder (AutoencoderKL, image -> image)",
    "anatomy-controller": "the anatomy controller (AutoencoderKL, anatomy label map -> image)",
    "calibrate-controller": "refit an anatomy controller's output brightness to the training images; training/calibration.py",
    "ldm": "the latent diffusion UNet + LDM-BERT text encoder; writes a complete model directory",
    "segmenter": "the anatomy segmenter used by `xreal-engine evaluate`",
    "controlnet": "a ControlNet (sobel, canny, texture, lungs, attention) on a trained model; training/controlnet.py",
}
# Sub-commands with their own arguments and no trainer here: the module that parses and runs them.
OWN_MODULES = {"segmenter": "segmenter", "calibrate-controller": "calibration"}
CONFIG_NAMES = {"autoencoder": "autoencoder", "anatomy-controller": "anatomy_controller", "ldm": "ldm",
                "controlnet": "controlnet"}
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ---------------------------------------------------------------- configuration

def load_config(kind: str, path: Path | None, overrides: dict) -> dict:
    """The YAML config (packaged default for ``kind`` unless ``path``), with CLI overrides of ``training``."""
    path = Path(path) if path else CONFIG_DIR / f"{CONFIG_NAMES[kind]}.yaml"
    if not path.is_file():
        raise InputError(f"The config file {path} does not exist.")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise InputError(f"The config file {path} is not valid YAML ({error}).") from None
    if not isinstance(config, dict) or not isinstance(config.get("training"), dict) or "image_size" not in config:
        raise InputError(f"The config file {path} needs image_size and a training section.")
    for key, value in overrides.items():
        if value is not None:
            config["training"][key] = value
    _check_training_numbers(config["training"], path)
    _check_model_sections(kind, config, path)
    return config


# The config sections each trainer builds its networks from (controlnet copies its model's UNet).
MODEL_SECTIONS = {"autoencoder": ("model",), "anatomy-controller": ("model",), "ldm": ("unet", "text_encoder"),
                  "controlnet": ()}


def _check_model_sections(kind: str, config: dict, path: Path) -> None:
    """One sentence before any work for a config that cannot make its networks: a missing section, an image
    size that is no whole number in the side range, or one the autoencoder cannot halve level by level."""
    from ..io.formats import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE

    for section in MODEL_SECTIONS[kind]:
        if not isinstance(config.get(section), dict):
            raise InputError(f"The config file {path.name} needs a '{section}' section for `train {kind}`.")
    size = config["image_size"]
    if kind == "controlnet" and size in (None, "model"):
        return  # the model's own (checked against the model by the trainer)
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_IMAGE_SIDE <= size <= MAX_IMAGE_SIDE:
        raise InputError(f"image_size in {path.name} must be a whole number of pixels from {MIN_IMAGE_SIDE} to "
                         f"{MAX_IMAGE_SIDE}, not {size!r}.")
    if kind in ("autoencoder", "anatomy-controller"):
        levels = config["model"].get("block_out_channels")
        if not isinstance(levels, list) or not levels:
            raise InputError(f"model.block_out_channels in {path.name} must be a list of channel counts.")
        factor = 2 ** (len(levels) - 1)
        if size % factor:
            raise InputError(f"image_size {size} in {path.name} is not a multiple of {factor}, the downsampling "
                             f"factor of the autoencoder's {len(levels)} levels.")


# training settings that must be positive, whether from the YAML or the command line: (kind, option);
# all of them must be given except checkpoint_every (default 500)
POSITIVE_TRAINING_SETTINGS = {"max_steps": (int, "--max-steps"), "batch_size": (int, "--batch-size"),
                              "checkpoint_every": (int, "--checkpoint-every"),
                              "learning_rate": (float, "--learning-rate")}


def _check_training_numbers(training: dict, path: Path) -> None:
    """One sentence before any work for a step count, batch size, checkpoint interval or learning rate that
    is not a positive number (0 steps would save an untrained model; 0 as interval divides by zero)."""
    for key, (kind, option) in POSITIVE_TRAINING_SETTINGS.items():
        if key not in training:
            if key != "checkpoint_every":
                raise InputError(f"The config file {path.name} needs training.{key} (or {option}).")
            continue
        value = training[key]
        if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text; float() does not
            try:
                value = float(value)
            except ValueError:
                pass
        whole = kind is int and isinstance(value, int) and not isinstance(value, bool)
        number = kind is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (whole or number) or value <= 0:
            raise InputError(f"{option} (training.{key} in {path.name}) must be a positive "
                             f"{'whole number' if kind is int else 'number'}, not {value!r}.")


# ---------------------------------------------------------------- autoencoders

def autoencoder_config(config: dict) -> dict:
    """diffusers AutoencoderKL arguments: f = 2^(levels-1), 3 channels in/out (grey repeated, as the original)."""
    model = config["model"]
    levels = len(model["block_out_channels"])
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": int(model.get("latent_channels", 3)),
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(model["block_out_channels"]), "layers_per_block": int(model.get("layers_per_block", 1)),
        "norm_num_groups": int(model.get("norm_num_groups", 32)), "sample_size": int(config["image_size"]),
        "scaling_factor": 1.0,
    }


def random_crop(tensors, size: int):
    """The same random square crop of every tensor (B, C, H, W); a cheap way to train convolutions on CPU."""
    import torch

    height = tensors[0].shape[-1]
    if not size or size >= height:
        return tensors
    top, left = torch.randint(0, height - size + 1, (2,)).tolist()
    return [t[..., top:top + size, left:left + size] for t in tensors]


def train_autoencoder(args, config: dict, mask_input: bool) -> Path:
    """AutoencoderKL on [0, 1] images: L1 reconstruction + a small KL term (as the original's first stage).

    ``mask_input``: the anatomy controller, whose input is the label map / 4 repeated to 3 channels
    and whose target is the image.
    """
    import torch
    from diffusers import AutoencoderKL

    training = config["training"]
    seed_everything(int(training.get("seed", 0)))
    init_from = training.get("init_from")
    from .adversarial import TRAIN_PARTS

    if str(training.get("train", "all")) not in TRAIN_PARTS:
        raise InputError(f"training.train must be one of {', '.join(TRAIN_PARTS)}, not {training.get('train')!r}.")
    if init_from and not (Path(init_from) / "config.json").is_file():
        raise InputError(f"--init-from {init_from} is not an AutoencoderKL directory (config.json is missing).")
    config["inputs"] = run_inputs(args.data, init_from=init_from)
    checkpoints = prepare_out_dir(Path(args.out), args.resume, args.kind, config)
    write_resolved_config(Path(args.out), config)
    from .data import make_dataset, read_records

    records = read_records(args.data, "train", require_labels=mask_input)

    dataset = make_dataset(records, int(config["image_size"]), with_label=mask_input, augment=bool(config.get("augment", True)),
                           counterfactual=config.get("counterfactual") if mask_input else None)
    loader = step_loader(dataset, int(training["batch_size"]), int(training.get("seed", 0)))
    accelerator = make_accelerator(args.mixed_precision)
    from .adversarial import AdversarialObjective, freeze_for

    # --init-from keeps that model's architecture (the config's model section is not used).
    if init_from:
        model = built("The autoencoder", f"--init-from {init_from}", lambda: AutoencoderKL.from_pretrained(init_from))
    else:
        model = built("The autoencoder", f"the model section of {args.config or 'the default config'}",
                      lambda: AutoencoderKL(**autoencoder_config(config)))
    trained_part = str(training.get("train", "all"))
    parameters = freeze_for(model, trained_part)
    optimizer = torch.optim.AdamW(parameters, lr=float(training["learning_rate"]), weight_decay=0.0)
    objective = AdversarialObjective(training)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    objective.prepare(accelerator)
    trainer = Trainer(args, config, accelerator)
    if checkpoints:
        trainer.resume(checkpoints)
    kl_weight = float(training.get("kl_weight", 1e-6))
    crop = int(training.get("crop_size", 0))
    last_layer = accelerator.unwrap_model(model).decoder.conv_out.weight

    def step(batch):
        image = batch["image"].as_tensor() if hasattr(batch["image"], "as_tensor") else batch["image"]
        source = batch["label"] / ANATOMY_LABEL_DIVISOR if mask_input else image
        source, image = random_crop([source, image], crop)
        source, target = source.repeat(1, 3, 1, 1), image.repeat(1, 3, 1, 1)
        with accelerator.autocast():
            with torch.set_grad_enabled(trained_part == "all"):
                posterior = model.encode(source).latent_dist
                latent = posterior.sample()
            reconstruction = model.decode(latent).sample.float()
            loss = objective.generator_loss(reconstruction, target, last_layer, trainer.step) \
                + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        objective.discriminator_step(accelerator, reconstruction, target)
        return loss.detach().item()

    model.train()
    trainer.run(loader, step)
    accelerator.wait_for_everyone()
    final = Path(args.out) / "model"
    if accelerator.is_main_process:
        staging = Path(args.out) / "model.partial"
        shutil.rmtree(staging, ignore_errors=True)
        with written_or_removed("The trained model", staging, INTERRUPTED_RESUME):
            accelerator.unwrap_model(model).save_pretrained(staging)
        publish(staging, final)
    return final


# ---------------------------------------------------------------- latent diffusion

def vocab_words(findings: list[str]) -> list[str]:
    """BERT's special tokens, then every word of every finding (BERT splits '-' off), each once."""
    words = list(SPECIAL_TOKENS)
    for finding in findings:
        for word in finding.lower().replace("-", " - ").replace(",", " , ").split():
            if word not in words:
                words.append(word)
    return words


def write_vocab(path: Path, words: list[str]) -> list[str]:
    """vocab.txt of ``vocab_words``."""
    path.write_text("\n".join(words) + "\n", encoding="utf-8")
    return words


def vocabulary_findings() -> list[str]:
    from .. import vocabulary

    return vocabulary.finding_names()


def ordered_findings(records) -> list[str]:
    """Findings present in the training split, in vocabulary order (unknown ones appended)."""
    present = {r.finding for r in records if r.finding}
    known = vocabulary_findings()
    return [f for f in known if f in present] + sorted(present - set(known))


def encode_latents(vae, dataset, copies: int, batch_size: int, device):
    """Posterior mean and std of ``copies`` augmented passes over the data set (the VAE is frozen).

    Encoding once instead of at every step makes CPU training several times faster; the
    diffusion loss still sees fresh samples z = mean + std * noise every time.
    """
    import torch

    means, stds, findings = [], [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with torch.no_grad():
        for _ in range(max(copies, 1)):
            for batch in loader:
                image = batch["image"].as_tensor() if hasattr(batch["image"], "as_tensor") else batch["image"]
                posterior = vae.encode(image.to(device).repeat(1, 3, 1, 1)).latent_dist
                means.append(posterior.mean.float().cpu())
                stds.append(posterior.std.float().cpu())
                findings.extend(batch["finding"])
    return torch.cat(means), torch.cat(stds), findings


class LatentSet:
    """(latent mean, latent std, finding) items for the DataLoader."""

    def __init__(self, means, stds, findings):
        self.means, self.stds, self.findings = means, stds, findings

    def __len__(self):
        return len(self.findings)

    def __getitem__(self, index):
        return {"mean": self.means[index], "std": self.stds[index], "finding": self.findings[index]}


def ldm_components(config: dict, vocab_size: int, latent_size: int, latent_channels: int):
    """Fresh UNet2DConditionModel + LDMBertModel from the config."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    unet_cfg, text_cfg = config["unet"], config["text_encoder"]
    attention = list(unet_cfg["attention_levels"])
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        block_out_channels=list(unet_cfg["block_out_channels"]), layers_per_block=int(unet_cfg["layers_per_block"]),
        attention_head_dim=int(unet_cfg["attention_heads"]), cross_attention_dim=int(text_cfg["width"]),
        norm_num_groups=int(unet_cfg.get("norm_num_groups", 32)),
        flip_sin_to_cos=True, freq_shift=0, use_linear_projection=False,
    )
    text_encoder = LDMBertModel(LDMBertConfig(
        vocab_size=vocab_size, max_position_embeddings=int(text_cfg["max_length"]),
        encoder_layers=int(text_cfg["layers"]), encoder_ffn_dim=4 * int(text_cfg["width"]),
        encoder_attention_heads=int(text_cfg["heads"]), head_dim=int(text_cfg["width"]) // int(text_cfg["heads"]),
        d_model=int(text_cfg["width"]), dropout=0.0,
    ))
    return unet, text_encoder


def label_warnings(present: set[int]) -> dict:
    """A sentence for every anatomy label the training data never showed (the sampler cannot honour it)."""
    from ..model.info import DEFAULT_ANATOMY_LABELS

    return {
        key: f"This model was trained without {name} masks; the {name} you drew is ignored."
        for key, name in DEFAULT_ANATOMY_LABELS.items() if int(key) not in present
    }


def save_model_directory(out_dir: Path, components: dict, info) -> Path:
    """``XRealPipeline.save_pretrained`` + ``xreal_model.json``, written via a staging directory."""
    from ..model.pipeline import XRealPipeline

    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipe = XRealPipeline(**components, model_info=info)
    with written_or_removed("The trained model", staging, INTERRUPTED_RESUME):
        pipe.save_pretrained(staging)
        info.save(staging)
    publish(staging, out_dir)
    return out_dir


def _ldm_init(init_from, vae_dir, vocab_size: int) -> dict | None:
    """``--init-from MODEL``: that model's UNet, LDM-BERT and scale factor, to fine-tune (None: start fresh).

    The latent space must stay the model's, so ``--vae`` must be its vae (same weights), and the
    vocabulary must be the one its LDM-BERT was trained with (same size).
    """
    if not init_from:
        return None
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

    from ..model.info import ModelInfo, resolve_model, weights_hash

    model_dir = resolve_model(init_from)
    if weights_hash(Path(vae_dir)) != weights_hash(model_dir / "vae"):
        raise InputError(f"--vae {vae_dir} is not the vae of --init-from {init_from}; fine-tuning keeps the model's "
                         f"latent space, so pass {model_dir / 'vae'}.")
    text_encoder = built("The text encoder", f"--init-from {init_from}",
                         lambda: LDMBertModel.from_pretrained(str(model_dir / "text_encoder")))
    if int(text_encoder.config.vocab_size) != vocab_size:
        raise InputError(f"--init-from {init_from}'s text encoder knows {text_encoder.config.vocab_size} words, the "
                         f"vocabulary now has {vocab_size}; train a new model instead of fine-tuning this one.")
    info = ModelInfo.load(model_dir)
    unet = built("The UNet", f"--init-from {init_from}", lambda: UNet2DConditionModel.from_pretrained(str(model_dir / "unet")))
    return {"unet": unet, "text_encoder": text_encoder,
            "scale_factor": info.scale_factor, "defaults": dict(info.defaults)}


def train_ldm(args, config: dict) -> Path:
    """Latent diffusion on the frozen VAE's latents: eps-prediction MSE, text via LDM-BERT trained jointly.

    A fraction of prompts (``prompt_dropout``) is replaced by "" so one network also learns the
    unconditional model that classifier-free guidance and the anatomy stage use.
    """
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDIMScheduler
    from diffusers.training_utils import EMAModel
    from transformers import BertTokenizer

    from ..model.info import DEFAULT_ANATOMY_LABELS, ModelInfo
    from .data import make_dataset, present_labels, read_records

    training = config["training"]
    seed_everything(int(training.get("seed", 0)))
    for flag, path in (("--vae", args.vae), ("--anatomy-controller", args.anatomy_controller)):
        if not (Path(path) / "config.json").is_file():
            raise InputError(f"{flag} {path} is not an AutoencoderKL directory (config.json is missing); "
                             "train one first or pass OUT/model of a finished run.")
    records = read_records(args.data, "train")
    findings = ordered_findings(records)
    words = vocab_words(vocabulary_findings() + findings)
    init = _ldm_init(training.get("init_from"), args.vae, len(words))  # refused before anything is written
    out = Path(args.out)
    config["inputs"] = run_inputs(args.data, vae=args.vae, anatomy_controller=args.anatomy_controller)
    checkpoints = prepare_out_dir(out, args.resume, args.kind, config)
    trained_scale_factor = None
    if checkpoints:
        # A resumed run keeps the scale factor it was trained with (a new measurement would differ slightly).
        previous = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8")) if (out / "config.yaml").is_file() else {}
        trained_scale_factor = (previous or {}).get("scale_factor_measured")
    write_resolved_config(out, config)
    accelerator = make_accelerator(args.mixed_precision)
    device = accelerator.device

    vocab_file = out / "vocab.txt"
    write_vocab(vocab_file, words)
    max_length = int(config["text_encoder"]["max_length"])
    tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True, model_max_length=max_length)

    vae = built("The autoencoder", f"--vae {args.vae}", lambda: AutoencoderKL.from_pretrained(args.vae))
    vae = vae.to(device).eval().requires_grad_(False)
    image_size = int(config["image_size"])
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet_levels = init["unet"].config.block_out_channels if init else config["unet"].get("block_out_channels") or [0]
    unet_factor = 2 ** (len(unet_levels) - 1)
    if image_size % (factor * unet_factor):
        raise InputError(f"image_size {image_size} cannot be halved by the autoencoder (x{factor}) and then by the "
                         f"UNet (x{unet_factor}); use a multiple of {factor * unet_factor}.")
    latent_size = image_size // factor

    dataset = make_dataset(records, image_size, with_label=False, augment=bool(config.get("augment", True)),
                           seed=int(training.get("seed", 0)))  # the same latents again when resumed
    means, stds, item_findings = encode_latents(vae, dataset, int(training.get("latent_copies", 4)),
                                                int(training["batch_size"]), device)
    scale_factor = config.get("scale_factor", "auto") if init is None else init["scale_factor"]
    if trained_scale_factor is not None:
        scale_factor = trained_scale_factor
    if scale_factor == "auto":
        sample = means + stds * torch.randn_like(stds)
        scale_factor = float(1.0 / sample.flatten().std())
    scale_factor = float(scale_factor)
    config["scale_factor_measured"] = scale_factor
    write_resolved_config(out, config)

    if init is None:
        unet, text_encoder = built("The UNet and text encoder", f"the unet and text_encoder sections of "
                                   f"{args.config or 'the default config'}",
                                   lambda: ldm_components(config, len(words), latent_size, vae.config.latent_channels))
    else:
        unet, text_encoder = init["unet"], init["text_encoder"]
    scheduler = DDIMScheduler(**scheduler_config())
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=float(training["learning_rate"]), weight_decay=0.0)
    warmup = int(training.get("warmup_steps", 0))
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    loader = step_loader(LatentSet(means, stds, item_findings), int(training["batch_size"]), int(training.get("seed", 0)))
    unet, text_encoder, optimizer, loader, lr_schedule = accelerator.prepare(unet, text_encoder, optimizer, loader, lr_schedule)
    ema_decay = float(training.get("ema_decay", 0.0))
    ema = EMAModel(parameters, decay=ema_decay) if ema_decay > 0 else None
    if ema is not None:
        ema.to(device)
        accelerator.register_for_checkpointing(ema)
    trainer = Trainer(args, config, accelerator)
    if checkpoints:
        trainer.resume(checkpoints)
    dropout = float(training.get("prompt_dropout", 0.15))
    alphas = scheduler.alphas_cumprod.to(device)

    def tokens(prompts):
        return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)

    def step(batch):
        latents = (batch["mean"] + batch["std"] * torch.randn_like(batch["std"])) * scale_factor
        prompts = [("" if random.random() < dropout else f) for f in batch["finding"]]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        a = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with accelerator.autocast():
            context = text_encoder(tokens(prompts))[0]
            prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
            loss = F.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        lr_schedule.step()
        if ema is not None:
            ema.step(parameters)
        return loss.detach().item()

    unet.train()
    text_encoder.train()
    trainer.run(loader, step)
    accelerator.wait_for_everyone()
    final = out / "model"
    if accelerator.is_main_process:
        unet, text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
        if ema is not None:
            ema.copy_to(list(unet.parameters()) + list(text_encoder.parameters()))
        present = present_labels([r for r in records if r.label is not None])
        # Read last: the anatomy controller is independent of the LDM and may still be training beside it.
        anatomy_controller = built("The anatomy controller", f"--anatomy-controller {args.anatomy_controller}",
                                   lambda: AutoencoderKL.from_pretrained(args.anatomy_controller),
                                   f"; the checkpoints are kept: fix it and run the same command with --resume").eval()
        info = ModelInfo(
            model_id=str(config.get("model_id", "xreal-trained")),
            description=str(config.get("description", "XReal model trained with xreal-engine train ldm")),
            image_size=image_size, latent_size=latent_size, scale_factor=round(scale_factor, 6),
            # Labels never seen in training are left out, so the sampler treats them as background and warns.
            anatomy_labels={k: v for k, v in DEFAULT_ANATOMY_LABELS.items() if int(k) in present} or dict(DEFAULT_ANATOMY_LABELS),
            label_warnings=label_warnings(present),
            findings=findings, field_of_view_mm=float(config.get("field_of_view_mm", 400.0)),
            # sampling defaults: the config's, else a fine-tuned model's own, else XReal's
            **({"defaults": dict(config.get("defaults") or init["defaults"])} if config.get("defaults") or init else {}),
        )
        components = {
            "vae": vae.to("cpu"), "anatomy_controller": anatomy_controller, "unet": unet.to("cpu").eval(),
            "text_encoder": text_encoder.to("cpu").eval(), "tokenizer": tokenizer, "scheduler": scheduler,
        }
        save_model_directory(final, components, info)
    return final


# ---------------------------------------------------------------- command line

def _common(parser: argparse.ArgumentParser, with_data: bool = True) -> None:
    parser.add_argument("--data", required=True, type=Path, help="training data directory (see `prepare-data`)")
    parser.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, log, model/)")
    parser.add_argument("--config", type=Path, help="YAML config (default: the packaged one)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--max-steps", type=int, help="override training.max_steps")
    parser.add_argument("--batch-size", type=int, help="override training.batch_size")
    parser.add_argument("--learning-rate", type=float, help="override training.learning_rate")
    parser.add_argument("--checkpoint-every", type=int, help="override training.checkpoint_every")
    parser.add_argument("--seed", type=int, help="override training.seed")
    parser.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                        help="auto = fp16 on CUDA, none on CPU")
    parser.add_argument("--num-threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kind", metavar="WHAT", required=True)
    for name, help_text in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name in OWN_MODULES:
            _own_module(name).configure_parser(command)
            continue
        _common(command)
        if name in ("autoencoder", "anatomy-controller"):
            command.add_argument("--init-from", help="start from this AutoencoderKL directory (e.g. a model's vae/)")
            command.add_argument("--train", choices=["all", "decoder"],
                                 help="what to train (default all); decoder keeps the encoder and so the latent space")
            command.add_argument("--edge-loss-weight", type=float, help="override training.edge_loss_weight (L1 on image gradients)")
            command.add_argument("--adversarial-weight", type=float,
                                 help="override training.adversarial_weight (patch discriminator; 0 = none)")
        if name == "ldm":
            command.add_argument("--init-from", help="fine-tune this model directory's UNet and LDM-BERT ('demo' or a "
                                 "path; pass its vae/ as --vae: the latent space stays the model's)")
            command.add_argument("--vae", required=True, type=Path, help="trained autoencoder (OUT/model of `train autoencoder`)")
            command.add_argument("--anatomy-controller", required=True, type=Path,
                                 help="trained anatomy controller (OUT/model of `train anatomy-controller`)")
        if name == "controlnet":
            from . import controlnet

            controlnet.add_arguments(command)


def _own_module(kind: str):
    import importlib

    return importlib.import_module(f".{OWN_MODULES[kind]}", __package__)


def run(args: argparse.Namespace) -> int:
    if args.kind in OWN_MODULES:
        return _own_module(args.kind).run(args)
    set_threads(args)
    overrides = {"max_steps": args.max_steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                 "checkpoint_every": args.checkpoint_every, "seed": args.seed}
    for name in ("init_from", "train", "edge_loss_weight", "adversarial_weight"):
        overrides[name] = getattr(args, name, None)
    config = load_config(args.kind, args.config, overrides)
    if args.kind == "ldm":
        final = train_ldm(args, config)
    elif args.kind == "controlnet":
        from .controlnet import train_controlnet

        final = train_controlnet(args, config)
    else:
        final = train_autoencoder(args, config, mask_input=args.kind == "anatomy-controller")
    print(f"Trained {args.kind}; the model is in {final}")
    return 0
