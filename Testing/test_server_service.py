"""The engine service over real HTTP on loopback: ``xreal-engine serve`` runs in a subprocess
with a tiny random model; the stdlib client (and raw http.client for malformed requests)
talks to it. Covers the job cycle, SSE progress, cancel, 50 concurrent clients against a
small queue bound, a corpus of malformed requests, tokens, kill -9 + restart, shutdown.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xreal_engine.client import EngineClient, EngineError, EngineUnreachable

TOKEN = "test-token-0123456789"
START_TIMEOUT = 120.0


# ----------------------------------------------------------------------------- helpers


def start_engine(model_dir: Path, data_dir: Path, *extra: str, token: str | None = None,
                 host: str = "127.0.0.1", env: dict | None = None,
                 log_path: Path | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``xreal-engine serve --port 0`` and read the URL from its first stdout line.

    ``token`` goes in XREAL_ENGINE_TOKEN (the documented way; ``--token`` would show in ``ps``);
    ``env`` replaces this process's environment (whose XREAL_ENGINE_TOKEN is dropped).
    """
    if env is None:
        env = {key: value for key, value in os.environ.items() if key != "XREAL_ENGINE_TOKEN"}
    env = dict(env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **({"XREAL_ENGINE_TOKEN": token} if token else {}))
    command = [sys.executable, "-m", "xreal_engine.cli", "serve", "--host", host, "--port", "0",
               "--model", str(model_dir), "--data-dir", str(data_dir), *extra]
    log_path = log_path or data_dir.parent / f"{data_dir.name}-engine.log"
    log_file = open(log_path, "ab")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, env=env)
    log_file.close()
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    if not selector.select(timeout=START_TIMEOUT):
        process.kill()
        raise AssertionError(f"the engine printed nothing within {START_TIMEOUT} s; log: {log_path.read_text()[-2000:]}")
    first_line = process.stdout.readline().decode().strip()
    assert first_line.startswith("XREAL_ENGINE_URL=http://127.0.0.1:"), (first_line, log_path.read_text()[-2000:])
    return process, first_line.split("=", 1)[1]


def wait_until_ready(client: EngineClient, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = client.health()
        assert health["model"] != "failed", health
        if health["model"] == "ready":
            return
        time.sleep(0.5)
    raise AssertionError("the model did not load in time")


def stop_engine(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)
    process.stdout.close()


def save_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def anatomy_array(size: int) -> np.ndarray:
    labels = np.zeros((size, size), np.uint8)
    labels[size // 5: 4 * size // 5, size // 8: size // 2 - 2] = 2  # right lung at image left (PA view)
    labels[size // 5: 4 * size // 5, size // 2 + 2: 7 * size // 8] = 1
    labels[size // 2: 3 * size // 4, 3 * size // 8: 5 * size // 8] = 3
    return labels


def region_array(size: int) -> np.ndarray:
    region = np.zeros((size, size), np.uint8)
    region[size // 3: size // 2, size // 6: size // 3] = 255  # inside the right lung
    return region


def final(client: EngineClient, job_id: str, timeout: float = 180.0) -> dict:
    return client.wait(job_id, poll_interval=0.2, timeout=timeout)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from xreal_engine.model.random_model import create_random_model

    return create_random_model(tmp_path_factory.mktemp("model") / "tiny", preset="tiny")


@pytest.fixture(scope="module")
def inputs(tiny_model, tmp_path_factory) -> dict:
    from xreal_engine.model.info import ModelInfo

    size = ModelInfo.load(tiny_model).image_size
    folder = tmp_path_factory.mktemp("inputs")
    return {
        "size": size,
        "anatomy": save_png(folder / "anatomy.png", anatomy_array(size)),
        "region": save_png(folder / "region.png", region_array(size)),
    }


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory):
    """The main engine: token required, a queue bound of 4, uploads up to 1 MB."""
    data_dir = tmp_path_factory.mktemp("engine") / "data"
    process, url = start_engine(tiny_model, data_dir, "--max-queued-jobs", "4", "--max-upload-bytes", "1000000",
                                token=TOKEN)
    client = EngineClient(url, token=TOKEN, timeout=60)
    try:
        wait_until_ready(client)
        yield {"url": url, "client": client, "process": process, "data_dir": data_dir, "model_dir": tiny_model}
    finally:
        stop_engine(process)


# ----------------------------------------------------------------------------- the job cycle


def test_full_job_cycle_with_events_downloads_idempotency_and_delete(engine, inputs, tmp_path):
    import pydicom

    client = engine["client"]
    info = client.info()
    assert info["model"]["id"] == "random-tiny-seed0"
    assert info["limits"]["max_queued_jobs"] == 4 and info["limits"]["max_upload_bytes"] == 1000000
    cardiomegaly = next(f for f in info["findings"] if f["name"] == "cardiomegaly")
    assert cardiomegaly["type"]["value"] == "8186001"  # SNOMED CT code from the vocabulary
    assert [label["value"] for label in info["anatomy_labels"]] == [1, 2, 3, 4]

    request_id = f"cycle-{uuid.uuid4().hex}"
    job = client.submit(inputs["anatomy"], [(inputs["region"], "cardiomegaly")], seed=7, steps=8,
                        request_id=request_id)
    assert job["state"] in ("queued", "running") and job["parameters"]["seed"] == 7
    again = client.submit(inputs["anatomy"], [(inputs["region"], "cardiomegaly")], seed=7, steps=8,
                          request_id=request_id)
    assert again["id"] == job["id"], "a retried submission with the same request_id must return the same job"

    events = list(client.events(job["id"]))
    assert events[-1]["state"] == "succeeded", events[-1]
    stages = {event["stage"] for event in events if event["state"] == "running"}
    assert stages & {"anatomy", "pathology", "starting"}, stages

    status = client.status(job["id"])
    assert status["state"] == "succeeded" and status["progress"] == 1.0 and status["error"] is None
    expected = {"sc.dcm", "seg.dcm", "preview.png", "provenance.json", "segments.json"}
    assert expected <= set(status["files"])
    assert any(name.startswith("segments/") for name in status["files"])

    sc_path = client.download(job["id"], "sc.dcm", tmp_path)
    sc = pydicom.dcmread(sc_path)
    assert sc.SOPInstanceUID == status["dicom"]["sc_sop_instance_uid"]
    assert sc.StudyInstanceUID == status["dicom"]["study_instance_uid"]
    provenance = json.loads(client.download(job["id"], "provenance.json", tmp_path).read_text())
    assert provenance["seed"] == 7 and provenance["steps"] == 8

    extracted = client.download_all(job["id"], tmp_path / "all")
    names = {path.relative_to(tmp_path / "all").as_posix() for path in extracted}
    assert names == set(status["files"])
    assert (tmp_path / "all" / "sc.dcm").read_bytes() == sc_path.read_bytes()

    listed = {entry["id"] for entry in client.jobs()}
    assert job["id"] in listed

    client.delete(job["id"])
    with pytest.raises(EngineError) as missing:
        client.status(job["id"])
    assert missing.value.status == 404 and missing.value.code == "job_not_found"
    assert not (engine["data_dir"] / "jobs" / job["id"]).exists()


def test_cancel_stops_a_running_job_within_a_step(engine, inputs):
    client = engine["client"]
    job = client.submit(inputs["anatomy"], [(inputs["region"], "pneumonia")], steps=400)
    deadline = time.monotonic() + 120
    status = client.status(job["id"])
    while not (status["state"] == "running" and (status["step"] or 0) >= 1):
        assert time.monotonic() < deadline and status["state"] in ("queued", "running"), status
        time.sleep(0.1)
        status = client.status(job["id"])
    assert status["eta_seconds"] is not None and status["total"] == 400
    cancelled_at = time.monotonic()
    client.cancel(job["id"])
    status = final(client, job["id"], timeout=60)
    assert status["state"] == "cancelled", status
    assert time.monotonic() - cancelled_at < 30
    assert status["files"] == []
    job_dir = engine["data_dir"] / "jobs" / job["id"]
    assert list(job_dir.iterdir()) == [], "a cancelled job leaves no partial result and no uploads"
    with pytest.raises(EngineError) as no_result:
        client.download_all(job["id"], engine["data_dir"].parent / "never")
    assert no_result.value.status == 409


def test_delete_of_a_running_job_cancels_it_and_removes_everything(engine, inputs):
    """The Slicer module's Cancel button may simply DELETE the job."""
    client = engine["client"]
    job = client.submit(inputs["anatomy"], [(inputs["region"], "atelectasis")], steps=400)
    deadline = time.monotonic() + 120
    while client.status(job["id"])["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    started = time.monotonic()
    client.delete(job["id"])
    assert time.monotonic() - started < 30
    with pytest.raises(EngineError) as gone:
        client.status(job["id"])
    assert gone.value.status == 404
    assert not (engine["data_dir"] / "jobs" / job["id"]).exists()


def test_openapi_page_documents_every_endpoint(engine):
    status, _, body = raw_request(engine["url"], "GET", "/openapi.json", token=None)
    assert status == 200
    paths = json.loads(body)["paths"]
    for path in ("/api/v1/health", "/api/v1/info", "/api/v1/jobs", "/api/v1/jobs/{job_id}",
                 "/api/v1/jobs/{job_id}/cancel", "/api/v1/jobs/{job_id}/files/{name}",
                 "/api/v1/jobs/{job_id}/result.zip", "/api/v1/jobs/{job_id}/events", "/api/v1/shutdown"):
        assert path in paths, path
    form = paths["/api/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form
    status, _, page = raw_request(engine["url"], "GET", "/docs", token=None)
    assert status == 200 and b"swagger-ui-bundle.js" in page
    # Swagger UI comes from the engine itself: nothing is fetched from another site (no CDN, works offline)
    assert re.findall(rb"""(?:src|href)=["']([^"']+)""", page), page[:500]
    for reference in re.findall(rb"""(?:src|href)=["']([^"']+)""", page) + re.findall(rb"url: *'([^']+)'", page):
        assert reference.startswith(b"/"), reference
        assert raw_request(engine["url"], "GET", reference.decode(), token=None)[0] == 200, reference


def test_fifty_concurrent_clients_every_job_completes_or_is_refused(engine, inputs):
    """Queue bound 4: each of 50 clients either gets a job that completes or a 429 with Retry-After."""
    url = engine["url"]
    prefix = f"crowd-{uuid.uuid4().hex[:8]}"
    outcomes: dict[int, tuple] = {}

    def one_client(index: int) -> None:
        client = EngineClient(url, token=TOKEN, timeout=60)
        try:
            job = client.submit(inputs["anatomy"], [(inputs["region"], "cardiomegaly")], steps=1, seed=index,
                                request_id=f"{prefix}-{index}")
        except EngineError as error:
            outcomes[index] = ("refused", error.status, error.retry_after)
            return
        done = client.wait(job["id"], poll_interval=0.3, timeout=600)
        outcomes[index] = ("accepted", job["id"], done["state"])

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=700)
    assert len(outcomes) == 50, "every client got an answer"
    accepted = {i: o for i, o in outcomes.items() if o[0] == "accepted"}
    refused = {i: o for i, o in outcomes.items() if o[0] == "refused"}
    assert accepted and refused, (len(accepted), len(refused))
    assert all(o[1] == 429 and o[2] and o[2] >= 1 for o in refused.values()), refused
    assert all(o[2] == "succeeded" for o in accepted.values()), accepted
    job_ids = [o[1] for o in accepted.values()]
    assert len(set(job_ids)) == len(job_ids), "no job is shared by two clients"
    on_server = {job["request_id"]: job for job in engine["client"].jobs(limit=1000)
                 if (job["request_id"] or "").startswith(prefix)}
    assert set(on_server) == {f"{prefix}-{i}" for i in accepted}, "none lost, none duplicated, none from refusals"
    assert {job["id"] for job in on_server.values()} == set(job_ids)
    print(f"\n50 concurrent clients: {len(accepted)} accepted and completed, {len(refused)} refused with 429")


# ----------------------------------------------------------------------------- malformed requests


def multipart(fields=(), files=()) -> tuple[bytes, str]:
    """Encode arbitrary (possibly wrong) parts: files are (field, filename, content type, bytes)."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in fields:
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, content_type, data in files:
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                   f"Content-Type: {content_type}\r\n\r\n".encode("utf-8", "surrogateescape"))
        body.write(data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def raw_request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                token: str | None = TOKEN, send_body: bool = True) -> tuple[int, dict, bytes]:
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers.setdefault("Authorization", f"Bearer {token}")
        if body is not None and "Content-Length" not in all_headers and "Transfer-Encoding" not in all_headers:
            all_headers["Content-Length"] = str(len(body))
        connection.putrequest(method, path, skip_host="Host" in all_headers, skip_accept_encoding=True)
        for key, value in all_headers.items():
            connection.putheader(key, value)
        connection.endheaders()
        if body is not None and send_body:
            connection.send(body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def malformed_cases(inputs: dict) -> list:
    """(name, method, path, body, headers, token, expected status, expected error code or None)."""
    size = inputs["size"]
    anatomy = png_bytes(anatomy_array(size))
    region = png_bytes(region_array(size))
    good_files = [("anatomy", "anatomy.png", "image/png", anatomy), ("pathology", "region.png", "image/png", region)]
    good_fields = [("finding", "cardiomegaly"), ("steps", "2")]
    jobs = "/api/v1/jobs"
    cases = []

    def post(name, fields=good_fields, files=good_files, status=422, code=None, token=TOKEN, headers=None):
        body, content_type = multipart(fields, files)
        cases.append((name, "POST", jobs, body, {"Content-Type": content_type, **(headers or {})}, token, status, code))

    def with_param(name, value, status, code):
        fields = [(k, v) for k, v in good_fields if k != name] + [(name, value)]
        post(f"{name}={value!r}", fields=fields, status=status, code=code)

    def with_anatomy(name, filename, content_type, data, status, code):
        post(name, files=[("anatomy", filename, content_type, data), good_files[1]], status=status, code=code)

    def with_region(name, data, status=422, code="invalid_input"):
        post(name, files=[good_files[0], ("pathology", "region.png", "image/png", data)], status=status, code=code)

    # tokens
    post("no token", token=None, status=401, code="unauthorized")
    post("wrong token", token="not-the-token-at-all", status=401, code="unauthorized")
    post("basic instead of bearer", token=None, headers={"Authorization": f"Basic {TOKEN}"},
         status=401, code="unauthorized")
    cases.append(("info without token", "GET", "/api/v1/info", None, {}, None, 401, "unauthorized"))
    cases.append(("jobs list with a wrong token", "GET", jobs, None, {}, TOKEN + "x", 401, "unauthorized"))
    # missing fields, wrong types
    post("no anatomy", files=[good_files[1]], status=400, code="missing_anatomy")
    post("no files at all", files=[], fields=[], status=400, code="missing_anatomy")
    post("anatomy sent as text field", files=[good_files[1]], fields=good_fields + [("anatomy", "lungs")],
         status=400, code=None)
    post("mask without finding", fields=[("steps", "2")], status=400, code="findings_mismatch")
    post("finding without mask", files=[good_files[0]], status=400, code="findings_mismatch")
    with_param("seed", "abc", 400, "bad_request")
    with_param("steps", "1.5", 400, "bad_request")
    with_param("guidance", "strong", 400, "bad_request")
    # parameter ranges
    with_param("steps", "-5", 422, "parameter_out_of_range")
    with_param("steps", "0", 422, "parameter_out_of_range")
    with_param("steps", "1001", 422, "parameter_out_of_range")
    with_param("anatomy_steps", "3", 422, "parameter_out_of_range")  # more than steps=2
    with_param("anatomy_steps", "-1", 422, "parameter_out_of_range")
    with_param("guidance", "51", 422, "parameter_out_of_range")
    with_param("guidance", "nan", 422, "parameter_out_of_range")
    with_param("eta", "2", 422, "parameter_out_of_range")
    with_param("seed", "-1", 422, "parameter_out_of_range")
    with_param("seed", str(2**32), 422, "parameter_out_of_range")
    with_param("request_id", "../../etc/passwd", 400, "bad_request_id")
    with_param("request_id", "x" * 200, 400, "bad_request_id")
    with_param("request_id", "abc\n", 400, "bad_request_id")  # "$" would match before the newline
    # findings
    post("unknown finding", fields=[("finding", "unicorn horn"), ("steps", "2")], code="invalid_input")
    post("removal finding outside edit mode", fields=[("finding", ""), ("steps", "2")], code="invalid_input")
    # files: type, format, size, content
    with_anatomy("text file declared as text", "anatomy.txt", "text/plain", b"left lung here", 415,
                 "unsupported_media_type")
    with_anatomy("JSON declared as JSON", "anatomy.json", "application/json", b"{}", 415, "unsupported_media_type")
    with_anatomy("JPEG", "anatomy.jpg", "image/jpeg", b"\xff\xd8\xff\xe0" + bytes(200), 415, "unsupported_media_type")
    with_anatomy("random bytes as octet-stream", "anatomy.bin", "application/octet-stream", os.urandom(500), 415,
                 "unsupported_format")
    with_anatomy("HTML renamed to .png", "anatomy.png", "image/png", b"<html><body>hi</body></html>", 415,
                 "unsupported_format")
    with_anatomy("empty file", "anatomy.png", "image/png", b"", 422, "empty_file")
    with_anatomy("truncated PNG", "anatomy.png", "image/png", anatomy[: len(anatomy) // 2], 422, "invalid_input")
    with_anatomy("PNG header only", "anatomy.png", "image/png", anatomy[:40], 422, "invalid_input")
    with_anatomy("huge dimensions PNG", "anatomy.png", "image/png", png_bytes(np.zeros((4, 7000))), 422,
                 "image_too_large")
    nrrd_bomb = b"NRRD0004\ntype: uchar\ndimension: 2\nsizes: 100000 100000\nencoding: raw\n\n" + bytes(64)
    with_anatomy("huge dimensions NRRD header", "anatomy.nrrd", "application/octet-stream", nrrd_bomb, 422,
                 "image_too_large")
    detached = b"NRRD0004\ntype: uint8\ndimension: 2\nsizes: 32 42\nencoding: raw\ndata file: /etc/passwd\n"
    with_anatomy("NRRD whose pixels are a server file", "anatomy.nrrd", "application/octet-stream", detached, 422,
                 "invalid_input")
    with_anatomy("path-like file name", "../../../../tmp/evil.png", "image/png", anatomy, 400, "bad_filename")
    with_anatomy("file name '..'", "..", "image/png", anatomy, 400, "bad_filename")
    with_anatomy("escape sequence in the file name", "a\x1b[2J.png", "image/png", anatomy, 400, "bad_filename")
    with_anatomy("right-to-left override in the file name", "x\u202egnp.exe", "image/png", anatomy, 400,
                 "bad_filename")
    with_anatomy("unknown label value 7", "anatomy.png", "image/png",
                 png_bytes(np.where(anatomy_array(size) == 3, 7, anatomy_array(size))), 422, "invalid_input")
    with_anatomy("empty anatomy", "anatomy.png", "image/png", png_bytes(np.zeros((size, size))), 422, "invalid_input")
    with_region("pathology of another size", png_bytes(region_array(size // 2)))
    with_region("empty pathology mask", png_bytes(np.zeros((size, size))))
    outside = np.zeros((size, size), np.uint8)
    outside[:2, :2] = 255
    with_region("pathology outside the body", png_bytes(outside))
    post("too many pathology masks", files=[good_files[0]] + [good_files[1]] * 17,
         fields=[("finding", "cardiomegaly")] * 17, code="too_many_pathologies")
    # edit mode and PACS fields
    post("image of another size than the masks", files=good_files + [
        ("image", "xray.png", "image/png", png_bytes(np.full((size * 2, size * 2), 128)))], code="invalid_input")
    post("image and source together", files=good_files + [("image", "xray.png", "image/png", anatomy)],
         fields=good_fields + [("source", "pacs"), ("study", "1.2.3"), ("series", "1.2.3.4")], status=400,
         code="image_and_source")
    post("source without study and series", fields=good_fields + [("source", "pacs")], status=400,
         code="incomplete_source")
    post("unknown push destination", fields=good_fields + [("push_to", "no-such-pacs")], code=None)
    # framing and encodings
    body, content_type = multipart(good_fields, good_files)
    cases.append(("truncated multipart body", "POST", jobs, body[: len(body) // 2] + b"\r\n--broken--\r\n",
                  {"Content-Type": content_type}, TOKEN, 400, None))
    cases.append(("JSON instead of multipart", "POST", jobs, json.dumps({"anatomy": "x"}).encode(),
                  {"Content-Type": "application/json"}, TOKEN, 400, "missing_anatomy"))
    cases.append(("no Content-Length (chunked)", "POST", jobs, b"5\r\nhello\r\n0\r\n\r\n",
                  {"Content-Type": content_type, "Transfer-Encoding": "chunked"}, TOKEN, 411, "length_required"))
    cases.append(("Content-Length over the limit", "POST", jobs, b"",
                  {"Content-Type": content_type, "Content-Length": "50000000"}, TOKEN, 413, "too_large"))
    # other endpoints
    cases.append(("unknown job id", "GET", f"{jobs}/{uuid.uuid4().hex}", None, {}, TOKEN, 404, "job_not_found"))
    cases.append(("malformed job id", "GET", f"{jobs}/..%2F..%2Fjobs.sqlite3", None, {}, TOKEN, 404, None))
    cases.append(("cancel unknown job", "POST", f"{jobs}/{uuid.uuid4().hex}/cancel", None, {}, TOKEN, 404,
                  "job_not_found"))
    cases.append(("delete unknown job", "DELETE", f"{jobs}/{uuid.uuid4().hex}", None, {}, TOKEN, 404,
                  "job_not_found"))
    cases.append(("bad state filter", "GET", f"{jobs}?state=exploded", None, {}, TOKEN, 400, "bad_state"))
    cases.append(("limit zero", "GET", f"{jobs}?limit=0", None, {}, TOKEN, 400, "bad_request"))
    cases.append(("unknown endpoint", "GET", "/api/v1/nothing-here", None, {}, TOKEN, 404, "http_error"))
    cases.append(("wrong method", "PUT", jobs, b"", {}, TOKEN, 405, "http_error"))
    return cases


def test_malformed_requests_get_the_right_4xx_and_the_engine_stays_healthy(engine, inputs):
    url = engine["url"]
    cases = malformed_cases(inputs)
    assert len(cases) >= 40
    failures = []
    for name, method, path, body, headers, token, status, code in cases:
        send_body = not name.startswith("Content-Length over")
        got_status, got_headers, payload = raw_request(url, method, path, body, headers, token, send_body)
        text = payload.decode("utf-8", "replace")
        try:
            error = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            error = None
        if not isinstance(error, dict):
            failures.append(f"{name}: not a JSON error: {got_status} {text[:200]}")
            continue
        if got_status != status or (code is not None and error.get("code") != code):
            failures.append(f"{name}: expected {status} {code}, got {got_status} {error}")
        if not error.get("message") or "Traceback" in text or str(engine["data_dir"]) in text:
            failures.append(f"{name}: message leaks internals or is empty: {error}")
        if got_status == 401 and got_headers.get("www-authenticate", got_headers.get("WWW-Authenticate")) != "Bearer":
            failures.append(f"{name}: 401 without WWW-Authenticate: Bearer")
        if not 400 <= got_status < 500:
            failures.append(f"{name}: {got_status} is not a client error")
    assert not failures, "\n".join(failures)
    assert not Path("/tmp/evil.png").exists()
    incoming = engine["data_dir"] / "incoming"
    assert list(incoming.iterdir()) == [], "refused uploads leave nothing behind"
    assert engine["client"].health()["status"] == "ok"
    # an endpoint that needs the engine to work still does
    assert engine["client"].info()["model_state"] == "ready"


def test_unreadable_bodies_ranges_and_lost_files_are_explained_in_json(engine, inputs):
    """Each refusal names its real cause, as JSON: a multipart limit, a push body nested too deeply or not
    UTF-8, a bad or unsatisfiable Range, a listed result file that is gone from disk."""
    url, client = engine["url"], engine["client"]

    def refusal(method, path, body=None, headers=None):
        status, got_headers, payload = raw_request(url, method, path, body, headers)
        return status, got_headers, json.loads(payload)["error"]

    body, content_type = multipart([("steps", "2")] * 1500)
    status, _, error = refusal("POST", "/api/v1/jobs", body, {"Content-Type": content_type})
    assert status == 400 and "Too many fields" in error["message"] and "multipart" in error["message"], error
    job = final(client, client.submit(inputs["anatomy"], [], steps=1)["id"])
    assert job["state"] == "succeeded", job
    push, as_json = f"/api/v1/jobs/{job['id']}/push", {"Content-Type": "application/json"}
    status, _, error = refusal("POST", push, b"[" * 5000 + b"]" * 5000, as_json)  # within the 16 KB limit
    assert status == 400 and "nested too deeply" in error["message"] and "JSON object" in error["message"], error
    status, _, error = refusal("POST", push, b"\xff\xfe{", as_json)
    assert status == 400 and "UTF-8" in error["message"], error

    sc = f"/api/v1/jobs/{job['id']}/files/sc.dcm"
    status, headers, payload = raw_request(url, "GET", sc, headers={"Range": "bytes=128-131"})
    assert status == 206 and payload == b"DICM"  # ranges still work
    status, _, error = refusal("GET", sc, headers={"Range": "bytes=abc"})
    assert status == 400 and error["code"] == "bad_range", error
    status, headers, error = refusal("GET", sc, headers={"Range": "bytes=999999999-"})
    assert status == 416 and error["code"] == "range_not_satisfiable" and headers["content-range"].startswith("bytes */")

    result = engine["data_dir"] / "jobs" / job["id"] / "result"
    (result / "preview.png").unlink()  # removed by hand (or by retention) while the job is still listed
    for path in (f"/api/v1/jobs/{job['id']}/files/preview.png", f"/api/v1/jobs/{job['id']}/result.zip"):
        status, _, error = refusal("GET", path)
        assert status == 404 and error["code"] == "file_not_found", (path, error)
    assert client.health()["status"] == "ok"


def test_a_refusal_names_the_files_as_the_client_sent_them(engine, inputs):
    """The engine stores uploads under its own names (anatomy.png, pathology-1.png); messages use the client's."""
    size = inputs["size"]
    odd = np.where(anatomy_array(size) == 3, 7, anatomy_array(size))
    small = region_array(size // 2)
    for files, expected, server_name in (
            ([("anatomy", "my-labels 7.png", "image/png", png_bytes(odd))], "my-labels 7.png contains label values [7]",
             "anatomy.png"),
            ([("anatomy", "image.dcm.png", "image/png", png_bytes(anatomy_array(size))),
              ("pathology", "nodule-region.png", "image/png", png_bytes(small))],
             "The pathology mask nodule-region.png is", "pathology-1.png")):
        fields = [("steps", "2")] + ([("finding", "pneumonia")] if len(files) > 1 else [])
        body, content_type = multipart(fields, files)
        status, _, payload = raw_request(engine["url"], "POST", "/api/v1/jobs", body, {"Content-Type": content_type})
        error = json.loads(payload)["error"]
        assert status == 422 and expected in error["message"] and server_name not in error["message"], error


def test_uploads_results_and_the_job_database_are_private_to_the_engines_user(engine, inputs):
    """An edit's upload is a patient's X-ray: no other local user may read the data directory's contents."""
    client = engine["client"]
    job = final(client, client.submit(inputs["anatomy"], [], steps=1)["id"])
    data_dir = engine["data_dir"]
    assert data_dir.stat().st_mode & 0o777 == 0o700  # the engine created it
    for folder in ("jobs", "incoming", "batches"):
        assert (data_dir / folder).stat().st_mode & 0o777 == 0o700, folder
    assert (data_dir / "jobs.sqlite3").stat().st_mode & 0o777 == 0o600
    assert (data_dir / "jobs" / job["id"]).is_dir()


def test_token_is_required_everywhere_but_health(engine):
    anonymous = EngineClient(engine["url"], token=None)
    assert anonymous.health()["status"] == "ok"
    for call in (anonymous.info, anonymous.jobs, lambda: anonymous.status(uuid.uuid4().hex), anonymous.shutdown):
        with pytest.raises(EngineError) as refused:
            call()
        assert refused.value.status == 401
    wrong = EngineClient(engine["url"], token=TOKEN[:-1] + "X")
    with pytest.raises(EngineError) as refused:
        wrong.info()
    assert refused.value.status == 401
    assert engine["process"].poll() is None, "a refused shutdown does not stop the engine"


def test_client_refuses_an_upload_over_the_engine_limit_with_413(engine, tmp_path):
    """Without the client's check the engine would cut the connection mid-upload (no readable answer)."""
    big = tmp_path / "anatomy.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(1_500_000))
    with pytest.raises(EngineError) as too_large:
        engine["client"].submit(big, [], steps=1)
    assert too_large.value.status == 413 and "1000000" in too_large.value.message
    wrong_token = EngineClient(engine["url"], token="a-wrong-token-123")
    with pytest.raises(EngineError) as unauthorized:
        wrong_token.submit(big, [], steps=1)
    assert unauthorized.value.status == 401


def test_a_finished_job_cannot_be_cancelled_and_unlisted_files_are_refused(engine, inputs):
    client = engine["client"]
    job = final(client, client.submit(inputs["anatomy"], [], steps=1)["id"])
    assert job["state"] == "succeeded", job
    with pytest.raises(EngineError) as conflict:
        client.cancel(job["id"])
    assert conflict.value.status == 409
    with pytest.raises(EngineError) as not_listed:
        client.download(job["id"], "../../jobs.sqlite3", engine["data_dir"].parent / "x")
    assert not_listed.value.status == 404


def test_submit_command_runs_a_job_and_writes_the_result(engine, inputs, tmp_path):
    out_dir = tmp_path / "result"
    env = dict(os.environ, XREAL_ENGINE_TOKEN=TOKEN)
    result = subprocess.run(
        [sys.executable, "-m", "xreal_engine.cli", "submit", "--url", engine["url"], "--anatomy", str(inputs["anatomy"]),
         "--pathology-mask", str(inputs["region"]), "--finding", "pneumothorax", "--steps", "2", "--seed", "5",
         "--out", str(out_dir)],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert {"sc.dcm", "seg.dcm", "preview.png", "provenance.json", "segments.json"} <= {
        p.name for p in out_dir.iterdir()}
    assert json.loads((out_dir / "provenance.json").read_text())["findings"] == ["pneumothorax"]

    refused = subprocess.run(
        [sys.executable, "-m", "xreal_engine.cli", "submit", "--url", engine["url"], "--anatomy", str(inputs["anatomy"]),
         "--pathology-mask", str(inputs["region"]), "--finding", "unicorn", "--out", str(tmp_path / "never")],
        capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 2 and "unicorn" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "never").exists()


def test_regenerating_at_the_same_seed_reuses_the_anatomy_stage_bit_for_bit(engine, inputs, tmp_path):
    """The Slicer user's loop: the same anatomy and seed, another finding. The second job's anatomy
    stage is the first's (model/anatomy_cache.py), and its image is what a fresh ``generate`` gives."""
    import pydicom

    client = engine["client"]
    seed = 4242  # no other test in this file uses it
    first = final(client, client.submit(inputs["anatomy"], [(inputs["region"], "cardiomegaly")], seed=seed,
                                        steps=6)["id"])
    second = final(client, client.submit(inputs["anatomy"], [(inputs["region"], "pneumonia")], seed=seed,
                                         steps=6)["id"])
    assert first["state"] == second["state"] == "succeeded", (first, second)
    reused = []
    for job in (first, second):
        provenance = json.loads(client.download(job["id"], "provenance.json", tmp_path / job["id"]).read_text())
        reused.append(provenance["anatomy_stage_reused"])
    assert reused == [False, True]
    assert provenance["unet_runtime"] == "frozen"  # serve freezes the UNet on a CPU unless --eager

    fresh = tmp_path / "fresh"
    result = subprocess.run(
        [sys.executable, "-m", "xreal_engine.cli", "generate", "--model", str(engine["model_dir"]),
         "--anatomy", str(inputs["anatomy"]), "--pathology-mask", str(inputs["region"]), "--finding", "pneumonia",
         "--seed", str(seed), "--steps", "6", "--out", str(fresh)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    assert json.loads((fresh / "provenance.json").read_text())["anatomy_stage_reused"] is False
    served = pydicom.dcmread(client.download(second["id"], "sc.dcm", tmp_path / "served")).pixel_array
    np.testing.assert_array_equal(served, pydicom.dcmread(fresh / "sc.dcm").pixel_array)


def test_shutdown_endpoint_stops_the_engine(engine):
    """Runs last in this file: the Slicer launcher stops a local engine this way."""
    assert engine["client"].shutdown()["status"] == "shutting down"
    assert engine["process"].wait(timeout=60) == 0
    with pytest.raises(EngineUnreachable):
        EngineClient(engine["url"], token=TOKEN, retries=1, timeout=5).health()


# ----------------------------------------------------------------------------- start-up and restart


def test_non_loopback_host_without_token_refuses_to_start(tiny_model, tmp_path):
    env = dict(os.environ)
    env.pop("XREAL_ENGINE_TOKEN", None)
    result = subprocess.run(
        [sys.executable, "-m", "xreal_engine.cli", "serve", "--host", "0.0.0.0", "--port", "0",
         "--model", str(tiny_model), "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert "without an access token" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == "" and not (tmp_path / "data").exists()


def test_kill9_and_restart_loses_nothing(tiny_model, inputs, tmp_path):
    """Finished results survive, queued jobs run, the running job is failed as interrupted."""
    data_dir = tmp_path / "data"
    process, url = start_engine(tiny_model, data_dir, "--max-queued-jobs", "10")
    try:
        client = EngineClient(url, timeout=60)
        wait_until_ready(client)
        done = final(client, client.submit(inputs["anatomy"], [(inputs["region"], "nodule")], steps=2)["id"])
        assert done["state"] == "succeeded", done
        sc_before = client.download(done["id"], "sc.dcm", tmp_path / "before.dcm").read_bytes()
        running = client.submit(inputs["anatomy"], [(inputs["region"], "edema")], steps=400)
        queued = [client.submit(inputs["anatomy"], [(inputs["region"], "mass")], steps=1, seed=i)
                  for i in range(2)]
        deadline = time.monotonic() + 120
        while client.status(running["id"])["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        positions = [client.status(job["id"]) for job in queued]
        assert [(job["state"], job["queue_position"]) for job in positions] == [("queued", 1), ("queued", 2)]
        assert positions[1]["eta_seconds"] > positions[0]["eta_seconds"] > 0  # from the finished job's run time
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        stop_engine(process)

    process, url = start_engine(tiny_model, data_dir, "--max-queued-jobs", "10")
    try:
        client = EngineClient(url, timeout=60)
        interrupted = client.status(running["id"])
        assert interrupted["state"] == "failed" and interrupted["error"]["code"] == "interrupted", interrupted
        assert "interrupted" in interrupted["error"]["message"]
        assert list((data_dir / "jobs" / running["id"]).iterdir()) == []
        assert sorted(p.name for p in (data_dir / "jobs" / done["id"]).iterdir()) == ["result"]
        survived = client.status(done["id"])
        assert survived["state"] == "succeeded" and survived["files"] == done["files"]
        assert client.download(done["id"], "sc.dcm", tmp_path / "after.dcm").read_bytes() == sc_before
        with zipfile.ZipFile(io.BytesIO(_get(url, f"/api/v1/jobs/{done['id']}/result.zip"))) as archive:
            assert sorted(archive.namelist()) == sorted(done["files"])
        for job in queued:
            assert final(client, job["id"])["state"] == "succeeded"
    finally:
        stop_engine(process)


def _get(url: str, path: str) -> bytes:
    from xreal_engine.client import read_local_token

    # an engine started without a token made one up and left it for local clients
    status, _, body = raw_request(url, "GET", path, token=read_local_token(urllib.parse.urlsplit(url).port))
    assert status == 200, body[:300]
    return body
