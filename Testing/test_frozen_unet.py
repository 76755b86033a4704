"""``--freeze`` (model/frozen_unet.py): the frozen TorchScript UNet gives the eager UNet's images bit for bit.

Tiny random models on the CPU, every path that calls the UNet: DDIM and the multistep solvers,
guided (batch 2) and unguided (batch 1) stages, with ControlNet residuals; a graph per signature;
a dtype change retraces; and the flag on ``generate`` records itself in provenance.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xreal_engine import cli
from xreal_engine.model.frozen_unet import FrozenUNet, freeze_unet
from xreal_engine.model.loading import load_pipeline

SIZE = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from xreal_engine.model.random_model import create_random_model

    return create_random_model(tmp_path_factory.mktemp("frozen") / "tiny", controlnets=("sobel",),
                               controlnet_init="random")


def anatomy() -> np.ndarray:
    labels = np.zeros((SIZE, SIZE), np.uint8)
    labels[10:50, 6:26], labels[10:50, 38:58], labels[30:52, 24:40] = 2, 1, 3
    return labels


def region() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[14:30, 40:56] = 1
    return mask


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp", "unipc"])
def test_frozen_unet_is_bit_identical(model_dir, sampler):
    pipe = load_pipeline(str(model_dir), "cpu", "float32")
    edges = np.zeros((SIZE, SIZE), np.float32)
    edges[:, ::8] = 1

    def generate(controls=None):
        output = pipe(anatomy(), pathologies=[(region(), "pneumonia")], num_inference_steps=4, anatomy_steps=2,
                      sampler=sampler, generator=torch.Generator().manual_seed(3), controls=controls)
        return output.image, output.anatomy_image

    eager = generate(), generate([("sobel", edges, 1.0)])
    freeze_unet(pipe)
    frozen = generate(), generate([("sobel", edges, 1.0)])
    for a, b in zip(eager, frozen):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    # one graph per signature: batch 1 (anatomy) and batch 2 (guided pathology), each with and without residuals
    assert len(pipe.denoiser.graphs) == 4
    assert not np.array_equal(frozen[0][0], frozen[1][0])  # the residuals reach the frozen graph


def test_a_dtype_change_retraces(model_dir):
    pipe = load_pipeline(str(model_dir), "cpu", "float32")
    denoiser = FrozenUNet(pipe.unet)
    sample = torch.randn(1, pipe.unet.config.in_channels, 16, 16)
    hidden = torch.randn(1, 150, pipe.unet.config.cross_attention_dim)
    with torch.inference_mode():
        first = denoiser(sample, torch.tensor(10), hidden).sample
        np.testing.assert_array_equal(first.numpy(), pipe.unet(sample, 10, encoder_hidden_states=hidden).sample.numpy())
        pipe.unet.to(torch.bfloat16)
        second = denoiser(sample.bfloat16(), torch.tensor(10), hidden.bfloat16()).sample
    assert second.dtype == torch.bfloat16 and len(denoiser.graphs) == 1  # the float32 graph was dropped


def test_generate_freeze_flag(model_dir, tmp_path):
    from PIL import Image

    anatomy_png, region_png = tmp_path / "anatomy.png", tmp_path / "region.png"
    Image.fromarray(anatomy()).save(anatomy_png)
    Image.fromarray((region() * 255).astype(np.uint8)).save(region_png)
    images = {}
    for flag in ([], ["--freeze"]):
        out = tmp_path / ("frozen" if flag else "eager")
        code = cli.main(["generate", "--model", str(model_dir), "--anatomy", str(anatomy_png), "--pathology-mask",
                         str(region_png), "--finding", "pneumonia", "--steps", "3", "--seed", "5", "--device", "cpu",
                         "--out", str(out), *flag])
        assert code == 0
        images[bool(flag)] = np.asarray(Image.open(out / "preview.png"))
        provenance = json.loads((out / "provenance.json").read_text())
        assert provenance["unet_runtime"] == ("frozen" if flag else "eager")
    np.testing.assert_array_equal(images[False], images[True])


def test_freeze_and_compile_together_is_one_sentence(model_dir, tmp_path, capsys):
    out = tmp_path / "both"
    assert cli.main(["generate", "--model", str(model_dir), "--freeze", "--compile", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "--freeze and --compile cannot be combined" in error and error.count("\n") == 0
    assert not out.exists()
    assert cli.main(["generate-batch", "--model", str(model_dir), "--eager", "--freeze", "--from-templates", "",
                     "--seeds", "0:2",
                     "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "--freeze and --eager cannot be combined" in error and error.count("\n") == 0
    assert not out.exists()


def test_long_lived_commands_freeze_on_a_cpu_only_and_generate_has_no_eager_flag(capsys):
    from xreal_engine.model.loading import AUTO_FREEZE_MAX_PARAMETERS, AUTO_RUNTIME, check_unet_runtime, unet_runtime

    assert unet_runtime(default=AUTO_RUNTIME) == AUTO_RUNTIME and unet_runtime() == "eager"
    assert unet_runtime(eager=True, default=AUTO_RUNTIME) == "eager"
    cpu, cuda, demo, full = torch.device("cpu"), torch.device("cuda"), 4_000_000, 518_000_000
    assert check_unet_runtime(AUTO_RUNTIME, cpu, demo) == "frozen"
    assert check_unet_runtime(AUTO_RUNTIME, cpu, AUTO_FREEZE_MAX_PARAMETERS) == "frozen"
    assert check_unet_runtime(AUTO_RUNTIME, cpu, AUTO_FREEZE_MAX_PARAMETERS + 1) == "eager"
    assert check_unet_runtime(AUTO_RUNTIME, cpu, full) == "eager"  # no gain at full size, seconds of tracing
    assert check_unet_runtime(AUTO_RUNTIME, cuda, demo) == "eager"
    assert check_unet_runtime("compiled", cpu, demo) == "compiled"
    assert "--freeze, --compile and --eager cannot" in _sentence(lambda: unet_runtime(True, True, True))
    assert "use eager, frozen, compiled, auto" in _sentence(lambda: check_unet_runtime("jit", cpu, demo))
    assert cli.main(["generate", "--help"]) == 0  # help is printed and main returns, it does not exit
    assert "--eager" not in capsys.readouterr().out
    for command in ("serve", "generate-batch"):
        assert cli.main([command, "--help"]) == 0
        assert "--eager" in capsys.readouterr().out


def _sentence(call) -> str:
    from xreal_engine.errors import InputError

    with pytest.raises(InputError) as refused:
        call()
    return str(refused.value)
