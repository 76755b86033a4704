"""The anatomy-stage cache (model/anatomy_cache.py) on tiny random models on the CPU.

A reused anatomy stage must give the uncached image bit for bit (and leave the generator where the
stage would have), for DDIM and the multistep solvers; anything the stage depends on must miss;
nothing is stored from a cancelled job; it is off unless enabled. The service's use of it over HTTP
is in test_server_service.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xreal_engine.errors import Cancelled
from xreal_engine.model.anatomy_cache import AnatomyStageCache
from xreal_engine.model.controlnets import PreparedControl
from xreal_engine.model.pipeline import XRealPipeline
from xreal_engine.model.random_model import create_random_model
from xreal_engine.model.sampling import SamplingParameters

SIZE = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return create_random_model(tmp_path_factory.mktemp("cache") / "tiny", seed=3, controlnets=("sobel",),
                               controlnet_init="random")


@pytest.fixture
def plain(model_dir):
    return XRealPipeline.from_pretrained(str(model_dir))


@pytest.fixture
def cached(model_dir):
    return XRealPipeline.from_pretrained(str(model_dir)).enable_anatomy_stage_cache()


def anatomy(shift: int = 0) -> np.ndarray:
    labels = np.zeros((SIZE, SIZE), np.uint8)
    labels[10:50, 6 + shift:26], labels[10:50, 38:58], labels[30:52, 24:40] = 2, 1, 3
    return labels


def region(top: int = 14) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[top:top + 16, 40:56] = 1
    return mask


def params(pipe, **settings):
    settings = {"num_inference_steps": 4, "anatomy_steps": 3, **settings}
    return SamplingParameters.resolve(pipe.model_info.defaults, **settings)


def run(pipe, seed=0, labels=None, pathologies=None, callback=None, rng="generator", generator=True, controls=None,
        **settings):
    gen = torch.Generator().manual_seed(seed) if generator else None
    output = pipe(anatomy() if labels is None else labels,
                  pathologies=[(region(), "cardiomegaly")] if pathologies is None else pathologies,
                  parameters=params(pipe, **settings), generator=gen, rng=rng, callback=callback, controls=controls)
    return output, gen


def assert_same(a, b):
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.anatomy_image, b.anatomy_image)
    np.testing.assert_array_equal(a.x_hat, b.x_hat)


def test_off_by_default(plain):
    assert plain.anatomy_stage_cache is None
    first, _ = run(plain)
    second, _ = run(plain)
    assert not first.anatomy_stage_reused and not second.anatomy_stage_reused
    assert_same(first, second)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp", "unipc"])
def test_a_reused_stage_gives_the_uncached_image_bit_for_bit(plain, cached, sampler):
    """Another finding and another region at the same seed: the anatomy stage is reused, the result is
    what the uncached pipeline gives, and the generator ends in the same state."""
    other = [(region(top=30), "pneumonia")]
    first, _ = run(cached, sampler=sampler)
    reused, reused_gen = run(cached, pathologies=other, sampler=sampler, guidance_scale=3.0)
    expected, expected_gen = run(plain, pathologies=other, sampler=sampler, guidance_scale=3.0)
    assert not first.anatomy_stage_reused and reused.anatomy_stage_reused and not expected.anatomy_stage_reused
    assert_same(reused, expected)
    assert torch.equal(reused_gen.get_state(), expected_gen.get_state())
    assert len(cached.anatomy_stage_cache) == 1


def test_an_anatomy_only_job_feeds_a_pathology_job(plain, cached):
    """evaluate's pattern: the anatomy-only image at seed 0, then a pathology run at seed 0."""
    alone, _ = run(cached, pathologies=[])
    with_region, _ = run(cached)
    assert with_region.anatomy_stage_reused
    np.testing.assert_array_equal(alone.image, with_region.anatomy_image)
    assert_same(with_region, run(plain)[0])


@pytest.mark.parametrize("change", [
    {"seed": 1}, {"labels": "shifted"}, {"num_inference_steps": 5}, {"anatomy_steps": 2}, {"eta": 0.5},
    {"soft_mask_value": 0.3}, {"sampler": "dpmpp"},
])
def test_anything_the_stage_reads_misses(cached, change):
    run(cached)
    change = dict(change)
    if change.get("labels") == "shifted":
        change["labels"] = anatomy(shift=1)
    output, _ = run(cached, **change)
    assert not output.anatomy_stage_reused
    assert len(cached.anatomy_stage_cache) == 2


def test_thread_count_and_changed_weights_miss(cached):
    run(cached)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert not run(cached)[0].anatomy_stage_reused  # float32 sums change order with the thread count
    finally:
        torch.set_num_threads(threads)
    assert run(cached)[0].anatomy_stage_reused
    with torch.no_grad():
        next(cached.unet.parameters()).add_(1e-3)  # what an optimizer step does
    assert not run(cached)[0].anatomy_stage_reused


def test_without_a_caller_generator_or_in_original_order_nothing_is_cached(cached):
    for _ in range(2):
        assert not run(cached, generator=False)[0].anatomy_stage_reused
        assert not run(cached, rng="original")[0].anatomy_stage_reused
    assert len(cached.anatomy_stage_cache) == 0


def test_edit_mode_has_no_anatomy_stage_to_reuse(cached):
    source = np.full((SIZE, SIZE), 0.5, np.float32)
    for _ in range(2):
        output = cached(image=source, pathologies=[(region(), "cardiomegaly")], parameters=params(cached),
                        generator=torch.Generator().manual_seed(0))
        assert not output.anatomy_stage_reused
    assert len(cached.anatomy_stage_cache) == 0


def test_a_cancelled_job_stores_nothing_and_a_hit_reports_the_stage(cached):
    def cancel_in_anatomy(stage, step, total):
        if stage == "anatomy" and step == 2:
            raise Cancelled("cancelled")

    with pytest.raises(Cancelled):
        run(cached, callback=cancel_in_anatomy)
    assert len(cached.anatomy_stage_cache) == 0
    run(cached)
    calls = []
    assert run(cached, callback=lambda *call: calls.append(call))[0].anatomy_stage_reused
    assert calls[:2] == [("anatomy", 0, 4), ("anatomy", 4, 4)] and calls[2] == ("pathology", 0, 4)


def test_anatomy_stage_controls_are_part_of_the_key_and_pathology_only_ones_are_not(plain, cached):
    yy = np.linspace(0, 1, SIZE, dtype=np.float32)
    ramp, flat = np.tile(yy, (SIZE, 1)), np.full((SIZE, SIZE), 0.5, np.float32)
    run(cached, controls=[PreparedControl("sobel", ramp, 1.0)])
    assert run(cached, controls=[PreparedControl("sobel", ramp, 1.0)])[0].anatomy_stage_reused
    assert not run(cached, controls=[PreparedControl("sobel", flat, 1.0)])[0].anatomy_stage_reused
    assert not run(cached, controls=[PreparedControl("sobel", ramp, 0.5)])[0].anatomy_stage_reused
    run(cached, controls=[PreparedControl("sobel", ramp, 1.0)], control_stages="pathology")
    hit, _ = run(cached, controls=[PreparedControl("sobel", flat, 1.0)], control_stages="pathology")
    assert hit.anatomy_stage_reused
    expected, _ = run(plain, controls=[PreparedControl("sobel", flat, 1.0)], control_stages="pathology")
    assert_same(hit, expected)


def test_least_recently_used_entries_go_first(model_dir):
    pipe = XRealPipeline.from_pretrained(str(model_dir)).enable_anatomy_stage_cache(entries=2)
    run(pipe, seed=0, pathologies=[])
    run(pipe, seed=1, pathologies=[])
    assert run(pipe, seed=0, pathologies=[])[0].anatomy_stage_reused  # seed 0 is now the most recent
    run(pipe, seed=2, pathologies=[])  # evicts seed 1
    assert len(pipe.anatomy_stage_cache) == 2
    assert run(pipe, seed=0, pathologies=[])[0].anatomy_stage_reused
    assert not run(pipe, seed=1, pathologies=[])[0].anatomy_stage_reused


@pytest.mark.parametrize("entries", [0, -1, 1.5, True, "4"])
def test_the_entry_count_is_checked(entries):
    with pytest.raises(ValueError, match="at least 1 entry"):
        AnatomyStageCache(entries)


def test_a_replaced_network_or_changed_numerics_switch_misses(cached):
    import copy

    run(cached)
    cached.unet = copy.deepcopy(cached.unet)  # equal weights, but another module: never trusted
    assert not run(cached)[0].anatomy_stage_reused
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium" if precision != "medium" else "high")
        assert not run(cached)[0].anatomy_stage_reused
    finally:
        torch.set_float32_matmul_precision(precision)
    assert run(cached)[0].anatomy_stage_reused


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_a_reused_stage_gives_the_uncached_image_and_generator_state(model_dir):
    plain_gpu = XRealPipeline.from_pretrained(str(model_dir)).to("cuda")
    cached_gpu = XRealPipeline.from_pretrained(str(model_dir)).to("cuda").enable_anatomy_stage_cache()
    results = []
    for pipe in (cached_gpu, cached_gpu, plain_gpu):
        gen = torch.Generator(device="cuda").manual_seed(0)
        output = pipe(anatomy(), pathologies=[(region(), "pneumonia")], parameters=params(pipe), generator=gen)
        results.append((output, gen.get_state()))
    assert [r[0].anatomy_stage_reused for r in results] == [False, True, False]
    assert_same(results[1][0], results[2][0])
    assert torch.equal(results[1][1], results[2][1])
