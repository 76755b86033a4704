"""PACS integration against a real Orthanc (DICOMweb plugin + DIMSE) on loopback.

One Orthanc process serves the whole module; tests that need it down stop and
restart it themselves. Data: a synthetic SC + SEG pair written by
xreal_engine.dicom.write_dicom_pair, and real DX images built from the Hannover
chest X-rays in ../shared/data/cxr.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.uid import generate_uid

from orthanc import free_port, orthanc_available, running_orthanc, write_dx
from xreal_engine import cli
from xreal_engine.errors import InputError
from xreal_engine.pacs.config import (CONFIG_ENV, PacsError, TransientPacsError, list_nodes, load_config,
                                      parse_config)
from xreal_engine.pacs.transfer import fetch_source, push_files, push_result

CALLING_AET = "XREALTEST"
FAST = {"retries": 3, "backoff_s": 0.05}  # real backoff, short waits
TEMPLATES = Path(__file__).resolve().parents[1] / "Resources" / "Templates"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def orthanc():
    if not orthanc_available():
        pytest.skip("Orthanc and its DICOMweb plugin are not installed (make system-deps)")
    with running_orthanc(modalities={"xreal": (CALLING_AET, "127.0.0.1", free_port())}) as server:
        yield server


@pytest.fixture(scope="module")
def config(orthanc):
    return parse_config({"nodes": {
        "orthanc-web": {"type": "dicomweb", "url": orthanc.dicomweb_url,
                        "headers": {"Authorization": orthanc.authorization_header}, "timeout_s": 10},
        "orthanc-dimse": {"type": "dimse", "host": "127.0.0.1", "port": orthanc.dicom_port,
                          "called_aet": orthanc.aet, "calling_aet": CALLING_AET, "timeout_s": 10},
        "orthanc-move": {"type": "dimse", "host": "127.0.0.1", "port": orthanc.dicom_port, "called_aet": orthanc.aet,
                         "calling_aet": CALLING_AET, "retrieve": "c-move", "move_port": orthanc.modalities["xreal"][2],
                         "move_bind_address": "127.0.0.1", "timeout_s": 10},
    }})


@pytest.fixture(scope="module")
def web_client(orthanc):
    return DICOMwebClient(url=orthanc.dicomweb_url, headers={"Authorization": orthanc.authorization_header})


def make_result(out_dir: Path, seed: int = 0) -> Path:
    """A synthetic SC + SEG pair as the engine writes it (random image, one lung and one finding)."""
    from xreal_engine.io.dicom import SegmentSpec, write_dicom_pair

    rng = np.random.default_rng(seed)
    image = rng.random((256, 256), dtype=np.float32)
    lung = np.zeros((256, 256), bool)
    lung[60:200, 140:220] = True
    finding = np.zeros((256, 256), bool)
    finding[100:140, 150:190] = True
    provenance = {"model_id": "pacs-test", "seed": seed, "findings": ["cardiomegaly"]}
    write_dicom_pair(out_dir, image, (1.5, 1.5), [SegmentSpec(lung, label=1), SegmentSpec(finding, finding="cardiomegaly")],
                     provenance)
    return out_dir


def file_digests(paths) -> dict:
    return {str(path): hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in paths}


def make_dx(path: Path, png: Path, study: str, series: str, instance_number: int) -> pydicom.Dataset:
    """A 12-bit DX image from a real chest X-ray PNG."""
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.uint16) * 16
    return write_dx(path, pixels, study=study, series=series, instance_number=instance_number,
                    patient=("Test^Hannover", "HN-TEST-1"))


@pytest.fixture(scope="module")
def source_series(orthanc, shared_dir, tmp_path_factory):
    """A DX series of two real X-rays in Orthanc; Instance Number 1 is uploaded second."""
    folder = tmp_path_factory.mktemp("dx")
    images = sorted((shared_dir / "data" / "cxr" / "hannover_unlabeled" / "images").glob("*.png"))[:2]
    study, series = generate_uid(), generate_uid()
    second = make_dx(folder / "second.dcm", images[1], study, series, instance_number=2)
    first = make_dx(folder / "first.dcm", images[0], study, series, instance_number=1)
    orthanc.upload(folder / "second.dcm")
    orthanc.upload(folder / "first.dcm")
    return {"study": study, "series": series, "first": first, "second": second}


# ----------------------------------------------------------------------------- configuration


def test_config_files_env_and_refusals(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PACS_TOKEN", "secret-token")
    yaml_file = tmp_path / "pacs.yaml"
    yaml_file.write_text("destinations:\n  web:\n    type: dicomweb\n    url: http://127.0.0.1:8042/dicom-web/\n"
                         "    headers: {Authorization: 'Bearer ${PACS_TOKEN}'}\n"
                         "sources:\n  archive: {type: dimse, host: pacs.local, port: 104, called_aet: ARCHIVE}\n")
    config = load_config(yaml_file)
    assert config.nodes["web"].headers == {"Authorization": "Bearer secret-token"}
    assert config.nodes["web"].url == "http://127.0.0.1:8042/dicom-web"
    assert config.nodes["archive"].calling_aet == "XREAL"
    nodes = list_nodes(config)
    assert [(n["name"], n["type"], n["can_push"], n["can_fetch"]) for n in nodes] == [
        ("archive", "dimse", False, True), ("web", "dicomweb", True, False)]
    assert "secret-token" not in json.dumps(nodes) and "secret-token" not in repr(config)

    json_file = tmp_path / "pacs.json"
    json_file.write_text(json.dumps({"nodes": {"both": {"type": "dimse", "host": "h", "port": 11112, "called_aet": "A"}}}))
    monkeypatch.setenv(CONFIG_ENV, str(json_file))
    assert list_nodes() == [{"name": "both", "type": "dimse", "can_push": True, "can_fetch": True,
                                  "address": "A@h:11112"}]
    monkeypatch.delenv(CONFIG_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "empty-home"))
    assert load_config().nodes == {}  # no default file: no PACS configured

    with pytest.raises(PacsError, match=r"Unknown PACS destination 'nope'.*configured destinations: web\."):
        config.node("nope", "destination")
    with pytest.raises(PacsError, match="source only"):
        config.node("archive", "destination")
    with pytest.raises(PacsError, match="of type dimse, not dicomweb"):
        config.node("dicomweb:archive", "source")
    assert config.node("dimse:archive", "source").port == 104
    bad_entries = {
        '{"nodes": {"x": {"type": "ftp"}}}': "needs \"type\"",
        '{"nodes": {"x": {"type": "dimse", "host": "h", "port": 70000, "called_aet": "A"}}}': "port",
        '{"nodes": {"x": {"type": "dimse", "host": "h", "port": 104, "called_aet": "WAY-TOO-LONG-AE-TITLE"}}}': "AE title",
        '{"nodes": {"x": {"type": "dicomweb", "url": "ftp://x"}}}': "http",
        '{"nodes": {"x": {"type": "dicomweb", "url": "http://user:pw@x/dicom-web"}}}': "Authorization header",
        '{"nodes": {"x": {"type": "dicomweb", "url": "http://x", "passwd": 1}}}': "unknown settings.*passwd",
        '{"nodes": {"x": {"type": "dicomweb", "url": "http://x", "headers": {"A": "${NOT_SET_ANYWHERE}"}}}}': "NOT_SET",
        '{"targets": {}}': "unknown sections",
        '{"nodes": {"x": {"type": "dimse", "host": "h", "port": 104, "called_aet": "A", "retrieve": "c-move"}}}': "move_port",
        '{"nodes": {"x": {"type": "dimse", "host": "h", "port": 104, "called_aet": "A", "retrieve": "wado"}}}': "c-get",
        '{"nodes": ': "not valid JSON",
        '{"nodes": {"x": {"type": "dicomweb", "url": "http://x/dicom-web?access_token=SECRET"}}}': "query or fragment",
    }
    for text, message in bad_entries.items():
        json_file.write_text(text)
        with pytest.raises(PacsError, match=message):
            load_config(json_file)
    with pytest.raises(PacsError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    with pytest.raises(PacsError, match="is a directory"):
        load_config(tmp_path)

    assert cli.main(["push", "--list", "--pacs-config", str(yaml_file)]) == 0
    listing = capsys.readouterr().out
    assert "archive\tdimse\tfetch\tARCHIVE@pacs.local:104" in listing and "web\tdicomweb\tpush" in listing
    assert "secret-token" not in listing
    assert cli.main(["push", "--to", "nope", "--pacs-config", str(yaml_file), str(tmp_path)]) == 2
    assert "Unknown PACS destination 'nope'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- push


def test_stow_push_then_qido_finds_and_wado_returns_identical_pixels(orthanc, config, web_client, tmp_path):
    result = make_result(tmp_path / "result")
    files = [result / "sc.dcm", result / "seg.dcm"]
    before = file_digests(files)
    report = push_result("orthanc-web", result, config=config, **FAST)
    assert report["accepted"] == 2 and report["failed"] == 0 and report["ok"], report
    assert [item["status"] for item in report["instances"]] == ["accepted", "accepted"]
    assert all(item["detail"].startswith("HTTP 200") and item["attempts"] == 1 for item in report["instances"])
    assert file_digests(files) == before  # local copy untouched

    local = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(path) for path in files)}
    study = next(iter(local.values())).StudyInstanceUID
    found = web_client.search_for_instances(study_instance_uid=study)
    assert {item["00080018"]["Value"][0] for item in found} == set(local)
    for uid, ds in local.items():
        retrieved = web_client.retrieve_instance(study, ds.SeriesInstanceUID, uid)
        assert retrieved.PixelData == ds.PixelData, f"pixel data of {ds.Modality} changed in the PACS"


def test_synthetic_markings_survive_round_trip_via_push_command(orthanc, config, web_client, tmp_path, capsys):
    result = make_result(tmp_path / "result", seed=1)
    config_file = tmp_path / "pacs.json"
    config_file.write_text(json.dumps({"destinations": {"pacs": {
        "type": "dicomweb", "url": orthanc.dicomweb_url, "headers": {"Authorization": orthanc.authorization_header}}}}))
    exit_code = cli.main(["push", "--to", "pacs", "--pacs-config", str(config_file), str(result)])
    table = capsys.readouterr().out
    assert exit_code == 0, table
    assert table.count("accepted") >= 2 and "2 accepted, 0 failed" in table

    sc, seg = pydicom.dcmread(result / "sc.dcm"), pydicom.dcmread(result / "seg.dcm")
    back_sc = web_client.retrieve_instance(sc.StudyInstanceUID, sc.SeriesInstanceUID, sc.SOPInstanceUID)
    back_seg = web_client.retrieve_instance(seg.StudyInstanceUID, seg.SeriesInstanceUID, seg.SOPInstanceUID)
    assert back_sc.SyntheticData == "YES" and back_seg.SyntheticData == "YES"
    assert back_sc.ConversionType == "SYN"
    assert list(back_sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert back_sc.SeriesDescription.upper().startswith("SYNTHETIC")
    assert back_seg.SeriesDescription.upper().startswith("SYNTHETIC")
    assert back_sc.BurnedInAnnotation == "NO"
    # The series-level search shows the marking too (what a PACS viewer lists).
    series = web_client.search_for_series(sc.StudyInstanceUID, fields=["SeriesDescription"])
    assert all(item["0008103E"]["Value"][0].upper().startswith("SYNTHETIC") for item in series)


def test_cstore_push_over_dimse(orthanc, config, web_client, tmp_path):
    result = make_result(tmp_path / "result", seed=2)
    files = [result / "sc.dcm", result / "seg.dcm"]
    before = file_digests(files)
    report = push_files("orthanc-dimse", files, config=config, **FAST)
    assert report["accepted"] == 2, report
    assert all(item["detail"] == "C-STORE status 0x0000 Success" for item in report["instances"])
    assert file_digests(files) == before
    sc = pydicom.dcmread(files[0])
    back = web_client.retrieve_instance(sc.StudyInstanceUID, sc.SeriesInstanceUID, sc.SOPInstanceUID)
    assert back.PixelData == sc.PixelData and back.SyntheticData == "YES"


def test_push_refuses_non_dicom_before_sending_anything(orthanc, config, tmp_path):
    result = make_result(tmp_path / "result", seed=3)
    not_dicom = tmp_path / "notes.dcm"
    not_dicom.write_text("not a DICOM file")
    count = orthanc.instance_count()
    with pytest.raises(InputError, match="notes.dcm is not a readable DICOM file"):
        push_files("orthanc-web", [result / "sc.dcm", not_dicom], config=config, **FAST)
    assert orthanc.instance_count() == count
    with pytest.raises(InputError, match="has no seg.dcm"):
        (result / "seg.dcm").rename(tmp_path / "moved.dcm")
        push_result("orthanc-web", result, config=config)


# ----------------------------------------------------------------------------- failures and retries


def _variant(source: Path, out: Path, sop_class: str | None = None, drop: str | None = None) -> Path:
    """A copy of a result file that a PACS must refuse (private SOP class, or no Study Instance UID)."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if sop_class:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    if drop:
        delattr(ds, drop)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_instance_refusals_fail_that_instance_only(orthanc, config, tmp_path, capsys):
    result = make_result(tmp_path / "result", seed=9)
    no_study = _variant(result / "sc.dcm", tmp_path / "no-study.dcm", drop="StudyInstanceUID")
    private = _variant(result / "sc.dcm", tmp_path / "private.dcm", sop_class="1.2.826.0.1.3680043.10.1234.1")

    report = push_files("orthanc-web", [no_study, result / "sc.dcm"], config=config, **FAST)
    assert [item["status"] for item in report["instances"]] == ["failed", "accepted"] and not report["ok"]
    assert report["instances"][0]["detail"].startswith("HTTP 400; failure reason 0xC000")  # STOW FailedSOPSequence
    assert report["instances"][0]["attempts"] == 1

    report = push_files("orthanc-dimse", [no_study, private, result / "seg.dcm"], config=config, **FAST)
    assert [item["status"] for item in report["instances"]] == ["failed", "failed", "accepted"]
    assert "C-STORE 0xA700" in report["instances"][0]["detail"]  # Orthanc's status for an unusable object
    assert report["instances"][0]["attempts"] == 4  # 0xA7xx "out of resources" is transient by the standard
    assert "no presentation context" in report["instances"][1]["detail"]

    with pytest.raises(PacsError, match="accepts none of the proposed SOP classes") as caught:
        push_files("orthanc-dimse", [private], config=config, **FAST)
    assert caught.value.attempts == 1

    config_file = tmp_path / "pacs.json"
    config_file.write_text(json.dumps({"destinations": {"pacs": {
        "type": "dicomweb", "url": orthanc.dicomweb_url, "headers": {"Authorization": orthanc.authorization_header}}}}))
    exit_code = cli.main(["push", "--to", "pacs", "--pacs-config", str(config_file), str(no_study), str(result / "sc.dcm")])
    table = capsys.readouterr().out
    assert exit_code == 1, "a push with a failed instance must exit non-zero"
    assert "1 accepted, 1 failed" in table and "0xC000" in table



def test_refusals_are_clear_and_not_retried(orthanc, tmp_path):
    result = make_result(tmp_path / "result", seed=4)
    files = [result / "sc.dcm", result / "seg.dcm"]
    before = file_digests(files)
    config = parse_config({"destinations": {
        "wrong-password": {"type": "dicomweb", "url": orthanc.dicomweb_url,
                           "headers": {"Authorization": "Basic eHJlYWw6d3Jvbmc="}},
        "wrong-path": {"type": "dicomweb", "url": orthanc.url + "/no-such-dicom-web",
                       "headers": {"Authorization": orthanc.authorization_header}},
        "wrong-aet": {"type": "dimse", "host": "127.0.0.1", "port": orthanc.dicom_port, "called_aet": "NOT_ORTHANC",
                      "calling_aet": CALLING_AET},
    }})
    expected = {"wrong-password": "refused STOW-RS: HTTP 401", "wrong-path": "refused STOW-RS: HTTP 404",
                "wrong-aet": "rejected the association for C-STORE permanently"}
    for name, message in expected.items():
        with pytest.raises(PacsError, match=message) as caught:
            push_files(name, files, config=config, retries=3, backoff_s=2.0)
        assert caught.value.attempts == 1, f"{name}: a permanent refusal must not be retried"
        assert not isinstance(caught.value, TransientPacsError)
        assert "\n" not in str(caught.value)
        assert [item["status"] for item in caught.value.report["instances"]] == ["failed", "failed"]
        assert caught.value.report["instances"][1]["detail"] == "not sent"
    assert file_digests(files) == before


def test_unreachable_destination_is_retried_then_reported(tmp_path, capsys):
    result = make_result(tmp_path / "result", seed=5)
    files = [result / "sc.dcm", result / "seg.dcm"]
    before = file_digests(files)
    closed_port = free_port()
    config_file = tmp_path / "pacs.json"
    config_file.write_text(json.dumps({"destinations": {
        "web-down": {"type": "dicomweb", "url": f"http://127.0.0.1:{closed_port}/dicom-web", "timeout_s": 2},
        "dimse-down": {"type": "dimse", "host": "127.0.0.1", "port": closed_port, "called_aet": "ORTHANC",
                       "timeout_s": 2},
    }}))
    config = load_config(config_file)
    for name, message in (("web-down", "connection refused"), ("dimse-down", "cannot open a DICOM association")):
        with pytest.raises(PacsError, match=f"failed after 4 attempts: .*{message}") as caught:
            push_files(name, files, config=config, **FAST)
        assert caught.value.attempts == 4
        assert isinstance(caught.value, TransientPacsError)  # an outage, not the request's fault
        assert caught.value.report["instances"][0]["attempts"] == 4
    exit_code = cli.main(["push", "--to", "web-down", "--pacs-config", str(config_file), "--retries", "1", str(result)])
    captured = capsys.readouterr()
    assert exit_code == 2
    assert "failed after 2 attempts" in captured.err and captured.err.count("\n") == 1
    assert "0 accepted, 2 failed" in captured.out
    assert file_digests(files) == before
    # generate --push-to: the image is made and kept, so the failed push is exit 1 (as submit), and said so
    from xreal_engine.model.random_model import create_random_model

    model = create_random_model(tmp_path / "model", preset="tiny")
    out = tmp_path / "generated"
    exit_code = cli.main(["generate", "--model", str(model), "--anatomy", str(TEMPLATES / "anatomy_01.png"),
                          "--steps", "2", "--anatomy-steps", "1", "--seed", "0", "--device", "cpu",
                          "--pacs-config", str(config_file), "--push-to", "web-down", "--out", str(out)])
    captured = capsys.readouterr()
    assert exit_code == 1, captured.err
    assert f"the result is kept in {out}/, but sending it failed: " in captured.err and "failed after" in captured.err
    assert (out / "sc.dcm").is_file() and (out / "seg.dcm").is_file()


class _BusyHandler(http.server.BaseHTTPRequestHandler):
    """Answers every request 503 with a JSON message, like a PACS under maintenance."""

    def do_POST(self):  # noqa: N802 (http.server naming)
        self.server.requests_seen += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        body = json.dumps({"Message": "archive is in maintenance"}).encode()
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _SilentHandler(_BusyHandler):
    """Accepts the request and never answers in time, like a hung PACS."""

    def do_POST(self):  # noqa: N802
        self.server.requests_seen += 1
        time.sleep(1.0)


class _AnswerHandler(_BusyHandler):
    """Answers 200 with a fixed body, like a login page of a proxy in front of the PACS (or a broken PACS)."""

    content_type, body = "text/html", b"<html><body>Please sign in</body></html>"

    def do_POST(self):  # noqa: N802
        self.server.requests_seen += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        self.send_response(200)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


class _JsonListHandler(_AnswerHandler):
    content_type, body = "application/dicom+json", b"[]"


@pytest.mark.parametrize("handler, outcome", [
    (_AnswerHandler, "HTTP 200 with a text/html answer, not a STOW-RS response"),
    (_JsonListHandler, "answered STOW-RS with something that is not a DICOM response")])
def test_an_answer_that_is_no_stow_response_is_no_success(tmp_path, handler, outcome):
    """A 200 is not a stored instance: a login page must not be reported as 'accepted'."""
    result = make_result(tmp_path / "result", seed=7)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests_seen = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = {"destinations": {"proxy": {"type": "dicomweb", "url": f"http://127.0.0.1:{server.server_port}/dw"}}}
        try:
            report = push_files("proxy", [result / "sc.dcm"], config=config, retries=0, backoff_s=0.05)
        except PacsError as error:
            assert outcome in str(error) and "\n" not in str(error)
            report = error.report
        assert [item["status"] for item in report["instances"]] == ["failed"]
        assert report["accepted"] == 0
        if handler is _AnswerHandler:
            assert report["instances"][0]["detail"] == outcome
    finally:
        server.shutdown()
        server.server_close()


def test_a_dimse_host_that_does_not_resolve_is_named_and_not_retried(tmp_path):
    result = make_result(tmp_path / "result", seed=8)
    config = {"destinations": {"nowhere": {"type": "dimse", "host": "no-such-host.invalid", "port": 104,
                                           "called_aet": "ORTHANC", "timeout_s": 2}}}
    with pytest.raises(PacsError, match=r"cannot reach ORTHANC@no-such-host.invalid:104 for C-STORE \(host not found\)") \
            as caught:
        push_files("nowhere", [result / "sc.dcm"], config=config, retries=3, backoff_s=0.05)
    assert caught.value.attempts == 1 and not isinstance(caught.value, TransientPacsError)


@pytest.mark.parametrize("handler, message", [(_BusyHandler, "HTTP 503.*archive is in maintenance"),
                                              (_SilentHandler, "did not answer STOW-RS within 0.3 s")])
def test_busy_or_hung_http_server_is_retried(tmp_path, handler, message):
    result = make_result(tmp_path / "result", seed=6)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests_seen = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        config = {"destinations": {"busy": {"type": "dicomweb", "timeout_s": 0.3,
                                            "url": f"http://127.0.0.1:{server.server_port}/dicom-web"}}}
        with pytest.raises(PacsError, match=f"after 3 attempts: .*{message}"):
            push_files("busy", [result / "sc.dcm"], config=config, retries=2, backoff_s=0.05)
        assert server.requests_seen == 3
    finally:
        server.shutdown()
        server.server_close()


def test_orthanc_down_then_back_push_succeeds_after_retries(orthanc, config, tmp_path):
    """Orthanc stopped → a clear error after all retries; restarted during backoff → the push goes through."""
    result = make_result(tmp_path / "result", seed=7)
    files = [result / "sc.dcm", result / "seg.dcm"]
    before = file_digests(files)
    orthanc.stop()
    try:
        with pytest.raises(PacsError, match="failed after 3 attempts") as caught:
            push_files("orthanc-dimse", files, config=config, retries=2, backoff_s=0.05)
        assert caught.value.attempts == 3
        restarter = threading.Timer(0.5, orthanc.start)
        restarter.start()
        report = push_files("orthanc-web", files, config=config, retries=6, backoff_s=1.0)
        restarter.join()
    finally:
        if orthanc.process is None:
            orthanc.start()
    assert report["accepted"] == 2
    assert report["instances"][0]["attempts"] > 1, "the first instance should have needed a retry"
    assert file_digests(files) == before


# ----------------------------------------------------------------------------- fetch


def test_fetch_source_dicomweb_picks_first_image_and_writes_it(orthanc, config, source_series, tmp_path):
    from xreal_engine.io.dicom import read_xray

    path = fetch_source("orthanc-web", source_series["study"], source_series["series"], dest_dir=tmp_path, config=config,
                        **FAST)
    first = source_series["first"]
    assert path == tmp_path / f"{first.SOPInstanceUID}.dcm"
    fetched = pydicom.dcmread(path)
    assert fetched.InstanceNumber == 1 and fetched.PixelData == first.PixelData
    assert read_xray(path).pixels.shape == (256, 256)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary leftovers

    second = source_series["second"]
    path = fetch_source("dicomweb:orthanc-web", source_series["study"], source_series["series"],
                        instance=second.SOPInstanceUID, dest_dir=tmp_path / "second", config=config, **FAST)
    assert pydicom.dcmread(path).SOPInstanceUID == second.SOPInstanceUID


@pytest.mark.parametrize("source", ["orthanc-dimse", "orthanc-move"])
def test_fetch_source_dimse_cfind_then_cget_or_cmove(orthanc, config, source_series, tmp_path, source):
    path = fetch_source(source, source_series["study"], source_series["series"], dest_dir=tmp_path,
                        config=config, **FAST)
    fetched, first = pydicom.dcmread(path), source_series["first"]
    assert fetched.SOPInstanceUID == first.SOPInstanceUID and fetched.PixelData == first.PixelData


def test_fetch_source_refusals(orthanc, config, source_series, tmp_path):
    result = make_result(tmp_path / "result", seed=8)
    push_result("orthanc-web", result, config=config, **FAST)
    seg = pydicom.dcmread(result / "seg.dcm")
    for source in ("orthanc-web", "orthanc-dimse"):
        with pytest.raises(InputError, match="single-frame X-ray"):  # a series holding only a SEG
            fetch_source(source, seg.StudyInstanceUID, seg.SeriesInstanceUID, dest_dir=tmp_path, config=config)
        with pytest.raises(PacsError, match="No instances were found"):
            fetch_source(source, source_series["study"], generate_uid(), dest_dir=tmp_path, config=config)
        with pytest.raises(PacsError, match="was not found"):
            fetch_source(source, source_series["study"], source_series["series"], instance=generate_uid(),
                         dest_dir=tmp_path, config=config)
    stranger = parse_config({"sources": {"pacs": {"type": "dimse", "host": "127.0.0.1", "port": orthanc.dicom_port,
                                                  "called_aet": orthanc.aet, "calling_aet": "STRANGER"}}})
    with pytest.raises(TransientPacsError, match="after 2 attempts.*calling AE title STRANGER"):
        fetch_source("pacs", source_series["study"], source_series["series"], dest_dir=tmp_path, config=stranger,
                     retries=1, backoff_s=0.05)
    with pytest.raises(InputError, match="study UID.*must be a DICOM UID"):
        fetch_source("orthanc-web", "1.2.3/../x", source_series["series"], dest_dir=tmp_path, config=config)
    assert not list(tmp_path.glob("*.dcm"))


def test_generate_from_pacs_source_joins_the_source_study(orthanc, config, web_client, source_series, tmp_path, capsys):
    """`xreal-engine generate --source` edits a real X-ray pulled from the PACS; the result goes back into its study."""
    from xreal_engine.model.random_model import create_random_model

    model = create_random_model(tmp_path / "model", preset="tiny")
    region = np.zeros((256, 256), np.uint8)
    region[110:150, 150:190] = 255
    Image.fromarray(region).save(tmp_path / "region.png")
    config_file = tmp_path / "pacs.json"
    config_file.write_text(json.dumps({"nodes": {"orthanc": {
        "type": "dicomweb", "url": orthanc.dicomweb_url, "headers": {"Authorization": orthanc.authorization_header}}}}))
    study, series, first = source_series["study"], source_series["series"], source_series["first"]
    out = tmp_path / "result"
    exit_code = cli.main(["generate", "--model", str(model), "--source", "dicomweb:orthanc", "--study", study,
                          "--series", series, "--pathology-mask", str(tmp_path / "region.png"), "--finding", "cardiomegaly",
                          "--steps", "2", "--anatomy-steps", "1", "--seed", "0", "--device", "cpu", "--pacs-config", str(config_file),
                          "--push-to", "orthanc", "--out", str(out)])
    printed = capsys.readouterr()
    assert exit_code == 0, printed.err
    assert "2 accepted, 0 failed" in printed.out
    sc, seg = pydicom.dcmread(out / "sc.dcm"), pydicom.dcmread(out / "seg.dcm")
    assert sc.StudyInstanceUID == seg.StudyInstanceUID == study
    assert sc.PatientID == first.PatientID
    assert len({sc.SeriesInstanceUID, seg.SeriesInstanceUID, series}) == 3  # new series, not the source's
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert sc.SyntheticData == "YES"

    in_study = {item["0020000E"]["Value"][0] for item in web_client.search_for_series(study)}
    assert in_study == {series, sc.SeriesInstanceUID, seg.SeriesInstanceUID}


# ----------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def https_dicomweb(orthanc, tmp_path_factory):
    """Orthanc's DICOMweb behind a TLS terminator with a self-signed certificate: (https URL, CA bundle)."""
    import shutil

    from orthanc import tls_proxy, write_self_signed_certificate

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate (make system-deps)")
    certificate = write_self_signed_certificate(tmp_path_factory.mktemp("tls") / "pacs.pem")
    with tls_proxy(orthanc.http_port, certificate) as port:
        yield f"https://127.0.0.1:{port}/dicom-web", certificate


def test_push_over_https_with_the_pacs_ca_bundle_and_a_clear_refusal_without(orthanc, https_dicomweb, web_client, tmp_path,
                                                                              monkeypatch):
    import requests

    url, ca_bundle = https_dicomweb
    # Many sites set this; requests would let it override a configured CA bundle (requests issue #3829).
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", requests.certs.where())
    result = make_result(tmp_path / "result", seed=8)
    files = [result / "sc.dcm", result / "seg.dcm"]
    node = {"type": "dicomweb", "url": url, "timeout_s": 10, "headers": {"Authorization": orthanc.authorization_header}}
    config = parse_config({"destinations": {"with-ca": dict(node, verify_tls=str(ca_bundle)), "system-cas": node}})
    study = pydicom.dcmread(files[0]).StudyInstanceUID

    with pytest.raises(PacsError, match="TLS with .* failed for STOW-RS .*certificate verify failed.*verify_tls") as caught:
        push_files("system-cas", files, config=config, retries=3, backoff_s=2.0)
    assert caught.value.attempts == 1 and not isinstance(caught.value, TransientPacsError)
    assert web_client.search_for_instances(study_instance_uid=study) == []

    report = push_files("with-ca", files, config=config, **FAST)
    assert report["ok"] and report["accepted"] == 2, report
    assert len(web_client.search_for_instances(study_instance_uid=study)) == 2


def test_a_rejection_left_unread_by_pynetdicom_is_still_permanent():
    """pynetdicom's requestor may abort on a closed socket before it reads the peer's A-ASSOCIATE-RJ
    (seen in CI under load): the rejection waiting in the DUL queue decides, not "connection refused"."""
    import queue
    from types import SimpleNamespace

    from pynetdicom.pdu_primitives import A_ASSOCIATE

    from xreal_engine.pacs.dimse import _late_rejection

    rejection = A_ASSOCIATE()
    rejection.result, rejection.result_source, rejection.diagnostic = 0x01, 0x01, 0x07
    waiting = queue.Queue()
    for primitive in (object(), rejection):
        waiting.put(primitive)
    dul = SimpleNamespace(receive_pdu=lambda wait=False: None if waiting.empty() else waiting.get_nowait())
    found = _late_rejection(SimpleNamespace(dul=dul))
    assert found is rejection and "Called AE title not recognised" in found.reason_str
    assert _late_rejection(SimpleNamespace(dul=dul)) is None


def test_the_source_pick_passes_over_colour_images_the_pacs_announces():
    """An RGB screenshot SC first in the series must not hide the grey DX after it."""
    from xreal_engine.pacs.config import PacsNode
    from xreal_engine.pacs.instances import pick_xray

    node = PacsNode("archive", "dicomweb", False, True, url="http://pacs/dicom-web")
    screenshot = {"sop_instance_uid": "1.2.3.1", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.7", "instance_number": 1,
                  "rows": 512, "frames": None, "photometric": "RGB"}
    dx = {"sop_instance_uid": "1.2.3.2", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1", "instance_number": 2,
          "rows": 512, "frames": None, "photometric": "MONOCHROME1"}
    silent = {**dx, "sop_instance_uid": "1.2.3.3", "instance_number": 3, "photometric": None}  # not answered
    assert pick_xray([screenshot, dx, silent], node, "1.2", "1.2.3", None) is dx
    assert pick_xray([screenshot, silent], node, "1.2", "1.2.3", None) is silent
    with pytest.raises(InputError, match="Instance 1.2.3.1 is not a single-frame X-ray image"):
        pick_xray([screenshot, dx], node, "1.2", "1.2.3", "1.2.3.1")
