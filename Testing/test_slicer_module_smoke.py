"""XRealSlicer.py's widget and logic executed against stand-ins for Slicer, Qt and VTK (Testing/slicer_fakes.py).

Slicer cannot run here, so this runs the module's own code paths — setup, the embedded editor wiring, the
Finding choice, Generate with the replaying engine through the widget's timer, the results list, showing
only the selected result's masks, "Generate again", starting the local engine on the first Generate,
the install outcomes, removing the engine environment, the token setting, RGB canvases, Sample Data
registration — with strict fakes: an unmodelled widget, method or parameter field fails, and a
translation off the main thread fails. What it cannot show is Slicer's own behaviour; the module's
self-test (ctest py_XRealSlicer) runs the same workflow in Slicer.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

REPO_DIR = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO_DIR / "XRealSlicer"
sys.path.insert(0, str(MODULE_DIR))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import slicer_fakes  # noqa: E402
from XRealSlicerLib import environment  # noqa: E402
from XRealSlicerLib.testing import ReplayEngineClient  # noqa: E402


@pytest.fixture
def module(monkeypatch, tmp_path):
    fakes = slicer_fakes.install(monkeypatch, tmp_path, MODULE_DIR)
    spec = importlib.util.spec_from_file_location("XRealSlicer", MODULE_DIR / "XRealSlicer.py")
    loaded = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "XRealSlicer", loaded)
    spec.loader.exec_module(loaded)
    loaded.fakes = fakes
    return loaded


@pytest.fixture
def widget(module, monkeypatch, tmp_path):
    monkeypatch.setattr(environment, "default_environment_dir", lambda *a, **k: tmp_path / "local" / "engine-venv")
    widget = module.XRealSlicerWidget()
    widget.setup()
    module.fakes.slicer.util.getModuleWidget = lambda name: widget
    return widget


def _drive(widget, until, seconds=60):
    deadline = time.monotonic() + seconds
    while not until() and time.monotonic() < deadline:
        widget.onTimer()
        time.sleep(0.01)
    widget.onTimer()
    assert until(), "timed out"


def _template_canvas(widget):
    widget.loadTemplate(str(widget.logic.templatePaths()[0]))
    node = widget._parameterNode
    return node, node.canvasVolume, node.segmentation


def _paint(segmentation, segment_id, volume, inside="Right lung", radius=6):
    inside_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName(inside)
    mask = segmentation.masks[inside_id][0]
    centre = np.argwhere(mask).mean(axis=0)
    rows, columns = np.ogrid[: mask.shape[0], : mask.shape[1]]
    segmentation.masks[segment_id] = (((rows - centre[0]) ** 2 + (columns - centre[1]) ** 2) <= radius ** 2
                                      ).astype(np.uint8)[np.newaxis]


def test_setup_keeps_no_token_unless_asked_and_puts_the_environment_in_local_data(module, tmp_path, monkeypatch):
    store = slicer_fakes.QSettings.store
    store["XRealSlicer/token"] = "stored-by-an-old-version"
    widget = module.XRealSlicerWidget()
    monkeypatch.setattr(environment, "default_environment_dir", lambda *a, **k: tmp_path / "local" / "engine-venv")
    widget.setup()
    ui = widget.ui
    assert ui.tokenLineEdit.text == "" and "XRealSlicer/token" not in store  # defect 9
    assert ui.environmentPathLineEdit.currentPath == str(tmp_path / "local" / "engine-venv")  # defect 8
    assert ui.canvasVolumeSelector.nodeTypes == ["vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"]  # defect 10
    editor = ui.embeddedSegmentEditorWidget
    assert editor.editorNode is not None and editor.scene is module.fakes.scene
    assert [ui.samplerComboBox.itemData(i) for i in range(ui.samplerComboBox.count)] == ["ddim", "dpmpp", "unipc"]
    # the demo model's defaults before any engine runs (its xreal_model.json): 100 steps, 85 anatomy
    assert (widget._parameterNode.steps, widget._parameterNode.anatomySteps) == (100, 85)
    assert ui.generateButton.enabled  # local mode: Generate starts the engine
    # remembered only when ticked
    ui.remoteEngineRadioButton.checked, ui.localEngineRadioButton.checked = True, False
    ui.serverUrlComboBox.addItem("http://127.0.0.1:1")
    monkeypatch.setattr(widget, "runInBackground", lambda *a: None)
    ui.tokenLineEdit.text = "secret"
    widget.onConnect()
    assert "XRealSlicer/token" not in store
    ui.rememberTokenCheckBox.checked = True
    widget.onRememberTokenToggled(True)
    widget.onConnect()
    assert store["XRealSlicer/token"] == "secret" and store["XRealSlicer/rememberToken"] is True
    widget.onRememberTokenToggled(False)
    assert "XRealSlicer/token" not in store


def test_segments_findings_and_controls(widget, module):
    ui = widget.ui
    node, canvas, segmentation = _template_canvas(widget)
    editor = ui.embeddedSegmentEditorWidget
    assert editor.segmentationNodeID() == segmentation.GetID() and editor.sourceVolumeNodeID() == canvas.GetID()
    names = [segmentation.GetSegmentation().GetSegment(i).GetName() for i in segmentation.GetSegmentation().order]
    assert names == ["Left lung", "Right lung", "Heart", "Pathology"]  # the demo model has no aorta label
    pathology = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Pathology")
    editor.setCurrentSegmentID(segmentation.GetSegmentation().GetSegmentIdBySegmentName("Heart"))
    assert not ui.findingComboBox.enabled  # anatomy has no finding
    editor.setCurrentSegmentID(pathology)
    combo = ui.findingComboBox
    assert combo.enabled and combo.currentData == "" and combo.currentText == "Choose a finding ..."  # defect 5
    assert [combo.itemData(i) for i in range(combo.count)] == ["", "no finding", "cardiomegaly", "pneumonia"]
    widget.onFindingChosen(combo.findData("pneumonia"))
    assert segmentation.GetSegmentation().GetSegment(pathology).GetName() == "Pneumonia"
    assert combo.currentData == "pneumonia"
    widget.onAddPathology()
    assert editor.currentSegmentID() == segmentation.GetSegmentation().GetSegmentIdBySegmentName("Pathology")
    assert ui.findingComboBox.currentData == ""
    # defect 11 and Fast preview: only the controls that apply
    node.interpolate = True
    assert not ui.variationsSpinBox.enabled and not ui.variationsLabel.enabled and ui.interpolationPathSelector.enabled
    node.interpolate = False
    node.fastPreview = True
    assert not ui.stepsSpinBox.enabled and not ui.samplerComboBox.enabled and ui.variationsSpinBox.enabled
    node.editMode = True
    assert not ui.anatomyStepsSpinBox.enabled and ui.pacsSourceComboBox.enabled
    # Steps changes keep the model's anatomy fraction
    node.fastPreview, node.editMode = False, False
    node.steps = 20
    assert node.anatomySteps == 17  # 85 of 100 for the demo model (v3) -> 17 of 20


def test_generate_with_the_replaying_engine_through_the_timer(widget, module):
    ui, logic = widget.ui, widget.logic
    client = ReplayEngineClient(polls=3)
    logic.useClient(client, client.info(), "replay")
    widget.applyModelInfo()
    node, canvas, segmentation = _template_canvas(widget)
    pathology = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Pathology")
    _paint(segmentation, pathology, canvas)
    with pytest.raises(module.XRealError):  # tryWithErrorDisplay shows it, then re-raises (to PythonQt's log)
        widget.onGenerateOrCancel()  # painted without a finding: refused with the sentence, nothing submitted
    assert "Generate failed.\n\nThe painted segment 'Pathology' has no finding" in module.fakes.recorder.errors[-1]
    assert not client.submitted
    logic.setSegmentFinding(segmentation, pathology, "pneumonia")
    logic.addPathologySegment(segmentation)  # left unpainted: a note, not a refusal (defect 4)
    node.variations = 2
    widget.onGenerateOrCancel()
    assert ui.generateButton.text == "Cancel"
    _drive(widget, lambda: not widget._runner.busy and widget._runner.events.empty()
           and ui.resultsListWidget.count == 2)
    assert ui.progressBar.value == 100 and ui.generateButton.text == "Generate"
    assert "'Pathology' is empty" in ui.statusLabel.text
    assert [s["pathologies"] for s in client.submitted] == [[("pathology_01.nrrd", "pneumonia")]] * 2
    assert [s["seed"] for s in client.submitted] == [0, 1]
    assert ui.resultsListWidget.item(1).text().startswith("seed-1: seed 7 · xreal-demo-v2")
    assert "Dice 0.91 / 0.89 / 0.84" in ui.resultDetailsLabel.text and "seed 7" in ui.resultDetailsLabel.text
    assert all("anatomy followed: Dice" in ui.resultsListWidget.item(row).text() for row in (0, 1))
    # defect 3: only the shown result's masks are visible, over its SC in Red; the drawing in Yellow
    first, second = (module.fakes.scene.GetNodeByID(r["segmentation"]) for r in widget._results)
    assert not first.display.visible and second.display.visible and second.display.views == ["vtkMRMLSliceNodeRed"]
    assert segmentation.display.views == ["vtkMRMLSliceNodeYellow"]
    assert module.fakes.layout.backgrounds["Red"] == widget._results[1]["volume"]
    ui.resultsListWidget.setCurrentRow(0)
    widget.onShowResult()
    assert first.display.visible and not second.display.visible
    assert [first.GetSegmentation().GetSegment(i).GetName() for i in first.GetSegmentation().order] == [
        "Left lung", "Right lung", "Heart", "Pneumonia"]  # rebuilt without a SEG loader (fallback)
    # Generate again with the result's settings
    node.fastPreview = True
    widget.onGenerateAgain()
    assert (node.seed, node.steps, node.anatomySteps, node.fastPreview, node.variations) == (7, 2, 2, False, 1)
    _drive(widget, lambda: ui.resultsListWidget.count == 3 and not widget._runner.busy)
    assert {k: client.submitted[-1][k] for k in ("seed", "steps", "anatomy_steps", "sampler")} == {
        "seed": 7, "steps": 2, "anatomy_steps": 2, "sampler": "ddim"}
    # leaving the module: the masks are visible in every view again
    widget.exit()
    assert segmentation.display.views == [] and first.display.views == []
    # PACS: the engine's destination, in the background
    ui.pushDestinationComboBox.setCurrentIndex(ui.pushDestinationComboBox.findData("replay-pacs"))
    widget.onSendToPacs()
    _drive(widget, lambda: widget._task.done and widget._taskDone is None)
    assert client.pushed == [("replay-3", "replay-pacs")]  # the selected result: the newest
    assert "2 of 2 objects accepted" in ui.statusLabel.text


def test_the_first_generate_starts_the_local_engine(widget, module, monkeypatch):
    ui, logic = widget.ui, widget.logic
    node, canvas, segmentation = _template_canvas(widget)
    pathology = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Pathology")
    logic.setSegmentFinding(segmentation, pathology, "cardiomegaly")
    _paint(segmentation, pathology, canvas, inside="Heart")
    node.steps = 20  # set before the engine runs: kept when it connects (same model)
    client = ReplayEngineClient(polls=1)
    started = []
    monkeypatch.setattr(module, "requirements_installed", lambda python, env: True)
    monkeypatch.setattr(logic, "startLocalEngine",
                        lambda task, python, model, data: started.append(python) or logic.useClient(
                            client, client.info(), "http://127.0.0.1:1"))
    assert logic.client is None
    widget.onGenerateOrCancel()
    _drive(widget, lambda: widget._runner is not None and not widget._runner.busy and ui.resultsListWidget.count == 1)
    assert started and started[0].endswith(("bin/python", "python.exe")) and "engine-venv" in started[0]
    assert client.submitted[0]["steps"] == 20 and client.submitted[0]["anatomy_steps"] == 17  # 85 % (demo v3)
    assert "Connected to http://127.0.0.1:1" in ui.engineStatusLabel.text


def test_declined_install_and_install_outcomes(widget, module, monkeypatch):
    ui, recorder = widget.ui, module.fakes.recorder
    node, canvas, segmentation = _template_canvas(widget)
    monkeypatch.setattr(module, "requirements_installed", lambda python, env: False)
    recorder.answer = False
    widget.onGenerateOrCancel()
    _drive(widget, lambda: widget._task.done and widget._taskDone is None)
    assert "Install them now?" in recorder.questions[-1] and not widget._generateAfterStart
    assert ui.engineStatusLabel.text.startswith("Local engine not started")
    # agreed, but the install fails: the outcome's sentence, translated on the main thread
    recorder.answer = True
    monkeypatch.setattr(environment, "find_base_python", lambda env: None)  # the real install, no Python found
    widget.onStartEngine()
    _drive(widget, lambda: widget._task.done and widget._taskDone is None and "failed" in ui.engineStatusLabel.text)
    assert "No Python 3.10 or newer" in recorder.errors[-1] and ui.progressBar.range == (0, 100)


def test_removing_the_engine_environment(widget, module, tmp_path):
    ui, recorder = widget.ui, module.fakes.recorder
    venv = tmp_path / "local" / "engine-venv"
    widget.onRemoveEnvironment()
    assert "No engine environment made by XRealSlicer" in recorder.infos[-1]
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("")
    (venv / environment.MARKER_FILE).write_text(environment.MARKER_TEXT)
    recorder.answer = False
    widget.onRemoveEnvironment()
    assert venv.exists() and str(venv) in recorder.questions[-1]
    recorder.answer = True
    widget.onRemoveEnvironment()
    _drive(widget, lambda: widget._task.done and widget._taskDone is None)
    assert not venv.exists() and ui.engineStatusLabel.text == "Engine environment removed."


def test_an_rgb_xray_becomes_a_grey_canvas(widget, module):
    rgb = np.zeros((1, 8, 6, 3), np.uint8)
    rgb[..., 1] = 100
    volume = module.fakes.scene.add(slicer_fakes.Volume(rgb, np.diag([-0.5, -0.5, 1, 1]), "chest.png",
                                                        cls="vtkMRMLVectorVolumeNode"))
    widget._parameterNode.canvasVolume = volume
    canvas = widget._parameterNode.canvasVolume
    assert canvas is not volume and canvas.GetName() == "chest.png (grey)"
    assert canvas.array.shape == (1, 8, 6) and np.allclose(canvas.array, 58.7)
    assert canvas.GetSpacing() == (0.5, 0.5, 1.0)
    assert widget.ui.embeddedSegmentEditorWidget.sourceVolumeNodeID() == canvas.GetID()


def test_templates_are_registered_with_sample_data(widget, module, monkeypatch):
    registered = []
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = types.SimpleNamespace(
        registerCustomSampleDataSource=lambda **kwargs: registered.append(kwargs))
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    module.registerSampleData()
    templates = widget.logic.templatePaths()
    assert len(registered) == len(templates) >= 1
    assert {entry["category"] for entry in registered} == {"XReal"}
    assert all(Path(entry["thumbnailFileName"]).is_file() for entry in registered)
    registered[0]["customDownloader"](None)  # the Sample Data button: a canvas with the template's segments
    node = widget._parameterNode
    assert node.canvasVolume.GetName() == f"XReal canvas {templates[0].stem}" and node.segmentation is not None


def test_sampler_and_controlnet_settings_are_saved_with_the_scene(widget, module):
    """Issue 14's leftover: the sampler lives in the parameter node (saved with the scene) like the other
    settings, and so do the ControlNet settings (issue 12 item 5); their lists show the node's values."""
    ui, logic = widget.ui, widget.logic
    info = dict(ReplayEngineClient().info(), controlnets={"sobel": {"scale": 0.5}, "canny": {"scale": 0.3},
                                                           "attention": {"scale": 1.25}})
    client = ReplayEngineClient(polls=1, info=info)
    logic.useClient(client, client.info(), "replay")
    widget.applyModelInfo()
    node = widget._parameterNode
    # the model's controls and default scales
    assert (node.referenceControl, node.referenceScale, node.attentionScale) == ("sobel", 0.5, 1.25)
    combo = ui.referenceControlComboBox
    assert [combo.itemData(i) for i in range(combo.count)] == ["sobel", "canny"]
    assert ui.referenceCheckBox.enabled and ui.attentionScaleSpinBox.enabled and ui.addAttentionButton.enabled
    assert not combo.enabled and not ui.referenceScaleSpinBox.enabled  # until the reference is ticked
    node.useReference = True
    assert combo.enabled and ui.referenceScaleSpinBox.enabled
    # the user's choices go into the node; a newly chosen map starts at its default scale
    ui.samplerComboBox.choose("unipc")
    combo.choose("canny")
    ui.controlStagesComboBox.choose("pathology")
    assert (node.sampler, node.referenceControl, node.referenceScale, node.controlStages) == (
        "unipc", "canny", 0.3, "pathology")
    # a scene's values (as loading it sets them) are what the lists show
    node.sampler, node.referenceControl, node.controlStages = "dpmpp", "sobel", "anatomy"
    assert (ui.samplerComboBox.currentData, combo.currentData, ui.controlStagesComboBox.currentData) == (
        "dpmpp", "sobel", "anatomy")
    widget.applyModelInfo()  # the same model again (refilled lists): the choices and scales stay
    assert (node.sampler, ui.samplerComboBox.currentData, node.referenceScale) == ("dpmpp", "dpmpp", 0.3)
    # a model without ControlNets: their widgets do not apply
    logic.useClient(client, dict(client.info(), controlnets={}), "replay")
    widget.applyModelInfo()
    assert not ui.referenceCheckBox.enabled and not ui.addAttentionButton.enabled and not combo.count
    assert not node.useReference  # a disabled checkbox cannot stay ticked


def test_generate_sends_the_loaded_xray_and_the_painted_attention(widget, module):
    ui, logic, recorder = widget.ui, widget.logic, module.fakes.recorder
    client = ReplayEngineClient(polls=1)  # offers sobel and attention (the demo model's, else the replay's own)
    logic.useClient(client, client.info(), "replay")
    widget.applyModelInfo()
    node, canvas, segmentation = _template_canvas(widget)
    pathology = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Pathology")
    logic.setSegmentFinding(segmentation, pathology, "pneumonia")
    _paint(segmentation, pathology, canvas)
    widget.onAddAttention()
    attention = ui.embeddedSegmentEditorWidget.currentSegmentID()
    assert segmentation.GetSegmentation().GetSegment(attention).GetName() == "Attention"
    assert not ui.findingComboBox.enabled and ui.findingComboBox.currentText == "(attention region: no finding)"
    _paint(segmentation, attention, canvas, inside="Heart", radius=4)
    node.useReference = True
    with pytest.raises(module.XRealError):  # the template canvas is blank: no reference to use
        widget.onGenerateOrCancel()
    assert "The canvas is blank, so it cannot be the radiomics reference" in recorder.errors[-1]
    canvas.array = np.linspace(0.0, 900.0, canvas.array.size, dtype=np.float32).reshape(canvas.array.shape)
    node.attentionScale = 2.0
    widget.onGenerateOrCancel()
    _drive(widget, lambda: not widget._runner.busy and ui.resultsListWidget.count == 1)
    (sent,) = client.submitted
    offered = client.info()["controlnets"]["sobel"]  # the model's default scale (the shipped demo's, or the replay's)
    sobel_scale = offered["scale"] if isinstance(offered, dict) else offered
    assert sent["controls"] == [("sobel", "reference.nrrd", sobel_scale), ("attention", "attention.nrrd", 2.0)]
    assert sent["control_stages"] == "both" and sent["pathologies"] == [("pathology_01.nrrd", "pneumonia")]
    # Variations go to the engine as one batch (a single image with controls went through submit())
    node.useReference = False
    segmentation.masks[attention][:] = 0
    node.variations = 2
    widget.onGenerateOrCancel()
    _drive(widget, lambda: not widget._runner.busy and ui.resultsListWidget.count == 3)
    assert len(client.batches) == 1 and [row[0] for row in client.batches[0]["rows"]] == ["seed-0", "seed-1"]
    assert "controls" not in client.submitted[-1]


def test_the_modules_own_self_test_without_an_engine_passes_here(widget, module):
    """The self-test ctest runs in Slicer (XRealSlicerTest.test_XRealSlicer_workflow_without_engine), run here on
    the fakes: its steps and assertions agree with the module (in Slicer it also checks Slicer's own behaviour)."""
    test = module.XRealSlicerTest("test_XRealSlicer_workflow_without_engine")
    test.test_XRealSlicer_workflow_without_engine()
    assert widget.ui.resultsListWidget.count == 5 and len(widget._results) == 5
    # ... and leaves the panel with the engine it had (none here), not connected to the replaying one
    assert widget.logic.client is None and widget.logic.engineUrl is None


def test_reload_and_test_shows_a_skipped_engine_test_as_skipped(widget, module, monkeypatch):
    """Slicer's Test button calls runTest outside unittest: a skip there must not end as 'Test failed'."""
    test = module.XRealSlicerTest("runTest")
    shown = []
    monkeypatch.setattr(test, "delayDisplay", lambda message, msec=None: shown.append(message))
    monkeypatch.setattr(test, "setUp", lambda: None)  # the scene clearing is Slicer's, not modelled here
    monkeypatch.setattr(module, "requirements_installed", lambda python, env: False)  # no engine environment
    test.runTest()  # does not raise
    assert any(message.startswith("The test with a real engine was skipped: no engine Python") for message in shown)


def test_nothing_replaces_or_restarts_the_engine_while_a_run_is_going(widget, module, monkeypatch):
    ui, logic = widget.ui, widget.logic
    client = ReplayEngineClient(polls=10)
    logic.useClient(client, client.info(), "replay")
    widget.applyModelInfo()
    node, canvas, segmentation = _template_canvas(widget)
    pathology = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Pathology")
    logic.setSegmentFinding(segmentation, pathology, "pneumonia")
    _paint(segmentation, pathology, canvas)
    widget.onGenerateOrCancel()
    _drive(widget, lambda: ui.resultsListWidget.count == 1 and not widget._runner.busy)
    ui.resultsListWidget.setCurrentRow(0)
    stopped = []
    monkeypatch.setattr(logic, "stopLocalEngine", lambda: stopped.append(True))
    widget.onGenerateOrCancel()  # a second run (10 polls)
    assert widget._runner.busy and ui.generateButton.text == "Cancel"
    widget.updateEngineDependentWidgets()
    assert not any(getattr(ui, name).enabled for name in ("startEngineButton", "connectButton", "stopEngineButton",
                                                           "removeEnvironmentButton", "generateAgainButton"))
    seed = node.seed
    for press in (widget.onGenerateAgain, widget.onConnect, widget.onStartEngine, widget.onStopEngine,
                  widget.onRemoveEnvironment):
        press()  # a click that reached the slot anyway (a keyboard shortcut, a queued event)
    assert widget._runner.busy and not widget._runner._cancel.is_set() and node.seed == seed
    assert not stopped and logic.client is client and widget._task is None or widget._task.done
    _drive(widget, lambda: not widget._runner.busy and ui.resultsListWidget.count == 2)
    widget.updateEngineDependentWidgets()
    assert ui.connectButton.enabled and ui.generateAgainButton.enabled


def test_a_local_engine_that_dies_is_noticed_and_the_next_generate_starts_a_new_one(widget, module):
    ui, logic = widget.ui, widget.logic
    client = ReplayEngineClient(polls=1)

    class EndedLauncher:
        running = True

        def is_running(self):
            return self.running

        def stop(self, timeout=None):
            self.running = False

    launcher = EndedLauncher()
    logic.launcher = launcher
    logic.useClient(client, client.info(), "http://127.0.0.1:1")
    widget._timer.start()
    widget.onTimer()
    assert logic.client is client and logic.launcher is launcher  # alive: kept
    launcher.running = False  # the process crashed
    widget.onTimer()
    assert logic.client is None and logic.launcher is None
    assert "The local engine has stopped" in ui.engineStatusLabel.text
    assert ui.generateButton.enabled  # local mode: Generate starts a new engine
