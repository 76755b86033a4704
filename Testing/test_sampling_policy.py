"""The one sampling policy: ranges at both ends, the anatomy fraction, and one image for one request
whichever way it arrives (CLI, service over real HTTP, Python API)."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from xreal_engine.errors import InputError
from xreal_engine.model.sampling import (FAST_PRESET, MAX_SEED, SAMPLERS, SETTINGS, SamplingParameters,
                                         anatomy_steps_for, limits)

DEMO_LIKE = {"num_inference_steps": 100, "anatomy_steps": 80, "eta": 1.0, "guidance_scale": 7.0,
             "soft_mask_value": 0.2}


# ----------------------------------------------------------------------------- the policy alone


@pytest.mark.parametrize("steps, expected", [(1, 1), (2, 2), (5, 4), (20, 16), (100, 80), (200, 160),
                                             (999, 799), (1000, 800)])
def test_anatomy_steps_follow_the_step_count_as_the_models_fraction(steps, expected):
    assert SamplingParameters.resolve(DEMO_LIKE, num_inference_steps=steps).anatomy_steps == expected
    assert anatomy_steps_for(steps, DEMO_LIKE) == expected


def test_unset_settings_take_the_models_defaults():
    parameters = SamplingParameters.resolve(DEMO_LIKE, seed=3)
    assert parameters == SamplingParameters(100, 80, 7.0, 1.0, 0.2, 3)
    assert parameters.to_public() == {"steps": 100, "anatomy_steps": 80, "guidance": 7.0, "eta": 1.0,
                                      "soft_mask_value": 0.2, "seed": 3, "sampler": "ddim", "control_stages": "both",
                                      "keep_outside_region": False}
    assert SamplingParameters.from_public(DEMO_LIKE, {"steps": 20, "seed": 3}) == \
        SamplingParameters.resolve(DEMO_LIKE, num_inference_steps=20, seed=3)


RANGES = [  # (field, lowest, highest, just below, just above)
    ("num_inference_steps", 1, 1000, 0, 1001),
    ("guidance_scale", 0.0, 50.0, -0.001, 50.001),
    ("eta", 0.0, 1.0, -0.001, 1.001),
    ("soft_mask_value", 0.0, 1.0, -0.001, 1.001),
    ("seed", 0, MAX_SEED, -1, MAX_SEED + 1),
]


@pytest.mark.parametrize("name, low, high, below, above", RANGES)
def test_both_ends_of_every_range_are_accepted_and_just_outside_refused(name, low, high, below, above):
    for value in (low, high):
        assert getattr(SamplingParameters.resolve(DEMO_LIKE, **{name: value}), name) == value
    messages = set()
    for value in (below, above, float("nan"), True, "7"):
        with pytest.raises(InputError) as error:
            SamplingParameters.resolve(DEMO_LIKE, **{name: value})
        message = str(error.value)
        assert f"'{SETTINGS[name].public_name}'" in message and "\n" not in message
        messages.add(message.split("; got")[0])
    assert len(messages) == 1  # one sentence for every bad value of a setting


def test_anatomy_steps_range_is_zero_to_the_step_count():
    assert SamplingParameters.resolve(DEMO_LIKE, num_inference_steps=20, anatomy_steps=0).anatomy_steps == 0
    assert SamplingParameters.resolve(DEMO_LIKE, num_inference_steps=20, anatomy_steps=20).anatomy_steps == 20
    with pytest.raises(InputError, match=r"'anatomy_steps'\) must be a whole number from 0 to the number of steps \(20\)"):
        SamplingParameters.resolve(DEMO_LIKE, num_inference_steps=20, anatomy_steps=21)
    with pytest.raises(InputError, match="anatomy_steps"):
        SamplingParameters.resolve(DEMO_LIKE, anatomy_steps=-1)
    with pytest.raises(InputError, match="whole number"):
        SamplingParameters.resolve(DEMO_LIKE, num_inference_steps=2.5)


def test_the_fast_preset_fills_only_what_the_request_leaves_unset():
    fast = SamplingParameters.resolve(DEMO_LIKE, fast=True)
    assert (fast.sampler, fast.num_inference_steps) == (FAST_PRESET["sampler"], FAST_PRESET["num_inference_steps"])
    assert fast.anatomy_steps == anatomy_steps_for(FAST_PRESET["num_inference_steps"], DEMO_LIKE)  # same fraction
    assert SamplingParameters.resolve(DEMO_LIKE, fast=True, num_inference_steps=30, sampler="unipc").sampler == "unipc"
    assert SamplingParameters.from_public(DEMO_LIKE, {"fast": True, "steps": None}) == fast
    for sampler in SAMPLERS:
        assert SamplingParameters.resolve(DEMO_LIKE, sampler=sampler).sampler == sampler
    with pytest.raises(InputError, match=r"The sampler \('sampler'\) must be one of ddim, dpmpp, unipc; got 'euler'"):
        SamplingParameters.resolve(DEMO_LIKE, sampler="euler")
    with pytest.raises(InputError, match="fast option must be true or false"):
        SamplingParameters.resolve(DEMO_LIKE, fast="yes")


def test_limits_describe_every_setting():
    assert limits()["num_inference_steps"] == [1, 1000] and limits()["seed"] == [0, MAX_SEED]
    assert set(limits()) == set(SETTINGS)


# ----------------------------------------------------------------------------- one request, three ways


@pytest.fixture(scope="module")
def model_with_demo_fraction(tmp_path_factory) -> Path:
    """A tiny random model whose defaults hold the anatomy for 8 of 10 steps (the demo model's 80 %)."""
    from xreal_engine.model.random_model import create_random_model

    model_dir = create_random_model(tmp_path_factory.mktemp("model") / "tiny", preset="tiny")
    info_path = model_dir / "xreal_model.json"
    info = json.loads(info_path.read_text())
    info["defaults"].update(num_inference_steps=10, anatomy_steps=8)
    info_path.write_text(json.dumps(info))
    return model_dir


@pytest.fixture(scope="module")
def request_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("request")
    size = 64
    y, x = np.mgrid[0:size, 0:size]
    labels = np.zeros((size, size), np.uint8)
    labels[((x - 20) / 9.0) ** 2 + ((y - 32) / 18.0) ** 2 < 1] = 2
    labels[((x - 44) / 9.0) ** 2 + ((y - 32) / 18.0) ** 2 < 1] = 1
    labels[((x - 35) / 8.0) ** 2 + ((y - 40) / 8.0) ** 2 < 1] = 3
    region = np.zeros((size, size), np.uint8)
    region[36:48, 28:40] = 255
    Image.fromarray(labels).save(folder / "anatomy.png")
    Image.fromarray(region).save(folder / "region.png")
    return folder / "anatomy.png", folder / "region.png"


def _sc_pixels(result_dir: Path) -> np.ndarray:
    return pydicom.dcmread(result_dir / "sc.dcm").pixel_array


def _start_engine(model_dir: Path, data_dir: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("XREAL_ENGINE_TOKEN", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "xreal_engine.cli", "serve", "--port", "0", "--model", str(model_dir),
         "--data-dir", str(data_dir), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    if not selector.select(timeout=300):
        process.kill()
        raise AssertionError("the engine printed no URL within 300 s")
    return process, process.stdout.readline().decode().strip().split("=", 1)[1]


THREE_WAYS = [  # (CLI flags, client keywords, GenerationRequest keywords, expected (steps, anatomy steps, sampler))
    # steps=5 alone: 4 anatomy steps everywhere (the bug: the CLI refused, the service used its own rule).
    (["--steps", "5"], {"steps": 5}, {"steps": 5}, (5, 4, "ddim")),
    (["--fast"], {"fast": True}, {"fast": True}, (10, 8, "dpmpp")),
    (["--sampler", "unipc", "--steps", "3"], {"sampler": "unipc", "steps": 3}, {"sampler": "unipc", "steps": 3},
     (3, 2, "unipc")),
]


@pytest.mark.slow
@pytest.mark.parametrize("cli_flags, client_kwargs, request_kwargs, expected", THREE_WAYS)
def test_cli_service_and_python_api_give_the_same_pixels(model_with_demo_fraction, request_files, tmp_path,
                                                         cli_flags, client_kwargs, request_kwargs, expected):
    from xreal_engine.client import EngineClient
    from xreal_engine.generate import GenerationRequest, generate_to_directory, prepare_request
    from xreal_engine.model.loading import load_pipeline

    anatomy, region = request_files
    seed = 11

    # 1. The CLI, in its own process.
    cli_out = tmp_path / "cli"
    completed = subprocess.run(
        [sys.executable, "-m", "xreal_engine.cli", "generate", "--model", str(model_with_demo_fraction),
         "--anatomy", str(anatomy), "--pathology-mask", str(region), "--finding", "cardiomegaly",
         "--seed", str(seed), *cli_flags, "--device", "cpu", "--out", str(cli_out)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert completed.returncode == 0, completed.stderr

    # 2. The service over real HTTP on loopback.
    process, url = _start_engine(model_with_demo_fraction, tmp_path / "engine-data")
    try:
        client = EngineClient(url)
        deadline = time.monotonic() + 300
        while client.health()["model"] != "ready":
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.2)
        job = client.submit(anatomy, [(region, "cardiomegaly")], seed=seed, **client_kwargs)
        job = client.wait(job["id"], poll_interval=0.2, timeout=300)
        assert job["state"] == "succeeded", job
        service_out = tmp_path / "service"
        client.download_all(job["id"], service_out)
        client.shutdown()
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()

    # 3. The Python API in this process.
    pipe = load_pipeline(str(model_with_demo_fraction), "cpu", "float32")
    request = GenerationRequest(anatomy_path=anatomy, pathologies=[(region, "cardiomegaly")], seed=seed,
                                sampling=request_kwargs)
    api_out = tmp_path / "api"
    generate_to_directory(pipe, prepare_request(request, pipe.model_info), api_out)

    provenances = [json.loads((out / "provenance.json").read_text()) for out in (cli_out, service_out, api_out)]
    assert [(p["steps"], p["anatomy_steps"], p["sampler"], p["seed"]) for p in provenances] == [(*expected, seed)] * 3
    reference = _sc_pixels(api_out)
    assert reference.std() > 0
    np.testing.assert_array_equal(_sc_pixels(cli_out), reference)
    np.testing.assert_array_equal(_sc_pixels(service_out), reference)


# ----------------------------------------------------------------------------- every step count runs


@pytest.fixture(scope="module")
def tiny_pipe(model_with_demo_fraction):
    from xreal_engine.model.loading import load_pipeline

    return load_pipeline(str(model_with_demo_fraction), "cpu", "float32")


@pytest.mark.parametrize("steps", [1, 2, 7, pytest.param(501, marks=pytest.mark.slow),
                                   pytest.param(999, marks=pytest.mark.slow), pytest.param(1000, marks=pytest.mark.slow)])
def test_steps_alone_works_at_both_ends_and_past_the_leading_spacing_limit(tiny_pipe, request_files, steps):
    import torch

    from xreal_engine.model.architecture import set_ddim_timesteps

    labels = np.asarray(Image.open(request_files[0]))
    output = tiny_pipe(labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    assert np.isfinite(output.image).all()
    timesteps = set_ddim_timesteps(tiny_pipe.scheduler, steps)
    assert len(timesteps) == steps and max(timesteps) <= 999 and min(timesteps) >= 0
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == steps


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1, 20])
def test_the_issue_example_steps_20_runs_on_the_demo_model(repo_dir, tmp_path, steps):
    """`generate --steps 20` on the default model used to fail with 'Anatomy steps (80) cannot exceed ... (20)';
    the anatomy steps keep the demo model's share (v3: 85 of 100, so 17 of 20)."""
    from xreal_engine.model.info import ModelInfo, resolve_model
    from xreal_engine.model.sampling import anatomy_steps_for

    anatomy_steps = anatomy_steps_for(steps, ModelInfo.load(resolve_model("demo")).defaults)
    out = tmp_path / "result"
    completed = subprocess.run(
        [sys.executable, "-m", "xreal_engine.cli", "generate", "--anatomy",
         str(repo_dir / "Resources" / "Templates" / "anatomy_01.png"), "--steps", str(steps), "--seed", "0",
         "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert completed.returncode == 0, completed.stderr
    provenance = json.loads((out / "provenance.json").read_text())
    assert (provenance["steps"], provenance["anatomy_steps"]) == (steps, anatomy_steps)


def test_the_one_finding_check_canonicalises_and_refuses_with_one_sentence():
    from xreal_engine.model.info import canonical_finding

    known = ["no finding", "cardiomegaly", "pneumonia"]
    assert canonical_finding(" Pneumonia ", known) == "pneumonia"
    assert canonical_finding("", known, removal_allowed=True) == ""
    assert canonical_finding("anything", []) == "anything"  # a model without a vocabulary takes any text
    with pytest.raises(InputError, match="works only when editing"):
        canonical_finding("", known)
    with pytest.raises(InputError) as error:
        canonical_finding("x" * 10_000 + "\x1b[31m", known)
    message = str(error.value)
    assert len(message) < 200 and "\x1b" not in message and "it knows: no finding, cardiomegaly, pneumonia" in message
