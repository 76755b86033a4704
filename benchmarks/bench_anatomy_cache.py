"""What the anatomy-stage cache (xreal_engine/model/anatomy_cache.py) saves when a job is regenerated.

The Slicer user's loop: the `make demo` job (one pathology region), then the same anatomy and seed with
another finding. Interleaved rounds, a new seed each round, so every first job misses and every second
one reuses the anatomy stage; round 1 also runs the second job on an uncached pipeline and prints
whether the two images are bit for bit equal. Prints seconds per image (min / median) and the ratio.

    .venv/bin/python benchmarks/bench_anatomy_cache.py [--model demo] [--fast] [--rounds 3] [--threads 1]
        [--runtime eager|frozen|auto]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "Resources" / "Templates"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--fast", action="store_true", help="the fast preset instead of the model's defaults")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: the engine's (model/loading.py)")
    parser.add_argument("--runtime", default="eager", help="the UNet runtime: eager, frozen, compiled or auto "
                        "(what serve and generate-batch run: frozen on a CPU)")
    parser.add_argument("--findings", default="cardiomegaly,pneumonia", help="the first job's, then the second's")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from xreal_engine.io.masks import resample_to_grid
    from xreal_engine.model.loading import configure_threads, load_pipeline
    from xreal_engine.model.sampling import SamplingParameters

    args = parse_args(argv)
    threads = configure_threads(args.threads)
    first_finding, second_finding = [f.strip() for f in args.findings.split(",")]
    cached = load_pipeline(args.model, args.device, args.dtype, runtime=args.runtime).enable_anatomy_stage_cache()
    info = cached.model_info
    grid = (info.image_size, info.image_size)
    labels = resample_to_grid(np.array(Image.open(TEMPLATES / "anatomy_01.png")).astype(np.int64), grid, "labels")
    region = resample_to_grid((np.array(Image.open(TEMPLATES / "pathology_cardiomegaly.png")) > 0).astype(np.uint8),
                              grid, "mask") > 0
    parameters = SamplingParameters.resolve(info.defaults, fast=args.fast)
    device = cached.device

    def job(pipe, finding, seed):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        output = pipe(labels, pathologies=[(region.astype(np.uint8), finding)], parameters=parameters,
                      generator=torch.Generator(device=device).manual_seed(seed))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, output

    job(cached, first_finding, 10_000)  # warm-up (allocator, first-call costs), not counted
    cached.anatomy_stage_cache.clear()
    firsts, seconds, ratios = [], [], []
    identical = None
    for round_index in range(args.rounds):
        seed = round_index
        first_time, first = job(cached, first_finding, seed)
        second_time, second = job(cached, second_finding, seed)
        if first.anatomy_stage_reused or not second.anatomy_stage_reused:
            print("error: the cache did not behave as expected (first reused or second not)", file=sys.stderr)
            return 1
        if round_index == 0:
            uncached = load_pipeline(args.model, args.device, args.dtype)  # eager: the reference image
            identical = bool(np.array_equal(job(uncached, second_finding, seed)[1].image, second.image))
            del uncached
        firsts.append(first_time)
        seconds.append(second_time)
        ratios.append(first_time / second_time)
        print(f"round {round_index + 1}: new job {first_time:.2f} s, regenerated {second_time:.2f} s", file=sys.stderr,
              flush=True)

    print(f"model {info.model_id}, {parameters.sampler} {parameters.num_inference_steps} steps "
          f"({parameters.anatomy_steps} anatomy), {device}, {args.dtype}, UNet {cached.unet_runtime}, "
          f"{threads} thread(s), {args.rounds} rounds")
    print("| job | s/image min | median | x new job (median, range) |")
    print("| --- | --- | --- | --- |")
    print(f"| new anatomy or seed ({first_finding}) | {min(firsts):.2f} | {statistics.median(firsts):.2f} | 1 |")
    print(f"| same anatomy and seed, {second_finding} (anatomy stage reused) | {min(seconds):.2f} | "
          f"{statistics.median(seconds):.2f} | {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")
    print(f"regenerated image bit for bit equal to an uncached eager pipeline's: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
