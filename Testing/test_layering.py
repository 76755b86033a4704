"""The folders are layers: imports point one way, there are no import circles, and the stdlib-only
modules stay stdlib-only (docs/architecture.md). Read from the source with ``ast``, function-level
imports included, so a lazy import cannot hide a circle."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "xreal_engine"

# Who may not import whom (prefixes of dotted module names below xreal_engine).
FORBIDDEN = {
    "model": ("cli", "service", "pacs", "training", "generate", "batch"),
    "io": ("cli", "service", "pacs", "training", "generate", "model", "batch"),
    "generate": ("cli", "service", "pacs", "training", "batch"),
    "pacs": ("cli", "service", "training", "generate", "model", "batch"),
    "training": ("cli", "service", "pacs", "batch"),
    "batch": ("cli", "service", "pacs"),
    "service": ("cli",),  # batch/manifest.py checks the service's batch manifests too
    "client": ("cli", "service", "model", "io", "pacs", "training", "generate", "batch"),
    "errors": ("",), "vocabulary": ("cli", "service", "model", "io", "pacs", "training", "generate", "client", "batch"),
    "files": ("cli", "service", "model", "io", "pacs", "training", "generate", "client", "batch"),
    "control_spec": ("cli", "service", "model", "io", "pacs", "training", "generate", "client", "batch"),
}
# Modules that Slicer's bare Python (or a machine without torch) imports.
STDLIB_ONLY = ("errors", "vocabulary", "files", "client", "model.info", "model.sampling", "cli", "cli.arguments",
               "cli.submit", "cli.__main__", "control_spec")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(modules of this package it imports, other packages it imports at module level).

    Third-party imports inside functions are not counted: they run only when that function is called
    (e.g. ``safetensors`` for the parameter counts of ``info``), not when the module is imported.
    """
    name = _module_name(path)
    is_package = path.name == "__init__.py"
    package_parts = name.split(".") if is_package else name.split(".")[:-1]
    if name == "":
        package_parts = []
    internal, external = set(), set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function = {id(inner) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for inner in ast.walk(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "xreal_engine":
                    internal.add(alias.name.partition(".")[2])
                elif id(node) not in in_function:
                    external.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module.split(".")[0] == "xreal_engine":
                    base = node.module.partition(".")[2]
                else:
                    if id(node) not in in_function:
                        external.add(node.module.split(".")[0])
                    continue
            else:
                anchor = package_parts[: len(package_parts) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # "from . import vocabulary" names a module
                candidate = f"{base}.{alias.name}" if base else alias.name
                internal.add(candidate if _exists(candidate) else base)
    return {module for module in internal if module}, external


def _exists(module: str) -> bool:
    path = PACKAGE.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


GRAPH = {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_one_way(module):
    for layer, forbidden in FORBIDDEN.items():
        if module == layer or module.startswith(layer + "."):
            for target in GRAPH[module][0]:
                for prefix in forbidden:
                    assert not (target == prefix or target.startswith(prefix + ".") or prefix == ""), \
                        f"{module} imports {target}, which its layer ({layer}) may not import"


def test_there_are_no_import_circles():
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, (set(), set()))[0]):
            target = target if target in GRAPH else target.rsplit(".", 1)[0]
            if target == module or target not in GRAPH:
                continue
            assert state.get(target) != 1, "import circle: " + " -> ".join(trail + [module, target])
            if target not in state:
                visit(target, trail + [module])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])


@pytest.mark.parametrize("module", STDLIB_ONLY)
def test_stdlib_only_modules_import_no_third_party_package(module):
    _, external = GRAPH[module]
    third_party = {name for name in external if name not in sys.stdlib_module_names and name != "__future__"}
    assert not third_party, f"{module} imports {sorted(third_party)}"
    for target in GRAPH[module][0]:  # and what they import is stdlib-only too
        target = target if target in GRAPH else target.rsplit(".", 1)[0]
        assert target in STDLIB_ONLY or target == "", f"{module} imports {target}, which is not stdlib-only"


def test_no_module_is_longer_than_400_lines_without_a_reason_at_its_top():
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > 420:  # "about 400"
            head = "\n".join(lines[:30]).lower()
            assert "why this file is long" in head, f"{path.relative_to(PACKAGE)} has {len(lines)} lines"
