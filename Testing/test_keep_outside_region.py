"""The post-decode overlay (sampling switch keep_outside_region, model/overlay.py) on a random tiny model.

Off (the default, XReal's behaviour) the sampler is untouched; on, every pixel outside the feathered
region is the anatomy-stage pixel, and the pathology stage's change moves into the region.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xreal_engine.errors import InputError
from xreal_engine.model.info import ModelInfo
from xreal_engine.model.overlay import feathered_region
from xreal_engine.model.pipeline import XRealPipeline
from xreal_engine.model.random_model import create_random_model
from xreal_engine.model.sampling import SamplingParameters, check_model_defaults, choices

SIZE, LATENT = 64, 16


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return XRealPipeline.from_pretrained(create_random_model(tmp_path_factory.mktemp("overlay") / "tiny", seed=5))


def labels():
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = np.zeros((SIZE, SIZE), np.int64)
    out[((xx - 20) / 10) ** 2 + ((yy - 32) / 22) ** 2 <= 1] = 2
    out[((xx - 44) / 10) ** 2 + ((yy - 32) / 22) ** 2 <= 1] = 1
    out[((xx - 36) / 9) ** 2 + ((yy - 42) / 8) ** 2 <= 1] = 3
    return out


def region():
    mask = np.zeros((LATENT, LATENT), np.uint8)
    mask[6:10, 8:12] = 1
    return mask


def generate(pipe, keep):
    params = SamplingParameters.resolve(pipe.model_info.defaults, num_inference_steps=3, anatomy_steps=2,
                                        keep_outside_region=keep)
    return pipe(labels(), pathologies=[(region(), "cardiomegaly")], parameters=params,
                generator=torch.Generator().manual_seed(0))


def test_off_is_the_default_and_changes_nothing(pipe):
    params = SamplingParameters.resolve(pipe.model_info.defaults, num_inference_steps=3, anatomy_steps=2)
    assert params.keep_outside_region is False
    default = pipe(labels(), pathologies=[(region(), "cardiomegaly")], parameters=params,
                   generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(default.image, generate(pipe, False).image)


def test_on_keeps_the_anatomy_stage_outside_the_feathered_region(pipe):
    on, off = generate(pipe, True), generate(pipe, False)
    weight = feathered_region(torch.as_tensor(region()), SIZE)[0, 0].numpy()
    outside = weight == 0
    assert outside.mean() > 0.7
    np.testing.assert_array_equal(on.x_p_gen_hwc[outside], on.x_a_gen_hwc[outside])
    np.testing.assert_array_equal(on.anatomy_image, off.anatomy_image)  # the anatomy stage is the same
    inside = np.kron(region(), np.ones((SIZE // LATENT,) * 2)).astype(bool)
    np.testing.assert_allclose(on.image[inside], off.image[inside], atol=1e-6)  # the region is the stage's

    def share_inside(out):
        change = np.abs(out.image.astype(np.float64) - out.anatomy_image)
        return change[inside].sum() / change.sum()

    assert share_inside(on) > share_inside(off)
    assert share_inside(on) > 0.5


def test_feathered_region_is_one_inside_and_soft_at_the_border():
    weight = feathered_region(torch.as_tensor(region()), SIZE)[0, 0]
    inside = torch.as_tensor(np.kron(region(), np.ones((4, 4)))).bool()
    assert torch.all(weight[inside] == 1)
    assert 0 < float(weight[~inside].max()) <= 1 and ((weight > 0) & (weight < 1)).any()


def test_a_model_may_turn_it_on_and_a_request_may_turn_it_off():
    defaults = check_model_defaults({"num_inference_steps": 100, "keep_outside_region": True})
    assert defaults["keep_outside_region"] is True
    assert SamplingParameters.resolve(defaults).keep_outside_region is True
    assert SamplingParameters.from_public(defaults, {"keep_outside_region": False}).keep_outside_region is False
    # absent stays absent, so existing xreal_model.json files read back unchanged
    assert "keep_outside_region" not in check_model_defaults({})
    assert choices()["keep_outside_region"] == [False, True]
    info = ModelInfo(model_id="m", image_size=64, latent_size=16, scale_factor=1.0, findings=["pneumonia"],
                     defaults={"keep_outside_region": True})
    assert info.to_dict()["defaults"]["keep_outside_region"] is True


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_bad_value_is_one_sentence(value):
    with pytest.raises(InputError, match=r"keep-outside-region option \('keep_outside_region'\) must be true or false"):
        check_model_defaults({"keep_outside_region": value})
    if value is not None:
        with pytest.raises(InputError, match="must be true or false"):
            SamplingParameters.resolve({}, keep_outside_region=value)
