"""Loading a model directory onto a device: the words of ``--device`` / ``--dtype`` / ``--threads``.

torch and diffusers are imported by the functions that need them, so a command can set its
threads (``configure_threads``) before anything heavy is loaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import InputError, ModelError, XRealError
from .info import resolve_model, weights_hash

log = logging.getLogger("xreal_engine.model")


def usable_cores() -> int:
    """Logical CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text(encoding="ascii").split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def default_threads() -> int:
    """Half the usable logical CPUs, at least 1: the physical cores on an SMT machine, and on a shared
    machine room for the others. A torch thread that has to share its core makes every other one
    spin-wait for it: on this project's 2 busy cores the demo model took 7 s per image with 1 thread
    and 4 to 112 s with 2 (median 20); with the cores to itself 2 threads were 1.4x faster
    (benchmarks/README.md). ``--threads`` / ``OMP_NUM_THREADS`` give more where the cores are free."""
    return max(1, usable_cores() // 2)


def resolve_threads(threads: int | None = None, option: str = "--threads") -> int:
    """The CPU threads to use: ``threads`` if given, else a valid ``OMP_NUM_THREADS``, else
    :func:`default_threads`. Needs no torch (``serve`` exports it before torch is loaded).
    ``option``: the flag the user typed, for the message (``train`` calls it ``--num-threads``)."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InputError(f"{option} must be a whole number of at least 1, not {threads!r}.")
        if threads > usable_cores():  # more threads than cores only spin-wait on each other (default_threads)
            raise InputError(f"{option} {threads} is more than the {usable_cores()} CPUs this process may use; "
                             f"give 1 to {usable_cores()}.")
        return threads
    from_environment = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_environment.isdigit() and int(from_environment) >= 1:
        return int(from_environment)
    return default_threads()


def configure_threads(threads: int | None = None) -> int:
    """Set torch's CPU threads for this process (:func:`resolve_threads`) and return the number.

    One inter-op thread: nothing here runs operators in parallel with each other. The setting
    carries over to threads started later (the service's worker).
    """
    import torch

    chosen = resolve_threads(threads)
    torch.set_num_threads(chosen)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel work; then it stays as it is
        pass
    return chosen


def cpu_has_native_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 / AMX); elsewhere it is emulated and slow."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def select_device(device: str = "auto", dtype: str = "auto"):
    """Map the CLI's ``--device`` / ``--dtype`` words to torch objects: CUDA + float16 when there, else CPU + float32."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was requested but no CUDA GPU is available; use --device cpu.")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError(f"Unknown device '{device}'; use auto, cpu or cuda.")
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        torch_dtype = torch.float16 if device.startswith("cuda") else torch.float32
    elif dtype in names:
        torch_dtype = names[dtype]
    else:
        raise InputError(f"Unknown dtype '{dtype}'; use auto, float32, float16 or bfloat16.")
    if device == "cpu" and torch_dtype == torch.float16:
        raise InputError("float16 is not supported on the CPU; use float32 or bfloat16.")
    return torch.device(device), torch_dtype


def precision_warning(device, dtype) -> str | None:
    """A sentence when the chosen precision will be slow here (bfloat16 on a CPU without native bfloat16)."""
    import torch

    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bfloat16():
        return ("This CPU has no native bfloat16 (AVX512-BF16 or AMX); --dtype bfloat16 is emulated here and "
                "slower than float32.")
    return None


def compile_unet(pipe) -> None:
    """``torch.compile`` the UNet in place (opt-in ``--compile``): inductor with weight freezing.

    Call it after the pipeline has its device and precision (frozen weights are baked in). Each input
    shape compiles once (batch 1 for the anatomy stage, batch 2 for guided pathology stages), so the
    first image pays the compilation (benchmarks/README.md: what it gives and what it costs).
    """
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # constant weights: folded and pre-packed for oneDNN / cuBLAS
    pipe.unet.compile(dynamic=False)


UNET_RUNTIMES = ("eager", "frozen", "compiled")  # how the UNet runs: diffusers' module, --freeze, --compile
# What long-lived commands (serve, generate-batch, evaluate) run without a flag: "frozen" for a small UNet
# on a CPU, "eager" otherwise. Freezing gives the eager image bit for bit, 1.2x faster per image on the demo
# model (4 M parameters), and pays ~1 s of tracing once per process and input shape, so it suits a process
# that makes many images. A one-image `generate` stays eager (tracing made it slower); the full-size UNet
# (518 M) gains nothing frozen and traces for ~5 s per shape; on a GPU it is unmeasured (benchmarks/README.md).
AUTO_RUNTIME = "auto"
AUTO_FREEZE_MAX_PARAMETERS = 100_000_000


def unet_runtime(freeze: bool = False, compile: bool = False, eager: bool = False, default: str = "eager") -> str:
    """The ``UNET_RUNTIMES`` word for the ``--freeze`` / ``--compile`` / ``--eager`` flags (one sentence if
    more than one is given); ``default`` (a runtime word or ``AUTO_RUNTIME``) when none is."""
    given = [flag for flag, on in (("--freeze", freeze), ("--compile", compile), ("--eager", eager)) if on]
    if len(given) > 1:
        raise InputError(f"{', '.join(given[:-1])} and {given[-1]} cannot be combined; choose one.")
    return "frozen" if freeze else "compiled" if compile else "eager" if eager else default


def add_unet_runtime_arguments(parser, long_lived: bool = False) -> None:
    """``--freeze`` and ``--compile`` (and ``--eager`` where freezing is the CPU default): how the UNet runs."""
    parser.add_argument("--freeze", action="store_true",
                        help="run the UNet as a frozen TorchScript graph: the same image, cheaper steps on a CPU, "
                             "about a second of tracing per input shape first (benchmarks/README.md)"
                             + (f"; the default on a CPU for UNets of up to {AUTO_FREEZE_MAX_PARAMETERS // 10**6} M "
                                "parameters, such as the demo model's" if long_lived else ""))
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet: faster steps, but the first image pays minutes of compilation "
                             "(benchmarks/README.md)")
    if long_lived:
        parser.add_argument("--eager", action="store_true",
                            help="run the UNet as diffusers' module, not frozen (the default on a GPU and for "
                                 "larger UNets)")


def check_unet_runtime(runtime: str, device, unet_parameters: int) -> str:
    """A ``UNET_RUNTIMES`` word, with ``AUTO_RUNTIME`` resolved for ``device`` (a torch.device) and a UNet
    of ``unet_parameters`` parameters."""
    import torch

    if runtime == AUTO_RUNTIME:
        small = unet_parameters <= AUTO_FREEZE_MAX_PARAMETERS
        return "frozen" if torch.device(device).type == "cpu" and small else "eager"
    if runtime not in UNET_RUNTIMES:
        raise InputError(f"Unknown UNet runtime {runtime!r}; use {', '.join(UNET_RUNTIMES + (AUTO_RUNTIME,))}.")
    return runtime


def load_pipeline(model: str = "demo", device: str = "auto", dtype: str = "auto", runtime: str = "eager"):
    """Load a model directory (or the shipped demo model) onto the chosen device and precision.

    The UNet and text encoder take ``dtype``; the autoencoders stay float32 (``XRealPipeline.set_precision``).
    ``runtime`` (a ``UNET_RUNTIMES`` word or ``AUTO_RUNTIME``, see ``unet_runtime``): how the UNet runs, recorded
    as ``pipe.unet_runtime`` (what provenance shows). Threads are the caller's
    (``configure_threads`` first).
    """
    from .pipeline import XRealPipeline

    model_dir = resolve_model(model)
    torch_device, torch_dtype = select_device(device, dtype)
    warning = precision_warning(torch_device, torch_dtype)
    if warning:
        log.warning(warning)
    try:
        pipe = XRealPipeline.from_pretrained(str(model_dir))
    except XRealError:
        raise
    except Exception as error:  # a broken directory: say which, not a traceback
        raise ModelError(f"The model at {model_dir} could not be loaded: {error}") from error
    runtime = check_unet_runtime(runtime, torch_device, sum(p.numel() for p in pipe.unet.parameters()))
    pipe = pipe.to(torch_device).set_precision(torch_dtype)
    if runtime == "compiled":
        compile_unet(pipe)
    elif runtime == "frozen":
        from .frozen_unet import freeze_unet

        freeze_unet(pipe)
    pipe.unet_runtime = runtime
    pipe.weights_hash = weights_hash(model_dir)
    return pipe
