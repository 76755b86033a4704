"""XReal: draw chest anatomy and pathology in Slicer, generate a synthetic X-ray (SC + SEG) with the XReal engine.

This file is the thin GUI: widget wiring and MRML calls. Everything that can run
without Slicer (masks -> request, validation, engine launcher, job runner, result
handling, fallback SEG reader) is in ``XRealSlicerLib`` and tested with pytest.
The engine itself (torch, diffusers) always runs in a separate process.
"""

import logging
import os
import queue
import random
import shutil
import time
import traceback
from pathlib import Path
from typing import Annotated

import numpy as np
import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from XRealSlicerLib import connection, enginepath, series
from XRealSlicerLib import parameters as sampling
from XRealSlicerLib.jobs import DONE, FAILED, FINAL, JobRunner, JobSpec, error_text
from XRealSlicerLib.launcher import (
    EngineLauncher,
    create_venv_command,
    find_base_python,
    make_spawn,
    install_requirements_command,
    requirements_installed,
    venv_python,
)
from XRealSlicerLib.request import (
    REMOVE_FINDING,
    CanvasGeometry,
    SegmentInput,
    blank_canvas,
    build_inputs,
    canvas_ijk_to_ras,
    read_template,
    template_segments,
    write_request_files,
)
from XRealSlicerLib.results import push_summary, read_fallback_segments
from XRealSlicerLib.tasks import BackgroundCall, run_logged
from XRealSlicerLib.vocabulary import PATHOLOGY, Vocabulary
from xreal_engine.client import EngineClient, EngineError
from xreal_engine.errors import XRealError

SETTINGS_PREFIX = "XRealSlicer/"
TIMER_INTERVAL_MS = 200
NO_PUSH = "Do not send"
NO_SOURCE = "Upload the canvas pixels"


class XRealSlicer(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("XReal")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Utilities")]
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
            "(Hashmi et al.). The engine runs outside Slicer, locally or on a server."
        )


@parameterNodeWrapper
class XRealSlicerParameterNode:
    """What the user chose in the panel (saved with the scene).

    The sampling settings' ranges and defaults are the engine's sampling policy (XRealSlicerLib.parameters);
    connectGui gives each spin box its field's WithinRange.
    """

    canvasVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    editMode: bool = False
    seed: Annotated[int, WithinRange(*sampling.node_range("seed"))] = 0
    steps: Annotated[int, WithinRange(*sampling.node_range("steps"))] = sampling.NODE_DEFAULTS["steps"]
    anatomySteps: Annotated[int, WithinRange(*sampling.node_range("anatomySteps"))] = \
        sampling.NODE_DEFAULTS["anatomySteps"]
    guidance: Annotated[float, WithinRange(*sampling.node_range("guidance"))] = sampling.NODE_DEFAULTS["guidance"]
    variations: Annotated[int, WithinRange(1, 64)] = 1
    interpolate: bool = False
    interpolationSteps: Annotated[int, WithinRange(2, 64)] = 8


def settingsValue(key, default):
    return slicer.util.settingsValue(SETTINGS_PREFIX + key, default)


def setSettingsValue(key, value):
    qt.QSettings().setValue(SETTINGS_PREFIX + key, value)


class XRealSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: Engine, Canvas, Masks, Generate, Results. Never blocks: work runs in threads, a QTimer polls."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._stepsSeen = None  # the Steps the Anatomy steps were last matched to (onParameterNodeModified)
        self._task = None  # BackgroundCall for engine start / connect / install
        self._taskDone = None  # main-thread continuation of self._task
        self._runner = None
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

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Engine
        remote = settingsValue("engineMode", "local") == "remote"
        self.ui.remoteEngineRadioButton.checked = remote
        self.ui.localEngineRadioButton.checked = not remote
        self.ui.enginePythonPathLineEdit.currentPath = settingsValue("enginePython", "")
        self.ui.modelLineEdit.text = settingsValue("model", "demo")
        history = settingsValue("serverUrlHistory", [connection.DEFAULT_REMOTE_URL]) or []
        if isinstance(history, str):
            history = [history]
        self.ui.serverUrlComboBox.addItems(list(history))
        self.ui.tokenLineEdit.text = settingsValue("token", "")
        self.ui.localEngineRadioButton.connect("toggled(bool)", self.onEngineModeChanged)
        self.ui.startEngineButton.connect("clicked()", self.onStartEngine)
        self.ui.stopEngineButton.connect("clicked()", self.onStopEngine)
        self.ui.connectButton.connect("clicked()", self.onConnect)

        # Canvas
        self.ui.blankCanvasButton.connect("clicked()", self.onBlankCanvas)
        self.ui.loadTemplateButton.connect("clicked()", self.onLoadTemplate)
        for path in self.logic.templatePaths():
            self.ui.templateComboBox.addItem(path.stem, str(path))

        # Masks
        self.ui.createSegmentsButton.connect("clicked()", self.onCreateSegments)
        self.ui.addPathologyButton.connect("clicked()", self.onAddPathology)
        self.ui.showSegmentEditorButton.connect("clicked()", self.onShowSegmentEditor)
        self.ui.pathologySegmentComboBox.connect("currentIndexChanged(int)", self.onPathologySegmentSelected)
        self.ui.findingComboBox.connect("activated(int)", self.onFindingChosen)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updatePathologySegmentList)

        # Generate / Results
        self.ui.randomSeedButton.connect("clicked()", self.onRandomSeed)
        self.ui.generateButton.connect("clicked()", self.onGenerateOrCancel)
        self.ui.showResultButton.connect("clicked()", self.onShowResult)
        self.ui.sendToPacsButton.connect("clicked()", self.onSendToPacs)
        self.ui.sendWithSlicerButton.connect("clicked()", self.onSendWithSlicer)
        self.ui.resultsListWidget.connect("itemDoubleClicked(QListWidgetItem*)", lambda item: self.onShowResult())
        self.ui.progressBar.setRange(0, 100)

        self._timer = qt.QTimer()
        self._timer.setInterval(TIMER_INTERVAL_MS)
        self._timer.connect("timeout()", self.onTimer)

        self.onEngineModeChanged()
        self.updateEngineDependentWidgets()
        self.initializeParameterNode()

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
        self.updatePathologySegmentList()  # segments may have been added in the Segment Editor

    def exit(self):
        if self._parameterNode:
            # the side-by-side view limits the drawn masks to one view; elsewhere (e.g. the Segment
            # Editor opened from the module list) they must be visible in every view again
            segmentation = self._parameterNode.segmentation
            if segmentation is not None and segmentation.GetDisplayNode() is not None:
                segmentation.GetDisplayNode().RemoveAllViewNodeIDs()
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        self.ui.resultsListWidget.clear()  # their nodes are gone, and node IDs are reused by new nodes
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
        self.updatePathologySegmentList()

    def onParameterNodeModified(self, caller=None, event=None):
        """Steps changed: Anatomy steps keep the model's fraction of the schedule unless the user set them."""
        node = self._parameterNode
        if node is None or node.steps == self._stepsSeen:
            return
        oldSteps, self._stepsSeen = self._stepsSeen, node.steps
        anatomySteps = sampling.anatomy_steps_after_steps_change(self.logic.samplingDefaults, oldSteps, node.steps,
                                                                 node.anatomySteps)
        if anatomySteps != node.anatomySteps:
            node.anatomySteps = anatomySteps

    # ------------------------------------------------------------------ errors and status

    def showError(self, error, context=""):
        """One clear sentence for the user; details (never patient data) go to the log."""
        if isinstance(error, (XRealError, EngineError)):
            message = error_text(error)
        else:
            message = _("Unexpected problem: {error}").format(error=error)
            logging.error("XReal: %s", "".join(traceback.format_exception(type(error), error, error.__traceback__)))
        slicer.util.errorDisplay((context + " " if context else "") + message, windowTitle=_("XReal"))

    def setStatus(self, text):
        self.ui.statusLabel.text = text

    def appendLog(self, lines):
        for line in lines:
            self.ui.engineLogTextEdit.appendPlainText(line)

    # ------------------------------------------------------------------ engine

    def onEngineModeChanged(self, checked=None):
        local = self.ui.localEngineRadioButton.checked
        for name in ("enginePythonLabel", "enginePythonPathLineEdit", "modelLabel", "modelLineEdit",
                     "startEngineButton", "stopEngineButton"):
            getattr(self.ui, name).visible = local
        for name in ("serverUrlLabel", "serverUrlComboBox", "tokenLabel", "tokenLineEdit", "connectButton"):
            getattr(self.ui, name).visible = not local
        setSettingsValue("engineMode", "local" if local else "remote")

    def isBusy(self):
        """A background engine call (start, connect, install, send) is still running."""
        if self._task is not None and not self._task.done:
            slicer.util.showStatusMessage(_("XReal: still busy with the engine, please wait."), 3000)
            return True
        return False

    def runInBackground(self, function, onDone, *args):
        """Run ``function(task, *args)`` in a thread; ``onDone(task)`` runs on the main thread after.

        Callers check ``isBusy()`` first. Everything that needs Slicer (paths, settings, the startup
        environment) is read here on the main thread and passed in: worker threads never touch Qt or MRML.
        """
        self.logic.prepareSpawn()
        self._task = BackgroundCall(function, *args)
        self._taskDone = onDone
        self._timer.start()

    def onStartEngine(self):
        if self.isBusy():
            return
        python = self.ui.enginePythonPathLineEdit.currentPath.strip()
        model = self.ui.modelLineEdit.text.strip() or "demo"
        setSettingsValue("enginePython", python)
        setSettingsValue("model", model)
        if python and not Path(python).is_file():
            slicer.util.errorDisplay(_("The engine Python '{python}' does not exist; choose a Python interpreter "
                                       "or leave the field empty to use a private environment.").format(python=python))
            return
        if not python:
            python = str(venv_python(self.logic.defaultEnvironmentDir()))
        self.ui.engineStatusLabel.text = _("Checking the engine's Python ...")
        self.runInBackground(lambda task, path: requirements_installed(path, self.logic.startupEnvironment),
                             lambda task: self._afterCheck(task, python, model), python)

    def _afterCheck(self, task, python, model):
        if not task.ok or not task.value:
            question = _(
                "The local engine needs its Python packages (PyTorch, diffusers, highdicom, FastAPI ...; "
                "a few GB) in {python}. They are installed there, not into Slicer. Install them now?"
            ).format(python=python)
            if not slicer.util.confirmYesNoDisplay(question, windowTitle=_("XReal: first use")):
                self.ui.engineStatusLabel.text = _("Local engine not started: its requirements are not installed.")
                return
            self.ui.engineStatusLabel.text = _("Installing the engine's requirements (see the log below) ...")
            self.ui.progressBar.setRange(0, 0)  # busy indicator
            self.runInBackground(self.logic.installRequirements, lambda t: self._afterInstall(t, python, model), python,
                                 self.logic.defaultEnvironmentDir())
            return
        self._startEngine(python, model)

    def _afterInstall(self, task, python, model):
        self.ui.progressBar.setRange(0, 100)
        if not task.ok:
            self.ui.engineStatusLabel.text = _("Installing the engine's requirements failed.")
            self.showError(task.error)
            return
        self._startEngine(python, model)

    def _startEngine(self, python, model):
        self.ui.engineStatusLabel.text = _("Starting the local engine (loading the model) ...")
        self.updateEngineDependentWidgets()  # a previous connection is dropped
        self.runInBackground(self.logic.startLocalEngine, self._afterConnect, python, model,
                             self.logic.dataDirectory())

    def onStopEngine(self):
        """Shut the engine down through its API (in the background: it may finish a diffusion step first)."""
        if self.isBusy():
            return
        self.ui.engineStatusLabel.text = _("Stopping the local engine ...")
        self.runInBackground(lambda task: self.logic.stopLocalEngine(), self._afterStop)

    def _afterStop(self, task):
        self.ui.engineStatusLabel.text = _("Local engine stopped.") if task.ok else _("Stopping failed.")
        self.updateEngineDependentWidgets()

    def onConnect(self):
        if self.isBusy():
            return
        try:
            url = connection.normalize_url(self.ui.serverUrlComboBox.currentText)
        except XRealError as error:
            self.showError(error)
            return
        token = self.ui.tokenLineEdit.text.strip() or None
        warning = connection.insecure_url_warning(url)
        if warning:
            self.appendLog([warning])
        history = connection.updated_history(
            [self.ui.serverUrlComboBox.itemText(i) for i in range(self.ui.serverUrlComboBox.count)], url)
        setSettingsValue("serverUrlHistory", history)
        setSettingsValue("token", token or "")
        self.ui.serverUrlComboBox.clear()
        self.ui.serverUrlComboBox.addItems(history)
        self.ui.engineStatusLabel.text = _("Connecting to {url} ...").format(url=url)
        self.logic.dropConnection()
        self.updateEngineDependentWidgets()
        self.runInBackground(self.logic.connectRemote, self._afterConnect, url, token)

    def _afterConnect(self, task):
        if not task.ok:
            self.ui.engineStatusLabel.text = _("Not connected.")
            self.showError(task.error)
        else:
            self.ui.engineStatusLabel.text = connection.status_line(self.logic.info, self.logic.engineUrl)
            self.applyModelDefaults()
        self.updateEngineDependentWidgets()

    def applyModelDefaults(self):
        """Model defaults into the parameter node (once per connection), model findings into the lists."""
        if self._parameterNode:
            values = sampling.node_defaults(self.logic.samplingDefaults)  # checked by the policy on connecting
            self._stepsSeen = values["steps"]  # the model's own anatomy steps, not the follow rule's
            with slicer.util.NodeModify(self._parameterNode):  # one Modified event (as wrapper.py uses it)
                for name, value in values.items():
                    setattr(self._parameterNode, name, value)
        self.ui.findingComboBox.clear()
        findings = connection.model_findings(self.logic.info)
        for finding in findings:
            self.ui.findingComboBox.addItem(self.logic.vocabulary.finding_display_name(finding), finding)
        if REMOVE_FINDING not in findings:  # edit mode: inpaint the region without a finding
            self.ui.findingComboBox.addItem(_("No finding (remove, edit mode)"), REMOVE_FINDING)
        destinations, sources = connection.pacs_nodes(self.logic.info)
        self.ui.pushDestinationComboBox.clear()
        self.ui.pushDestinationComboBox.addItem(NO_PUSH, "")
        for name in destinations:
            self.ui.pushDestinationComboBox.addItem(name, name)
        self.ui.pacsSourceComboBox.clear()
        self.ui.pacsSourceComboBox.addItem(NO_SOURCE, "")
        for name in sources:
            self.ui.pacsSourceComboBox.addItem(name, name)
        self.updatePathologySegmentList()

    def updateEngineDependentWidgets(self):
        connected = self.logic.client is not None
        self.ui.generateButton.enabled = connected or (self._runner is not None and self._runner.busy)
        self.ui.blankCanvasButton.enabled = True
        destinations, sources = connection.pacs_nodes(self.logic.info or {})
        for name in ("pushLabel", "pushDestinationComboBox", "sendToPacsButton"):
            getattr(self.ui, name).visible = bool(destinations)
        for name in ("pacsSourceLabel", "pacsSourceComboBox"):
            getattr(self.ui, name).visible = bool(sources)
        self.ui.stopEngineButton.enabled = self.logic.launcher is not None and self.logic.launcher.is_running()

    # ------------------------------------------------------------------ canvas and masks

    def onBlankCanvas(self):
        try:
            volume = self.logic.createBlankCanvas()
            self._parameterNode.canvasVolume = volume
            self._parameterNode.editMode = False
        except Exception as error:
            self.showError(error)

    def onLoadTemplate(self):
        path = self.ui.templateComboBox.currentData
        if not path:
            slicer.util.errorDisplay(_("No anatomy template is installed with this extension."))
            return
        try:
            volume, segmentation = self.logic.createCanvasFromTemplate(Path(path), self.modelFindings())
            self._parameterNode.canvasVolume = volume
            self._parameterNode.segmentation = segmentation
            self._parameterNode.editMode = False
            self.updatePathologySegmentList()
        except Exception as error:
            self.showError(error)

    def modelFindings(self):
        return connection.model_findings(self.logic.info) if self.logic.info else []

    def onCreateSegments(self):
        canvas = self._parameterNode.canvasVolume
        if canvas is None:
            slicer.util.errorDisplay(_("Create or select a canvas first (Canvas section)."))
            return
        try:
            segmentation = self.logic.createSegmentation(canvas, self.modelFindings(),
                                                         withAnatomy=not self._parameterNode.editMode)
            self._parameterNode.segmentation = segmentation
            self.updatePathologySegmentList()
            self.onShowSegmentEditor()
        except Exception as error:
            self.showError(error)

    def onAddPathology(self):
        segmentation = self._parameterNode.segmentation
        if segmentation is None:
            slicer.util.errorDisplay(_("Create the segments first (Create segments)."))
            return
        findings = self.modelFindings()
        try:
            self.logic.addPathologySegment(segmentation, findings[0] if findings else None)
        except Exception as error:
            self.showError(error)
        self.updatePathologySegmentList()

    def onShowSegmentEditor(self):
        if self._parameterNode.segmentation is None or self._parameterNode.canvasVolume is None:
            slicer.util.errorDisplay(_("Select a canvas and a segmentation first."))
            return
        self.logic.showSegmentEditor(self._parameterNode.segmentation, self._parameterNode.canvasVolume)

    def updatePathologySegmentList(self, *args):
        combo = self.ui.pathologySegmentComboBox
        selectedId = combo.currentData
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        segmentation = self.ui.segmentationSelector.currentNode()
        if segmentation is not None:
            for segmentId, name in self.logic.pathologySegments(segmentation):
                combo.addItem(name, segmentId)
        if selectedId and combo.findData(selectedId) >= 0:
            combo.setCurrentIndex(combo.findData(selectedId))
        combo.blockSignals(wasBlocked)
        self.onPathologySegmentSelected()

    def onPathologySegmentSelected(self, *args):
        segmentation = self.ui.segmentationSelector.currentNode()
        segmentId = self.ui.pathologySegmentComboBox.currentData
        if segmentation is None or not segmentId:
            return
        finding = self.logic.segmentFinding(segmentation, segmentId)
        index = self.ui.findingComboBox.findData(finding) if finding else -1
        self.ui.findingComboBox.setCurrentIndex(index)

    def onFindingChosen(self, index):
        segmentation = self.ui.segmentationSelector.currentNode()
        segmentId = self.ui.pathologySegmentComboBox.currentData
        finding = self.ui.findingComboBox.itemData(index)
        if segmentation is None or not segmentId or not finding:
            return
        try:
            self.logic.setSegmentFinding(segmentation, segmentId, finding)
        except Exception as error:
            self.showError(error)
        self.updatePathologySegmentList()

    # ------------------------------------------------------------------ generate

    def onRandomSeed(self):
        self._parameterNode.seed = random.randint(*sampling.node_range("seed"))

    def onGenerateOrCancel(self):
        if self._runner is not None and self._runner.busy:
            self._runner.cancel()
            self.ui.generateButton.enabled = False  # until the engine confirms (updateEngineDependentWidgets)
            self.setStatus(_("Cancelling ..."))
            return
        try:
            jobs = self.prepareJobs()
        except Exception as error:
            self.showError(error)
            return
        self._runner = JobRunner(self.logic.client, describe_engine=self.logic.engineDescription())
        self._runner.start(jobs)
        self.ui.generateButton.text = _("Cancel")
        self.ui.progressBar.value = 0
        self.setStatus(_("Submitting ..."))
        self._timer.start()

    def prepareJobs(self):
        """Read the segments, validate them like the engine does, write the request files: one job per image."""
        parameters = self._parameterNode
        if self.logic.client is None:
            raise XRealError(_("The engine is not connected; press Start engine (Local) or Connect (Remote)."))
        canvas, segmentation = parameters.canvasVolume, parameters.segmentation
        if canvas is None:
            raise XRealError(_("Select or create a canvas first (Canvas section)."))
        if segmentation is None:
            raise XRealError(_("Create the segments first (Masks section)."))
        # the engine's own rules and sentences, before anything is read or written
        resolved = sampling.resolve(self.logic.samplingDefaults, steps=parameters.steps,
                                    anatomy_steps=parameters.anatomySteps, guidance=parameters.guidance)
        self.logic.ensureDicomDatabase()  # results are imported into it; may ask the user, so before the run
        info = self.logic.info
        inputs = build_inputs(
            self.logic.readSegments(segmentation, canvas), self.logic.canvasGeometry(canvas), self.logic.vocabulary,
            list(connection.model_anatomy_labels(info)), connection.model_findings(info), edit_mode=parameters.editMode)
        for warning in inputs.warnings:
            self.appendLog([warning])
        runDir = self.logic.newRunDirectory()
        editImage, editFile, source = None, None, None
        if parameters.editMode:
            source = self.logic.pacsSourceFor(canvas, self.ui.pacsSourceComboBox.currentData)
            if source is None:
                editFile = self.logic.dicomFileOf(canvas)
                editImage = None if editFile else slicer.util.arrayFromVolume(canvas)
        pushTo = self.ui.pushDestinationComboBox.currentData or None

        def requestFor(name, inputsForJob, seed):
            files = write_request_files(inputsForJob, runDir / name, sampling.request_values(resolved, seed),
                                        edit_image=editImage, edit_image_file=editFile)
            files.push_to, files.source = pushTo, source
            return JobSpec(files, runDir / name / "result", name)

        if parameters.interpolate:
            index = self.logic.selectedPathologyIndex(inputs, self.ui.pathologySegmentComboBox.currentText)
            pathNode = self.ui.interpolationPathSelector.currentNode()
            if pathNode is None:
                raise XRealError(_("Choose the path (a markups curve or point list) to move the pathology along."))
            positions = series.positions_along_path(
                series.ras_to_pixel(slicer.util.arrayFromMarkupsControlPoints(pathNode, world=True),
                                    self.logic.rasToIjk(canvas)),
                parameters.interpolationSteps)
            mask, finding, name = inputs.pathologies[index]
            jobs = []
            for number, moved in enumerate(series.interpolated_masks(mask, positions), start=1):
                inputs.pathologies[index] = (moved, finding, name)
                jobs.append(requestFor(f"position-{number:02d}", inputs, parameters.seed))
            return jobs
        return [requestFor(f"seed-{seed}", inputs, seed)
                for seed in series.variation_seeds(parameters.seed, parameters.variations)]

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
            return  # keep showing the local engine's output while it runs
        if (self._task is None or self._task.done) and (self._runner is None or not self._runner.busy) \
                and self._runner_events_empty():
            self._timer.stop()

    def _runner_events_empty(self):
        return self._runner is None or self._runner.events.empty()

    def onJobEvent(self, event):
        if event.state not in FINAL or event.state == DONE:  # a failure or cancel keeps the bar where it stopped
            self.ui.progressBar.value = int(round(100 * event.fraction))
        self.setStatus(event.status_text())
        if event.result is not None:
            parameters = self._parameterNode
            try:
                nodes = self.logic.loadResult(event.result, parameters.canvasVolume if parameters else None,
                                              parameters.segmentation if parameters else None)
                item = qt.QListWidgetItem(f"{event.label or 'result'} ({event.result.provenance.get('model_id', '')})")
                item.setData(qt.Qt.UserRole, nodes["volume"].GetID())
                item.setData(qt.Qt.UserRole + 1, [str(path) for path in event.result.dicom_files])
                item.setData(qt.Qt.UserRole + 2, nodes["segmentation"].GetID())
                item.setData(qt.Qt.UserRole + 3, str(event.result.job.get("id", "")))
                self.ui.resultsListWidget.addItem(item)
                for warning in event.result.warnings:
                    self.appendLog([warning])
                push = event.result.job.get("push")
                if push:
                    self.appendLog([push_summary(push)])
            except Exception as error:
                self.showError(error, _("The result was generated but could not be loaded:"))
        if event.state in FINAL:
            self.ui.generateButton.text = _("Generate")
            if event.state == FAILED:
                slicer.util.errorDisplay(event.message, windowTitle=_("XReal"))
            elif event.state == DONE:
                self.ui.progressBar.value = 100
            self.updateEngineDependentWidgets()

    def onShowResult(self):
        item = self.ui.resultsListWidget.currentItem()
        if item is None:
            return
        volume = slicer.mrmlScene.GetNodeByID(item.data(qt.Qt.UserRole))
        segmentation = slicer.mrmlScene.GetNodeByID(item.data(qt.Qt.UserRole + 2) or "")
        parameters = self._parameterNode
        if volume is not None:
            self.logic.showSideBySide(volume, segmentation, parameters.canvasVolume if parameters else None,
                                      parameters.segmentation if parameters else None)

    def onSendToPacs(self):
        """Send the selected result to the engine's PACS destination (in the background; the engine keeps its copy)."""
        item = self.ui.resultsListWidget.currentItem()
        jobId = item.data(qt.Qt.UserRole + 3) if item is not None else ""
        if not jobId:
            slicer.util.errorDisplay(_("Select a result first."))
            return
        destination = self.ui.pushDestinationComboBox.currentData
        if not destination:
            slicer.util.errorDisplay(_("Choose a PACS destination under Generate first."))
            return
        if self.logic.client is None:
            slicer.util.errorDisplay(_("The engine is not connected; connect it again to send its results."))
            return
        if self.isBusy():
            return
        self.setStatus(_("Sending to {destination} ...").format(destination=destination))
        self.runInBackground(lambda task: self.logic.client.push(jobId, destination), self._afterSend)

    def _afterSend(self, task):
        if not task.ok:
            self.setStatus(_("Sending failed."))
            self.showError(task.error)
            return
        summary = push_summary(task.value.get("push"))
        self.setStatus(summary)
        self.appendLog([summary])

    def onSendWithSlicer(self):
        """Slicer's own DICOM send (the user's configured PACS), for setups without engine destinations."""
        item = self.ui.resultsListWidget.currentItem()
        if item is None:
            slicer.util.errorDisplay(_("Select a result first."))
            return
        import DICOMLib

        self._sendDialog = DICOMLib.DICOMSendDialog(list(item.data(qt.Qt.UserRole + 1)))


class XRealSlicerLogic(ScriptedLoadableModuleLogic):
    """MRML side of the module: canvas, segments, engine connection, loading results."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._vocabulary = None
        self.launcher = None
        self.client = None
        self.info = None
        self.engineUrl = None
        self.engineLog = queue.Queue()
        self.samplingDefaults = sampling.model_defaults()  # the connected model's (XReal's while none is)
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

    # ------------------------------------------------------------------ engine

    def defaultEnvironmentDir(self):
        """The engine's private virtual environment, beside Slicer's user settings."""
        return Path(slicer.app.slicerUserSettingsFilePath).parent / "XRealSlicer" / "engine-venv"

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

    def installRequirements(self, task, python, venvDir):
        """Worker thread, first use: create the private environment if needed, then pip install the requirements.

        The environment is made from a system Python 3.10+, not from PythonSlicer (a launcher: a
        virtual environment made from it cannot find its standard library outside Slicer).
        """
        if not Path(python).exists() and Path(python) == venv_python(venvDir):
            basePython = find_base_python(self.startupEnvironment)
            if basePython is None:
                raise XRealError(_("No Python 3.10 or newer was found on this computer. Install one (python.org), or "
                                   "choose a Python that has the engine's packages as 'Engine Python'."))
            if run_logged(create_venv_command(basePython, venvDir), task.report, self.spawn) != 0:
                raise XRealError(_("Could not create the engine environment in {dir}.").format(dir=venvDir))
            python = str(venv_python(venvDir))
        requirements = enginepath.requirements_path(Path(__file__).parent)
        if run_logged(install_requirements_command(python, requirements), task.report, self.spawn) != 0:
            raise XRealError(_("Installing the engine's requirements failed; the log shows pip's message."))
        if not requirements_installed(python, self.startupEnvironment):
            raise XRealError(_("The engine's requirements are still not importable in {python}.").format(python=python))

    def startLocalEngine(self, task, python, model, dataDir):
        """Worker thread: start the bundled engine and read its info (no MRML/Qt here)."""
        self.stopLocalEngine()
        self.dropConnection()
        launcher = EngineLauncher(python, model, dataDir, spawn=self.spawn)
        self.launcher = launcher
        try:
            url = launcher.start(timeout=300, progress=self.engineLog.put)
            if self.shuttingDown:  # Slicer closed while the engine was starting
                raise XRealError(_("Slicer is closing."))
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
        info = client.info()
        samplingDefaults = sampling.model_defaults(info)  # a bad default refuses the engine with its sentence
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

    def engineDescription(self):
        return _("The local engine") if self.launcher is not None else _("The engine at {url}").format(url=self.engineUrl)

    # ------------------------------------------------------------------ canvas

    def templatePaths(self):
        directory = enginepath.templates_dir(Path(__file__).parent)
        if directory is None:
            return []
        return sorted(p for p in directory.glob("anatomy*.png"))

    def modelGeometry(self):
        return connection.model_geometry(self.info or {})

    def createBlankCanvas(self, name="XReal canvas"):
        size, fov = self.modelGeometry()
        pixels, spacing = blank_canvas(size, size, fov)
        volume = slicer.util.addVolumeFromArray(pixels, ijkToRAS=canvas_ijk_to_ras(spacing), name=name)
        self.showVolume(volume)
        return volume

    def createCanvasFromTemplate(self, path, findings):
        labels, spacingRowColumn = read_template(path)
        rows, columns = labels.shape
        _size, fov = self.modelGeometry()
        if spacingRowColumn is None:
            spacing = (fov / max(rows, columns),) * 2 + (1.0,)
        else:
            spacing = (spacingRowColumn[1], spacingRowColumn[0], 1.0)
        volume = slicer.util.addVolumeFromArray(np.zeros((1, rows, columns), np.float32),
                                                ijkToRAS=canvas_ijk_to_ras(spacing), name=f"XReal canvas {path.stem}")
        segmentation = None
        try:
            segmentation = self.createSegmentation(volume, findings, withAnatomy=True)
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

    def canvasGeometry(self, volume):
        return CanvasGeometry(tuple(slicer.util.arrayFromVolume(volume).shape), tuple(volume.GetSpacing()),
                              volume.GetName())

    def rasToIjk(self, volume):
        matrix = vtk.vtkMatrix4x4()
        volume.GetRASToIJKMatrix(matrix)
        return slicer.util.arrayFromVTKMatrix(matrix)

    def showVolume(self, volume, segmentation=None):
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:  # no main window (e.g. --no-main-window tests)
            return
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpRedSliceView)
        slicer.util.setSliceViewerLayers(background=volume, fit=True)

    def showSideBySide(self, resultVolume, resultSegmentation, canvas=None, canvasSegmentation=None):
        """Result (SC with its SEG) in Red, the canvas with the drawn masks in Yellow, both axial and fitted."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        if canvas is None:
            self.showVolume(resultVolume)
            return
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        for viewName, volume, segmentation in (("Red", resultVolume, resultSegmentation),
                                               ("Yellow", canvas, canvasSegmentation)):
            sliceWidget = layoutManager.sliceWidget(viewName)
            if sliceWidget is None:
                continue
            sliceNode = sliceWidget.mrmlSliceNode()
            sliceNode.SetOrientationToAxial()
            sliceWidget.sliceLogic().GetSliceCompositeNode().SetBackgroundVolumeID(volume.GetID())
            displayNode = segmentation.GetDisplayNode() if segmentation is not None else None
            if displayNode is not None:  # each segmentation only over its own image
                displayNode.RemoveAllViewNodeIDs()
                displayNode.AddViewNodeID(sliceNode.GetID())
            sliceWidget.sliceLogic().FitSliceToAll()

    # ------------------------------------------------------------------ segments

    def createSegmentation(self, canvas, findings, withAnatomy=True):
        """One click: anatomy segments (the model's labels) + one pathology segment, named, coloured, coded."""
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{canvas.GetName()} masks")
        try:
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(canvas)
            labels = list(connection.model_anatomy_labels(self.info)) if self.info else None
            if withAnatomy:
                for template in self.vocabulary.anatomy_templates(labels):
                    self._addSegment(segmentation, template.name, template.color, template.terminology)
            self.addPathologySegment(segmentation, findings[0] if findings else None)
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

    def addPathologySegment(self, segmentation, finding):
        existing = [name for _id, name in self.pathologySegments(segmentation)]
        name = "Pathology" if not existing else f"Pathology {len(existing) + 1}"
        if finding:
            template = self.vocabulary.finding_template(finding, name)
            return self._addSegment(segmentation, name, template.color, template.terminology)
        return self._addSegment(segmentation, name, (1.0, 0.8, 0.0), "")

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

    def pathologySegments(self, segmentation):
        """Segments that are not anatomy: pathologies and segments still waiting for a finding."""
        result = []
        for segmentId, name, terminology in self.segments(segmentation):
            meaning = self.vocabulary.classify(name, terminology)
            if meaning is None or meaning.kind == PATHOLOGY:
                result.append((segmentId, name))
        return result

    def segmentFinding(self, segmentation, segmentId):
        for otherId, name, terminology in self.segments(segmentation):
            if otherId == segmentId:
                meaning = self.vocabulary.classify(name, terminology)
                return meaning.finding if meaning is not None and meaning.kind == PATHOLOGY else None
        return None

    def setSegmentFinding(self, segmentation, segmentId, finding):
        """The finding is stored as the segment's terminology (and colour), so it survives renaming and saving."""
        segment = segmentation.GetSegmentation().GetSegment(segmentId)
        template = self.vocabulary.finding_template(finding, segment.GetName())
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), template.terminology)
        segment.SetColor(*template.color)

    def readSegments(self, segmentation, canvas):
        """Every segment as an array on the canvas grid (per segment, so overlaps are kept)."""
        inputs = []
        for segmentId, name, terminology in self.segments(segmentation):
            array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, canvas)
            inputs.append(SegmentInput(name, array, terminology))
        return inputs

    def selectedPathologyIndex(self, inputs, segmentName):
        names = [name for _mask, _finding, name in inputs.pathologies]
        if not names:
            raise XRealError(_("Paint a pathology segment to interpolate first."))
        return names.index(segmentName) if segmentName in names else 0

    def showSegmentEditor(self, segmentation, canvas):
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.util.getModuleWidget("SegmentEditor").editor
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(canvas)
        if segmentation.GetDisplayNode() is not None:  # visible in every view again (side-by-side limits it)
            segmentation.GetDisplayNode().RemoveAllViewNodeIDs()
        self.showVolume(canvas)

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
                               "choose '{none}'.").format(none=NO_SOURCE))
        database = slicer.dicomDatabase
        return {"source": sourceName, "study": database.instanceValue(uids[0], "0020,000D"),
                "series": database.instanceValue(uids[0], "0020,000E"), "instance": uids[0]}

    # ------------------------------------------------------------------ results

    def newRunDirectory(self):
        directory = Path(slicer.app.temporaryPath) / "XRealSlicer" / "runs" / time.strftime("%Y%m%d-%H%M%S")
        suffix = 0
        while directory.exists():
            suffix += 1
            directory = directory.with_name(directory.name.split("_")[0] + f"_{suffix}")
        directory.mkdir(parents=True)
        return directory

    def ensureDicomDatabase(self):
        if slicer.dicomDatabase and slicer.dicomDatabase.isOpen:
            return
        import DICOM

        if not DICOM.DICOMFileDialog.createDefaultDatabase():
            raise XRealError(_("No DICOM database is available; open the DICOM module and create one."))

    def hasSegLoader(self):
        return "DICOMSegmentationPlugin" in slicer.modules.dicomPlugins

    def loadResult(self, result, canvas=None, canvasSegmentation=None):
        """Import SC + SEG into the DICOM database and load them; SEG over SC. On failure the scene is unchanged."""
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
            uids = result.series_uids if useSeg else [result.sc_series_uid]
            loadedIds = list(DICOMUtils.loadSeriesByUID(uids) or [])
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
            self.showSideBySide(volume, segmentation, canvas, canvasSegmentation)
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
    """Inside Slicer: template canvas, filled segments, a 2-step generation on the local engine, result loaded.

    The engine's Python is taken from XREALSLICER_ENGINE_PYTHON (CI) or the module setting; the model from
    XREALSLICER_TEST_MODEL (a tiny model directory) or the shipped demo model.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_XRealSlicer_generate_from_template()

    def test_XRealSlicer_generate_from_template(self):
        from DICOMLib import DICOMUtils

        logic = XRealSlicerLogic()
        python = os.environ.get("XREALSLICER_ENGINE_PYTHON") or settingsValue("enginePython", "") \
            or str(venv_python(logic.defaultEnvironmentDir()))
        model = os.environ.get("XREALSLICER_TEST_MODEL", "demo")
        logic.prepareSpawn()
        if not requirements_installed(python, logic.startupEnvironment):
            self.skipTest(f"no engine Python with the engine's packages at {python}; set XREALSLICER_ENGINE_PYTHON")
        self.delayDisplay("Starting the local engine")
        logic.startLocalEngine(None, python, model, logic.dataDirectory())
        try:
            with DICOMUtils.TemporaryDICOMDatabase():  # results go into a temporary database, never the user's
                self._generateAndLoad(logic)
        finally:
            logic.stopLocalEngine()

    def _generateAndLoad(self, logic):
        findings = connection.model_findings(logic.info)
        templates = logic.templatePaths()
        self.assertTrue(templates, "no anatomy template is installed")
        volume, segmentation = logic.createCanvasFromTemplate(templates[0], findings)
        names = [name for _id, name, _term in logic.segments(segmentation)]
        self.assertIn("Heart", names)
        self.assertIn("Pathology", names)

        # paint the pathology: a disc inside the heart (overlap on purpose)
        heartId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Heart")
        heart = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, heartId, volume)
        self.assertGreater(int(heart.sum()), 0, "the template has no heart")
        centre = np.argwhere(heart[0]).mean(axis=0)
        rows, columns = np.ogrid[: heart.shape[1], : heart.shape[2]]
        disc = ((rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= 8**2).astype(np.uint8)[np.newaxis]
        pathologyId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Pathology")
        slicer.util.updateSegmentBinaryLabelmapFromArray(disc, segmentation, pathologyId, volume)

        inputs = build_inputs(logic.readSegments(segmentation, volume), logic.canvasGeometry(volume),
                              logic.vocabulary, list(connection.model_anatomy_labels(logic.info)), findings)
        self.assertEqual(len(inputs.pathologies), 1)
        runDir = logic.newRunDirectory()
        values = sampling.request_values(sampling.resolve(logic.samplingDefaults, steps=2, anatomy_steps=1), seed=0)
        files = write_request_files(inputs, runDir / "request", values)
        runner = JobRunner(logic.client, poll_interval=0.2)
        runner.start([JobSpec(files, runDir / "result", "self-test")])
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
        self.assertEqual(len(loadedNames), len(inputs.pathologies) + len(np.unique(inputs.anatomy)) - 1)
        # SEG and SC overlap: the loaded heart, read on the SC grid, is the heart that was drawn
        loadedHeart = slicer.util.arrayFromSegmentBinaryLabelmap(
            seg, seg.GetSegmentation().GetSegmentIdBySegmentName("Heart"), sc)
        self.assertEqual(loadedHeart.shape, scArray.shape)
        overlap = np.logical_and(loadedHeart[0] > 0, inputs.anatomy == 3).sum() / max(1, (inputs.anatomy == 3).sum())
        self.assertGreater(overlap, 0.95)

        # the fallback reader (Slicer without a DICOM-SEG loader) rebuilds the same segments on the same pixels
        fallback = logic.loadFallbackSegments(result, sc)
        self.assertEqual(sorted(name for _id, name, _t in logic.segments(fallback)), sorted(loadedNames))
        fallbackHeart = slicer.util.arrayFromSegmentBinaryLabelmap(
            fallback, fallback.GetSegmentation().GetSegmentIdBySegmentName("Heart"), sc)
        self.assertTrue(np.array_equal(fallbackHeart > 0, loadedHeart > 0))
        self.delayDisplay("Test passed")
