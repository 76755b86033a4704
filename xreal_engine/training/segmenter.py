"""Anatomy segmenter for evaluation: the ``train segmenter`` command and the model that scores images.

Anatomy adherence of a generated X-ray is measured by segmenting it with a network
trained on real images only (the training split) and comparing the segmentation with
the mask that was requested. The network is a small MONAI UNet with one sigmoid output
per structure (left lung, right lung, heart), so overlapping structures are allowed.
Its Dice on real test images is the ceiling for every number measured on generated ones.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError, ModelError
from ..files import give_umask_modes

# label value in the anatomy label map -> structure name; the output channels follow this order.
STRUCTURES = {1: "left lung", 2: "right lung", 3: "heart"}
WEIGHTS_FILE = "segmenter.safetensors"
CONFIG_FILE = "segmenter.json"
SHIPPED_SEGMENTER_DIR = Path(__file__).resolve().parents[1] / "segmenter"
NETWORK_PRESETS = {
    # ~1.6 M parameters, stored in float16 (~3.3 MB): enough context at 128 px for the heart.
    "small": {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2},
    # for tests: a few thousand parameters.
    "tiny": {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1},
}


# ----------------------------------------------------------------------------- data


@dataclass
class AnatomySample:
    """One training-layout item that has all three anatomy structures drawn."""

    sample_id: str
    image_path: Path
    label_path: Path
    finding: str


def read_layout(data_dir: Path, split: str) -> list[AnatomySample]:
    """Items of ``split`` in DATA/{images,labels}/<id>.png + DATA/findings.csv that carry lungs and heart.

    Items without an anatomy mask (e.g. unlabelled pneumonia images) are skipped: they
    cannot teach or score anatomy.
    """
    data_dir = Path(data_dir)
    findings_csv = data_dir / "findings.csv"
    if not findings_csv.is_file():
        raise InputError(
            f"{data_dir} is not a training data directory: {findings_csv.name} is missing "
            "(create one with `xreal-engine prepare-data`)."
        )
    with findings_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"id", "split"} <= set(rows[0]):
        raise InputError(f"{findings_csv} must have the columns id, split and finding.")
    samples = []
    for row in rows:
        if row["split"] != split:
            continue
        image_path = data_dir / "images" / f"{row['id']}.png"
        label_path = data_dir / "labels" / f"{row['id']}.png"
        if not (image_path.is_file() and label_path.is_file()):
            continue
        labels = np.asarray(Image.open(label_path))
        if all((labels == value).any() for value in STRUCTURES):
            samples.append(AnatomySample(row["id"], image_path, label_path, row.get("finding", "") or ""))
    return samples


def load_image(path: Path, size: int) -> np.ndarray:
    """Grey image as float32 in [0, 1] at ``size``² (bilinear)."""
    image = Image.open(path).convert("L")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0


def load_labels(path: Path, size: int) -> np.ndarray:
    """Integer label map at ``size``² (nearest neighbour, so no label is invented)."""
    labels = Image.open(path)
    if labels.size != (size, size):
        labels = labels.resize((size, size), Image.NEAREST)
    return np.asarray(labels).astype(np.int64)


def labels_to_channels(labels: np.ndarray) -> np.ndarray:
    """(..., H, W) label map -> (..., 3, H, W) float masks, one channel per structure."""
    return np.stack([(labels == value) for value in STRUCTURES], axis=-3).astype(np.float32)


# ----------------------------------------------------------------------------- network


def build_network(preset: str = "small") -> torch.nn.Module:
    from monai.networks.nets import UNet

    if preset not in NETWORK_PRESETS:
        raise InputError(f"--preset must be one of {', '.join(NETWORK_PRESETS)}, not {preset!r}.")
    return UNet(spatial_dims=2, in_channels=1, out_channels=len(STRUCTURES), **NETWORK_PRESETS[preset])


def standardize(images: torch.Tensor) -> torch.Tensor:
    """Per-image zero mean / unit variance, so generated and real images meet the network alike."""
    mean = images.mean(dim=(-2, -1), keepdim=True)
    std = images.std(dim=(-2, -1), keepdim=True).clamp_min(1e-3)
    return (images - mean) / std


def check_segmenter_files(directory: Path | None = None) -> Path:
    """The segmenter directory (None: the shipped one) if it holds a segmenter's files, else ModelError.

    Cheap (no network built): generate-batch asks it before writing anything, ``Segmenter.load`` again.
    """
    directory = Path(directory) if directory is not None else SHIPPED_SEGMENTER_DIR
    if not ((directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()):
        raise ModelError(f"{directory} holds no segmenter ({CONFIG_FILE} + {WEIGHTS_FILE}); "
                         "train one with `xreal-engine train segmenter --data DATA --out DIR`.")
    return directory


class Segmenter:
    """A trained segmenter directory (safetensors weights + segmenter.json) ready to predict."""

    def __init__(self, network: torch.nn.Module, config: dict, device: str = "cpu"):
        self.network = network.to(device).eval()
        self.config = config
        self.image_size = int(config["image_size"])
        self.device = device

    @classmethod
    def load(cls, directory: Path | None = None, device: str = "cpu") -> "Segmenter":
        from safetensors.torch import load_file

        directory = check_segmenter_files(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        config = json.loads(config_path.read_text())
        network = build_network(config["preset"])
        state = {name: tensor.float() for name, tensor in load_file(str(weights_path)).items()}
        try:
            network.load_state_dict(state)
        except RuntimeError as error:
            raise ModelError(f"{weights_path} does not match the {config['preset']!r} segmenter network.") from error
        return cls(network, config, device)

    @torch.no_grad()
    def probabilities(self, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """(N, H, W) images in [0, 1] -> (N, 3, H, W) per-structure probabilities at the input size."""
        images_t = torch.as_tensor(np.asarray(images, dtype=np.float32))
        height, width = images_t.shape[-2:]
        outputs = []
        for start in range(0, len(images_t), batch_size):
            batch = images_t[start : start + batch_size, None].to(self.device)
            if (height, width) != (self.image_size, self.image_size):
                batch = F.interpolate(batch, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
            probs = torch.sigmoid(self.network(standardize(batch)))
            if (height, width) != (self.image_size, self.image_size):
                probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
            outputs.append(probs.cpu())
        return torch.cat(outputs).numpy()

    def segment(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) images -> (N, 3, H, W) boolean masks (left lung, right lung, heart)."""
        return self.probabilities(images) > 0.5


def dice_per_structure(predicted: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Dice of two (3, H, W) boolean mask stacks, one number per structure (1.0 when both are empty)."""
    scores = {}
    for channel, name in enumerate(STRUCTURES.values()):
        a, b = predicted[channel].astype(bool), reference[channel].astype(bool)
        total = a.sum() + b.sum()
        scores[name] = 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)
    return scores


def mean_dice(segmenter: Segmenter, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    predicted = segmenter.segment(images)
    per_image = [dice_per_structure(p, labels_to_channels(l)) for p, l in zip(predicted, labels)]
    return {name: float(np.mean([d[name] for d in per_image])) for name in STRUCTURES.values()}


# ----------------------------------------------------------------------------- training


def _augmentation():
    """Geometry and intensity jitter (MONAI); no left/right flip, which would swap the lungs."""
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
    )

    return Compose(
        [
            RandAffined(
                keys=("image", "mask"),
                prob=0.8,
                rotate_range=0.15,
                scale_range=(0.1, 0.1),
                translate_range=(8, 8),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandAdjustContrastd(keys="image", prob=0.5, gamma=(0.6, 1.6)),
            RandScaleIntensityd(keys="image", prob=0.5, factors=0.2),
            RandGaussianSmoothd(keys="image", prob=0.3, sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2)),
            RandGaussianNoised(keys="image", prob=0.3, std=0.03),
        ]
    )


def load_arrays(samples: list[AnatomySample], size: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([load_image(s.image_path, size) for s in samples])
    labels = np.stack([load_labels(s.label_path, size) for s in samples])
    return images, labels


def save_segmenter(network: torch.nn.Module, config: dict, out_dir: Path) -> Path:
    """Write weights (float16 safetensors) + config via a temporary sibling: never a half-written segmenter."""
    from safetensors.torch import save_file

    from .loop import written_or_removed

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    state = {name: tensor.detach().cpu().to(torch.float16).contiguous() for name, tensor in network.state_dict().items()}
    with written_or_removed("The trained segmenter", staging):
        save_file(state, str(staging / WEIGHTS_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        give_umask_modes(staging)
    if out_dir.is_dir():  # empty, or an older segmenter being replaced file by file
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            (staging / name).replace(out_dir / name)
        staging.rmdir()
    else:
        staging.rename(out_dir)
    return out_dir


def train_segmenter(
    data_dir: Path,
    out_dir: Path,
    size: int = 128,
    epochs: int = 60,
    batch_size: int = 16,
    learning_rate: float = 2e-3,
    preset: str = "small",
    seed: int = 0,
    device: str = "cpu",
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Train on the train split, keep the weights with the best validation Dice, write ``out_dir``.

    Returns the written config (with per-epoch losses and the val/test Dice on real images).
    """
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / CONFIG_FILE).is_file():
        raise InputError(f"--out {out_dir} exists and is not a segmenter directory; choose an empty or new directory.")
    train_samples = read_layout(data_dir, "train")[:limit]
    if not train_samples:
        raise InputError(f"{data_dir} has no training images with left lung, right lung and heart masks.")
    val_samples = read_layout(data_dir, "val")[:limit]
    test_samples = read_layout(data_dir, "test")[:limit]

    set_determinism(seed)
    images, labels = load_arrays(train_samples, size)
    items = [{"image": img[None], "mask": labels_to_channels(lab)} for img, lab in zip(images, labels)]
    loader = DataLoader(Dataset(items, transform=_augmentation()), batch_size=batch_size, shuffle=True, num_workers=0)
    val_arrays = load_arrays(val_samples, size) if val_samples else None

    network = build_network(preset).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    loss_function = DiceCELoss(sigmoid=True)
    config = {
        "format_version": 1,
        "what": "anatomy segmenter for evaluating generated chest X-rays (not for clinical use)",
        "architecture": "monai.networks.nets.UNet",
        "preset": preset,
        "image_size": size,
        "structures": list(STRUCTURES.values()),
        "output": "one sigmoid channel per structure (overlaps allowed)",
        "trained_on": f"train split of {Path(data_dir).name} ({len(train_samples)} images with lungs and heart)",
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "epoch_losses": [],
    }
    segmenter = Segmenter(network, config, device)
    best_state, best_val = None, -1.0
    started = time.monotonic()
    bar = tqdm(range(epochs), desc="train segmenter", unit="epoch", disable=not progress)
    for epoch in bar:
        network.train()
        losses = []
        for batch in loader:
            image = standardize(batch["image"].as_tensor().to(device))
            loss = loss_function(network(image), batch["mask"].as_tensor().to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        scheduler.step()
        config["epoch_losses"].append(round(float(np.mean(losses)), 5))
        network.eval()
        if val_arrays is not None and (epoch % 5 == 4 or epoch == epochs - 1):
            val_dice = float(np.mean(list(mean_dice(segmenter, *val_arrays).values())))
            if val_dice > best_val:
                best_val, best_state = val_dice, {k: v.detach().clone() for k, v in network.state_dict().items()}
            bar.set_postfix(loss=f"{config['epoch_losses'][-1]:.3f}", val_dice=f"{val_dice:.3f}")
        else:
            bar.set_postfix(loss=f"{config['epoch_losses'][-1]:.3f}")
    if best_state is not None:
        network.load_state_dict(best_state)
    network.eval()
    config["training_seconds"] = round(time.monotonic() - started, 1)
    if val_arrays is not None:
        config["val_dice_real"] = mean_dice(segmenter, *val_arrays)
    if test_samples:
        config["test_dice_real"] = mean_dice(segmenter, *load_arrays(test_samples, size))
        config["test_images"] = len(test_samples)

    save_segmenter(network, config, out_dir)
    return config


# ----------------------------------------------------------------------------- command


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="training layout directory (from prepare-data)")
    parser.add_argument("--out", required=True, type=Path, help="directory for segmenter.safetensors + segmenter.json")
    parser.add_argument("--model", default=None, help="take the image size from this model (name or directory)")
    parser.add_argument("--size", type=int, default=None, help="image size when --model is not given (default 128)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--preset", choices=sorted(NETWORK_PRESETS), default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--limit", type=int, default=None, help="use at most N images per split (smoke tests)")


def run(args: argparse.Namespace) -> int:
    import math

    from ..model.loading import resolve_threads, select_device

    torch.set_num_threads(resolve_threads(args.threads))
    if args.model is not None and args.size is not None:
        raise InputError("Give either --model or --size, not both: the model fixes the image size.")
    size = 128 if args.size is None else args.size
    if args.model is not None:
        from ..model.info import resolve_model

        size = int(resolve_model(args.model).image_size)
    if size < 32 or size % 16:
        raise InputError(f"--size must be a multiple of 16 and at least 32, not {size}.")
    for option, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise InputError(f"{option} must be at least 1, not {value}.")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise InputError(f"--learning-rate must be a positive number, not {args.learning_rate}.")
    device = str(select_device(args.device, "float32")[0])  # the one rule for device words: auto, cpu, cuda[:N]
    config = train_segmenter(
        args.data, args.out, size=size, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, preset=args.preset, seed=args.seed, device=device, limit=args.limit,
    )
    print(f"segmenter written to {args.out} ({config['training_seconds']} s)")
    for split in ("val", "test"):
        dice = config.get(f"{split}_dice_real")
        if dice:
            print(f"  {split} Dice on real images: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items()))
    return 0
