"""The training loop every ``train`` command shares: run directory, accelerate, steps, checkpoints, resume.

Split out of ``training/cli.py`` so that trainers in their own modules (``training/controlnet.py``) use the
same loop without importing the command module (which imports them).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

from ..errors import InputError, ModelError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TRAINER_STATE = "trainer_state.json"


def prepare_out_dir(out: Path, resume: bool) -> Path | None:
    """Refuse to mix runs: a new run needs an empty OUT; --resume needs a checkpoint. Returns it."""
    checkpoints = sorted(
        (p for p in (out / "checkpoints").glob("step-*") if (p / TRAINER_STATE).is_file()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    if resume:
        if not checkpoints:
            raise InputError(f"--resume was given but {out}/checkpoints holds no complete checkpoint.")
        return checkpoints[-1]
    # A run that failed before its first step (on its data, say) leaves only its config.yaml: a retry may
    # use the folder; anything else in it is someone's work.
    if out.exists() and {path.name for path in out.iterdir()} - {"config.yaml"}:
        raise InputError(f"The output directory {out} is not empty; choose a new one or pass --resume.")
    out.mkdir(parents=True, exist_ok=True)
    return None


def make_accelerator(mixed_precision: str):
    """accelerate on whatever device exists; fp16 autocast only where it helps (CUDA)."""
    import torch
    from accelerate import Accelerator

    if mixed_precision == "auto":
        mixed_precision = "fp16" if torch.cuda.is_available() else "no"
    if mixed_precision != "no" and not torch.cuda.is_available():
        raise InputError(f"--mixed-precision {mixed_precision} needs a CUDA GPU; use 'no' on a CPU.")
    return Accelerator(mixed_precision=mixed_precision)


def infinite(loader):
    """Batches forever, epoch after epoch (the loops count steps, not epochs)."""
    while True:
        yield from loader


class Trainer:
    """The shared loop: steps, logging, checkpoints every N steps, resume, progress bar with the loss."""

    def __init__(self, args, config: dict, accelerator):
        self.args = args
        self.config = config
        self.training = config["training"]
        self.accelerator = accelerator
        self.out = Path(args.out)
        self.step = 0

    def save_checkpoint(self) -> None:
        if not self.accelerator.is_main_process:
            return
        target = self.out / "checkpoints" / f"step-{self.step}"
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        self.accelerator.save_state(str(partial))
        (partial / TRAINER_STATE).write_text(json.dumps({"step": self.step}), encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        keep = max(int(self.training.get("keep_checkpoints", 2)), 1)
        complete = sorted((p for p in target.parent.glob("step-*") if p.name.split("-")[1].isdigit()),
                          key=lambda p: int(p.name.split("-")[1]))
        for stale in complete[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)

    def load_checkpoint(self, checkpoint: Path) -> None:
        self.accelerator.load_state(str(checkpoint))
        self.step = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))["step"]

    def run(self, batches, train_step) -> list[float]:
        """Call ``train_step(batch) -> loss`` until max_steps; returns the losses of this session."""
        from tqdm.auto import tqdm

        max_steps = int(self.training["max_steps"])
        every = int(self.training.get("checkpoint_every", 500))
        log_every = int(self.training.get("log_every", 10))
        losses: list[float] = []
        started = time.time()
        bar = tqdm(total=max_steps, initial=self.step, desc=self.args.kind, disable=not self.accelerator.is_main_process)
        with (self.out / "log.jsonl").open("a", encoding="utf-8") as log:
            while self.step < max_steps:
                loss = float(train_step(next(batches)))
                if not math.isfinite(loss):
                    raise ModelError(f"Training diverged at step {self.step + 1} (loss {loss}); lower the learning rate.")
                self.step += 1
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.step % log_every == 0 or self.step == max_steps:
                    recent = losses[-log_every:]
                    log.write(json.dumps({"step": self.step, "loss": sum(recent) / len(recent),
                                          "seconds": round(time.time() - started, 1)}) + "\n")
                    log.flush()
                if self.step % every == 0 or self.step == max_steps:
                    self.save_checkpoint()
        bar.close()
        return losses


def set_threads(args) -> None:
    """``--num-threads`` of a train command (0 leaves torch's default)."""
    import torch

    if args.num_threads is not None and args.num_threads < 0:
        raise InputError(f"--num-threads must be 0 (torch's default) or more, not {args.num_threads}.")
    if args.num_threads:
        from ..model.loading import resolve_threads  # the one rule: 1 to the usable CPUs

        torch.set_num_threads(resolve_threads(args.num_threads))


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_resolved_config(out: Path, config: dict) -> None:
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def publish(staging: Path, final: Path) -> None:
    """Replace ``final`` by the completely written ``staging`` directory."""
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
