"""``xreal-engine train calibrate-controller``: remove the anatomy controller's brightness bias.

Why: the demo model's fine-tuned anatomy controller makes rough images x_hat 0.04 brighter than the
training images it learnt from (mean 0.735 against 0.695 on the train split's own masks). The anatomy
stage keeps x_hat's brightness and sharpens it, so the highlights clip: 12.9 % burnt-white pixels against
4.4 % in real images, and clipped areas are flat, which also costs sharpness (issue 15). The fix is in
the controller, not in the sampler: an offset is added to the bias of the decoder's last convolution so
that ``clamp(y + offset)`` has the training images' mean brightness (every channel alike); the result is
again a plain AutoencoderKL.
Fitted on the train split only; the held-out splits are for ``evaluate``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..model.architecture import ANATOMY_LABEL_DIVISOR

CALIBRATION_FILE = "calibration.json"
BATCH_SIZE = 16


def decoder_outputs(controller, dataset) -> tuple[np.ndarray, np.ndarray]:
    """(the controller's unclamped output, channel mean; the real image) for every item, both (N, S, S)."""
    import torch

    outputs, targets = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=False)
    with torch.inference_mode():
        for batch in loader:
            source = (torch.as_tensor(batch["label"]).float() / ANATOMY_LABEL_DIVISOR).repeat(1, 3, 1, 1)
            latent = controller.encode(source).latent_dist.mode()
            outputs.append(controller.decode(latent).sample.mean(dim=1).numpy())
            targets.append(torch.as_tensor(batch["image"]).float()[:, 0].numpy())
    return np.concatenate(outputs), np.concatenate(targets)


def fit_offset(outputs: np.ndarray, targets: np.ndarray, iterations: int = 50) -> float:
    """The offset ``o`` for which ``clamp(outputs + o)`` has the targets' mean brightness (bisection).

    An offset, not a least-squares gain and offset: the least-squares gain (0.97 on the demo controller) is
    regression to the mean, it compresses the contrast the anatomy stage needs (measured: 0.4 % burnt-white
    pixels on training masks against 2.6 % real, where matching the mean alone leaves the highlights).
    """
    goal = float(targets.mean())
    low, high = -1.0, 1.0
    for _ in range(iterations):  # mean(clamp(outputs + o)) grows with o
        middle = (low + high) / 2
        if np.clip(outputs + middle, 0, 1).mean() < goal:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def apply_offset(controller, offset: float) -> None:
    """Fold ``y + offset`` into the bias of the decoder's last convolution (every output channel alike)."""
    import torch

    with torch.no_grad():
        controller.decoder.conv_out.bias.add_(offset)


def _summary(outputs: np.ndarray, targets: np.ndarray) -> dict:
    clamped = np.clip(outputs, 0, 1)
    return {"mean": float(clamped.mean()), "real_mean": float(targets.mean()),
            "l1": float(np.abs(clamped - targets).mean())}


def check_controller(controller_dir: Path, image_size: int | None) -> int:
    """Refuse a directory that is not a 3-channel AutoencoderKL; returns the image size to calibrate at
    (its config's ``sample_size`` unless given), which must be a positive multiple of its downsampling."""
    config_path = controller_dir / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderKL":
        raise InputError(f"--anatomy-controller {controller_dir} is not an AutoencoderKL directory "
                         f"({config_path.name} is missing or names another class).")
    if config.get("in_channels", 3) != 3 or config.get("out_channels", 3) != 3:
        raise InputError(f"--anatomy-controller {controller_dir} is not an anatomy controller (it needs 3 input and 3 output channels).")
    size = int(image_size if image_size is not None else config.get("sample_size") or 0)
    factor = 2 ** (len(config.get("block_out_channels", [0])) - 1)
    if size < factor * 2 or size > 4096 or size % factor:
        raise InputError(f"The image size must be a multiple of {factor} from {factor * 2} to 4096, not {size}.")
    return size


def calibrate_controller(controller_dir: Path, data: Path, out: Path, image_size: int | None = None) -> dict:
    """Write OUT/model, the calibrated AutoencoderKL with its calibration.json; returns that file's content."""
    from diffusers import AutoencoderKL

    from .data import make_dataset, read_records
    from .loop import publish

    image_size = check_controller(Path(controller_dir), image_size)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # before any work; it has nothing to resume
        raise InputError(f"The output directory {out} is not empty; choose a new one.")
    records = read_records(data, "train", require_labels=True)
    if not records:
        raise InputError(f"{data} has no training images with anatomy labels to calibrate on.")
    try:
        controller = AutoencoderKL.from_pretrained(controller_dir).eval()
    except (OSError, ValueError, RuntimeError, TypeError) as error:
        raise InputError(f"--anatomy-controller {controller_dir} could not be loaded ({str(error).splitlines()[0]}).") from None
    dataset = make_dataset(records, image_size, with_label=True, augment=False)
    outputs, targets = decoder_outputs(controller, dataset)
    offset = fit_offset(outputs, targets)
    report = {"split": "train", "images": len(records), "offset": offset,
              "before": _summary(outputs, targets), "after": _summary(outputs + offset, targets)}

    out.mkdir(parents=True, exist_ok=True)
    staging = out / "model.partial"
    shutil.rmtree(staging, ignore_errors=True)
    apply_offset(controller, offset)
    controller.save_pretrained(staging)
    (staging / CALIBRATION_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    publish(staging, out / "model")
    return report


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--anatomy-controller", required=True, type=Path,
                        help="the anatomy controller to calibrate (an AutoencoderKL directory, e.g. a model's anatomy_controller/)")
    parser.add_argument("--data", required=True, type=Path, help="training data directory (see `prepare-data`); train split only")
    parser.add_argument("--out", required=True, type=Path, help="run directory; the result is OUT/model")
    parser.add_argument("--image-size", type=int,
                        help="the model's image size (default: the controller's sample_size, 128 for the demo model)")
    parser.add_argument("--num-threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")


def run(args: argparse.Namespace) -> int:
    from .loop import set_threads

    set_threads(args)
    report = calibrate_controller(args.anatomy_controller, args.data, args.out, args.image_size)
    before, after = report["before"], report["after"]
    print(f"Calibrated on {report['images']} training images: offset {report['offset']:+.4f}; "
          f"mean {before['mean']:.3f} -> {after['mean']:.3f} (real {before['real_mean']:.3f}), "
          f"L1 {before['l1']:.4f} -> {after['l1']:.4f}. The controller is in {Path(args.out) / 'model'}")
    return 0
