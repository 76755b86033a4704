"""Draw the XReal module's panel from its Qt Designer file, for docs/tutorial.md (maintainers only).

Slicer cannot run on the machine the tutorial was written on, so the pictures are not screenshots of
Slicer: this script loads ``XRealSlicer/Resources/UI/XRealSlicer.ui`` with PyQt5 (Qt's own .ui loader,
offscreen), with Slicer's custom widgets replaced by the nearest plain Qt widget (ctkCollapsibleButton ->
a group box, qMRMLNodeComboBox -> a combo box, ctkPathLineEdit -> a line edit). Slicer's embedded Segment
Editor is not available outside Slicer; it is drawn as a frame holding the segment list the module creates
(names and colours from the engine's vocabulary). The values shown are what the module would show: sampler
and finding lists, control states, the results list and its provenance / quality lines all come from
XRealSlicerLib, the results from the committed example result (XRealSlicer/Resources/Testing/Result).

    python3 -m venv /tmp/qt && /tmp/qt/bin/pip install PyQt5 numpy SimpleITK
    /tmp/qt/bin/python docs/images/render_panel.py docs/images
"""

from __future__ import annotations

import io
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "XRealSlicer"))

from PyQt5 import QtCore, QtGui, QtWidgets, uic  # noqa: E402

from XRealSlicerLib import connection, controls, parameters, planning, results  # noqa: E402
from XRealSlicerLib.enginepath import find_engine_root  # noqa: E402
from XRealSlicerLib.testing import replay_info  # noqa: E402
from XRealSlicerLib.vocabulary import Vocabulary  # noqa: E402

UI_FILE = REPO / "XRealSlicer" / "Resources" / "UI" / "XRealSlicer.ui"
REPLACE = {"qMRMLWidget": "QWidget", "ctkCollapsibleButton": "QGroupBox", "qMRMLNodeComboBox": "QComboBox",
           "ctkPathLineEdit": "QLineEdit", "qMRMLSegmentEditorWidget": "QFrame"}
KEEP = {"text", "toolTip", "checked", "wordWrap", "placeholderText", "echoMode", "readOnly", "editable",
        "orientation", "minimum", "maximum", "singleStep", "value", "minimumHeight", "maximumBlockCount"}


def plain_ui() -> bytes:
    tree = ET.parse(UI_FILE)
    root = tree.getroot()
    for widget in root.iter("widget"):
        original = widget.get("class")
        widget.set("class", REPLACE.get(original, original))
        for prop in list(widget.findall("property")):
            name = prop.get("name")
            if prop.get("stdset") == "0" or name not in KEEP:
                widget.remove(prop)
            elif original == "ctkCollapsibleButton" and name == "text":
                prop.set("name", "title")
    custom = root.find("customwidgets")
    if custom is not None:
        root.remove(custom)
    connections = root.find("connections")
    if connections is not None:
        root.remove(connections)
    return ET.tostring(root, encoding="utf-8")


def control_widgets() -> dict:
    """The module's CONTROL_WIDGETS (XRealSlicer.py needs Slicer to import: read from its source)."""
    import ast

    tree = ast.parse((REPO / "XRealSlicer" / "XRealSlicer.py").read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.Assign)
               and any(isinstance(t, ast.Name) and t.id == "CONTROL_WIDGETS" for t in n.targets)]
    return ast.literal_eval(node.value)


def fill_combo(combo, items, current=0):
    combo.clear()
    for text, data in items:
        combo.addItem(text, data)
    combo.setCurrentIndex(current)


def segment_list(frame, vocabulary, info):
    """The embedded Segment Editor's place: the segments the module creates, with their colours."""
    layout = QtWidgets.QVBoxLayout(frame)
    note = QtWidgets.QLabel("Slicer's Segment Editor (embedded): effects toolbar, then the segment list:")
    note.setWordWrap(True)
    layout.addWidget(note)
    effects = QtWidgets.QLabel("Paint · Draw · Erase · Threshold · Islands · Smoothing · Scissors · ...")
    effects.setStyleSheet("color: #555;")
    layout.addWidget(effects)
    table = QtWidgets.QTableWidget(0, 2)
    table.setHorizontalHeaderLabels(["", "Name"])
    table.verticalHeader().hide()
    table.horizontalHeader().setStretchLastSection(True)
    rows = [(t.name, t.color) for t in vocabulary.anatomy_templates(list(connection.model_anatomy_labels(info)))]
    rows += [("Pneumonia", vocabulary.finding_template("pneumonia").color), ("Pathology", (1.0, 0.8, 0.0))]
    for name, color in rows:
        row = table.rowCount()
        table.insertRow(row)
        swatch = QtWidgets.QTableWidgetItem("")
        swatch.setBackground(QtGui.QColor.fromRgbF(*color))
        table.setItem(row, 0, swatch)
        table.setItem(row, 1, QtWidgets.QTableWidgetItem(name))
    table.setColumnWidth(0, 24)
    table.selectRow(len(rows) - 2)
    table.resizeRowsToContents()
    table.setFixedHeight(table.verticalHeader().length() + table.horizontalHeader().sizeHint().height() + 6)
    table.setVerticalScrollBarPolicy(QtCore.Qt.ScrollBarAlwaysOff)
    layout.addWidget(table)
    frame.setFrameShape(QtWidgets.QFrame.StyledPanel)


def main(out_dir: Path) -> None:
    app = QtWidgets.QApplication([])
    app.setStyle("Fusion")
    panel = uic.loadUi(io.BytesIO(plain_ui()))
    find = lambda name: panel.findChild(QtCore.QObject, name)  # noqa: E731
    vocabulary = Vocabulary.load()
    info = connection.local_model_info("demo", find_engine_root())
    provenance = json.loads((REPO / "XRealSlicer/Resources/Testing/Result/provenance.json").read_text())

    # Engine: local, connected
    find("localEngineRadioButton").setChecked(True)
    for name in ("serverUrlLabel", "serverUrlComboBox", "tokenLabel", "tokenLineEdit", "rememberTokenCheckBox",
                 "connectButton"):
        find(name).hide()
    find("environmentPathLineEdit").setText(os.path.join("~", ".local", "share", "XRealSlicer", "engine-venv"))
    find("modelLineEdit").setText("demo")
    find("engineStatusLabel").setText(connection.status_line(
        {"model": info["model"], "device": "cuda", "engine_version": "0.1.0"}, "http://127.0.0.1:41873"))
    find("engineLogTextEdit").setPlainText("XREAL_ENGINE_URL=http://127.0.0.1:41873\nModel xreal-demo-v2 loaded on cuda")
    find("engineLogTextEdit").setFixedHeight(56)
    # Canvas
    fill_combo(find("templateComboBox"), [(f"anatomy_0{i}", None) for i in range(1, 6)])
    fill_combo(find("canvasVolumeSelector"), [("XReal canvas anatomy_01", None)])
    find("pacsSourceLabel").hide()
    find("pacsSourceComboBox").hide()
    # Masks
    fill_combo(find("segmentationSelector"), [("XReal canvas anatomy_01 masks", None)])
    findings = [("Choose a finding ...", "")] + [
        (label, finding) for finding, label in planning.finding_choices(connection.model_findings(info), vocabulary,
                                                                        False)]
    fill_combo(find("findingComboBox"), [(text, data) for text, data in findings],
               current=[d for _t, d in findings].index("pneumonia"))
    segment_list(find("embeddedSegmentEditorWidget"), vocabulary, info)
    # Generate: Fast preview off, two variations, the controls that apply
    fill_combo(find("samplerComboBox"), [(label, name) for name, label in parameters.sampler_choices()])
    for name, value in (("seedSpinBox", 42), ("stepsSpinBox", 100), ("anatomyStepsSpinBox", 80),
                        ("variationsSpinBox", 2), ("interpolationStepsSpinBox", 8)):
        find(name).setMaximum(1000)
        find(name).setValue(value)
    find("guidanceSpinBox").setValue(7.0)
    # ControlNets: those of the replaying engine (the demo model's, else sobel and attention), reference ticked
    controlnets = controls.model_controlnets(replay_info())
    fill_combo(find("referenceControlComboBox"), [(label, name) for name, label in controls.reference_choices(
        controlnets)])
    fill_combo(find("controlStagesComboBox"), [(label, name) for name, label in parameters.control_stage_choices()])
    defaults = controls.node_defaults(controlnets, None)
    find("referenceCheckBox").setChecked(True)
    find("referenceScaleSpinBox").setValue(defaults.get("referenceScale", controls.DEFAULT_SCALE))
    find("attentionScaleSpinBox").setValue(defaults.get("attentionScale", controls.DEFAULT_SCALE))
    states = planning.control_states(interpolate=False, edit_mode=False, fast=False, controlnets=controlnets,
                                     use_reference=True)
    for key, names in control_widgets().items():
        for name in names:
            find(name).setEnabled(states[key])
    fill_combo(find("pushDestinationComboBox"), [("Do not send", ""), ("orthanc", "orthanc")], current=1)
    find("progressBar").setValue(100)
    find("statusLabel").setText("Done in 1 min 52 s. The segment 'Pathology' is empty and was left out.")
    # Results: two variations of the committed result's provenance
    listing = find("resultsListWidget")
    for seed in (42, 43):
        listing.addItem(results.result_label(f"seed-{seed}", dict(provenance, seed=seed, steps=100,
                                                                   anatomy_steps=80)))
    listing.setCurrentRow(1)
    listing.setFixedHeight(60)
    shown = dict(provenance, seed=43, steps=100, anatomy_steps=80)
    find("resultDetailsLabel").setText("\n".join([results.provenance_summary(shown),
                                                  results.quality_summary(shown)]))

    panel.resize(440, 100)
    panel.adjustSize()
    panel.resize(440, panel.sizeHint().height())
    panel.show()
    app.processEvents()
    out_dir.mkdir(parents=True, exist_ok=True)
    for file_name, names in (("panel-engine-canvas.png", ("engineCollapsibleButton", "canvasCollapsibleButton")),
                             ("panel-masks.png", ("masksCollapsibleButton",)),
                             ("panel-generate-results.png", ("generateCollapsibleButton", "resultsCollapsibleButton"))):
        boxes = [find(name) for name in names]
        top = min(box.geometry().top() for box in boxes)
        bottom = max(box.geometry().bottom() for box in boxes)
        rect = QtCore.QRect(0, top - 4, panel.width(), bottom - top + 10)
        panel.grab(rect).save(str(out_dir / file_name))
        print(out_dir / file_name)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent))
