"""What a data-set run meets outside a checkout: a disk that fills during generate-batch (one sentence, the
finished rows kept, a re-run resumes), the templates from a real wheel installed without the repository,
and ``generate --quality-check / --min-dice`` for single images (the batch's check, the same flags)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xreal_engine import cli

STEPS = ["--steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from xreal_engine.model.random_model import create_random_model

    return create_random_model(tmp_path_factory.mktemp("model") / "tiny", preset="tiny")


def run(*args) -> int:
    return cli.main([*map(str, args)])


def write_manifest(path: Path, names: list) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "anatomy", "seed"])
        writer.writerows([name, "anatomy_01", k] for k, name in enumerate(names))
    return path


def used_bytes(folder: Path) -> int:
    """Bytes a tmpfs charges for the files (whole pages) below ``folder``."""
    return sum(-(-path.stat().st_size // 4096) * 4096 for path in folder.rglob("*") if path.is_file())


@contextlib.contextmanager
def small_disk(where: Path, size_bytes: int):
    """A tmpfs of ``size_bytes`` at ``where`` (a real full disk); skips where mounting is not allowed."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("a small tmpfs cannot be mounted here (needs root); the full-disk run is not tested")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_sentence_keeps_finished_rows_and_a_rerun_resumes(tiny_model, tmp_path,
                                                                                             capsys):
    names = ["r1", "r2", "r3", "r4"]
    manifest = write_manifest(tmp_path / "rows.csv", names)
    probe = tmp_path / "probe"  # how much one row takes
    assert run("generate-batch", "--manifest", write_manifest(tmp_path / "one.csv", ["r1"]), "--out", probe,
               "--model", tiny_model, *STEPS, "--no-quality-check") == 0
    row_bytes = used_bytes(probe / "images" / "r1")
    with small_disk(tmp_path / "disk", 64 * 1024 * 1024) as disk:
        out = disk / "out"
        filler = disk / "filler"
        # room for the run's own files and one and a half rows: the second row finds the disk full
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        filler.write_bytes(b"\0" * (free - 64 * 1024 - int(1.5 * row_bytes)))
        capsys.readouterr()
        assert run("generate-batch", "--manifest", manifest, "--out", out, "--model", tiny_model, *STEPS,
                   "--no-quality-check") == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("xreal-engine generate-batch: error: generate-batch stopped at row 3 ('r2')"), error
        assert "the disk is full" in error and "1 of 4 rows are finished and kept" in error, error
        assert (out / "images" / "r1" / "provenance.json").is_file()
        finished = sorted(path.name for path in (out / "images").iterdir())
        assert finished == ["r1"], "nothing half-written is left, no staging directory"
        assert not (out / "failures.csv").exists(), "a full disk is not a failure of each row"
        kept = (out / "images" / "r1" / "sc.dcm").stat().st_ino

        filler.unlink()  # space again: the same command goes on where it stopped
        assert run("generate-batch", "--manifest", manifest, "--out", out, "--model", tiny_model, *STEPS,
                   "--no-quality-check") == 0
        assert sorted(path.name for path in (out / "images").iterdir()) == names
        assert (out / "images" / "r1" / "sc.dcm").stat().st_ino == kept, "a finished row is not made again"
        summary = json.loads((out / "dataset.json").read_text())
        assert summary["counts"]["finished"] == 4 and summary["counts"]["failed"] == 0


@pytest.mark.slow
def test_generate_batch_from_templates_works_from_an_installed_wheel(tiny_model, repo_dir, tmp_path):
    """A real ``pip wheel`` of a copy of the sources, installed with --target and run outside the checkout."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE.txt"):
        shutil.copy2(repo_dir / name, source / name)
    shutil.copytree(repo_dir / "Resources" / "Templates", source / "Resources" / "Templates")
    shutil.copytree(repo_dir / "xreal_engine", source / "xreal_engine", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert (source / "xreal_engine" / "templates").is_symlink(), "the package's templates are a link, one copy"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("xreal_engine-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True,
                   capture_output=True, cwd=tmp_path)
    installed = tmp_path / "site" / "xreal_engine" / "templates"
    assert not installed.is_symlink() and (installed / "anatomy_01.png").is_file()
    assert not list(installed.glob("*.py")), "the templates' maintenance script is not installed"

    environment = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import xreal_engine; print(xreal_engine.__file__)"],
                           env=environment, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(tmp_path / "site")), "the wheel, not the checkout, is imported"
    done = subprocess.run([sys.executable, "-m", "xreal_engine.cli", "generate-batch", "--from-templates",
                           "anatomy_02", "--seeds", "0:1", "--out", str(tmp_path / "out"), "--model", str(tiny_model),
                           *STEPS, "--no-quality-check"], env=environment, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "plan.jsonl").read_text().splitlines()]
    assert [row["design"]["template"] for row in rows] == ["anatomy_02"]
    assert rows[0]["anatomy"].startswith(str(installed)), "the template came from the installed package"


def test_generate_quality_check_and_min_dice_for_one_image(tiny_model, repo_dir, tmp_path, capsys):
    anatomy = repo_dir / "Resources" / "Templates" / "anatomy_01.png"
    common = ["generate", "--model", tiny_model, "--anatomy", anatomy, "--seed", "1", *STEPS]
    assert run(*common, "--out", tmp_path / "checked", "--quality-check") == 0
    printed = capsys.readouterr().out
    quality = json.loads((tmp_path / "checked" / "provenance.json").read_text())["quality"]
    assert set(quality["anatomy_dice"]) == {"left lung", "right lung", "heart"}
    assert quality["segmenter"].startswith("small-128px-")
    assert "anatomy followed: Dice " in printed
    assert run(*common, "--out", tmp_path / "plain") == 0  # off unless asked: the default output is unchanged
    assert "quality" not in json.loads((tmp_path / "plain" / "provenance.json").read_text())

    capsys.readouterr()
    assert run(*common, "--out", tmp_path / "refused", "--min-dice", "1") == 1  # implies the check; nobody scores 1
    assert "the image was not written: anatomy not followed" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
    assert run(*common, "--out", tmp_path / "range", "--min-dice", "1.5") == 2
    assert "--min-dice must be from 0 to 1, not 1.5" in capsys.readouterr().err
    assert run(*common, "--out", tmp_path / "both", "--min-dice", "0.5", "--no-quality-check") == 2
    assert "--min-dice needs the quality check" in capsys.readouterr().err
