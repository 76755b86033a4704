"""``xreal-engine train controlnet``: one ControlNet (RadGazeGen's Rad-CN / HVA-CN) on a trained XReal model.

The model's UNet, VAE and text encoder stay frozen; only the ControlNet learns. It starts as a copy of
the UNet's encoder with zero convolutions (``model/controlnets.make_controlnet``), so before training
it changes nothing. Loss: epsilon MSE on noised VAE latents of the training split, as the LDM was
trained, with the ControlNet's residuals added to the frozen UNet. The prompt is the image's finding,
replaced by "" at ``prompt_dropout`` (ControlNet's 50 %: the map alone must steer, and XReal's anatomy
stage samples with the empty prompt).

Each training image is jittered (MONAI, as for the LDM) ``copies`` times; every jittered copy is
encoded once and its control map computed from the same jittered pixels, so map and latent align:

- ``sobel`` / ``canny`` / ``texture``: ``io.controls.control_map`` of the image itself;
- ``lungs``: the lung mask of its label map (images without one are skipped);
- ``attention``: **synthetic gaze** (no REFLACX / EGD-CXR data here): focused fixations on the lungs,
  often with a counterfactual opacity painted where they are, or fixations on the heart for
  cardiomegaly (``synthetic_gaze``); images without a label map get their lungs from the shipped
  segmenter.

Writes the run directory of every ``train`` command (checkpoints, log.jsonl, config.yaml) and
``OUT/model/``: a copy of the base model directory plus ``controlnet_<name>/`` (float16 safetensors)
and its default scale under ``"controlnets"`` in ``xreal_model.json``, so ``OUT/model`` loads as is.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

import numpy as np

from ..errors import InputError

# ----------------------------------------------------------------------------- maps


def attention_settings() -> dict:
    """The synthetic-gaze settings of the packaged config: training and ``evaluate`` draw maps alike."""
    import yaml

    from .loop import CONFIG_DIR
    from .synthetic_gaze import gaze_settings

    return gaze_settings(yaml.safe_load((CONFIG_DIR / "controlnet.yaml").read_text(encoding="utf-8"))["attention"])


def training_example(name: str, image: np.ndarray, labels: np.ndarray | None, finding: str,
                     rng: np.random.Generator, settings: dict):
    """(image to encode, control map, prompt) for one (jittered) training image; None = skip it for this control.

    Only ``attention`` may change the image (a painted opacity, ``synthetic_gaze``) and the prompt.
    """
    from ..io.controls import REFERENCE_CONTROLS, control_map
    from .synthetic_gaze import attention_example

    size = int(image.shape[-1])
    if name in REFERENCE_CONTROLS:
        return image, control_map(name, reference=image, size=size), finding
    if labels is None:
        return None
    if name == "lungs":
        if not np.isin(labels, (1, 2)).any():
            return None
        return image, control_map(name, labels=labels, size=size), finding
    return attention_example(image, labels, finding, rng, settings)


# ----------------------------------------------------------------------------- data


class ControlSet:
    """Cached (latent mean, latent std, control map, finding) items for the DataLoader."""

    def __init__(self, means, stds, maps, findings):
        self.means, self.stds, self.maps, self.findings = means, stds, maps, findings

    def __len__(self):
        return len(self.findings)

    def __getitem__(self, index):
        return {"mean": self.means[index], "std": self.stds[index], "control": self.maps[index],
                "finding": self.findings[index]}


def _tensor(value):
    return value.as_tensor() if hasattr(value, "as_tensor") else value


def cache_items(name: str, records, vae, config: dict, device, rng: np.random.Generator) -> ControlSet:
    """Jitter every record ``copies`` times; encode each copy with the frozen VAE and compute its map."""
    import torch

    from .data import make_dataset

    from .synthetic_gaze import gaze_settings

    training, settings = config["training"], gaze_settings(config.get("attention"))
    size, copies = int(config["image_size"]), max(int(training.get("copies", 4)), 1)
    augment = bool(config.get("augment", True))
    labelled = [r for r in records if r.label is not None]
    unlabelled = [r for r in records if r.label is None]
    groups = [(labelled, True)]
    if name in ("sobel", "canny", "texture") or (name == "attention" and settings.get("lungs_from_segmenter", True)):
        groups.append((unlabelled, False))
    segmenter = None
    means, stds, maps, findings = [], [], [], []
    with torch.no_grad():
        for group, with_label in groups:
            if not group:
                continue
            dataset = make_dataset(group, size, with_label=with_label, augment=augment,
                                   seed=int(training.get("seed", 0)))  # the same cache again when resumed
            loader = torch.utils.data.DataLoader(dataset, batch_size=int(training["batch_size"]), shuffle=False)
            for _ in range(copies):
                for batch in loader:
                    images = _tensor(batch["image"]).float()
                    pictures = images[:, 0].numpy()
                    if with_label:
                        label_maps = np.rint(_tensor(batch["label"])[:, 0].numpy()).astype(np.int64)
                    elif name == "attention":
                        if segmenter is None:
                            from .segmenter import Segmenter

                            segmenter = Segmenter.load(device="cpu")
                        masks = segmenter.segment(pictures)  # (N, 3, H, W): left lung, right lung, heart
                        label_maps = np.where(masks[:, 2], 3, np.where(masks[:, 0], 1, np.where(masks[:, 1], 2, 0)))
                    else:
                        label_maps = [None] * len(pictures)
                    kept = []
                    for picture, label_map, finding in zip(pictures, label_maps, batch["finding"]):
                        example = training_example(name, picture, label_map, finding, rng, settings)
                        if example is not None:
                            picture, control, finding = example
                            kept.append(torch.as_tensor(np.asarray(picture), dtype=torch.float32)[None])
                            maps.append(torch.as_tensor(control, dtype=torch.float32)[None])
                            findings.append(finding)
                    if not kept:
                        continue
                    posterior = vae.encode(torch.stack(kept).to(device).repeat(1, 3, 1, 1)).latent_dist
                    means.append(posterior.mean.float().cpu())
                    stds.append(posterior.std.float().cpu())
    if not findings:
        raise InputError(f"No training image has what the {name} control needs (a label map with lungs, or a region).")
    return ControlSet(torch.cat(means), torch.cat(stds), torch.stack(maps), findings)


# ----------------------------------------------------------------------------- training


def write_model(base_dir: Path, controlnet, name: str, scale: float, final: Path) -> Path:
    """OUT/model = the base model directory + ``controlnet_<name>/`` (float16) + its default scale."""
    import torch

    from ..model.controlnets import save_controlnet
    from ..model.info import controlnet_folder
    from .loop import INTERRUPTED_RESUME, publish, written_or_removed

    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with written_or_removed("The model with the trained ControlNet", staging, INTERRUPTED_RESUME):
        shutil.copytree(base_dir, staging, ignore=shutil.ignore_patterns(controlnet_folder(name), "__pycache__"))
        save_controlnet(controlnet.to("cpu"), staging, name, scale, dtype=torch.float16)
    publish(staging, final)
    return final


def _finished_controlnet(checkpoints: list[Path], max_steps: int, unet, factor: int):
    """The ControlNet of the newest checkpoint when it reached ``max_steps`` and its weights read, else None
    (then the run goes on from the newest checkpoint that reads, ``Trainer.resume``)."""
    from safetensors.torch import load_file

    from ..model.controlnets import make_controlnet
    from .loop import checkpoint_step, refuse_steps_below

    step = checkpoint_step(checkpoints[0]) if checkpoints else None
    if step is None or step < max_steps:
        return None
    refuse_steps_below(step, max_steps, checkpoints[0].parents[1])
    controlnet = make_controlnet(unet, factor=factor)
    try:
        controlnet.load_state_dict(load_file(str(checkpoints[0] / "model.safetensors")))
    except Exception:  # noqa: BLE001 (a damaged file: safetensors, OSError or a shape mismatch)
        return None
    return controlnet.eval()


def train_controlnet(args, config: dict) -> Path:
    """Train the ControlNet for ``args.control`` on ``args.model`` (frozen) with the train split of ``args.data``."""
    import torch
    import torch.nn.functional as F

    from ..control_spec import check_name, check_scale
    from ..model.controlnets import make_controlnet
    from ..model.info import resolve_model
    from ..model.pipeline import XRealPipeline
    from .loop import (Trainer, make_accelerator, prepare_out_dir, run_inputs, seed_everything, step_loader,
                       write_resolved_config)
    from .data import read_records

    name = check_name(args.control)
    training = config["training"]
    scale = check_scale(config.get("default_scale", 1.0), f"{name} default")
    model_dir = resolve_model(args.model)
    records = read_records(args.data, "train", require_labels=name == "lungs")
    pipe = XRealPipeline.from_pretrained(model_dir)
    info = pipe.model_info
    if config.get("image_size") in (None, "model"):
        config["image_size"] = int(info.image_size)
    elif int(config["image_size"]) != int(info.image_size):
        raise InputError(f"The config's image_size {config['image_size']} differs from the model's {info.image_size}.")
    seed = int(training.get("seed", 0))
    seed_everything(seed)
    out = Path(args.out)
    config["control"], config["base_model"] = name, str(model_dir)
    config["inputs"] = run_inputs(args.data)
    checkpoints = prepare_out_dir(out, args.resume, args.kind, config)
    write_resolved_config(out, config)
    accelerator = make_accelerator(args.mixed_precision)
    device = accelerator.device

    factor = int(info.image_size) // int(info.latent_size)
    finished = _finished_controlnet(checkpoints, int(training["max_steps"]), pipe.unet, factor)
    if finished is not None:
        # Nothing left to train (how an interrupted run is finished): publish the checkpoint's weights as they are,
        # without re-encoding the training set.
        return write_model(model_dir, finished, name, scale, out / "model")
    vae = pipe.vae.to(device).eval().requires_grad_(False)
    unet = pipe.unet.to(device).eval().requires_grad_(False)
    text_encoder = pipe.text_encoder.to(device).eval().requires_grad_(False)
    tokenizer, scheduler = pipe.tokenizer, pipe.scheduler
    # The cache depends only on the seed, so a resumed run rebuilds the same items.
    items = cache_items(name, records, vae, config, device, np.random.default_rng(seed))
    with torch.no_grad():
        prompts = sorted(set(items.findings) | {""})
        tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids.to(device)
        contexts = dict(zip(prompts, text_encoder(tokens)[0]))  # frozen: one context per prompt, computed once

    controlnet = make_controlnet(unet, factor=factor).to(device).train()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=float(training["learning_rate"]), weight_decay=0.0)
    batch_size = int(training["batch_size"])
    loader = step_loader(items, batch_size, seed)
    controlnet, optimizer, loader = accelerator.prepare(controlnet, optimizer, loader)
    trainer = Trainer(args, config, accelerator)
    if checkpoints:
        trainer.resume(checkpoints)
    dropout = float(training.get("prompt_dropout", 0.5))
    scale_factor = float(info.scale_factor)
    alphas = scheduler.alphas_cumprod.to(device)

    def step(batch):
        latents = (batch["mean"] + batch["std"] * torch.randn_like(batch["std"])) * scale_factor
        context = torch.stack([contexts["" if random.random() < dropout else f] for f in batch["finding"]])
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        a = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with accelerator.autocast():
            down, mid = controlnet(noisy, timesteps, encoder_hidden_states=context, controlnet_cond=batch["control"],
                                   return_dict=False)
            prediction = unet(noisy, timesteps, encoder_hidden_states=context, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid).sample
            loss = F.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        return loss.detach().item()

    trainer.run(loader, step)
    accelerator.wait_for_everyone()
    final = out / "model"
    if accelerator.is_main_process:
        write_model(model_dir, accelerator.unwrap_model(controlnet).eval(), name, scale, final)
    return final


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ControlNet's own options (the shared ones come from training/cli.py)."""
    from ..control_spec import CONTROL_NAMES

    parser.add_argument("--control", required=True, metavar="NAME", help=f"which control: {', '.join(CONTROL_NAMES)}")
    parser.add_argument("--model", default="demo", help="'demo' (default) or the model directory to control (frozen)")
