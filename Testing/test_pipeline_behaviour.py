"""XRealPipeline behaviour on a tiny random model: round trip, stages, callback/cancel, edit mode, bad input,
samplers; off the CPU without a GPU (device="meta"), precision placement, out-of-memory, thread defaults."""

import numpy as np
import pytest
import torch

from xreal_engine.errors import Cancelled, InputError, ModelError
from xreal_engine.model import loading
from xreal_engine.model import pipeline as pipeline_module
from xreal_engine.model.info import ModelInfo, weights_hash
from xreal_engine.model.random_model import create_random_model
from xreal_engine.model.pipeline import XRealPipeline, out_of_memory_message

SIZE, LATENT = 64, 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return create_random_model(tmp_path_factory.mktemp("pipeline") / "tiny", seed=3)


@pytest.fixture(scope="module")
def pipe(model_dir):
    return XRealPipeline.from_pretrained(model_dir)


def chest_labels():
    """Two lungs, a heart overlapping them, a small aorta: labels 0..4 in a PA layout."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    labels = np.zeros((SIZE, SIZE), np.int64)
    labels[((xx - 20) / 10) ** 2 + ((yy - 32) / 22) ** 2 <= 1] = 2  # right lung on image left
    labels[((xx - 44) / 10) ** 2 + ((yy - 32) / 22) ** 2 <= 1] = 1
    labels[((xx - 36) / 9) ** 2 + ((yy - 42) / 8) ** 2 <= 1] = 3
    labels[(xx - 34) ** 2 + (yy - 18) ** 2 <= 9] = 4
    return labels


def region(top, left, size=4):
    mask = np.zeros((LATENT, LATENT), np.uint8)
    mask[top:top + size, left:left + size] = 1
    return mask


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("pathologies", [(region(8, 8), "cardiomegaly")])
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("anatomy_steps", 1)
    return pipe(chest_labels() if "image" not in kwargs else None,
                generator=torch.Generator().manual_seed(seed), **kwargs)


def test_generates_in_two_steps_deterministically(pipe):
    out = run(pipe)
    assert out.image.shape == (SIZE, SIZE) and out.image.dtype == np.float32
    assert out.anatomy_image.shape == out.x_hat.shape == (SIZE, SIZE)
    assert out.x_p_gen_hwc.shape == (SIZE, SIZE, 3)
    assert 0 <= out.image.min() and out.image.max() <= 1 and out.image.std() > 0
    np.testing.assert_array_equal(out.image, out.x_p_gen_hwc.mean(axis=2))
    np.testing.assert_array_equal(run(pipe).image, out.image)
    assert not np.array_equal(run(pipe, seed=1).image, out.image)


def test_save_load_round_trip(pipe, model_dir, tmp_path):
    pipe.save_pretrained(tmp_path / "copy")
    reloaded = XRealPipeline.from_pretrained(tmp_path / "copy")
    assert reloaded.model_info == pipe.model_info == ModelInfo.load(model_dir)
    assert weights_hash(tmp_path / "copy") == weights_hash(model_dir)
    assert type(reloaded.text_encoder).__name__ == "LDMBertModel"
    assert torch.equal(reloaded.scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod)
    np.testing.assert_array_equal(run(reloaded).image, run(pipe).image)


def test_defaults_come_from_the_model(pipe):
    stages = []
    run(pipe, num_inference_steps=None, anatomy_steps=None, callback=lambda *a: stages.append(a))
    steps = pipe.model_info.defaults["num_inference_steps"]
    assert stages[-1] == ("pathology", steps, steps)


def test_callback_reports_every_step_and_cancel_propagates(pipe):
    seen = []
    run(pipe, num_inference_steps=3, callback=lambda *a: seen.append(a))
    assert seen == [("anatomy", i, 3) for i in range(4)] + [("pathology", i, 3) for i in range(4)]

    def cancel_at_second_step(stage, step, total):
        seen.append((stage, step))
        if step == 2:
            raise Cancelled("The generation was cancelled.")

    seen.clear()
    with pytest.raises(Cancelled):
        run(pipe, num_inference_steps=3, callback=cancel_at_second_step)
    assert seen == [("anatomy", 0), ("anatomy", 1), ("anatomy", 2)]


def test_several_pathologies_run_in_order_and_encode_each_prompt_once(pipe, monkeypatch):
    prompts = []
    encode = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda p: prompts.append(p) or encode(p))
    monkeypatch.setattr(pipe, "_empty_prompt_cache", None, raising=False)
    stages = []
    pathologies = [(region(2, 2), "cardiomegaly"), (region(10, 10), "pneumonia"), (region(6, 6), "cardiomegaly")]
    several = run(pipe, pathologies=pathologies, callback=lambda s, i, n: stages.append(s))
    assert sorted(prompts) == ["", "cardiomegaly", "pneumonia"]
    prompts.clear()
    run(pipe, pathologies=pathologies[:1])
    assert prompts == ["cardiomegaly"]  # the empty prompt is cached across images
    assert list(dict.fromkeys(stages)) == ["anatomy", "pathology 1/3", "pathology 2/3", "pathology 3/3"]
    assert not np.array_equal(several.image, run(pipe, pathologies=pathologies[:1]).image)


def capture_latents(pipe, monkeypatch):
    """Record every stage's encoded x0 and final latent (the two ends of the known-region blend)."""
    captured = {"x0": [], "final": []}
    encode, decode = pipe._encode_to_latent, pipe._decode
    monkeypatch.setattr(pipe, "_encode_to_latent", lambda *a: captured["x0"].append(encode(*a)) or captured["x0"][-1])
    monkeypatch.setattr(pipe, "_decode", lambda z: captured["final"].append(z) or decode(z))
    return captured


def test_edit_mode_keeps_the_known_region(pipe, monkeypatch):
    captured = capture_latents(pipe, monkeypatch)
    source = np.clip(np.linspace(0, 1, SIZE)[None, :] * np.ones((SIZE, 1)), 0, 1)
    stages = []
    out = run(pipe, image=source, pathologies=[(region(6, 6, 5), "pneumonia")], num_inference_steps=4,
              callback=lambda s, i, n: stages.append(s))
    assert set(stages) == {"pathology"} and out.anatomy_image is None and out.x_hat is None
    (x0,), (final,) = captured["x0"], captured["final"]
    inside = torch.from_numpy(region(6, 6, 5)).bool().expand_as(x0[0])[None]
    # The known region is re-noised to t=1 before the last step (noise std sqrt(1 - alphas_cumprod[1]) = 0.055).
    known_error = (final - x0)[~inside].abs()
    assert known_error.max() < 0.4 and known_error.mean() < 0.1
    assert (final - x0)[inside].abs().mean() > 5 * known_error.mean()


def test_edit_mode_removal_uses_the_empty_prompt_without_guidance(pipe, monkeypatch):
    prompts = []
    encode = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda p: prompts.append(p) or encode(p))
    monkeypatch.setattr(pipe, "_empty_prompt_cache", None, raising=False)
    calls = []
    unet_forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda x, *a, **k: calls.append(x.shape[0]) or unet_forward(x, *a, **k))
    run(pipe, image=np.full((SIZE, SIZE), 0.5), pathologies=[(region(4, 4), "")], num_inference_steps=2)
    assert prompts == [""] and calls == [1, 1]


def test_anatomy_stage_holds_the_organs(pipe, monkeypatch):
    captured = capture_latents(pipe, monkeypatch)
    run(pipe, num_inference_steps=4, anatomy_steps=4, soft_mask_value=0.0, pathologies=[])
    x0, final = captured["x0"][0], captured["final"][0]
    _, resized = pipe.anatomy_masks(torch.from_numpy(chest_labels()))
    organs = resized > 0
    assert (final - x0)[organs].abs().mean() < 0.1 < (final - x0)[~organs].abs().mean()


def test_batched_guidance_equals_two_sequential_passes(pipe):
    generator = torch.Generator().manual_seed(4)
    latents = torch.randn((1, 3, LATENT, LATENT), generator=generator)
    cond, uncond = pipe.encode_prompt("cardiomegaly"), pipe.encode_prompt("")
    t = torch.tensor(501)
    with torch.inference_mode():
        batched = pipe._predict_noise(latents, t, cond, uncond, 7.0)
        eps_uncond = pipe.unet(latents, t, encoder_hidden_states=uncond).sample
        eps_cond = pipe.unet(latents, t, encoder_hidden_states=cond).sample
    sequential = eps_uncond + 7.0 * (eps_cond - eps_uncond)
    # batch 2 and batch 1 may take other kernels (float32 rounding ~1e-6 per UNet output, more on a busy
    # machine whose thread split differs); guidance 7 multiplies that by up to 1 + 2 x 7
    assert (batched - sequential).abs().max() < 1e-4
    assert (eps_cond - eps_uncond).abs().max() > 1e-3  # the prompts really differ


def test_unet_uses_scaled_dot_product_attention(pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = pipe.unet.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


def test_original_rng_follows_the_global_seed(pipe):
    def original(seed):
        torch.manual_seed(seed)
        return pipe(chest_labels(), [(region(8, 8), "cardiomegaly")], num_inference_steps=2, rng="original").image

    np.testing.assert_array_equal(original(5), original(5))
    assert not np.array_equal(original(5), original(6))


def test_image_sized_pathology_mask_is_pooled_to_the_latent_grid(pipe):
    full = np.kron(region(8, 8), np.ones((4, 4), np.uint8))
    np.testing.assert_array_equal(run(pipe, pathologies=[(full, "cardiomegaly")]).image, run(pipe).image)


def test_labels_the_model_ignores_are_background(model_dir):
    pipe = XRealPipeline.from_pretrained(model_dir)
    pipe.model_info.anatomy_labels.pop("4")
    pipe.model_info.label_warnings["4"] = "This model was trained without aorta masks."
    without_aorta = chest_labels()
    without_aorta[without_aorta == 4] = 0
    np.testing.assert_array_equal(run(pipe).image, pipe(without_aorta, [(region(8, 8), "cardiomegaly")],
                                                         num_inference_steps=2, anatomy_steps=1,
                                                         generator=torch.Generator().manual_seed(0)).image)


def test_bfloat16_runs(model_dir):
    pipe = XRealPipeline.from_pretrained(model_dir, torch_dtype=torch.bfloat16)
    out = run(pipe)
    reference = run(XRealPipeline.from_pretrained(model_dir))
    assert np.isfinite(out.image).all() and out.image.dtype == np.float32
    assert np.abs(out.x_hat - reference.x_hat).mean() < 0.05


def bad_labels(value):
    labels = chest_labels().astype(np.float64)
    labels[0, 0] = value
    return labels


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(anatomy=np.zeros((32, 32))), "shape (32, 32)"),
        (dict(anatomy=np.zeros((SIZE, SIZE, 3))), "shape (64, 64, 3)"),
        (dict(anatomy=bad_labels(7)), "values 7"),
        (dict(anatomy=bad_labels(0.5)), "values 0.5"),
        (dict(anatomy=bad_labels(np.nan)), "NaN"),
        (dict(pathologies=[(region(2, 2) * 2, "cardiomegaly")]), "binary"),
        (dict(pathologies=[(np.zeros((LATENT, LATENT)), "cardiomegaly")]), "empty"),
        (dict(pathologies=[(np.ones((20, 20)), "cardiomegaly")]), "pathology mask 1 has shape"),
        (dict(pathologies=[(region(2, 2), "broken leg")]), "'broken leg'"),
        (dict(num_inference_steps=0), "number of steps"),
        (dict(num_inference_steps=2, anatomy_steps=3), "anatomy steps"),
        (dict(guidance_scale=float("nan")), "guidance scale"),
        (dict(eta=-1.0), "eta"),
        (dict(soft_mask_value=2.0), "soft mask value"),
        (dict(rng="numpy"), "rng"),
        (dict(anatomy=None), "anatomy label map is required"),
        (dict(anatomy=None, image=np.full((SIZE, SIZE), 2.0)), "[0, 1]"),
        (dict(anatomy=None, image=np.full((SIZE, SIZE), 0.5), pathologies=[]), "at least one pathology"),
    ],
)
def test_bad_input_is_refused_with_one_sentence(pipe, kwargs, message):
    kwargs = {"anatomy": chest_labels(), "pathologies": [(region(2, 2), "cardiomegaly")],
              "num_inference_steps": 2, "anatomy_steps": 1, **kwargs}
    with pytest.raises(InputError) as error:
        pipe(generator=torch.Generator().manual_seed(0), **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp", "unipc"])
def test_every_sampler_holds_the_known_region_at_every_step(pipe, monkeypatch, sampler):
    """The UNet always sees the known region exactly at its step's noise level: x = sqrt(a) x0 + sqrt(1-a) noise."""
    captured = capture_latents(pipe, monkeypatch)
    seen = []
    unet_forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward",
                        lambda x, t, *a, **k: seen.append((x[:1].clone(), int(t))) or unet_forward(x, t, *a, **k))
    steps = 6
    out = run(pipe, image=np.full((SIZE, SIZE), 0.5), pathologies=[(region(6, 6, 5), "pneumonia")],
              num_inference_steps=steps, sampler=sampler)
    assert np.isfinite(out.image).all() and len(seen) == steps
    (x0,) = captured["x0"]
    known = ~torch.from_numpy(region(6, 6, 5)).bool().expand_as(x0[0])[None]
    alphas = pipe.scheduler.alphas_cumprod
    for latents, t in seen:
        noise = (latents - alphas[t].sqrt() * x0) / (1 - alphas[t]).sqrt()
        assert 0.75 < noise[known].std() < 1.25 and abs(noise[known].mean()) < 0.2, (sampler, t)


@pytest.mark.parametrize("sampler", ["dpmpp", "unipc"])
def test_multistep_solvers_follow_the_anatomy_fraction(pipe, monkeypatch, sampler):
    """The anatomy hold covers the same number of steps for every sampler; the result differs from DDIM."""
    holds = []
    hold = pipe._hold
    monkeypatch.setattr(pipe, "_hold", lambda stage, *a: holds.append(stage.name) or hold(stage, *a))
    out = run(pipe, num_inference_steps=5, anatomy_steps=3, sampler=sampler)
    # anatomy stage: 3 of 5 steps; the pathology stage: every step
    assert holds == ["anatomy"] * 3 + ["pathology"] * 5
    assert not np.array_equal(out.image, run(pipe, num_inference_steps=5, anatomy_steps=3).image)


@pytest.mark.parametrize("sampler", ["dpmpp", "unipc"])
def test_multistep_solvers_end_a_pathology_stage_at_the_known_latent(pipe, monkeypatch, sampler):
    """Their last step jumps from a noisy timestep to 0, so the held region is pasted back clean at the end
    (DDIM's last step starts from timestep 1 and lands within noise of it: the test above)."""
    captured = capture_latents(pipe, monkeypatch)
    run(pipe, image=np.full((SIZE, SIZE), 0.5), pathologies=[(region(6, 6, 5), "pneumonia")], num_inference_steps=4,
        sampler=sampler)
    (x0,), (final,) = captured["x0"], captured["final"]
    inside = torch.from_numpy(region(6, 6, 5)).bool().expand_as(x0[0])[None]
    assert torch.equal(final[~inside], x0[~inside]) and not torch.equal(final[inside], x0[inside])


def test_unipc_corrector_never_rewrites_a_held_input(pipe, monkeypatch):
    """UniPC's corrector recomputes a step's input from the previous step's and would throw the blend away."""
    from diffusers import UniPCMultistepScheduler

    corrected, stages = [], []
    correct = UniPCMultistepScheduler.multistep_uni_c_bh_update
    monkeypatch.setattr(UniPCMultistepScheduler, "multistep_uni_c_bh_update",
                        lambda self, *a, **k: corrected.append((stages[-1], self.step_index)) or correct(self, *a, **k))
    run(pipe, num_inference_steps=6, anatomy_steps=3, sampler="unipc", callback=lambda s, i, n: stages.append(s))
    # anatomy stage: inputs 0..2 held, so the corrector starts at step 3; the pathology stage holds every input
    assert corrected == [("anatomy", 3), ("anatomy", 4), ("anatomy", 5)]


# ----------------------------------------------------------------------------- devices, precision, memory, threads


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp", "unipc"])
def test_every_tensor_of_the_sampler_lives_on_the_pipeline_device(model_dir, monkeypatch, sampler):
    """On "meta" (no data, like a GPU to the host) an op that mixes in a CPU tensor fails, and so does any
    read of a value (a device sync): the whole sampler, both stages, runs there."""
    pipe = XRealPipeline.from_pretrained(model_dir).to("meta")
    results = []
    monkeypatch.setattr(pipeline_module, "_to_hwc", lambda image: results.append(image) or np.zeros((SIZE, SIZE, 3)))
    unet_inputs = []
    forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward",
                        lambda x, t, **k: unet_inputs.append((x, t, k["encoder_hidden_states"])) or forward(x, t, **k))
    pipe(chest_labels(), [(region(6, 6, 5), "cardiomegaly")], num_inference_steps=3, anatomy_steps=2, sampler=sampler,
         rng="original")
    assert len(results) == 3 and all(image.device.type == "meta" for image in results)  # x_p_gen, x_a_gen, x_hat
    assert len(unet_inputs) == 6 and [x.shape[0] for x, _, _ in unet_inputs] == [1] * 3 + [2] * 3
    assert all(tensor.device.type == "meta" for inputs in unet_inputs for tensor in inputs)


def test_a_generator_on_another_device_is_refused(model_dir):
    pipe = XRealPipeline.from_pretrained(model_dir).to("meta")
    with pytest.raises(InputError, match="torch.Generator\\(device='meta'\\)"):
        pipe(chest_labels(), [(region(6, 6, 5), "cardiomegaly")], num_inference_steps=2, generator=torch.Generator())


def test_low_precision_casts_the_denoiser_and_keeps_the_autoencoders_float32(model_dir, monkeypatch):
    pipe = XRealPipeline.from_pretrained(model_dir).set_precision(torch.bfloat16)
    assert pipe.dtype == pipe.unet.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.vae.dtype == pipe.anatomy_controller.dtype == torch.float32
    entered = []
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: entered.append(a) or pytest.fail("autocast entered"))
    out = pipe(chest_labels(), [(region(6, 6, 5), "cardiomegaly")], num_inference_steps=2, anatomy_steps=1,
               generator=torch.Generator().manual_seed(0))
    reference = XRealPipeline.from_pretrained(model_dir)(chest_labels(), [(region(6, 6, 5), "cardiomegaly")], num_inference_steps=2,
                                                        anatomy_steps=1, generator=torch.Generator().manual_seed(0))
    assert out.image.dtype == np.float32 and np.isfinite(out.image).all() and not entered
    np.testing.assert_array_equal(out.x_hat, reference.x_hat)  # the anatomy controller is float32 in both


def test_running_out_of_memory_is_one_sentence_that_suggests_the_fast_preset(model_dir, monkeypatch):
    pipe = XRealPipeline.from_pretrained(model_dir)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 8 GiB total capacity)")

    monkeypatch.setattr(pipe.unet, "forward", out_of_memory)
    with pytest.raises(ModelError) as error:
        pipe(chest_labels(), [(region(6, 6, 5), "cardiomegaly")], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    message = str(error.value)
    assert "ran out of memory" in message and "--fast" in message and "bfloat16" in message and "\n" not in message

    def other_error(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(pipe.unet, "forward", other_error)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # any other error is not hidden
        pipe(chest_labels(), [(region(6, 6, 5), "cardiomegaly")], num_inference_steps=2, generator=torch.Generator().manual_seed(0))


def test_the_gpu_message_suggests_float16():
    message = out_of_memory_message(torch.device("cuda:0"), torch.float32)
    assert message.startswith("The GPU ran out of memory") and "--fast" in message and "--dtype float16" in message
    assert "float16" not in out_of_memory_message(torch.device("cuda"), torch.float16).replace("in float16", "")


def test_auto_picks_cuda_and_float16_when_a_gpu_is_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loading.select_device("auto", "auto") == (torch.device("cuda"), torch.float16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.select_device("auto", "auto") == (torch.device("cpu"), torch.float32)
    with pytest.raises(InputError, match="no CUDA GPU"):
        loading.select_device("cuda", "auto")


def test_threads_never_exceed_the_cores_and_respect_the_environment(monkeypatch):
    monkeypatch.setattr(loading, "usable_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert loading.resolve_threads() == 1  # half of 2 cores: never one thread per core of a shared machine
    monkeypatch.setattr(loading, "usable_cores", lambda: 16)
    assert loading.resolve_threads() == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert loading.resolve_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # unset-like values fall back to the default
    assert loading.resolve_threads() == 8
    assert loading.resolve_threads(5) == 5  # --threads wins
    assert loading.resolve_threads(1) == 1 and loading.resolve_threads(16) == 16  # both ends of 1..cores
    with pytest.raises(InputError, match="--threads"):
        loading.resolve_threads(0)
    with pytest.raises(InputError, match=r"--threads 17 is more than the 16 CPUs this process may use; give 1 to 16"):
        loading.resolve_threads(17)  # 999 threads on 2 cores took 150 s instead of 1.3 s
    previous = torch.get_num_threads()
    try:
        assert loading.configure_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
