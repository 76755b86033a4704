"""``--freeze``: the UNet as a frozen TorchScript graph, one per input shape (issue 11: same arithmetic, cheaper).

``torch.jit.trace`` records one UNet call as a graph and ``torch.jit.freeze`` folds the weights into
it as constants. What it saves is the Python of diffusers' UNet (hundreds of modules and checks per
call), not arithmetic: the frozen graph runs the same operators in the same order, and on this CPU
its output equals the eager UNet's bit for bit (``Testing/test_frozen_unet.py``). Tracing takes
about a second on the demo model (benchmarks/README.md for the full architecture), against
``--compile``'s minutes, so it pays already on the first image.

A graph is fixed to its input shapes: batch 1 (the anatomy stage, unguided pathology stages), batch
2 (guided pathology stages), with or without ControlNet residuals. Each is traced on first use and
kept; a change of the UNet's device or dtype drops them all. Timesteps are graph inputs, so one graph
serves every step and every sampler.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch


class PositionalUNet(torch.nn.Module):
    """The UNet with positional tensor arguments only: what ``torch.jit.trace`` records."""

    def __init__(self, unet, with_residuals: bool):
        super().__init__()
        self.unet, self.with_residuals = unet, with_residuals

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        extra = {}
        if self.with_residuals:  # ControlNet residuals: the down blocks', then the mid block's
            extra = {"down_block_additional_residuals": list(residuals[:-1]),
                     "mid_block_additional_residual": residuals[-1]}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **extra)[0]


class FrozenUNet:
    """Call it like the UNet (``.sample`` of the result); traces and freezes a graph per input signature."""

    def __init__(self, unet):
        self.unet = unet
        self.graphs = {}
        self._placement = None

    def __call__(self, sample, timestep, encoder_hidden_states, down_block_additional_residuals=None,
                 mid_block_additional_residual=None):
        placement = (self.unet.device, self.unet.dtype)
        if placement != self._placement:  # moved or cast: the folded weights are stale
            self.graphs, self._placement = {}, placement
        residuals = ()
        if down_block_additional_residuals is not None:
            residuals = (*down_block_additional_residuals, mid_block_additional_residual)
        timestep = torch.as_tensor(timestep, device=sample.device)
        inputs = (sample, timestep, encoder_hidden_states, *residuals)
        signature = tuple((tuple(x.shape), x.dtype) for x in inputs)
        graph = self.graphs.get(signature)
        if graph is None:
            # diffusers' shape checks warn that the trace fixes them: true and intended (one graph per shape),
            # so the warnings would only interrupt every serve / generate-batch process's progress bar.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(PositionalUNet(self.unet, bool(residuals)).eval(), inputs, check_trace=False)
                graph = self.graphs[signature] = torch.jit.freeze(traced)
        return SimpleNamespace(sample=graph(*inputs))


def freeze_unet(pipe) -> None:
    """Route the pipeline's UNet calls through a ``FrozenUNet`` (``--freeze``); undo with ``pipe.denoiser = None``."""
    pipe.denoiser = FrozenUNet(pipe.unet)
