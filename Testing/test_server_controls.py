"""Controls through the service over real HTTP on loopback: ``xreal-engine serve`` in a subprocess with a tiny
random model that has sobel and attention ControlNets; the stdlib client, ``xreal-engine submit`` and raw
multipart requests send controls (a reference X-ray and a fixation CSV as uploads) and bad ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_server_service import (TOKEN, anatomy_array, final, multipart, png_bytes, raw_request,  # noqa: F401
                                 region_array, save_png, start_engine, stop_engine, wait_until_ready)
from xreal_engine import cli
from xreal_engine.client import EngineClient

FIXATIONS = b"x,y,duration\n40,30,0.6\n42,34,0.4\n"


@pytest.fixture(scope="module")
def controlled_model(tmp_path_factory) -> Path:
    from xreal_engine.model.random_model import create_random_model

    return create_random_model(tmp_path_factory.mktemp("model") / "tiny-controls",
                               controlnets=("sobel", "attention"), controlnet_init="random")


@pytest.fixture(scope="module")
def files(controlled_model, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("control-inputs")
    y, x = np.mgrid[0:64, 0:64]
    reference = (np.clip(0.5 + 0.3 * np.sin(x / 5.0) * np.cos(y / 7.0), 0, 1) * 255).astype(np.uint8)
    fixations = folder / "fix.csv"
    fixations.write_bytes(FIXATIONS)
    return {"anatomy": save_png(folder / "anatomy.png", anatomy_array(64)),
            "region": save_png(folder / "region.png", region_array(64)),
            "ref": save_png(folder / "ref.png", reference), "fix": fixations}


@pytest.fixture(scope="module")
def engine(controlled_model, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("engine-controls") / "data"
    process, url = start_engine(controlled_model, data_dir, token=TOKEN)
    client = EngineClient(url, token=TOKEN, timeout=60)
    try:
        wait_until_ready(client)
        yield {"url": url, "client": client, "data_dir": data_dir}
    finally:
        stop_engine(process)


def test_info_lists_the_controlnets_and_the_scale_range(engine):
    info = engine["client"].info()
    assert info["controlnets"] == {"sobel": 1.0, "attention": 1.0}
    assert info["limits"]["control_scale"] == [0.0, 2.0]
    assert info["choices"]["control_stages"] == ["anatomy", "pathology", "both"]


def test_client_submit_with_controls_records_them_in_provenance_and_seg(engine, files, tmp_path):
    client = engine["client"]
    job = client.submit(files["anatomy"], [(files["region"], "cardiomegaly")], seed=5, steps=3,
                        controls=[("sobel", files["ref"], 0.5), ("attention", files["fix"], None)],
                        control_stages="pathology")
    assert job["parameters"]["control_stages"] == "pathology"
    done = final(client, job["id"])
    assert done["state"] == "succeeded", done
    provenance = json.loads(client.download(job["id"], "provenance.json", tmp_path).read_text())
    assert provenance["controls"] == [
        {"name": "sobel", "source": "control-1.png", "scale": 0.5, "stages": "pathology",
         "source_sha256": hashlib.sha256(files["ref"].read_bytes()).hexdigest()},
        {"name": "attention", "source": "control-2.csv", "scale": 1.0, "stages": "pathology",
         "source_sha256": hashlib.sha256(FIXATIONS).hexdigest()},
    ]
    segments = json.loads(client.download(job["id"], "segments.json", tmp_path).read_text())["segments"]
    assert [s["kind"] for s in segments][-1] == "attention"

    plain = final(client, client.submit(files["anatomy"], [(files["region"], "cardiomegaly")], seed=5, steps=3)["id"])
    steered_preview = np.asarray(Image.open(client.download(job["id"], "preview.png", tmp_path / "a")))
    plain_preview = np.asarray(Image.open(client.download(plain["id"], "preview.png", tmp_path / "b")))
    assert np.abs(steered_preview.astype(int) - plain_preview).max() > 0  # the controls steered the image


def test_submit_cli_sends_the_controls(engine, files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XREAL_ENGINE_TOKEN", TOKEN)
    out = tmp_path / "result"
    code = cli.main(["submit", "--url", engine["url"], "--anatomy", str(files["anatomy"]),
                     "--pathology-mask", str(files["region"]), "--finding", "cardiomegaly", "--seed", "2",
                     "--steps", "2", "--control", f"sobel:{files['ref']}:2", "--control", f"attention:{files['fix']}:0",
                     "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    provenance = json.loads((out / "provenance.json").read_text())
    assert [(c["name"], c["scale"], c["stages"]) for c in provenance["controls"]] == [
        ("sobel", 2.0, "both"), ("attention", 0.0, "both")]


def control_request(engine, controls, files, anatomy=None) -> tuple[int, dict]:
    """POST /jobs with ``control`` fields and ``control_file`` parts (field, filename, type, bytes)."""
    body, content_type = multipart(
        [("finding", "cardiomegaly"), ("steps", "2"), *[("control", text) for text in controls]],
        [("anatomy", "anatomy.png", "image/png", anatomy or png_bytes(anatomy_array(64))),
         ("pathology", "region.png", "image/png", png_bytes(region_array(64))), *files])
    status, _, data = raw_request(engine["url"], "POST", "/api/v1/jobs", body,
                                  {"Content-Type": content_type, "X-XReal-Client": "1"})
    return status, json.loads(data)


def test_bad_controls_are_refused_with_one_sentence_and_leave_nothing(engine):
    reference = png_bytes(np.full((64, 64), 120, np.uint8))
    jobs_before = {entry["id"] for entry in engine["client"].jobs(limit=1000)}
    cases = [
        (["edges"], [("control_file", "r.png", "image/png", reference)], 422, "invalid_control", "Unknown control 'edges'"),
        (["sobel:2.5"], [("control_file", "r.png", "image/png", reference)], 422, "invalid_control",
         "sobel scale 2.5 is outside [0, 2]"),
        (["sobel:-0.01"], [("control_file", "r.png", "image/png", reference)], 422, "invalid_control", "outside [0, 2]"),
        (["canny"], [("control_file", "r.png", "image/png", reference)], 422, "invalid_control",
         "This model has no canny ControlNet"),
        (["sobel"], [], 400, "control_files_mismatch", "Send one 'control_file' per control that takes a file"),
        (["attention"], [("control_file", "fix.csv", "text/csv", b"a,b\n1,2\n")], 422, "invalid_input",
         "is not the documented fixation CSV"),
        (["sobel", "sobel:1"], [("control_file", "r.png", "image/png", reference)] * 2, 422, "invalid_control",
         "more than once"),
        (["sobel"], [("control_file", "r.csv", "text/csv", FIXATIONS)], 415, "unsupported_media_type", "sobel control file"),
    ]
    for controls, parts, status, code, words in cases:
        got, answer = control_request(engine, controls, parts)
        message = answer["error"]["message"]
        assert (got, answer["error"]["code"]) == (status, code), (controls, answer)
        assert words in message and "\n" not in message and message.endswith("."), (controls, message)
    assert list((engine["data_dir"] / "incoming").iterdir()) == [], "refused uploads leave nothing behind"
    assert {entry["id"] for entry in engine["client"].jobs(limit=1000)} == jobs_before


def test_a_wrong_size_reference_is_resampled_and_the_job_says_so(engine):
    big = png_bytes(np.tile(np.arange(128, dtype=np.uint8), (128, 1)))
    status, job = control_request(engine, ["sobel:1"], [("control_file", "big.png", "image/png", big)])
    assert status == 202, job
    assert any("is 128x128 pixels, not the 64x64 of the image; it was resampled" in w for w in job["warnings"])
    assert final(engine["client"], job["id"])["state"] == "succeeded"


def test_a_batch_row_carries_its_controls_through_the_service(engine, files, tmp_path):
    """Slicer's Variations with controls go as one batch: each row's controls reach its job's provenance."""
    client = engine["client"]
    rows = [{"name": f"seed-{seed}", "anatomy": str(files["anatomy"]), "seed": seed, "steps": 3,
             "pathologies": [{"mask": str(files["region"]), "finding": "cardiomegaly"}],
             "controls": [("sobel", files["ref"], 0.5), ("attention", files["fix"], None)],
             "control_stages": "pathology"} for seed in (1, 2)]
    batch = client.submit_batch(rows=rows)
    done = client.wait_batch(batch["id"], poll_interval=0.3, timeout=600)
    assert done["state"] == "finished" and done["counts"]["succeeded"] == 2, done
    for row in done["rows"]:
        provenance = json.loads(client.download(row["job"], "provenance.json", tmp_path / row["name"]).read_text())
        assert [(c["name"], c["scale"], c["stages"], c["source_sha256"]) for c in provenance["controls"]] == [
            ("sobel", 0.5, "pathology", hashlib.sha256(files["ref"].read_bytes()).hexdigest()),
            ("attention", 1.0, "pathology", hashlib.sha256(FIXATIONS).hexdigest())]
    bad = [{**rows[0], "name": "no-such-controlnet", "controls": [("canny", files["ref"], None)]},
           {**rows[0], "name": "too-strong", "controls": ["sobel:ref.png:2.5"]}]
    from xreal_engine.client import EngineError

    with pytest.raises(EngineError) as refused:
        client.submit_batch(rows=bad)
    assert refused.value.status == 422 and [p.split(":")[0] for p in refused.value.details["rows"]] == ["row 1", "row 2"]
    assert "canny" in refused.value.details["rows"][0] and "2.5" in refused.value.details["rows"][1]


def test_a_csv_manifest_uploads_the_files_its_controls_name(engine, files, tmp_path):
    """submit_batch(manifest=...) sends the control files a CSV names beside it (EngineClient._manifest_files)."""
    import shutil

    folder = tmp_path / "manifest"
    folder.mkdir()
    for key in ("anatomy", "ref", "fix"):
        shutil.copy(files[key], folder / files[key].name)
    manifest = folder / "rows.csv"
    manifest.write_text("name,anatomy,seed,steps,controls\n"
                        f"steered,anatomy.png,4,3,sobel:ref.png:0.25;attention:fix.csv\n")
    client = engine["client"]
    done = client.wait_batch(client.submit_batch(manifest)["id"], poll_interval=0.3, timeout=600)
    assert done["state"] == "finished" and done["counts"]["succeeded"] == 1, done
    provenance = json.loads(client.download(done["rows"][0]["job"], "provenance.json", tmp_path).read_text())
    assert [(c["name"], c["scale"], c["source_sha256"]) for c in provenance["controls"]] == [
        ("sobel", 0.25, hashlib.sha256(files["ref"].read_bytes()).hexdigest()),
        ("attention", 1.0, hashlib.sha256(FIXATIONS).hexdigest())]
