"""Job store and worker semantics without a subprocess: retention, crash recovery,
atomic idempotency and queue bound under threads, failure isolation, and a real model
that produces NaNs (through the real FastAPI app, in process).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from xreal_engine.errors import ModelError
from xreal_engine.model.sampling import SamplingParameters
from xreal_engine.service.spec import JobSpec
from xreal_engine.service.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobStore, QueueFull, new_job_id
from xreal_engine.service.worker import JobService

SPEC = JobSpec.build(anatomy="anatomy.png", pathologies=[], image=None,
                     parameters=SamplingParameters(num_inference_steps=2, anatomy_steps=1, guidance_scale=1.0,
                                                   eta=0.0, soft_mask_value=0.2, seed=0))


def add_job(store: JobStore, request_id: str | None = None, max_queued: int = 100) -> dict:
    job_id = new_job_id()
    (store.inputs_dir(job_id)).mkdir(parents=True)
    (store.inputs_dir(job_id) / "anatomy.png").write_bytes(b"stand-in upload")
    job, _ = store.add(job_id, request_id, SPEC, [], max_queued, retry_after=1)
    return job


def make_service(store: JobStore, run_job, retention_hours: float = 72.0) -> JobService:
    return JobService(store, load_pipeline=lambda: "pipeline", run_job=run_job, max_queued_jobs=100,
                      retention_hours=retention_hours)


def test_retention_purges_only_finished_jobs_older_than_the_limit(tmp_path):
    store = JobStore(tmp_path)
    finished = add_job(store)
    store.claim_next()
    store.finish(finished["id"], SUCCEEDED, files=["sc.dcm"])
    queued = add_job(store)
    service = make_service(store, run_job=None, retention_hours=72)
    assert service.purge_expired(now=time.time() + 71 * 3600) == 0
    assert service.purge_expired(now=time.time() + 73 * 3600) == 1
    assert store.get(finished["id"]) is None and not store.job_dir(finished["id"]).exists()
    assert store.get(queued["id"])["state"] == QUEUED and store.job_dir(queued["id"]).exists()
    keep_forever = make_service(store, run_job=None, retention_hours=0)
    store.cancel_if_queued(queued["id"])
    assert keep_forever.purge_expired(now=time.time() + 10**6) == 0


def test_restart_fails_the_running_job_as_interrupted_and_cleans_partial_files(tmp_path):
    store = JobStore(tmp_path)
    running = add_job(store)
    queued = add_job(store)
    assert store.claim_next()["id"] == running["id"]
    (store.job_dir(running["id"]) / ".result.partial-1234").mkdir()
    (store.job_dir(running["id"]) / ".result.partial-1234" / "sc.dcm").write_bytes(b"half")
    (store.jobs_dir / "orphan-without-row").mkdir()
    (store.incoming_dir / "upload-in-flight").mkdir()
    store.close()  # as after kill -9: nothing else happens

    reopened = JobStore(tmp_path)
    assert reopened.recover_after_restart() == 1
    job = reopened.get(running["id"])
    assert job["state"] == FAILED and job["error_code"] == "interrupted" and "submit it again" in job["error_message"]
    assert list(reopened.job_dir(running["id"]).iterdir()) == [], "uploads and partial results are gone"
    assert (reopened.inputs_dir(queued["id"]) / "anatomy.png").is_file(), "a queued job keeps its uploads"
    assert reopened.get(queued["id"])["state"] == QUEUED
    assert not (reopened.jobs_dir / "orphan-without-row").exists()
    assert list(reopened.incoming_dir.iterdir()) == []


def test_concurrent_retries_create_one_job_and_the_queue_bound_holds(tmp_path):
    store = JobStore(tmp_path)
    results, refused = [], []

    def submit(request_id: str, max_queued: int) -> None:
        try:
            job, created = store.add(new_job_id(), request_id, SPEC, [], max_queued, retry_after=3)
            results.append((request_id, job["id"], created))
        except QueueFull as error:
            refused.append(error.retry_after)

    threads = [threading.Thread(target=submit, args=("same-request", 100)) for _ in range(20)]
    threads += [threading.Thread(target=submit, args=(f"request-{i}", 6)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    same = [r for r in results if r[0] == "same-request"]
    assert len(same) == 20 and len({job_id for _, job_id, _ in same}) == 1
    assert sum(created for _, _, created in same) == 1
    distinct = [r for r in results if r[0] != "same-request"]
    assert len(distinct) == 5 and len(refused) == 15 and set(refused) == {3}  # 6 slots, one taken above
    assert store.queued_count() == 6


def test_worker_runs_in_order_isolates_failures_and_cancels_within_a_step(tmp_path):
    """Stand-in run_job: the real generation is exercised over HTTP in test_server_service.py."""
    store = JobStore(tmp_path)
    order = []
    release = threading.Event()

    def run_job(pipe, spec, inputs_dir, result_dir, progress):
        job_id = inputs_dir.parent.name
        order.append(job_id)
        kind = spec.anatomy.removesuffix(".png")
        if kind == "oom":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if kind == "model":
            raise ModelError("The model produced invalid values (NaN or infinity); try another seed or float32.")
        if kind == "slow":
            for step in range(1, 10_000):
                progress("anatomy", step, 10_000)
                release.wait(0.01)
        result_dir.mkdir()
        (result_dir / "sc.dcm").write_bytes(b"dicom")
        return {"dicom": {"sc_sop_instance_uid": "1.2.3"}}

    service = JobService(store, load_pipeline=lambda: "pipeline", run_job=run_job, max_queued_jobs=10,
                         retention_hours=72)
    ids = {}
    for kind in ("oom", "model", "ok", "slow"):
        job_id = new_job_id()
        store.inputs_dir(job_id).mkdir(parents=True)
        ids[kind], _ = service.submit(job_id, None, replace(SPEC, anatomy=f"{kind}.png"), [])
    service.start()
    try:
        deadline = time.monotonic() + 30
        while store.get(ids["slow"]["id"])["state"] != RUNNING or not service.live(ids["slow"]["id"]):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        service.cancel(ids["slow"]["id"])
        assert service.wait_until_not_running(ids["slow"]["id"], timeout=10)
    finally:
        service.stop()
    assert order == [ids[k]["id"] for k in ("oom", "model", "ok", "slow")]
    oom = store.get(ids["oom"]["id"])
    assert oom["state"] == FAILED and "ran out of memory" in oom["error_message"] and "Traceback" not in oom["error_message"]
    model = store.get(ids["model"]["id"])
    assert model["state"] == FAILED and "NaN" in model["error_message"]
    ok = store.get(ids["ok"]["id"])
    assert ok["state"] == SUCCEEDED and ok["files"] == ["sc.dcm"] and ok["dicom"] == {"sc_sop_instance_uid": "1.2.3"}
    slow = store.get(ids["slow"]["id"])
    assert slow["state"] == CANCELLED and not store.result_dir(ids["slow"]["id"]).exists()
    assert sorted(p.name for p in store.job_dir(ids["ok"]["id"]).iterdir()) == ["result"], "uploads deleted"
    assert not store.inputs_dir(ids["oom"]["id"]).exists()


def test_a_model_that_produces_nan_fails_its_job_readably_and_the_service_keeps_serving(tmp_path):
    """The real app (in process, FastAPI TestClient) with a tiny model whose UNet weights are NaN."""
    from fastapi.testclient import TestClient
    from safetensors.numpy import load_file, save_file

    from xreal_engine.model.info import ModelInfo
    from xreal_engine.model.random_model import create_random_model
    from xreal_engine.service.app import create_app
    from xreal_engine.service.settings import ServiceSettings

    model_dir = create_random_model(tmp_path / "nan-model", preset="tiny")
    weights = model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    save_file({name: np.full_like(value, np.nan) for name, value in tensors.items()}, weights)
    size = ModelInfo.load(model_dir).image_size
    labels = np.zeros((size, size), np.uint8)
    labels[size // 4: 3 * size // 4, size // 8: size // 2] = 2
    labels[size // 4: 3 * size // 4, size // 2: 7 * size // 8] = 1
    anatomy = tmp_path / "anatomy.png"
    Image.fromarray(labels).save(anatomy)

    app = create_app(ServiceSettings(model=str(model_dir), device="cpu", data_dir=tmp_path / "data"))
    with TestClient(app, base_url="http://127.0.0.1", headers={"X-XReal-Client": "1"}) as http:
        deadline = time.monotonic() + 120
        while http.get("/api/v1/health").json()["model"] != "ready":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with open(anatomy, "rb") as handle:
            response = http.post("/api/v1/jobs", files={"anatomy": ("anatomy.png", handle, "image/png")},
                                 data={"steps": "2"})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        while (job := http.get(f"/api/v1/jobs/{job_id}").json())["state"] in (QUEUED, RUNNING):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert job["state"] == FAILED, job
        assert "NaN" in job["error"]["message"] and "Traceback" not in job["error"]["message"]
        assert job["files"] == [] and not (tmp_path / "data" / "jobs" / job_id / "result").exists()
        assert http.get("/api/v1/health").json() == {"status": "ok", "engine_version": job_engine_version(),
                                                     "model": "ready", "model_error": None, "storage_error": None}
        assert http.get("/api/v1/info").status_code == 200


def test_a_model_that_cannot_load_is_reported_and_jobs_get_503(tmp_path):
    """--device cuda on a machine without a GPU: health says why, submissions get 503, nothing crashes."""
    import torch
    from fastapi.testclient import TestClient

    from xreal_engine.model.random_model import create_random_model
    from xreal_engine.service.app import create_app
    from xreal_engine.service.settings import ServiceSettings

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the failure needs one that does not")
    model_dir = create_random_model(tmp_path / "model", preset="tiny")
    app = create_app(ServiceSettings(model=str(model_dir), device="cuda", data_dir=tmp_path / "data"))
    with TestClient(app, base_url="http://127.0.0.1", headers={"X-XReal-Client": "1"}) as http:
        deadline = time.monotonic() + 60
        while (health := http.get("/api/v1/health").json())["model"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert health["model"] == "failed" and "CUDA" in health["model_error"], health
        response = http.post("/api/v1/jobs", files={"anatomy": ("a.png", b"\x89PNG\r\n\x1a\n", "image/png")})
        assert response.status_code == 503
        assert response.json()["error"] == {"code": "model_unavailable", "message": health["model_error"]}
        assert http.get("/api/v1/info").json()["model_state"] == "failed"


def job_engine_version() -> str:
    from xreal_engine import __version__

    return __version__


def test_the_job_spec_travels_through_the_store_as_it_was_submitted(tmp_path):
    from xreal_engine.service.spec import PacsSource

    spec = JobSpec.build(anatomy=None, pathologies=[("pathology-1.png", "Pleural effusion"), ("pathology-2.png", "")],
                         image="image.dcm", parameters=SPEC.parameters, push_to="archive",
                         source=PacsSource(source="pacs", study="1.2", series="1.2.3"))
    assert (spec.mode, spec.expected_steps) == ("edit", 4)
    assert JobSpec.from_json(spec.to_json()) == spec
    store = JobStore(tmp_path)
    job, _ = store.add(new_job_id(), None, spec, [], 10, retry_after=1)
    assert store.get(job["id"])["spec"] == spec


def test_time_left_counts_only_steps_that_ran_so_a_reused_anatomy_stage_does_not_fake_it(monkeypatch):
    """An anatomy stage reused from the cache reports 0/N then N/N at once; the time left must come from
    the pathology steps' own pace (2 s each here), not from 'half the job in no time'."""
    from xreal_engine.service import worker

    clock = [100.0]
    monkeypatch.setattr(worker.time, "monotonic", lambda: clock[0])
    live = worker.LiveProgress(expected_steps=20, started=clock[0])
    assert live.eta_seconds() is None
    live.update("anatomy", 0, 10)
    clock[0] += 0.01
    live.update("anatomy", 10, 10)  # reused: the whole stage in one report
    assert live.fraction() == 0.5 and live.eta_seconds() is None  # nothing timed yet
    live.update("pathology", 0, 10)
    for step in range(1, 4):
        clock[0] += 2.0
        live.update("pathology", step, 10)
    assert live.eta_seconds() == pytest.approx(7 * 2.0)
    fresh = worker.LiveProgress(expected_steps=4, started=clock[0])  # without reuse: the plain rate, setup included
    fresh.update("anatomy", 0, 2)
    clock[0] += 3.0
    fresh.update("anatomy", 1, 2)
    assert fresh.eta_seconds() == pytest.approx(3 * 3.0)
    for step, stage in ((2, "anatomy"), (0, "pathology"), (1, "pathology"), (2, "pathology")):
        clock[0] += 1.0 if step else 0.0
        fresh.update(stage, step, 2)
    assert fresh.fraction() == 1.0 and fresh.eta_seconds() == 0.0
