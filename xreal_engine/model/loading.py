"""Loading a model directory onto a device: the words of ``--device`` / ``--dtype`` and the weights hash."""

from __future__ import annotations

from ..errors import InputError, ModelError, XRealError
from .info import resolve_model, weights_hash
from .pipeline import XRealPipeline


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


def load_pipeline(model: str = "demo", device: str = "auto", dtype: str = "auto"):
    """Load a model directory (or the shipped demo model) onto the chosen device."""
    model_dir = resolve_model(model)
    torch_device, torch_dtype = select_device(device, dtype)
    try:
        pipe = XRealPipeline.from_pretrained(str(model_dir))
    except XRealError:
        raise
    except Exception as error:  # a broken directory: say which, not a traceback
        raise ModelError(f"The model at {model_dir} could not be loaded: {error}") from error
    pipe = pipe.to(torch_device, torch_dtype)
    pipe.weights_hash = weights_hash(model_dir)
    return pipe
