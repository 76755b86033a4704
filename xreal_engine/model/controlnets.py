"""Optional ControlNets on the XReal UNet (RadGazeGen's Rad-CN and HVA-CN, design.md section 8).

Each control (``control_spec.CONTROL_NAMES``) may have a diffusers ``ControlNetModel`` made from the
model's UNet (:func:`make_controlnet`): a copy of the UNet's encoder whose zero-initialised output
convolutions feed residuals into the UNet's down and mid blocks. Its conditioning embedding takes the
one-channel control map at IMAGE size and downsamples it by the autoencoder's factor (4 for XReal:
channels 16, 32, 64) to the latent. Several ControlNets run together through diffusers'
``MultiControlNetModel`` (residuals summed, each times its own scale); with none, the UNet is called
exactly as before, and a freshly made ControlNet adds exact zeros, so both leave the image bit-identical.

A model directory holds them as ``controlnet_<name>/`` (config.json + diffusion_pytorch_model.safetensors,
float16 or float32 on disk) and lists them in ``xreal_model.json`` with a default scale (model/info.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..control_spec import check_name, check_scale
from ..errors import InputError, ModelError, shown
from ..files import give_umask_modes
from .info import MODEL_INFO_FILE, ModelInfo, controlnet_folder, missing_controlnet_sentence

CONDITIONING_CHANNELS = 1  # every control map is one grey channel
BASE_EMBEDDING_CHANNELS = 16  # the conditioning embedding doubles its channels at each downsampling


@dataclass
class PreparedControl:
    """One control for the pipeline: its map (1, 1, S, S) in [0, 1] at the model's image size and its scale."""

    name: str
    image: torch.Tensor
    scale: float


def embedding_channels(factor: int) -> tuple:
    """Conditioning-embedding channels that downsample by ``factor`` (a power of 2): 4 -> (16, 32, 64)."""
    steps = int(round(math.log2(factor))) if factor >= 1 else -1
    if steps < 0 or 2 ** steps != factor:
        raise ModelError(f"The image is {factor} times the latent; a ControlNet needs a power of 2.")
    return tuple(BASE_EMBEDDING_CHANNELS * 2 ** i for i in range(steps + 1))


def make_controlnet(unet, factor: int = 4):
    """A fresh ControlNet for ``unet`` (weights copied from it, zero output convolutions): it adds nothing
    until trained. ``factor`` = image size / latent size (4 for XReal), so the control is given at image size."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_channels=CONDITIONING_CHANNELS,
                                     conditioning_embedding_out_channels=embedding_channels(factor))


def check_fits(controlnet, unet, name: str, factor: int) -> None:
    """Refuse a ControlNet that was made for another UNet (its residuals would not fit the UNet's blocks)."""
    config, unet_config = controlnet.config, unet.config
    keys = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types")
    for key in keys:
        if tuple(np.atleast_1d(config.get(key))) != tuple(np.atleast_1d(unet_config.get(key))):
            raise ModelError(f"The {name} ControlNet does not fit this model's UNet ({key} differs).")
    if int(config.get("conditioning_channels", 3)) != CONDITIONING_CHANNELS:
        raise ModelError(f"The {name} ControlNet takes {config.get('conditioning_channels')} conditioning channels; "
                         f"the controls have {CONDITIONING_CHANNELS}.")
    if tuple(config.get("conditioning_embedding_out_channels")) != embedding_channels(factor):
        raise ModelError(f"The {name} ControlNet's conditioning embedding does not downsample by {factor}, "
                         "this model's image-to-latent factor.")


def load_controlnets(model_dir, model_info: ModelInfo, unet) -> dict:
    """The ControlNets ``xreal_model.json`` lists, loaded in float32 (cast with the UNet afterwards)."""
    from diffusers import ControlNetModel

    model_dir = Path(model_dir)
    factor = model_info.image_size // model_info.latent_size
    nets = {}
    for name in model_info.controlnets:
        folder = model_dir / controlnet_folder(name)
        try:
            net = ControlNetModel.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelError(f"The {name} ControlNet in {folder} cannot be loaded: {shown(first_line, 300)}") from None
        check_fits(net, unet, name, factor)
        nets[name] = net.eval()
    return nets


def save_controlnet(controlnet, model_dir, name: str, scale: float = 1.0, dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``controlnet`` as ``controlnet_<name>/`` into a model directory and list it in xreal_model.json.

    ``dtype`` (e.g. torch.float16 to ship a small demo ControlNet) is what lands on disk; loading casts it
    to the pipeline's precision.
    """
    import copy

    name = check_name(name)
    scale = check_scale(scale, name)
    model_dir = Path(model_dir)
    info = ModelInfo.load(model_dir)
    target = controlnet if dtype is None else copy.deepcopy(controlnet).to(dtype=dtype)
    target.save_pretrained(str(model_dir / controlnet_folder(name)), safe_serialization=True)
    give_umask_modes(model_dir / controlnet_folder(name))  # safetensors writes 0600; a model is for sharing
    info.controlnets = {**info.controlnets, name: scale}
    info.validate(str(model_dir / MODEL_INFO_FILE))
    info.save(model_dir)
    return model_dir / controlnet_folder(name)


class StageControls:
    """The controls of one stage, made once per stage on the pipeline's device and dtype (never per step).

    ``residuals(sample, timestep, hidden)`` runs every ControlNet on the UNet's input batch (1, or 2 for
    classifier-free guidance: the control map is repeated for both halves) and returns the summed,
    scaled residuals for ``down_block_additional_residuals`` / ``mid_block_additional_residual``.
    """

    def __init__(self, nets: Sequence, controls: Sequence[PreparedControl], device, dtype):
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        self.multi = MultiControlNetModel(list(nets))
        self.scales = [float(control.scale) for control in controls]
        single = [control.image.to(device=device, dtype=dtype) for control in controls]
        self.images = {1: single, 2: [image.repeat(2, 1, 1, 1) for image in single]}
        self.names = [control.name for control in controls]

    def residuals(self, sample, timestep, hidden):
        return self.multi(sample, timestep, encoder_hidden_states=hidden, controlnet_cond=self.images[sample.shape[0]],
                          conditioning_scale=self.scales, return_dict=False)


def prepare_controls(controls, controlnets: dict, model_info: ModelInfo) -> list:
    """Check ``controls`` ([PreparedControl] or (name, map, scale) tuples) against the model; CPU float32 maps.

    A control needs this model's ControlNet; its map must be (S, S) or (1, 1, S, S) at the model's image
    size with values in [0, 1]; a None scale takes the model's default.
    """
    prepared, size = [], int(model_info.image_size)
    for control in controls or ():
        if not isinstance(control, PreparedControl):
            control = PreparedControl(*control)
        name = check_name(control.name)
        if name not in controlnets:
            raise InputError(missing_controlnet_sentence(name, controlnets))
        scale = model_info.controlnets.get(name, 1.0) if control.scale is None else check_scale(control.scale, name)
        image = torch.as_tensor(np.asarray(control.image) if not torch.is_tensor(control.image) else control.image)
        image = image.detach().to(dtype=torch.float32)
        if image.dim() == 2:
            image = image[None, None]
        if tuple(image.shape) != (1, 1, size, size):
            raise InputError(f"The {name} control map is {tuple(image.shape)}; the model needs {size}x{size} "
                             "(resample it first, as generate does).")
        if not bool(torch.isfinite(image).all()) or float(image.min()) < 0 or float(image.max()) > 1:
            raise InputError(f"The {name} control map must have values in [0, 1].")
        prepared.append(PreparedControl(name, image, scale))
    names = [control.name for control in prepared]
    if len(set(names)) != len(names):
        raise InputError("Each control may be given once.")
    return prepared
