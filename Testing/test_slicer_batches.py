"""Variations and Interpolate through the engine's batch endpoint (issue 13 item 5), without Slicer: which runs
go as one batch, the rows sent, the runner's events and results against the replaying engine, cancel,
failed rows, and the fallbacks (one job after the other) for an engine without the endpoint and for runs that
rows cannot carry. The same runner against a real engine is in test_slicer_lib.py (slow)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR / "XRealSlicer"))

from XRealSlicerLib import batches, planning, results  # noqa: E402
from XRealSlicerLib.jobs import CANCELLED, DONE, DOWNLOADING, FAILED, RUNNING  # noqa: E402
from XRealSlicerLib.request import CanvasGeometry, SegmentInput  # noqa: E402
from XRealSlicerLib.testing import ReplayEngineClient, replay_info  # noqa: E402
from XRealSlicerLib.vocabulary import Vocabulary  # noqa: E402
from xreal_engine.client import EngineError  # noqa: E402

SIZE = 64
CANVAS = CanvasGeometry((1, SIZE, SIZE), (400.0 / SIZE, 400.0 / SIZE, 1.0), "canvas")


@pytest.fixture(scope="module")
def vocabulary():
    return Vocabulary.load()


def _disc(center, radius):
    rows, columns = np.ogrid[:SIZE, :SIZE]
    return ((rows - center[0]) ** 2 + (columns - center[1]) ** 2 <= radius**2).astype(np.uint8)[np.newaxis]


def _plan(vocabulary, tmp_path, **panel):
    anatomy = {t.meaning.label: t for t in vocabulary.anatomy_templates()}
    finding = vocabulary.finding_template("pneumonia", "Pneumonia")
    segments = [SegmentInput(anatomy[1].name, _disc((30, 46), 12), anatomy[1].terminology),
                SegmentInput(anatomy[2].name, _disc((30, 18), 12), anatomy[2].terminology),
                SegmentInput(anatomy[3].name, _disc((40, 34), 8), anatomy[3].terminology),
                SegmentInput(finding.name, _disc((30, 18), 4), finding.terminology)]
    return planning.plan_jobs(segments, CANVAS, vocabulary, replay_info(),
                              planning.PanelSettings(**{"steps": 2, **panel}), tmp_path)


def _run(client, jobs, cancel_after=None):
    runner = batches.BatchRunner(client, poll_interval=0.01)
    runner.start(jobs)
    events = []
    while runner.busy or not runner.events.empty():
        for event in runner.drain():
            events.append(event)
            if cancel_after is not None and sum(e.result is not None for e in events) == cancel_after:
                runner.cancel()
        runner.wait(0.05)
    return runner, events + runner.drain()


def test_which_runs_go_as_one_batch_and_the_rows_they_send(vocabulary, tmp_path):
    plan = _plan(vocabulary, tmp_path, seed=4, variations=3, sampler="unipc")
    assert batches.can_batch(plan.jobs)
    rows = batches.batch_rows(plan.jobs)
    assert [row["name"] for row in rows] == ["seed-4", "seed-5", "seed-6"] and [r["seed"] for r in rows] == [4, 5, 6]
    first = rows[0]
    assert Path(first["anatomy"]).is_file() and first["anatomy"].endswith("seed-4/anatomy.nrrd")
    assert first["pathologies"] == [{"mask": str(plan.jobs[0].files.pathologies[0][0]), "finding": "pneumonia"}]
    assert {k: first[k] for k in ("steps", "anatomy_steps", "sampler")} == {"steps": 2, "anatomy_steps": 2,
                                                                             "sampler": "unipc"}
    assert "image" not in first and "fast" not in first
    fast = batches.batch_rows(_plan(vocabulary, tmp_path / "fast", variations=2, fast=True).jobs)[0]
    assert fast["fast"] is True and "steps" not in fast  # the engine applies its own preset, as with submit()
    # controls travel in the rows, in the manifest's {"name", "file", "scale"} form
    controlled = _plan(vocabulary, tmp_path / "controls", variations=2)
    for job in controlled.jobs:
        job.files.controls = [("sobel", Path("reference.nrrd"), 0.5), ("lungs", None, None)]
        job.files.control_stages = "pathology"
    assert batches.can_batch(controlled.jobs)
    row = batches.batch_rows(controlled.jobs)[1]
    assert row["controls"] == [{"name": "sobel", "file": "reference.nrrd", "scale": 0.5},
                               {"name": "lungs", "file": None, "scale": None}]
    assert row["control_stages"] == "pathology"
    # one image, a PACS push or a PACS source: one job after the other (rows take neither)
    assert not batches.can_batch(plan.jobs[:1])
    for change in ({"push_to": "pacs"}, {"source": {"source": "pacs", "study": "1", "series": "2"}}):
        other = _plan(vocabulary, tmp_path / str(len(change)) / next(iter(change)), variations=2)
        for name, value in change.items():
            setattr(other.jobs[1].files, name, value)
        assert not batches.can_batch(other.jobs)


def test_variations_run_as_one_batch_and_deliver_each_result(vocabulary, tmp_path):
    client = ReplayEngineClient(polls=2)
    plan = _plan(vocabulary, tmp_path, variations=3)
    runner, events = _run(client, plan.jobs)
    assert len(client.batches) == 1 and len(client.batches[0]["rows"]) == 3  # one upload, not three
    assert [s["seed"] for s in client.submitted] == [0, 1, 2]
    assert events[-1].state == DONE and events[-1].message.startswith("Done in")
    delivered = [event for event in events if event.result is not None]
    assert [event.label for event in delivered] == ["seed-0", "seed-1", "seed-2"]
    assert all(event.state == DOWNLOADING for event in delivered)
    assert [result.directory for result in runner.results] == [job.result_dir for job in plan.jobs]
    assert [result.job["id"] for result in runner.results] == ["replay-1", "replay-2", "replay-3"]  # for PACS push
    progress = [event for event in events if event.state == RUNNING]
    assert progress and all(0.0 <= e.fraction <= 1.0 for e in progress) and progress[0].job_count == 3
    views = [planning.panel_progress(event) for event in events]
    bars = [view.bar for view in views if view.bar is not None]
    assert bars == sorted(bars) and bars[-1] == 100 and views[-1].finished
    assert any(view.status.startswith("[1/3] Running") for view in views)
    assert "anatomy followed: Dice" in results.result_label("seed-0", runner.results[0].provenance)


def test_interpolate_runs_as_one_batch(vocabulary, tmp_path):
    from XRealSlicerLib.request import canvas_ijk_to_ras

    spacing = CANVAS.spacing
    path = planning.InterpolationPath(np.array([[-10 * spacing[0], -20 * spacing[1], 0],
                                                [-40 * spacing[0], -20 * spacing[1], 0]]),
                                      np.linalg.inv(canvas_ijk_to_ras(spacing)))
    plan = _plan_interpolation(vocabulary, tmp_path, path)
    client = ReplayEngineClient(polls=1)
    runner, events = _run(client, plan.jobs)
    assert events[-1].state == DONE
    assert [r.directory.parent.name for r in runner.results] == ["position-01", "position-02", "position-03"]
    assert [row[0] for row in client.batches[0]["rows"]] == ["position-01", "position-02", "position-03"]
    assert {s["seed"] for s in client.submitted} == {5}


def _plan_interpolation(vocabulary, tmp_path, path):
    anatomy = {t.meaning.label: t for t in vocabulary.anatomy_templates()}
    finding = vocabulary.finding_template("pneumonia", "Pneumonia")
    segments = [SegmentInput(anatomy[1].name, _disc((30, 46), 12), anatomy[1].terminology),
                SegmentInput(anatomy[3].name, _disc((40, 34), 8), anatomy[3].terminology),
                SegmentInput(finding.name, _disc((30, 18), 4), finding.terminology)]
    settings = planning.PanelSettings(seed=5, interpolate=True, interpolation_steps=3, steps=2)
    return planning.plan_jobs(segments, CANVAS, vocabulary, replay_info(), settings, tmp_path, path=path,
                              selected_segment="Pneumonia")


def test_cancel_stops_the_batchs_remaining_rows(vocabulary, tmp_path):
    client = ReplayEngineClient(polls=3)
    plan = _plan(vocabulary, tmp_path, variations=4)
    runner, events = _run(client, plan.jobs, cancel_after=1)
    assert events[-1].state == CANCELLED and len(runner.results) == 1
    final = client.batch_status(client.batches[0]["id"], advance=False)
    assert final["counts"]["cancelled"] == 3 and final["state"] == "cancelled"


def test_failed_rows_are_one_sentence_after_the_others_results(vocabulary, tmp_path):
    class OneRowFails(ReplayEngineClient):
        def batch_status(self, batch_id, advance=True):
            status = super().batch_status(batch_id, advance)
            row = status["rows"][1]
            if row["state"] != "queued":
                row.update(state="failed", error={"code": "engine_error", "message": "The GPU ran out of memory."})
                status["counts"]["failed"] = 1
            return status

    runner, events = _run(OneRowFails(polls=1), _plan(vocabulary, tmp_path, variations=3).jobs)
    assert [event.label for event in events if event.result is not None] == ["seed-0", "seed-2"]
    view = planning.panel_progress(events[-1])
    assert events[-1].state == FAILED and view.finished
    assert view.error == "1 of 3 images failed (seed-1: The GPU ran out of memory.)."


def test_an_engine_without_the_batch_endpoint_runs_the_jobs_one_by_one(vocabulary, tmp_path):
    class OlderEngine(ReplayEngineClient):
        def submit_batch(self, *args, **kwargs):
            raise EngineError(404, "http_404", "The engine answered HTTP 404 (Not Found).")

    client = OlderEngine(polls=1)
    runner, events = _run(client, _plan(vocabulary, tmp_path, variations=2).jobs)
    assert events[-1].state == DONE and len(runner.results) == 2 and [s["seed"] for s in client.submitted] == [0, 1]

    class Refusing(ReplayEngineClient):
        def submit_batch(self, *args, **kwargs):
            raise EngineError(422, "invalid_manifest", "row 2: the finding 'x' is not known to this model.")

    runner, events = _run(Refusing(polls=1), _plan(vocabulary, tmp_path / "refused", variations=2).jobs)
    assert events[-1].state == FAILED and events[-1].message == "row 2: the finding 'x' is not known to this model."
    assert not runner.results
