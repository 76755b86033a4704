"""XRealSlicerLib (the Slicer module's logic without Slicer): masks -> request, validation, series,
connection rules, and — against a real engine process on loopback with a tiny random model —
launcher start/health/shutdown, a 2-step job through the job runner, result handling and the
SEG fallback reader."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR / "XRealSlicer"))

from XRealSlicerLib import connection, series  # noqa: E402
from XRealSlicerLib.request import (  # noqa: E402
    CanvasGeometry,
    SegmentInput,
    build_inputs,
    canvas_ijk_to_ras,
    write_request_files,
)
from XRealSlicerLib.vocabulary import PATHOLOGY, Vocabulary, parse_terminology  # noqa: E402
from xreal_engine.errors import InputError  # noqa: E402

MODEL_LABELS = [1, 2, 3, 4]
MODEL_FINDINGS = ["cardiomegaly", "pneumonia"]


@pytest.fixture(scope="module")
def vocabulary():
    return Vocabulary.load()


def _disc(shape, center, radius):
    rows, columns = np.ogrid[: shape[0], : shape[1]]
    return ((rows - center[0]) ** 2 + (columns - center[1]) ** 2 <= radius**2).astype(np.uint8)[np.newaxis]


def _drawing(vocabulary, shape=(64, 64), finding="cardiomegaly"):
    """Segments as the GUI creates them (names + terminology from the vocabulary) and paints them."""
    templates = {t.meaning.label: t for t in vocabulary.anatomy_templates()}
    heart = _disc(shape, (40, 34), 10)
    pathology = _disc(shape, (40, 36), 6)  # overlaps the heart: must be kept
    return [
        SegmentInput(templates[2].name, _disc(shape, (30, 18), 12), templates[2].terminology),
        SegmentInput(templates[1].name, _disc(shape, (30, 46), 12), templates[1].terminology),
        SegmentInput(templates[3].name, heart, templates[3].terminology),
        SegmentInput("Pathology", pathology, "", finding=finding),
    ]


def test_vocabulary_templates_and_recognition(vocabulary):
    anatomy = vocabulary.anatomy_templates()
    assert [t.meaning.label for t in anatomy] == [1, 2, 3, 4]
    assert all(0.0 <= c <= 1.0 for t in anatomy for c in t.color)
    left = anatomy[0]
    # terminology wins over the display name: a renamed segment is still the left lung
    assert vocabulary.classify("my drawing", left.terminology) == left.meaning
    # left/right lungs share the type code and differ only by the modifier
    assert vocabulary.classify("x", anatomy[1].terminology).label == 2
    # by name (display name, engine name, alias) when there is no terminology
    assert vocabulary.classify("Heart").label == 3
    assert vocabulary.classify("right lung").label == 2
    assert vocabulary.classify("enlarged heart").finding == "cardiomegaly"
    assert vocabulary.classify("something else") is None
    finding = vocabulary.finding_template("Pneumonia", "Pathology 1")
    assert finding.name == "Pathology 1" and finding.meaning.kind == PATHOLOGY
    assert vocabulary.classify("Pathology 1", finding.terminology).finding == "pneumonia"
    codes = parse_terminology(finding.terminology)
    assert codes["type"] == ("SCT", "233604007") and codes["region"] == ("SCT", "39607008")


def test_build_inputs_keeps_overlaps_and_spacing(vocabulary, tmp_path):
    segments = _drawing(vocabulary)
    canvas = CanvasGeometry((1, 64, 64), (1.5, 2.0, 1.0))
    inputs = build_inputs(segments, canvas, vocabulary, MODEL_LABELS, MODEL_FINDINGS)
    assert inputs.anatomy.shape == (64, 64) and inputs.anatomy.dtype == np.uint8
    assert set(np.unique(inputs.anatomy)) == {0, 1, 2, 3}
    # heart (3) is painted over the lungs where they overlap
    assert inputs.anatomy[40, 34] == 3
    (mask, finding, name), = inputs.pathologies
    assert finding == "cardiomegaly" and name == "Pathology"
    assert np.array_equal(mask, segments[3].array[0] != 0)  # full pathology mask, overlap with heart kept
    assert inputs.pixel_spacing_mm == (2.0, 1.5)  # (row, column) from Slicer's (column, row, slice)

    files = write_request_files(inputs, tmp_path, {"seed": 3})
    import SimpleITK as sitk

    anatomy = sitk.ReadImage(str(files.anatomy_path))
    assert anatomy.GetSpacing() == (1.5, 2.0)
    assert np.array_equal(sitk.GetArrayFromImage(anatomy), inputs.anatomy)
    (path, finding), = files.pathologies
    assert finding == "cardiomegaly"
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), mask.astype(np.uint8))
    assert files.parameters == {"seed": 3}


@pytest.mark.parametrize(
    "change, message",
    [
        ("empty anatomy", "The anatomy is empty"),
        ("no finding", "has no finding"),
        ("unknown finding", "is not known to this model"),
        ("3d canvas", "has 5 slices"),
        ("other grid", "is on a grid of shape"),
        ("unknown segment", "painted segment 'Scribble' has no finding"),
    ],
)
def test_build_inputs_refuses_bad_drawings(vocabulary, change, message):
    segments = _drawing(vocabulary)
    canvas = CanvasGeometry((1, 64, 64), (1.0, 1.0, 1.0))
    if change == "empty anatomy":
        for segment in segments[:3]:
            segment.array = np.zeros_like(segment.array)
    elif change == "no finding":
        segments[3].finding = ""
    elif change == "unknown finding":
        segments[3].finding = "pneumothorax"  # in the vocabulary, not in this model
    elif change == "3d canvas":
        canvas = CanvasGeometry((5, 64, 64), (1.0, 1.0, 1.0))
    elif change == "other grid":
        segments[0].array = np.zeros((1, 32, 32), np.uint8)
    elif change == "unknown segment":
        segments.append(SegmentInput("Scribble", _disc((64, 64), (10, 10), 3)))  # painted, no finding chosen
    with pytest.raises(InputError, match=message):
        build_inputs(segments, canvas, vocabulary, MODEL_LABELS, MODEL_FINDINGS)


def test_empty_pathology_is_left_out_with_a_warning(vocabulary):
    segments = _drawing(vocabulary)
    segments[3].array = np.zeros_like(segments[3].array)
    inputs = build_inputs(segments, CanvasGeometry((1, 64, 64)), vocabulary, MODEL_LABELS, MODEL_FINDINGS)
    assert inputs.pathologies == [] and "empty" in inputs.warnings[0]


def test_edit_mode_needs_a_pathology_but_no_anatomy(vocabulary):
    pathology = SegmentInput("Pathology", _disc((64, 64), (20, 20), 5), finding="pneumonia")
    inputs = build_inputs([pathology], CanvasGeometry((1, 64, 64)), vocabulary, MODEL_LABELS, MODEL_FINDINGS,
                          edit_mode=True)
    assert inputs.anatomy is None and inputs.pathologies[0][1] == "pneumonia"
    # "No finding" removes a finding inside the region: edit mode only, sent to the engine as ''
    removal = vocabulary.finding_template("no finding", "Remove")
    inputs = build_inputs([SegmentInput("Remove", pathology.array, removal.terminology)], CanvasGeometry((1, 64, 64)),
                          vocabulary, MODEL_LABELS, MODEL_FINDINGS, edit_mode=True)
    assert inputs.pathologies[0][1] == ""
    with pytest.raises(InputError, match="works only when editing"):
        build_inputs(_drawing(vocabulary)[:3] + [SegmentInput("Remove", pathology.array, removal.terminology)],
                     CanvasGeometry((1, 64, 64)), vocabulary, MODEL_LABELS, MODEL_FINDINGS)
    with pytest.raises(InputError, match="needs at least one painted pathology"):
        build_inputs([], CanvasGeometry((1, 64, 64)), vocabulary, MODEL_LABELS, MODEL_FINDINGS, edit_mode=True)


def test_canvas_geometry_matches_the_engine_convention():
    assert np.array_equal(canvas_ijk_to_ras((0.5, 0.7, 1.0)), np.diag([-0.5, -0.7, 1.0, 1.0]))


def test_variation_seeds_and_interpolation():
    assert series.variation_seeds(7, 3) == [7, 8, 9]
    assert series.variation_seeds(2**32 - 1, 2) == [2**32 - 1, 0]
    with pytest.raises(InputError):
        series.variation_seeds(0, 0)
    # a path drawn in RAS on the canvas diag(-2, -2, 1, 1): RAS (-20, -10) is column 10, row 5
    ras_to_ijk = np.linalg.inv(canvas_ijk_to_ras((2.0, 2.0, 1.0)))
    path = series.ras_to_pixel(np.array([[-20.0, -10.0, 0.0], [-20.0, -50.0, 0.0]]), ras_to_ijk)
    assert np.allclose(path, [[5, 10], [25, 10]])
    positions = series.positions_along_path(path, 5)
    assert np.allclose(positions[:, 0], [5, 10, 15, 20, 25])
    mask = _disc((40, 40), (20, 20), 3)[0]
    moved = series.interpolated_masks(mask, positions)
    assert len(moved) == 5 and all(m.sum() == mask.sum() for m in moved)
    assert np.allclose(np.argwhere(moved[0]).mean(axis=0), [5, 10])
    with pytest.raises(InputError, match="off the canvas"):
        series.interpolated_masks(mask, [(500, 500)])


def test_connection_rules():
    assert connection.normalize_url("gpu-box:8000/") == "http://gpu-box:8000"
    assert connection.normalize_url("https://x.org/api/v1") == "https://x.org"
    with pytest.raises(InputError, match="not one to connect to"):
        connection.normalize_url("http://0.0.0.0:8000")
    with pytest.raises(InputError, match="http:// or https://"):
        connection.normalize_url("ftp://host")
    assert connection.insecure_url_warning("http://10.0.0.2:8000")
    assert connection.insecure_url_warning("http://127.0.0.1:8000") is None
    history = connection.updated_history([f"http://h{i}" for i in range(12)], "http://h5")
    assert history[0] == "http://h5" and len(history) == 10 and history.count("http://h5") == 1


# ----------------------------------------------------------------------------- sampling settings: the engine's one policy

DEMO_LIKE = {"num_inference_steps": 100, "anatomy_steps": 80, "eta": 1.0, "guidance_scale": 7.0,
             "soft_mask_value": 0.2}
# (public name, value, accepted): both ends of every range and just outside; anatomy steps against steps=20
SAMPLING_BOUNDARIES = [
    ("steps", 1, True), ("steps", 1000, True), ("steps", 0, False), ("steps", 1001, False),
    ("anatomy_steps", 0, True), ("anatomy_steps", 20, True), ("anatomy_steps", -1, False),
    ("anatomy_steps", 21, False),
    ("guidance", 0.0, True), ("guidance", 50.0, True), ("guidance", -0.001, False), ("guidance", 50.001, False),
    ("eta", 0.0, True), ("eta", 1.0, True), ("eta", -0.001, False), ("eta", 1.001, False),
    ("seed", 0, True), ("seed", 2**32 - 1, True), ("seed", -1, False), ("seed", 2**32, False),
]


def _engine_resolve(defaults, given):
    """What the engine resolves for the same public values (CLI and service use this)."""
    from xreal_engine.model.sampling import SETTINGS, SamplingParameters

    field = {setting.public_name: name for name, setting in SETTINGS.items()}
    return SamplingParameters.resolve(defaults, **{field[key]: value for key, value in given.items()})


@pytest.mark.parametrize("name, value, accepted", SAMPLING_BOUNDARIES)
def test_sampling_values_at_both_ends_of_every_range(name, value, accepted):
    from XRealSlicerLib import parameters

    defaults = parameters.model_defaults({"defaults": DEMO_LIKE})
    given = {"steps": 20, name: value} if name == "anatomy_steps" else {name: value}
    if accepted:
        resolved = parameters.resolve(defaults, **given)
        assert resolved == _engine_resolve(defaults, given)
        assert parameters.request_values(resolved)[name] == value
        return
    with pytest.raises(InputError) as refused:
        parameters.resolve(defaults, **given)
    with pytest.raises(InputError) as engine_refused:
        _engine_resolve(defaults, given)
    assert str(refused.value) == str(engine_refused.value)  # one sentence, the engine's
    assert f"('{name}')" in str(refused.value) and repr(value) in str(refused.value)


@pytest.mark.parametrize("given", [
    {}, {"steps": 20}, {"steps": 20, "anatomy_steps": 20}, {"steps": 1}, {"steps": 1000}, {"steps": 3},
    {"steps": 7, "anatomy_steps": 0, "guidance": 0.0, "eta": 0.0, "seed": 9},
])
@pytest.mark.parametrize("model_defaults", [DEMO_LIKE, {}, {"num_inference_steps": 10, "anatomy_steps": 5}],
                         ids=["demo", "xreal", "tiny"])
def test_slicer_resolves_sampling_settings_like_the_engine(given, model_defaults):
    from XRealSlicerLib import parameters

    defaults = parameters.model_defaults({"defaults": model_defaults})
    resolved = parameters.resolve(defaults, **given)
    assert resolved == _engine_resolve(defaults, given)
    sent = parameters.request_values(resolved, seed=11)
    assert set(sent) == {"steps", "anatomy_steps", "guidance", "eta", "seed", "sampler"} and sent["seed"] == 11
    assert parameters.resolve(defaults, **dict(sent)) == resolved.with_seed(11)  # what the engine gets back


def test_steps_alone_keep_the_models_anatomy_fraction():
    """The bug: Steps 20 sent 20 anatomy steps from Slicer while the CLI and the service used 16 (80 of 100)."""
    from XRealSlicerLib import parameters

    defaults = parameters.model_defaults({"defaults": DEMO_LIKE})
    assert parameters.request_values(parameters.resolve(defaults, steps=20)) == {
        "steps": 20, "anatomy_steps": 16, "guidance": 7.0, "eta": 1.0, "sampler": "ddim"}
    follow = parameters.anatomy_steps_after_steps_change
    assert follow(defaults, 100, 20, 80) == 16  # following the fraction: 80 of 100 -> 16 of 20
    assert follow(defaults, 20, 1000, 16) == 800
    assert follow(defaults, None, 20, 3) == 16  # nothing to compare with: follow
    assert follow(defaults, 100, 20, 30) == 30  # set by the user: kept ...
    with pytest.raises(InputError, match=r"\('anatomy_steps'\).*number of steps \(20\)"):
        parameters.resolve(defaults, steps=20, anatomy_steps=30)  # ... and refused at Generate, not clipped
    for steps in (1, 2, 3, 7, 20, 999, 1000):  # the panel shows what the engine would resolve
        assert follow(defaults, 100, steps, 80) == parameters.resolve(defaults, steps=steps).anatomy_steps


def test_parameter_node_ranges_and_defaults_come_from_the_policy():
    from XRealSlicerLib import parameters
    from xreal_engine.model.sampling import SETTINGS, XREAL_DEFAULTS

    for field, name in parameters.NODE_FIELDS.items():
        low, high = parameters.node_range(field)
        setting = SETTINGS[name]
        assert (type(low), type(high)) == (setting.kind, setting.kind) and low == setting.low
        assert high == (min(setting.high, 2**31 - 1) if field == "seed" else setting.high)  # a QSpinBox is a C int
    assert parameters.NODE_DEFAULTS == {"steps": XREAL_DEFAULTS["num_inference_steps"],
                                        "anatomySteps": XREAL_DEFAULTS["anatomy_steps"],
                                        "guidance": XREAL_DEFAULTS["guidance_scale"]}
    assert parameters.node_defaults(parameters.model_defaults({"defaults": DEMO_LIKE})) == {
        "steps": 100, "anatomySteps": 80, "guidance": 7.0}
    # /info of a newer engine may name settings this module does not know; a bad default is the engine's sentence
    assert parameters.model_defaults({"defaults": dict(DEMO_LIKE, future_setting=3)}) == DEMO_LIKE
    assert parameters.model_defaults(None) == parameters.model_defaults({}) == XREAL_DEFAULTS
    with pytest.raises(InputError, match=r"\('anatomy_steps'\)"):
        parameters.model_defaults({"defaults": {"num_inference_steps": 10, "anatomy_steps": 20}})


def test_background_call_and_logged_commands():
    import time

    from XRealSlicerLib.launcher import check_requirements_command, requirements_installed, venv_python
    from XRealSlicerLib.tasks import BackgroundCall, run_logged

    code = "import sys; print('one'); print('two', file=sys.stderr); sys.exit(3)"
    call = BackgroundCall(lambda task: run_logged([sys.executable, "-c", code], task.report))
    assert call.wait(30)
    finished = call.poll()
    assert finished is call and call.ok and call.value == 3
    assert call.poll() is None  # delivered once
    assert sorted(call.new_lines()) == ["one", "two"]
    failing = BackgroundCall(lambda task: 1 / 0)
    failing.wait(10)
    assert failing.poll() is failing and failing.ok is False and isinstance(failing.error, ZeroDivisionError)
    # the engine's requirements import in this environment, and a missing interpreter is "not installed"
    started = time.monotonic()
    assert requirements_installed(sys.executable)
    assert not requirements_installed("/nonexistent/python")
    assert "torch" in check_requirements_command("py")[-1]
    assert venv_python(Path("/v")).as_posix() in ("/v/bin/python", "/v/Scripts/python.exe")
    assert time.monotonic() - started < 120


def test_pacs_lists_from_the_engine_configuration(tmp_path):
    """Destinations and sources as the engine's PACS module lists them (real config file, no secrets)."""
    from xreal_engine.pacs.config import list_nodes, load_config

    config = tmp_path / "pacs.json"
    config.write_text(json.dumps({
        "destinations": {"orthanc": {"type": "dicomweb", "url": "http://127.0.0.1:8042/dicom-web",
                                     "headers": {"Authorization": "Bearer secret"}}},
        "sources": {"archive": {"type": "dimse", "host": "127.0.0.1", "port": 104, "called_aet": "ARCHIVE"}},
        "nodes": {"both": {"type": "dicomweb", "url": "http://127.0.0.1:8043/dicom-web"}},
    }))
    nodes = list_nodes(load_config(config))
    assert "secret" not in json.dumps(nodes)
    for shape in (nodes, {"nodes": nodes}, {"destinations": ["both", "orthanc"], "sources": ["archive", "both"]}):
        destinations, sources = connection.pacs_nodes({"pacs": shape})
        assert sorted(destinations) == ["both", "orthanc"] and sorted(sources) == ["archive", "both"]
    assert connection.pacs_nodes({"pacs": {}}) == ([], [])  # nothing configured: the feature is hidden


def test_templates_split_into_segments(tmp_path, repo_dir):
    """An anatomy template label map -> one mask per label present; shipped templates when there are some."""
    import SimpleITK as sitk

    from XRealSlicerLib.enginepath import templates_dir
    from XRealSlicerLib.request import read_template, template_segments

    labels = np.zeros((40, 30), np.uint8)
    labels[5:20, 2:12], labels[5:20, 18:28], labels[15:30, 10:20] = 2, 1, 3
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / "anatomy_test.png"))
    read, spacing = read_template(tmp_path / "anatomy_test.png")
    assert spacing is None and np.array_equal(read, labels)  # a PNG has no spacing: the model's field of view is used
    masks = template_segments(read)
    assert sorted(masks) == [1, 2, 3] and masks[3].shape == (1, 40, 30) and masks[3].sum() == 150
    shipped = templates_dir(repo_dir / "XRealSlicer")
    for path in sorted(shipped.glob("anatomy*.png")) if shipped else []:
        values = set(template_segments(read_template(path)[0]))
        assert values and values <= {1, 2, 3, 4}, f"{path.name} has labels {values}"
    with pytest.raises(InputError, match="not a readable image"):
        (tmp_path / "broken.png").write_bytes(b"nope")
        read_template(tmp_path / "broken.png")


def test_status_text_for_the_panel():
    from XRealSlicerLib.jobs import RUNNING, JobEvent, format_duration

    assert format_duration(42) == "42 s" and format_duration(125) == "2 min 05 s" and format_duration(7300) == "2 h 01 min"
    event = JobEvent(RUNNING, 1, 3, stage="pathology", step=12, total=50, eta_seconds=90)
    assert event.status_text() == "[2/3] Running: pathology 12/50, about 1 min 30 s left"


def test_launcher_port_line_parsing():
    from XRealSlicerLib.launcher import engine_command, parse_port_line

    assert parse_port_line("8123") == 8123
    assert parse_port_line("xreal-engine listening on http://127.0.0.1:40123 (model demo)") == 40123
    assert parse_port_line('{"port": 5555, "host": "127.0.0.1"}') == 5555
    assert parse_port_line("Loading model ...") is None
    command = engine_command("/py", "demo", Path("/d"))
    assert command[:5] == ["/py", "-u", "-m", "xreal_engine.cli", "serve"] and "--port" in command


def test_launcher_passes_the_token_in_the_environment_not_on_the_command_line(tmp_path):
    """A token on the command line shows in ``ps``; one starting with '-' would also break argparse."""
    from XRealSlicerLib.launcher import EngineLauncher

    launcher = EngineLauncher("/py", "demo", tmp_path, token="-starts-with-a-dash")
    assert not any("-starts-with-a-dash" in part for part in launcher.command())
    assert launcher.environment()["XREAL_ENGINE_TOKEN"] == "-starts-with-a-dash"


# A stand-in engine process: announces a port, then behaves like ``serve --exit-with-stdin``: exits
# when its stdin closes, after ``argv[1]`` seconds (a slow, graceful shutdown on a loaded machine).
FAKE_ENGINE = r"""
import sys, time
print("Loading model ...", flush=True)
if sys.argv[1] == "crash-loading":
    sys.exit(3)
print("xreal-engine listening on http://127.0.0.1:40999", flush=True)
if sys.argv[1] == "crash-listening":
    sys.exit(3)
sys.stdin.read()
time.sleep(float(sys.argv[1]))
"""


class _FakeClient:
    def __init__(self, healthy=True):
        self.healthy = healthy

    def health(self):
        from xreal_engine.client import EngineUnreachable

        if not self.healthy:
            raise EngineUnreachable("not yet")
        return {"status": "ok"}

    def shutdown(self):  # the stand-in listens on no port: the launcher falls back to closing stdin
        from xreal_engine.client import EngineUnreachable

        raise EngineUnreachable("no HTTP here")


def _fake_launcher(tmp_path, behaviour, healthy=True, **kwargs):
    from XRealSlicerLib.launcher import EngineLauncher, default_spawn

    def spawn(args, env_update, cwd):
        return default_spawn([sys.executable, "-u", "-c", FAKE_ENGINE, behaviour], env_update, cwd)

    return EngineLauncher(sys.executable, "demo", tmp_path / "data", spawn=spawn,
                          client_factory=lambda url, token: _FakeClient(healthy), **kwargs)


def _start_then_stop(launcher):
    """(exit code, seconds that ``stop()`` took)."""
    import time

    launcher.start(timeout=120)
    process = launcher.process
    started = time.monotonic()
    launcher.stop()
    assert launcher.process is None
    return process.returncode, time.monotonic() - started


def test_launcher_stop_waits_generously_and_ends_when_the_engine_exits(tmp_path):
    """A busy machine shuts down slowly (the fixture once saw -15 after 10 s); the wait ends at the exit."""
    from XRealSlicerLib.launcher import STOP_TIMEOUT_SECONDS

    launcher = _fake_launcher(tmp_path, "1.5")
    assert launcher.stop_timeout == STOP_TIMEOUT_SECONDS >= 60
    returncode, seconds = _start_then_stop(launcher)
    assert returncode == 0 and seconds < STOP_TIMEOUT_SECONDS / 2  # graceful, and over when the process exited
    # configurable: an engine that takes too long is terminated after stop_timeout
    returncode, seconds = _start_then_stop(_fake_launcher(tmp_path, "600", stop_timeout=0.5))
    assert returncode != 0 and seconds < 30


@pytest.mark.parametrize("behaviour", ["crash-loading", "crash-listening"])
def test_launcher_start_ends_as_soon_as_the_engine_exits(tmp_path, behaviour):
    """A long start-up timeout costs nothing when the engine exits: the wait ends at once, with its output."""
    import time

    from xreal_engine.errors import ModelError

    launcher = _fake_launcher(tmp_path, behaviour, healthy=False, start_timeout=600)
    started = time.monotonic()
    with pytest.raises(ModelError, match="stopped while starting"):
        launcher.start()
    assert time.monotonic() - started < 60 and launcher.process is None


# ----------------------------------------------------------------------------- against a real engine


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from xreal_engine.model.random_model import create_random_model

    return create_random_model(tmp_path_factory.mktemp("model") / "tiny", preset="tiny")


@pytest.fixture(scope="module")
def orthanc():
    """A real Orthanc on loopback (Debian orthanc + DICOMweb plugin) when installed, else None."""
    from orthanc import orthanc_available, running_orthanc

    if not orthanc_available():
        yield None
        return
    with running_orthanc() as server:
        yield server


@pytest.fixture(scope="module")
def engine(tiny_model, orthanc, tmp_path_factory):
    """The bundled engine started the way the Slicer module starts it (own process, --port 0, token)."""
    from XRealSlicerLib.launcher import EngineLauncher

    data_dir = tmp_path_factory.mktemp("engine-data")
    pacs_config = data_dir / "pacs.json"
    if orthanc is not None:  # destination and source
        node = {"type": "dicomweb", "url": orthanc.dicomweb_url, "timeout_s": 10,
                "headers": {"Authorization": orthanc.authorization_header}}
        pacs_config.write_text(json.dumps({"nodes": {"orthanc": node}}))
    else:  # listed in /info only
        pacs_config.write_text(json.dumps({"destinations": {"orthanc": {"type": "dicomweb",
                                                                        "url": "http://127.0.0.1:9/dicom-web"}}}))
    launcher = EngineLauncher(sys.executable, str(tiny_model), data_dir, device="cpu", pacs_config=pacs_config)
    launcher.start(timeout=240)
    yield launcher
    process = launcher.process
    launcher.stop()  # waits up to STOP_TIMEOUT_SECONDS (a busy machine is slow) and ends when the engine exits
    # stopped through the API (uvicorn exits 0), not terminated or killed; no process left behind
    assert process.returncode == 0 and launcher.process is None


def test_launcher_starts_a_healthy_engine_with_a_token(engine):
    from xreal_engine.client import EngineClient, EngineError

    assert engine.is_running() and engine.base_url.startswith("http://127.0.0.1:")
    assert engine.client().health()["status"] == "ok"
    info = engine.client().info()
    assert connection.model_findings(info) and set(connection.model_anatomy_labels(info)) >= {1, 2, 3}
    assert "Connected to" in connection.status_line(info, engine.base_url)
    destinations, _sources = connection.pacs_nodes(info)
    assert destinations == ["orthanc"]  # "Send to PACS" offers the engine's destination
    with pytest.raises(EngineError) as refused:  # the local engine is not open to other local users
        EngineClient(engine.base_url, token=None).info()
    assert refused.value.status == 401


def _run(runner, jobs, timeout=300):
    runner.start(jobs)
    assert runner.wait(timeout), "the job runner did not finish"
    return runner.drain()


def test_two_step_job_through_the_runner_and_fallback_reader(engine, vocabulary, tmp_path):
    from XRealSlicerLib import parameters
    from XRealSlicerLib.jobs import DONE, JobRunner, JobSpec
    from XRealSlicerLib.results import read_fallback_segments

    info = engine.client().info()
    size, fov = connection.model_geometry(info)
    findings = connection.model_findings(info)
    segments = _drawing(vocabulary, shape=(size, size), finding=findings[0])
    canvas = CanvasGeometry((1, size, size), (fov / size, fov / size, 1.0))
    inputs = build_inputs(segments, canvas, vocabulary, list(connection.model_anatomy_labels(info)), findings)
    # only the steps: the engine resolves the anatomy steps, and Slicer's lib must agree with it
    files = write_request_files(inputs, tmp_path / "request", {"seed": 5, "steps": 2})
    expected = parameters.resolve(parameters.model_defaults(info), steps=2, seed=5)

    runner = JobRunner(engine.client(), poll_interval=0.1)
    events = _run(runner, [JobSpec(files, tmp_path / "result", "seed 5")])
    states = [event.state for event in events]
    assert states[-1] == DONE, [e.status_text() for e in events]
    assert any(event.result is not None for event in events)
    (result,) = runner.results
    assert result.sc_path.is_file() and result.seg_path.is_file()
    import pydicom

    sc = pydicom.dcmread(str(result.sc_path), stop_before_pixels=True)
    seg = pydicom.dcmread(str(result.seg_path), stop_before_pixels=True)
    assert result.sc_series_uid == sc.SeriesInstanceUID and result.seg_series_uid == seg.SeriesInstanceUID
    assert result.study_uid == sc.StudyInstanceUID
    assert result.provenance["seed"] == 5 and result.provenance["steps"] == 2
    assert {key: result.provenance[key] for key in expected.to_public()} == expected.to_public()

    rebuilt = read_fallback_segments(result.directory, vocabulary)
    names = [s.name for s in rebuilt]
    assert names == ["Left lung", "Right lung", "Heart", vocabulary.finding_display_name(findings[0])]
    by_name = {s.name: s for s in rebuilt}
    # the rebuilt masks are the drawn masks, on the SC grid, overlap kept
    assert np.array_equal(by_name["Heart"].array[0] == 1, inputs.anatomy == 3)
    assert np.array_equal(by_name[names[-1]].array[0] == 1, inputs.pathologies[0][0])
    assert by_name["Heart"].array.shape == (1, sc.Rows, sc.Columns)
    assert all(vocabulary.classify(s.name, s.terminology) is not None for s in rebuilt)
    assert vocabulary.classify("x", by_name["Left lung"].terminology).label == 1


def test_runner_reports_engine_refusal_and_cancel(engine, vocabulary, tmp_path):
    from XRealSlicerLib.jobs import CANCELLED, FAILED, JobRunner, JobSpec

    info = engine.client().info()
    size, _ = connection.model_geometry(info)
    labels = list(connection.model_anatomy_labels(info))
    inputs = build_inputs(_drawing(vocabulary, (size, size), connection.model_findings(info)[0]),
                          CanvasGeometry((1, size, size)), vocabulary, labels, connection.model_findings(info))
    # the engine re-checks everything: a finding it does not know comes back as its own sentence
    files = write_request_files(inputs, tmp_path / "bad", {"seed": 1, "steps": 2, "anatomy_steps": 1})
    files.pathologies = [(files.pathologies[0][0], "not-a-finding")]
    events = _run(JobRunner(engine.client(), poll_interval=0.1), [JobSpec(files, tmp_path / "r1")])
    assert events[-1].state == FAILED and "not-a-finding" in events[-1].message

    # cancel: the running job is cancelled on the engine, later jobs are never submitted
    slow = write_request_files(inputs, tmp_path / "slow", {"seed": 2, "steps": 200, "anatomy_steps": 100})
    runner = JobRunner(engine.client(), poll_interval=0.1)
    runner.start([JobSpec(slow, tmp_path / "r2"), JobSpec(slow, tmp_path / "r3")])
    import time

    deadline = time.monotonic() + 120
    while runner.current_job_id is None and time.monotonic() < deadline:
        time.sleep(0.05)
    runner.cancel()
    assert runner.wait(120)
    events = runner.drain()
    assert events[-1].state == CANCELLED and not (tmp_path / "r3").exists()
    assert engine.client().status(runner.current_job_id)["state"] == "cancelled"


def test_engine_that_disappears_mid_job_is_a_clear_message(tiny_model, vocabulary, tmp_path, monkeypatch):
    from XRealSlicerLib import jobs as jobs_module
    from XRealSlicerLib.jobs import FAILED, JobRunner, JobSpec
    from XRealSlicerLib.launcher import EngineLauncher

    monkeypatch.setattr(jobs_module, "UNREACHABLE_GRACE_SECONDS", 1.0)
    launcher = EngineLauncher(sys.executable, str(tiny_model), tmp_path / "data", device="cpu")
    launcher.start(timeout=240)
    try:
        info = launcher.client().info()
        size, _ = connection.model_geometry(info)
        inputs = build_inputs(_drawing(vocabulary, (size, size), connection.model_findings(info)[0]),
                              CanvasGeometry((1, size, size)), vocabulary, list(connection.model_anatomy_labels(info)),
                              connection.model_findings(info))
        files = write_request_files(inputs, tmp_path / "req", {"seed": 3, "steps": 500, "anatomy_steps": 10})
        client = launcher.client()
        client.retries = 1
        runner = JobRunner(client, poll_interval=0.1, describe_engine="The local engine")
        runner.start([JobSpec(files, tmp_path / "res")])
        import time

        deadline = time.monotonic() + 120
        while runner.current_job_id is None and time.monotonic() < deadline:
            time.sleep(0.05)
        launcher.process.kill()  # the engine crashes
        assert runner.wait(60)
        events = runner.drain()
        assert events[-1].state == FAILED and "stopped answering" in events[-1].message
    finally:
        launcher.stop()
    assert launcher.process is None


def test_engine_shuts_down_when_the_launcher_goes_away(tiny_model, tmp_path):
    """Slicer crashing closes the engine's stdin pipe; the engine must not outlive it (--exit-with-stdin)."""
    from XRealSlicerLib.launcher import EngineLauncher

    launcher = EngineLauncher(sys.executable, str(tiny_model), tmp_path / "data", device="cpu")
    launcher.start(timeout=240)
    process = launcher.process
    try:
        assert "--exit-with-stdin" in process.args
        process.stdin.close()  # what the operating system does when Slicer dies
        assert process.wait(timeout=60) == 0  # a clean shutdown, not a kill
    finally:
        launcher.stop()
    assert launcher.process is None


def test_requirements_check_runs_in_the_given_environment_and_finds_a_base_python(tmp_path):
    """Inside Slicer the check must not inherit Slicer's PYTHONHOME; the private venv needs a real Python >= 3.10."""
    import os
    import stat

    from XRealSlicerLib.launcher import find_base_python, requirements_installed

    clean = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    assert requirements_installed(sys.executable, clean)
    assert not requirements_installed(sys.executable, dict(clean, PYTHONHOME=str(tmp_path / "slicer-python")))

    bin_dir = Path(sys.executable).parent
    found = find_base_python(dict(clean, PATH=str(bin_dir)))
    assert found is not None and Path(found).parent == bin_dir
    too_old = tmp_path / "old-bin"
    too_old.mkdir()
    fake = too_old / "python3"
    fake.write_text("#!/bin/sh\nexit 1\n")  # answers "no" to the version check, like a Python 3.8
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    assert find_base_python(dict(clean, PATH=str(too_old))) is None


def test_edit_mode_job_keeps_the_image_outside_the_region(engine, vocabulary, tmp_path):
    """Paper Fig. 3 editing: a loaded X-ray as canvas, only a pathology region drawn, the rest kept."""
    import pydicom

    from XRealSlicerLib.jobs import DONE, JobRunner, JobSpec

    info = engine.client().info()
    finding = connection.model_findings(info)[0]
    rows, columns = 96, 80  # the X-ray's own grid, not the model's
    xray = np.tile(np.linspace(0, 1000, columns), (rows, 1))[np.newaxis]  # as arrayFromVolume gives it
    region = SegmentInput("Pathology", _disc((rows, columns), (40, 40), 8), finding=finding)
    inputs = build_inputs([region], CanvasGeometry(xray.shape, (0.5, 0.5, 1.0)), vocabulary,
                          list(connection.model_anatomy_labels(info)), connection.model_findings(info), edit_mode=True)
    files = write_request_files(inputs, tmp_path / "request", {"seed": 1, "steps": 2, "anatomy_steps": 0},
                                edit_image=xray)
    runner = JobRunner(engine.client(), poll_interval=0.1)
    events = _run(runner, [JobSpec(files, tmp_path / "result")])
    assert events[-1].state == DONE, events[-1].message
    sc = pydicom.dcmread(str(runner.results[0].sc_path))
    assert (sc.Rows, sc.Columns) == (rows, columns)
    pixels = sc.pixel_array.astype(np.float64) / float(2 ** int(sc.BitsStored) - 1)
    far = np.ones((rows, columns), bool)
    far[20:61, 20:61] = False  # well outside the region and its blended seam
    assert np.abs(pixels[far] - xray[0][far] / 1000.0).max() < 0.02
    assert runner.results[0].provenance["mode"] == "edit"


def test_send_to_pacs_and_edit_an_xray_from_a_pacs_source(engine, orthanc, vocabulary, tmp_path):
    """Issue 7 item 3, Slicer side: results go to the engine's PACS destination; edit mode can name a source."""
    if orthanc is None:
        pytest.skip("Orthanc + DICOMweb plugin not installed")
    import pydicom
    from test_server_pacs import make_dx

    from XRealSlicerLib.jobs import DONE, JobRunner, JobSpec
    from XRealSlicerLib.results import push_summary

    info = engine.client().info()
    assert connection.pacs_nodes(info) == (["orthanc"], ["orthanc"])
    size, _ = connection.model_geometry(info)
    findings = connection.model_findings(info)
    inputs = build_inputs(_drawing(vocabulary, (size, size), findings[0]), CanvasGeometry((1, size, size)), vocabulary,
                          list(connection.model_anatomy_labels(info)), findings)
    files = write_request_files(inputs, tmp_path / "gen", {"seed": 4, "steps": 2, "anatomy_steps": 1})
    files.push_to = "orthanc"
    runner = JobRunner(engine.client(), poll_interval=0.1)
    events = _run(runner, [JobSpec(files, tmp_path / "gen-result")])
    assert events[-1].state == DONE, events[-1].message
    report = runner.results[0].job["push"]
    assert report["ok"] and report["accepted"] == 2 and orthanc.instance_count() == 2
    assert push_summary(report) == "2 of 2 objects accepted by orthanc."

    # "Send to PACS" on a result that was generated without push_to
    files = write_request_files(inputs, tmp_path / "later", {"seed": 5, "steps": 2, "anatomy_steps": 1})
    runner = JobRunner(engine.client(), poll_interval=0.1)
    events = _run(runner, [JobSpec(files, tmp_path / "later-result")])
    assert events[-1].state == DONE and not runner.results[0].job.get("push")
    sent = engine.client().push(runner.results[0].job["id"], "orthanc")
    assert push_summary(sent["push"]) == "2 of 2 objects accepted by orthanc." and orthanc.instance_count() == 4
    assert push_summary({"destination": "orthanc", "ok": False, "message": "Orthanc refused"}) == \
        "Sending to orthanc failed: Orthanc refused"

    # edit mode with the original fetched by the engine from the PACS (the canvas came from that series)
    source = make_dx(tmp_path / "dx.dcm", 48)
    orthanc.upload(tmp_path / "dx.dcm")
    region = SegmentInput("Pathology", _disc((48, 48), (20, 24), 6), finding=findings[0])
    edit = build_inputs([region], CanvasGeometry((1, 48, 48), (6.0, 6.0, 1.0)), vocabulary,
                        list(connection.model_anatomy_labels(info)), findings, edit_mode=True)
    files = write_request_files(edit, tmp_path / "edit", {"seed": 4, "steps": 2, "anatomy_steps": 0})
    files.source = {"source": "orthanc", "study": source.StudyInstanceUID, "series": source.SeriesInstanceUID,
                    "instance": source.SOPInstanceUID}
    runner = JobRunner(engine.client(), poll_interval=0.1)
    events = _run(runner, [JobSpec(files, tmp_path / "edit-result")])
    assert events[-1].state == DONE, events[-1].message
    result = runner.results[0]
    assert result.study_uid == source.StudyInstanceUID  # the edited image joins the source's study
    assert pydicom.dcmread(str(result.sc_path), stop_before_pixels=True).StudyInstanceUID == source.StudyInstanceUID


def test_variations_and_interpolated_pathology_series(engine, vocabulary, tmp_path):
    """'Generate variations' (consecutive seeds) and 'Interpolate pathology' (paper Fig. 3) as one run each."""
    from XRealSlicerLib.jobs import DONE, JobRunner, JobSpec
    from XRealSlicerLib.results import read_fallback_segments

    info = engine.client().info()
    size, fov = connection.model_geometry(info)
    findings = connection.model_findings(info)
    labels = list(connection.model_anatomy_labels(info))
    spacing = (fov / size, fov / size, 1.0)
    inputs = build_inputs(_drawing(vocabulary, (size, size), findings[0]), CanvasGeometry((1, size, size), spacing),
                          vocabulary, labels, findings)
    parameters = {"steps": 2, "anatomy_steps": 1}

    jobs = [JobSpec(write_request_files(inputs, tmp_path / f"seed-{seed}", dict(parameters, seed=seed)),
                    tmp_path / f"seed-{seed}" / "result", f"seed {seed}") for seed in series.variation_seeds(10, 2)]
    runner = JobRunner(engine.client(), poll_interval=0.1)
    events = _run(runner, jobs)
    assert events[-1].state == DONE and [r.provenance["seed"] for r in runner.results] == [10, 11]
    assert len({r.sc_series_uid for r in runner.results}) == 2

    # a path drawn in RAS across the canvas, three positions, same seed
    ras_to_ijk = np.linalg.inv(canvas_ijk_to_ras(spacing))
    path_ras = np.array([[-10 * spacing[0], -20 * spacing[1], 0], [-40 * spacing[0], -20 * spacing[1], 0]])
    positions = series.positions_along_path(series.ras_to_pixel(path_ras, ras_to_ijk), 3)
    mask, finding, name = inputs.pathologies[0]
    jobs = []
    for number, moved in enumerate(series.interpolated_masks(mask, positions), start=1):
        inputs.pathologies[0] = (moved, finding, name)
        folder = tmp_path / f"position-{number}"
        jobs.append(JobSpec(write_request_files(inputs, folder, dict(parameters, seed=3)), folder / "result"))
    runner = JobRunner(engine.client(), poll_interval=0.1)
    events = _run(runner, jobs)
    assert events[-1].state == DONE and len(runner.results) == 3
    centroids = []
    for result in runner.results:
        pathology = [s for s in read_fallback_segments(result.directory, vocabulary) if s.kind == "pathology"][0]
        centroids.append(np.argwhere(pathology.array[0]).mean(axis=0))
    assert np.allclose(centroids, positions, atol=1.0)  # each image has the finding where the path says


@pytest.mark.slow
def test_variations_as_one_batch_on_the_real_engine(engine, vocabulary, tmp_path):
    """Issue 13 item 5: the module's Variations through the engine's batch endpoint (XRealSlicerLib.batches), each
    result delivered with the quality check's anatomy Dice, which the results list shows."""
    from XRealSlicerLib import batches, planning, results
    from XRealSlicerLib.jobs import DONE

    info = engine.client().info()
    size, fov = connection.model_geometry(info)
    canvas = CanvasGeometry((1, size, size), (fov / size, fov / size, 1.0))
    connection_findings = connection.model_findings(info)
    finding = next(f for f in connection_findings if f != "no finding")
    plan = planning.plan_jobs(_drawing(vocabulary, (size, size), finding), canvas, vocabulary, info,
                              planning.PanelSettings(seed=10, variations=2, steps=2, anatomy_steps=1), tmp_path)
    assert batches.can_batch(plan.jobs)
    runner = batches.BatchRunner(engine.client(), poll_interval=0.2)
    events = _run(runner, plan.jobs)
    assert events[-1].state == DONE, events[-1].message
    assert runner.batch_id and [r.provenance["seed"] for r in runner.results] == [10, 11]
    assert engine.client().batch_status(runner.batch_id)["counts"]["succeeded"] == 2  # one batch, both rows
    for result in runner.results:
        assert set(result.provenance["quality"]["anatomy_dice"]) >= {"left lung", "right lung", "heart"}
        assert "anatomy followed: Dice" in results.result_label("seed", result.provenance)
        assert result.job["id"] and engine.client().status(result.job["id"])["state"] == "succeeded"


@pytest.fixture(scope="module")
def controlnet_engine(tmp_path_factory):
    """An engine on a tiny model with sobel and attention ControlNets, started as the module starts it."""
    from XRealSlicerLib.launcher import EngineLauncher
    from xreal_engine.model.random_model import create_random_model

    model = create_random_model(tmp_path_factory.mktemp("model") / "tiny-cn", preset="tiny",
                                controlnets=("sobel", "attention"))
    launcher = EngineLauncher(sys.executable, str(model), tmp_path_factory.mktemp("engine-data"), device="cpu")
    launcher.start(timeout=240)
    yield launcher
    launcher.stop()


@pytest.mark.slow
def test_the_loaded_xray_and_the_painted_attention_steer_a_real_engine(controlnet_engine, vocabulary, tmp_path):
    """Issue 12 item 5 end to end: /info's ControlNets, the canvas as sobel reference and an Attention segment
    planned by the module, run by the engine; provenance records both with their scales, the SEG the attention
    region, and the results list and "Generate again" read them back."""
    from XRealSlicerLib import controls, planning, results
    from XRealSlicerLib.jobs import DONE, JobRunner
    from XRealSlicerLib.results import read_fallback_segments

    client = controlnet_engine.client()
    info = client.info()
    assert controls.model_controlnets(info) == {"sobel": 1.0, "attention": 1.0}
    size, fov = connection.model_geometry(info)
    canvas = CanvasGeometry((1, size, size), (fov / size, fov / size, 1.0))
    finding = next(f for f in connection.model_findings(info) if f != "no finding")
    attention = vocabulary.attention_template([])
    segments = _drawing(vocabulary, (size, size), finding) + [
        SegmentInput(attention.name, _disc((size, size), (20, 20), 6), attention.terminology)]
    rows, columns = np.mgrid[:size, :size]
    xray = (500.0 + 4.0 * rows + np.where(columns > size // 2, 300.0, 0.0))[np.newaxis]
    panel = planning.PanelSettings(seed=3, steps=2, anatomy_steps=1, use_reference=True, reference_scale=0.5,
                                   attention_scale=1.5, control_stages="pathology")
    plan = planning.plan_jobs(segments, canvas, vocabulary, info, panel, tmp_path, reference=xray)
    runner = JobRunner(client, poll_interval=0.2)
    events = _run(runner, plan.jobs)
    assert events[-1].state == DONE, events[-1].message
    provenance = runner.results[0].provenance
    used = {entry["name"]: entry for entry in provenance["controls"]}
    assert (used["sobel"]["scale"], used["attention"]["scale"]) == (0.5, 1.5)
    import hashlib

    sent = {name: hashlib.sha256(Path(path).read_bytes()).hexdigest() for name, path, _ in plan.jobs[0].files.controls}
    assert {name: entry["source_sha256"] for name, entry in used.items()} == sent  # the files the module wrote
    assert all(entry["stages"] in ("pathology", ["pathology"]) for entry in used.values())
    assert results.control_stages_of(provenance) == "pathology"
    assert "controls sobel 0.5, attention 1.5" in results.provenance_summary(provenance)
    rebuilt = read_fallback_segments(runner.results[0].directory, vocabulary)
    (region,) = [segment for segment in rebuilt if segment.kind == "attention"]  # the SEG records the region
    assert vocabulary.classify(region.name, region.terminology).kind == "attention" and region.array.any()
    again = results.settings_from_provenance(provenance)
    assert (again["useReference"], again["referenceControl"], again["referenceScale"], again["attentionScale"],
            again["controlStages"]) == (True, "sobel", 0.5, 1.5, "pathology")


def test_results_line_says_when_the_engine_reused_the_anatomy_stage():
    from XRealSlicerLib import results

    provenance = {"seed": 3, "model_id": "m", "steps": 100, "findings": ["pneumonia"]}
    assert "anatomy stage reused" not in results.provenance_summary(provenance)
    assert "anatomy stage reused" not in results.provenance_summary({**provenance, "anatomy_stage_reused": False})
    line = results.provenance_summary({**provenance, "anatomy_stage_reused": True})
    assert line == "seed 3 · m · 100 steps · pneumonia · anatomy stage reused"
