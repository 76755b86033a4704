"""Shared pytest fixtures. Tests may read ../shared (CI has it beside the checkout)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("XREAL_SHARED_DIR", REPO_DIR.parent / "shared")).resolve()

# Single-threaded torch: reproducible numbers and no fight over the 2 CI cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:  # torch is optional for the client / Slicer-library tests
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


# Modules whose tests all start processes (the engine service, Orthanc, CMake) or train networks.
# Their tests are marked slow here, in one place; other slow tests carry @pytest.mark.slow themselves.
# `pytest -m "not slow"` runs the rest in under two minutes; `make test` runs everything.
SLOW_MODULES = {
    "test_server_service", "test_server_pacs", "test_pacs_orthanc", "test_slicer_lib", "test_training_cli",
    "test_server_controls",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO_DIR


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.skip(f"../shared is not present at {SHARED_DIR}")
    return SHARED_DIR


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir: Path) -> Path:
    return shared_dir / "fixtures" / "xreal_reference"
