"""A stand-in engine for the tests that run without one (pytest here, the module's self-test in Slicer).

``ReplayEngineClient`` answers like ``xreal_engine.client.EngineClient``: a submitted job (or each row of
a submitted batch) is queued, runs through a few polls of the anatomy and pathology stages, succeeds,
and its download is a copy of a committed result folder (``Resources/Testing/Result``: a 64 x 64 SC + SEG made by the demo model).
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
# The ControlNets the replaying engine offers when the demo model lists none, so that the panel's control
# widgets and the controls' upload are exercised without an engine (the replayed result stays the same).
REPLAY_CONTROLNETS = {"sobel": {"scale": 0.5}, "attention": {"scale": 1.0}}


def replay_info() -> dict:
    """``/info`` of the replaying engine: the demo model's (its xreal_model.json), plus a PACS destination and
    ControlNets."""
    info = local_model_info("demo", find_engine_root()) or {}
    info.update(engine_version="replay", device="none (replayed result)", model_state="ready",
                pacs={"destinations": ["replay-pacs"], "sources": []})
    info["controlnets"] = info.get("controlnets") or dict(REPLAY_CONTROLNETS)
    return info


class ReplayEngineClient:
    """Every job runs ``polls`` status polls (two stages), then succeeds with a copy of ``result_dir``."""

    def __init__(self, result_dir: Path = EXAMPLE_RESULT_DIR, polls: int = 4, info: Optional[dict] = None):
        self.result_dir = Path(result_dir)
        self.polls = max(1, int(polls))
        self._info = dict(replay_info() if info is None else info)
        self.submitted: List[dict] = []  # each job's fields as submitted (files as names)
        self.pushed: List[tuple] = []
        self.batches: List[dict] = []  # each batch as submitted: {"id", "rows", "quality_check"}
        self._polled: Dict[str, int] = {}
        self._cancelled = set()
        self._lock = threading.Lock()

    # the EngineClient methods the module uses

    def health(self) -> dict:
        return {"status": "ok"}

    def info(self) -> dict:
        return json.loads(json.dumps(self._info))

    def submit(self, anatomy_path=None, pathologies=(), image_path=None, controls=(), **fields) -> dict:
        for _name, path, _scale in controls:  # as EngineClient's upload would
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"The control file {path} does not exist.")
        with self._lock:
            job_id = f"replay-{len(self.submitted) + 1}"
            self.submitted.append({
                "anatomy": Path(anatomy_path).name if anatomy_path else None,
                "pathologies": [(Path(path).name, finding) for path, finding in pathologies],
                "image": Path(image_path).name if image_path else None,
                **({"controls": [(name, Path(path).name if path else None, scale) for name, path, scale in controls]}
                   if controls else {}),
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

    def submit_batch(self, manifest=None, rows=None, *, formats=None, quality_check=None, min_dice=None,
                     request_id=None) -> dict:
        """Every row becomes a job (recorded in ``submitted`` like a submit); the rows run one after the other."""
        jobs = []
        for row in rows or []:
            for path in [row.get("anatomy"), row.get("image")] + [p["mask"] for p in row.get("pathologies", [])]:
                if path is not None and not Path(path).is_file():  # as EngineClient's upload would
                    raise FileNotFoundError(f"The file {path} named in row {row.get('name')} does not exist.")
            fields = {k: v for k, v in row.items() if k not in ("name", "anatomy", "pathologies", "image", "controls")}
            controls = [(c["name"], c.get("file"), c.get("scale")) if isinstance(c, dict) else tuple(c)
                        for c in row.get("controls", [])]  # the manifest's form, as the engine reads it
            job = self.submit(row.get("anatomy"), [(p["mask"], p["finding"]) for p in row.get("pathologies", [])],
                              row.get("image"), controls=controls, **fields)
            jobs.append((str(row.get("name")), job["id"]))
        with self._lock:
            batch = {"id": f"replay-batch-{len(self.batches) + 1}", "rows": jobs, "quality_check": quality_check}
            self.batches.append(batch)
        return self.batch_status(batch["id"], advance=False)

    def batch_status(self, batch_id: str, advance: bool = True) -> dict:
        """A poll runs the first unfinished row one step further (the engine's worker runs one job at a time)."""
        batch = next(b for b in self.batches if b["id"] == batch_id)
        rows, counts = [], {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "dropped": 0, "cancelled": 0}
        advanced = not advance
        for number, (name, job_id) in enumerate(batch["rows"], start=1):
            with self._lock:
                polled, cancelled = self._polled[job_id], job_id in self._cancelled
            if cancelled:
                state = "cancelled"
            elif polled > self.polls:
                state = "succeeded"
            elif not advanced:
                state, advanced = self.status(job_id)["state"], True
            else:
                state = "running" if polled else "queued"
            counts[state] += 1
            rows.append({"row": number, "name": name, "job": job_id, "state": state, "dropped": False,
                         "progress": 1.0 if state == "succeeded" else min(polled, self.polls) / (self.polls + 1),
                         "error": None, "quality": None})
        final = counts["succeeded"] + counts["cancelled"] + counts["failed"] == len(rows)
        state = ("cancelled" if counts["cancelled"] else "finished") if final else             ("running" if counts["running"] or counts["succeeded"] else "queued")
        progress = sum(row["progress"] for row in rows) / max(1, len(rows))
        return {"id": batch_id, "state": state, "rows_total": len(rows), "counts": counts, "progress": progress,
                "eta_seconds": None if final else float(len(rows) * (self.polls + 1)) * (1.0 - progress),
                "quality_check": batch["quality_check"], "rows": rows}

    def cancel_batch(self, batch_id: str) -> dict:
        batch = next(b for b in self.batches if b["id"] == batch_id)
        for _name, job_id in batch["rows"]:
            if self._polled[job_id] <= self.polls:
                self.cancel(job_id)
        return self.batch_status(batch_id, advance=False)

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
