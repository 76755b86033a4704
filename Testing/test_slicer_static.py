"""Static checks that stand in for running Slicer (which cannot run here).

- the .ui file is valid Qt Designer XML, and every ``self.ui.<name>`` the module uses exists in it;
- parameter-node bindings (SlicerParameterName) name real fields of the parameter node wrapper;
- every Python file under XRealSlicer/ parses as Python 3.9 (Slicer 5.8) and 3.12 syntax;
- the module and its Lib import nothing heavy (no torch/diffusers/monai/..., only the engine's stdlib parts),
  checked by reading the imports and by importing XRealSlicerLib in a fresh interpreter;
- every Slicer API name XRealSlicer.py uses exists in Slicer's source (slicer-api-symbols.txt);
- CMake lists every script and resource, and lists nothing that is missing; the extension metadata is complete;
- Resources/requirements.txt is the engine's dependency list.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
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
ENGINE_MODULES_ALLOWED = {"xreal_engine", "xreal_engine.client", "xreal_engine.errors"}
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


# the engine files Slicer's own Python imports (the rest runs in the engine's Python)
ENGINE_FILES_IMPORTED_BY_SLICER = ["xreal_engine/__init__.py", "xreal_engine/client.py", "xreal_engine/errors.py"]


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
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import XRealSlicerLib.request, XRealSlicerLib.jobs, XRealSlicerLib.launcher, XRealSlicerLib.results,"
        " XRealSlicerLib.series, XRealSlicerLib.connection, XRealSlicerLib.tasks\n"
        "heavy = sorted(m for m in %r if m in sys.modules)\n"
        "print(','.join(heavy))\n" % (str(MODULE_DIR), sorted(HEAVY_MODULES))
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(MODULE_DIR))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"heavy modules imported: {result.stdout}"


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


def _cmake_list(text: str, variable: str):
    match = re.search(r"set\(%s\s+(.*?)\)" % variable, text, re.S)
    assert match, variable
    return [item.replace("${MODULE_NAME}", "XRealSlicer") for item in match.group(1).split()]


def test_cmake_lists_every_script_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    for name in scripts + resources:
        assert (MODULE_DIR / name).is_file(), f"listed but missing: {name}"
    on_disk_py = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py") if "Testing" not in p.parts}
    assert on_disk_py == set(scripts)
    on_disk_res = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*")
                   if p.is_file() and p.suffix in (".ui", ".png", ".txt")}
    assert on_disk_res == set(resources)
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    testing = (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").read_text()
    assert re.search(r"^slicer_add_python_unittest\(SCRIPT .*XRealSlicer\.py\)", testing.replace("${MODULE_NAME}", "XRealSlicer"), re.M)
    assert "add_subdirectory(Python)" in (MODULE_DIR / "Testing" / "CMakeLists.txt").read_text()


def test_extension_metadata_is_complete():
    text = (REPO_DIR / "CMakeLists.txt").read_text()
    assert re.search(r"^project\(XRealSlicer\)", text, re.M)
    for variable in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        match = re.search(r'set\(EXTENSION_%s "([^"]+)"\)' % variable, text)
        assert match and match.group(1).strip(), f"EXTENSION_{variable} is missing"
    order = ["find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(XRealSlicer)",
             "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.index(line) for line in order]
    assert positions == sorted(positions)
    readme = re.search(r'set\(EXTENSION_README_FILE "([^"]+)"\)', text)
    assert readme is None or (REPO_DIR / readme.group(1)).is_file()


def test_requirements_are_the_engine_dependencies():
    import tomllib

    dependencies = tomllib.loads((REPO_DIR / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [line.strip() for line in (MODULE_DIR / "Resources" / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in lines if line and not line.startswith("#")]
    assert sorted(requirements) == sorted(dependencies)


def test_the_vocabulary_is_read_from_the_engine_not_copied():
    assert not list(MODULE_DIR.rglob("vocabulary.json")), "Slicer must read xreal_engine/vocabulary.json itself"
    source = "\n".join(p.read_text() for p in _python_files())
    assert "123037004" not in source and "8186001" not in source  # no SNOMED codes duplicated in the module


STUB_USE_SLICER = r"""
# Stand-in for Slicer's UseSlicer.cmake: the macros the extension calls, with the checks Slicer's own
# versions make (unknown keywords and missing files are fatal), recording what was declared.
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
foreach(field HOMEPAGE CATEGORY CONTRIBUTORS DESCRIPTION ICONURL SCREENSHOTURLS DEPENDS)
  if(NOT DEFINED EXTENSION_${field})
    message(FATAL_ERROR "EXTENSION_${field} is not set before find_package(Slicer)")
  endif()
endforeach()
set(XREAL_STUB_REPORT ${CMAKE_BINARY_DIR}/stub-report.txt)
file(WRITE ${XREAL_STUB_REPORT} "")
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(STUB "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(STUB_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords: ${STUB_UNPARSED_ARGUMENTS}")
  endif()
  foreach(file ${STUB_SCRIPTS} ${STUB_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${file})
      message(FATAL_ERROR "nonexistent file ${file}")
    endif()
    file(APPEND ${XREAL_STUB_REPORT} "file ${file}\n")
  endforeach()
  file(APPEND ${XREAL_STUB_REPORT} "module ${STUB_NAME}\n")
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(STUB "" "SCRIPT;TESTNAME_PREFIX" "SLICER_ARGS" ${ARGN})
  get_filename_component(script ${STUB_SCRIPT} ABSOLUTE)
  if(NOT EXISTS ${script})
    message(FATAL_ERROR "nonexistent test script ${STUB_SCRIPT}")
  endif()
  get_filename_component(name ${script} NAME_WE)
  file(APPEND ${XREAL_STUB_REPORT} "test py_${STUB_TESTNAME_PREFIX}${name}\n")
endmacro()
"""


def test_cmake_configures_and_installs_the_engine_beside_the_module(tmp_path):
    """Real CMake runs the extension's CMakeLists against a stand-in Slicer (Slicer itself cannot be built here)."""
    import shutil

    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "UseSlicer.cmake").write_text(STUB_USE_SLICER)
    (stub / "empty.cmake").write_text("")
    (stub / "SlicerConfig.cmake").write_text(
        "set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)\n"
        "set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)\n"
        "set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)\n")
    build = tmp_path / "build"
    configure = subprocess.run([cmake, "-S", str(REPO_DIR), "-B", str(build), f"-DSlicer_DIR={stub}",
                                "-DBUILD_TESTING=ON"], capture_output=True, text=True, timeout=300)
    assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-2000:]
    report = (build / "stub-report.txt").read_text().splitlines()
    assert "module XRealSlicer" in report and "test py_XRealSlicer" in report
    assert "file XRealSlicerLib/request.py" in report and "file Resources/UI/XRealSlicer.ui" in report
    modules = build / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    assert (modules / "xreal_engine" / "client.py").is_file() and (modules / "xreal_engine" / "vocabulary.json").is_file()
    assert not list((modules / "xreal_engine").rglob("__pycache__"))
    install = subprocess.run([cmake, "--install", str(build), "--prefix", str(tmp_path / "installed")],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    installed = tmp_path / "installed" / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    assert (installed / "xreal_engine" / "client.py").is_file()
    assert (installed / "xreal_engine" / "cli" / "__main__.py").is_file()  # the launcher runs python -m xreal_engine.cli serve
