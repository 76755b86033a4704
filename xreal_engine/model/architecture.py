"""The XReal networks' configurations and the one DDIM schedule (design.md section 3).

Every place that builds a model (random test models, training, conversion, benchmarks) takes
its component configs from :func:`component_configs` and its noise schedule from
:func:`scheduler_config`; every sampler sets its timesteps with :func:`set_ddim_timesteps`.
torch is imported only by the functions that need it.
"""

from __future__ import annotations

from ..errors import ModelError
from .sampling import SAMPLERS

NUM_TRAIN_TIMESTEPS = 1000
# The anatomy controller's input: labels 0..4 divided by 4 into [0, 1], as it was trained (sampler and trainers alike).
ANATOMY_LABEL_DIVISOR = 4.0


def scheduler_config(beta_start: float = 0.0015, beta_end: float = 0.0295,
                     num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> dict:
    """XReal's / LDM's DDIM: sqrt-linear betas, steps offset 1, first alpha_prev = alphas_cumprod[0]."""
    return {
        "num_train_timesteps": num_train_timesteps, "beta_start": beta_start, "beta_end": beta_end,
        "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
        "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading",
    }


def original_alphas_cumprod(beta_start: float, beta_end: float, num_train_timesteps: int):
    """alphas_cumprod exactly as CompVis/XReal computes it: sqrt-linear betas and cumprod in float64."""
    import torch

    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def check_xreal_schedule(config) -> None:
    """Refuse a scheduler config that is not XReal's schedule (ModelError naming what differs)."""
    if config.beta_schedule != "scaled_linear" or config.trained_betas is not None:
        raise ModelError("The scheduler must use beta_schedule 'scaled_linear' as XReal does.")
    if config.set_alpha_to_one or config.prediction_type != "epsilon" or config.clip_sample:
        raise ModelError("The scheduler must have set_alpha_to_one, clip_sample False and epsilon prediction.")


def make_solver(sampler: str, ddim_config, held_steps: int = 0):
    """A fresh multistep solver for one stage, on XReal's noise schedule.

    'trailing' spacing starts the solver at the last training timestep (999), where its first
    input, pure noise, belongs; XReal's 'leading' spacing is kept for DDIM only, to match the
    original exactly. ``held_steps``: the first steps whose input the sampler blends with the known
    region; UniPC's corrector is off for those, because it recomputes a step's input from the
    previous one and would throw the blend away (with it on, the anatomy hold was lost: demo-model
    Dice 0.853 / 0.872 / 0.833 at 15 steps instead of 0.920 / 0.925 / 0.885, benchmarks/README.md).
    """
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    common = {key: ddim_config[key] for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                                 "prediction_type")}
    if sampler == "dpmpp":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                           timestep_spacing="trailing")
    if sampler == "unipc":
        # The corrector of step k refines step k's input from step k-1's: off while inputs are blended.
        return UniPCMultistepScheduler(**common, solver_order=2, timestep_spacing="trailing",
                                       disable_corrector=list(range(max(0, held_steps - 1))))
    raise ModelError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")


def set_ddim_timesteps(scheduler, steps: int) -> list[int]:
    """Set ``steps`` DDIM timesteps on ``scheduler`` and return them as ints.

    XReal's spacing is 'leading' plus offset 1 (991, 981, ..., 1 for 100 steps). For more than
    500 steps that puts the first timestep at ``steps`` itself, one past the schedule's end at
    1000 steps (the original crashes there too); such a schedule is shifted down to end at 0,
    so every documented step count from 1 to 1000 runs. For 1..999 steps nothing changes.
    """
    scheduler.set_timesteps(steps)
    overshoot = int(scheduler.timesteps[0]) - (scheduler.config.num_train_timesteps - 1)
    if overshoot > 0:
        scheduler.timesteps = scheduler.timesteps - overshoot
    return [int(t) for t in scheduler.timesteps]


PRESETS = {
    # ~1 s per generation on one CPU core at the default 10 steps: for tests of the other parts.
    "tiny": {
        "image_size": 64, "latent_size": 16, "unet_channels": (32, 32), "unet_layers": 1,
        "unet_attention_levels": (False, True), "unet_heads": 4, "text_width": 64, "text_layers": 2,
        "text_heads": 2, "text_head_dim": 32, "ae_channels": (32, 32, 64), "ae_layers": 1,
        "defaults": {"num_inference_steps": 10, "anatomy_steps": 5},
    },
    # The official XReal architecture (design.md section 3): for benchmarks; ~1.2e9 parameters.
    "full": {
        "image_size": 256, "latent_size": 64, "unet_channels": (224, 448, 896, 896), "unet_layers": 2,
        "unet_attention_levels": (False, True, True, True), "unet_heads": 8, "text_width": 1280,
        "text_layers": 32, "text_heads": 8, "text_head_dim": 64, "ae_channels": (128, 256, 512), "ae_layers": 2,
        "defaults": {},
    },
}


def component_configs(preset: str = "tiny", vocab_size: int = 30522) -> dict:
    """diffusers / LDMBert configs of every network for a preset (shared by tests and benchmarks)."""
    if preset not in PRESETS:
        raise ModelError(f"Unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    p = PRESETS[preset]
    autoencoder = {
        "in_channels": 3, "out_channels": 3, "latent_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * len(p["ae_channels"]),
        "up_block_types": ["UpDecoderBlock2D"] * len(p["ae_channels"]),
        "block_out_channels": list(p["ae_channels"]), "layers_per_block": p["ae_layers"],
        "sample_size": p["image_size"], "scaling_factor": 0.18215,
    }
    unet = {
        "sample_size": p["latent_size"], "in_channels": 3, "out_channels": 3,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in p["unet_attention_levels"]],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(p["unet_attention_levels"])],
        "block_out_channels": list(p["unet_channels"]), "layers_per_block": p["unet_layers"],
        "attention_head_dim": p["unet_heads"], "cross_attention_dim": p["text_width"],
        "flip_sin_to_cos": True, "freq_shift": 0, "use_linear_projection": False,
    }
    text_encoder = {
        "vocab_size": vocab_size, "max_position_embeddings": 150, "encoder_layers": p["text_layers"],
        "encoder_ffn_dim": 4 * p["text_width"], "encoder_attention_heads": p["text_heads"],
        "head_dim": p["text_head_dim"], "d_model": p["text_width"], "dropout": 0.0,
    }
    scheduler = scheduler_config()
    return {"autoencoder": autoencoder, "unet": unet, "text_encoder": text_encoder, "scheduler": scheduler,
            "image_size": p["image_size"], "latent_size": p["latent_size"], "defaults": dict(p["defaults"])}
