"""The service's PACS hooks against a real Orthanc on loopback: ``push_to`` sends the
result after success (and reports it in the job), ``source`` fetches the X-ray to edit,
unknown names are refused with a 4xx before anything is queued.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from orthanc import orthanc_available, running_orthanc, write_dx
from test_server_service import final, inputs, start_engine, stop_engine, tiny_model, wait_until_ready  # noqa: F401
from xreal_engine.client import EngineClient, EngineError

pytestmark = pytest.mark.skipif(not orthanc_available(), reason="Orthanc + DICOMweb plugin not installed")


@pytest.fixture(scope="module")
def orthanc():
    with running_orthanc() as server:
        yield server


@pytest.fixture(scope="module")
def pacs_engine(orthanc, tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pacs-engine")
    config = folder / "pacs.json"
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there: a PACS that is down
    config.write_text(json.dumps({"nodes": {"orthanc": {
        "type": "dicomweb", "url": orthanc.dicomweb_url,
        "headers": {"Authorization": orthanc.authorization_header}, "timeout_s": 10},
        "down": {"type": "dicomweb", "url": f"http://127.0.0.1:{closed_port}/dicom-web", "timeout_s": 1}}}))
    process, url = start_engine(tiny_model, folder / "data", "--pacs-config", str(config))
    client = EngineClient(url, timeout=60)
    try:
        wait_until_ready(client)
        yield client
    finally:
        stop_engine(process)


def make_dx(path, size: int) -> pydicom.Dataset:
    """A small 12-bit DX image with a smooth pattern and 6 mm pixels."""
    yy, xx = np.mgrid[0:size, 0:size]
    return write_dx(path, 2000 + 1500 * np.sin(xx / 7.0) * np.cos(yy / 9.0), spacing_mm=6.0)


def test_push_to_sends_the_result_and_reports_it(pacs_engine, orthanc, inputs):
    job = pacs_engine.submit(inputs["anatomy"], [(inputs["region"], "cardiomegaly")], steps=2, push_to="orthanc")
    done = final(pacs_engine, job["id"])
    assert done["state"] == "succeeded", done
    report = done["push"]
    assert report["ok"] is True and report["destination"] == "orthanc" and report["accepted"] == 2, report
    assert all("/" not in instance["file"] for instance in report["instances"])
    web = DICOMwebClient(url=orthanc.dicomweb_url, headers={"Authorization": orthanc.authorization_header})
    found = web.search_for_instances(search_filters={"SOPInstanceUID": done["dicom"]["sc_sop_instance_uid"]})
    assert len(found) == 1


def test_source_fetches_the_image_to_edit_from_the_pacs(pacs_engine, orthanc, inputs, tmp_path):
    source = make_dx(tmp_path / "dx.dcm", inputs["size"])
    orthanc.upload(tmp_path / "dx.dcm")
    job = pacs_engine.submit(None, [(inputs["region"], "pneumonia")], steps=2, source={
        "source": "orthanc", "study": source.StudyInstanceUID, "series": source.SeriesInstanceUID})
    done = final(pacs_engine, job["id"])
    assert done["state"] == "succeeded" and done["mode"] == "edit", done
    sc = pydicom.dcmread(pacs_engine.download(done["id"], "sc.dcm", tmp_path))
    assert sc.StudyInstanceUID == source.StudyInstanceUID, "an edited image joins the source study"


def test_unknown_pacs_names_are_refused_before_queueing(pacs_engine, inputs):
    with pytest.raises(EngineError) as destination:
        pacs_engine.submit(inputs["anatomy"], [(inputs["region"], "cardiomegaly")], push_to="nowhere")
    assert destination.value.status == 422 and "nowhere" in destination.value.message
    with pytest.raises(EngineError) as source:
        pacs_engine.submit(None, [(inputs["region"], "pneumonia")], source={
            "source": "nowhere", "study": generate_uid(), "series": generate_uid()})
    assert source.value.status == 422 and "nowhere" in source.value.message
    assert [node["name"] for node in pacs_engine.info()["pacs"]] == ["down", "orthanc"]


def test_a_finished_result_can_be_sent_later(pacs_engine, orthanc, inputs):
    """"Send to PACS" after the fact: the job's SC + SEG reach the PACS and the report is kept with the job."""
    job = pacs_engine.submit(inputs["anatomy"], [(inputs["region"], "cardiomegaly")], steps=2)
    done = final(pacs_engine, job["id"])
    assert done["state"] == "succeeded" and not done["push"], done
    sent = pacs_engine.push(done["id"], "orthanc")
    assert sent["push"]["ok"] is True and sent["push"]["accepted"] == 2, sent
    assert pacs_engine.status(done["id"])["push"] == sent["push"]
    web = DICOMwebClient(url=orthanc.dicomweb_url, headers={"Authorization": orthanc.authorization_header})
    found = web.search_for_instances(search_filters={"SOPInstanceUID": done["dicom"]["seg_sop_instance_uid"]})
    assert len(found) == 1
    with pytest.raises(EngineError) as unknown:
        pacs_engine.push(done["id"], "nowhere")
    assert unknown.value.status == 422 and "nowhere" in unknown.value.message
    with pytest.raises(EngineError) as missing_job:
        pacs_engine.push("no-such-job", "orthanc")
    assert missing_job.value.status == 404


def test_a_push_that_fails_is_reported_per_instance_and_submit_exits_1(pacs_engine, inputs, tmp_path):
    """The report says what was (not) sent when the destination failed, and submit does not claim success."""
    result = subprocess.run(
        [sys.executable, "-m", "xreal_engine.cli", "submit", "--url", pacs_engine.base_url, "--anatomy",
         str(inputs["anatomy"]), "--steps", "2", "--push-to", "down", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "PACS push to down:" in result.stderr and "connection refused" in result.stderr, result.stderr[-2000:]
    assert "sc.dcm: failed" in result.stderr and "seg.dcm: failed not sent" in result.stderr, result.stderr[-2000:]
    assert (tmp_path / "out" / "sc.dcm").is_file()  # the result is kept whatever the PACS did
    job = pacs_engine.jobs()[0]
    assert job["push"]["ok"] is False and [item["status"] for item in job["push"]["instances"]] == ["failed"] * 2
