"""Checks that stand in for running Slicer (which cannot run here).

Behaviour where there is one to run:
- the .ui file is valid Qt Designer XML (parsed), its bindings name fields of the parameter node;
- the parameter node's class body, run with stand-ins for Slicer's names, takes the sampling ranges and
  defaults from the engine's policy (XRealSlicerLib.parameters), and the .ui pins no other ranges;
- every Python file under XRealSlicer/ (and the engine files Slicer imports) parses as Python 3.9
  (Slicer 5.8) and 3.12;
- XRealSlicerLib imports in a fresh interpreter without torch & co. and loads only the engine's stdlib parts;
- real CMake configures and installs the extension against a stand-in Slicer: every script and resource
  is declared (and nothing missing), the metadata is complete and in order, the whole engine tree
  (model/, cli/ ...) is installed beside the module;
- Resources/requirements.txt is the engine's dependency list; the vocabulary is the engine's file.

Text, where only the text can show it (XRealSlicer.py needs Slicer to import): the ``self.ui`` names
the module uses, its imports, every Slicer API name it uses (slicer-api-symbols.txt), version-dependent
calls it must avoid, and that no vocabulary code is copied into the module.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import typing
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO_DIR / "XRealSlicer"
MODULE_PY = MODULE_DIR / "XRealSlicer.py"
LIB_DIR = MODULE_DIR / "XRealSlicerLib"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "XRealSlicer.ui"

HEAVY_MODULES = {"torch", "diffusers", "transformers", "monai", "accelerate", "fastapi", "uvicorn", "highdicom",
                 "safetensors", "pynetdicom", "dicomweb_client", "PIL", "scipy", "skimage"}
ENGINE_MODULES_ALLOWED = {"xreal_engine", "xreal_engine.client", "xreal_engine.errors", "xreal_engine.model",
                          "xreal_engine.model.sampling", "xreal_engine.control_spec", "xreal_engine.vocabulary"}
SLICER_ONLY_MODULES = {"slicer", "qt", "vtk", "ctk", "DICOMLib", "DICOM", "SampleData", "SegmentEditor"}
# VTK base-class methods (vtkObject's are listed; these come from vtkMatrix4x4 / Qt and are not in the list)
BASE_METHODS = {"IsA"}


def _python_files():
    return sorted(MODULE_DIR.rglob("*.py"))


def _ui_tree():
    return ET.parse(UI_FILE)


def _ui_widget_names():
    names = [w.get("name") for w in _ui_tree().getroot().iter("widget")]
    names += [s.get("name") for s in _ui_tree().getroot().iter("spacer")]
    return names


def test_ui_file_is_valid_qt_designer_xml():
    root = _ui_tree().getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    assert root.find("class").text == "XRealSlicer"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "XRealSlicer"
    names = _ui_widget_names()
    assert len(names) == len(set(names)), "widget names must be unique"
    assert all(re.fullmatch(r"[A-Za-z_]\w*", n) for n in names)
    declared = {c.find("class").text for c in root.iter("customwidget")}
    for widget in root.iter("widget"):
        cls = widget.get("class")
        assert cls.startswith("Q") or cls in declared, f"custom widget {cls} is not declared"
    for item in root.iter("item"):  # each layout item holds exactly one widget, layout or spacer
        assert len([c for c in item if c.tag in ("widget", "layout", "spacer")]) == 1
    for prop in root.iter("property"):
        assert len(list(prop)) == 1, f"property {prop.get('name')} needs exactly one value"
    # every MRML widget gets the scene from the root widget, except the embedded Segment Editor: it gets its
    # parameter node first and then the scene, in setup (as Slicer's Modules/Scripted/SegmentEditor does)
    receivers = {c.find("receiver").text for c in root.iter("connection")}
    mrml = {w.get("name") for w in root.iter("widget") if w.get("class").startswith("qMRML") and w is not top}
    assert mrml - receivers == {"embeddedSegmentEditorWidget"}
    source = MODULE_PY.read_text()
    node_set = source.index("editor.setMRMLSegmentEditorNode(")
    assert node_set < source.index("editor.setMRMLScene(slicer.mrmlScene)", node_set)


def test_every_ui_name_used_by_the_module_exists():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_PY.read_text()))
    # names passed through getattr(self.ui, name) loops
    used |= set(re.findall(r'"(\w+(?:Label|Button|LineEdit|ComboBox|PathLineEdit|SpinBox|Selector|CheckBox))"',
                           MODULE_PY.read_text()))
    missing = used - set(_ui_widget_names())
    assert used and not missing, f"used in XRealSlicer.py but not in the .ui: {sorted(missing)}"


def test_parameter_bindings_match_the_parameter_node():
    tree = ast.parse(MODULE_PY.read_text())
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "XRealSlicerParameterNode")
    fields = {stmt.target.id for stmt in wrapper.body if isinstance(stmt, ast.AnnAssign)}
    bound = set()
    for prop in _ui_tree().getroot().iter("property"):
        if prop.get("name") == "SlicerParameterName":
            assert prop.get("stdset") == "0", "SlicerParameterName must be a dynamic property"
            bound.add(prop.find("string").text)
    assert bound and bound <= fields, f"bound to unknown parameters: {sorted(bound - fields)}"
    assert {"canvasVolume", "segmentation", "seed", "steps", "anatomySteps", "guidance", "fastPreview",
            "variations", "interpolate", "interpolationSteps", "editMode"} <= bound


def test_every_planned_control_state_has_its_widgets():
    """planning.control_states decides which Generate controls apply; the module maps each to its widgets."""
    tree = ast.parse(MODULE_PY.read_text())
    (assignment,) = [node for node in tree.body if isinstance(node, ast.Assign)
                     and any(isinstance(t, ast.Name) and t.id == "CONTROL_WIDGETS" for t in node.targets)]
    mapping = ast.literal_eval(assignment.value)
    _lib()
    from XRealSlicerLib.planning import control_states

    assert set(mapping) == set(control_states(interpolate=False, edit_mode=False, fast=False))
    names = set(_ui_widget_names())
    assert all(name in names for widgets in mapping.values() for name in widgets)


def _lib():
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    from XRealSlicerLib import parameters

    return parameters


class _WithinRange:
    """Stand-in for slicer.parameterNodeWrapper.WithinRange (validators.py): keeps its two bounds."""

    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


def _parameter_node_class():
    """XRealSlicerParameterNode's class body, run with the module's own Lib/engine imports and Slicer stand-ins."""
    _lib()
    tree = ast.parse(MODULE_PY.read_text())
    imports = [node for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 0
               and node.module.split(".")[0] in ("XRealSlicerLib", "xreal_engine")]
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "XRealSlicerParameterNode")
    wrapper.decorator_list = []  # @parameterNodeWrapper needs Slicer; the annotations and defaults do not
    namespace = {"Annotated": typing.Annotated, "Union": typing.Union, "WithinRange": _WithinRange,
                 "vtkMRMLScalarVolumeNode": type("vtkMRMLScalarVolumeNode", (), {}),
                 "vtkMRMLVectorVolumeNode": type("vtkMRMLVectorVolumeNode", (), {}),
                 "vtkMRMLSegmentationNode": type("vtkMRMLSegmentationNode", (), {})}
    code = compile(ast.Module(body=imports + [wrapper], type_ignores=[]), str(MODULE_PY), "exec", dont_inherit=True)
    exec(code, namespace)  # dont_inherit: the annotations are evaluated as in XRealSlicer.py, not as strings
    return namespace["XRealSlicerParameterNode"]


def test_parameter_node_takes_sampling_ranges_and_defaults_from_the_engine_policy():
    parameters = _lib()
    node = _parameter_node_class()
    hints = typing.get_type_hints(node, include_extras=True)
    for field in parameters.NODE_FIELDS:
        (within,) = [item for item in hints[field].__metadata__ if isinstance(item, _WithinRange)]
        assert (within.minimum, within.maximum) == parameters.node_range(field), field
    for field, value in parameters.NODE_DEFAULTS.items():
        assert getattr(node, field) == value, field
    # the sampler and where the ControlNets steer are the policy's defaults; the controls' scales have the
    # engine's one range (xreal_engine/control_spec.py)
    from xreal_engine.control_spec import CONTROL_SCALE_RANGE
    from xreal_engine.model.sampling import DEFAULT_CONTROL_STAGES, SAMPLERS, SamplingParameters

    assert node.sampler == SAMPLERS[0] == SamplingParameters.__dataclass_fields__["sampler"].default
    assert node.controlStages == DEFAULT_CONTROL_STAGES
    for field in SCALE_FIELDS:
        (within,) = [item for item in hints[field].__metadata__ if isinstance(item, _WithinRange)]
        assert (within.minimum, within.maximum) == CONTROL_SCALE_RANGE, field


SCALE_FIELDS = ("referenceScale", "attentionScale")  # the ControlNet scale spin boxes


def test_ui_spin_boxes_pin_no_sampling_range_of_their_own():
    """connectGui sets a bound spin box's range from its WithinRange (Slicer's guiConnectors.py); a range in
    the .ui would only be a second copy that can disagree with the engine's."""
    parameters = _lib()
    bound = {}
    ranged = set(parameters.NODE_FIELDS) | set(SCALE_FIELDS)
    for widget in _ui_tree().getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName" and prop.find("string").text in ranged:
                bound[prop.find("string").text] = widget
    assert set(bound) == ranged
    for field, widget in bound.items():
        pinned = [prop.get("name") for prop in widget.findall("property") if prop.get("name") in ("minimum", "maximum")]
        assert not pinned, f"{widget.get('name')} pins {pinned} in the .ui; the parameter node gives its range"


# the engine files Slicer's own Python imports (the rest runs in the engine's Python)
ENGINE_FILES_IMPORTED_BY_SLICER = ["xreal_engine/__init__.py", "xreal_engine/client.py", "xreal_engine/errors.py",
                                   "xreal_engine/model/__init__.py", "xreal_engine/model/sampling.py",
                                   "xreal_engine/control_spec.py", "xreal_engine/vocabulary.py"]


@pytest.mark.parametrize("version", [(3, 9), (3, 12)])
def test_every_module_file_parses_for_slicer_pythons(version):
    files = _python_files()
    assert MODULE_PY in files and len(files) >= 5
    for path in files + [REPO_DIR / name for name in ENGINE_FILES_IMPORTED_BY_SLICER]:
        ast.parse(path.read_text(), filename=str(path), feature_version=version)


def _imports(path: Path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_module_and_lib_import_nothing_heavy():
    for path in _python_files():
        for name in _imports(path):
            top = name.split(".")[0]
            assert top not in HEAVY_MODULES, f"{path.name} imports {name}"
            if top == "xreal_engine":
                assert name in ENGINE_MODULES_ALLOWED, f"{path.name} imports the engine's heavy module {name}"
            if path.parent == LIB_DIR or LIB_DIR in path.parents:
                assert top not in SLICER_ONLY_MODULES, f"{path.name} (Lib) imports {name}, which needs Slicer"


def test_lib_imports_in_a_bare_interpreter_without_torch():
    lib_modules = sorted("XRealSlicerLib." + p.stem for p in LIB_DIR.glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, json, sys; sys.path.insert(0, %r)\n"
        "[importlib.import_module(name) for name in %r]\n"
        "heavy = sorted(m for m in %r if m in sys.modules)\n"
        "engine = sorted(m for m in sys.modules if m.split('.')[0] == 'xreal_engine')\n"
        "print(json.dumps({'heavy': heavy, 'engine': engine}))\n" % (str(MODULE_DIR), lib_modules, sorted(HEAVY_MODULES))
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(MODULE_DIR))
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert loaded["heavy"] == [], f"heavy modules imported: {loaded['heavy']}"
    # only the engine's stdlib parts enter Slicer's Python (the policy included: the Lib resolves with it)
    assert "xreal_engine.model.sampling" in loaded["engine"] and set(loaded["engine"]) <= ENGINE_MODULES_ALLOWED


# ----------------------------------------------------------------------------- Slicer API names


def _attribute_chain(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return list(reversed(parts))
    return None


@pytest.fixture(scope="module")
def slicer_symbols(shared_dir):
    path = shared_dir / "docs" / "slicer-api-symbols.txt"
    if not path.is_file():
        pytest.skip("slicer-api-symbols.txt is not available")
    return set(path.read_text().split())


# A Slicer name that is not in slicer-api-symbols.txt needs a comment naming the Slicer source file that
# defines or uses it, on its own line or in the comment block right above its statement.
CITATION = re.compile(r"#\s*Slicer source:\s*((?:Base|Libs|Modules|Utilities|CMake|Applications|Extensions)/[\w./-]+)")


def _citations(lines, first, last):
    """Slicer source files cited on lines first..last (1-based) or in the comment block right above ``first``."""
    found = [m.group(1) for line in lines[first - 1:last] for m in CITATION.finditer(line)]
    above = first - 2
    while above >= 0 and lines[above].strip().startswith("#"):
        found += [m.group(1) for m in CITATION.finditer(lines[above])]
        above -= 1
    return found


def _statement_lines(tree):
    """line -> (first, last) line of the innermost statement that covers it."""
    spans = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt) and not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.If, ast.For,
                                                                 ast.While, ast.With, ast.Try)):
            for line in range(node.lineno, node.end_lineno + 1):
                first, last = spans.get(line, (0, 10**9))
                if node.end_lineno - node.lineno <= last - first:
                    spans[line] = (node.lineno, node.end_lineno)
    return spans


def _slicer_names_used(source):
    """(name, line, listed) for every Slicer API name the module uses; ``listed`` is a predicate on the symbols."""
    tree = ast.parse(source)
    used = []
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "parent", None), ast.Attribute):
            chain = _attribute_chain(node)
            if chain and chain[0] in ("slicer", "DICOMUtils", "DICOMLib", "DICOM", "SampleData") and len(chain) >= 2:
                used.append((chain, node.lineno))
    return tree, used


def test_slicer_api_names_exist(slicer_symbols):
    source = MODULE_PY.read_text()
    lines = source.splitlines()
    tree, used = _slicer_names_used(source)
    spans = _statement_lines(tree)
    classes = {s.split(".")[0] for s in slicer_symbols} | {s.split(".")[1] for s in slicer_symbols
                                                             if s.startswith("slicer.") and s.count(".") >= 1}
    methods = {s.rsplit(".", 1)[1] for s in slicer_symbols if "." in s}
    app_classes = ("qSlicerApplication", "qSlicerCoreApplication")
    unlisted = []  # (name, line)

    def listed_chain(chain):
        if chain[0] != "slicer":
            return ".".join(chain[:2]) in slicer_symbols
        if chain[1] == "app" and len(chain) >= 3:
            return any(f"{cls}.{chain[2]}" in slicer_symbols for cls in app_classes)
        if chain[1] == "mrmlScene" and len(chain) >= 3:
            return f"vtkMRMLScene.{chain[2]}" in slicer_symbols
        if chain[1] == "dicomDatabase" and len(chain) >= 3:
            return f"ctkDICOMDatabase.{chain[2]}" in slicer_symbols
        if chain[1].startswith(("vtk", "qMRML")) and len(chain) >= 3:
            return f"{chain[1]}.{chain[2]}" in slicer_symbols
        name = ".".join(chain[:3])  # slicer.util.X, slicer.modules.dicomPlugins, slicer.vtkSegment ...
        return name in slicer_symbols or any(symbol.startswith(name + ".") for symbol in slicer_symbols)

    for chain, line in used:
        if not listed_chain(chain):
            unlisted.append((".".join(chain), line))
    # class names in code and strings (AddNewNodeByClass("vtkMRML..."), IsA(...), nodeTypes, imports from slicer)
    for number, text in enumerate(lines, start=1):
        for token in re.findall(r"\b((?:vtkMRML|qMRML|vtkSegment)\w*)\b", text.split("#")[0]):
            if token not in classes:
                unlisted.append((token, number))
    # VTK-style method calls on MRML objects must be methods Slicer has (catches typos such as SetTerminolgy)
    calls = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            if re.fullmatch(r"(Get|Set|Add|Remove|Create|Is)[A-Z]\w*", name) or name == "IsA":
                calls += 1
                if name not in methods and name not in BASE_METHODS:
                    unlisted.append((f".{name}()", node.lineno))
    assert len(used) + calls > 60
    uncited, cited = [], {}
    for name, line in unlisted:
        first, last = spans.get(line, (line, line))
        paths = _citations(lines, first, last)
        if paths:
            cited.setdefault(name, set()).update(paths)
        else:
            uncited.append(f"{name} (line {line})")
    assert not uncited, f"not in slicer-api-symbols.txt and no '# Slicer source: <file>' comment: {sorted(set(uncited))}"
    # where a Slicer checkout is at hand (a git directory, bare or not), each cited file must exist there and
    # mention the name
    git_dir = os.environ.get("XREALSLICER_SLICER_GIT")
    if git_dir:
        for name, paths in cited.items():
            short = name.strip(".()").rsplit(".", 1)[-1]
            texts = []
            for path in paths:
                shown = subprocess.run(["git", "--git-dir", git_dir, "show", f"HEAD:{path}"], capture_output=True,
                                       text=True)
                assert shown.returncode == 0, f"{path}, cited for {name}, is not in Slicer's source"
                texts.append(shown.stdout)
            assert any(short in text for text in texts), f"none of {sorted(paths)} mentions {short}"


def test_ui_custom_widgets_are_slicer_classes(slicer_symbols):
    """The .ui's Slicer widgets (the embedded qMRMLSegmentEditorWidget included) are classes Slicer has, with a
    Designer plugin, and the properties the .ui sets on the editor are its Q_PROPERTYs (listed as methods)."""
    classes = {symbol.split(".")[0] for symbol in slicer_symbols}
    declared = {c.find("class").text for c in _ui_tree().getroot().iter("customwidget")}
    assert {name for name in declared if name.startswith("qMRML")} <= classes
    assert "qMRMLSegmentEditorWidget" in declared
    editor = next(w for w in _ui_tree().getroot().iter("widget") if w.get("class") == "qMRMLSegmentEditorWidget")
    for prop in editor.findall("property"):
        if prop.get("name") != "toolTip":
            assert f"qMRMLSegmentEditorWidget.{prop.get('name')}" in slicer_symbols, prop.get("name")


def _module_functions():
    tree = ast.parse(MODULE_PY.read_text())
    functions = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    functions[(node.name, item.name)] = item
    return tree, functions


def test_worker_threads_never_translate():
    """Slicer's _() is PythonQt's slicer.app.translate: Qt, main thread only. Everything given to
    runInBackground (and what it calls on self) must leave translation to the main-thread continuation."""
    tree, functions = _module_functions()
    workers = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "runInBackground":
            target = node.args[0]
            chain = _attribute_chain(target) if isinstance(target, ast.Attribute) else None
            if isinstance(target, ast.Lambda):
                workers.append(("lambda", target))
            elif chain and chain[:2] == ["self", "logic"]:
                workers.append(("XRealSlicerLogic", functions[("XRealSlicerLogic", chain[2])]))
            elif chain and chain[0] == "environment":
                continue  # XRealSlicerLib: no Slicer there at all (test_module_and_lib_import_nothing_heavy)
            elif isinstance(target, ast.Name):  # a function defined in the calling method
                defined = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == target.id]
                assert defined, target.id
                workers.append(("XRealSlicerLogic", defined[0]))
            else:
                raise AssertionError(f"unrecognised background call target on line {node.lineno}")
    assert len(workers) >= 6
    seen, problems = set(), []
    while workers:
        owner, function = workers.pop()
        if id(function) in seen:
            continue
        seen.add(id(function))
        for node in ast.walk(function):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("_", "translate"):
                problems.append(f"line {node.lineno}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                chain = _attribute_chain(node.func) or []
                if chain[:2] == ["self", "logic"] and ("XRealSlicerLogic", chain[2]) in functions:
                    workers.append(("XRealSlicerLogic", functions[("XRealSlicerLogic", chain[2])]))
                elif chain[:1] == ["self"] and len(chain) == 2 and (owner, chain[1]) in functions:
                    workers.append((owner, functions[(owner, chain[1])]))
    assert not problems, f"translation called from a worker thread: {problems}"


def test_version_dependent_calls_are_avoided_or_guarded():
    source = MODULE_PY.read_text()
    # launchConsoleProcess(blocking=..., logCallback=...) exists only in Slicer 5.12+: we read output ourselves
    assert "blocking=" not in source and "logCallback" not in source
    # SetTerminology is 5.10+: the terminology tag works in every version
    assert ".SetTerminology(" not in source and "GetTerminologyEntryTagName" in source
    # no DICOM-SEG loader before 5.12 without QuantitativeReporting: detected, then the fallback reader
    assert '"DICOMSegmentationPlugin" in slicer.modules.dicomPlugins' in source
    assert "read_fallback_segments" in source
    # deprecated call
    assert "setMasterVolumeNode" not in source
    # the self-test is runnable both ways (Reload&Test calls runTest, ctest calls test_*)
    tree = ast.parse(source)
    test_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "XRealSlicerTest")
    methods = {f.name for f in test_class.body if isinstance(f, ast.FunctionDef)}
    assert "runTest" in methods and any(m.startswith("test_") for m in methods)


# ----------------------------------------------------------------------------- CMake and packaging


def test_requirements_are_the_engine_dependencies():
    import tomllib

    dependencies = tomllib.loads((REPO_DIR / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [line.strip() for line in (MODULE_DIR / "Resources" / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in lines if line and not line.startswith("#")]
    assert sorted(requirements) == sorted(dependencies)


def _code_values(entry):
    if isinstance(entry, dict):
        if {"scheme", "value"} <= set(entry):
            yield str(entry["value"])
        for value in entry.values():
            yield from _code_values(value)
    elif isinstance(entry, list):
        for value in entry:
            yield from _code_values(value)


def test_the_vocabulary_is_read_from_the_engine_not_copied():
    from XRealSlicerLib.enginepath import vocabulary_path
    from XRealSlicerLib.vocabulary import Vocabulary

    _lib()
    engine_file = REPO_DIR / "xreal_engine" / "vocabulary.json"
    assert vocabulary_path().resolve() == engine_file.resolve()
    assert Vocabulary.load().data == json.loads(engine_file.read_text())
    assert not list(MODULE_DIR.rglob("vocabulary.json")), "Slicer must read xreal_engine/vocabulary.json itself"
    # text only: no code of the vocabulary is copied into the module's sources
    codes = {code for code in _code_values(json.loads(engine_file.read_text())) if len(code) >= 5}
    source = "\n".join(p.read_text() for p in _python_files())
    assert len(codes) > 10
    copied = sorted(code for code in codes if re.search(r"\b%s\b" % re.escape(code), source))
    assert not copied, f"vocabulary codes copied into the module: {copied}"


STUB_USE_SLICER = r"""
# Stand-in for Slicer's UseSlicer.cmake: the macros the extension calls, with the checks Slicer's own
# versions make (unknown keywords and missing files are fatal), recording what was declared, in order.
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
set(XREAL_STUB_REPORT ${CMAKE_BINARY_DIR}/stub-report.txt)
file(WRITE ${XREAL_STUB_REPORT} "use-file\n")
file(APPEND ${XREAL_STUB_REPORT} "project ${PROJECT_NAME}\n")
foreach(field HOMEPAGE CATEGORY CONTRIBUTORS DESCRIPTION ICONURL SCREENSHOTURLS DEPENDS)
  if("${EXTENSION_${field}}" STREQUAL "")
    message(FATAL_ERROR "EXTENSION_${field} is not set before find_package(Slicer)")
  endif()
  file(APPEND ${XREAL_STUB_REPORT} "extension ${field}\n")
endforeach()
# CMake/UseSlicer.cmake.in: the defaults Slicer gives an extension that sets no README / licence of its own
set(Slicer_LICENSE_FILE ${CMAKE_CURRENT_LIST_DIR}/Slicer-License.txt)
set(Slicer_README_FILE ${CMAKE_CURRENT_LIST_DIR}/Slicer-README.txt)
if(NOT DEFINED EXTENSION_LICENSE_FILE)
  set(EXTENSION_LICENSE_FILE ${Slicer_LICENSE_FILE})
endif()
if(NOT DEFINED EXTENSION_README_FILE)
  set(EXTENSION_README_FILE ${Slicer_README_FILE})
endif()
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(STUB "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(STUB_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords: ${STUB_UNPARSED_ARGUMENTS}")
  endif()
  foreach(kind SCRIPTS RESOURCES)
    foreach(file ${STUB_${kind}})
      if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${file})
        message(FATAL_ERROR "nonexistent file ${file}")
      endif()
      file(APPEND ${XREAL_STUB_REPORT} "${kind} ${file}\n")
    endforeach()
  endforeach()
  file(APPEND ${XREAL_STUB_REPORT} "module ${STUB_NAME} generic-tests=${STUB_WITH_GENERIC_TESTS}\n")
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(STUB "" "SCRIPT;TESTNAME_PREFIX" "SLICER_ARGS" ${ARGN})
  get_filename_component(script ${STUB_SCRIPT} ABSOLUTE)
  if(NOT EXISTS ${script})
    message(FATAL_ERROR "nonexistent test script ${STUB_SCRIPT}")
  endif()
  get_filename_component(name ${script} NAME_WE)
  file(APPEND ${XREAL_STUB_REPORT} "test py_${STUB_TESTNAME_PREFIX}${name} ${script}\n")
endmacro()
"""

# Stand-in for Slicer's SlicerExtensionCPack.cmake: the same existence checks, word for word in effect (5.8, 5.10
# and main: "set(expected_existing_vars EXTENSION_README_FILE EXTENSION_LICENSE_FILE)", then
# "if(NOT EXISTS ${${var}}) message(FATAL_ERROR ...)"), then what the package would declare.
STUB_CPACK = r"""
set(EXTENSION_NAME ${PROJECT_NAME})
foreach(var EXTENSION_README_FILE EXTENSION_LICENSE_FILE)
  if(NOT EXISTS ${${var}})
    message(FATAL_ERROR "error: ${var} points to an inexistent file: ${${var}}")
  endif()
endforeach()
file(APPEND ${XREAL_STUB_REPORT} "cpack\n")
file(APPEND ${XREAL_STUB_REPORT} "cpack-readme ${EXTENSION_README_FILE}\n")
file(APPEND ${XREAL_STUB_REPORT} "cpack-license ${EXTENSION_LICENSE_FILE}\n")
file(APPEND ${XREAL_STUB_REPORT} "cpack-category ${EXTENSION_CATEGORY}\n")
file(APPEND ${XREAL_STUB_REPORT} "cpack-keywords ${EXTENSION_KEYWORDS}\n")
file(APPEND ${XREAL_STUB_REPORT} "cpack-screenshots ${EXTENSION_SCREENSHOTURLS}\n")
"""


def _stub_slicer(root: Path) -> Path:
    stub = root / "stub"
    stub.mkdir()
    (stub / "UseSlicer.cmake").write_text(STUB_USE_SLICER)
    (stub / "generate-config.cmake").write_text('file(APPEND ${XREAL_STUB_REPORT} "generate-config\\n")\n')
    (stub / "cpack.cmake").write_text(STUB_CPACK)
    for name in ("Slicer-License.txt", "Slicer-README.txt"):
        (stub / name).write_text("Slicer's own file\n")
    (stub / "SlicerConfig.cmake").write_text(
        "set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)\n"
        "set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/generate-config.cmake)\n"
        "set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/cpack.cmake)\n")
    return stub


def _configure(cmake, source: Path, build: Path, stub: Path):
    """An out-of-source configure, run from the build directory (as the README's command and the factory do)."""
    build.mkdir(parents=True, exist_ok=True)
    return subprocess.run([cmake, "-S", str(source), "-B", str(build), f"-DSlicer_DIR={stub}", "-DBUILD_TESTING=ON"],
                          capture_output=True, text=True, timeout=300, cwd=str(build))


@pytest.fixture(scope="module")
def cmake_build(tmp_path_factory):
    """Real CMake runs the extension's CMakeLists against a stand-in Slicer (Slicer itself cannot be built here)."""
    import shutil

    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    root = tmp_path_factory.mktemp("cmake")
    stub = _stub_slicer(root)
    build = root / "build"
    configure = _configure(cmake, REPO_DIR, build, stub)
    assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-2000:]
    return {"cmake": cmake, "build": build, "root": root, "stub": stub,
            "report": (build / "stub-report.txt").read_text().splitlines()}


def test_cmake_declares_every_script_and_resource(cmake_build):
    report = cmake_build["report"]
    scripts = {line.split(" ", 1)[1] for line in report if line.startswith("SCRIPTS ")}
    resources = {line.split(" ", 1)[1] for line in report if line.startswith("RESOURCES ")}
    on_disk_py = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py") if "Testing" not in p.parts}
    assert scripts == on_disk_py  # nothing missing (configure would have failed), nothing left out
    on_disk_res = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts}
    assert resources == on_disk_res
    assert {"Resources/Testing/Result/sc.dcm", "Resources/Testing/Result/provenance.json"} <= resources
    assert "module XRealSlicer generic-tests=TRUE" in report
    assert f"test py_XRealSlicer {MODULE_PY.resolve()}" in report  # the module's self-test runs under ctest


def test_extension_metadata_is_complete_and_in_order(cmake_build):
    report = cmake_build["report"]
    assert "project XRealSlicer" in report  # the stub already failed on an empty EXTENSION_*
    assert len([line for line in report if line.startswith("extension ")]) == 7
    steps = [line.split()[0] for line in report if line.split()[0] in ("use-file", "module", "generate-config",
                                                                       "cpack")]
    assert steps == ["use-file", "module", "generate-config", "cpack"]
    declared = {line.split(" ", 1)[0]: line.split(" ", 1)[1] if " " in line else "" for line in report
                if line.startswith("cpack-")}
    # Slicer's CPack existence checks passed in an out-of-source build, on the project's own files
    assert Path(declared["cpack-readme"]) == REPO_DIR / "README.md"
    assert Path(declared["cpack-license"]) == REPO_DIR / "LICENSE.txt"  # not Slicer's licence
    assert "Apache License" in (REPO_DIR / "LICENSE.txt").read_text() and "Version 2.0" in (
        REPO_DIR / "LICENSE.txt").read_text()
    import tomllib

    assert tomllib.loads((REPO_DIR / "pyproject.toml").read_text())["project"]["license"]["text"] == "Apache-2.0"
    assert declared["cpack-category"] == "Image Synthesis"
    keywords = declared["cpack-keywords"].split(" ")
    assert len(keywords) >= 4 and all(re.fullmatch(r"[a-z0-9-]+", word) for word in keywords)  # space separated
    assert all(url.startswith("https://") for url in declared["cpack-screenshots"].split(" "))


def test_every_file_variable_is_absolute_and_a_relative_one_is_caught(cmake_build, tmp_path):
    """Every EXTENSION_*_FILE is an absolute path in CMakeLists.txt; and the stand-in's CPack checks really
    stop a relative README in an out-of-source build, as Slicer's do (the defect they guard against)."""
    text = (REPO_DIR / "CMakeLists.txt").read_text()
    files = re.findall(r"set\(EXTENSION_(\w+_FILE)\s+(\S+)\)", text)
    assert {name for name, _value in files} == {"README_FILE", "LICENSE_FILE"}
    assert all(value.startswith("${CMAKE_CURRENT_SOURCE_DIR}/") for _name, value in files)
    source = tmp_path / "source"
    source.mkdir()
    for name in ("README.md", "LICENSE.txt"):
        (source / name).write_text("x\n")
    relative = text.replace("${CMAKE_CURRENT_SOURCE_DIR}/README.md", "README.md").replace(
        "add_subdirectory(XRealSlicer)", "")
    (source / "CMakeLists.txt").write_text(relative)
    refused = _configure(cmake_build["cmake"], source, tmp_path / "build", _stub_slicer(tmp_path))
    assert refused.returncode != 0 and "EXTENSION_README_FILE points to an inexistent file" in refused.stderr


CATALOG_SCHEMA_REQUIRED = ("$schema", "category", "scm_url")  # slicer-extension-catalog-entry-schema-v1.0.2
CATALOG_SCHEMA_PROPERTIES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                             "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str,
                             "enabled": bool, "tier": int}


def test_extensions_index_catalog_entry():
    """Utilities/ExtensionsIndex/XRealSlicer.json, the file to submit to the ExtensionsIndex, against the schema's
    required fields and property types (Slicer's Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json:
    additionalProperties false) and against this extension's CMakeLists."""
    path = REPO_DIR / "Utilities" / "ExtensionsIndex" / "XRealSlicer.json"
    raw = path.read_bytes()
    assert b"\r" not in raw  # the index's check_json_file_format: LF only
    entry = json.loads(raw)
    assert path.stem == "XRealSlicer"  # the index names the file after project()
    assert re.search(r"^project\(XRealSlicer\)", (REPO_DIR / "CMakeLists.txt").read_text(), re.MULTILINE)
    for name in CATALOG_SCHEMA_REQUIRED:
        assert entry.get(name), f"{name} is required"
    for name, value in entry.items():
        assert name in CATALOG_SCHEMA_PROPERTIES, f"{name} is not a property of the schema"
        assert isinstance(value, CATALOG_SCHEMA_PROPERTIES[name]) and not (
            CATALOG_SCHEMA_PROPERTIES[name] is int and isinstance(value, bool))
    assert entry["$schema"].split("#")[0].endswith("/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json")
    assert entry["scm_url"].startswith("https://") and entry["scm_revision"]
    assert 1 <= entry.get("tier", 1) <= 5 and all(isinstance(d, str) for d in entry["build_dependencies"])
    cmake = (REPO_DIR / "CMakeLists.txt").read_text()
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', cmake).group(1)
    assert entry["build_dependencies"] == ([] if depends == "NA" else depends.split())
    assert f'set(EXTENSION_CATEGORY "{entry["category"]}")' in cmake


def test_cmake_configures_and_installs_the_engine_beside_the_module(cmake_build):
    """The whole xreal_engine/ tree (subpackages model/, cli/ ... included) goes beside XRealSlicer.py, built
    and installed: Slicer's Python imports xreal_engine.model.sampling, the launcher runs xreal_engine.cli."""
    engine = REPO_DIR / "xreal_engine"
    source_files = {p.relative_to(engine).as_posix() for p in engine.rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    install = subprocess.run([cmake_build["cmake"], "--install", str(cmake_build["build"]), "--prefix",
                              str(cmake_build["root"] / "installed")], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    built = cmake_build["build"] / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    installed = cmake_build["root"] / "installed" / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    for modules in (built, installed):
        bundled = modules / "xreal_engine"
        for name in ("client.py", "errors.py", "vocabulary.json", "model/__init__.py", "model/sampling.py",
                     "cli/__main__.py"):
            assert (bundled / name).is_file(), f"{name} is not in {bundled}"
        assert not list(bundled.rglob("__pycache__"))
        copied = {p.relative_to(bundled).as_posix() for p in bundled.rglob("*") if p.is_file()}
        assert source_files <= copied, f"not bundled: {sorted(source_files - copied)[:10]}"
    # the installed copy is importable the way Slicer imports it: the policy without torch
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from xreal_engine.model.sampling import SamplingParameters\n"
            "assert SamplingParameters.resolve({}, num_inference_steps=20).anatomy_steps == 10\n"
            "assert 'torch' not in sys.modules\n" % str(installed))
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
