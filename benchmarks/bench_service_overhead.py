"""How much of a job's wall time the engine service adds on top of the model.

Starts the real ``xreal-engine serve`` (loopback, ``--port 0``) for each model, waits for the
model to load, runs one warm-up job, then ``--jobs`` jobs one after another through the stdlib
client and prints, per model (medians):

* total      client wall time: submit (upload + validation) -> succeeded -> result.zip downloaded
* model      ``generation_seconds`` from provenance.json: resampling + the XReal sampler
* overhead   total - model: HTTP, validation, queue pick-up, DICOM SC+SEG / preview / segment
             writing, status polling, the zip download
* split      submit round trip | writing (run_seconds - model) | download | the rest (pick-up, polling)

Models: a tiny random model (always) and the shipped demo model when it is installed
(``--model DIR`` adds any other). Figures are printed, never asserted. Run with ``nice``:
on a shared 2-core CPU the numbers vary between runs.

    python benchmarks/bench_service_overhead.py --jobs 3
    python benchmarks/bench_service_overhead.py --jobs 2 --demo-steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from xreal_engine.client import EngineClient


def write_masks(folder: Path, size: int) -> tuple[Path, Path]:
    labels = np.zeros((size, size), np.uint8)
    labels[size // 5: 4 * size // 5, size // 8: size // 2 - 2] = 2
    labels[size // 5: 4 * size // 5, size // 2 + 2: 7 * size // 8] = 1
    labels[size // 2: 3 * size // 4, 3 * size // 8: 5 * size // 8] = 3
    region = np.zeros((size, size), np.uint8)
    region[size // 3: size // 2, size // 6: size // 3] = 255
    Image.fromarray(labels).save(folder / "anatomy.png")
    Image.fromarray(region).save(folder / "region.png")
    return folder / "anatomy.png", folder / "region.png"


def start_engine(model_dir: str, data_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "xreal_engine.cli", "serve", "--port", "0", "--model", model_dir,
             "--data-dir", str(data_dir), "--max-queued-jobs", "4", "--retention-hours", "0"],
            stdout=subprocess.PIPE, stderr=log)
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    if not selector.select(timeout=300):
        process.kill()
        raise SystemExit(f"the engine did not start; see {log_path}")
    return process, process.stdout.readline().decode().strip().split("=", 1)[1]


def one_job(client: EngineClient, anatomy: Path, region: Path, steps: int | None, seed: int, out: Path) -> dict:
    started = time.perf_counter()
    job = client.submit(anatomy, [(region, "cardiomegaly")], steps=steps, seed=seed)
    submitted = time.perf_counter()
    job = client.wait(job["id"], poll_interval=0.02)
    finished = time.perf_counter()
    if job["state"] != "succeeded":
        raise SystemExit(f"benchmark job {job['state']}: {job['error']}")
    client.download_all(job["id"], out)
    downloaded = time.perf_counter()
    provenance = json.loads((out / "provenance.json").read_text())
    client.delete(job["id"])
    total = downloaded - started
    model = float(provenance["generation_seconds"])
    return {
        "total": total, "model": model, "overhead": total - model,
        "submit": submitted - started, "writing": job["run_seconds"] - model, "download": downloaded - finished,
        "rest": (finished - submitted) - job["run_seconds"], "steps": provenance["steps"],
    }


def bench_model(name: str, model_dir: str, jobs: int, steps: int | None, work: Path) -> None:
    from xreal_engine.model.info import ModelInfo

    size = ModelInfo.load(model_dir).image_size
    folder = work / name
    folder.mkdir()
    anatomy, region = write_masks(folder, size)
    process, url = start_engine(model_dir, folder / "data", folder / "engine.log")
    try:
        client = EngineClient(url, timeout=600)
        while (health := client.health())["model"] == "loading":
            time.sleep(0.2)
        if health["model"] != "ready":
            raise SystemExit(f"{name}: the model did not load: {health['model_error']}")
        one_job(client, anatomy, region, steps, 0, folder / "warm-up")
        runs = [one_job(client, anatomy, region, steps, seed, folder / f"run-{seed}") for seed in range(1, jobs + 1)]
        client.shutdown()
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    print(f"{name:<6} {size:>4}px {int(median['steps']):>5} steps  total {median['total']:8.2f} s  "
          f"model {median['model']:8.2f} s  overhead {median['overhead']:6.2f} s = "
          f"{100 * median['overhead'] / median['total']:5.1f} %  "
          f"[submit {median['submit']:.2f} | writing {median['writing']:.2f} | download {median['download']:.2f} | "
          f"rest {median['rest']:.2f}]  (median of {jobs})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3, help="timed jobs per model (after one warm-up)")
    parser.add_argument("--tiny-steps", type=int, default=None, help="steps for the tiny model (default: its own)")
    parser.add_argument("--demo-steps", type=int, default=None, help="steps for the demo model (default: its own, 100)")
    parser.add_argument("--model", action="append", default=[], help="another model directory (or name) to measure")
    args = parser.parse_args()

    from xreal_engine.errors import ModelError
    from xreal_engine.model.info import resolve_model
    from xreal_engine.model.random_model import create_random_model

    print(f"engine service overhead; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="xreal-bench-service-") as tmp:
        work = Path(tmp)
        tiny = create_random_model(work / "tiny-model", preset="tiny")
        bench_model("tiny", str(tiny), args.jobs, args.tiny_steps, work)
        try:
            demo = str(resolve_model("demo"))
        except ModelError as error:
            print(f"demo   skipped: {error}")
        else:
            bench_model("demo", demo, args.jobs, args.demo_steps, work)
        for index, model_dir in enumerate(args.model):
            bench_model(f"model{index + 1}", str(resolve_model(model_dir)), args.jobs, None, work)


if __name__ == "__main__":
    main()
