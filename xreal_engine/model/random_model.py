"""Randomly initialised model directories, for tests and benchmarks of everything around the sampler.

A random model loads and runs exactly like a trained one, at its preset's geometry
(:data:`architecture.PRESETS`); it produces noise-like images.
"""

from __future__ import annotations

from pathlib import Path

from .. import vocabulary
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


def create_random_model(out_dir: str | Path, preset: str = "tiny", seed: int = 0, model_id: str | None = None) -> Path:
    """Write a complete, randomly initialised model directory (it generates noise-like images).

    For tests and benchmarks of everything around the sampler: it loads and runs
    exactly like a trained model, at the preset's geometry.
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
    pipe.save_pretrained(out_dir)
    return out_dir
