"""The Slicer module's workflow without Slicer and without an engine (issue 14, and issue 11's Fast preview):
job planning (XRealSlicerLib.planning), the panel's rules, the engine environment, result provenance and
quality lines, and a whole run through the real JobRunner against the replaying engine
(XRealSlicerLib.testing) on the committed result folder XRealSlicer/Resources/Testing/Result — what the
module's self-test drives through the widget inside Slicer."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR / "XRealSlicer"))

from XRealSlicerLib import connection, environment, parameters, planning, results  # noqa: E402
from XRealSlicerLib.jobs import DONE, FAILED, RUNNING, JobEvent, JobRunner  # noqa: E402
from XRealSlicerLib.request import (  # noqa: E402
    CanvasGeometry, SegmentInput, build_inputs, canvas_ijk_to_ras, grey_pixels)
from XRealSlicerLib.testing import EXAMPLE_RESULT_DIR, ReplayEngineClient, replay_info  # noqa: E402
from XRealSlicerLib.vocabulary import Vocabulary  # noqa: E402
from xreal_engine.errors import InputError  # noqa: E402
from xreal_engine.model.sampling import FAST_PRESET, SAMPLERS, SamplingParameters  # noqa: E402

SIZE = 64


@pytest.fixture(scope="module")
def vocabulary():
    return Vocabulary.load()


def _disc(center, radius, shape=(SIZE, SIZE)):
    rows, columns = np.ogrid[: shape[0], : shape[1]]
    return ((rows - center[0]) ** 2 + (columns - center[1]) ** 2 <= radius**2).astype(np.uint8)[np.newaxis]


def _segments(vocabulary, pathology_finding="pneumonia"):
    """As the module creates them: anatomy from the vocabulary, a named pathology, and a new one left unpainted."""
    anatomy = {t.meaning.label: t for t in vocabulary.anatomy_templates()}
    finding = vocabulary.finding_template(pathology_finding, vocabulary.name_for_finding("Pathology",
                                                                                         pathology_finding, []))
    return [
        SegmentInput(anatomy[1].name, _disc((30, 46), 12), anatomy[1].terminology),
        SegmentInput(anatomy[2].name, _disc((30, 18), 12), anatomy[2].terminology),
        SegmentInput(anatomy[3].name, _disc((40, 34), 8), anatomy[3].terminology),
        SegmentInput(finding.name, _disc((30, 18), 4), finding.terminology),
        SegmentInput(vocabulary.new_pathology_name([finding.name]), np.zeros((1, SIZE, SIZE), np.uint8)),
    ]


CANVAS = CanvasGeometry((1, SIZE, SIZE), (400.0 / SIZE, 400.0 / SIZE, 1.0), "canvas")


def _run(client, jobs, seconds=60):
    runner = JobRunner(client, poll_interval=0.01)
    runner.start(jobs)
    assert runner.wait(seconds)
    return runner, runner.drain()


# ----------------------------------------------------------------------------- defects 4 and 5: pathology segments


def test_a_hidden_painted_segment_is_used_and_said_to_be(vocabulary):
    """Hiding a segment in the views is a display setting: its mask is still sent, and Generate says so."""
    info = replay_info()
    labels, findings = list(connection.model_anatomy_labels(info)), connection.model_findings(info)
    shown = build_inputs(_segments(vocabulary), CANVAS, vocabulary, labels, findings)
    segments = _segments(vocabulary)
    segments[2].visible = False  # the heart
    segments[3].visible = False  # the pneumonia
    segments[4].visible = False  # the unpainted one: left out as before, nothing more to say
    hidden = build_inputs(segments, CANVAS, vocabulary, labels, findings)
    assert hidden.warnings == [
        f"The segment '{segments[2].name}' is hidden but painted, so it is used; delete it or erase it to leave "
        "it out.",
        "The segment 'Pneumonia' is hidden but painted, so it is used; delete it or erase it to leave it out.",
        "The segment 'Pathology' is empty and was left out."]
    assert np.array_equal(hidden.anatomy, shown.anatomy)
    assert [name for _mask, _finding, name in hidden.pathologies] == ["Pneumonia"]
    segments[1].array, segments[1].visible = np.zeros((1, SIZE, SIZE), np.uint8), False  # hidden and unpainted
    assert len(build_inputs(segments, CANVAS, vocabulary, labels, findings).warnings) == 3  # nothing said of it


def test_an_unpainted_pathology_without_finding_is_left_out_with_a_note(vocabulary):
    """Defect 4: emptiness is checked before the finding, so the new 'Pathology' cannot stop Generate."""
    segments = _segments(vocabulary)
    info = replay_info()
    inputs = build_inputs(segments, CANVAS, vocabulary, list(connection.model_anatomy_labels(info)),
                          connection.model_findings(info))
    assert [name for _mask, _finding, name in inputs.pathologies] == ["Pneumonia"]
    assert inputs.warnings == ["The segment 'Pathology' is empty and was left out."]
    # the same segment painted: an explicit finding is required, nothing is chosen silently
    segments[-1].array = _disc((20, 40), 3)
    with pytest.raises(InputError, match="painted segment 'Pathology' has no finding"):
        build_inputs(segments, CANVAS, vocabulary, [1, 2, 3], connection.model_findings(info))
    # the drawing check before a local engine starts says the same
    with pytest.raises(InputError, match="has no finding"):
        planning.check_drawing(segments, CANVAS, vocabulary)
    assert planning.check_drawing(_segments(vocabulary), CANVAS, vocabulary) == inputs.warnings


def test_a_pathology_segment_is_named_after_its_finding(vocabulary):
    """Defect 5: a new segment has no finding ("Pathology", "Pathology 2"); choosing one renames it, unless the
    user named it; the name carries the finding too (a renamed segment keeps it by its terminology)."""
    assert vocabulary.new_pathology_name(["Heart"]) == "Pathology"
    assert vocabulary.new_pathology_name(["Pathology", "pathology 2"]) == "Pathology 3"
    assert vocabulary.classify("Pathology") is None  # no finding until one is chosen
    assert vocabulary.name_for_finding("Pathology", "pneumonia", ["Heart"]) == "Pneumonia"
    assert vocabulary.name_for_finding("Pathology 2", "pneumonia", ["Pneumonia"]) == "Pneumonia 2"
    assert vocabulary.name_for_finding("Pneumonia", "cardiomegaly", ["Heart"]) == "Cardiomegaly"  # a changed mind
    assert vocabulary.name_for_finding("Left apex nodule", "pneumonia", []) == "Left apex nodule"
    named = vocabulary.finding_template("cardiomegaly", "Cardiomegaly")
    assert vocabulary.classify("Cardiomegaly", named.terminology).finding == "cardiomegaly"


def test_finding_choices_follow_the_model_and_edit_mode(vocabulary):
    findings = connection.model_findings(replay_info())  # the demo model's, from its xreal_model.json
    assert findings == ["no finding", "cardiomegaly", "pneumonia"]
    labels = dict(planning.finding_choices(findings, vocabulary, edit_mode=False))
    assert labels == {"no finding": "No finding", "cardiomegaly": "Cardiomegaly", "pneumonia": "Pneumonia"}
    # a model without its own "no finding": the removal is offered only when editing an X-ray
    assert [f for f, _ in planning.finding_choices(["cardiomegaly"], vocabulary, edit_mode=False)] == ["cardiomegaly"]
    assert [f for f, _ in planning.finding_choices(["cardiomegaly"], vocabulary, edit_mode=True)] == [
        "cardiomegaly", "no finding"]


def test_local_model_info_before_the_engine_runs(tmp_path):
    """The panel knows the local model's findings, labels, geometry and defaults before the first Generate."""
    from XRealSlicerLib.enginepath import find_engine_root

    demo = connection.local_model_info("demo", find_engine_root())
    assert demo["model"]["id"] == "xreal-demo-v3" and connection.model_geometry(demo) == (128, 400.0)
    assert sorted(connection.model_anatomy_labels(demo)) == [1, 2, 3]
    assert parameters.model_defaults(demo)["anatomy_steps"] == 85
    assert connection.local_model_info(str(tmp_path), find_engine_root()) is None  # no xreal_model.json
    (tmp_path / "xreal_model.json").write_text("{not json")
    assert connection.local_model_info(str(tmp_path), find_engine_root()) is None


# ----------------------------------------------------------------------------- defect 10: RGB canvases


def test_rgb_xrays_become_grey():
    rgb = np.zeros((1, 4, 5, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    grey = grey_pixels(rgb)
    assert grey.shape == (1, 4, 5) and grey.dtype == np.float32
    assert np.allclose(grey, 0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    rgba = np.concatenate([rgb, np.full((1, 4, 5, 1), 7, np.uint8)], axis=-1)
    assert np.array_equal(grey_pixels(rgba), grey)  # alpha ignored
    same = np.full((1, 4, 5, 3), 90, np.uint8)
    assert np.allclose(grey_pixels(same), 90)  # a grey PNG saved as RGB keeps its values
    assert np.array_equal(grey_pixels(np.stack([same[..., 0], same[..., 0]], -1)), same[..., 0])  # grey + alpha
    scalar = np.arange(20).reshape(1, 4, 5)
    assert grey_pixels(scalar) is scalar
    with pytest.raises(InputError, match="5 components"):
        grey_pixels(np.zeros((1, 4, 5, 5)))


# ----------------------------------------------------------------------------- defect 11 and Fast preview: controls


def test_only_the_controls_that_apply_are_enabled():
    states = planning.control_states(interpolate=False, edit_mode=False, fast=False)
    assert all(states[name] for name in ("variations", "steps", "anatomySteps", "sampler"))
    assert not states["interpolationPath"] and not states["interpolationSteps"] and not states["pacsSource"]
    interpolate = planning.control_states(interpolate=True, edit_mode=False, fast=False)
    assert not interpolate["variations"] and interpolate["interpolationPath"] and interpolate["interpolationSteps"]
    fast = planning.control_states(interpolate=False, edit_mode=False, fast=True)
    assert not fast["steps"] and not fast["anatomySteps"] and not fast["sampler"] and fast["variations"]
    edit = planning.control_states(interpolate=False, edit_mode=True, fast=False)
    assert not edit["anatomySteps"] and edit["steps"] and edit["pacsSource"]


def test_sampler_choices_are_the_policys_and_the_engines():
    assert [name for name, _label in parameters.sampler_choices()] == list(SAMPLERS)
    assert set(parameters.SAMPLER_LABELS) == set(SAMPLERS)  # every sampler of the policy has a label
    offered = parameters.sampler_choices({"choices": {"sampler": ["ddim", "newsolver"]}})
    assert offered == [("ddim", parameters.SAMPLER_LABELS["ddim"]), ("newsolver", "newsolver")]


@pytest.mark.parametrize("panel", [
    dict(fast=True), dict(fast=True, steps=50, anatomy_steps=3, sampler="unipc", guidance=4.0),
    dict(sampler="unipc", steps=12), dict(steps=20), dict(),
])
def test_fast_preview_and_sampler_reach_the_engine_as_the_policy_resolves_them(vocabulary, panel, tmp_path):
    """Issue 11: Fast preview sends fast=True (the engine's preset picks sampler and steps; the panel's steps,
    anatomy steps and sampler are not sent), the sampler choice is sent; both resolve as in the engine."""
    client = ReplayEngineClient(polls=1)
    info = client.info()
    defaults = parameters.model_defaults(info)
    settings = planning.PanelSettings(seed=3, **panel)
    plan = planning.plan_jobs(_segments(vocabulary), CANVAS, vocabulary, info, settings, tmp_path / "run")
    runner, events = _run(client, plan.jobs)
    assert events[-1].state == DONE
    (sent,) = client.submitted
    fields = {key: value for key, value in sent.items() if key not in ("anatomy", "pathologies", "image")}
    if settings.fast:
        assert fields["fast"] is True and not {"steps", "anatomy_steps", "sampler"} & set(fields)
        assert plan.parameters.sampler == FAST_PRESET["sampler"]
        assert plan.parameters.num_inference_steps == FAST_PRESET["num_inference_steps"]
    else:
        assert "fast" not in fields and fields["sampler"] == (settings.sampler or "ddim")
    # what the engine resolves from the submitted fields is what the panel resolved
    assert SamplingParameters.from_public(defaults, fields) == plan.parameters.with_seed(3)
    assert sent["pathologies"] == [("pathology_01.nrrd", "pneumonia")]


# ----------------------------------------------------------------------------- planning: variations, interpolation


def test_variations_plan_one_job_per_seed(vocabulary, tmp_path):
    plan = planning.plan_jobs(_segments(vocabulary), CANVAS, vocabulary, replay_info(),
                              planning.PanelSettings(seed=10, variations=3, steps=2, push_to="replay-pacs"),
                              tmp_path)
    assert [job.label for job in plan.jobs] == ["seed-10", "seed-11", "seed-12"]
    assert [job.files.parameters["seed"] for job in plan.jobs] == [10, 11, 12]
    assert all(job.files.push_to == "replay-pacs" and job.files.source is None for job in plan.jobs)
    assert plan.warnings == ["The segment 'Pathology' is empty and was left out."]
    assert all(job.result_dir == tmp_path / job.label / "result" for job in plan.jobs)


def test_interpolation_moves_the_selected_pathology_with_one_seed(vocabulary, tmp_path):
    """Interpolate ignores Variations (disabled in the panel) and moves the selected pathology along the path."""
    import SimpleITK as sitk

    segments = _segments(vocabulary)
    spacing = CANVAS.spacing
    ras_to_ijk = np.linalg.inv(canvas_ijk_to_ras(spacing))
    path = planning.InterpolationPath(np.array([[-10 * spacing[0], -20 * spacing[1], 0],
                                                [-40 * spacing[0], -20 * spacing[1], 0]]), ras_to_ijk)
    settings = planning.PanelSettings(seed=5, variations=4, interpolate=True, interpolation_steps=3, steps=2)
    plan = planning.plan_jobs(segments, CANVAS, vocabulary, replay_info(), settings, tmp_path, path=path,
                              selected_segment="Pneumonia")
    assert [job.label for job in plan.jobs] == ["position-01", "position-02", "position-03"]
    assert {job.files.parameters["seed"] for job in plan.jobs} == {5}
    centroids = [np.argwhere(sitk.GetArrayFromImage(sitk.ReadImage(str(job.files.pathologies[0][0])))).mean(axis=0)
                 for job in plan.jobs]
    assert np.allclose(centroids, [[20, 10], [20, 25], [20, 40]], atol=1.0)
    with pytest.raises(InputError, match="Choose the path"):
        planning.plan_jobs(segments, CANVAS, vocabulary, replay_info(), settings, tmp_path / "no-path")
    with pytest.raises(InputError, match="Paint a pathology"):
        planning.plan_jobs(segments[:3], CANVAS, vocabulary, replay_info(), settings, tmp_path / "none", path=path)


def test_edit_mode_plans_the_source_it_is_given(vocabulary, tmp_path):
    pathology = _segments(vocabulary)[3]
    settings = planning.PanelSettings(edit_mode=True, steps=2)
    pacs = {"source": "archive", "study": "1.2", "series": "1.2.3", "instance": "1.2.3.4"}
    plan = planning.plan_jobs([pathology], CANVAS, vocabulary, replay_info(), settings, tmp_path / "pacs",
                              edit_source=planning.EditSource(pacs=pacs))
    assert plan.jobs[0].files.source == pacs and plan.jobs[0].files.image_path is None
    pixels = np.linspace(0, 1000, SIZE * SIZE).reshape(1, SIZE, SIZE)
    plan = planning.plan_jobs([pathology], CANVAS, vocabulary, replay_info(), settings, tmp_path / "pixels",
                              edit_source=planning.EditSource(pixels=pixels))
    assert plan.jobs[0].files.image_path.name == "image.nrrd" and plan.jobs[0].files.anatomy_path is None
    with pytest.raises(InputError, match="Editing needs the X-ray"):
        planning.plan_jobs([pathology], CANVAS, vocabulary, replay_info(), settings, tmp_path / "nothing")


# ----------------------------------------------------------------------------- defect 7: a whole run, no engine


def test_a_run_through_the_runner_and_the_panels_progress_on_the_committed_result(vocabulary, tmp_path):
    """What the self-test drives through the widget: planned jobs, the runner, the timer's progress handling
    (panel_progress) and the committed result read back with its provenance and quality lines."""
    client = ReplayEngineClient(polls=4)
    plan = planning.plan_jobs(_segments(vocabulary), CANVAS, vocabulary, client.info(),
                              planning.PanelSettings(seed=0, variations=2, steps=2), tmp_path)
    runner, events = _run(client, plan.jobs)
    assert [event.state for event in events][-1] == DONE and len(runner.results) == 2
    views = [planning.panel_progress(event, plan.warnings) for event in events]
    bars = [view.bar for view in views if view.bar is not None]
    assert bars == sorted(bars) and bars[-1] == 100 and views[-1].finished and not views[-2].finished
    assert any("anatomy" in view.status and "left" in view.status for view in views)  # stage, step and time left
    assert all("'Pathology' is empty" in view.status for view in views)  # the note stays in the status line
    loaded = [event.result for event in events if event.result is not None]
    assert [result.directory for result in loaded] == [job.result_dir for job in plan.jobs]
    result = loaded[0]
    assert result.sc_series_uid == result.provenance["dicom"]["sc_series_instance_uid"]
    label = results.result_label("seed-0", result.provenance)
    assert label.startswith("seed-0: seed 7 · xreal-demo-v2 · 2 steps (2 anatomy) · guidance 7 · ddim")
    assert results.quality_summary(result.provenance) == \
        "anatomy followed: Dice 0.91 / 0.89 / 0.84 (left lung / right lung / heart)"  # issue 13 item 4's form
    assert label.endswith("anatomy followed: Dice 0.91 / 0.89 / 0.84 (left lung / right lung / heart)")
    segments = results.read_fallback_segments(result.directory, vocabulary)
    assert [s.name for s in segments] == ["Left lung", "Right lung", "Heart", "Pneumonia"]
    assert all(s.array.shape == (1, 64, 64) for s in segments)


def test_a_failed_run_reaches_the_panel_as_one_sentence():
    event = JobEvent(FAILED, message="The engine refused the finding 'x'.")
    view = planning.panel_progress(event)
    assert view.finished and view.bar is None and view.error == "The engine refused the finding 'x'."
    running = planning.panel_progress(JobEvent(RUNNING, 0, 2, stage="pathology", step=3, total=4, fraction=0.4))
    assert running.bar == 40 and not running.finished and running.status.startswith("[1/2] Running: pathology 3/4")


def test_quality_is_shown_only_when_the_result_has_it(tmp_path):
    """The anatomy-following figure comes from the dataset's quality check: shown when provenance.json has a
    'quality' entry, nothing otherwise (both on the committed result folder)."""
    from XRealSlicerLib.results import read_result

    with_quality = read_result(EXAMPLE_RESULT_DIR)
    assert "Dice 0.91 / 0.89 / 0.84" in results.quality_summary(with_quality.provenance)
    copy = tmp_path / "result"
    shutil.copytree(EXAMPLE_RESULT_DIR, copy)
    provenance = json.loads((copy / "provenance.json").read_text())
    del provenance["quality"]
    (copy / "provenance.json").write_text(json.dumps(provenance))
    assert results.quality_summary(read_result(copy).provenance) is None
    assert "Dice" not in results.result_label("seed-7", read_result(copy).provenance)
    for quality in ({}, {"anatomy_dice": {}}, {"anatomy_dice": {"heart": "n/a"}}, "0.9", {"other": 1}):
        assert results.quality_summary({"quality": quality}) is None


def test_generate_again_reproduces_a_results_settings(vocabulary, tmp_path):
    """'Generate again with these settings': the result's seed, steps, anatomy steps, guidance and sampler,
    explicitly (Fast preview off), so the request is the one that made the result."""
    from XRealSlicerLib.results import read_result

    provenance = read_result(EXAMPLE_RESULT_DIR).provenance
    settings = results.settings_from_provenance(provenance)
    assert settings == {"seed": 7, "steps": 2, "anatomySteps": 2, "guidance": 7.0, "sampler": "ddim",
                        "fastPreview": False, "variations": 1, "interpolate": False}
    panel = planning.PanelSettings(seed=settings["seed"], steps=settings["steps"],
                                   anatomy_steps=settings["anatomySteps"], guidance=settings["guidance"],
                                   sampler=settings["sampler"], fast=settings["fastPreview"])
    plan = planning.plan_jobs(_segments(vocabulary), CANVAS, vocabulary, replay_info(), panel, tmp_path)
    # settings newer than the committed result (control stages, ...) are at values that change nothing here
    again = {name: value for name, value in plan.parameters.with_seed(7).to_public().items() if name in provenance}
    assert set(again) >= {"seed", "steps", "anatomy_steps", "guidance", "eta", "sampler"}
    assert {name: provenance[name] for name in again} == {**again, "soft_mask_value": provenance["soft_mask_value"]}
    assert results.settings_from_provenance({"seed": True, "steps": "20"}) == {"fastPreview": False, "variations": 1,
                                                                             "interpolate": False}


# ----------------------------------------------------------------------------- defect 3: one result's masks


def test_only_the_shown_results_masks_are_visible():
    views = results.result_visibility("seg2", ["seg1", "seg2", "seg3"], canvas="drawn")
    assert views == {"seg1": (), "seg2": ("Red",), "seg3": (), "drawn": ("Yellow",)}
    assert results.result_visibility("seg1", ["seg1"]) == {"seg1": ("Red",)}


# ----------------------------------------------------------------------------- defect 8: the engine environment


def test_the_environment_goes_to_local_application_data(tmp_path):
    home = tmp_path / "home"
    windows = environment.default_environment_dir({"LOCALAPPDATA": r"C:\Users\u\AppData\Local",
                                                   "APPDATA": r"C:\Users\u\AppData\Roaming"}, "win32", home)
    assert str(windows).replace("/", "\\").startswith(r"C:\Users\u\AppData\Local")  # not the roaming profile
    assert windows.parts[-2:] == ("XRealSlicer", "engine-venv")
    assert environment.default_environment_dir({}, "win32", home) == home / "AppData/Local/XRealSlicer/engine-venv"
    assert environment.default_environment_dir({}, "darwin", home) == \
        home / "Library/Application Support/XRealSlicer/engine-venv"
    assert environment.default_environment_dir({}, "linux", home) == home / ".local/share/XRealSlicer/engine-venv"
    assert environment.default_environment_dir({"XDG_DATA_HOME": "/data"}, "linux", home) == \
        Path("/data/XRealSlicer/engine-venv")
    settings = tmp_path / "settings" / "Slicer.ini"
    assert environment.legacy_environment_dir(settings) == tmp_path / "settings" / "XRealSlicer" / "engine-venv"


def _fake_venv(path: Path, marker=True) -> Path:
    from XRealSlicerLib.launcher import venv_python

    python = venv_python(path)
    python.parent.mkdir(parents=True)
    python.write_text("")
    (path / "pyvenv.cfg").write_text("home = /usr/bin\n")
    if marker:
        (path / environment.MARKER_FILE).write_text(environment.MARKER_TEXT)
    return path


def test_removing_the_environment_removes_only_ours(tmp_path):
    configured = tmp_path / "local" / "XRealSlicer" / "engine-venv"
    legacy = tmp_path / "roaming" / "XRealSlicer" / "engine-venv"
    # an update finds the old environment and keeps using it rather than downloading several GB again
    _fake_venv(legacy, marker=False)
    assert environment.environment_in_use(configured, legacy) == legacy
    _fake_venv(configured)
    assert environment.environment_in_use(configured, legacy) == configured
    assert environment.removable_environments(configured, legacy) == [configured, legacy]
    for path in (configured, legacy):
        environment.remove_environment(path, legacy)
        assert not path.exists() and not path.parent.exists()  # the empty XRealSlicer folder goes too
    assert environment.removable_environments(configured, legacy) == []
    # someone else's environment (no marker, not the old default place) is never deleted
    other = _fake_venv(tmp_path / "conda-env", marker=False)
    assert not environment.is_engine_environment(other, legacy)
    with pytest.raises(InputError, match="not an engine environment made by XRealSlicer"):
        environment.remove_environment(other, legacy)
    assert other.exists()
    (tmp_path / "plain").mkdir()
    assert not environment.is_engine_environment(tmp_path / "plain")  # not a virtual environment at all


class _Process:
    def __init__(self, lines, code):
        import io

        self.stdout = io.StringIO("".join(line + "\n" for line in lines))
        self.code = code

    def wait(self, timeout=None):
        return self.code


@pytest.mark.parametrize("step_failing, outcome", [
    (None, environment.INSTALLED), ("venv", environment.VENV_FAILED), ("pip", environment.PIP_FAILED),
    ("import", environment.NOT_IMPORTABLE), ("no python", environment.NO_BASE_PYTHON),
])
def test_install_reports_an_outcome_the_gui_translates(tmp_path, step_failing, outcome):
    """The worker returns an outcome constant (the GUI's main thread turns it into a translated sentence)."""
    from XRealSlicerLib.launcher import venv_python

    venv_dir = tmp_path / "XRealSlicer" / "engine-venv"
    commands, lines = [], []

    def spawn(command, env_update, cwd):
        commands.append(command)
        if command[1:3] == ["-m", "venv"]:
            if step_failing != "venv":
                _fake_venv(Path(command[3]), marker=False)
            return _Process(["created"], 1 if step_failing == "venv" else 0)
        return _Process(["Successfully installed torch"], 1 if step_failing == "pip" else 0)

    result = environment.install_environment(
        lines.append, spawn, str(venv_python(venv_dir)), venv_dir, Path("requirements.txt"), {"PATH": "/usr/bin"},
        find_python=lambda env: None if step_failing == "no python" else "/usr/bin/python3",
        check=lambda python, env: step_failing != "import")
    assert result == outcome
    if outcome in (environment.INSTALLED, environment.PIP_FAILED, environment.NOT_IMPORTABLE):
        assert (venv_dir / environment.MARKER_FILE).is_file()  # removable later
        assert commands[1][:3] == [str(venv_python(venv_dir)), "-m", "pip"] and lines
    if outcome == environment.NO_BASE_PYTHON:
        assert commands == []


def test_the_replaying_engine_cancels_like_the_engine(vocabulary, tmp_path):
    from XRealSlicerLib.jobs import CANCELLED

    client = ReplayEngineClient(polls=10_000)
    plan = planning.plan_jobs(_segments(vocabulary), CANVAS, vocabulary, client.info(),
                              planning.PanelSettings(variations=2, steps=2), tmp_path)
    runner = JobRunner(client, poll_interval=0.01)
    runner.start(plan.jobs)
    deadline = time.monotonic() + 30
    while runner.current_job_id is None and time.monotonic() < deadline:
        time.sleep(0.01)
    runner.cancel()
    assert runner.wait(60)
    assert runner.drain()[-1].state == CANCELLED and len(client.submitted) == 1
