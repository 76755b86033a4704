"""ControlNets on the XReal pipeline (model/controlnets.py) and through ``generate`` / ``info``, on tiny models.

Proves: no controls -> bit-identical to a model without ControlNets; a freshly made ControlNet (zero
convolutions) -> bit-identical at any scale; a non-zero one changes the image, scale 0 switches it off;
the stages option; the scale range's ends; provenance, the SEG's attention segment (checked by dciodvfy
and highdicom too); every bad input is one sentence and writes nothing; a wrong-size control is resampled
and said so. The CUDA test runs where a GPU is.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from xreal_engine import cli
from xreal_engine.errors import InputError, ModelError
from xreal_engine.model.controlnets import PreparedControl, embedding_channels, make_controlnet, save_controlnet
from xreal_engine.model.info import ModelInfo, check_model_dir, describe_model

SIZE = 64  # the tiny preset's image size (latent 16)
STEPS = 3
DCIODVFY = shutil.which("dciodvfy")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """The same random weights (seed 0) without ControlNets, with fresh (zero) ones and with random ones."""
    from xreal_engine.model.random_model import create_random_model

    root = tmp_path_factory.mktemp("controlnet-models")
    return {
        "plain": create_random_model(root / "plain"),
        "zero": create_random_model(root / "zero", controlnets=("sobel", "attention"), controlnet_init="zero"),
        "random": create_random_model(root / "random", controlnets=("sobel", "attention"), controlnet_init="random"),
    }


@pytest.fixture(scope="module")
def pipes(models) -> dict:
    from xreal_engine.model.loading import load_pipeline

    return {name: load_pipeline(str(path), "cpu", "float32") for name, path in models.items()}


def anatomy(size: int = SIZE) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    labels = np.zeros((size, size), np.uint8)
    labels[((x - 0.3) / 0.15) ** 2 + ((y - 0.5) / 0.3) ** 2 < 1] = 2
    labels[((x - 0.7) / 0.15) ** 2 + ((y - 0.5) / 0.3) ** 2 < 1] = 1
    labels[((x - 0.55) / 0.1) ** 2 + ((y - 0.65) / 0.1) ** 2 < 1] = 3
    return labels


def region(size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[size // 2: 3 * size // 4, size // 3: 2 * size // 3] = True
    return mask


def control_image(seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((SIZE, SIZE)).astype(np.float32))


def run(pipe, controls=None, sampler="ddim", control_stages=None, device="cpu", seed=0):
    from xreal_engine.model.sampling import SamplingParameters

    parameters = SamplingParameters.resolve(pipe.model_info.defaults, num_inference_steps=STEPS, sampler=sampler,
                                            control_stages=control_stages)
    generator = torch.Generator(device=device).manual_seed(seed)
    return pipe(anatomy(), pathologies=[(region(), "cardiomegaly")], parameters=parameters, generator=generator,
                controls=controls)


def same(a, b) -> bool:
    return all(np.array_equal(getattr(a, key), getattr(b, key)) for key in ("image", "anatomy_image", "x_hat"))


# ----------------------------------------------------------------------------- the pipeline


def test_a_fresh_controlnet_downsamples_by_four_and_adds_exact_zeros(pipes):
    assert embedding_channels(4) == (16, 32, 64) and embedding_channels(8) == (16, 32, 64, 128)
    with pytest.raises(ModelError, match="power of 2"):
        embedding_channels(3)
    unet = pipes["plain"].unet
    controlnet = make_controlnet(unet)
    assert controlnet.config.conditioning_channels == 1
    latent = torch.randn(1, 3, 16, 16)
    hidden = torch.randn(1, 150, unet.config.cross_attention_dim)
    with torch.no_grad():
        down, mid = controlnet(latent, 10, encoder_hidden_states=hidden, controlnet_cond=control_image()[None, None],
                               return_dict=False)
    assert len(down) > 0 and all(not residual.any() for residual in down) and not mid.any()
    assert down[0].shape[-2:] == (16, 16)  # the image-size control reached the latent's size


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_no_controls_is_bit_identical_to_a_model_without_controlnets(pipes, sampler):
    before = run(pipes["plain"], sampler=sampler)
    assert same(run(pipes["random"], sampler=sampler), before)
    assert same(run(pipes["random"], controls=[], sampler=sampler), before)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_fresh_controlnets_are_bit_identical_at_any_scale(pipes, sampler):
    before = run(pipes["plain"], sampler=sampler)
    controls = [PreparedControl("sobel", control_image(1), 2.0), PreparedControl("attention", control_image(2), 0.7)]
    assert same(run(pipes["zero"], controls=controls, sampler=sampler), before)


def test_a_trained_like_controlnet_changes_the_image_and_scale_zero_switches_it_off(pipes):
    before = run(pipes["plain"])
    steered = run(pipes["random"], controls=[PreparedControl("sobel", control_image(), 1.0)])
    assert np.abs(steered.image - before.image).max() > 1e-3
    other_map = run(pipes["random"], controls=[PreparedControl("sobel", control_image(5), 1.0)])
    assert np.abs(other_map.image - steered.image).max() > 1e-4  # the map matters, not only the net
    assert same(run(pipes["random"], controls=[PreparedControl("sobel", control_image(), 0.0)]), before)
    both = run(pipes["random"], controls=[PreparedControl("sobel", control_image(), 1.0),
                                          PreparedControl("attention", control_image(2), 1.0)])
    assert np.abs(both.image - steered.image).max() > 1e-4  # several at once: the residuals add up


def test_control_stages_choose_the_stages_the_controls_steer(pipes):
    before = run(pipes["plain"])
    controls = [PreparedControl("sobel", control_image(), 1.0)]
    pathology_only = run(pipes["random"], controls=controls, control_stages="pathology")
    assert np.array_equal(pathology_only.anatomy_image, before.anatomy_image)
    assert not np.array_equal(pathology_only.image, before.image)
    anatomy_only = run(pipes["random"], controls=controls, control_stages="anatomy")
    assert not np.array_equal(anatomy_only.anatomy_image, before.anatomy_image)
    default = run(pipes["random"], controls=controls)
    assert np.array_equal(default.anatomy_image, anatomy_only.anatomy_image)  # "both" is the default
    assert not np.array_equal(default.image, anatomy_only.image)


def test_scale_range_ends_accepted_just_outside_refused_by_the_pipeline(pipes):
    for scale in (0.0, 2.0):
        run(pipes["random"], controls=[PreparedControl("sobel", control_image(), scale)])
    for scale in (-0.001, 2.001):
        with pytest.raises(InputError, match="outside \\[0, 2\\]"):
            run(pipes["random"], controls=[PreparedControl("sobel", control_image(), scale)])


def test_pipeline_refusals(pipes):
    with pytest.raises(InputError, match="This model has no sobel ControlNet \\(its ControlNets: none\\)"):
        run(pipes["plain"], controls=[PreparedControl("sobel", control_image(), 1.0)])
    with pytest.raises(InputError, match="has no canny ControlNet \\(its ControlNets: sobel, attention\\)"):
        run(pipes["random"], controls=[PreparedControl("canny", control_image(), 1.0)])
    with pytest.raises(InputError, match="the model needs 64x64"):
        run(pipes["random"], controls=[PreparedControl("sobel", torch.zeros(32, 32), 1.0)])
    with pytest.raises(InputError, match="values in \\[0, 1\\]"):
        run(pipes["random"], controls=[PreparedControl("sobel", control_image() * 3, 1.0)])
    with pytest.raises(InputError, match="Unknown control"):
        run(pipes["random"], controls=[PreparedControl("edges", control_image(), 1.0)])


def test_a_none_scale_takes_the_models_default(pipes, models, tmp_path):
    model = tmp_path / "half"
    shutil.copytree(models["random"], model)
    data = json.loads((model / "xreal_model.json").read_text())
    assert data["controlnets"] == {"sobel": {"scale": 1.0}, "attention": {"scale": 1.0}}
    data["controlnets"]["sobel"]["scale"] = 0.0
    (model / "xreal_model.json").write_text(json.dumps(data))
    from xreal_engine.model.loading import load_pipeline

    pipe = load_pipeline(str(model), "cpu", "float32")
    assert same(run(pipe, controls=[PreparedControl("sobel", control_image(), None)]), run(pipes["plain"]))


def test_float16_controlnet_on_disk_loads_in_the_pipeline_dtype(models, pipes, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(models["plain"], model)
    folder = save_controlnet(make_controlnet(pipes["plain"].unet), model, "canny", scale=0.25, dtype=torch.float16)
    assert folder.name == "controlnet_canny"
    assert ModelInfo.load(model).controlnets == {"canny": 0.25}
    from xreal_engine.model.loading import load_pipeline

    pipe = load_pipeline(str(model), "cpu", "float32")
    assert set(pipe.controlnets) == {"canny"} and pipe.controlnets["canny"].dtype == torch.float32
    assert same(run(pipe, controls=[PreparedControl("canny", control_image(), None)]), run(pipes["plain"]))
    assert pipe.set_precision(torch.bfloat16).controlnets["canny"].dtype == torch.bfloat16


def test_a_listed_controlnet_without_its_folder_or_for_another_unet_is_refused(models, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(models["random"], model)
    shutil.rmtree(model / "controlnet_attention")
    with pytest.raises(ModelError, match="lists a attention ControlNet .* controlnet_attention/config.json is missing"):
        check_model_dir(model)
    data = json.loads((model / "xreal_model.json").read_text())
    data["controlnets"] = {"sobel": {"scale": 2.5}}
    (model / "xreal_model.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="sobel scale 2.5 is outside"):
        ModelInfo.load(model)
    data["controlnets"] = {"edges": {"scale": 1}}
    (model / "xreal_model.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="'edges' is not a control"):
        ModelInfo.load(model)


def test_info_lists_the_controlnets(models, capsys):
    assert cli.main(["info", "--model", str(models["random"])]) == 0
    out = capsys.readouterr().out
    assert "controlnets" in out
    assert any(line.split()[:4] == ["sobel", "controlnet_sobel/", "default", "scale"] for line in out.splitlines())
    assert any(line.split()[:2] == ["attention", "controlnet_attention/"] for line in out.splitlines())
    described = describe_model(models["random"])
    assert set(described["controlnets"]) == {"sobel", "attention"}
    assert described["controlnets"]["sobel"]["parameters"] > 0
    assert described["total_parameters"] == describe_model(models["plain"])["total_parameters"]
    assert cli.main(["info", "--model", str(models["plain"])]) == 0
    assert "controlnets (none)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- generate, provenance, SEG


@pytest.fixture()
def files(tmp_path) -> dict:
    y, x = np.mgrid[0:128, 0:128]
    reference = (np.clip(0.5 + 0.3 * np.sin(x / 7.0) * np.cos(y / 11.0), 0, 1) * 255).astype(np.uint8)
    paths = {"anatomy": tmp_path / "anatomy.png", "region": tmp_path / "region.png", "ref": tmp_path / "ref.png",
             "fix": tmp_path / "fix.csv"}
    Image.fromarray(anatomy(128)).save(paths["anatomy"])
    Image.fromarray(region(128).astype(np.uint8) * 255).save(paths["region"])
    Image.fromarray(reference[::2, ::2]).save(paths["ref"])  # 64x64: not the 128x128 of the masks
    paths["fix"].write_text("x,y,duration\n80,60,0.6\n85,64,0.4\n40,90,0.2\n")
    return paths


def generate(model, files, out, *extra) -> int:
    return cli.main(["generate", "--model", str(model), "--anatomy", str(files["anatomy"]),
                     "--pathology-mask", str(files["region"]), "--finding", "cardiomegaly", "--seed", "3",
                     "--steps", str(STEPS), "--device", "cpu", "--out", str(out), *extra])


def test_generate_with_controls_records_them_and_the_attention_segment(models, files, tmp_path, capsys):
    out = tmp_path / "out"
    code = generate(models["random"], files, out, "--control", f"sobel:{files['ref']}:0.5",
                    "--control", f"attention:{files['fix']}")
    err = capsys.readouterr().err
    assert code == 0, err
    resampled = "The sobel control ref.png is 64x64 pixels, not the 128x128 of the image; it was resampled to the model's 64x64."
    assert f"warning: {resampled}" in err
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["controls"] == [
        {"name": "sobel", "source": "ref.png", "source_sha256": hashlib.sha256(files["ref"].read_bytes()).hexdigest(),
         "scale": 0.5, "stages": "both"},
        {"name": "attention", "source": "fix.csv",
         "source_sha256": hashlib.sha256(files["fix"].read_bytes()).hexdigest(), "scale": 1.0,
         "stages": "both"},
    ]
    assert provenance["control_stages"] == "both" and resampled in provenance["warnings"]

    segments = json.loads((out / "segments.json").read_text())["segments"]
    attention = [segment for segment in segments if segment["kind"] == "attention"]
    assert len(attention) == 1 and attention[0]["name"] == "attention"
    mask = np.asarray(Image.open(out / attention[0]["file"])) > 0
    assert mask.shape == (128, 128) and mask[60, 80] and not mask[:20].any()  # around the long fixations

    import highdicom as hd

    seg = hd.seg.segread(out / "seg.dcm")
    labels = [seg.get_segment_description(n).segment_label for n in range(1, seg.number_of_segments + 1)]
    assert labels[-1] == "Attention region"
    description = seg.get_segment_description(seg.number_of_segments)
    assert description.segmented_property_type.value == "130404"  # DCM Saliency
    pixels = seg.get_pixels_by_source_instance([pydicom.dcmread(out / "sc.dcm").SOPInstanceUID])
    np.testing.assert_array_equal(pixels[0, ..., -1] > 0, mask)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian dicom3tools) is not installed")
def test_the_seg_with_an_attention_segment_passes_dciodvfy(models, files, tmp_path, capsys):
    out = tmp_path / "out"
    assert generate(models["random"], files, out, "--control", f"attention:{files['fix']}:0.3") == 0
    run = subprocess.run([DCIODVFY, str(out / "seg.dcm")], capture_output=True, text=True, timeout=120)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    # The only error the engine's SEGs ever get (Testing/test_dicom_output.py): the Synthetic Data tag.
    assert errors == ["Error - Attribute with an even group number is not a recognized standard attribute - "
                      "(0x0008,0x001c)  ? "], run.stdout + run.stderr


def test_without_controls_generate_is_unchanged(models, files, tmp_path, capsys):
    assert generate(models["plain"], files, tmp_path / "a") == 0
    assert generate(models["zero"], files, tmp_path / "b", "--control", f"sobel:{files['ref']}:2") == 0
    first = np.asarray(Image.open(tmp_path / "a" / "preview.png"))
    np.testing.assert_array_equal(first, np.asarray(Image.open(tmp_path / "b" / "preview.png")))
    assert json.loads((tmp_path / "a" / "provenance.json").read_text())["controls"] == []


def bad_cases(files, tmp_path) -> list:
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("a,b,c\n1,2,3\n")
    flat = tmp_path / "flat.png"
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(flat)
    return [
        ("random", ["--control", f"edges:{files['ref']}"], "Unknown control 'edges'"),
        ("random", ["--control", f"attention:{bad_csv}"], "is not the documented fixation CSV"),
        ("random", ["--control", f"sobel:{files['ref']}:2.5"], "sobel scale 2.5 is outside [0, 2]"),
        ("random", ["--control", f"sobel:{files['ref']}:-0.1"], "sobel scale -0.1 is outside [0, 2]"),
        ("plain", ["--control", f"sobel:{files['ref']}"], "This model has no sobel ControlNet"),
        ("random", ["--control", "canny:" + str(files["ref"])], "This model has no canny ControlNet"),
        ("random", ["--control", f"attention:{flat}"], "The attention map flat.png has a single grey level"),
        ("random", ["--control", f"sobel:{tmp_path / 'nowhere.png'}"], "does not exist"),
        ("random", ["--control", "sobel"], "needs a reference X-ray"),
        ("random", ["--control", f"sobel:{files['ref']}", "--control", f"sobel:{files['ref']}:1"], "more than once"),
    ]


def test_every_bad_control_is_one_sentence_and_writes_nothing(models, files, tmp_path, capsys):
    for model, args, words in bad_cases(files, tmp_path):
        out = tmp_path / "never"
        code = generate(models[model], files, out, *args)
        err = capsys.readouterr().err.strip()
        assert code == 2, (args, err)
        assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err, (args, err)
        assert not out.exists(), args


def test_edit_mode_refuses_anatomy_only_controls(models, files, tmp_path):
    from xreal_engine.generate import GenerationRequest, prepare_request
    from xreal_engine.io.controls import parse_control

    request = GenerationRequest(anatomy_path=None, pathologies=[(files["region"], "cardiomegaly")],
                                image_path=files["anatomy"], controls=[parse_control(f"sobel:{files['ref']}")],
                                sampling={"control_stages": "anatomy"})
    with pytest.raises(InputError, match="no anatomy stage for the controls"):
        prepare_request(request, ModelInfo.load(models["random"]))
    # and the other way round: no region, no pathology stage for controls limited to it
    alone = GenerationRequest(anatomy_path=files["anatomy"], controls=[parse_control(f"sobel:{files['ref']}")],
                              sampling={"control_stages": "pathology"})
    with pytest.raises(InputError, match="no pathology stage for the controls to steer"):
        prepare_request(alone, ModelInfo.load(models["random"]))
    prepared = prepare_request(GenerationRequest(**{**request.__dict__, "sampling": {}}), ModelInfo.load(models["random"]))
    assert [c.name for c in prepared.controls] == ["sobel"] and prepared.controls[0].map.shape == (SIZE, SIZE)


def test_an_edit_records_its_controls_as_steering_the_pathology_stage(models, files, tmp_path, capsys):
    xray = tmp_path / "xray.png"
    Image.fromarray(np.tile(np.linspace(40, 200, 128).astype(np.uint8), (128, 1))).save(xray)
    out = tmp_path / "edit"
    code = cli.main(["generate", "--model", str(models["random"]), "--image", str(xray), "--pathology-mask",
                     str(files["region"]), "--finding", "cardiomegaly", "--seed", "1", "--steps", str(STEPS),
                     "--device", "cpu", "--control", f"sobel:{xray}:1.5", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    controls = json.loads((out / "provenance.json").read_text())["controls"]
    assert [(c["name"], c["scale"], c["stages"]) for c in controls] == [("sobel", 1.5, "pathology")]


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_controls_on_the_device(models, dtype):
    from xreal_engine.model.loading import load_pipeline

    plain = load_pipeline(str(models["plain"]), "cuda", dtype)
    zero = load_pipeline(str(models["zero"]), "cuda", dtype)
    steered = load_pipeline(str(models["random"]), "cuda", dtype)
    assert all(net.device.type == "cuda" and str(net.dtype) == f"torch.{dtype}" for net in steered.controlnets.values())
    before = run(plain, device="cuda")
    controls = [PreparedControl("sobel", control_image(), 2.0), PreparedControl("attention", control_image(2), 1.0)]
    assert same(run(zero, controls=controls, device="cuda"), before)
    after = run(steered, controls=controls, device="cuda")
    assert np.isfinite(after.image).all() and np.abs(after.image - before.image).max() > 1e-3
