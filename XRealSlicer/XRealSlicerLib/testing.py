"""A stand-in engine for the tests that run without one (pytest here, the module's self-test in Slicer).

``ReplayEngineClient`` answers like ``xreal_engine.client.EngineClient``: a submitted job is queued,
runs through a few polls of the anatomy and pathology stages, succeeds, and its download is a copy of
a committed result folder (``Resources/Testing/Result``: a 64 x 64 SC + SEG made by the demo model).
So the module's job planning, the runner, the timer's progress handling and the result import are
exercised by default, in ctest too, without the engine's Python. No Qt here.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Dict, List, Optional

from .connection import local_model_info
from .enginepath import MODULE_DIR, find_engine_root

EXAMPLE_RESULT_DIR = MODULE_DIR / "Resources" / "Testing" / "Result"

def replay_info() -> dict:
    """``/info`` of the replaying engine: the demo model's (its xreal_model.json), plus a PACS destination."""
    info = local_model_info("demo", find_engine_root()) or {}
    info.update(engine_version="replay", device="none (replayed result)", model_state="ready",
                pacs={"destinations": ["replay-pacs"], "sources": []})
    return info


class ReplayEngineClient:
    """Every job runs ``polls`` status polls (two stages), then succeeds with a copy of ``result_dir``."""

    def __init__(self, result_dir: Path = EXAMPLE_RESULT_DIR, polls: int = 4, info: Optional[dict] = None):
        self.result_dir = Path(result_dir)
        self.polls = max(1, int(polls))
        self._info = dict(replay_info() if info is None else info)
        self.submitted: List[dict] = []  # each job's fields as submitted (files as names)
        self.pushed: List[tuple] = []
        self._polled: Dict[str, int] = {}
        self._cancelled = set()
        self._lock = threading.Lock()

    # the EngineClient methods the module uses

    def health(self) -> dict:
        return {"status": "ok"}

    def info(self) -> dict:
        return json.loads(json.dumps(self._info))

    def submit(self, anatomy_path=None, pathologies=(), image_path=None, **fields) -> dict:
        with self._lock:
            job_id = f"replay-{len(self.submitted) + 1}"
            self.submitted.append({
                "anatomy": Path(anatomy_path).name if anatomy_path else None,
                "pathologies": [(Path(path).name, finding) for path, finding in pathologies],
                "image": Path(image_path).name if image_path else None,
                **{name: value for name, value in fields.items() if value is not None},
            })
            self._polled[job_id] = 0
        return {"id": job_id, "state": "queued"}

    def status(self, job_id: str) -> dict:
        with self._lock:
            if job_id in self._cancelled:
                return {"id": job_id, "state": "cancelled"}
            polled = self._polled[job_id] = self._polled[job_id] + 1
        if polled > self.polls:
            provenance = json.loads((self.result_dir / "provenance.json").read_text(encoding="utf-8"))
            return {"id": job_id, "state": "succeeded", "progress": 1.0, "dicom": provenance.get("dicom", {})}
        half = (self.polls + 1) // 2
        stage, step, total = ("anatomy", polled, half) if polled <= half else \
            ("pathology", polled - half, self.polls - half)
        return {"id": job_id, "state": "running", "stage": stage, "step": step, "total": total,
                "progress": polled / (self.polls + 1), "eta_seconds": float(self.polls + 1 - polled)}

    def cancel(self, job_id: str) -> dict:
        with self._lock:
            self._cancelled.add(job_id)
        return {"id": job_id, "state": "cancelled"}

    def download_all(self, job_id: str, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(self.result_dir, out_dir)
        return out_dir

    def push(self, job_id: str, destination: str) -> dict:
        self.pushed.append((job_id, destination))
        return {"id": job_id, "push": {"destination": destination, "ok": True, "accepted": 2,
                                       "instances": [{"file": "sc.dcm", "status": "accepted"},
                                                     {"file": "seg.dcm", "status": "accepted"}]}}

    def shutdown(self) -> None:
        pass
