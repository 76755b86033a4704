"""XReal: draw chest anatomy and pathology in Slicer, generate a synthetic X-ray (SC + SEG) with the XReal engine.

This file is the thin GUI: widget wiring and MRML calls. Everything that can run without Slicer (masks ->
request, the job planning of Generate, the ControlNet controls, which controls apply, progress and status text,
the results list's provenance and quality lines, the engine environment, the launcher, the job and batch
runners, result handling, the fallback SEG reader, a replaying engine for tests) is in ``XRealSlicerLib`` and
tested with pytest. The engine itself
(torch, diffusers) always runs in a separate process.

Why this file is still long (about 615 statements of widget, 305 of logic, 140 of self-test): Slicer's
scripted-module pattern keeps the module, its widget, its logic (the MRML side) and its self-test in one file
(``Utilities/Templates/Modules/Scripted/TemplateKey.py``); Slicer loads every ``.py`` beside it as a module of
its own, and ``XRealSlicerLib`` must stay importable without Slicer, so the MRML and Qt code stays here. What
is left is wiring: reading widgets and MRML into plain values, calling the Lib, writing its answers back.
``Testing/test_slicer_module_smoke.py`` runs this code against stand-ins for Slicer, Qt and VTK.

Slicer names that are not in ``slicer-api-symbols.txt`` carry a ``# Slicer source:`` comment naming the
file of Slicer's source that defines or uses them (Testing/test_slicer_static.py checks this).
"""

import logging
import os
import queue
import random
import shutil
import time
import unittest
from pathlib import Path
from typing import Annotated, Union

import numpy as np
import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer import vtkMRMLVectorVolumeNode  # Slicer source: Libs/MRML/Core/vtkMRMLVectorVolumeNode.h

from XRealSlicerLib import connection, controls, enginepath, environment, planning, results
from XRealSlicerLib import parameters as sampling
from XRealSlicerLib.batches import BatchRunner
from XRealSlicerLib.jobs import DONE, JobRunner
from XRealSlicerLib.launcher import EngineLauncher, make_spawn, requirements_installed, venv_python
from XRealSlicerLib.request import CanvasGeometry, SegmentInput, blank_canvas, canvas_ijk_to_ras, grey_pixels, \
    read_template, template_segments
from XRealSlicerLib.results import push_summary, read_fallback_segments
from XRealSlicerLib.tasks import BackgroundCall
from XRealSlicerLib.vocabulary import ANATOMY, ATTENTION, Vocabulary
from xreal_engine.client import EngineClient
from xreal_engine.errors import Cancelled, XRealError

SETTINGS_PREFIX = "XRealSlicer/"
TIMER_INTERVAL_MS = 200
SAMPLE_DATA_CATEGORY = "XReal"
# planning.control_states key -> the widgets it enables (Testing/test_slicer_static.py checks the keys)
CONTROL_WIDGETS = {
    "variations": ("variationsLabel", "variationsSpinBox"),
    "interpolationPath": ("pathLabel", "interpolationPathSelector"),
    "interpolationSteps": ("interpolationStepsLabel", "interpolationStepsSpinBox"),
    "steps": ("stepsLabel", "stepsSpinBox"),
    "anatomySteps": ("anatomyStepsLabel", "anatomyStepsSpinBox"),
    "sampler": ("samplerLabel", "samplerComboBox"),
    "pacsSource": ("pacsSourceLabel", "pacsSourceComboBox"),
    "reference": ("referenceCheckBox",),
    "referenceControl": ("referenceControlLabel", "referenceControlComboBox"),
    "referenceScale": ("referenceScaleLabel", "referenceScaleSpinBox"),
    "attention": ("attentionScaleLabel", "attentionScaleSpinBox", "addAttentionButton"),
    "controlStages": ("controlStagesLabel", "controlStagesComboBox"),
}
# Parameter-node field -> the combo box that shows it (item data = the value). Not bound by connectGui: its combo
# connector lists fixed choices by their text (Slicer Base/Python/slicer/parameterNodeWrapper/guiConnectors.py),
# these lists are the connected engine's and show labels.
COMBO_FIELDS = {"sampler": "samplerComboBox", "referenceControl": "referenceControlComboBox",
                "controlStages": "controlStagesComboBox"}


class XRealSlicer(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("XReal")
        self.parent.categories = [_("Image Synthesis")]
        self.parent.dependencies = []
        self.parent.contributors = ["XRealSlicer contributors"]
        self.parent.helpText = _(
            "Draw chest anatomy (lungs, heart, aorta) and pathology regions, press Generate, and get a synthetic "
            "chest X-ray made with the XReal method (anatomy-then-pathology latent diffusion) as DICOM Secondary "
            "Capture plus a DICOM Segmentation of the masks. The images are synthetic and marked so; "
            "they are not for diagnosis."
        )
        self.parent.acknowledgementText = _(
            "XReal: Realistic Anatomy and Pathology-Aware X-ray Generation via Controllable Diffusion Model "
            "(Hashmi et al., arXiv 2403.09240). The engine runs outside Slicer, locally or on a server."
        )
        # Slicer source: Utilities/Templates/Modules/Scripted/TemplateKey.py (slicer.app.connect startupCompleted)
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The anatomy templates in the Sample Data module, category "XReal": a click opens a canvas with its segments."""
    try:
        import SampleData
    except ImportError:  # no Sample Data module (e.g. a custom Slicer build)
        return
    icon = str(Path(__file__).parent / "Resources" / "Icons" / "XRealSlicer.png")
    for path in XRealSlicerLogic.templatePaths():
        # Slicer source: Modules/Scripted/SampleData/SampleData.py (registerCustomSampleDataSource, customDownloader:
        # the Sample Data button calls it with the source instead of downloading; 5.8, 5.10 and main alike)
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category=SAMPLE_DATA_CATEGORY, sampleName=f"XReal {path.stem}", uris=path.as_uri(),
            fileNames=path.name, nodeNames=f"XReal canvas {path.stem}", thumbnailFileName=icon,
            customDownloader=lambda source, path=path: _openTemplate(path))


def _openTemplate(path):
    slicer.util.selectModule("XRealSlicer")
    slicer.util.getModuleWidget("XRealSlicer").loadTemplate(path)


@parameterNodeWrapper
class XRealSlicerParameterNode:
    """What the user chose in the panel (saved with the scene).

    The sampling settings' ranges and defaults are the engine's sampling policy (XRealSlicerLib.parameters);
    connectGui gives each spin box its field's WithinRange.
    """

    # A Union of node types is how connectGui lets the combo box show both (it sets nodeTypes from the
    # annotation; showChildNodeTypes is off, so labelmaps stay hidden). An RGB X-ray (PNG) loads as a vector volume.
    # Slicer source: Base/Python/slicer/parameterNodeWrapper/guiConnectors.py (qMRMLNodeComboBoxToNodeConnector)
    # Slicer source: Docs/developer_guide/parameter_nodes/gui_connection.md (a Union of nodes needs None in it)
    canvasVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode, None]
    segmentation: vtkMRMLSegmentationNode
    editMode: bool = False
    seed: Annotated[int, WithinRange(*sampling.node_range("seed"))] = 0
    steps: Annotated[int, WithinRange(*sampling.node_range("steps"))] = sampling.NODE_DEFAULTS["steps"]
    anatomySteps: Annotated[int, WithinRange(*sampling.node_range("anatomySteps"))] = \
        sampling.NODE_DEFAULTS["anatomySteps"]
    guidance: Annotated[float, WithinRange(*sampling.node_range("guidance"))] = sampling.NODE_DEFAULTS["guidance"]
    fastPreview: bool = False
    sampler: str = sampling.DEFAULT_SAMPLER
    variations: Annotated[int, WithinRange(1, 64)] = 1
    interpolate: bool = False
    interpolationSteps: Annotated[int, WithinRange(2, 64)] = 8
    # the ControlNet controls; scales in the engine's range (xreal_engine/control_spec.py)
    useReference: bool = False
    referenceControl: str = ""  # "" until a model with a radiomics ControlNet is connected
    referenceScale: Annotated[float, WithinRange(*controls.scale_range())] = controls.DEFAULT_SCALE
    attentionScale: Annotated[float, WithinRange(*controls.scale_range())] = controls.DEFAULT_SCALE
    controlStages: str = sampling.DEFAULT_CONTROL_STAGES


def settingsValue(key, default, converter=lambda value: value):
    return slicer.util.settingsValue(SETTINGS_PREFIX + key, default, converter=converter)


def setSettingsValue(key, value):
    qt.QSettings().setValue(SETTINGS_PREFIX + key, value)


class XRealSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: Engine, Canvas, Masks (with the Segment Editor), Generate, Results. Never blocks: work runs in
    threads, a QTimer polls."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._stepsSeen = None  # the Steps the Anatomy steps were last matched to (onParameterNodeModified)
        self._defaultsModel = None  # the model whose sampling defaults the panel shows
        self._controlnets = {}  # the model's ControlNets and default scales (controls.model_controlnets)
        self._controlDefaultsFor = None  # (model, its ControlNets) whose default scales the panel shows
        self._task = None  # BackgroundCall for engine start / connect / install / removal / send
        self._taskDone = None  # main-thread continuation of self._task
        self._generateAfterStart = False  # Generate started the local engine: generate once it answers
        self._runner = None
        self._notes = []  # notes about the masks, shown behind the run's progress
        self._results = []  # one dict per row of the results list
        self._timer = None
        self._inTimer = False  # onTimer may open dialogs, which run a nested event loop
        self._sendDialog = None

    # ------------------------------------------------------------------ setup

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/XRealSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = XRealSlicerLogic()

        # the embedded Segment Editor: its parameter node before the scene, so the selections made when the
        # scene is set are kept there (as Modules/Scripted/SegmentEditor/SegmentEditor.py does)
        editor = self.ui.embeddedSegmentEditorWidget
        editor.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        editor.setMRMLScene(slicer.mrmlScene)
        editor.setSegmentationNodeSelectorVisible(False)  # the Masks section's own selector drives it
        editor.setSourceVolumeNodeSelectorVisible(False)  # the canvas is the source volume
        editor.connect("currentSegmentIDChanged(QString)", self.updateFindingChoice)
        # an RGB X-ray (PNG) loads as a vector volume: choosable as canvas (canvasVolume's Union type, which
        # connectGui turns into the selector's node types), converted to grey when chosen

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Engine
        remote = settingsValue("engineMode", "local") == "remote"
        self.ui.remoteEngineRadioButton.checked = remote
        self.ui.localEngineRadioButton.checked = not remote
        self.ui.enginePythonPathLineEdit.currentPath = settingsValue("enginePython", "")
        self.ui.environmentPathLineEdit.currentPath = settingsValue("environmentDir", "") \
            or str(environment.default_environment_dir())
        self.ui.modelLineEdit.text = settingsValue("model", "demo")
        history = settingsValue("serverUrlHistory", [connection.DEFAULT_REMOTE_URL]) or []
        self.ui.serverUrlComboBox.addItems([history] if isinstance(history, str) else list(history))
        remember = settingsValue("rememberToken", False, converter=slicer.util.toBool)
        self.ui.rememberTokenCheckBox.checked = remember
        self.ui.tokenLineEdit.text = settingsValue("token", "") if remember else ""
        if not remember:
            qt.QSettings().remove(SETTINGS_PREFIX + "token")  # stored in plain text by earlier versions
        self.ui.localEngineRadioButton.connect("toggled(bool)", self.onEngineModeChanged)
        self.ui.startEngineButton.connect("clicked()", lambda: self.onStartEngine())
        self.ui.stopEngineButton.connect("clicked()", self.onStopEngine)
        self.ui.removeEnvironmentButton.connect("clicked()", self.onRemoveEnvironment)
        self.ui.connectButton.connect("clicked()", self.onConnect)
        self.ui.rememberTokenCheckBox.connect("toggled(bool)", self.onRememberTokenToggled)

        # Canvas
        self.ui.blankCanvasButton.connect("clicked()", self.onBlankCanvas)
        self.ui.loadTemplateButton.connect("clicked()", lambda: self.loadTemplate(self.ui.templateComboBox.currentData))
        for path in self.logic.templatePaths():
            self.ui.templateComboBox.addItem(path.stem, str(path))

        # Masks
        self.ui.createSegmentsButton.connect("clicked()", self.onCreateSegments)
        self.ui.addPathologyButton.connect("clicked()", self.onAddPathology)
        self.ui.addAttentionButton.connect("clicked()", self.onAddAttention)
        self.ui.findingComboBox.connect("activated(int)", self.onFindingChosen)

        # Generate / Results
        self.fillCombo("samplerComboBox", sampling.sampler_choices())
        self.fillCombo("controlStagesComboBox", sampling.control_stage_choices())
        for field, comboName in COMBO_FIELDS.items():
            getattr(self.ui, comboName).connect("currentIndexChanged(int)",
                                                lambda index, field=field: self.onComboChosen(field))
        self.ui.randomSeedButton.connect("clicked()", self.onRandomSeed)
        self.ui.generateButton.connect("clicked()", self.onGenerateOrCancel)
        self.ui.showResultButton.connect("clicked()", self.onShowResult)
        self.ui.generateAgainButton.connect("clicked()", self.onGenerateAgain)
        self.ui.sendToPacsButton.connect("clicked()", self.onSendToPacs)
        self.ui.sendWithSlicerButton.connect("clicked()", self.onSendWithSlicer)
        self.ui.resultsListWidget.connect("currentRowChanged(int)", self.onResultSelected)
        self.ui.resultsListWidget.connect("itemDoubleClicked(QListWidgetItem*)", lambda item: self.onShowResult())
        self.ui.progressBar.setRange(0, 100)

        self._timer = qt.QTimer()
        self._timer.setInterval(TIMER_INTERVAL_MS)
        self._timer.connect("timeout()", self.onTimer)

        self.onEngineModeChanged()
        self.initializeParameterNode()
        self.applyModelInfo()

    def cleanup(self):
        """Slicer is closing: stop the local engine and any run, leave no process behind."""
        if self._runner is not None and self._runner.busy:
            self._runner.cancel()
            self._runner.wait(5.0)
        if self._timer is not None:
            self._timer.stop()
        if self.logic is not None:
            self.logic.shuttingDown = True  # an engine start still in flight stops its engine itself
            self.logic.stopLocalEngine()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()
        self.ui.embeddedSegmentEditorWidget.installKeyboardShortcuts()
        self.ui.embeddedSegmentEditorWidget.updateWidgetFromMRML()

    def exit(self):
        editor = self.ui.embeddedSegmentEditorWidget  # as the Segment Editor module leaves its editor
        editor.setActiveEffect(None)
        editor.uninstallKeyboardShortcuts()
        editor.removeViewObservations()
        if self._parameterNode:
            # side by side limits the masks to one view each; elsewhere they must be visible in every view again
            self.logic.showInEveryView(self._parameterNode.segmentation)
            self.logic.showInEveryView(self.shownResultSegmentation())
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        self.ui.embeddedSegmentEditorWidget.setSegmentationNode(None)

    def onSceneEndClose(self, caller, event):
        self.ui.resultsListWidget.clear()  # their nodes are gone, and node IDs are reused by new nodes
        self._results = []
        self.ui.embeddedSegmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode):
        # observed like Slicer's module template (Utilities/Templates/Modules/Scripted/TemplateKey.py)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified):
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._stepsSeen = self._parameterNode.steps  # a loaded scene keeps its own anatomy steps
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None):
        """Anatomy steps follow Steps; an RGB canvas becomes grey; the editor and the controls follow the node."""
        node = self._parameterNode
        if node is None:
            return
        if node.steps != self._stepsSeen:  # keep the model's fraction of the schedule unless the user set them
            oldSteps, self._stepsSeen = self._stepsSeen, node.steps
            anatomySteps = sampling.anatomy_steps_after_steps_change(self.logic.samplingDefaults, oldSteps,
                                                                     node.steps, node.anatomySteps)
            if anatomySteps != node.anatomySteps:
                node.anatomySteps = anatomySteps
        if node.canvasVolume is not None and self.logic.isColourImage(node.canvasVolume):
            try:
                node.canvasVolume = self.logic.greyCopy(node.canvasVolume)  # modifies the node again
            except Exception as error:
                self.reportError(_("The RGB image could not be converted to grey."), error)
                node.canvasVolume = None
            return
        editor = self.ui.embeddedSegmentEditorWidget
        segmentationId = node.segmentation.GetID() if node.segmentation else ""
        canvasId = node.canvasVolume.GetID() if node.canvasVolume else ""
        if editor.segmentationNodeID() != segmentationId:
            editor.setSegmentationNode(node.segmentation)
        if canvasId and editor.sourceVolumeNodeID() != canvasId:
            editor.setSourceVolumeNode(node.canvasVolume)
        states = planning.control_states(interpolate=node.interpolate, edit_mode=node.editMode, fast=node.fastPreview,
                                         controlnets=self._controlnets, use_reference=node.useReference)
        for key, names in CONTROL_WIDGETS.items():
            for name in names:
                getattr(self.ui, name).enabled = states[key]
        self.showComboValues()
        self.updateFindingChoice()

    def fillCombo(self, comboName, choices):
        """Refill a COMBO_FIELDS list with (value, label) choices, showing the parameter node's value."""
        combo = getattr(self.ui, comboName)
        wasBlocked = combo.blockSignals(True)  # a refill is no choice of the user's
        combo.clear()
        for value, label in choices:
            combo.addItem(label, value)
        combo.blockSignals(wasBlocked)
        self.showComboValues()

    def showComboValues(self):
        """Each COMBO_FIELDS list shows its parameter-node value (one the list lacks leaves the list's first)."""
        for field, comboName in COMBO_FIELDS.items():
            combo = getattr(self.ui, comboName)
            index = combo.findData(getattr(self._parameterNode, field)) if self._parameterNode else -1
            if index >= 0 and combo.currentIndex != index:
                wasBlocked = combo.blockSignals(True)
                combo.setCurrentIndex(index)
                combo.blockSignals(wasBlocked)

    def onComboChosen(self, field):
        """The user chose in a COMBO_FIELDS list: into the parameter node (a new radiomics map: its default scale)."""
        value = getattr(self.ui, COMBO_FIELDS[field]).currentData
        node = self._parameterNode
        if node is None or not value or getattr(node, field) == value:
            return
        with slicer.util.NodeModify(node):
            setattr(node, field, value)
            if field == "referenceControl":
                for name, scale in controls.reference_values(self._controlnets, value).items():
                    setattr(node, name, scale)

    # ------------------------------------------------------------------ errors and status

    def reportError(self, message, error):
        """An error that did not happen in a button's own call (a worker thread's, an observer's): the same box as
        tryWithErrorDisplay, but not raised into the timer or observer that delivered it."""
        try:
            with slicer.util.tryWithErrorDisplay(message):
                raise error
        except Exception:
            logging.warning("XReal: %s %s", message, error)

    def setStatus(self, text):
        self.ui.statusLabel.text = text

    def appendLog(self, lines):
        for line in lines:
            self.ui.engineLogTextEdit.appendPlainText(line)

    # ------------------------------------------------------------------ engine

    def onEngineModeChanged(self, checked=None):
        local = self.ui.localEngineRadioButton.checked
        for name in ("enginePythonLabel", "enginePythonPathLineEdit", "environmentLabel", "environmentPathLineEdit",
                     "removeEnvironmentButton", "modelLabel", "modelLineEdit", "startEngineButton", "stopEngineButton"):
            getattr(self.ui, name).visible = local
        for name in ("serverUrlLabel", "serverUrlComboBox", "tokenLabel", "tokenLineEdit", "rememberTokenCheckBox",
                     "connectButton"):
            getattr(self.ui, name).visible = not local
        setSettingsValue("engineMode", "local" if local else "remote")
        self.updateEngineDependentWidgets()

    def isBusy(self):
        """A background engine call (start, connect, install, removal, send) is still running."""
        if self._task is not None and not self._task.done:
            slicer.util.showStatusMessage(_("XReal: still busy with the engine, please wait."), 3000)
            return True
        return False

    def generating(self):
        """A run is going: the engine must not be replaced or stopped under it, nor a second run started."""
        if self._runner is not None and self._runner.busy:
            slicer.util.showStatusMessage(_("XReal: generating; wait for it or press Cancel first."), 3000)
            return True
        return False

    def runInBackground(self, function, onDone, *args):
        """Run ``function(task, *args)`` in a thread; ``onDone(task)`` runs on the main thread after.

        Callers check ``isBusy()`` first. Everything that needs Slicer (paths, settings, the startup
        environment) is read here on the main thread and passed in: worker threads never touch Qt or MRML
        and never translate (``_``); the main-thread continuations do.
        """
        self.logic.prepareSpawn()
        self._task = BackgroundCall(function, *args)
        self._taskDone = onDone
        self._timer.start()

    def environmentDirs(self):
        """(the configured environment folder, the one that versions before 0.2 used)."""
        configured = Path(self.ui.environmentPathLineEdit.currentPath.strip()
                          or environment.default_environment_dir())
        return configured, environment.legacy_environment_dir(slicer.app.slicerUserSettingsFilePath)

    def onStartEngine(self, thenGenerate=False):
        self._generateAfterStart = thenGenerate
        if self.generating() or self.isBusy():
            return
        python = self.ui.enginePythonPathLineEdit.currentPath.strip()
        model = self.ui.modelLineEdit.text.strip() or "demo"
        configured, legacy = self.environmentDirs()
        setSettingsValue("enginePython", python)
        setSettingsValue("model", model)
        setSettingsValue("environmentDir", str(configured))
        if python and not Path(python).is_file():
            self._generateAfterStart = False
            slicer.util.errorDisplay(_("The engine Python '{python}' does not exist; choose a Python interpreter "
                                       "or leave the field empty to use a private environment.").format(python=python))
            return
        venvDir = environment.environment_in_use(configured, legacy)
        python = python or str(venv_python(venvDir))
        self.ui.engineStatusLabel.text = _("Checking the engine's Python ...")
        self.runInBackground(lambda task, path: requirements_installed(path, self.logic.startupEnvironment),
                             lambda task: self._afterCheck(task, python, model, venvDir), python)

    def _afterCheck(self, task, python, model, venvDir):
        if task.ok and task.value:
            self._startEngine(python, model)
            return
        question = _("The local engine needs its Python packages (PyTorch, diffusers, highdicom, FastAPI ...; "
                     "a few GB) in {python}. They are installed there, not into Slicer. Install them now?").format(
            python=python)
        if not slicer.util.confirmYesNoDisplay(question, windowTitle=_("XReal: first use")):
            self._generateAfterStart = False
            self.ui.engineStatusLabel.text = _("Local engine not started: its requirements are not installed.")
            return
        self.ui.engineStatusLabel.text = _("Installing the engine's requirements (see the log below) ...")
        self.ui.progressBar.setRange(0, 0)  # busy indicator
        requirements = enginepath.requirements_path()
        self.runInBackground(lambda task: environment.install_environment(
            task.report, self.logic.spawn, python, venvDir, requirements, self.logic.startupEnvironment),
            lambda task: self._afterInstall(task, python, model, venvDir))

    def _afterInstall(self, task, python, model, venvDir):
        self.ui.progressBar.setRange(0, 100)
        problems = {  # the worker returns an outcome; its sentence is translated here, on the main thread
            environment.NO_BASE_PYTHON: _("No Python 3.10 or newer was found on this computer. Install one "
                                          "(python.org), or choose a Python that has the engine's packages as "
                                          "'Engine Python'."),
            environment.VENV_FAILED: _("Could not create the engine environment in {dir}.").format(dir=venvDir),
            environment.PIP_FAILED: _("Installing the engine's requirements failed; the log shows pip's message."),
            environment.NOT_IMPORTABLE: _("The engine's requirements are still not importable in {python}.").format(
                python=python),
        }
        if not task.ok or task.value != environment.INSTALLED:
            self._generateAfterStart = False
            self.ui.engineStatusLabel.text = _("Installing the engine's requirements failed.")
            self.reportError(_("The engine could not be installed."),
                             task.error if not task.ok else XRealError(problems.get(task.value, str(task.value))))
            return
        self._startEngine(python, model)

    def _startEngine(self, python, model):
        self.ui.engineStatusLabel.text = _("Starting the local engine (loading the model) ...")
        self.logic.dropConnection()
        self.updateEngineDependentWidgets()
        self.runInBackground(self.logic.startLocalEngine, self._afterConnect, python, model,
                             self.logic.dataDirectory())

    def onStopEngine(self):
        """Shut the engine down through its API (in the background: it may finish a diffusion step first)."""
        if self.generating() or self.isBusy():
            return
        self.ui.engineStatusLabel.text = _("Stopping the local engine ...")
        self.runInBackground(lambda task: self.logic.stopLocalEngine(), self._afterStop)

    def _afterStop(self, task):
        self.ui.engineStatusLabel.text = _("Local engine stopped.") if task.ok else _("Stopping failed.")
        self.updateEngineDependentWidgets()

    def onRemoveEnvironment(self):
        """Delete the private engine environment (several GB) after asking; the local engine is stopped first."""
        if self.generating() or self.isBusy():
            return
        configured, legacy = self.environmentDirs()
        found = environment.removable_environments(configured, legacy)
        if not found:
            slicer.util.infoDisplay(_("No engine environment made by XRealSlicer is in {dir}.").format(dir=configured))
            return
        question = _("Remove the engine environment (PyTorch and the engine's other packages, several GB)?"
                     "\n\n{dirs}\n\nIt is installed again, after asking, the next time the local engine starts."
                     ).format(
            dirs="\n".join(str(path) for path in found))
        if not slicer.util.confirmYesNoDisplay(question, windowTitle=_("XReal")):
            return
        self.ui.engineStatusLabel.text = _("Removing the engine environment ...")

        def remove(task, paths):
            self.logic.stopLocalEngine()
            for path in paths:
                environment.remove_environment(path, legacy)

        self.runInBackground(remove, self._afterRemove, found)

    def _afterRemove(self, task):
        if not task.ok:
            self.ui.engineStatusLabel.text = _("Removing the engine environment failed.")
            self.reportError(_("The engine environment could not be removed."), task.error)
        else:
            self.ui.engineStatusLabel.text = _("Engine environment removed.")
        self.updateEngineDependentWidgets()

    def onRememberTokenToggled(self, remember):
        setSettingsValue("rememberToken", bool(remember))
        if not remember:
            qt.QSettings().remove(SETTINGS_PREFIX + "token")

    def onConnect(self):
        if self.generating() or self.isBusy():
            return
        with slicer.util.tryWithErrorDisplay(_("Not connected.")):
            url = connection.normalize_url(self.ui.serverUrlComboBox.currentText)
        token = self.ui.tokenLineEdit.text.strip() or None
        warning = connection.insecure_url_warning(url)
        if warning:
            self.appendLog([warning])
        history = connection.updated_history(
            [self.ui.serverUrlComboBox.itemText(i) for i in range(self.ui.serverUrlComboBox.count)], url)
        setSettingsValue("serverUrlHistory", history)
        if self.ui.rememberTokenCheckBox.checked:  # plain text in the settings file: only when asked to
            setSettingsValue("token", token or "")
        self.ui.serverUrlComboBox.clear()
        self.ui.serverUrlComboBox.addItems(history)
        self.ui.engineStatusLabel.text = _("Connecting to {url} ...").format(url=url)
        self.logic.dropConnection()
        self.updateEngineDependentWidgets()
        self.runInBackground(self.logic.connectRemote, self._afterConnect, url, token)

    def _afterConnect(self, task):
        generate, self._generateAfterStart = self._generateAfterStart, False
        if not task.ok:
            self.ui.engineStatusLabel.text = _("Not connected.")
            if not isinstance(task.error, Cancelled):
                self.reportError(_("The engine did not start or answer."), task.error)
        else:
            self.ui.engineStatusLabel.text = connection.status_line(self.logic.info, self.logic.engineUrl)
            self.applyModelInfo()
            if generate:
                qt.QTimer.singleShot(0, self.onGenerateOrCancel)  # outside this timer callback
        self.updateEngineDependentWidgets()

    def modelInfo(self):
        """The connected engine's /info, else (local mode) what the model's own file says."""
        if self.logic.info is not None:
            return self.logic.info
        return connection.local_model_info(self.ui.modelLineEdit.text, enginepath.find_engine_root()) or {}

    def applyModelInfo(self):
        """The model's sampling defaults (when the model changed), findings, samplers and PACS nodes into the panel."""
        info = self.modelInfo()
        modelId = (info.get("model") or {}).get("id")
        self.logic.samplingDefaults = sampling.model_defaults(info)  # checked by the policy
        self._controlnets = controls.model_controlnets(info)
        controlsKey = (modelId, tuple(sorted(self._controlnets.items())))
        if self._parameterNode and modelId:
            values = {}
            if modelId != self._defaultsModel:
                values = sampling.node_defaults(self.logic.samplingDefaults)
                self._stepsSeen = values["steps"]  # the model's own anatomy steps, not the follow rule's
            if controlsKey != self._controlDefaultsFor:  # the same model may come with other ControlNets
                values.update(controls.node_defaults(self._controlnets, self._parameterNode.referenceControl))
            with slicer.util.NodeModify(self._parameterNode):  # one Modified event (as wrapper.py uses it)
                for name, value in values.items():
                    setattr(self._parameterNode, name, value)
            self._defaultsModel, self._controlDefaultsFor = modelId, controlsKey
        self.fillCombo("samplerComboBox", sampling.sampler_choices(info))
        self.fillCombo("referenceControlComboBox", controls.reference_choices(self._controlnets))
        self.onParameterNodeModified()  # the control widgets that apply to this model
        destinations, sources = connection.pacs_nodes(info)
        for combo, none, names in ((self.ui.pushDestinationComboBox, _("Do not send"), destinations),
                                   (self.ui.pacsSourceComboBox, _("Upload the canvas pixels"), sources)):
            combo.clear()
            combo.addItem(none, "")
            for name in names:
                combo.addItem(name, name)
        self.updateFindingChoice()
        self.updateEngineDependentWidgets()

    def updateEngineDependentWidgets(self):
        running = self._runner is not None and self._runner.busy
        self.ui.generateButton.enabled = running or self.logic.client is not None \
            or self.ui.localEngineRadioButton.checked  # local: Generate starts the engine
        destinations, sources = connection.pacs_nodes(self.logic.info or {})
        for name in ("pushLabel", "pushDestinationComboBox", "sendToPacsButton"):
            getattr(self.ui, name).visible = bool(destinations)
        for name in ("pacsSourceLabel", "pacsSourceComboBox"):
            getattr(self.ui, name).visible = bool(sources)
        self.ui.stopEngineButton.enabled = not running and self.logic.launcher is not None \
            and self.logic.launcher.is_running()
        for name in ("startEngineButton", "connectButton", "removeEnvironmentButton", "generateAgainButton"):
            getattr(self.ui, name).enabled = not running  # they would replace, stop or restart the running engine

    # ------------------------------------------------------------------ canvas and masks

    def onBlankCanvas(self):
        with slicer.util.tryWithErrorDisplay(_("The canvas could not be created.")):
            self._parameterNode.canvasVolume = self.logic.createBlankCanvas(self.modelInfo())
            self._parameterNode.editMode = False

    def loadTemplate(self, path):
        """A canvas with the template's anatomy segments (the Load button and the Sample Data module)."""
        if not path:
            slicer.util.errorDisplay(_("No anatomy template is installed with this extension."))
            return
        with slicer.util.tryWithErrorDisplay(_("The template could not be loaded."), waitCursor=True):
            volume, segmentation = self.logic.createCanvasFromTemplate(Path(path), self.modelInfo())
            with slicer.util.NodeModify(self._parameterNode):
                self._parameterNode.canvasVolume = volume
                self._parameterNode.segmentation = segmentation
                self._parameterNode.editMode = False

    def onCreateSegments(self):
        with slicer.util.tryWithErrorDisplay(_("The segments could not be created.")):
            canvas = self._parameterNode.canvasVolume
            if canvas is None:
                raise XRealError(_("Create or select a canvas first (Canvas section)."))
            self._parameterNode.segmentation = self.logic.createSegmentation(
                canvas, self.modelInfo(), withAnatomy=not self._parameterNode.editMode)

    def onAddPathology(self):
        with slicer.util.tryWithErrorDisplay(_("The pathology segment could not be added.")):
            segmentation = self._parameterNode.segmentation
            if segmentation is None:
                raise XRealError(_("Create the segments first (Create segments)."))
            segmentId = self.logic.addPathologySegment(segmentation)
            self.ui.embeddedSegmentEditorWidget.setCurrentSegmentID(segmentId)
            self.updateFindingChoice()
            self.setStatus(_("Choose the new segment's finding, then paint it."))

    def onAddAttention(self):
        with slicer.util.tryWithErrorDisplay(_("The attention segment could not be added.")):
            segmentation = self._parameterNode.segmentation
            if segmentation is None:
                raise XRealError(_("Create the segments first (Create segments)."))
            segmentId = self.logic.addAttentionSegment(segmentation)
            self.ui.embeddedSegmentEditorWidget.setCurrentSegmentID(segmentId)
            self.updateFindingChoice()
            self.setStatus(_("Paint where the image should draw attention; the engine blurs it into a map."))

    def currentSegment(self):
        """(segmentation, id of the segment selected in the embedded editor's list) or (segmentation, None)."""
        segmentation = self._parameterNode.segmentation if self._parameterNode else None
        segmentId = self.ui.embeddedSegmentEditorWidget.currentSegmentID() if segmentation else ""
        if segmentation is None or not segmentId or segmentation.GetSegmentation().GetSegment(segmentId) is None:
            return segmentation, None
        return segmentation, segmentId

    def updateFindingChoice(self, *args):
        """The Finding list shows the selected segment's finding; anatomy has none, a new pathology none yet."""
        combo = self.ui.findingComboBox
        segmentation, segmentId = self.currentSegment()
        kind = self.logic.segmentKind(segmentation, segmentId) if segmentId else None
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        if segmentId is None or kind in (ANATOMY, ATTENTION):
            if segmentId is None:
                combo.addItem(_("(select a pathology segment)"), "")
            else:
                combo.addItem(_("(anatomy: no finding)") if kind == ANATOMY else _("(attention region: no finding)"), "")
            combo.enabled = False
        else:
            combo.addItem(_("Choose a finding ..."), "")
            editMode = bool(self._parameterNode and self._parameterNode.editMode)
            for finding, label in planning.finding_choices(connection.model_findings(self.modelInfo()),
                                                           self.logic.vocabulary, editMode):
                combo.addItem(label, finding)
            combo.setCurrentIndex(max(0, combo.findData(self.logic.segmentFinding(segmentation, segmentId) or "")))
            combo.enabled = True
        combo.blockSignals(wasBlocked)

    def onFindingChosen(self, index):
        segmentation, segmentId = self.currentSegment()
        finding = self.ui.findingComboBox.itemData(index)
        if segmentId is None or not finding:
            return
        with slicer.util.tryWithErrorDisplay(_("The finding could not be set.")):
            self.logic.setSegmentFinding(segmentation, segmentId, finding)  # and names the segment after it
        self.updateFindingChoice()

    # ------------------------------------------------------------------ generate

    def onRandomSeed(self):
        self._parameterNode.seed = random.randint(*sampling.node_range("seed"))

    def onGenerateOrCancel(self):
        if self._runner is not None and self._runner.busy:
            self._runner.cancel()
            self.ui.generateButton.enabled = False  # until the engine confirms (updateEngineDependentWidgets)
            self.setStatus(_("Cancelling ..."))
            return
        if self.isBusy():
            return
        with slicer.util.tryWithErrorDisplay(_("Generate failed."), waitCursor=True):
            if self.logic.client is None:
                if not self.ui.localEngineRadioButton.checked:
                    raise XRealError(_("The remote engine is not connected; press Connect first (Engine section)."))
                canvas, segmentation = self.canvasAndSegmentation()
                planning.check_drawing(self.logic.readSegments(segmentation, canvas), self.logic.canvasGeometry(canvas),
                                       self.logic.vocabulary, self._parameterNode.editMode)  # before a start
                self.setStatus(_("Starting the local engine first ..."))
                self.onStartEngine(thenGenerate=True)
                return
            self.startRun(self.prepareJobs())

    def canvasAndSegmentation(self):
        node = self._parameterNode
        if node.canvasVolume is None:
            raise XRealError(_("Select or create a canvas first (Canvas section)."))
        if node.segmentation is None:
            raise XRealError(_("Create the segments first (Masks section)."))
        return node.canvasVolume, node.segmentation

    def panelSettings(self):
        node = self._parameterNode
        return planning.PanelSettings(  # the lists' values as shown (showComboValues: the node's where offered)
            seed=node.seed, steps=node.steps, anatomy_steps=node.anatomySteps, guidance=node.guidance,
            sampler=self.ui.samplerComboBox.currentData or None, fast=node.fastPreview, variations=node.variations,
            interpolate=node.interpolate, interpolation_steps=node.interpolationSteps, edit_mode=node.editMode,
            push_to=self.ui.pushDestinationComboBox.currentData or None,
            control_stages=self.ui.controlStagesComboBox.currentData or None, use_reference=node.useReference,
            reference_control=self.ui.referenceControlComboBox.currentData or None,
            reference_scale=node.referenceScale, attention_scale=node.attentionScale)

    def prepareJobs(self):
        """Read the MRML side into plain values; XRealSlicerLib.planning validates and writes one job per image."""
        canvas, segmentation = self.canvasAndSegmentation()
        self.logic.ensureDicomDatabase()  # results are imported into it; may ask the user, so before the run
        editSource = None
        if self._parameterNode.editMode:
            pacs = self.logic.pacsSourceFor(canvas, self.ui.pacsSourceComboBox.currentData)
            file = None if pacs else self.logic.dicomFileOf(canvas)
            editSource = planning.EditSource(file=file, pacs=pacs,
                                             pixels=None if pacs or file else slicer.util.arrayFromVolume(canvas))
        pathNode = self.ui.interpolationPathSelector.currentNode()
        path = None
        if self._parameterNode.interpolate and pathNode is not None:
            path = planning.InterpolationPath(slicer.util.arrayFromMarkupsControlPoints(pathNode, world=True),
                                              self.logic.rasToIjk(canvas))
        _segmentation, segmentId = self.currentSegment()
        plan = planning.plan_jobs(
            self.logic.readSegments(segmentation, canvas), self.logic.canvasGeometry(canvas), self.logic.vocabulary,
            self.logic.info, self.panelSettings(), self.logic.newRunDirectory(), edit_source=editSource,
            selected_segment=segmentation.GetSegmentation().GetSegment(segmentId).GetName() if segmentId else None,
            path=path, reference=slicer.util.arrayFromVolume(canvas) if self._parameterNode.useReference else None)
        self._notes = plan.warnings
        self.appendLog(plan.warnings)
        return plan.jobs

    def startRun(self, jobs):
        # several images go to the engine as one batch where it can (XRealSlicerLib.batches), else one by one
        self._runner = BatchRunner(self.logic.client, describe_engine=self.logic.engineDescription())
        self._runner.start(jobs)
        self.ui.generateButton.text = _("Cancel")
        self.ui.progressBar.value = 0
        self.setStatus(" ".join([_("Submitting ...")] + self._notes))
        self._timer.start()

    def onTimer(self):
        """Main thread: deliver finished background calls and job events (the only place MRML/Qt change)."""
        if self._inTimer:  # a dialog opened below runs a nested event loop that fires this timer again
            return
        self._inTimer = True
        try:
            self._onTimer()
        finally:
            self._inTimer = False

    def _onTimer(self):
        if self._task is not None:
            self.appendLog(self._task.new_lines())
            finished = self._task.poll()
            if finished is not None:
                done, self._taskDone = self._taskDone, None
                if done is not None:
                    done(finished)
        if self._runner is not None:
            for event in self._runner.drain():
                self.onJobEvent(event)
        if self.logic.launcher is not None:
            self.appendLog(self.logic.drainEngineLog())
            starting = self._task is not None and not self._task.done  # a start or stop is under way
            if starting or not self.logic.forgetEndedEngine():
                return  # keep showing the local engine's output while it runs
            self.ui.engineStatusLabel.text = _("The local engine has stopped (see the log); Generate or Start "
                                               "engine starts it again.")
            self.updateEngineDependentWidgets()
        if (self._task is None or self._task.done) and (self._runner is None or
                                                        (not self._runner.busy and self._runner.events.empty())):
            self._timer.stop()

    def onJobEvent(self, event):
        view = planning.panel_progress(event, self._notes)
        if view.bar is not None:
            self.ui.progressBar.value = view.bar
        self.setStatus(view.status)
        if event.result is not None:
            try:
                self.addResult(event.label, event.result)
            except Exception as error:
                self.reportError(_("The result was generated but could not be loaded."), error)
        if view.finished:
            self.ui.generateButton.text = _("Generate")
            if view.error:
                slicer.util.errorDisplay(view.error, windowTitle=_("XReal"))
            self.updateEngineDependentWidgets()

    # ------------------------------------------------------------------ results

    def addResult(self, label, result):
        """Load SC + SEG, list the result with its provenance, show it (and only its masks) beside the canvas."""
        nodes = self.logic.loadResult(result)
        self._results.append({"result": result, "volume": nodes["volume"].GetID(),
                              "segmentation": nodes["segmentation"].GetID(), "job": str(result.job.get("id", ""))})
        item = qt.QListWidgetItem(results.result_label(label, result.provenance))
        item.setToolTip("\n".join(filter(None, [results.provenance_summary(result.provenance),
                                                results.quality_summary(result.provenance)])))
        self.ui.resultsListWidget.addItem(item)
        self.ui.resultsListWidget.setCurrentRow(len(self._results) - 1)
        self.showResult(self._results[-1])
        self.appendLog(result.warnings)
        if result.job.get("push"):
            self.appendLog([push_summary(result.job["push"])])

    def selectedResult(self):
        row = self.ui.resultsListWidget.currentRow
        return self._results[row] if 0 <= row < len(self._results) else None

    def shownResultSegmentation(self):
        record = self.selectedResult()
        return slicer.mrmlScene.GetNodeByID(record["segmentation"]) if record else None

    def onResultSelected(self, row=None):
        record = self.selectedResult()
        provenance = record["result"].provenance if record else {}
        self.ui.resultDetailsLabel.text = "\n".join(filter(None, [results.provenance_summary(provenance),
                                                                  results.quality_summary(provenance)]))

    def showResult(self, record):
        node = self._parameterNode
        self.logic.showSideBySide(slicer.mrmlScene.GetNodeByID(record["volume"]),
                                  slicer.mrmlScene.GetNodeByID(record["segmentation"]),
                                  node.canvasVolume if node else None, node.segmentation if node else None,
                                  [other["segmentation"] for other in self._results])

    def onShowResult(self):
        record = self.selectedResult()
        if record is not None and slicer.mrmlScene.GetNodeByID(record["volume"]) is not None:
            self.showResult(record)

    def onGenerateAgain(self):
        """Generate again with the selected result's settings (seed, steps, anatomy steps, guidance, sampler,
        ControlNet settings)."""
        if self.generating():  # Generate would be Cancel now
            return
        record = self.selectedResult()
        if record is None:
            slicer.util.errorDisplay(_("Select a result first."))
            return
        with slicer.util.tryWithErrorDisplay(_("The result's settings could not be used.")):
            settings = results.settings_from_provenance(record["result"].provenance)
            self._stepsSeen = settings.get("steps", self._parameterNode.steps)  # its anatomy steps, not the rule's
            with slicer.util.NodeModify(self._parameterNode):  # the lists follow (showComboValues)
                for name, value in settings.items():
                    setattr(self._parameterNode, name, value)
        self.onGenerateOrCancel()

    def onSendToPacs(self):
        """Send the selected result to the engine's PACS destination (in the background; the engine keeps its copy)."""
        record = self.selectedResult()
        destination = self.ui.pushDestinationComboBox.currentData
        if record is None or not record["job"]:
            slicer.util.errorDisplay(_("Select a result first."))
        elif not destination:
            slicer.util.errorDisplay(_("Choose a PACS destination under Generate first."))
        elif self.logic.client is None:
            slicer.util.errorDisplay(_("The engine is not connected; connect it again to send its results."))
        elif not self.isBusy():
            self.setStatus(_("Sending to {destination} ...").format(destination=destination))
            client, jobId = self.logic.client, record["job"]
            self.runInBackground(lambda task: client.push(jobId, destination), self._afterSend)

    def _afterSend(self, task):
        if not task.ok:
            self.setStatus(_("Sending failed."))
            self.reportError(_("Sending to the PACS failed."), task.error)
            return
        summary = push_summary(task.value.get("push"))
        self.setStatus(summary)
        self.appendLog([summary])

    def onSendWithSlicer(self):
        """Slicer's own DICOM send (the user's configured PACS), for setups without engine destinations."""
        record = self.selectedResult()
        if record is None:
            slicer.util.errorDisplay(_("Select a result first."))
            return
        import DICOMLib

        # Slicer source: Modules/Scripted/DICOMLib/DICOMSendDialog.py (exported by DICOMLib/__init__.py)
        self._sendDialog = DICOMLib.DICOMSendDialog([str(path) for path in record["result"].dicom_files])


class XRealSlicerLogic(ScriptedLoadableModuleLogic):
    """MRML side of the module: canvas, segments, engine connection, loading and showing results."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._vocabulary = None
        self.launcher = None
        self.client = None
        self.info = None
        self.engineUrl = None
        self.engineLog = queue.Queue()
        self.samplingDefaults = sampling.model_defaults()  # the model's whose values the panel shows
        self._spawn = None
        self.startupEnvironment = None
        self.shuttingDown = False

    def getParameterNode(self):
        return XRealSlicerParameterNode(super().getParameterNode())

    @property
    def vocabulary(self):
        if self._vocabulary is None:
            self._vocabulary = Vocabulary.load()
        return self._vocabulary

    def segmentEditorNode(self):
        """The embedded editor's own parameter node (a singleton, as Modules/Scripted/SegmentEditor does it)."""
        node = slicer.mrmlScene.GetSingletonNode("XRealSlicer", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag("XRealSlicer")
            node = slicer.mrmlScene.AddNode(node)
        return node

    # ------------------------------------------------------------------ engine

    def dataDirectory(self):
        return Path(slicer.app.temporaryPath) / "XRealSlicer" / "engine-data"

    def spawn(self, args, environment, cwd):
        """Start a process in Slicer's startup environment (not Slicer's own PYTHONPATH); thread-safe."""
        if self._spawn is None:
            raise XRealError("prepareSpawn() must run on the main thread first.")
        return self._spawn(args, environment, cwd)

    def prepareSpawn(self):
        """Read Slicer's startup environment on the main thread, before any worker thread needs it."""
        self.startupEnvironment = dict(slicer.util.startupEnvironment())
        self._spawn = make_spawn(self.startupEnvironment)

    def startLocalEngine(self, task, python, model, dataDir):
        """Worker thread: start the bundled engine and read its info (no MRML/Qt, no translation here)."""
        self.stopLocalEngine()
        self.dropConnection()
        launcher = EngineLauncher(python, model, dataDir, spawn=self.spawn)
        self.launcher = launcher
        try:
            url = launcher.start(timeout=300, progress=self.engineLog.put)
            if self.shuttingDown:  # Slicer closed while the engine was starting
                raise Cancelled("Slicer is closing.")
            self._setClient(url, launcher.token)
        except BaseException:
            launcher.stop(timeout=5.0)
            self.launcher = None
            raise

    def connectRemote(self, task, url, token):
        """Worker thread: check the remote engine and read its info (a local engine is stopped: one engine at a time)."""
        self.stopLocalEngine()
        self.dropConnection()
        self._setClient(url, token)

    def dropConnection(self):
        """Forget the current engine (a new one is being started or connected)."""
        self.client = self.info = self.engineUrl = None  # samplingDefaults stay those the panel's values came from

    def _setClient(self, url, token):
        client = EngineClient(url, token, timeout=30.0)
        self.useClient(client, client.info(), url)

    def useClient(self, client, info, url):
        """Take an engine into use (the self-test passes a replaying one); a bad default refuses it."""
        samplingDefaults = sampling.model_defaults(info)
        self.client, self.info, self.engineUrl, self.samplingDefaults = client, info, url, samplingDefaults

    def drainEngineLog(self):
        """Engine output lines received since the last call (the launcher's reader thread queues them)."""
        lines = []
        while not self.engineLog.empty():
            lines.append(self.engineLog.get_nowait())
        return lines

    def stopLocalEngine(self):
        if self.launcher is not None:
            self.launcher.stop()
            self.launcher = None
            self.dropConnection()

    def forgetEndedEngine(self):
        """The local engine's process ended by itself (a crash, killed): drop it and its client, so the next
        Generate starts a new one instead of failing with "not reachable". True if it had ended."""
        if self.launcher is not None and not self.launcher.is_running():
            self.launcher = None
            self.dropConnection()
            return True
        return False

    def engineDescription(self):
        return _("The local engine") if self.launcher is not None else _("The engine at {url}").format(url=self.engineUrl)

    # ------------------------------------------------------------------ canvas

    @staticmethod
    def templatePaths():
        directory = enginepath.templates_dir(Path(__file__).parent)
        return sorted(directory.glob("anatomy*.png")) if directory is not None else []

    def createBlankCanvas(self, info, name="XReal canvas"):
        size, fov = connection.model_geometry(info)
        pixels, spacing = blank_canvas(size, size, fov)
        volume = slicer.util.addVolumeFromArray(pixels, ijkToRAS=canvas_ijk_to_ras(spacing), name=name)
        self.showVolume(volume)
        return volume

    def createCanvasFromTemplate(self, path, info):
        labels, spacingRowColumn = read_template(path)
        rows, columns = labels.shape
        _size, fov = connection.model_geometry(info)
        if spacingRowColumn is None:
            spacing = (fov / max(rows, columns),) * 2 + (1.0,)
        else:
            spacing = (spacingRowColumn[1], spacingRowColumn[0], 1.0)
        volume = slicer.util.addVolumeFromArray(np.zeros((1, rows, columns), np.float32),
                                                ijkToRAS=canvas_ijk_to_ras(spacing), name=f"XReal canvas {path.stem}")
        segmentation = None
        try:
            segmentation = self.createSegmentation(volume, info, withAnatomy=True)
            for label, mask in template_segments(labels).items():
                for template in self.vocabulary.anatomy_templates([label]):
                    segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName(template.name)
                    if segmentId:
                        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segmentId, volume)
        except Exception:
            for node in (segmentation, volume):  # leave the scene as it was
                if node is not None:
                    slicer.mrmlScene.RemoveNode(node)
            raise
        self.showVolume(volume)
        return volume, segmentation

    def isColourImage(self, volume):
        return slicer.util.arrayFromVolume(volume).ndim == 4  # (slices, rows, columns, components)

    def greyCopy(self, volume):
        """A grey scalar volume of an RGB(A) one, on the same grid (XRealSlicerLib.request.grey_pixels)."""
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        grey = slicer.util.addVolumeFromArray(grey_pixels(slicer.util.arrayFromVolume(volume)),
                                              ijkToRAS=slicer.util.arrayFromVTKMatrix(matrix),
                                              name=_("{name} (grey)").format(name=volume.GetName()))
        self.showVolume(grey)
        return grey

    def canvasGeometry(self, volume):
        return CanvasGeometry(tuple(slicer.util.arrayFromVolume(volume).shape), tuple(volume.GetSpacing()),
                              volume.GetName())

    def rasToIjk(self, volume):
        matrix = vtk.vtkMatrix4x4()
        volume.GetRASToIJKMatrix(matrix)
        return slicer.util.arrayFromVTKMatrix(matrix)

    def showVolume(self, volume):
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:  # no main window (e.g. --no-main-window tests)
            return
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpRedSliceView)
        slicer.util.setSliceViewerLayers(background=volume, fit=True)

    def showSideBySide(self, resultVolume, resultSegmentation, canvas=None, canvasSegmentation=None,
                       resultSegmentations=()):
        """Result (SC with its SEG) in Red, the canvas with the drawn masks in Yellow; every other result's
        segmentation hidden (results.result_visibility: they share the SC's geometry)."""
        layoutManager = slicer.app.layoutManager()
        views = results.result_visibility(resultSegmentation.GetID() if resultSegmentation else None,
                                          list(resultSegmentations),
                                          canvasSegmentation.GetID() if canvas and canvasSegmentation else None)
        sliceNodeIds = {}
        if layoutManager is not None:
            layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView if canvas is not None
                                    else slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpRedSliceView)
            for viewName, volume in (("Red", resultVolume), ("Yellow", canvas)):
                sliceWidget = layoutManager.sliceWidget(viewName)
                if sliceWidget is None or volume is None:
                    continue
                sliceNode = sliceWidget.mrmlSliceNode()
                sliceNode.SetOrientationToAxial()
                sliceWidget.sliceLogic().GetSliceCompositeNode().SetBackgroundVolumeID(volume.GetID())
                sliceWidget.sliceLogic().FitSliceToAll()
                sliceNodeIds[viewName] = sliceNode.GetID()
        for nodeId, viewNames in views.items():
            segmentation = slicer.mrmlScene.GetNodeByID(nodeId)
            displayNode = segmentation.GetDisplayNode() if segmentation is not None else None
            if displayNode is None:
                continue
            displayNode.SetVisibility(bool(viewNames))
            displayNode.RemoveAllViewNodeIDs()
            for viewName in viewNames:
                if viewName in sliceNodeIds:
                    displayNode.AddViewNodeID(sliceNodeIds[viewName])

    def showInEveryView(self, segmentation):
        if segmentation is not None and segmentation.GetDisplayNode() is not None:
            segmentation.GetDisplayNode().RemoveAllViewNodeIDs()

    # ------------------------------------------------------------------ segments

    def createSegmentation(self, canvas, info, withAnatomy=True):
        """One click: anatomy segments (the model's labels) + one pathology segment without a finding yet."""
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{canvas.GetName()} masks")
        try:
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(canvas)
            labels = list(connection.model_anatomy_labels(info)) if info.get("anatomy_labels") else None
            if withAnatomy:
                for template in self.vocabulary.anatomy_templates(labels):
                    self._addSegment(segmentation, template.name, template.color, template.terminology)
            self.addPathologySegment(segmentation)
        except Exception:
            slicer.mrmlScene.RemoveNode(segmentation)  # leave the scene as it was
            raise
        return segmentation

    def _addSegment(self, segmentation, name, color, terminology):
        segmentId = segmentation.GetSegmentation().AddEmptySegment("", name, list(color))
        if terminology:
            segment = segmentation.GetSegmentation().GetSegment(segmentId)
            segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology)  # every Slicer version
        return segmentId

    def addPathologySegment(self, segmentation):
        """A new pathology segment: no finding until the user chooses one (then it is named after it)."""
        name = self.vocabulary.new_pathology_name([name for _id, name, _term in self.segments(segmentation)])
        return self._addSegment(segmentation, name, (1.0, 0.8, 0.0), "")

    def addAttentionSegment(self, segmentation):
        """A new "Attention" segment: painted, it is sent as the attention control (the engine blurs it)."""
        template = self.vocabulary.attention_template([name for _id, name, _term in self.segments(segmentation)])
        return self._addSegment(segmentation, template.name, template.color, template.terminology)

    def segments(self, segmentation):
        """(segment id, name, terminology) of every segment."""
        result = []
        seg = segmentation.GetSegmentation()
        for index in range(seg.GetNumberOfSegments()):
            segmentId = seg.GetNthSegmentID(index)
            segment = seg.GetSegment(segmentId)
            tag = vtk.mutable("")  # GetTag(name, std::string&) fills an output argument
            terminology = str(tag) if segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag) else ""
            result.append((segmentId, segment.GetName(), terminology))
        return result

    def _meaning(self, segmentation, segmentId):
        for otherId, name, terminology in self.segments(segmentation):
            if otherId == segmentId:
                return self.vocabulary.classify(name, terminology)
        return None

    def segmentKind(self, segmentation, segmentId):
        meaning = self._meaning(segmentation, segmentId)
        return meaning.kind if meaning is not None else None

    def segmentFinding(self, segmentation, segmentId):
        meaning = self._meaning(segmentation, segmentId)
        return meaning.finding if meaning is not None and meaning.kind != ANATOMY else None

    def setSegmentFinding(self, segmentation, segmentId, finding):
        """The finding is stored as the segment's terminology (and colour), so it survives saving; a name the
        module gave becomes the finding's display name ("Pneumonia", "Pneumonia 2"), one the user typed stays."""
        segment = segmentation.GetSegmentation().GetSegment(segmentId)
        others = [name for otherId, name, _term in self.segments(segmentation) if otherId != segmentId]
        name = self.vocabulary.name_for_finding(segment.GetName(), finding, others)
        template = self.vocabulary.finding_template(finding, name)
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), template.terminology)
        segment.SetColor(*template.color)
        segment.SetName(name)

    def readSegments(self, segmentation, canvas):
        """Every segment as an array on the canvas grid (per segment, so overlaps are kept); hidden ones
        too, marked so that Generate can say it uses them."""
        display = segmentation.GetDisplayNode()
        return [SegmentInput(name, slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, canvas),
                             terminology, visible=display is None or bool(display.GetSegmentVisibility(segmentId)))
                for segmentId, name, terminology in self.segments(segmentation)]

    # ------------------------------------------------------------------ edit mode sources

    def dicomFileOf(self, volume):
        """The source DICOM file of a volume loaded from the DICOM database (so results join its study)."""
        uids = (volume.GetAttribute("DICOM.instanceUIDs") or "").split()
        if len(uids) != 1 or not slicer.dicomDatabase:
            return None
        path = slicer.dicomDatabase.fileForInstance(uids[0])
        return Path(path) if path and Path(path).is_file() else None

    def pacsSourceFor(self, volume, sourceName):
        """Let the engine fetch the original from a PACS it knows (study/series/instance of this DICOM canvas)."""
        if not sourceName:
            return None
        uids = (volume.GetAttribute("DICOM.instanceUIDs") or "").split()
        if len(uids) != 1 or not slicer.dicomDatabase:
            raise XRealError(_("The canvas was not loaded from DICOM, so the PACS source cannot find it; "
                               "choose 'Upload the canvas pixels'."))
        database = slicer.dicomDatabase
        return {"source": sourceName, "study": database.instanceValue(uids[0], "0020,000D"),
                "series": database.instanceValue(uids[0], "0020,000E"), "instance": uids[0]}

    # ------------------------------------------------------------------ results

    def newRunDirectory(self):
        """A new folder name for one run's requests and results (created by the first request written)."""
        base = Path(slicer.app.temporaryPath) / "XRealSlicer" / "runs" / time.strftime("%Y%m%d-%H%M%S")
        directory, suffix = base, 0
        while directory.exists():
            suffix += 1
            directory = base.with_name(f"{base.name}_{suffix}")
        return directory

    def ensureDicomDatabase(self):
        if slicer.dicomDatabase and slicer.dicomDatabase.isOpen:
            return
        import DICOM

        # Slicer source: Modules/Scripted/DICOM/DICOM.py (DICOMFileDialog.createDefaultDatabase)
        if not DICOM.DICOMFileDialog.createDefaultDatabase():
            raise XRealError(_("No DICOM database is available; open the DICOM module and create one."))

    def hasSegLoader(self):
        return "DICOMSegmentationPlugin" in slicer.modules.dicomPlugins

    def loadResult(self, result):
        """Import SC + SEG into the DICOM database and load them; on failure the scene is unchanged."""
        from DICOMLib import DICOMUtils

        self.ensureDicomDatabase()
        importDir = result.directory / "dicom"
        importDir.mkdir(exist_ok=True)
        for path in result.dicom_files:
            shutil.copy2(path, importDir / path.name)
        if not DICOMUtils.importDicom(str(importDir), copyFiles=True):
            raise XRealError(_("The result could not be imported into the DICOM database."))
        loadedIds = []
        try:
            useSeg = result.seg_series_uid is not None and self.hasSegLoader()
            loadedIds = list(DICOMUtils.loadSeriesByUID(result.series_uids if useSeg else [result.sc_series_uid]) or [])
            nodes = [slicer.mrmlScene.GetNodeByID(nodeId) for nodeId in loadedIds]
            volumes = [n for n in nodes if n is not None and n.IsA("vtkMRMLScalarVolumeNode")
                       and not n.IsA("vtkMRMLLabelMapVolumeNode")]
            volumes.sort(key=lambda n: not self.isFromSeries(n, result.sc_series_uid))  # the SC first
            segmentations = [n for n in nodes if n is not None and n.IsA("vtkMRMLSegmentationNode")]
            if not volumes:
                raise XRealError(_("The synthetic X-ray (SC) could not be loaded from the DICOM database."))
            volume = volumes[0]
            if segmentations:
                segmentation = segmentations[0]
            else:
                segmentation = self.loadFallbackSegments(result, volume)
                loadedIds.append(segmentation.GetID())
            segmentation.SetDisplayVisibility(True)
            return {"volume": volume, "segmentation": segmentation}
        except Exception:
            for nodeId in loadedIds:  # leave the scene as it was
                node = slicer.mrmlScene.GetNodeByID(nodeId)
                if node is not None:
                    slicer.mrmlScene.RemoveNode(node)
            raise

    def isFromSeries(self, volume, seriesUid):
        """Whether a volume loaded from the DICOM database belongs to the series ``seriesUid``."""
        uids = (volume.GetAttribute("DICOM.instanceUIDs") or "").split()
        if not uids or not slicer.dicomDatabase:
            return False
        return slicer.dicomDatabase.instanceValue(uids[0], "0020,000E") == seriesUid

    def loadFallbackSegments(self, result, volume):
        """No DICOM-SEG loader (Slicer <= 5.10 without QuantitativeReporting): rebuild from the plain masks."""
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume.GetName()} segments")
        try:
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            for segment in read_fallback_segments(result.directory, self.vocabulary):
                segmentId = self._addSegment(segmentation, segment.name, segment.color, segment.terminology)
                slicer.util.updateSegmentBinaryLabelmapFromArray(segment.array, segmentation, segmentId, volume)
        except Exception:
            slicer.mrmlScene.RemoveNode(segmentation)
            raise
        return segmentation


class XRealSlicerTest(ScriptedLoadableModuleTest):
    """Inside Slicer. Without an engine (always, so ctest proves something by default): the widget plans jobs
    from a template canvas (with a painted attention control), a replaying engine (XRealSlicerLib.testing) runs
    them through the timer, one by one and as a batch, and the committed result (Resources/Testing/Result) is
    imported and shown. With an engine (XREALSLICER_ENGINE_PYTHON):
    a 2-step generation on the local engine, loaded and compared with the drawing."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_XRealSlicer_workflow_without_engine()
        self.setUp()
        try:
            self.test_XRealSlicer_generate_from_template()
        except unittest.SkipTest as skipped:  # Reload and Test calls runTest itself, outside unittest's runner,
            # so a skip would show as "Test failed". Slicer source: Base/Python/slicer/ScriptedLoadableModule.py
            self.delayDisplay(f"The test with a real engine was skipped: {skipped}")

    def _paintDisc(self, segmentation, segmentId, volume, insideName, radius=4):
        inside = slicer.util.arrayFromSegmentBinaryLabelmap(
            segmentation, segmentation.GetSegmentation().GetSegmentIdBySegmentName(insideName), volume)
        self.assertGreater(int(inside.sum()), 0, f"the template has no {insideName}")
        centre = np.argwhere(inside[0]).mean(axis=0)
        rows, columns = np.ogrid[: inside.shape[1], : inside.shape[2]]
        disc = ((rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius**2).astype(np.uint8)[np.newaxis]
        slicer.util.updateSegmentBinaryLabelmapFromArray(disc, segmentation, segmentId, volume)

    def _waitForRun(self, widget, seconds):
        deadline = time.time() + seconds
        while (widget._runner.busy or not widget._runner.events.empty()) and time.time() < deadline:
            slicer.app.processEvents()  # the widget's QTimer drains the runner's events
            time.sleep(0.05)
        for _index in range(10):
            slicer.app.processEvents()

    def test_XRealSlicer_workflow_without_engine(self):
        slicer.util.selectModule("XRealSlicer")
        widget = slicer.util.getModuleWidget("XRealSlicer")
        logic = widget.logic
        engine = (logic.client, logic.info, logic.engineUrl, logic.samplingDefaults)
        try:
            self._workflowWithReplayingEngine(widget)
        finally:  # the panel goes back to the engine it had (none, or a running local one), not the replaying one
            logic.client, logic.info, logic.engineUrl, logic.samplingDefaults = engine
            widget.applyModelInfo()
            widget.updateEngineDependentWidgets()

    def _workflowWithReplayingEngine(self, widget):
        from DICOMLib import DICOMUtils
        from XRealSlicerLib.testing import ReplayEngineClient

        logic, node, ui = widget.logic, widget._parameterNode, widget.ui
        client = ReplayEngineClient(polls=3)
        logic.useClient(client, client.info(), "replay")
        widget.applyModelInfo()
        widget.loadTemplate(logic.templatePaths()[0])
        volume, segmentation = node.canvasVolume, node.segmentation
        pathologyId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Pathology")
        self.assertIsNone(logic.segmentFinding(segmentation, pathologyId), "a new pathology has no finding yet")
        self._paintDisc(segmentation, pathologyId, volume, "Right lung")

        node.interpolate = True  # only the controls that apply
        self.assertFalse(ui.variationsSpinBox.enabled)
        self.assertTrue(ui.interpolationStepsSpinBox.enabled)
        node.interpolate = False
        ui.samplerComboBox.setCurrentIndex(ui.samplerComboBox.findData("unipc"))  # saved with the scene
        self.assertEqual(node.sampler, "unipc")
        node.sampler = "ddim"  # as a loaded scene sets it: the list follows
        self.assertEqual(ui.samplerComboBox.currentData, "ddim")
        node.variations = 2
        node.fastPreview = True
        self.assertFalse(ui.stepsSpinBox.enabled)
        # the replaying engine offers an attention ControlNet: a painted Attention segment is sent as its map
        self.assertTrue(ui.addAttentionButton.enabled)
        attentionId = logic.addAttentionSegment(segmentation)
        self._paintDisc(segmentation, attentionId, volume, "Heart")
        with DICOMUtils.TemporaryDICOMDatabase():  # results go into a temporary database, never the user's
            with self.assertRaises(XRealError):  # painted without a finding: an explicit choice is required
                widget.prepareJobs()
            logic.setSegmentFinding(segmentation, pathologyId, "pneumonia")
            self.assertEqual(segmentation.GetSegmentation().GetSegment(pathologyId).GetName(), "Pneumonia")
            logic.addPathologySegment(segmentation)  # unpainted, no finding: left out with a note, not refused
            jobs = widget.prepareJobs()
            self.assertEqual([job.label for job in jobs], [f"seed-{node.seed}", f"seed-{node.seed + 1}"])
            self.assertTrue(any("empty" in note for note in widget._notes))
            self.assertTrue(jobs[0].files.parameters.get("fast"))
            self.assertEqual([control[0] for control in jobs[0].files.controls], ["attention"])
            widget.startRun(jobs)
            self._waitForRun(widget, 120)
            self.assertEqual(ui.progressBar.value, 100)
            self.assertIn("empty", ui.statusLabel.text)
            self.assertEqual(ui.resultsListWidget.count, 2)
            self.assertEqual(len(client.submitted), 2)
            self.assertEqual(len(client.batches), 1)  # the variations, their attention control in every row
            self.assertEqual(client.submitted[0]["controls"][0][:2], ("attention", "attention.nrrd"))
            self.assertIn("anatomy followed: Dice", ui.resultsListWidget.item(1).text())  # every result's figure
            self.assertIn("seed 7", ui.resultsListWidget.item(0).text())  # the committed result's provenance
            self.assertIn("Dice", ui.resultDetailsLabel.text)  # its quality figure
            first, second = (slicer.mrmlScene.GetNodeByID(r["segmentation"]) for r in widget._results)
            self.assertFalse(first.GetDisplayNode().GetVisibility())  # only the shown result's masks are visible
            self.assertTrue(second.GetDisplayNode().GetVisibility())
            ui.resultsListWidget.setCurrentRow(0)
            widget.onShowResult()
            self.assertTrue(first.GetDisplayNode().GetVisibility())
            self.assertFalse(second.GetDisplayNode().GetVisibility())
            sc = slicer.mrmlScene.GetNodeByID(widget._results[0]["volume"])
            self.assertEqual(slicer.util.arrayFromVolume(sc).shape, (1, 64, 64))
            widget.onGenerateAgain()  # the selected result's settings, explicitly (no fast preset)
            self.assertEqual((node.seed, node.steps, node.fastPreview), (7, 2, False))
            self._waitForRun(widget, 120)
            self.assertEqual(client.submitted[-1]["steps"], 2)
            self.assertEqual(ui.resultsListWidget.count, 3)
            # Variations without controls go to the engine as one batch too (XRealSlicerLib.batches)
            slicer.util.updateSegmentBinaryLabelmapFromArray(np.zeros_like(slicer.util.arrayFromSegmentBinaryLabelmap(
                segmentation, attentionId, volume)), segmentation, attentionId, volume)
            node.variations = 2
            widget.startRun(widget.prepareJobs())
            self._waitForRun(widget, 120)
            self.assertEqual(len(client.batches), 2)
            self.assertEqual(ui.resultsListWidget.count, 5)
        self.delayDisplay("Workflow test without an engine passed")

    def test_XRealSlicer_generate_from_template(self):
        from DICOMLib import DICOMUtils

        logic = XRealSlicerLogic()
        python = os.environ.get("XREALSLICER_ENGINE_PYTHON") or settingsValue("enginePython", "") \
            or str(venv_python(environment.default_environment_dir()))
        model = os.environ.get("XREALSLICER_TEST_MODEL", "demo")
        logic.prepareSpawn()
        if not requirements_installed(python, logic.startupEnvironment):
            self.skipTest(f"no engine Python with the engine's packages at {python}; set XREALSLICER_ENGINE_PYTHON")
        self.delayDisplay("Starting the local engine")
        logic.startLocalEngine(None, python, model, logic.dataDirectory())
        try:
            with DICOMUtils.TemporaryDICOMDatabase():
                self._generateAndLoad(logic)
        finally:
            logic.stopLocalEngine()

    def _generateAndLoad(self, logic):
        volume, segmentation = logic.createCanvasFromTemplate(logic.templatePaths()[0], logic.info)
        findings = connection.model_findings(logic.info)
        pathologyId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Pathology")
        logic.setSegmentFinding(segmentation, pathologyId, next(f for f in findings if f != "no finding"))
        self._paintDisc(segmentation, pathologyId, volume, "Heart", radius=8)  # overlaps the heart on purpose
        plan = planning.plan_jobs(logic.readSegments(segmentation, volume), logic.canvasGeometry(volume),
                                  logic.vocabulary, logic.info, planning.PanelSettings(steps=2, anatomy_steps=1),
                                  logic.newRunDirectory())
        self.assertEqual(len(plan.jobs), 1)
        runner = JobRunner(logic.client, poll_interval=0.2)
        runner.start(plan.jobs)
        deadline = time.time() + 600
        while runner.busy and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.1)
        events = runner.drain()
        self.assertTrue(events, "the engine reported nothing within 10 minutes")
        self.assertEqual(events[-1].state, DONE, events[-1].message)
        result = runner.results[0]

        self.delayDisplay("Loading the result")
        nodes = logic.loadResult(result)
        sc, seg = nodes["volume"], nodes["segmentation"]
        scArray = slicer.util.arrayFromVolume(sc)
        self.assertEqual(scArray.shape, slicer.util.arrayFromVolume(volume).shape)
        loadedNames = [name for _id, name, _term in logic.segments(seg)]
        for expected in ("Left lung", "Right lung", "Heart"):
            self.assertIn(expected, loadedNames)
        # SEG and SC overlap: the loaded heart, read on the SC grid, is the heart that was drawn
        drawnHeart = slicer.util.arrayFromSegmentBinaryLabelmap(
            segmentation, segmentation.GetSegmentation().GetSegmentIdBySegmentName("Heart"), volume)[0] > 0
        loadedHeart = slicer.util.arrayFromSegmentBinaryLabelmap(
            seg, seg.GetSegmentation().GetSegmentIdBySegmentName("Heart"), sc)
        self.assertEqual(loadedHeart.shape, scArray.shape)
        self.assertGreater(np.logical_and(loadedHeart[0] > 0, drawnHeart).sum() / max(1, drawnHeart.sum()), 0.95)
        # the fallback reader (Slicer without a DICOM-SEG loader) rebuilds the same segments on the same pixels
        fallback = logic.loadFallbackSegments(result, sc)
        self.assertEqual(sorted(name for _id, name, _t in logic.segments(fallback)), sorted(loadedNames))
        fallbackHeart = slicer.util.arrayFromSegmentBinaryLabelmap(
            fallback, fallback.GetSegmentation().GetSegmentIdBySegmentName("Heart"), sc)
        self.assertTrue(np.array_equal(fallbackHeart > 0, loadedHeart > 0))
        self.delayDisplay("Test passed")
