"""Batches over real HTTP on loopback: ``xreal-engine serve`` in a subprocess with a tiny random model, the
stdlib client (and raw http.client for what a web page would send). Covers submit -> status -> dataset.zip
(read back by MONAI), rows naming local files and a template, every bad row reported by its number with
nothing queued, a batch that does not fit the queue, cancel, and the guard (token, Origin, body length, and,
in an in-process app without a token, the client header).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_server_service import (TOKEN, anatomy_array, multipart, raw_request, region_array, save_png,  # noqa: F401
                                 start_engine, stop_engine, tiny_model, wait_until_ready)
from test_hardening import http_request, open_server  # noqa: F401  (open_server: the app without a token)
from xreal_engine.client import EngineClient, EngineError

pytestmark = pytest.mark.slow  # starts the engine
MAX_QUEUED = 6
BATCH_TIMEOUT = 600.0
FAST = 4  # steps of the rows that should finish
SLOW = 400  # steps of the rows that must still be queued when the test acts on them


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("batch-engine") / "data"
    process, url = start_engine(tiny_model, data_dir, "--max-queued-jobs", str(MAX_QUEUED), token=TOKEN)
    client = EngineClient(url, token=TOKEN, timeout=120)
    try:
        wait_until_ready(client)
        yield {"url": url, "client": client, "data_dir": data_dir}
    finally:
        stop_engine(process)


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory) -> Path:
    """A manifest's folder: an anatomy, a region in a subfolder."""
    from xreal_engine.model.info import ModelInfo

    size = ModelInfo.load(tiny_model).image_size
    folder = tmp_path_factory.mktemp("manifest")
    (folder / "masks").mkdir()
    save_png(folder / "anatomy.png", anatomy_array(size))
    save_png(folder / "masks" / "region.png", region_array(size))
    return folder


def job_count(client: EngineClient) -> int:
    return len(client.jobs(limit=1000))


def slow_rows(files: Path, count: int, prefix: str) -> list:
    return [{"name": f"{prefix}-{k}", "anatomy": str(files / "anatomy.png"), "seed": k, "steps": SLOW}
            for k in range(count)]


def test_manifest_batch_round_trip_status_rows_quality_and_dataset_zip(engine, files, tmp_path):
    from monai.data import load_decathlon_datalist

    client = engine["client"]
    manifest = files / "batch.csv"
    manifest.write_text("name,anatomy,pathology_masks,findings,seed,steps\n"
                        f"heart,anatomy.png,masks/region.png,cardiomegaly,3,{FAST}\n"
                        f"plain,anatomy.png,,,4,{FAST}\n"
                        f"template,anatomy_01,,,5,{FAST}\n")  # one of the engine's templates (package data)
    request_id = f"batch-{uuid.uuid4().hex}"
    batch = client.submit_batch(manifest, formats=["monai", "nnunet"], request_id=request_id)
    assert batch["rows_total"] == 3 and batch["state"] in ("queued", "running"), batch
    assert [row["row"] for row in batch["rows"]] == [2, 3, 4], "rows keep their manifest line numbers"
    assert client.submit_batch(manifest, request_id=request_id)["id"] == batch["id"], "a retry is the same batch"
    with pytest.raises(EngineError) as early:  # not built before every row is final
        client.download_dataset(batch["id"], tmp_path / "early")
    assert early.value.status == 409 and early.value.code == "not_finished"

    seen = []
    final = client.wait_batch(batch["id"], poll_interval=0.3, timeout=BATCH_TIMEOUT, callback=seen.append)
    assert final["state"] == "finished" and final["counts"]["succeeded"] == 3, final
    assert final["progress"] == 1.0 and final["eta_seconds"] == 0.0
    assert all(0.0 <= status["progress"] <= 1.0 for status in seen)
    rows = {row["name"]: row for row in final["rows"]}
    for row in rows.values():
        dice = row["quality"]["anatomy_dice"]
        assert set(dice) == {"left lung", "right lung", "heart"} and all(0 <= d <= 1 for d in dice.values()), row
        job = client.status(row["job"])  # every row is an ordinary job, tagged with its batch
        assert job["batch"]["batch_id"] == batch["id"] and job["batch"]["name"] == row["name"]
        assert job["parameters"]["num_inference_steps"] == FAST
    assert client.status(rows["heart"]["job"])["findings"] == ["cardiomegaly"]

    extracted = client.download_dataset(batch["id"], tmp_path / "dataset")
    out = tmp_path / "dataset"
    names = {path.relative_to(out).as_posix() for path in extracted}
    for name in ("heart", "plain", "template"):
        assert {f"images/{name}/sc.dcm", f"images/{name}/preview.png", f"labels/{name}.png",
                f"nnunet/imagesTr/{name}_0000.png"} <= names, sorted(names)
        provenance = json.loads((out / "images" / name / "provenance.json").read_text())
        assert provenance["quality"] == rows[name]["quality"]
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["counts"] == {"rows": 3, "finished": 3, "failed": 0, "dropped": 0, "pending": 0}
    assert summary["model_id"] == "random-tiny-seed0" and summary["quality"]["checked"] == 3
    assert summary["findings"] == {"cardiomegaly": 1, "none": 2}
    datalist = load_decathlon_datalist(out / "datalist.json", data_list_key="training", base_dir=out)
    assert len(datalist) == 3 and all(Path(item["image"]).is_file() and Path(item["label"]).is_file()
                                      for item in datalist)
    label = np.asarray(Image.open(out / "labels" / "heart.png"))
    assert set(np.unique(label)) <= {0, 1, 2, 3, 4} and (label > 0).any()
    assert client.batch_status(batch["id"])["dataset_ready"] is True
    assert batch["id"] in {entry["id"] for entry in client.batches()}


def test_every_bad_row_is_reported_by_number_and_nothing_is_queued(engine, files):
    client = engine["client"]
    before = job_count(client)
    manifest = files / "bad.csv"
    manifest.write_text("name,anatomy,pathology_masks,findings,seed\n"
                        "good,anatomy.png,,,1\n"  # row 2
                        "missing,not-uploaded.png,,,2\n"  # row 3: a file that was not sent
                        "finding,anatomy.png,masks/region.png,broken ribs,3\n"  # row 4: unknown finding
                        "good,anatomy.png,,,4\n"  # row 5: duplicate name
                        "template,anatomy_99,,,5\n"  # row 6: no such template
                        "short,anatomy.png\n")  # row 7: malformed line
    with pytest.raises(EngineError) as refused:
        client.submit_batch(manifest)
    error = refused.value
    assert error.status == 422 and error.code == "invalid_manifest", error.message
    numbers = [int(problem.split(":")[0].removeprefix("row ")) for problem in error.details["rows"]]
    assert numbers == [3, 4, 5, 6, 7], error.details["rows"]
    problems = dict(zip(numbers, error.details["rows"]))
    assert "not-uploaded.png" in problems[3] and "broken ribs" in problems[4] and "row 2" in problems[5]
    assert "anatomy_99" in problems[6] and "fields" in problems[7]
    assert "row 3:" in error.message and "nothing was queued" in error.message
    assert str(engine["data_dir"]) not in json.dumps(error.details) + error.message, "no server path is shown"
    assert job_count(client) == before

    with pytest.raises(EngineError) as outside:  # a manifest may not reach outside its uploads
        client.submit_batch(rows=[{"name": "x", "anatomy": "../../jobs/anatomy.png", "seed": 1}])
    assert outside.value.code == "invalid_manifest" and "outside" in outside.value.details["rows"][0]
    with pytest.raises(EngineError) as bad_format:
        client.submit_batch(manifest, formats=["coco"])
    assert bad_format.value.status == 422 and bad_format.value.code == "unknown_format"
    with pytest.raises(EngineError) as bad_dice:
        client.submit_batch(manifest, min_dice=1.5)
    assert bad_dice.value.status == 422 and "min_dice must be from 0 to 1" in bad_dice.value.message
    assert job_count(client) == before


def test_a_batch_that_does_not_fit_is_refused_whole_and_cancel_stops_one(engine, files, tmp_path):
    client = engine["client"]
    before = job_count(client)
    with pytest.raises(EngineError) as never:  # more rows than the queue ever holds
        client.submit_batch(rows=slow_rows(files, MAX_QUEUED + 1, "big"))
    assert never.value.status == 422 and never.value.code == "batch_too_large"
    assert job_count(client) == before

    first = client.submit_batch(rows=slow_rows(files, 5, "first"))  # at most one runs: 4 or 5 stay queued
    with pytest.raises(EngineError) as full:
        client.submit_batch(rows=slow_rows(files, 4, "second"))
    assert full.value.status == 429 and full.value.code == "queue_full", full.value.message
    assert full.value.retry_after is not None and full.value.retry_after >= 1
    assert "nothing was queued" in full.value.message
    assert job_count(client) == before + 5, "the refused batch left no job behind"

    cancelled = client.cancel_batch(first["id"])
    assert cancelled["counts"]["queued"] == 0, cancelled
    final = client.wait_batch(first["id"], poll_interval=0.3, timeout=BATCH_TIMEOUT)
    assert final["state"] == "cancelled" and final["counts"]["cancelled"] >= 4, final
    assert final["counts"]["queued"] == final["counts"]["running"] == 0
    extracted = client.download_dataset(first["id"], tmp_path / "cancelled")  # what finished, if anything
    summary = json.loads((tmp_path / "cancelled" / "dataset.json").read_text())
    assert summary["counts"]["rows"] == 5 and summary["counts"]["finished"] == final["counts"]["succeeded"]
    assert extracted

    second = client.submit_batch(rows=slow_rows(files, 4, "second"))  # room again
    client.delete_batch(second["id"])
    with pytest.raises(EngineError) as gone:
        client.batch_status(second["id"])
    assert gone.value.status == 404 and gone.value.code == "batch_not_found"
    assert not (engine["data_dir"] / "batches" / second["id"]).exists()


def test_the_guard_refuses_pages_and_requests_without_the_token(engine, files):
    """A web page's form POST (no token, no client header), a foreign Origin, a body without its length."""
    client = engine["client"]
    before = job_count(client)
    manifest = b"name,anatomy,seed\na,anatomy.png,1\n"
    body, content_type = multipart([], [("manifest", "m.csv", "text/csv", manifest),
                                        ("file", "anatomy.png", "image/png", (files / "anatomy.png").read_bytes())])
    url = engine["url"]
    status, _, answer = raw_request(url, "POST", "/api/v1/batches", body, {"Content-Type": content_type}, token=None)
    assert status == 401 and json.loads(answer)["error"]["code"] == "unauthorized"
    status, _, answer = raw_request(url, "POST", "/api/v1/batches", body,
                                    {"Content-Type": content_type, "X-XReal-Client": "1",
                                     "Origin": "https://evil.example"})
    assert status == 403 and json.loads(answer)["error"]["code"] == "cross_origin_refused"
    status, _, answer = raw_request(url, "GET", "/api/v1/batches", None, {"Sec-Fetch-Site": "cross-site"})
    assert status == 403 and json.loads(answer)["error"]["code"] == "cross_origin_refused"
    status, _, answer = raw_request(url, "POST", "/api/v1/batches", body,
                                    {"Content-Type": content_type, "X-XReal-Client": "1",
                                     "Transfer-Encoding": "chunked"}, send_body=False)
    assert status == 411 and json.loads(answer)["error"]["code"] == "length_required"
    cut = body[: len(body) // 2]  # a body cut off before its closing boundary is never queued
    status, _, answer = raw_request(url, "POST", "/api/v1/batches", cut,
                                    {"Content-Type": content_type, "X-XReal-Client": "1"})
    assert status == 400 and json.loads(answer)["error"]["code"] == "incomplete_body"
    misspelt, misspelt_type = multipart([("format", "monai")], [("manifest", "m.csv", "text/csv", manifest)])
    status, _, answer = raw_request(url, "POST", "/api/v1/batches", misspelt,
                                    {"Content-Type": misspelt_type, "X-XReal-Client": "1"})
    assert status == 400 and json.loads(answer)["error"]["code"] == "unknown_field"
    assert job_count(client) == before
    # the same request from the client (token + X-XReal-Client) is accepted
    good, good_type = multipart([("quality_check", "false")], [("manifest", "m.csv", "text/csv", manifest),
                                ("file", "anatomy.png", "image/png", (files / "anatomy.png").read_bytes())])
    status, _, answer = raw_request(url, "POST", "/api/v1/batches", good,
                                    {"Content-Type": good_type, "X-XReal-Client": "1"})
    assert status == 202, answer[:300]
    accepted = json.loads(answer)
    assert accepted["quality_check"] is False
    client.cancel_batch(accepted["id"])
    assert client.wait_batch(accepted["id"], poll_interval=0.3, timeout=BATCH_TIMEOUT)["state"] in ("cancelled",
                                                                                                   "finished")


def test_without_a_token_a_page_shaped_batch_is_refused_and_the_client_header_passes(open_server, files):
    """The shape rule on its own (only an in-process app can run without a token): a plain form POST, as any
    web page may send, is refused before its body is read; the same request with X-XReal-Client is queued."""
    port, client = open_server["port"], open_server["client"]
    manifest = b"name,anatomy,seed,steps\na,anatomy.png,1,1\n"
    body, content_type = multipart([("quality_check", "false")],
                                   [("manifest", "m.csv", "text/csv", manifest),
                                    ("file", "anatomy.png", "image/png", (files / "anatomy.png").read_bytes())])
    before = len(client.jobs(limit=1000))
    status, _, answer = http_request(port, "POST", "/api/v1/batches", body, {"Content-Type": content_type})
    assert status == 403 and json.loads(answer)["error"]["code"] == "client_header_required", answer[:300]
    status, _, answer = http_request(port, "POST", f"/api/v1/batches/{uuid.uuid4().hex}/cancel", None, {})
    assert status == 403 and json.loads(answer)["error"]["code"] == "client_header_required"
    assert len(client.jobs(limit=1000)) == before
    status, _, answer = http_request(port, "POST", "/api/v1/batches", body,
                                     {"Content-Type": content_type, "X-XReal-Client": "1"})
    assert status == 202, answer[:300]
    final = client.wait_batch(json.loads(answer)["id"], poll_interval=0.3, timeout=BATCH_TIMEOUT)
    assert final["state"] == "finished" and final["counts"]["succeeded"] == 1, final


def test_a_bad_file_is_named_as_the_manifest_names_it_and_a_field_sent_twice_is_refused(open_server, files):
    """The server stores uploads as file-0001.png ...; a refusal says masks/bad.png, the name the client sent.
    A single-valued field sent twice would silently take the last value: refused, naming it; 'file' repeats."""
    port, client = open_server["port"], open_server["client"]
    truncated = (files / "masks" / "region.png").read_bytes()[:60]  # a PNG header, no image data
    manifest = b"name,anatomy,pathology_masks,findings,seed,steps\nr,anatomy.png,masks/bad.png,cardiomegaly,1,1\n"
    uploads = [("manifest", "m.csv", "text/csv", manifest),
               ("file", "masks/bad.png", "image/png", truncated),
               ("file", "anatomy.png", "image/png", (files / "anatomy.png").read_bytes())]
    headers = {"X-XReal-Client": "1"}
    before = len(client.jobs(limit=1000))
    body, content_type = multipart([], uploads)
    status, _, answer = http_request(port, "POST", "/api/v1/batches", body, {"Content-Type": content_type, **headers})
    error = json.loads(answer)["error"]
    assert status == 422 and error["code"] == "invalid_manifest", answer[:300]
    assert len(error["rows"]) == 1 and error["rows"][0].startswith("row 2: masks/bad.png is not a readable mask"), error
    assert "file-0001" not in answer.decode()

    for fields in ([("min_dice", "0.5"), ("min_dice", "0.9")], [("formats", "monai"), ("formats", "nnunet")]):
        body, content_type = multipart(fields, uploads)
        status, _, answer = http_request(port, "POST", "/api/v1/batches", body,
                                         {"Content-Type": content_type, **headers})
        error = json.loads(answer)["error"]
        assert status == 400 and error["code"] == "repeated_field", answer[:300]
        assert f"the field '{fields[0][0]}' more than once" in error["message"]
    multipart_twice, content_type = multipart([], [uploads[0], uploads[0]])
    status, _, answer = http_request(port, "POST", "/api/v1/batches", multipart_twice,
                                     {"Content-Type": content_type, **headers})
    assert status == 400 and "'manifest' more than once" in json.loads(answer)["error"]["message"], answer[:300]
    assert len(client.jobs(limit=1000)) == before
