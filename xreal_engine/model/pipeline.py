"""The XReal sampler as a diffusers pipeline (design.md section 3).

``XRealPipeline`` reproduces XReal's ``sample_controlled``: an anatomy controller
turns the label map into a rough image, an anatomy stage re-generates it with
the anatomy held by a soft mask for the first steps, and one pathology stage per
(region, finding) re-generates each region under classifier-free guidance while
the rest of the image is held at every step. With ``rng="original"`` and the
same weights it draws the same random numbers in the same order as the original
code, which is how the golden fixtures are reproduced.

Sampler state (latents, masks, noise, schedule) stays in float32 on the
pipeline's device (masks, timesteps and the guidance prompt pair made there once per
stage, nothing copied between host and device inside the loop); each network runs in its own weights' dtype (no autocast: ``set_precision`` casts the UNet
and the text encoder to float16/bfloat16 once and keeps the autoencoders in float32),
so low precision only changes the network arithmetic.

Why this file is long: like diffusers' pipelines it keeps the whole sampler in one class, so that
``__call__`` reads top to bottom; the input checks are in ``inputs.py``, the schedule in
``architecture.py`` and the settings in ``sampling.py``.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel
from transformers import BertTokenizer, BertTokenizerFast

from ..errors import InputError, ModelError
from .anatomy_cache import DEFAULT_ENTRIES, AnatomyStageCache, numerics_settings
from .architecture import (
    ANATOMY_LABEL_DIVISOR, check_xreal_schedule, make_solver, original_alphas_cumprod, set_ddim_timesteps,
)
from .controlnets import PreparedControl, StageControls, load_controlnets, prepare_controls
from .info import ModelInfo, canonical_finding, check_model_dir
from .inputs import anatomy_labels, pathology_mask, square_array
from .overlay import keep_outside
from .sampling import SamplingParameters

RNG_MODES = ("generator", "original")


@dataclass
class XRealPipelineOutput:
    """Result of one generation; 2D images are the channel mean, ``*_hwc`` the raw 3-channel images."""

    image: np.ndarray  # (H, W) float32 in [0, 1]
    anatomy_image: Optional[np.ndarray]  # (H, W) x_a_gen; None in edit mode
    x_hat: Optional[np.ndarray]  # (H, W) anatomy-controller image; None in edit mode
    x_p_gen_hwc: np.ndarray  # (H, W, 3) the original's return value
    x_a_gen_hwc: Optional[np.ndarray]
    x_hat_hwc: Optional[np.ndarray]
    anatomy_stage_reused: bool = False  # the anatomy stage came from the cache (enable_anatomy_stage_cache)


@dataclass
class Stage:
    """One diffusion stage (XReal's ``sample_spatial_input``): what it starts from and what it holds."""

    name: str  # "anatomy", "pathology", "pathology k/n": the progress callback's stage
    image: torch.Tensor  # (1, 3, S, S) in [0, 1]: encoded, then re-generated
    known_mask: torch.Tensor  # latent-size mask, 1 = hold the encoded image there (soft values blend)
    masked_steps: int  # hold the known region for the first N steps (all steps in a pathology stage)
    prompt: torch.Tensor  # text embedding of the finding ("" for the anatomy stage)
    uncond: Optional[torch.Tensor]  # the empty prompt's embedding when guidance is used, else None
    guidance_scale: float
    controls: Optional[StageControls] = None  # the ControlNets that steer this stage (None: the UNet alone)
    free_mask: torch.Tensor = field(init=False)  # 1 - known_mask, made once per stage, not once per step

    def __post_init__(self):
        self.free_mask = 1 - self.known_mask


def is_out_of_memory(error: BaseException) -> bool:
    """A GPU out-of-memory error, or the CPU allocator's (a RuntimeError that says so)."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def out_of_memory_message(device: torch.device, dtype: torch.dtype) -> str:
    """The one sentence for running out of memory, with what to try (the fast preset, float16)."""
    where = "GPU" if device.type == "cuda" else "computer"
    if device.type == "cuda":
        half = "" if dtype == torch.float16 else " or half precision (--dtype float16)"
    else:
        half = "" if dtype == torch.bfloat16 else " or bfloat16 (--dtype bfloat16)"
    return (f"The {where} ran out of memory while generating on {device} in {str(dtype).replace('torch.', '')}; "
            f"try the fast preset (--fast){half}, close other programs using the {where}'s memory, "
            f"or use a smaller model.")


def _to_hwc(image: torch.Tensor) -> np.ndarray:
    return image[0].permute(1, 2, 0).float().cpu().numpy()


class XRealPipeline(DiffusionPipeline):
    """XReal anatomy-then-pathology latent diffusion (see the module docstring and docs/architecture.md)."""

    model_cpu_offload_seq = "text_encoder->anatomy_controller->vae->unet"

    def __init__(
        self,
        vae: AutoencoderKL,
        anatomy_controller: AutoencoderKL,
        unet: UNet2DConditionModel,
        text_encoder: LDMBertModel,
        tokenizer: Union[BertTokenizer, BertTokenizerFast],
        scheduler: DDIMScheduler,
        model_info: Optional[ModelInfo] = None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae, anatomy_controller=anatomy_controller, unet=unet, text_encoder=text_encoder,
            tokenizer=tokenizer, scheduler=scheduler,
        )
        for module in (vae, anatomy_controller, unet, text_encoder):
            module.eval()
        if model_info is None:
            latent_size = int(unet.config.sample_size)
            model_info = ModelInfo(
                model_id="unnamed-xreal-model",
                image_size=latent_size * 2 ** (len(vae.config.block_out_channels) - 1),
                latent_size=latent_size,
            )
        self.model_info = model_info
        # Optional ControlNets by control name (model/controlnets.py). Not registered modules: they live in
        # controlnet_<name>/ folders that xreal_model.json lists, beside the diffusers components.
        self.controlnets = {}
        # What runs the UNet: None = the UNet module itself; model/frozen_unet.py sets a frozen graph (--freeze).
        self.denoiser = None
        # Anatomy-stage results kept for jobs that share them (anatomy_cache.py); off unless enabled.
        self.anatomy_stage_cache: Optional[AnatomyStageCache] = None
        self._use_original_schedule()

    def enable_anatomy_stage_cache(self, entries: int = DEFAULT_ENTRIES) -> "XRealPipeline":
        """Reuse the anatomy stage, bit for bit, for a job with the same label map, seeded generator,
        anatomy settings and networks as one of the last ``entries`` jobs (model/anatomy_cache.py). For
        long-lived pipelines whose weights stay fixed: the service, ``generate-batch``, ``evaluate``."""
        self.anatomy_stage_cache = AnatomyStageCache(entries)
        return self

    def disable_anatomy_stage_cache(self) -> None:
        self.anatomy_stage_cache = None

    # ------------------------------------------------------------------ loading and saving

    def _use_original_schedule(self) -> None:
        """Give the scheduler the original's float64-derived alphas_cumprod (diffusers' float32 one differs by 8e-7)."""
        config = self.scheduler.config
        check_xreal_schedule(config)
        alphas_cumprod64 = original_alphas_cumprod(config.beta_start, config.beta_end, config.num_train_timesteps)
        self.scheduler.alphas_cumprod = alphas_cumprod64.float()
        self.scheduler.final_alpha_cumprod = self.scheduler.alphas_cumprod[0]
        # q_sample coefficients: computed in float64, then cast, as the original's buffers.
        self._sqrt_alphas_cumprod = alphas_cumprod64.sqrt().float()
        self._sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod64).sqrt().float()

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers layout (safetensors) plus ``xreal_model.json``."""
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        from .info import controlnet_folder

        for name, controlnet in self.controlnets.items():
            controlnet.save_pretrained(str(Path(save_directory) / controlnet_folder(name)), safe_serialization=True)
        self.model_info.controlnets = {name: self.model_info.controlnets.get(name, 1.0) for name in self.controlnets}
        self.model_info.save(save_directory)
        from ..files import give_umask_modes

        give_umask_modes(save_directory)  # safetensors writes 0600; a model is for sharing

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a local model directory only (never downloads); ModelError with one sentence on failure."""
        model_dir = check_model_dir(Path(pretrained_model_name_or_path))
        model_info = ModelInfo.load(model_dir)
        kwargs["local_files_only"] = True
        try:
            pipe = super().from_pretrained(str(model_dir), **kwargs)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelError(f"The model directory {model_dir} cannot be loaded: {first_line}") from None
        pipe.model_info = model_info
        pipe.controlnets = load_controlnets(model_dir, model_info, pipe.unet)
        return pipe

    # ------------------------------------------------------------------ precision

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's dtype (what provenance records); the autoencoders may stay in float32."""
        return self.unet.dtype

    def set_precision(self, dtype: torch.dtype) -> "XRealPipeline":
        """The UNet and text encoder in ``dtype``, the autoencoders in float32; returns the pipeline.

        Weights cast once, not autocast: autocast re-casts every weight at every network call (its
        cache lives only as long as one ``with`` block) and gives the same numbers. The autoencoders
        stay float32: on the demo model a bfloat16 UNet + text encoder moves the final image by at
        most 0.8 grey levels of 255, bfloat16 autoencoders by 4.2; they run 6 times per image against
        200 UNet calls (benchmarks/README.md).
        """
        self.unet.to(dtype=dtype)
        self.text_encoder.to(dtype=dtype)
        for controlnet in self.controlnets.values():  # residuals are added to the UNet's activations
            controlnet.to(dtype=dtype)
        for autoencoder in (self.vae, self.anatomy_controller):
            autoencoder.to(dtype=torch.float32)
        return self

    def to(self, *args, **kwargs):
        """diffusers' ``to`` for the registered components, then the ControlNets onto the UNet's device and dtype."""
        pipe = super().to(*args, **kwargs)
        for controlnet in self.controlnets.values():
            controlnet.to(device=self.unet.device, dtype=self.unet.dtype)
        return pipe

    # ------------------------------------------------------------------ helpers

    @torch.inference_mode()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """LDM-BERT embedding (1, 150, width): padded to max length, no attention mask, as the original."""
        tokens = self.tokenizer(
            prompt, padding="max_length", truncation=True,
            max_length=self.text_encoder.config.max_position_embeddings, return_tensors="pt",
        )
        embedding = self.text_encoder(tokens.input_ids.to(self.device))[0]
        return embedding.to(self.unet.dtype)

    def _predict_noise(self, latents, timestep, cond, uncond, guidance_scale, prompt_pair=None, controls=None):
        """eps with classifier-free guidance; cond and uncond go through the UNet in ONE batch.

        ``prompt_pair``: ``cat([uncond, cond])`` made once per stage instead of once per step.
        ``controls`` (``StageControls``, model/controlnets.py): the ControlNets' residuals are added to the
        UNet's down and mid blocks for both halves of the guidance batch; None is the plain UNet call.
        """
        dtype = self.unet.dtype
        if uncond is None:
            sample, hidden = latents.to(dtype), cond
        else:
            sample = torch.cat([latents, latents]).to(dtype)
            hidden = torch.cat([uncond, cond]) if prompt_pair is None else prompt_pair
        residuals = {}
        if controls is not None:
            down, mid = controls.residuals(sample, timestep, hidden)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        eps = (self.denoiser or self.unet)(sample, timestep, encoder_hidden_states=hidden, **residuals).sample.float()
        if uncond is None:
            return eps
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    def ddim_step(self, latents, t: int, t_device, cond, uncond, guidance_scale: float, eta: float, noise,
                  prompt_pair=None, controls=None):
        """One step of the original's ``p_sample_ddim``: returns (x_prev, pred_x0).

        ``t`` is the timestep as an int (scheduler arithmetic), ``t_device`` the same on the device (UNet).
        The scheduler must have had ``set_timesteps`` called. ``noise`` is used only when eta > 0.
        """
        eps = self._predict_noise(latents, t_device, cond, uncond, guidance_scale, prompt_pair, controls)
        step = self.scheduler.step(eps, t, latents, eta=eta, variance_noise=noise)
        return step.prev_sample, step.pred_original_sample

    def anatomy_masks(self, labels: torch.Tensor):
        """(anatomy-controller input (1,3,S,S) in [0,1], its cubic resize to the latent size) from (S,S) labels.

        The original's rule: a map whose max is >= 1 is divided by 4 (labels 0..4 -> 0..1). The LDM
        mask is a cubic resize (no antialias, like cv2.INTER_CUBIC) of that, > 0 -> 1, else soft.
        """
        scaled = labels[None, None].float()
        if scaled.max() >= 1:  # labels come from the host: no device sync (and it runs on device="meta")
            scaled = scaled / ANATOMY_LABEL_DIVISOR
        scaled = scaled.to(self.device)
        size = self.model_info.latent_size
        resized = F.interpolate(scaled, size=(size, size), mode="bicubic", align_corners=False, antialias=False)
        return scaled.repeat(1, 3, 1, 1), resized.repeat(1, 3, 1, 1)

    def _encode_to_latent(self, image: torch.Tensor, draw) -> torch.Tensor:
        """LDM encoding as the original: a posterior SAMPLE (not the mode) times the scale factor."""
        posterior = self.vae.encode(image.to(self.vae.dtype)).latent_dist
        noise = draw("posterior", posterior.mean.shape)
        return (posterior.mean.float() + posterior.std.float() * noise) * self.model_info.scale_factor

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(((1.0 / self.model_info.scale_factor) * latents).to(self.vae.dtype)).sample
        return image.float().clamp(0, 1)

    def _run_stage(self, stage: "Stage", params: SamplingParameters, draw, callback) -> torch.Tensor:
        """XReal's ``sample_spatial_input``: encode, denoise from noise holding the known region, decode."""
        steps = params.num_inference_steps
        if callback is not None:
            callback(stage.name, 0, steps)
        x0 = self._encode_to_latent(stage.image, draw)
        latents = draw("x_T", x0.shape)
        prompt_pair = None if stage.uncond is None else torch.cat([stage.uncond, stage.prompt])
        if params.sampler == "ddim":
            latents = self._ddim_loop(stage, params, x0, latents, prompt_pair, draw, callback)
        else:
            latents = self._solver_loop(stage, params, x0, latents, prompt_pair, draw, callback)
        return self._decode(latents)

    def _ddim_loop(self, stage, params, x0, latents, prompt_pair, draw, callback):
        """XReal's DDIM, equal to the original (fixtures to ~1e-6).

        Timesteps are diffusers' 'leading' spacing + offset 1 (991, 981, ..., 1 for 100 steps), exactly
        ``steps`` of them (``architecture.set_ddim_timesteps``); for step counts that do not divide
        1000 the original ran one step more.
        """
        steps = params.num_inference_steps
        timesteps = set_ddim_timesteps(self.scheduler, steps)
        timesteps_on_device = self.scheduler.timesteps.to(self.device)
        for i, t in enumerate(timesteps):
            t_device = timesteps_on_device[i]
            # The blend comes BEFORE the step, as in the original's p_sample_ddim loop: the known latent
            # x0 is re-noised to the timestep t this step starts from (q_sample) and pasted into the
            # known region, so the step denoises a latent whose known part is exactly at noise level t.
            if i < stage.masked_steps:
                latents = self._hold(stage, x0, latents, t, draw)
            # Drawn at every step, also at eta 0, to keep the original's random-number stream.
            latents, _ = self.ddim_step(latents, t, t_device, stage.prompt, stage.uncond, stage.guidance_scale,
                                        params.eta, draw("ddim", latents.shape), prompt_pair, stage.controls)
            if callback is not None:
                callback(stage.name, i + 1, steps)
        return latents

    def _solver_loop(self, stage, params, x0, latents, prompt_pair, draw, callback):
        """A diffusers multistep solver (DPM-Solver++ / UniPC) with XReal's blend.

        The same blend as DDIM (``_hold``), placed where a multistep solver needs it: the known latent
        is re-noised to the timestep the NEXT step starts from and pasted AFTER each step. After, not
        before: UniPC's corrector rewrites the sample it is given at the start of ``step``, which would
        otherwise undo the hold. The hold covers the first ``masked_steps`` steps, the same fraction of
        the schedule as in DDIM. ``eta`` does not apply. The timesteps are read on the host once and
        the solver starts at index 0, so no step waits for the device (diffusers would look its step
        index up on the device).
        """
        steps = params.num_inference_steps
        scheduler = make_solver(params.sampler, self.scheduler.config, held_steps=min(stage.masked_steps, steps))
        scheduler.set_timesteps(steps)
        scheduler.set_begin_index(0)
        host_timesteps = [int(t) for t in scheduler.timesteps]
        timesteps = scheduler.timesteps.to(self.device)

        latents = latents * scheduler.init_noise_sigma
        if stage.masked_steps > 0:
            latents = self._hold(stage, x0, latents, host_timesteps[0], draw)
        for i, t in enumerate(timesteps):
            eps = self._predict_noise(latents, t, stage.prompt, stage.uncond, stage.guidance_scale, prompt_pair,
                                      stage.controls)
            latents = scheduler.step(eps, t, latents).prev_sample
            if i + 1 < min(stage.masked_steps, steps):
                latents = self._hold(stage, x0, latents, host_timesteps[i + 1], draw)
            if callback is not None:
                callback(stage.name, i + 1, steps)
        if stage.masked_steps >= steps:
            # Held to the end (a pathology stage): the known region ends at the known latent itself, as
            # DDIM's last step from timestep 1 all but does. Without this, the solver's last jump (from
            # timestep ~66 at 15 steps) re-invents the known region and doubled the change outside the
            # pathology region on the demo model (benchmarks/README.md).
            latents = x0 * stage.known_mask + stage.free_mask * latents
        return latents

    def _hold(self, stage: "Stage", x0, latents, t: int, draw):
        """XReal's blend: the known latent x0 re-noised to timestep ``t`` (the original's q_sample, with its
        float64-derived coefficients as host scalars) pasted into the known region of ``latents``."""
        noise = draw("q_sample", x0.shape)
        noised = self._sqrt_alphas_cumprod[t] * x0 + self._sqrt_one_minus_alphas_cumprod[t] * noise
        return noised * stage.known_mask + stage.free_mask * latents

    def _noise_source(self, rng: str, generator: Optional[torch.Generator]):
        """draw(kind, shape) -> float32 standard normal on the pipeline's device, in the chosen RNG order."""
        device = self.device
        if rng == "original":
            def draw(kind, shape):
                # The original draws the posterior sample on the CPU RNG and everything else on the device's RNG.
                if kind == "posterior":
                    return torch.randn(shape, dtype=torch.float32).to(device)
                return torch.randn(shape, dtype=torch.float32, device=device)
            return draw
        if generator is None:
            generator = torch.Generator(device=device)
            generator.seed()
        if torch.device(generator.device).type != device.type:
            raise InputError(
                f"The random generator is on {generator.device} but the model runs on {device}; "
                f"create it with torch.Generator(device='{device.type}')."
            )

        def draw(kind, shape):
            return torch.randn(shape, generator=generator, dtype=torch.float32, device=device)
        return draw

    # ------------------------------------------------------------------ the sampler

    @torch.inference_mode()
    def __call__(
        self,
        anatomy=None,
        pathologies: Sequence = (),
        image=None,
        num_inference_steps: Optional[int] = None,
        anatomy_steps: Optional[int] = None,
        eta: Optional[float] = None,
        guidance_scale: Optional[float] = None,
        soft_mask_value: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        rng: str = "generator",
        callback: Optional[Callable[[str, int, int], None]] = None,
        parameters: Optional[SamplingParameters] = None,
        sampler: Optional[str] = None,
        controls: Optional[Sequence[PreparedControl]] = None,
    ) -> XRealPipelineOutput:
        """Generate one image (see docs/architecture.md). Unset settings take the model's defaults.

        ``anatomy``: (image_size, image_size) labels 0..4. ``pathologies``: [(mask, finding)], masks at
        image or latent size, 1 = region; one pathology stage each, in order. ``image``: edit mode, a
        (image_size, image_size) image in [0, 1] replaces the anatomy controller and anatomy stage; finding
        "" removes a finding. ``callback(stage, step, total)`` runs before and after every step and may
        raise ``errors.Cancelled``. Stages are "anatomy", then "pathology" (or "pathology k/n").
        ``sampler``: "ddim" (XReal's, the default), "dpmpp" or "unipc" (diffusers' multistep solvers).
        ``parameters`` (already resolved, e.g. by ``generate``) replaces the single settings;
        otherwise they are resolved by the one sampling policy (``model/sampling.py``).
        ``controls``: [PreparedControl(name, map (1, 1, S, S) or (S, S) in [0, 1], scale or None)], each
        needing this model's ControlNet of that name; they steer the stages ``parameters.control_stages``
        names (model/controlnets.py). None or empty: the UNet alone, exactly as without ControlNets.
        """
        info = self.model_info
        # 1. Check inputs: sampling settings by the one policy, then masks, findings and the source image.
        if parameters is None:
            parameters = SamplingParameters.resolve(
                info.defaults, num_inference_steps=num_inference_steps, anatomy_steps=anatomy_steps, eta=eta,
                guidance_scale=guidance_scale, soft_mask_value=soft_mask_value, sampler=sampler)
        if rng not in RNG_MODES:
            raise InputError(f"The rng option must be one of {', '.join(RNG_MODES)}, not {rng!r}.")
        edit_mode = image is not None
        regions = [(pathology_mask(mask, k, info), canonical_finding(finding, info.findings, removal_allowed=True))
                   for k, (mask, finding) in enumerate(pathologies)]
        if edit_mode:
            source = square_array(image, "source image", [info.image_size])
            if source.min() < 0 or source.max() > 1:
                raise InputError("The source image must have values in [0, 1].")
            if not regions:
                raise InputError("Edit mode needs at least one pathology region to add or remove.")
        elif anatomy is None:
            raise InputError("An anatomy label map is required unless an image to edit is given.")
        else:
            labels = anatomy_labels(anatomy, info)
        controls = prepare_controls(controls, self.controlnets, info)
        draw = self._noise_source(rng, generator)

        # 2. Encode prompts: each distinct prompt once per image, the empty prompt once per pipeline.
        embeddings = {}

        def embed(prompt: str) -> torch.Tensor:
            if prompt == "":
                return self._empty_prompt_embedding()
            if prompt not in embeddings:
                embeddings[prompt] = self.encode_prompt(prompt)
            return embeddings[prompt]

        # Reuse of the anatomy stage (anatomy_cache.py): only where the caller's generator fixes its noise.
        reuse = None
        if self.anatomy_stage_cache is not None and not edit_mode and rng == "generator" and generator is not None:
            reuse = (self.anatomy_stage_cache, generator)

        out_of_memory = False
        try:
            current, x_hat, x_a_gen, reused = self._stages(
                None if edit_mode else labels, source if edit_mode else None, regions, parameters, embed, draw,
                callback, controls, reuse)
        except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError; so is a failed CPU allocation
            if not is_out_of_memory(error):
                raise
            out_of_memory = True
        if out_of_memory:  # outside the except block, so the failed step's tensors are freed first
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # give the cached blocks back, so the next (smaller) job can run
            raise ModelError(out_of_memory_message(self.device, self.dtype)) from None

        # 6. Output: decoded images as numpy, the 2D image is the channel mean of x_p_gen.
        x_p_gen = _to_hwc(current)
        x_a_gen_hwc = None if x_a_gen is None else _to_hwc(x_a_gen)
        x_hat_hwc = None if x_hat is None else _to_hwc(x_hat)
        return XRealPipelineOutput(
            image=x_p_gen.mean(axis=2),
            anatomy_image=None if x_a_gen_hwc is None else x_a_gen_hwc.mean(axis=2),
            x_hat=None if x_hat_hwc is None else x_hat_hwc.mean(axis=2),
            x_p_gen_hwc=x_p_gen, x_a_gen_hwc=x_a_gen_hwc, x_hat_hwc=x_hat_hwc, anatomy_stage_reused=reused,
        )

    def _stages(self, labels, source, regions, parameters, embed, draw, callback, controls=(), reuse=None):
        """Sections 3-5 of ``__call__``: (x_p_gen, x_hat, x_a_gen) as (1, 3, S, S) tensors, and whether the
        anatomy stage was reused. ``reuse``: (AnatomyStageCache, the caller's generator) or None."""
        device = self.device
        x_hat = x_a_gen = None
        reused = False
        # The ControlNets, their maps and scales on the device once per image, for the stages they steer.
        stage_controls = None
        if controls:
            stage_controls = StageControls([self.controlnets[c.name] for c in controls], controls, device,
                                           self.unet.dtype)
        anatomy_controls = stage_controls if parameters.controls_in("anatomy") else None
        pathology_controls = stage_controls if parameters.controls_in("pathology") else None
        if source is not None:
            current = source.to(device)[None, None].repeat(1, 3, 1, 1)
        else:
            cache, generator = reuse if reuse is not None else (None, None)
            key = None if cache is None else self._anatomy_stage_key(labels, generator, parameters, anatomy_controls)
            cached = None if key is None else cache.get(key)
            if cached is not None:
                # 3-4 reused: the same images, and the generator as the stage would have left it.
                generator.set_state(cached.generator_state)
                x_hat, x_a_gen, reused = cached.x_hat, cached.x_a_gen, True
                if callback is not None:
                    callback("anatomy", 0, parameters.num_inference_steps)
                    callback("anatomy", parameters.num_inference_steps, parameters.num_inference_steps)
            else:
                # 3. Anatomy controller: the label map becomes a rough image x_hat.
                x_hat, anatomy_latent_mask = self._anatomy_controller_image(labels)
                # 4. Anatomy stage: x_hat re-generated unconditionally, the anatomy held by a soft mask
                #    (1 on the organs, soft_mask_value elsewhere) for the first anatomy_steps steps.
                soft_mask = torch.where(anatomy_latent_mask > 0, 1.0, parameters.soft_mask_value)
                anatomy_stage = Stage("anatomy", x_hat, soft_mask, parameters.anatomy_steps, embed(""), None, 1.0,
                                      anatomy_controls)
                x_a_gen = self._run_stage(anatomy_stage, parameters, draw, callback)
                if key is not None:
                    cache.put(key, x_hat, x_a_gen, generator)
            current = x_a_gen

        # 5. Pathology stages: each region re-generated with its finding under classifier-free guidance,
        #    everything outside it held at every step. An empty finding inpaints without a prompt.
        for k, (region, finding) in enumerate(regions):
            use_guidance = finding != "" and parameters.guidance_scale != 1.0
            stage = Stage(
                name="pathology" if len(regions) == 1 else f"pathology {k + 1}/{len(regions)}",
                image=current, known_mask=(1 - region.to(device))[None, None],
                masked_steps=parameters.num_inference_steps, prompt=embed(finding),
                uncond=embed("") if use_guidance else None, guidance_scale=parameters.guidance_scale,
                controls=pathology_controls,
            )
            previous, current = current, self._run_stage(stage, parameters, draw, callback)
            if parameters.keep_outside_region:  # post-decode overlay (model/overlay.py); off in XReal
                current = keep_outside(previous, current, region)

        return current, x_hat, x_a_gen, reused

    def _anatomy_stage_key(self, labels, generator, parameters, anatomy_controls) -> str:
        """What the anatomy stage's result depends on, for ``AnatomyStageCache.key``."""
        controlnets, control_maps, control_settings = [], [], []
        if anatomy_controls is not None:
            controlnets = list(anatomy_controls.multi.nets)
            control_maps = list(anatomy_controls.images[1])
            control_settings = [anatomy_controls.names, anatomy_controls.scales]
        settings = [str(self.device), torch.get_num_threads() if self.device.type == "cpu" else None,
                    numerics_settings(), repr(self.model_info), repr(dict(self.scheduler.config)), control_settings]
        networks = [self.anatomy_controller, self.vae, self.unet, self.text_encoder, self.denoiser, *controlnets]
        return AnatomyStageCache.key(labels, generator, parameters, networks, settings, control_maps)

    def _empty_prompt_embedding(self) -> torch.Tensor:
        """The empty prompt's embedding, cached across images (per device and dtype)."""
        key = (self.device, self.text_encoder.dtype, self.unet.dtype, id(self.text_encoder))
        if (getattr(self, "_empty_prompt_cache", None) or (None,))[0] != key:
            self._empty_prompt_cache = (key, self.encode_prompt(""))
        return self._empty_prompt_cache[1]

    def _anatomy_controller_image(self, labels: torch.Tensor):
        """(x_hat, the anatomy mask at latent size): the anatomy controller's reconstruction of the label map."""
        controller_input, resized = self.anatomy_masks(labels)
        controller = self.anatomy_controller
        z = controller.encode(controller_input.to(controller.dtype)).latent_dist.mode()
        return controller.decode(z).sample.float().clamp(0, 1), resized
