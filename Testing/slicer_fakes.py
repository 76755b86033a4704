"""Stand-ins for the parts of Slicer, Qt and VTK that XRealSlicer.py touches, so that its widget and logic code
runs under pytest (Slicer itself cannot run here; the module's self-test runs the same flows in Slicer).

They are deliberately strict: a widget or method the module uses that is not modelled here raises
AttributeError, so a typo in XRealSlicer.py fails the smoke test instead of passing silently. ``tr`` (the
module's ``_``) fails when called off the main thread (Slicer's is PythonQt's ``slicer.app.translate``).
What they cannot show: Qt/MRML behaviour itself (rendering, the Segment Editor's effects, DICOM loading).
"""

from __future__ import annotations

import contextlib
import threading
import types
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------- Qt


class Signals:
    def __init__(self):
        self._slots = {}
        self._blocked = False

    def connect(self, signal, slot):
        self._slots.setdefault(signal, []).append(slot)

    def emit(self, signal, *args):
        if self._blocked:  # QObject.blockSignals
            return
        for slot in self._slots.get(signal, []):
            slot(*args)


class FakeWidget(Signals):
    """Any widget of the .ui: the properties and methods the module uses (strict: nothing else)."""

    def __init__(self, name, cls):
        super().__init__()
        self.name, self.cls = name, cls
        self.text, self.checked, self.enabled, self.visible = "", False, True, True
        self.currentPath, self.placeholderText, self.nodeTypes, self.value = "", "", [], 0
        self._items, self.currentIndex, self._node, self.currentRow = [], -1, None, -1
        self.log = []
        # qMRMLSegmentEditorWidget
        self._segmentation = self._source = None
        self._segmentId = ""
        self.editorNode = self.scene = None

    # combo boxes and list widgets
    @property
    def count(self):
        return len(self._items)

    @property
    def currentData(self):
        return self._items[self.currentIndex][1] if 0 <= self.currentIndex < len(self._items) else None

    @property
    def currentText(self):
        return self._items[self.currentIndex][0] if 0 <= self.currentIndex < len(self._items) else self.text

    def addItem(self, text, data=None):
        if isinstance(text, QListWidgetItem):  # QListWidget.addItem(item)
            text, data = text.text(), text
        self._items.append((text, data))
        if self.currentIndex < 0:
            self.setCurrentIndex(0)  # QComboBox selects its first item, and says so

    def addItems(self, texts):
        for text in texts:
            self.addItem(text)

    def clear(self):
        self._items, self.currentRow = [], -1
        self.setCurrentIndex(-1)

    def findData(self, data):
        return next((i for i, (_t, d) in enumerate(self._items) if d == data), -1)

    def itemData(self, index):
        return self._items[index][1]

    def itemText(self, index):
        return self._items[index][0]

    def item(self, index):
        return self._items[index][1]

    def setCurrentIndex(self, index):
        changed, self.currentIndex = index != self.currentIndex, index
        if changed:
            self.emit("currentIndexChanged(int)", index)

    def choose(self, data):
        """The user picks the item with ``data`` (tests only): Qt emits currentIndexChanged."""
        self.setCurrentIndex(self.findData(data))

    def setCurrentRow(self, row):
        self.currentRow = row
        self.emit("currentRowChanged(int)", row)

    def blockSignals(self, block):
        was, self._blocked = self._blocked, bool(block)
        return was

    def setRange(self, low, high):
        self.range = (low, high)

    def appendPlainText(self, line):
        self.log.append(line)

    def setMRMLScene(self, scene):
        self.scene = scene

    def currentNode(self):
        return self._node

    # qMRMLSegmentEditorWidget
    def setMRMLSegmentEditorNode(self, node):
        self.editorNode = node

    def setSegmentationNodeSelectorVisible(self, visible):
        pass

    def setSourceVolumeNodeSelectorVisible(self, visible):
        pass

    def segmentationNodeID(self):
        return self._segmentation.GetID() if self._segmentation else ""

    def sourceVolumeNodeID(self):
        return self._source.GetID() if self._source else ""

    def setSegmentationNode(self, node):
        self._segmentation = node

    def setSourceVolumeNode(self, node):
        self._source = node

    def currentSegmentID(self):
        return self._segmentId

    def setCurrentSegmentID(self, segmentId):
        self._segmentId = segmentId
        self.emit("currentSegmentIDChanged(QString)", segmentId)

    def installKeyboardShortcuts(self):
        pass

    def uninstallKeyboardShortcuts(self):
        pass

    def removeViewObservations(self):
        pass

    def setActiveEffect(self, effect):
        pass

    def updateWidgetFromMRML(self):
        pass


class QListWidgetItem:
    def __init__(self, text):
        self._text, self.tip = text, ""

    def text(self):
        return self._text

    def setToolTip(self, tip):
        self.tip = tip


class QTimer(Signals):
    running = []  # the started timers: slicer.app.processEvents() fires them once

    def setInterval(self, ms):
        pass

    def start(self):
        self.active = True
        if self not in QTimer.running:
            QTimer.running.append(self)

    @staticmethod
    def fire():
        for timer in list(QTimer.running):
            if getattr(timer, "active", False):
                timer.emit("timeout()")

    def stop(self):
        self.active = False

    @staticmethod
    def singleShot(ms, function):
        function()


class QSettings:
    store = {}

    def setValue(self, key, value):
        QSettings.store[key] = value

    def value(self, key):
        return QSettings.store.get(key)

    def contains(self, key):
        return key in QSettings.store

    def remove(self, key):
        QSettings.store.pop(key, None)


# ----------------------------------------------------------------------------- VTK and MRML


class Observable:
    def __init__(self):
        self._observers = []

    def notify(self):
        for callback in list(self._observers):
            callback(self, "ModifiedEvent")


class Matrix:
    def __init__(self):
        self.array = np.eye(4)


class Mutable:
    def __init__(self, value):
        self.value = value

    def __str__(self):
        return str(self.value)


class Node(Observable):
    counter = 0

    def __init__(self, cls, name=""):
        super().__init__()
        Node.counter += 1
        self.cls, self.name, self.id = cls, name, f"{cls}{Node.counter}"
        self.attributes = {}

    def GetID(self):
        return self.id

    def GetName(self):
        return self.name

    def IsA(self, cls):
        return cls in self.classes

    @property
    def classes(self):
        return {self.cls}

    def GetAttribute(self, name):
        return self.attributes.get(name)

    def SetAttribute(self, name, value):
        self.attributes[name] = value

    def UnRegister(self, other):
        pass

    def SetSingletonTag(self, tag):
        self.singleton = tag


class Volume(Node):
    MRML_CLASS = "vtkMRMLScalarVolumeNode"  # the class name a parameter-node annotation stands for

    def __init__(self, array, ijk_to_ras, name, cls="vtkMRMLScalarVolumeNode"):
        super().__init__(cls, name)
        self.array = np.asarray(array)
        self.ijk_to_ras = np.eye(4) if ijk_to_ras is None else np.asarray(ijk_to_ras, dtype=float)

    @property
    def classes(self):
        return {self.cls, "vtkMRMLScalarVolumeNode"}

    def GetSpacing(self):
        return tuple(float(abs(self.ijk_to_ras[i, i])) for i in range(3))

    def GetIJKToRASMatrix(self, matrix):
        matrix.array = self.ijk_to_ras.copy()

    def GetRASToIJKMatrix(self, matrix):
        matrix.array = np.linalg.inv(self.ijk_to_ras)


class Segment:
    def __init__(self, name, color):
        self.name, self.color, self.tags = name, color, {}

    def GetName(self):
        return self.name

    def SetName(self, name):
        self.name = name

    def SetColor(self, *color):
        self.color = color

    def SetTag(self, name, value):
        self.tags[name] = value

    def GetTag(self, name, out):
        if name in self.tags:
            out.value = self.tags[name]
            return True
        return False


class Segmentation:
    def __init__(self):
        self.order, self.by_id, self.counter = [], {}, 0

    def AddEmptySegment(self, segment_id, name, color):
        self.counter += 1
        segment_id = segment_id or f"Segment_{self.counter}"
        self.order.append(segment_id)
        self.by_id[segment_id] = Segment(name, color)
        return segment_id

    def GetSegment(self, segment_id):
        return self.by_id.get(segment_id)

    def GetNumberOfSegments(self):
        return len(self.order)

    def GetNthSegmentID(self, index):
        return self.order[index]

    def GetSegmentIdBySegmentName(self, name):
        return next((i for i in self.order if self.by_id[i].name == name), "")


class DisplayNode:
    def __init__(self):
        self.visible, self.views, self.hidden_segments = True, [], set()

    def SetSegmentVisibility(self, segment_id, visible):
        (self.hidden_segments.discard if visible else self.hidden_segments.add)(segment_id)

    def GetSegmentVisibility(self, segment_id):
        return segment_id not in self.hidden_segments

    def SetVisibility(self, visible):
        self.visible = bool(visible)

    def GetVisibility(self):
        return self.visible

    def RemoveAllViewNodeIDs(self):
        self.views = []

    def AddViewNodeID(self, view):
        self.views.append(view)


class VectorVolume(Volume):
    MRML_CLASS = "vtkMRMLVectorVolumeNode"


class SegmentationNode(Node):
    MRML_CLASS = "vtkMRMLSegmentationNode"

    def __init__(self, name=""):
        super().__init__("vtkMRMLSegmentationNode", name)
        self.segmentation, self.masks, self.display = Segmentation(), {}, None
        self.reference = None

    def GetSegmentation(self):
        return self.segmentation

    def CreateDefaultDisplayNodes(self):
        self.display = DisplayNode()

    def GetDisplayNode(self):
        return self.display

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volume):
        self.reference = volume

    def SetDisplayVisibility(self, visible):
        self.display.visible = bool(visible)


class Scene(Observable):
    StartCloseEvent, EndCloseEvent = "StartCloseEvent", "EndCloseEvent"

    def __init__(self):
        super().__init__()
        self.nodes, self.singletons = {}, {}

    def add(self, node):
        self.nodes[node.GetID()] = node
        return node

    def GetNodeByID(self, node_id):
        return self.nodes.get(node_id)

    def AddNewNodeByClass(self, cls, name=""):
        assert cls == "vtkMRMLSegmentationNode", cls
        return self.add(SegmentationNode(name))

    def GetSingletonNode(self, tag, cls):
        return self.singletons.get((tag, cls))

    def CreateNodeByClass(self, cls):
        return Node(cls)

    def AddNode(self, node):
        self.singletons[(getattr(node, "singleton", None), node.cls)] = node
        return self.add(node)

    def RemoveNode(self, node):
        self.nodes.pop(node.GetID(), None)


class SliceWidget:
    def __init__(self, name, manager):
        self.node = Node("vtkMRMLSliceNode", name)
        self.node.id = "vtkMRMLSliceNode" + name
        self.node.SetOrientationToAxial = lambda: None
        self.manager = manager
        composite = types.SimpleNamespace(SetBackgroundVolumeID=lambda node_id: manager.backgrounds.__setitem__(
            name, node_id))
        self.logic = types.SimpleNamespace(GetSliceCompositeNode=lambda: composite, FitSliceToAll=lambda: None)

    def mrmlSliceNode(self):
        return self.node

    def sliceLogic(self):
        return self.logic


class LayoutManager:
    def __init__(self):
        self.layout, self.backgrounds = None, {}
        self.widgets = {name: SliceWidget(name, self) for name in ("Red", "Yellow", "Green")}

    def setLayout(self, layout):
        self.layout = layout

    def sliceWidget(self, name):
        return self.widgets.get(name)


# ----------------------------------------------------------------------------- the fake modules


class Recorder:
    def __init__(self):
        self.errors, self.infos, self.questions, self.answer = [], [], [], True


def _ui_widgets(ui_file: Path):
    root = ET.parse(ui_file).getroot()
    widgets = {}
    for element in root.iter("widget"):
        widget = widgets[element.get("name")] = FakeWidget(element.get("name"), element.get("class"))
        bound = element.find("./property[@name='SlicerParameterName']/string")
        widget.parameterName = bound.text if bound is not None else None
    return widgets


def install(monkeypatch, tmp_path: Path, module_dir: Path):
    """Put fake ``slicer``, ``qt``, ``vtk``, ``DICOMLib``, ``DICOM`` and ``SampleData`` into sys.modules."""
    import sys

    recorder = Recorder()
    scene = Scene()
    layout = LayoutManager()
    widgets = {}

    def tr(text):
        assert threading.current_thread() is threading.main_thread(), f"translated off the main thread: {text!r}"
        return text

    @contextlib.contextmanager
    def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as error:
            recorder.errors.append(f"{message}\n\n{error}")
            raise

    @contextlib.contextmanager
    def NodeModify(wrapper):
        node = wrapper._node
        node.modifying += 1
        try:
            yield
        finally:
            node.modifying -= 1
            node.notify()

    def settingsValue(key, default, converter=lambda v: v, settings=None):
        return converter(QSettings.store[key]) if key in QSettings.store else default

    def addVolumeFromArray(array, ijkToRAS=None, name=None, nodeClassName=None):
        return scene.add(Volume(array, ijkToRAS, name or "volume"))

    def arrayFromSegmentBinaryLabelmap(segmentation, segment_id, reference):
        mask = segmentation.masks.get(segment_id)
        return mask.copy() if mask is not None else np.zeros(reference.array.shape[:3], np.uint8)

    def updateSegmentBinaryLabelmapFromArray(array, segmentation, segment_id, reference):
        assert segmentation.segmentation.GetSegment(segment_id) is not None
        segmentation.masks[segment_id] = np.asarray(array).astype(np.uint8)

    util = types.SimpleNamespace(
        loadUI=lambda path: FakeWidget("XRealSlicer", "qMRMLWidget") if Path(path).is_file() else 1 / 0,
        childWidgetVariables=lambda root: types.SimpleNamespace(**widgets),
        settingsValue=settingsValue, toBool=lambda v: v in (True, 1, "1", "true", "True"),
        errorDisplay=lambda text, **kw: recorder.errors.append(text),
        infoDisplay=lambda text, **kw: recorder.infos.append(text),
        confirmYesNoDisplay=lambda text, **kw: recorder.questions.append(text) or recorder.answer,
        showStatusMessage=lambda text, ms=0: None, tryWithErrorDisplay=tryWithErrorDisplay, NodeModify=NodeModify,
        addVolumeFromArray=addVolumeFromArray, arrayFromVolume=lambda volume: volume.array,
        arrayFromSegmentBinaryLabelmap=arrayFromSegmentBinaryLabelmap,
        updateSegmentBinaryLabelmapFromArray=updateSegmentBinaryLabelmapFromArray,
        arrayFromVTKMatrix=lambda matrix: matrix.array.copy(), setSliceViewerLayers=lambda **kw: None,
        startupEnvironment=lambda: {"PATH": "/usr/bin:/bin"}, selectModule=lambda name: None,
        arrayFromMarkupsControlPoints=lambda node, world=False: node.points,
    )
    util.VTKObservationMixin = VTKObservationMixin
    app = types.SimpleNamespace(temporaryPath=str(tmp_path / "slicer-temp"), connect=lambda *a: None,
                                slicerUserSettingsFilePath=str(tmp_path / "settings" / "Slicer.ini"),
                                layoutManager=lambda: layout, processEvents=QTimer.fire,
                                testingEnabled=lambda: True)
    database = types.SimpleNamespace(isOpen=True, instanceValue=lambda uid, tag: scene.series_of.get(uid),
                                     fileForInstance=lambda uid: None)
    scene.series_of = {}
    slicer = types.ModuleType("slicer")
    slicer.__path__ = []
    slicer.app, slicer.mrmlScene, slicer.util, slicer.dicomDatabase = app, scene, util, database
    slicer.modules = types.SimpleNamespace(dicomPlugins={})
    slicer.vtkSegment = types.SimpleNamespace(GetTerminologyEntryTagName=lambda: "TerminologyEntry")
    slicer.vtkMRMLLayoutNode = types.SimpleNamespace(SlicerLayoutOneUpRedSliceView=6, SlicerLayoutSideBySideView=29)
    slicer.vtkMRMLScalarVolumeNode, slicer.vtkMRMLSegmentationNode = Volume, SegmentationNode
    slicer.vtkMRMLVectorVolumeNode = VectorVolume
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = tr
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.WithinRange = WithinRange
    wrapper.parameterNodeWrapper = parameterNodeWrapper
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModule = ScriptedLoadableModule
    scripted.ScriptedLoadableModuleWidget = lambda *a: None  # replaced below (needs module_dir)
    scripted.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    scripted.ScriptedLoadableModuleTest = SelfTest

    class Widget:
        def __init__(self, parent=None):
            self.parent = types.SimpleNamespace(isEntered=True)
            self.layout = types.SimpleNamespace(addWidget=lambda widget: None)

        def setup(self):
            pass

        def resourcePath(self, relative):
            return str(module_dir / "Resources" / relative)

    scripted.ScriptedLoadableModuleWidget = Widget
    util_module = types.ModuleType("slicer.util")
    util_module.VTKObservationMixin = VTKObservationMixin
    for name, value in vars(util).items():
        setattr(util_module, name, value)
    slicer.util = util_module

    qt = types.ModuleType("qt")
    qt.QTimer, qt.QSettings, qt.QListWidgetItem = QTimer, QSettings, QListWidgetItem
    vtk = types.ModuleType("vtk")
    vtk.vtkCommand = types.SimpleNamespace(ModifiedEvent="ModifiedEvent")
    vtk.vtkMatrix4x4, vtk.mutable = Matrix, Mutable

    dicomlib = types.ModuleType("DICOMLib")
    dicomlib.__path__ = []
    dicom_utils = types.ModuleType("DICOMLib.DICOMUtils")

    def importDicom(directory, dicomDatabase=None, copyFiles=False):
        import pydicom

        for path in Path(directory).glob("*.dcm"):
            scene.dicom_files[str(pydicom.dcmread(str(path), stop_before_pixels=True).SeriesInstanceUID)] = path
        return True

    scene.dicom_files = {}
    dicom_utils.importDicom = importDicom
    dicom_utils.TemporaryDICOMDatabase = contextlib.nullcontext  # the fake database is temporary already
    dicom_utils.loadSeriesByUID = lambda uids: [_load_sc(scene, uid) for uid in uids]
    dicomlib.DICOMUtils = dicom_utils
    dicomlib.DICOMSendDialog = lambda files: recorder.infos.append(("send", files))

    QSettings.store = {}
    QTimer.running = []
    ScriptedLoadableModuleLogic._store = None
    for name, module in (("slicer", slicer), ("slicer.i18n", i18n), ("slicer.parameterNodeWrapper", wrapper),
                         ("slicer.ScriptedLoadableModule", scripted), ("slicer.util", util_module), ("qt", qt),
                         ("vtk", vtk), ("DICOMLib", dicomlib), ("DICOMLib.DICOMUtils", dicom_utils)):
        monkeypatch.setitem(sys.modules, name, module)
    widgets.update(_ui_widgets(module_dir / "Resources" / "UI" / "XRealSlicer.ui"))
    return types.SimpleNamespace(recorder=recorder, scene=scene, layout=layout, widgets=widgets, slicer=slicer)


def _load_sc(scene, series_uid):
    """DICOMUtils.loadSeriesByUID for the SC of a result: its pixels as a one-slice volume."""
    import pydicom

    path = scene.dicom_files[series_uid]
    dataset = pydicom.dcmread(str(path))
    spacing = [float(v) for v in dataset.PixelSpacing]
    volume = Volume(dataset.pixel_array[np.newaxis].astype(np.float32),
                    np.diag([-spacing[1], -spacing[0], 1.0, 1.0]), f"SC {series_uid[-6:]}")
    volume.attributes["DICOM.instanceUIDs"] = str(dataset.SOPInstanceUID)
    scene.series_of[str(dataset.SOPInstanceUID)] = series_uid
    return scene.add(volume).GetID()


class VTKObservationMixin:
    def __init__(self):
        self._observed = []

    def addObserver(self, obj, event, callback):
        target = getattr(obj, "_node", obj)
        target._observers.append(callback)
        self._observed.append((target, callback))

    def hasObserver(self, obj, event, callback):
        return callback in getattr(obj, "_node", obj)._observers

    def removeObserver(self, obj, event, callback):
        getattr(obj, "_node", obj)._observers.remove(callback)

    def removeObservers(self):
        for target, callback in self._observed:
            if callback in target._observers:
                target._observers.remove(callback)
        self._observed = []


class WithinRange:
    def __init__(self, low, high):
        self.low, self.high = low, high


class ParameterStore(Observable):
    def __init__(self):
        super().__init__()
        self.values, self.modifying = {}, 0

    def notify(self):
        if not self.modifying:
            super().notify()


def parameterNodeWrapper(cls):
    """Fields from the class's annotations, stored on the wrapped node; range-checked; Modified on each change."""
    import typing

    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {name: getattr(cls, name, None) for name in hints}

    class Wrapped:
        def __init__(self, node):
            object.__setattr__(self, "_node", node)
            for name, value in defaults.items():
                node.values.setdefault(name, value)

        def __getattr__(self, name):
            values = object.__getattribute__(self, "_node").values
            if name not in values:
                raise AttributeError(name)
            return values[name]

        def __setattr__(self, name, value):
            assert name in hints, f"{name} is not a field of the parameter node"
            for meta in getattr(hints[name], "__metadata__", ()):
                if isinstance(meta, WithinRange):
                    assert meta.low <= value <= meta.high, f"{name}={value} outside {meta.low}..{meta.high}"
            self._node.values[name] = value
            self._node.notify()

        def connectGui(self, ui):
            """As Slicer's qMRMLNodeComboBoxToNodeConnector: a node field's combo box gets the annotation's
            node types (a Union: each of them), replacing what the module or the .ui set."""
            for widget in vars(ui).values():
                field = getattr(widget, "parameterName", None)
                if field in hints and widget.cls == "qMRMLNodeComboBox":
                    types_ = typing.get_args(hints[field]) or (hints[field],)
                    widget.nodeTypes = [t.MRML_CLASS for t in types_ if hasattr(t, "MRML_CLASS")]
            return "tag"

        def disconnectGui(self, tag):
            pass

    Wrapped.__name__ = cls.__name__
    return Wrapped


class SelfTest(unittest.TestCase):
    """ScriptedLoadableModuleTest: a unittest.TestCase with delayDisplay (Base/Python/slicer/ScriptedLoadableModule.py)."""

    def delayDisplay(self, message, msec=None):
        pass


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class ScriptedLoadableModuleLogic:
    _store = None

    def __init__(self):
        pass

    def getParameterNode(self):
        if ScriptedLoadableModuleLogic._store is None:
            ScriptedLoadableModuleLogic._store = ParameterStore()
        return ScriptedLoadableModuleLogic._store
