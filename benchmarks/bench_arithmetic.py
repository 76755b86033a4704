"""Where an image's time goes: the arithmetic of each network, the rate it runs at, and the floor.

``bench_speed.py`` says how fast; this says whether faster is possible on the machine at hand. For one
image (exact defaults and the fast preset, one pathology region) it counts the floating-point operations
of every network call (``torch.utils.flop_counter`` over a real generation), times the same image with a
clock around each network, and prints per network: calls, GFLOP per image, seconds, GFLOP/s achieved and
share of the image's time. It also measures this machine's rate on a large float32 matrix product at the
same thread count, a practical ceiling for dense arithmetic: **GFLOP per image / that rate is a floor**
that no implementation of the same algorithm, at the same precision, steps and threads, goes below.
Printed, never asserted.

    .venv/bin/python benchmarks/bench_arithmetic.py --model demo            # the demo model, ~30 s
    .venv/bin/python benchmarks/bench_arithmetic.py --preset full --steps 2 # official size (random weights)
    .venv/bin/python benchmarks/bench_arithmetic.py --model demo --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_speed import FINDING, build_random_pipeline, chest_masks  # noqa: E402  (the same model and masks)

NETWORKS = ("unet", "vae.encoder", "vae.decoder", "anatomy_controller.encoder", "anatomy_controller.decoder",
            "text_encoder")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model directory or 'demo' (default: random --preset)")
    parser.add_argument("--preset", default="full", help="random-weight architecture when no --model: full or tiny")
    parser.add_argument("--steps", type=int, default=0, help="steps per stage (default 0: the model's own)")
    parser.add_argument("--repeats", type=int, default=3, help="timed images per mode; the median is printed")
    parser.add_argument("--threads", type=int, default=None, help="default: the engine's own choice")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = parser.parse_args(argv)
    if args.steps < 0 or args.repeats < 1:
        parser.error("--steps must be >= 0 and --repeats >= 1")
    return args


def modules_of(pipe) -> dict:
    """The networks whose calls are counted, by dotted name (``vae.decoder``: what ``vae.decode`` runs)."""
    found = {}
    for name in NETWORKS:
        module = pipe
        for part in name.split("."):
            module = getattr(module, part)
        found[name] = module
    return found


class PerNetwork:
    """Forward hooks that add each network's FLOPs (from a FlopCounterMode) or seconds to its bucket."""

    def __init__(self, modules: dict, device, counter=None):
        import torch

        self.totals = dict.fromkeys(modules, 0.0)
        self.calls = dict.fromkeys(modules, 0)
        self._started = {}
        self._handles = []
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        now = (lambda: counter.get_total_flops()) if counter is not None else (lambda: (sync(), time.perf_counter())[1])
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self._started.__setitem__(n, now())))
            self._handles.append(module.register_forward_hook(lambda m, a, o, n=name: self._stop(n, now())))

    def _stop(self, name, value) -> None:
        self.totals[name] += value - self._started.pop(name)
        self.calls[name] += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def flop_counter():
    """torch's FlopCounterMode, also counting the CPU flash-attention kernel it has no formula for."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention(query_shape, key_shape, value_shape, *args, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention})


def matmul_rate(device, size: int = 1536, repeats: int = 5) -> float:
    """GFLOP/s of a size x size float32 matrix product, best of ``repeats``."""
    import torch

    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def one_image(pipe, parameters, masks, device, hooks_factory, seed=0):
    import torch

    hooks = hooks_factory()
    anatomy, pathology = masks
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    pipe(anatomy, pathologies=[(pathology, FINDING)], parameters=parameters,
         generator=torch.Generator(device=device).manual_seed(seed))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    hooks.remove()
    return hooks, time.perf_counter() - start


def main(argv=None) -> int:
    import torch

    with torch.inference_mode():  # not set_grad_enabled(False): a caller's (a test's) process keeps its autograd
        return measure(parse_args(argv))


def measure(args) -> int:
    import torch
    from xreal_engine.model.loading import configure_threads, resolve_threads
    from xreal_engine.model.sampling import FAST_PRESET, SamplingParameters

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_arithmetic: --device cuda was asked for but no CUDA device is available.")
    threads = resolve_threads(args.threads)
    previous_threads = torch.get_num_threads()
    configure_threads(threads)
    if args.model:
        from xreal_engine.model.info import resolve_model
        from xreal_engine.model.pipeline import XRealPipeline

        pipe = XRealPipeline.from_pretrained(str(resolve_model(args.model)))
    else:
        pipe = build_random_pipeline(args.preset)
    pipe = pipe.to(device)
    defaults = pipe.model_info.defaults
    masks = chest_masks(pipe.model_info.image_size, pipe.model_info.latent_size)
    modules = modules_of(pipe)
    ceiling = matmul_rate(device)
    print(f"# {pipe.model_info.model_id}, {device}, {threads} thread(s), torch {torch.__version__}; "
          f"float32 matrix product ({1536}^3): {ceiling:.1f} GFLOP/s")
    for label, sampler, steps in (("exact", "ddim", args.steps or defaults["num_inference_steps"]),
                                  ("fast", FAST_PRESET["sampler"], args.steps or FAST_PRESET["num_inference_steps"])):
        parameters = SamplingParameters.resolve(defaults, num_inference_steps=steps, sampler=sampler)
        counter = flop_counter()
        with counter:
            flops, _ = one_image(pipe, parameters, masks, device, lambda: PerNetwork(modules, device, counter))
        one_image(pipe, parameters, masks, device, lambda: PerNetwork(modules, device))  # warm-up
        timed = [one_image(pipe, parameters, masks, device, lambda: PerNetwork(modules, device))
                 for _ in range(args.repeats)]
        middle = sorted(timed, key=lambda run: run[1])[len(timed) // 2]
        seconds, image = middle[0].totals, middle[1]
        print(f"\n## {label}: {sampler} {steps} steps, one pathology region; median of {args.repeats} image(s) "
              f"({', '.join(f'{t:.2f}' for _, t in timed)} s)")
        print("| network | calls | GFLOP / image | seconds | GFLOP/s | share of the image |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name in NETWORKS:
            if flops.calls[name]:
                rate = flops.totals[name] / 1e9 / seconds[name] if seconds[name] else float("nan")
                print(f"| {name} | {flops.calls[name]} | {flops.totals[name] / 1e9:.2f} | {seconds[name]:.3f} | "
                      f"{rate:.1f} | {seconds[name] / image:.0%} |")
        total_flops, in_networks = sum(flops.totals.values()) / 1e9, sum(seconds.values())
        print(f"| all networks | | {total_flops:.1f} | {in_networks:.3f} | {total_flops / in_networks:.1f} | "
              f"{in_networks / image:.0%} |")
        print(f"| the rest (sampler, blends, masks, Python) | | | {image - in_networks:.3f} | | "
              f"{(image - in_networks) / image:.0%} |")
        print(f"\nimage {image:.2f} s (spread {statistics.pstdev(t for _, t in timed):.2f}); floor at the matrix-product "
              f"rate: {total_flops / ceiling:.2f} s ({total_flops:.0f} GFLOP / {ceiling:.0f} GFLOP/s)")
    torch.set_num_threads(previous_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
