"""generate-batch refuses bad input in one sentence before it writes anything, and never lets one row's or
one value's problem stand for another's: per-row seeds, a seed range counted without building it, design
factors that differ only far behind the point, every flag before OUT is touched, a repeated CSV column, and
a resumed directory whose finished images were held to another --min-dice."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from xreal_engine import cli
from xreal_engine.batch.designs import MAX_ROWS, Design, parse_seeds, plan_design
from xreal_engine.batch.manifest import check_rows, read_manifest
from xreal_engine.errors import InputError
from xreal_engine.model.info import ModelInfo
from xreal_engine.model.loading import usable_cores

STEPS = ["--steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from xreal_engine.model.random_model import create_random_model

    return create_random_model(tmp_path_factory.mktemp("model") / "tiny", preset="tiny")


@pytest.fixture()
def templates(repo_dir) -> Path:
    return repo_dir / "Resources" / "Templates"


def batch(*args) -> int:
    return cli.main(["generate-batch", *map(str, args)])


def test_a_bad_seed_is_only_its_own_rows_problem(tiny_model, tmp_path, capsys):
    """Rows that share an anatomy share one reading of it, but each seed is its own row's: both ends pass."""
    manifest = tmp_path / "seeds.csv"
    manifest.write_text("name,anatomy,seed\n"
                        "low,anatomy_01,-1\n"  # row 2: below the range, checked first
                        "zero,anatomy_01,0\n"  # rows 3-5: the range's ends, and 1000 written as 1e3
                        "top,anatomy_01,4294967295\n"
                        "thousand,anatomy_01,1e3\n"
                        "high,anatomy_01,4294967296\n")  # row 6: above the range
    rows, problems = read_manifest(manifest)
    assert problems == []
    problems = check_rows(rows, ModelInfo.load(tiny_model))
    assert [problem.split(":")[0] for problem in problems] == ["row 2", "row 6"], problems
    assert "got -1." in problems[0] and "got 4294967296." in problems[1]

    out = tmp_path / "out"
    assert batch("--manifest", manifest, "--out", out, "--model", tiny_model, *STEPS) == 2
    err = capsys.readouterr().err
    assert "seeds.csv row 2: The seed ('seed') must be a whole number from 0 to 4294967295; got -1." in err
    assert "seeds.csv row 6: The seed" in err and "got 4294967296." in err
    assert not any(f"row {n}:" in err for n in (3, 4, 5)), err
    assert "2 manifest rows have problems" in err
    assert not out.exists()


def test_a_seed_range_is_counted_before_it_is_built(tiny_model, tmp_path, capsys):
    started = time.monotonic()
    assert batch("--from-templates", "anatomy_01", "--seeds", "0:4294967295", "--out", tmp_path / "out",
                 "--model", tiny_model, *STEPS) == 2
    err = capsys.readouterr().err
    assert f"--seeds '0:4294967295' gives 4294967295 seeds; at most {MAX_ROWS} rows are possible." in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(InputError, match="gives 10000000000000000000000000 seeds"):  # len() would overflow
        parse_seeds("0:10000000000000000000000000")
    # both ends: MAX_ROWS seeds, and a range ending at the highest seed, are taken (as ranges, not lists)
    assert len(parse_seeds(f"0:{MAX_ROWS}")) == MAX_ROWS
    with pytest.raises(InputError, match=f"gives {MAX_ROWS + 1} seeds"):
        parse_seeds(f"0:{MAX_ROWS + 1}")
    assert list(parse_seeds("4294967293:4294967296")) == [4294967293, 4294967294, 4294967295]
    with pytest.raises(InputError, match="got 4294967296"):
        parse_seeds("4294967293:4294967297")
    # the design's product is checked before a row is built: two templates x MAX_ROWS seeds
    info = ModelInfo.load(tiny_model)
    with pytest.raises(InputError, match=f"The design has {2 * MAX_ROWS} rows; at most {MAX_ROWS}"):
        plan_design(Design(templates=["anatomy_01", "anatomy_02"], findings=["none"],
                           seeds=parse_seeds(f"0:{MAX_ROWS}")), info, None, tmp_path / "inputs", {})
    assert time.monotonic() - started < 30  # nothing of ten million rows was made
    assert not (tmp_path / "out").exists() and not (tmp_path / "inputs").exists()


def test_design_factors_that_differ_far_behind_the_point_make_rows_of_their_own(tiny_model, templates, tmp_path,
                                                                              capsys):
    info = ModelInfo.load(tiny_model)
    design = Design(templates=["anatomy_01"], findings=["none"], seeds=[0], heart_scales=(1.0000001, 1.0000002, 1.25),
                    lung_widths=(1.0, 0.9))
    rows, files = plan_design(design, info, templates, tmp_path / "inputs", {})
    names = [row.name for row in rows]
    assert len(set(names)) == len(rows) == len(files) == 6  # six anatomies, each edited and written
    assert "anatomy_01-heart1.0000001-none-s000000" in names and "anatomy_01-heart1.0000002-none-s000000" in names
    assert "anatomy_01-heart1.25-lungs0.9-none-s000000" in names  # short factors keep their short names
    assert batch("--from-templates", "anatomy_01", "--seeds", "0", "--heart-scales", "1,1.0", "--out",
                 tmp_path / "out", "--model", tiny_model, *STEPS) == 2  # one value written twice
    assert "--heart-scales gives 1.0 twice; list each value once." in capsys.readouterr().err


@pytest.mark.parametrize("flags, sentence", [
    (["--threads", "999"], "--threads 999 is more than the"),
    (["--threads", str(usable_cores() + 1)], f"give 1 to {usable_cores()}"),
    (["--segmenter", "/nonexist"], "/nonexist holds no segmenter"),
])
def test_every_flag_is_checked_before_the_output_directory_is_touched(tiny_model, tmp_path, capsys, flags, sentence):
    out = tmp_path / "out"
    assert batch("--from-templates", "anatomy_01", "--seeds", "0", "--out", out, "--model", tiny_model, *STEPS,
                 *flags) == 2
    err = capsys.readouterr().err
    assert sentence in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # no plan.jsonl, dataset.json, images/ or .lock: a corrected run starts afresh


def test_a_repeated_csv_column_is_refused_by_name(tiny_model, tmp_path, capsys):
    manifest = tmp_path / "twice.csv"
    manifest.write_text("name,anatomy,seed,seed\na,anatomy_01,1,2\n")
    assert batch("--manifest", manifest, "--out", tmp_path / "out", "--model", tiny_model, *STEPS) == 2
    assert "twice.csv row 1: the column 'seed' appears twice in the header; give each column once." in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_resumed_directory_keeps_the_min_dice_its_finished_images_were_held_to(tiny_model, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("name,anatomy,seed\nplain,anatomy_01,3\n")
    out = tmp_path / "out"
    common = ["--manifest", manifest, "--out", out, "--model", tiny_model, *STEPS]
    assert batch(*common) == 0  # checked, no minimum
    before = (out / "dataset.json").read_text()
    for value in ("0.95", "0"):  # either end of the range: the finished image was held to neither
        assert batch(*common, "--min-dice", value) == 2
        err = capsys.readouterr().err
        assert f"holds 1 finished image(s) made with no --min-dice, which are not checked again; give the same " \
               f"setting (not {float(value):g})" in err, err
    assert (out / "dataset.json").read_text() == before
    assert json.loads(before)["quality"]["min_dice"] is None
    assert batch(*common) == 0  # the same setting resumes


def test_a_restart_refuses_a_finished_rows_input_file_that_was_rewritten(tiny_model, templates, tmp_path, capsys):
    """The plan names files; one rewritten in place (another anatomy under the same name) would mix two
    datasets. Its finished image's provenance records the sha256 it was made from."""
    import shutil

    anatomy = tmp_path / "a.png"
    shutil.copyfile(templates / "anatomy_01.png", anatomy)
    manifest = tmp_path / "m.csv"
    manifest.write_text("name,anatomy,seed\nr1,a.png,1\n")
    out = tmp_path / "out"
    assert batch("--manifest", manifest, "--out", out, "--model", tiny_model, *STEPS, "--no-quality-check") == 0
    manifest.write_text("name,anatomy,seed\nr1,a.png,1\nr2,a.png,2\n")
    shutil.copyfile(templates / "anatomy_02.png", anatomy)  # another anatomy, same name
    capsys.readouterr()
    assert batch("--manifest", manifest, "--out", out, "--model", tiny_model, *STEPS, "--no-quality-check") == 2
    err = capsys.readouterr().err
    assert "Row 2 ('r1') is finished, but its anatomy map a.png has changed since its image was made" in err, err
    assert not (out / "images" / "r2").exists()
    shutil.copyfile(templates / "anatomy_01.png", anatomy)  # put back: the restart goes on
    assert batch("--manifest", manifest, "--out", out, "--model", tiny_model, *STEPS, "--no-quality-check") == 0
    assert (out / "images" / "r2" / "provenance.json").is_file()
