"""`generate-batch --backend ray`: a 6-row manifest on a local Ray instance with 2 CPU actors makes, pixel for
pixel, the images of the local backend (the same seeds), and records the same quality figures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from xreal_engine import cli

ray = pytest.importorskip("ray", reason="Ray is the optional extra: pip install 'xreal-engine[ray]'")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from xreal_engine.model.random_model import create_random_model

    return create_random_model(tmp_path_factory.mktemp("model") / "tiny", preset="tiny")


@pytest.mark.slow  # starts a Ray instance and two actor processes
def test_ray_backend_with_two_actors_equals_the_local_backend(tiny_model, tmp_path):
    manifest = tmp_path / "six.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "anatomy", "pathology_masks", "findings", "seed"])
        for number, template in enumerate(("anatomy_01", "anatomy_02", "anatomy_03")):
            writer.writerow([f"{template}-plain", template, "", "", 10 + number])
            writer.writerow([f"{template}-heart", template, "pathology_cardiomegaly", "cardiomegaly", 20 + number])
    common = ["generate-batch", "--manifest", str(manifest), "--model", str(tiny_model), "--steps", "3",
              "--device", "cpu", "--threads", "1", "--format", "monai"]
    assert cli.main([*common, "--out", str(tmp_path / "local")]) == 0

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert cli.main([*common, "--out", str(tmp_path / "ray"), "--backend", "ray", "--workers", "2"]) == 0
    finally:
        ray.shutdown()

    names = sorted(p.name for p in (tmp_path / "local" / "images").iterdir())
    assert len(names) == 6 and names == sorted(p.name for p in (tmp_path / "ray" / "images").iterdir())
    for name in names:
        local, remote = tmp_path / "local" / "images" / name, tmp_path / "ray" / "images" / name
        assert np.array_equal(pydicom.dcmread(local / "sc.dcm").pixel_array, pydicom.dcmread(remote / "sc.dcm").pixel_array)
        assert np.array_equal(np.asarray(Image.open(local / "preview.png")), np.asarray(Image.open(remote / "preview.png")))
        provenance = [json.loads((d / "provenance.json").read_text()) for d in (local, remote)]
        assert provenance[0]["quality"] == provenance[1]["quality"]
        assert provenance[0]["seed"] == provenance[1]["seed"]
    summary = json.loads((tmp_path / "ray" / "dataset.json").read_text())
    assert summary["counts"]["finished"] == 6
    assert summary["last_run"]["backend"] == "ray" and summary["last_run"]["workers"] == 2
    datalists = [json.loads((tmp_path / run / "datalist.json").read_text())["training"] for run in ("local", "ray")]
    assert [item["name"] for item in datalists[0]] == [item["name"] for item in datalists[1]]  # plan order
