"""`xreal-engine generate-batch` on the local backend with a tiny random model: manifests, designs, resuming,
failures, bad input with row numbers, every --format read by its consumer, the quality check and --min-dice."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xreal_engine import cli
from xreal_engine.batch.designs import Design, plan_design
from xreal_engine.model.info import ModelInfo

STEPS = ["--steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from xreal_engine.model.random_model import create_random_model

    return create_random_model(tmp_path_factory.mktemp("model") / "tiny", preset="tiny")


@pytest.fixture()
def templates(repo_dir) -> Path:
    return repo_dir / "Resources" / "Templates"


def write_csv(path: Path, header: list, rows: list) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def manifest_rows(templates: Path) -> list:
    """name, anatomy, pathology_masks, findings, seed, steps: a template name, a file + region, a setting."""
    return [
        ["plain", "anatomy_01", "", "", "3", ""],
        ["heart", str(templates / "anatomy_01.png"), str(templates / "pathology_cardiomegaly.png"), "cardiomegaly",
         "4", ""],
        ["three-steps", "anatomy_02", "", "", "5", "3"],
    ]


def batch(*args) -> int:
    return cli.main(["generate-batch", *map(str, args)])


def pixels(result_dir: Path) -> np.ndarray:
    return np.asarray(Image.open(result_dir / "preview.png"))


def failures(out: Path) -> list:
    with (out / "failures.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_manifest_writes_results_quality_and_every_format(tiny_model, templates, tmp_path, capsys):
    manifest = write_csv(tmp_path / "m.csv", ["name", "anatomy", "pathology_masks", "findings", "seed", "steps"],
                         manifest_rows(templates))
    out = tmp_path / "out"
    assert batch("--manifest", manifest, "--out", out, "--model", tiny_model, *STEPS,
                 "--format", "monai,imagefolder", "--format", "nnunet") == 0
    assert "3 of 3 rows finished" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "images").iterdir()) == ["heart", "plain", "three-steps"]

    provenance = json.loads((out / "images" / "heart" / "provenance.json").read_text())
    assert provenance["seed"] == 4 and provenance["steps"] == 2 and provenance["findings"] == ["cardiomegaly"]
    assert json.loads((out / "images" / "three-steps" / "provenance.json").read_text())["steps"] == 3
    quality = provenance["quality"]
    assert set(quality["anatomy_dice"]) == {"left lung", "right lung", "heart"}
    assert all(0 <= dice <= 1 for dice in quality["anatomy_dice"].values())
    assert quality["segmenter"].startswith("small-128px-")

    summary = json.loads((out / "dataset.json").read_text())
    info = ModelInfo.load(tiny_model)
    assert summary["model_id"] == info.model_id and len(summary["weights_hash"]) == 64
    assert summary["engine_version"] and summary["counts"] == {"rows": 3, "finished": 3, "failed": 0, "dropped": 0,
                                                               "pending": 0}
    assert summary["findings"] == {"none": 2, "cardiomegaly": 1} and summary["quality"]["checked"] == 3

    # MONAI: the Decathlon datalist loads, and its image / label load with MONAI's own reader.
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    items = load_decathlon_datalist(str(out / "datalist.json"), is_segmentation=True, data_list_key="training")
    assert [item["name"] for item in items] == ["plain", "heart", "three-steps"]
    assert items[1]["anatomy_dice"] == quality["anatomy_dice"]
    loaded = LoadImaged(keys=["image", "label", "findings_label"], image_only=True)(items[1])
    assert loaded["image"].shape == loaded["label"].shape == (256, 256)
    labels = np.asarray(loaded["label"]).T  # MONAI's PIL reader gives (x, y)
    findings = np.asarray(loaded["findings_label"]).T
    template = np.asarray(Image.open(templates / "anatomy_01.png"))
    region = np.asarray(Image.open(templates / "pathology_cardiomegaly.png")) > 0
    assert np.array_equal(labels, template)  # the anatomy label values of the model, 1..3
    finding_labels = json.loads((out / "datalist.json").read_text())["finding_labels"]
    finding_value = int({name: value for value, name in finding_labels.items()}["cardiomegaly"])
    assert np.array_equal(findings == finding_value, region) and set(np.unique(findings)) == {0, finding_value}

    # nnU-Net v2 layout: image _0000 + label pairs and a dataset.json with consecutive labels.
    nnunet = json.loads((out / "nnunet" / "dataset.json").read_text())
    assert nnunet["labels"] == {"background": 0, "left lung": 1, "right lung": 2, "heart": 3, "aorta": 4}
    assert nnunet["numTraining"] == 3 and nnunet["file_ending"] == ".png"
    for name in ("plain", "heart", "three-steps"):
        assert np.array_equal(np.asarray(Image.open(out / "nnunet" / "imagesTr" / f"{name}_0000.png")),
                              pixels(out / "images" / name))
        assert (out / "nnunet" / "labelsTr" / f"{name}.png").is_file()

    # Hugging Face imagefolder: metadata.jsonl read by datasets where it is installed, else by hand.
    lines = [json.loads(line) for line in (out / "imagefolder" / "train" / "metadata.jsonl").read_text().splitlines()]
    assert [line["name"] for line in lines] == ["plain", "heart", "three-steps"]
    for line in lines:
        assert (out / "imagefolder" / "train" / line["file_name"]).is_file()
        assert (out / "imagefolder" / "train" / line["label_map_file_name"]).is_file()
    try:
        import datasets
    except ImportError:
        return
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out / "imagefolder"), cache_dir=str(tmp_path / "hf"))
    train = loaded["train"]
    assert train.num_rows == 3 and sorted(train["name"]) == ["heart", "plain", "three-steps"]
    row = train[train["name"].index("heart")]
    assert np.array_equal(np.asarray(row["image"]), pixels(out / "images" / "heart"))
    assert np.array_equal(np.asarray(row["label_map"]), template)
    assert row["anatomy_dice"] == quality["anatomy_dice"] and row["findings"] == ["cardiomegaly"]


def test_jsonl_manifest_makes_the_same_images_as_csv_and_edits_xrays(tiny_model, templates, tmp_path):
    csv_manifest = write_csv(tmp_path / "m.csv", ["name", "anatomy", "pathology_masks", "findings", "seed", "steps"],
                             manifest_rows(templates)[:2])
    xray = tmp_path / "xray.png"
    Image.fromarray((np.indices((256, 256)).sum(axis=0) % 256).astype(np.uint8)).save(xray)
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in (
        {"name": "plain", "anatomy": "anatomy_01", "seed": 3},
        {"name": "heart", "anatomy": str(templates / "anatomy_01.png"), "seed": 4,
         "pathologies": [{"mask": str(templates / "pathology_cardiomegaly.png"), "finding": "Cardiomegaly"}]},
        {"name": "edit", "image": "xray.png", "seed": 5, "pathologies": [{"mask": "pathology_pneumonia",
                                                                          "finding": ""}]},
    )) + "\n")
    assert batch("--manifest", csv_manifest, "--out", tmp_path / "a", "--model", tiny_model, *STEPS,
                 "--no-quality-check") == 0
    assert batch("--manifest", jsonl, "--out", tmp_path / "b", "--model", tiny_model, *STEPS, "--format", "monai") == 0
    for name in ("plain", "heart"):
        assert np.array_equal(pixels(tmp_path / "a" / "images" / name), pixels(tmp_path / "b" / "images" / name))
        assert "quality" not in json.loads((tmp_path / "a" / "images" / name / "provenance.json").read_text())
    edit = json.loads((tmp_path / "b" / "images" / "edit" / "provenance.json").read_text())
    assert edit["mode"] == "edit" and "quality" not in edit  # no anatomy was requested, so none is scored
    region = np.asarray(Image.open(templates / "pathology_pneumonia.png")) > 0
    outside = ~np.asarray(Image.fromarray(region.astype(np.uint8)).resize((256, 256))).astype(bool)
    edited = pixels(tmp_path / "b" / "images" / "edit").astype(int)
    original = np.asarray(Image.open(xray)).astype(int)
    assert np.abs(edited - original)[outside].mean() < np.abs(edited - original)[~outside].mean()
    items = json.loads((tmp_path / "b" / "datalist.json").read_text())["training"]
    assert [item["name"] for item in items] == ["plain", "heart", "edit"] and items[2]["anatomy_dice"] is None
    # a row naming a template records it, as a design's rows do; a file path or an X-ray edit names none
    assert [item["template"] for item in items] == ["anatomy_01", None, None]


def test_rows_sharing_an_anatomy_and_seed_share_its_anatomy_stage_and_the_unet_is_frozen_on_a_cpu(
        tiny_model, templates, tmp_path):
    """A counterfactual batch (one anatomy and seed, two findings): the second row reuses the first's
    anatomy stage (model/anatomy_cache.py), and without a flag the UNet runs frozen on a CPU; both give
    what --eager and a one-image generate give, bit for bit."""
    heart = templates / "pathology_cardiomegaly.png"
    manifest = write_csv(tmp_path / "m.csv", ["name", "anatomy", "pathology_masks", "findings", "seed"], [
        ["heart", "anatomy_01", str(heart), "cardiomegaly", "9"],
        ["pneumonia", "anatomy_01", str(heart), "pneumonia", "9"],
    ])
    runs = {}
    for flag in ([], ["--eager"]):
        out = tmp_path / ("eager" if flag else "default")
        assert batch("--manifest", manifest, "--out", out, "--model", tiny_model, *STEPS, "--no-quality-check",
                     *flag) == 0
        provenance = {name: json.loads((out / "images" / name / "provenance.json").read_text())
                      for name in ("heart", "pneumonia")}
        assert {p["unet_runtime"] for p in provenance.values()} == {"eager" if flag else "frozen"}
        assert [provenance[n]["anatomy_stage_reused"] for n in ("heart", "pneumonia")] == [False, True]
        runs[bool(flag)] = out
    single = tmp_path / "single"
    assert cli.main(["generate", "--model", str(tiny_model), "--anatomy", str(templates / "anatomy_01.png"),
                     "--pathology-mask", str(heart), "--finding", "pneumonia", "--seed", "9", *STEPS,
                     "--out", str(single)]) == 0
    assert json.loads((single / "provenance.json").read_text())["unet_runtime"] == "eager"
    for out in runs.values():
        np.testing.assert_array_equal(pixels(out / "images" / "pneumonia"), pixels(single))


def test_bad_rows_are_reported_with_their_row_numbers_and_nothing_is_written(tiny_model, templates, tmp_path,
                                                                            capsys):
    lines = [
        "name,anatomy,pathology_masks,findings,seed",
        "ok,anatomy_01,,,1",  # row 2
        f"missing,{tmp_path / 'nowhere.png'},,,1",  # row 3
        f"unknown-finding,anatomy_01,{templates / 'pathology_cardiomegaly.png'},fractured rib,1",  # row 4
        "unknown-template,anatomy_09,,,1",  # row 5
        "ok,anatomy_02,,,2",  # row 6: the name of row 2 again
        "short,anatomy_01,1",  # row 7: too few fields
        f"two-masks,anatomy_01,{templates / 'pathology_cardiomegaly.png'};{templates / 'pathology_cardiomegaly.png'},"
        "cardiomegaly,1",  # row 8: two masks, one finding (reported, and the rows after it still checked)
        'bad,"anatomy_01"x,,,1',  # row 9: malformed quoting
    ]
    manifest = tmp_path / "bad.csv"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert batch("--manifest", manifest, "--out", out, "--model", tiny_model, *STEPS) == 2
    err = capsys.readouterr().err
    assert "bad.csv row 3: nowhere.png does not exist" in err
    assert "bad.csv row 4: This model does not know the finding 'fractured rib'" in err
    assert "bad.csv row 5: 'anatomy_09' names no template" in err
    assert "bad.csv row 6: the name 'ok' is also the name of row 2" in err
    assert "bad.csv row 7: the line has 3 fields but the header has 5" in err
    assert "bad.csv row 8: 2 pathology masks but 1 findings" in err
    assert "bad.csv row 9: malformed CSV line" in err
    assert "row 2:" not in err
    assert "7 manifest rows have problems (listed above); nothing was generated" in err
    listed = [int(line.split("bad.csv row ")[1].split(":")[0]) for line in err.splitlines() if "bad.csv row " in line]
    assert listed == sorted(listed) == [3, 4, 5, 6, 7, 8, 9]  # in the file's order, however they were found
    assert not out.exists()

    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"anatomy": "anatomy_01", "seed": 1}\n{"anatomy": "anatomy_01", "seed": 1,\n'
                     '{"anatomy": "anatomy_01"}\n{"anatomy": "anatomy_01", "seed": 1, "step": 3}\n'
                     '{"name": "deep", "anatomy": "anatomy_01", "seed": 1, "x": ' + "[" * 100000 + "]" * 100000 + '}\n'
                     '{"name": "row\\n", "anatomy": "anatomy_01", "seed": 1}\n')
    assert batch("--manifest", jsonl, "--out", out, "--model", tiny_model, *STEPS) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl row 2: the line is not valid JSON" in err
    assert "bad.jsonl row 3: the seed is missing" in err
    assert "bad.jsonl row 4: unknown keys ['step']" in err
    assert "bad.jsonl row 5: the line is not valid JSON (nested too deeply)" in err
    assert "bad.jsonl row 6: " in err  # a name ending in a newline is no file name
    assert not out.exists()


def test_a_failed_row_is_recorded_the_run_goes_on_and_a_restart_retries_only_it(tiny_model, templates, tmp_path,
                                                                                 monkeypatch, capsys):
    import xreal_engine.generate as generate

    manifest = write_csv(tmp_path / "m.csv", ["name", "anatomy", "pathology_masks", "findings", "seed", "steps"],
                         manifest_rows(templates))
    out = tmp_path / "out"
    real = generate.generate_to_directory

    def failing_for_heart(pipe, prepared, out_dir, **kwargs):
        if Path(out_dir).name == "heart":
            raise RuntimeError("simulated\nfailure")
        return real(pipe, prepared, out_dir, **kwargs)

    monkeypatch.setattr(generate, "generate_to_directory", failing_for_heart)
    assert batch("--manifest", manifest, "--out", out, "--model", tiny_model, *STEPS, "--no-quality-check") == 1
    assert "2 of 3 rows finished" in capsys.readouterr().out
    assert failures(out) == [{"row": "3", "name": "heart", "kind": "failed", "reason": "RuntimeError: simulated failure"}]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["plain", "three-steps"]
    assert json.loads((out / "dataset.json").read_text())["counts"]["failed"] == 1
    finished_before = {p.parent.name: p.stat().st_mtime_ns for p in (out / "images").glob("*/provenance.json")}

    monkeypatch.setattr(generate, "generate_to_directory", real)
    assert batch("--manifest", manifest, "--out", out, "--model", tiny_model, *STEPS, "--no-quality-check") == 0
    assert failures(out) == []
    assert sorted(p.name for p in (out / "images").iterdir()) == ["heart", "plain", "three-steps"]
    for name, mtime in finished_before.items():  # the finished rows were not made again
        assert (out / "images" / name / "provenance.json").stat().st_mtime_ns == mtime
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["counts"]["finished"] == 3 and summary["last_run"]["attempted"] == 1


def test_a_restart_must_ask_for_the_same_rows(tiny_model, templates, tmp_path, capsys):
    manifest = write_csv(tmp_path / "m.csv", ["name", "anatomy", "pathology_masks", "findings", "seed", "steps"],
                         manifest_rows(templates)[:1])
    out = tmp_path / "out"
    assert batch("--manifest", manifest, "--out", out, "--model", tiny_model, *STEPS, "--no-quality-check") == 0
    assert batch("--manifest", manifest, "--out", out, "--model", tiny_model, "--steps", "3", "--device", "cpu",
                 "--no-quality-check") == 2
    assert ("was planned with other settings for 1 row(s) (first: row 2, 'plain': steps 2 before, 3 now)"
            in capsys.readouterr().err)
    # finished images are not checked again: the quality check cannot be switched on half-way
    assert batch("--manifest", manifest, "--out", out, "--model", tiny_model, *STEPS) == 2
    assert "made without the quality check, which are not checked again; run the same command again (not " \
           "--quality-check)" in capsys.readouterr().err
    from xreal_engine.model.random_model import create_random_model

    other_model = create_random_model(tmp_path / "other-model", preset="tiny", seed=1)
    assert batch("--manifest", manifest, "--out", out, "--model", other_model, *STEPS, "--no-quality-check") == 2
    assert "was made with the model random-tiny-seed0 (other weights)" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("mine")
    assert batch("--manifest", manifest, "--out", tmp_path / "other", "--model", tiny_model, *STEPS) == 2
    assert "is not empty and was not made by generate-batch" in capsys.readouterr().err


def test_min_dice_drops_and_records_images_that_do_not_follow_the_anatomy(tiny_model, templates, tmp_path):
    manifest = write_csv(tmp_path / "m.csv", ["name", "anatomy", "pathology_masks", "findings", "seed", "steps"],
                         manifest_rows(templates)[:2])
    out = tmp_path / "out"
    # A random model follows no anatomy: no Dice reaches 1.
    assert batch("--manifest", manifest, "--out", out, "--model", tiny_model, *STEPS, "--min-dice", "1",
                 "--format", "monai") == 1
    entries = failures(out)
    assert [(e["row"], e["name"], e["kind"]) for e in entries] == [("2", "plain", "dropped"), ("3", "heart", "dropped")]
    assert all(e["reason"].startswith("anatomy not followed: Dice ") and "below --min-dice 1" in e["reason"]
               for e in entries)
    assert not any((out / "images").iterdir())
    assert json.loads((out / "datalist.json").read_text())["numTraining"] == 0
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["counts"]["dropped"] == 2 and summary["quality"]["min_dice"] == 1.0


def test_from_templates_design_is_balanced_and_uses_the_evaluation_edits(tiny_model, templates, tmp_path):
    info = ModelInfo.load(tiny_model)
    design = Design(templates=None, findings=["cardiomegaly", "pneumonia", "none"], seeds=list(range(4)),
                    heart_scales=(1.0, 1.25), lung_widths=(1.0, 0.8))
    rows, files = plan_design(design, info, templates, tmp_path / "inputs", {"steps": 2})
    assert len(rows) == 5 * 4 * 3 * 4 and len({row.name for row in rows}) == len(rows)
    first_seed = rows[: 5 * 4 * 3]
    assert {row.seed for row in first_seed} == {0}  # seed first: a run stopped early is still balanced
    assert sum(row.design["finding"] == "cardiomegaly" for row in first_seed) == 5 * 4
    edited = [row for row in rows if row.name == "anatomy_01-heart1.25-cardiomegaly-s000002"][0]
    assert edited.design == {"template": "anatomy_01", "finding": "cardiomegaly", "heart_scale": 1.25,
                             "lung_width": 1.0}
    import io

    heart = np.asarray(Image.open(io.BytesIO(files[Path(edited.anatomy)]))) == 3
    template_heart = np.asarray(Image.open(templates / "anatomy_01.png")) == 3
    assert 1.4 < heart.sum() / template_heart.sum() < 1.7  # 1.25 squared
    region = np.asarray(Image.open(io.BytesIO(files[Path(edited.pathologies[0][0])]))) > 0
    assert (region & heart).sum() == heart.sum()  # the cardiomegaly region surrounds the enlarged heart

    out = tmp_path / "out"
    assert batch("--from-templates", "anatomy_01,anatomy_03", "--findings", "cardiomegaly,none", "--seeds", "7",
                 "--heart-scales", "1,1.25", "--out", out, "--model", tiny_model, *STEPS, "--no-quality-check") == 0
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == sorted(f"anatomy_0{t}{h}-{f}-s000007" for t in (1, 3) for h in ("", "-heart1.25")
                           for f in ("cardiomegaly", "none"))
    assert sorted(p.name for p in (out / "inputs").iterdir()) == [
        "anatomy_01-heart1.25.png", "anatomy_01-heart1.25__cardiomegaly.png", "anatomy_01__cardiomegaly.png",
        "anatomy_03-heart1.25.png", "anatomy_03-heart1.25__cardiomegaly.png", "anatomy_03__cardiomegaly.png"]


def test_a_design_output_directory_moved_elsewhere_still_resumes(tiny_model, tmp_path, monkeypatch):
    """The plan names the design's generated masks relative to OUT: a moved or copied OUT resumes, and a
    relative --out (as a user types it) resumes from another spelling of the same directory."""
    monkeypatch.chdir(tmp_path)
    design = ["--from-templates", "anatomy_01", "--findings", "cardiomegaly", "--heart-scales", "1.25",
              "--model", tiny_model, *STEPS, "--no-quality-check"]
    assert batch(*design, "--seeds", "7", "--out", "first", "--format", "monai") == 0
    plan = (tmp_path / "first" / "plan.jsonl").read_text()
    assert str(tmp_path) not in plan and '"inputs/anatomy_01-heart1.25.png"' in plan
    made = pixels(tmp_path / "first" / "images" / "anatomy_01-heart1.25-cardiomegaly-s000007")
    (tmp_path / "first").rename(tmp_path / "moved")
    assert batch(*design, "--seeds", "7:9", "--out", tmp_path / "moved") == 0  # one more seed, the first kept
    images = tmp_path / "moved" / "images"
    assert sorted(p.name for p in images.iterdir()) == [
        "anatomy_01-heart1.25-cardiomegaly-s000007", "anatomy_01-heart1.25-cardiomegaly-s000008"]
    assert np.array_equal(pixels(images / "anatomy_01-heart1.25-cardiomegaly-s000007"), made)
    summary = json.loads((tmp_path / "moved" / "dataset.json").read_text())
    assert summary["counts"]["finished"] == 2 and summary["counts"]["rows"] == 2, summary["counts"]
    # the restart gave no --format: the MONAI export made before is kept up to date, not left stale
    assert summary["formats"] == ["results", "monai"]
    assert json.loads((tmp_path / "moved" / "datalist.json").read_text())["numTraining"] == 2


def test_design_refusals_name_the_option(tiny_model, tmp_path, capsys):
    common = ["--out", tmp_path / "out", "--model", tiny_model, *STEPS]
    assert batch("--from-templates", "--findings", "fracture", "--seeds", "0:2", *common) == 2
    assert "does not know the finding 'fracture'" in capsys.readouterr().err
    assert batch("--from-templates", "anatomy_77", "--seeds", "0:2", *common) == 2
    assert "--from-templates: no template anatomy_77" in capsys.readouterr().err
    assert batch("--from-templates", "--seeds", "a:b", *common) == 2
    assert "--seeds must be START:STOP" in capsys.readouterr().err
    assert batch("--from-templates", *common) == 2
    assert "--from-templates needs --seeds" in capsys.readouterr().err
    # a value given twice would make two rows of one name: one image, counted twice
    for option, value, repeated in (("--from-templates", "anatomy_01,anatomy_01", "anatomy_01"),
                                    ("--seeds", "1,1", "1"), ("--findings", "Pneumonia,pneumonia", "pneumonia"),
                                    ("--heart-scales", "1.25,1.25", "1.25")):
        args = [option, value] if option == "--from-templates" else ["--from-templates", option, value]
        assert batch(*args, *(["--seeds", "0:2"] if option != "--seeds" else []), *common) == 2, option
        assert f"{option} gives {repeated} twice; list each value once" in capsys.readouterr().err, option
    assert not (tmp_path / "out").exists()


def test_the_model_is_loaded_once_per_worker(tiny_model, templates, tmp_path, monkeypatch):
    import xreal_engine.model.loading as loading

    loads = []
    real = loading.load_pipeline
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: loads.append(a) or real(*a, **k))
    assert batch("--from-templates", "anatomy_01", "--seeds", "0:4", "--out", tmp_path / "out", "--model",
                 tiny_model, *STEPS, "--no-quality-check") == 0
    assert len(loads) == 1 and len(list((tmp_path / "out" / "images").iterdir())) == 4


def test_accelerate_backend_in_one_process_runs_every_row(tiny_model, tmp_path):
    out = tmp_path / "out"
    assert batch("--from-templates", "anatomy_01", "--seeds", "0:2", "--backend", "accelerate", "--out", out,
                 "--model", tiny_model, *STEPS, "--no-quality-check") == 0
    assert len(list((out / "images").iterdir())) == 2
    assert json.loads((out / "dataset.json").read_text())["last_run"]["backend"] == "accelerate"


def test_ray_backend_without_ray_says_how_to_install_it(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert batch("--from-templates", "--seeds", "0:2", "--backend", "ray", "--out", tmp_path / "out",
                 "--model", tiny_model) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["xreal-engine generate-batch: error: --backend ray needs Ray, which is not installed: "
                   "pip install 'xreal-engine[ray]'"]


def _run_batch_process(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "xreal_engine.cli", "generate-batch", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow  # starts and kills processes
def test_a_killed_run_restarted_with_the_same_command_skips_finished_rows_and_never_duplicates(tiny_model, tmp_path):
    out = tmp_path / "out"
    args = ["--from-templates", "anatomy_01,anatomy_02", "--seeds", "0:3", "--out", out, "--model", tiny_model,
            "--steps", "30", "--device", "cpu", "--threads", "1", "--format", "monai"]  # ~1 s a row: time to kill
    process = _run_batch_process(*args)
    deadline = time.monotonic() + 300
    try:
        while not list((out / "images").glob("*/provenance.json")):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    visible = [p for p in (out / "images").iterdir() if not p.name.startswith(".")]
    assert 1 <= len(visible) < 6
    assert all((p / "provenance.json").is_file() and (p / "sc.dcm").is_file() for p in visible)  # none half-written
    first = {p.name: (p / "provenance.json").stat().st_mtime_ns for p in visible}
    assert json.loads((out / "dataset.json").read_text())["last_run"]["running"]  # the model is on record already

    restarted = _run_batch_process(*args)
    stdout, stderr = restarted.communicate(timeout=600)
    assert restarted.returncode == 0, stderr
    assert "6 of 6 rows finished" in stdout
    results = sorted(p.name for p in (out / "images").iterdir())
    assert results == sorted(f"anatomy_0{t}-none-s00000{s}" for t in (1, 2) for s in range(3))  # no leftovers
    for name, mtime in first.items():
        assert (out / "images" / name / "provenance.json").stat().st_mtime_ns == mtime
    datalist = json.loads((out / "datalist.json").read_text())
    assert sorted(item["name"] for item in datalist["training"]) == results
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["last_run"]["attempted"] == 6 - len(first)
    assert not [p for p in out.rglob(".*") if p.name != ".lock"]


@pytest.mark.slow  # starts worker processes
def test_two_local_worker_processes_make_the_same_images(tiny_model, tmp_path):
    args = ["--from-templates", "anatomy_01", "--findings", "cardiomegaly,none", "--seeds", "0:2", "--model",
            tiny_model, *STEPS, "--threads", "1"]
    assert batch(*args, "--out", tmp_path / "one") == 0
    pool = _run_batch_process(*args, "--workers", "2", "--out", tmp_path / "two")
    stdout, stderr = pool.communicate(timeout=600)
    assert pool.returncode == 0, stderr
    names = sorted(p.name for p in (tmp_path / "one" / "images").iterdir())
    assert len(names) == 4 and names == sorted(p.name for p in (tmp_path / "two" / "images").iterdir())
    for name in names:
        assert np.array_equal(pixels(tmp_path / "one" / "images" / name), pixels(tmp_path / "two" / "images" / name))
        quality = [json.loads((tmp_path / run / "images" / name / "provenance.json").read_text())["quality"]
                   for run in ("one", "two")]
        assert quality[0] == quality[1]
    assert json.loads((tmp_path / "two" / "dataset.json").read_text())["last_run"]["workers"] == 2



@pytest.mark.slow  # starts two processes that talk over gloo
def test_accelerate_backend_splits_the_rows_between_two_cpu_processes(tiny_model, tmp_path):
    args = ["--from-templates", "anatomy_01", "--seeds", "0:5", "--model", tiny_model, *STEPS, "--threads", "1",
            "--no-quality-check"]
    assert batch(*args, "--out", tmp_path / "local") == 0
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "xreal_engine.cli",
         "generate-batch", *map(str, args), "--backend", "accelerate", "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("5 of 5 rows finished") == 1  # the main process reports, once
    names = sorted(p.name for p in (tmp_path / "local" / "images").iterdir())
    assert len(names) == 5 and names == sorted(p.name for p in (tmp_path / "two" / "images").iterdir())
    for name in names:
        assert np.array_equal(pixels(tmp_path / "local" / "images" / name), pixels(tmp_path / "two" / "images" / name))
    last_run = json.loads((tmp_path / "two" / "dataset.json").read_text())["last_run"]
    assert last_run["workers"] == 2 and last_run["attempted"] == 5  # each row made by one of the two


def test_manifest_rows_carry_controls_in_csv_and_jsonl_alike(tmp_path, capsys):
    """``controls``: CSV ``;``-separated ``NAME[:FILE][:SCALE]``, JSONL strings or {"name", "file", "scale"};
    the same request makes the same pixels, provenance names each control, a bad one names its row."""
    from xreal_engine.model.random_model import create_random_model

    model = create_random_model(tmp_path / "controlled", preset="tiny", controlnets=("sobel", "attention"))
    size = ModelInfo.load(model).image_size
    y, x = np.mgrid[0:size, 0:size]
    Image.fromarray((127 + 100 * np.sin(x / 4.0) * np.cos(y / 6.0)).astype(np.uint8)).save(tmp_path / "ref.png")
    (tmp_path / "fix.csv").write_text("x,y,duration\n20,20,0.5\n30,28,0.3\n")
    header = ["name", "anatomy", "seed", "controls", "control_stages"]
    csv_manifest = write_csv(tmp_path / "m.csv", header, [
        ["steered", "anatomy_01", "3", "sobel:ref.png:0.5;attention:fix.csv", "anatomy"],
        ["free", "anatomy_01", "3", "", ""]])
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"name": "steered", "anatomy": "anatomy_01", "seed": 3, "control_stages": "anatomy",
                                 "controls": [{"name": "sobel", "file": "ref.png", "scale": 0.5}, "attention:fix.csv"]})
                     + "\n")
    assert batch("--manifest", csv_manifest, "--out", tmp_path / "a", "--model", model, *STEPS,
                 "--no-quality-check", "--format", "monai,imagefolder,nnunet") == 0  # exports skip the attention region
    # The exports say how each image was steered, so a training framework can select by it.
    datalist = {item["name"]: item for item in json.loads((tmp_path / "a" / "datalist.json").read_text())["training"]}
    expected = [{"name": "sobel", "scale": 0.5, "stages": "anatomy", "source": "ref.png"},
                {"name": "attention", "scale": 1.0, "stages": "anatomy", "source": "fix.csv"}]
    assert datalist["steered"]["controls"] == expected and datalist["free"]["controls"] == []
    assert datalist["steered"]["sampler"] == "ddim" and datalist["steered"]["steps"] == int(STEPS[1])
    lines = (tmp_path / "a" / "imagefolder" / "train" / "metadata.jsonl").read_text().splitlines()
    metadata = {json.loads(line)["name"]: json.loads(line) for line in lines}
    assert metadata["steered"]["controls"] == expected and metadata["free"]["controls"] == []
    for name in ("steered", "free"):
        assert (tmp_path / "a" / "labels" / f"{name}.png").is_file() and (tmp_path / "a" / "findings" / f"{name}.png").is_file()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "labels" / "steered.png")),
                          np.asarray(Image.open(tmp_path / "a" / "labels" / "free.png")))  # the attention is no label
    assert batch("--manifest", jsonl, "--out", tmp_path / "b", "--model", model, *STEPS, "--no-quality-check") == 0
    steered = tmp_path / "a" / "images" / "steered"
    assert np.array_equal(pixels(steered), pixels(tmp_path / "b" / "images" / "steered"))
    assert not np.array_equal(pixels(steered), pixels(tmp_path / "a" / "images" / "free"))
    provenance = json.loads((steered / "provenance.json").read_text())
    assert [(c["name"], c["source"], c["scale"], c["stages"]) for c in provenance["controls"]] == [
        ("sobel", "ref.png", 0.5, "anatomy"), ("attention", "fix.csv", 1.0, "anatomy")]
    assert json.loads((tmp_path / "a" / "images" / "free" / "provenance.json").read_text())["controls"] == []

    bad = write_csv(tmp_path / "bad.csv", header, [["canny", "anatomy_01", "1", "canny:ref.png", ""],
                                                   ["strong", "anatomy_01", "2", "sobel:ref.png:2.01", ""],
                                                   ["missing", "anatomy_01", "3", "attention:nowhere.csv", ""]])
    capsys.readouterr()
    assert batch("--manifest", bad, "--out", tmp_path / "c", "--model", model, *STEPS) == 2
    err = capsys.readouterr().err
    assert "row 2:" in err and "canny" in err and "row 3:" in err and "2.01" in err and "row 4:" in err
    assert not (tmp_path / "c").exists()
