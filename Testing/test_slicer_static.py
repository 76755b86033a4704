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
                 "safetensors", "pynetdicom", "dicomweb_client", "PIL", "scipy"}
ENGINE_MODULES_ALLOWED = {"xreal_engine", "xreal_engine.client", "xreal_engine.errors", "xreal_engine.model",
                          "xreal_engine.model.sampling"}
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
    # every MRML widget gets the scene from the root widget
    receivers = {c.find("receiver").text for c in root.iter("connection")}
    mrml = {w.get("name") for w in root.iter("widget") if w.get("class").startswith("qMRML") and w is not top}
    assert mrml <= receivers


def test_every_ui_name_used_by_the_module_exists():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_PY.read_text()))
    # names passed through getattr(self.ui, name) loops
    used |= set(re.findall(r'"(\w+(?:Label|Button|LineEdit|ComboBox|PathLineEdit))"', MODULE_PY.read_text()))
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
    assert {"canvasVolume", "segmentation", "seed", "steps", "anatomySteps", "guidance"} <= bound


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
    namespace = {"Annotated": typing.Annotated, "WithinRange": _WithinRange,
                 "vtkMRMLScalarVolumeNode": type("vtkMRMLScalarVolumeNode", (), {}),
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


def test_ui_spin_boxes_pin_no_sampling_range_of_their_own():
    """connectGui sets a bound spin box's range from its WithinRange (Slicer's guiConnectors.py); a range in
    the .ui would only be a second copy that can disagree with the engine's."""
    parameters = _lib()
    bound = {}
    for widget in _ui_tree().getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName" and prop.find("string").text in parameters.NODE_FIELDS:
                bound[prop.find("string").text] = widget
    assert set(bound) == set(parameters.NODE_FIELDS)
    for field, widget in bound.items():
        pinned = [prop.get("name") for prop in widget.findall("property") if prop.get("name") in ("minimum", "maximum")]
        assert not pinned, f"{widget.get('name')} pins {pinned} in the .ui; the parameter node gives its range"


# the engine files Slicer's own Python imports (the rest runs in the engine's Python)
ENGINE_FILES_IMPORTED_BY_SLICER = ["xreal_engine/__init__.py", "xreal_engine/client.py", "xreal_engine/errors.py",
                                   "xreal_engine/model/__init__.py", "xreal_engine/model/sampling.py"]


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


def test_slicer_api_names_exist(slicer_symbols):
    tree = ast.parse(MODULE_PY.read_text())
    classes = {s.split(".")[0] for s in slicer_symbols} | {s.split(".")[1] for s in slicer_symbols
                                                             if s.startswith("slicer.") and s.count(".") >= 1}
    methods = {s.rsplit(".", 1)[1] for s in slicer_symbols if "." in s}
    app_classes = ("qSlicerApplication", "qSlicerCoreApplication")
    problems = []
    checked = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "parent", None), ast.Attribute):
            chain = _attribute_chain(node)
            if not chain:
                continue
            if chain[0] == "slicer" and len(chain) >= 2:
                checked += 1
                if chain[1] == "app" and len(chain) >= 3:
                    ok = any(f"{cls}.{chain[2]}" in slicer_symbols for cls in app_classes)
                elif chain[1] == "mrmlScene" and len(chain) >= 3:
                    ok = f"vtkMRMLScene.{chain[2]}" in slicer_symbols
                elif chain[1] == "dicomDatabase" and len(chain) >= 3:
                    ok = f"ctkDICOMDatabase.{chain[2]}" in slicer_symbols
                elif chain[1].startswith(("vtk", "qMRML")) and len(chain) >= 3:
                    ok = f"{chain[1]}.{chain[2]}" in slicer_symbols
                else:  # slicer.util.X, slicer.modules.dicomPlugins, slicer.vtkSegment ...: listed, or a listed prefix
                    name = ".".join(chain[:3])
                    ok = name in slicer_symbols or any(symbol.startswith(name + ".") for symbol in slicer_symbols)
                if not ok:
                    problems.append(".".join(chain))
            elif chain[0] == "DICOMUtils" and len(chain) >= 2:
                checked += 1
                if ".".join(chain[:2]) not in slicer_symbols:
                    problems.append(".".join(chain))
        for child in ast.iter_child_nodes(node):
            child.parent = node
    # class names in code and strings (AddNewNodeByClass("vtkMRML..."), IsA(...), imports from slicer)
    for token in set(re.findall(r"\b((?:vtkMRML|qMRML|vtkSegment)\w*)\b", MODULE_PY.read_text())):
        checked += 1
        if token not in classes:
            problems.append(token)
    # VTK-style method calls on MRML objects must be methods Slicer has (catches typos such as SetTerminolgy)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            if re.fullmatch(r"(Get|Set|Add|Remove|Create|Is)[A-Z]\w*", name) or name == "IsA":
                checked += 1
                if name not in methods and name not in BASE_METHODS:
                    problems.append(f".{name}()")
    assert checked > 40
    assert not problems, f"not found in Slicer's API: {sorted(set(problems))}"


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
if(DEFINED EXTENSION_README_FILE AND NOT EXISTS ${CMAKE_SOURCE_DIR}/${EXTENSION_README_FILE})
  message(FATAL_ERROR "EXTENSION_README_FILE ${EXTENSION_README_FILE} does not exist")
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


@pytest.fixture(scope="module")
def cmake_build(tmp_path_factory):
    """Real CMake runs the extension's CMakeLists against a stand-in Slicer (Slicer itself cannot be built here)."""
    import shutil

    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    root = tmp_path_factory.mktemp("cmake")
    stub = root / "stub"
    stub.mkdir()
    (stub / "UseSlicer.cmake").write_text(STUB_USE_SLICER)
    for step in ("generate-config", "cpack"):
        (stub / f"{step}.cmake").write_text(f'file(APPEND ${{XREAL_STUB_REPORT}} "{step}\\n")\n')
    (stub / "SlicerConfig.cmake").write_text(
        "set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)\n"
        "set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/generate-config.cmake)\n"
        "set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/cpack.cmake)\n")
    build = root / "build"
    configure = subprocess.run([cmake, "-S", str(REPO_DIR), "-B", str(build), f"-DSlicer_DIR={stub}",
                                "-DBUILD_TESTING=ON"], capture_output=True, text=True, timeout=300)
    assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-2000:]
    return {"cmake": cmake, "build": build, "root": root,
            "report": (build / "stub-report.txt").read_text().splitlines()}


def test_cmake_declares_every_script_and_resource(cmake_build):
    report = cmake_build["report"]
    scripts = {line.split(" ", 1)[1] for line in report if line.startswith("SCRIPTS ")}
    resources = {line.split(" ", 1)[1] for line in report if line.startswith("RESOURCES ")}
    on_disk_py = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py") if "Testing" not in p.parts}
    assert scripts == on_disk_py  # nothing missing (configure would have failed), nothing left out
    on_disk_res = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*")
                   if p.is_file() and p.suffix in (".ui", ".png", ".txt")}
    assert resources == on_disk_res
    assert "module XRealSlicer generic-tests=TRUE" in report
    assert f"test py_XRealSlicer {MODULE_PY.resolve()}" in report  # the module's self-test runs under ctest


def test_extension_metadata_is_complete_and_in_order(cmake_build):
    report = cmake_build["report"]
    assert "project XRealSlicer" in report  # the stub already failed on an empty EXTENSION_* or missing README
    assert len([line for line in report if line.startswith("extension ")]) == 7
    steps = [line.split()[0] for line in report if line.split()[0] in ("use-file", "module", "generate-config",
                                                                       "cpack")]
    assert steps == ["use-file", "module", "generate-config", "cpack"]


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
