"""Speed and memory of the XReal sampler at the full official size, with random weights.

Builds the official architecture from diffusers configs (``xreal_engine.model.architecture.component_configs
("full")``: UNet 224 channels x (1,2,4,4), 2 res blocks, cross-attention at 3 levels, 8 heads,
context 1280; LDM-BERT 32 x 1280 with 150 positions; two AutoencoderKL 128 x (1,2,4) at 256^2),
no weights file needed, and prints for float32 and for reduced-precision autocast (bfloat16 on
CPU, float16 on CUDA):

* seconds per UNet evaluation at batch 1 and batch 2 (median of --repeats after one warm-up),
* seconds per text-encoder call, autoencoder encode (256^2) and decode (64^2 latent),
* a short REAL run of XRealPipeline with --steps steps (timed, UNet calls counted),
* seconds and UNet evaluations per image for the default settings (100 steps, 50 anatomy steps,
  guidance 7), ESTIMATED as: the short run's cost outside the DDIM loops + 100 x (batch-1 UNet +
  batch-2 UNet) from the measured component times,
* peak memory: RSS on CPU (each precision runs in its own child process so the peaks are
  separate), torch.cuda.max_memory_allocated on CUDA.

Figures are printed, never asserted. Run with ``nice``; on a shared 2-core CPU the numbers
vary by tens of percent between runs.

    python benchmarks/bench_sampler.py --steps 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_STEPS = 100
DEFAULT_ANATOMY_STEPS = 50
FINDING = "cardiomegaly"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps of the short real pipeline run (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per component (after one warm-up)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's choice). On a shared CPU, --threads 1 gives CPU "
                             "times free of OpenMP spin-waiting, which otherwise inflates them")
    parser.add_argument("--precision", choices=["both", "float32", "reduced"], default="both",
                        help="which precision to measure; 'both' runs each in its own process")
    parser.add_argument("--preset", default="full", help="model size: full (official, default) or tiny (checks the script)")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # child -> parent result
    return parser.parse_args(argv)


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_sampler: --device cuda was asked for but no CUDA device is available.")
    return device


def build_pipeline(device, preset: str = "full"):
    """XRealPipeline with the preset's architecture and random float32 weights (no file is read)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import BertTokenizer

    from xreal_engine.model.architecture import component_configs
    from xreal_engine.model.info import ModelInfo
    from xreal_engine.model.pipeline import XRealPipeline

    configs = component_configs(preset, vocab_size=30522)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        vocab = Path(folder) / "vocab.txt"  # a small vocabulary: ids stay below BERT's 30522 rows
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", FINDING]) + "\n")
        tokenizer = BertTokenizer(str(vocab), do_lower_case=True, model_max_length=150)
    pipe = XRealPipeline(
        vae=AutoencoderKL(**configs["autoencoder"]),
        anatomy_controller=AutoencoderKL(**configs["autoencoder"]),
        unet=UNet2DConditionModel(**configs["unet"]),
        text_encoder=LDMBertModel(LDMBertConfig(**configs["text_encoder"])),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**configs["scheduler"]),
        model_info=ModelInfo(model_id=f"benchmark-random-{preset}", image_size=configs["image_size"],
                             latent_size=configs["latent_size"], findings=[FINDING]),
    )
    return pipe.to(device)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device, repeats: int) -> dict:
    """Wall seconds (median, min) and process CPU seconds (median) of ``function()`` after one warm-up.

    On a CPU shared with other work the wall time grows with the load; the CPU time of this process
    (all its threads) does much less, and CPU seconds / threads estimates the wall time on an idle machine
    (with several threads, OpenMP spin-waiting for a descheduled thread still inflates it: use --threads 1).
    """
    function()
    synchronize(device)
    walls, cpus = [], []
    for _ in range(repeats):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        function()
        synchronize(device)
        walls.append(time.perf_counter() - wall_start)
        cpus.append(time.process_time() - cpu_start)
    return {"wall": statistics.median(walls), "wall_min": min(walls), "cpu": statistics.median(cpus)}


def peak_memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def chest_masks(image_size: int, latent_size: int):
    """A plausible anatomy label map (two lungs, heart, aorta) and a pathology disc over the heart."""
    import numpy as np

    rows, cols = np.mgrid[0:image_size, 0:image_size] / image_size
    anatomy = np.zeros((image_size, image_size), dtype=np.uint8)
    anatomy[((cols - 0.3) / 0.15) ** 2 + ((rows - 0.5) / 0.3) ** 2 < 1] = 2  # right lung, image left
    anatomy[((cols - 0.7) / 0.15) ** 2 + ((rows - 0.5) / 0.3) ** 2 < 1] = 1
    anatomy[((cols - 0.55) / 0.12) ** 2 + ((rows - 0.62) / 0.1) ** 2 < 1] = 3
    anatomy[((cols - 0.52) / 0.03) ** 2 + ((rows - 0.3) / 0.03) ** 2 < 1] = 4
    lat_rows, lat_cols = np.mgrid[0:latent_size, 0:latent_size] / latent_size
    pathology = ((((lat_cols - 0.55) / 0.1) ** 2 + ((lat_rows - 0.62) / 0.08) ** 2) < 1).astype(np.float32)
    return anatomy, pathology


def measure(device, reduced: bool, steps: int, repeats: int, preset: str = "full", threads: int = 0) -> dict:
    """All figures for one precision in this process."""
    import torch

    torch.set_grad_enabled(False)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    build_start = time.perf_counter()
    pipe = build_pipeline(device, preset)
    build_seconds = time.perf_counter() - build_start
    reduced_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    pipe.autocast_dtype = reduced_dtype if reduced else None
    autocast = (torch.autocast(device_type=device.type, dtype=reduced_dtype) if reduced
                else torch.autocast(device_type=device.type, enabled=False))
    info = pipe.model_info
    latent = torch.randn(1, 3, info.latent_size, info.latent_size, device=device)
    image = torch.rand(1, 3, info.image_size, info.image_size, device=device)
    context = torch.randn(2, 150, pipe.text_encoder.config.d_model, device=device)
    tokens = torch.randint(0, 6, (1, 150), device=device)
    timestep = torch.tensor(501, device=device)

    def unet(batch):
        def call():
            with torch.inference_mode(), autocast:
                pipe.unet(latent.repeat(batch, 1, 1, 1), timestep, encoder_hidden_states=context[:batch]).sample
        return call

    def text_encoder():
        with torch.inference_mode(), autocast:
            pipe.text_encoder(tokens)[0]

    def encode():
        with torch.inference_mode(), autocast:
            pipe.vae.encode(image).latent_dist.mean

    def decode():
        with torch.inference_mode(), autocast:
            pipe.vae.decode(latent).sample

    figures = {
        "preset": preset, "image_size": info.image_size, "latent_size": info.latent_size, "precision": f"{str(reduced_dtype).removeprefix('torch.')} autocast" if reduced else "float32",
        "device": str(device), "threads": torch.get_num_threads(), "build_seconds": build_seconds,
    }
    figures["load_average_start"] = os.getloadavg()[0]
    for name, function, count in (("unet_b1", unet(1), repeats), ("unet_b2", unet(2), repeats),
                                  ("text_encoder", text_encoder, max(1, repeats - 1)),
                                  ("ae_encode", encode, max(1, repeats - 1)), ("ae_decode", decode, max(1, repeats - 1))):
        figures[name] = timed(function, device, count)

    # A short real run of the sampler: counts UNet calls and measures the cost outside the DDIM loops.
    unet_calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: unet_calls.append(args[0].shape[0]),
                                               with_kwargs=True)
    anatomy, pathology = chest_masks(info.image_size, info.latent_size)
    generator = torch.Generator(device=device).manual_seed(0)
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    pipe(anatomy, pathologies=[(pathology, FINDING)], num_inference_steps=steps, anatomy_steps=steps // 2,
         guidance_scale=7.0, eta=1.0, generator=generator)
    synchronize(device)
    run = {"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu_start}
    hook.remove()
    figures["load_average_end"] = os.getloadavg()[0]
    figures["run"] = run
    figures["run_steps"] = steps
    figures["run_unet_calls"] = len(unet_calls)
    figures["run_unet_batch_sizes"] = sorted(set(unet_calls))
    for clock in ("wall", "cpu"):
        per_step = figures["unet_b1"][clock] + figures["unet_b2"][clock]
        fixed = max(0.0, run[clock] - steps * per_step)
        figures[f"fixed_{clock}"] = fixed
        figures[f"image_{clock}_estimate"] = fixed + DEFAULT_STEPS * per_step
    figures["image_unet_calls"] = 2 * DEFAULT_STEPS  # stage A: 100 at batch 1; stage B: 100 at batch 2 (cond+uncond)
    figures["image_unet_samples"] = 3 * DEFAULT_STEPS
    figures["peak_memory_bytes"] = peak_memory_bytes(device)
    return figures


def run_child(args, precision: str) -> dict:
    """Measure one precision in a fresh process, so that its peak RSS is its own."""
    command = [sys.executable, str(Path(__file__).resolve()), "--json", "--precision", precision,
               "--steps", str(args.steps), "--repeats", str(args.repeats), "--device", args.device,
               "--preset", args.preset, "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if result.returncode != 0:
        raise SystemExit(f"bench_sampler: the {precision} measurement failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(results: list[dict]) -> None:
    gib = 1024**3
    first = results[0]
    threads = first["threads"]
    print(f"XReal sampler, {first['preset']} architecture, random weights, device {first['device']}, {threads} threads")
    print("wall = elapsed seconds (median of repeats; min in brackets); CPU = this process's CPU seconds "
          f"(all threads); CPU / {threads} = what an idle machine would take with {threads} thread(s)")
    for r in results:
        print(f"\n[{r['precision']}]  build {r['build_seconds']:.1f} s; load average {r['load_average_start']:.1f} "
              f"at start, {r['load_average_end']:.1f} at end")
        for key, label in (("unet_b1", "UNet evaluation, batch 1"), ("unet_b2", "UNet evaluation, batch 2"),
                           ("text_encoder", "LDM-BERT (1 x 150 tokens)"), ("ae_encode", f"AutoencoderKL encode {r['image_size']}^2"),
                           ("ae_decode", f"AutoencoderKL decode {r['latent_size']}^2 latent")):
            t = r[key]
            print(f"  {label + ':':36s} wall {t['wall']:7.2f} s ({t['wall_min']:.2f})   CPU {t['cpu']:7.2f} s "
                  f"-> idle {t['cpu'] / threads:6.2f} s")
        print(f"  real XRealPipeline run, {r['run_steps']} steps ({r['run_steps'] // 2} anatomy steps): "
              f"wall {r['run']['wall']:.1f} s, CPU {r['run']['cpu']:.1f} s; {r['run_unet_calls']} UNet calls at "
              f"batch sizes {r['run_unet_batch_sizes']}; outside the DDIM loops: wall {r['fixed_wall']:.1f} s, "
              f"CPU {r['fixed_cpu']:.1f} s")
        print(f"  per image at the defaults (100 steps, 50 anatomy steps, guidance 7): {r['image_unet_calls']} UNet "
              f"calls ({r['image_unet_samples']} sample-evaluations); ESTIMATED from the short run + 100 x (batch-1 + "
              f"batch-2 UNet): wall {r['image_wall_estimate'] / 60:.1f} min here, "
              f"idle-machine {r['image_cpu_estimate'] / threads / 60:.1f} min")
        print(f"  peak memory: {r['peak_memory_bytes'] / gib:.2f} GiB "
              f"({'CUDA max allocated' if r['device'].startswith('cuda') else 'process peak RSS'})")
    if len(results) == 2:
        fp32, reduced = results
        print(f"\nratio {reduced['precision']} / float32 (wall, CPU):")
        for key, label in (("unet_b1", "UNet batch 1"), ("unet_b2", "UNet batch 2"), ("text_encoder", "LDM-BERT"),
                           ("ae_encode", "AE encode"), ("ae_decode", "AE decode")):
            print(f"  {label:30s} {reduced[key]['wall'] / fp32[key]['wall']:6.2f} {reduced[key]['cpu'] / fp32[key]['cpu']:6.2f}")
        print(f"  {'seconds per image (estimate)':30s} {reduced['image_wall_estimate'] / fp32['image_wall_estimate']:6.2f} "
              f"{reduced['image_cpu_estimate'] / fp32['image_cpu_estimate']:6.2f}")
        print(f"  {'peak memory':30s} {reduced['peak_memory_bytes'] / fp32['peak_memory_bytes']:6.2f}")
    print("\nReference (fixture README): the ORIGINAL code on this 2-core CPU, float32: UNet batch 1 2.3 s, batch 2 4.5 s, "
          "300 batch-1 UNet passes + 3 encodes + 3 decodes + 3 BERT calls, about 12 min per image.")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        raise SystemExit("bench_sampler: --steps and --repeats must be at least 1.")
    if args.json:
        figures = measure(pick_device(args.device), args.precision == "reduced", args.steps, args.repeats, args.preset,
                          args.threads)
        print(json.dumps(figures))
        return 0
    precisions = ["float32", "reduced"] if args.precision == "both" else [args.precision]
    report([run_child(args, precision) for precision in precisions])
    return 0


if __name__ == "__main__":
    sys.exit(main())
