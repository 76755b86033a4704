"""Randomly initialised model directories, for tests and benchmarks of everything around the sampler.

A random model loads and runs exactly like a trained one, at its preset's geometry
(:data:`architecture.PRESETS`); it produces noise-like images.
"""

from __future__ import annotations

from pathlib import Path

from .. import vocabulary
from ..control_spec import check_name
from ..errors import ModelError
from .architecture import component_configs
from .info import ModelInfo
from .sampling import XREAL_DEFAULTS

# Words every random model's tokenizer knows besides the vocabulary's findings.
EXTRA_WORDS = ("effusion", "pleural", "opacity", "no", "finding", "of", "the", "and", "with", ",", ".", "-")


def _vocab_words(findings: list[str]) -> list[str]:
    """WordPiece vocabulary: BERT's special tokens, the finding words, basic punctuation."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for finding in list(findings) + list(EXTRA_WORDS):
        for word in finding.lower().replace("-", " - ").replace(",", " , ").split():
            if word not in words:
                words.append(word)
    return words


CONTROLNET_INITS = ("zero", "random")
# A "random" ControlNet's zero convolutions get weights of this standard deviation: enough to move the image.
RANDOM_CONTROLNET_STD = 0.05


def create_random_model(out_dir: str | Path, preset: str = "tiny", seed: int = 0, model_id: str | None = None,
                        controlnets=(), controlnet_init: str = "random") -> Path:
    """Write a complete, randomly initialised model directory (it generates noise-like images).

    For tests and benchmarks of everything around the sampler: it loads and runs
    exactly like a trained model, at the preset's geometry. ``controlnets``: control names that get a
    ControlNet (``controlnet_<name>/``, default scale 1); ``controlnet_init`` "zero" leaves them as
    freshly made (zero output convolutions: no effect), "random" fills those convolutions with noise.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import BertTokenizer

    from .pipeline import XRealPipeline

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ModelError(f"{out_dir} already exists and is not empty; choose a new directory for the model.")
    findings = vocabulary.finding_names()
    words = _vocab_words(findings)
    configs = component_configs(preset, vocab_size=len(words))
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = out_dir / "vocab.txt.tmp"
    vocab_file.write_text("\n".join(words) + "\n", encoding="utf-8")
    try:
        tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True, model_max_length=150)
    finally:
        vocab_file.unlink()

    torch.manual_seed(seed)
    vae = AutoencoderKL(**configs["autoencoder"])
    anatomy_controller = AutoencoderKL(**configs["autoencoder"])
    for autoencoder in (vae, anatomy_controller):
        # Decoder outputs mostly inside [0, 1], like the trained autoencoders (images are in [0, 1]).
        with torch.no_grad():
            autoencoder.decoder.conv_out.weight.mul_(0.35)
            autoencoder.decoder.conv_out.bias.fill_(0.5)
    unet = UNet2DConditionModel(**configs["unet"])
    text_encoder = LDMBertModel(LDMBertConfig(**configs["text_encoder"]))
    scheduler = DDIMScheduler(**configs["scheduler"])
    info = ModelInfo(
        model_id=model_id or f"random-{preset}-seed{seed}",
        description=f"Randomly initialised {preset} XReal model (seed {seed}); produces noise, for tests only.",
        image_size=configs["image_size"], latent_size=configs["latent_size"],
        findings=findings, defaults={**XREAL_DEFAULTS, **configs["defaults"]},
    )
    pipe = XRealPipeline(vae=vae, anatomy_controller=anatomy_controller, unet=unet, text_encoder=text_encoder,
                         tokenizer=tokenizer, scheduler=scheduler, model_info=info)
    if controlnet_init not in CONTROLNET_INITS:
        raise ModelError(f"controlnet_init must be one of {', '.join(CONTROLNET_INITS)}, not {controlnet_init!r}.")
    factor = info.image_size // info.latent_size
    for name in controlnets:
        pipe.controlnets[check_name(name)] = _random_controlnet(unet, factor, controlnet_init)
    info.controlnets = {name: 1.0 for name in pipe.controlnets}
    pipe.save_pretrained(out_dir)
    return out_dir


def _random_controlnet(unet, factor: int, init: str):
    """A ControlNet made from ``unet``; with ``init="random"`` its zero convolutions are filled with noise."""
    import torch

    from .controlnets import make_controlnet

    controlnet = make_controlnet(unet, factor)
    if init == "random":
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]
        with torch.no_grad():
            for conv in zero_convs:
                conv.weight.normal_(0.0, RANDOM_CONTROLNET_STD)
                conv.bias.normal_(0.0, RANDOM_CONTROLNET_STD)
    return controlnet.eval()
