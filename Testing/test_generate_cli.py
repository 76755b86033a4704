"""`xreal-engine generate` end to end on a tiny random model: result directory, DICOM pair, edit mode, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from xreal_engine import cli
from xreal_engine.errors import Cancelled
from xreal_engine.generate import GenerationRequest, generate_to_directory, prepare_request
from xreal_engine.model.info import ModelInfo

RESULT_FILES = {"sc.dcm", "seg.dcm", "preview.png", "provenance.json", "segments.json", "segments"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from xreal_engine.model.random_model import create_random_model

    return create_random_model(tmp_path_factory.mktemp("model") / "tiny", preset="tiny")


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from xreal_engine.model.loading import load_pipeline

    return load_pipeline(str(tiny_model), "cpu", "float32")


def chest_labels(rows: int = 256, cols: int = 256) -> np.ndarray:
    """Two lungs and a heart as ellipses; patient's left (label 1) at image right."""
    y, x = np.mgrid[0:rows, 0:cols]
    labels = np.zeros((rows, cols), np.uint8)
    labels[((x - 0.3 * cols) / (0.15 * cols)) ** 2 + ((y - 0.5 * rows) / (0.3 * rows)) ** 2 < 1] = 2
    labels[((x - 0.7 * cols) / (0.15 * cols)) ** 2 + ((y - 0.5 * rows) / (0.3 * rows)) ** 2 < 1] = 1
    labels[((x - 0.55 * cols) / (0.12 * cols)) ** 2 + ((y - 0.65 * rows) / (0.12 * rows)) ** 2 < 1] = 3
    return labels


def write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


@pytest.fixture()
def inputs(tmp_path):
    labels = chest_labels()
    region = np.zeros_like(labels)
    region[150:200, 120:170] = 255
    return write_png(tmp_path / "anatomy.png", labels), write_png(tmp_path / "region.png", region)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xreal_engine.cli", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow  # starts a process
def test_generate_writes_complete_reproducible_result(tiny_model, inputs, tmp_path):
    anatomy, region = inputs
    common = ["generate", "--model", str(tiny_model), "--anatomy", str(anatomy), "--pathology-mask", str(region),
              "--finding", "cardiomegaly", "--seed", "7", "--steps", "3", "--anatomy-steps", "2", "--device", "cpu", "--threads", "1"]
    first = run_cli(*common, "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    assert {p.name for p in (tmp_path / "a").iterdir()} == RESULT_FILES

    provenance = json.loads((tmp_path / "a" / "provenance.json").read_text())
    assert provenance["seed"] == 7 and provenance["steps"] == 3 and provenance["anatomy_steps"] == 2
    assert provenance["findings"] == ["cardiomegaly"]
    import hashlib  # which files made it (not their names)

    assert provenance["inputs"] == {"anatomy_sha256": hashlib.sha256(anatomy.read_bytes()).hexdigest(),
                                    "pathology_sha256": [hashlib.sha256(region.read_bytes()).hexdigest()]}
    assert provenance["model_id"] == ModelInfo.load(tiny_model).model_id
    assert len(provenance["weights_hash"]) == 64
    assert provenance["cpu_threads"] == 1  # float32 CPU results depend on it (by up to one grey level)

    sc = pydicom.dcmread(tmp_path / "a" / "sc.dcm")
    seg = pydicom.dcmread(tmp_path / "a" / "seg.dcm")
    assert (sc.Rows, sc.Columns) == (256, 256)  # the input grid, not the model's 64x64
    assert sc.SOPInstanceUID == provenance["dicom"]["sc_sop_instance_uid"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sc.SeriesInstanceUID
    names = [s.SegmentLabel.lower() for s in seg.SegmentSequence]
    assert len(names) == 4 and any("cardiomegaly" in n for n in names)

    segments = json.loads((tmp_path / "a" / "segments.json").read_text())["segments"]
    assert [s["kind"] for s in segments] == ["anatomy"] * 3 + ["pathology"]
    heart = np.array(Image.open(tmp_path / "a" / segments[2]["file"])) > 0
    assert np.array_equal(heart, chest_labels() == 3)

    second = run_cli(*common, "--out", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr
    preview_a = np.array(Image.open(tmp_path / "a" / "preview.png"))
    preview_b = np.array(Image.open(tmp_path / "b" / "preview.png"))
    assert preview_a.shape == (256, 256)
    assert np.array_equal(preview_a, preview_b), "same seed, same model: same image"


def test_non_square_input_keeps_its_grid(pipe, tmp_path):
    labels = chest_labels(200, 300)
    anatomy = write_png(tmp_path / "anatomy.png", labels)
    prepared = prepare_request(GenerationRequest(anatomy_path=anatomy, seed=1, sampling={"steps": 2, "anatomy_steps": 1}),
                               pipe.model_info)
    provenance = generate_to_directory(pipe, prepared, tmp_path / "out")
    sc = pydicom.dcmread(tmp_path / "out" / "sc.dcm")
    assert (sc.Rows, sc.Columns) == (200, 300)
    assert [float(v) for v in sc.PixelSpacing] == pytest.approx([400 / 200, 400 / 300])
    assert provenance["findings"] == []
    assert any("300 x 200 pixels, not square" in w and "(1.50x along one axis)" in w for w in prepared.warnings)
    assert any("not square" in w for w in provenance["warnings"])
    square = prepare_request(GenerationRequest(anatomy_path=write_png(tmp_path / "square.png", chest_labels(200, 200)),
                                               seed=1), pipe.model_info)
    assert not any("not square" in w for w in square.warnings)


def test_different_seeds_differ(pipe, inputs, tmp_path):
    anatomy, _ = inputs
    images = []
    for seed in (1, 2):
        prepared = prepare_request(GenerationRequest(anatomy_path=anatomy, seed=seed, sampling={"steps": 2, "anatomy_steps": 1}), pipe.model_info)
        generate_to_directory(pipe, prepared, tmp_path / f"s{seed}")
        images.append(np.array(Image.open(tmp_path / f"s{seed}" / "preview.png"), dtype=float))
    assert np.abs(images[0] - images[1]).mean() > 0.5


def test_edit_mode_keeps_the_source_outside_the_region(pipe, tmp_path):
    rng = np.random.default_rng(0)
    source = (rng.random((128, 160)) * 200 + 20).astype(np.uint8)
    region = np.zeros_like(source)
    region[40:80, 50:100] = 255
    image = write_png(tmp_path / "xray.png", source)
    mask = write_png(tmp_path / "region.png", region)
    prepared = prepare_request(
        GenerationRequest(anatomy_path=None, pathologies=[(mask, "pneumonia")], image_path=image, seed=0,
                          sampling={"steps": 2, "anatomy_steps": 0}), pipe.model_info)
    assert prepared.edit_mode
    provenance = generate_to_directory(pipe, prepared, tmp_path / "edit")
    assert provenance["mode"] == "edit"
    import hashlib

    assert provenance["source_image"] == {"sha256": hashlib.sha256(image.read_bytes()).hexdigest(),
                                          "sop_instance_uid": None}  # a PNG has no UID; the name is not recorded
    result = np.array(Image.open(tmp_path / "edit" / "preview.png"), dtype=int)
    far = np.ones(source.shape, bool)
    far[25:95, 35:115] = False  # the region widened by more than the feather
    # the source went through [0,1] and back to 8 bits: equal to within one grey level
    assert np.abs(result[far] - source[far].astype(int)).max() <= 1
    assert np.abs(result[45:75, 55:95] - source[45:75, 55:95].astype(int)).mean() > 5


def test_cancel_leaves_nothing_behind(pipe, inputs, tmp_path):
    anatomy, region = inputs
    prepared = prepare_request(GenerationRequest(anatomy_path=anatomy, pathologies=[(region, "pneumonia")], seed=0,
                                                 sampling={"steps": 4, "anatomy_steps": 2}), pipe.model_info)

    def cancel_in_pathology_stage(stage, step, total):
        if stage.startswith("pathology") and step >= 1:
            raise Cancelled("cancelled by the user")

    with pytest.raises(Cancelled):
        generate_to_directory(pipe, prepared, tmp_path / "out", progress=cancel_in_pathology_stage)
    assert list(tmp_path.iterdir()) == [] or not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())


def _bad_cases(tmp_path: Path, anatomy: Path, region: Path):
    empty = write_png(tmp_path / "empty.png", np.zeros((256, 256)))
    outside = np.zeros((256, 256))
    outside[0:10, 0:10] = 255
    outside_mask = write_png(tmp_path / "outside.png", outside)
    small = write_png(tmp_path / "small.png", chest_labels(128, 128))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    base = ["--anatomy", str(anatomy)]
    return {
        "missing anatomy file": ["--anatomy", str(tmp_path / "nope.png")],
        "not an image": ["--anatomy", str(junk)],
        "empty anatomy": ["--anatomy", str(empty)],
        "unknown finding": base + ["--pathology-mask", str(region), "--finding", "broken leg"],
        "finding count": base + ["--pathology-mask", str(region)],
        "outside the body": base + ["--pathology-mask", str(outside_mask), "--finding", "pneumonia"],
        "size mismatch": base + ["--pathology-mask", str(small), "--finding", "pneumonia"],
        "negative steps": base + ["--steps", "-3"],
        "anatomy steps beyond steps": base + ["--steps", "4", "--anatomy-steps", "9"],
        "huge guidance": base + ["--guidance", "1e9"],
        "no anatomy": [],
        "bad device": base + ["--device", "tpu"],
        "source without study": base + ["--source", "pacs"],
        "study without source": base + ["--study", "1.2.3", "--series", "1.2.4"],
        "instance without source": base + ["--instance", "1.2.5"],
        "steps not a number": base + ["--steps", "abc"],  # argparse's refusal, in one line too
        "seed not whole": base + ["--seed", "1.5"],
        "unknown sampler": base + ["--sampler", "foo"],
        "unknown option": base + ["--stepz", "5"],
    }


def test_refusals_are_one_line_and_write_nothing(tiny_model, inputs, tmp_path, capsys):
    anatomy, region = inputs
    cases = _bad_cases(tmp_path, anatomy, region)
    for name, args in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        code = cli.main(["generate", "--model", str(tiny_model), "--seed", "0", "--out", str(out), *args])
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        assert err.count("\n") == 0 and err.startswith("xreal-engine generate: error:"), (name, err)
        assert not out.exists(), name
    leftovers = [p.name for p in tmp_path.iterdir() if "partial" in p.name]
    assert leftovers == []


def test_existing_output_directory_is_not_touched(tiny_model, inputs, tmp_path, capsys):
    anatomy, _ = inputs
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = cli.main(["generate", "--model", str(tiny_model), "--anatomy", str(anatomy), "--out", str(out)])
    assert code == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_unknown_model_is_one_line(inputs, tmp_path, capsys):
    anatomy, _ = inputs
    code = cli.main(["generate", "--model", str(tmp_path / "no-model"), "--anatomy", str(anatomy),
                     "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "model" in err.lower()


def test_a_label_the_model_was_trained_without_is_accepted_with_its_warning(tmp_path):
    """The demo model has no aorta: `info` says a drawn aorta is ignored, so generate must take it (and warn)."""
    from xreal_engine.errors import InputError

    info = ModelInfo(model_id="no-aorta", findings=["pneumonia"],
                     anatomy_labels={"1": "left lung", "2": "right lung", "3": "heart"},
                     label_warnings={"4": "This model was trained without aorta masks; the aorta you drew is ignored."})
    assert info.accepted_label_values() == [1, 2, 3, 4] and info.ignored_label_values() == [4]
    labels = chest_labels()
    labels[40:60, 120:130] = 4
    prepared = prepare_request(GenerationRequest(anatomy_path=write_png(tmp_path / "aorta.png", labels), seed=0),
                               info)
    assert prepared.warnings == [info.label_warnings["4"]]
    labels[:5, :5] = 5  # a label no one declared stays refused
    with pytest.raises(InputError, match=r"label values \[5\] that the model does not know \(it knows 1, 2, 3, 4\)"):
        prepare_request(GenerationRequest(anatomy_path=write_png(tmp_path / "odd.png", labels), seed=0), info)


def test_two_regions_with_one_finding_get_numbered_names(pipe, inputs, tmp_path):
    anatomy, region = inputs
    prepared = prepare_request(GenerationRequest(anatomy_path=anatomy, pathologies=[(region, "pneumonia")] * 2, seed=0,
                                                 sampling={"steps": 2, "anatomy_steps": 1}), pipe.model_info)
    generate_to_directory(pipe, prepared, tmp_path / "out")
    names = [entry["name"] for entry in json.loads((tmp_path / "out" / "segments.json").read_text())["segments"]]
    assert names[-2:] == ["pneumonia", "pneumonia 2"] and len(set(names)) == len(names)
    labels = [item.SegmentLabel for item in pydicom.dcmread(tmp_path / "out" / "seg.dcm").SegmentSequence]
    assert labels[-2:] == ["Pneumonia", "Pneumonia 2"]


def test_a_reader_that_stops_reading_ends_the_command_quietly(tiny_model):
    """`xreal-engine info --json | head -c 10`: the closed pipe is the reader's choice, not an error."""
    process = subprocess.Popen([sys.executable, "-m", "xreal_engine.cli", "info", "--model", str(tiny_model), "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before the command has written anything (it takes a second to start)
    error = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141 and error == "", error
