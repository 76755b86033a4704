"""The training loop every ``train`` command shares: run directory, accelerate, steps, checkpoints, resume.

Split out of ``training/cli.py`` so that trainers in their own modules (``training/controlnet.py``) use the
same loop without importing the command module (which imports them).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from ..errors import InputError, ModelError, StorageError, XRealError, first_line, os_reason
from ..files import give_umask_modes

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TRAINER_STATE = "trainer_state.json"
# What to do when the finished model could not be written: its checkpoints are complete.
INTERRUPTED_RESUME = "the checkpoints are kept; free some space and run the same command with --resume"


# What a run writes before its first complete checkpoint; a folder holding only these may be used again.
UNSAVED_RUN_FILES = ("config.yaml", "vocab.txt", "log.jsonl", "checkpoints")
# What --resume may change: how long to train and how often to log and save. Anything else in the config
# (the architecture, the data settings, the learning rate, the seed) would not continue the same run.
RESUMABLE_CHANGES = ("training.max_steps", "training.checkpoint_every", "training.log_every",
                     "training.keep_checkpoints")


def prepare_out_dir(out: Path, resume: bool, kind: str | None = None, config: dict | None = None) -> list[Path]:
    """Refuse to mix runs: a new run needs an empty OUT; --resume needs a checkpoint of the same run.

    Returns OUT's complete checkpoints, newest first (none for a new run); ``Trainer.resume`` loads the newest
    that reads.
    """
    checkpoints = sorted(
        (p for p in (out / "checkpoints").glob("step-*")
         if p.name.split("-", 1)[1].isdigit() and (p / TRAINER_STATE).is_file()),
        key=lambda p: int(p.name.split("-")[1]), reverse=True,
    )
    if resume:
        if not checkpoints:
            raise InputError(f"--resume was given but {out}/checkpoints holds no complete checkpoint.")
        _check_same_run(out, checkpoints, kind, config)
        return checkpoints
    # A run that failed before its first checkpoint (on its data, a full disk) leaves only files of its own:
    # a retry may use the folder, they are written anew. Anything else in it is someone's work.
    if checkpoints or (out.exists() and {path.name for path in out.iterdir()} - set(UNSAVED_RUN_FILES)):
        raise InputError(f"The output directory {out} is not empty; choose a new one or pass --resume.")
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # holds no complete checkpoint (above)
    with contextlib.suppress(FileNotFoundError):
        (out / "log.jsonl").unlink()
    return []


def _check_same_run(out: Path, checkpoints: list[Path], kind: str | None, config: dict | None) -> None:
    """--resume continues the run in OUT exactly, or refuses: another ``train`` kind, or another setting."""
    recorded = next((state["kind"] for state in map(_trainer_state, checkpoints) if state and "kind" in state), None)
    if kind and recorded and recorded != kind:
        raise InputError(f"{out} holds a `train {recorded}` run, not `train {kind}`; resume it with "
                         f"`train {recorded} --resume`, or choose a new output directory.")
    try:
        previous = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        previous = None  # nothing to compare with (an older run): the checkpoint decides
    if config is None or not isinstance(previous, dict):
        return
    for key, (before, now) in _differences(previous, config).items():
        if key.startswith("inputs.") and "inputs" not in previous:
            continue  # a run made before its inputs were recorded: the checkpoint decides
        if key.startswith("inputs."):
            raise InputError(f"--resume was given another {key.split('.', 1)[1].replace('_', '-')} than the run in "
                             f"{out} was trained with (its files differ); give the same one, or start a new run in "
                             "a new output directory.")
        if key not in RESUMABLE_CHANGES:
            raise InputError(f"--resume would change {key} from {before!r} to {now!r}, so it would not continue "
                             f"the run in {out}; resume with its settings ({out}/config.yaml) or start a new run "
                             "in a new output directory (only the step count and checkpoint intervals may change).")


def _differences(previous: dict, now: dict, prefix: str = "") -> dict:
    """``{"a.b": (before, now)}`` for each setting ``now`` gives another value; settings the run added to its
    own config.yaml while it ran (a measured scale factor) and ``now`` does not give are not differences."""
    found = {}
    for key, value in now.items():
        name = f"{prefix}{key}"
        before = previous.get(key, None) if isinstance(previous, dict) else None
        if isinstance(value, dict) and isinstance(before, dict):
            found.update(_differences(before, value, name + "."))
        elif before != value:
            found[name] = (before, value)
    return found


def _trainer_state(checkpoint: Path) -> dict | None:
    """A checkpoint's trainer_state.json, or None when it does not read (a damaged checkpoint)."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("step"), int) else None


def refuse_steps_below(step: int, max_steps: int, out: Path) -> None:
    """--resume with fewer steps than the run has made would publish a model of more steps than asked for."""
    if step > max_steps:
        raise InputError(f"The run in {out} has already made {step} steps, more than --max-steps {max_steps}; "
                         f"give --max-steps {step} or more to resume it.")


def checkpoint_step(checkpoint: Path) -> int | None:
    """The step a checkpoint was saved at, or None when its trainer_state.json does not read."""
    state = _trainer_state(checkpoint)
    return state["step"] if state else None


def make_accelerator(mixed_precision: str):
    """accelerate on whatever device exists; fp16 autocast only where it helps (CUDA)."""
    import torch
    from accelerate import Accelerator

    if mixed_precision == "auto":
        mixed_precision = "fp16" if torch.cuda.is_available() else "no"
    if mixed_precision != "no" and not torch.cuda.is_available():
        raise InputError(f"--mixed-precision {mixed_precision} needs a CUDA GPU; use 'no' on a CPU.")
    return Accelerator(mixed_precision=mixed_precision)


def built(what: str, source: str, make, then: str = ""):
    """``make()`` a network from a config section or a model directory, or one sentence naming ``source``
    and the library's reason (a damaged weights file, a group count that does not divide the channels)."""
    try:
        return make()
    except XRealError:
        raise
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as error:
        raise InputError(f"{what} could not be made from {source} ({first_line(error)}){then}.") from None


def infinite(loader):
    """Batches forever, epoch after epoch (the loops count steps, not epochs)."""
    while True:
        yield from loader


class StepBatches:
    """A batch sampler whose batch for step k depends only on (seed, k), so a resumed run draws exactly the
    batches the uninterrupted run would have drawn, also from the middle of an epoch.

    Epoch e is a permutation of the items from ``numpy.random.default_rng([seed, e])``; its batches are
    consecutive slices (the last, short one dropped when ``drop_last``). Items are ``(draw, index)``: the
    draw number seeds the item's augmentation (``SeededDraws``). Endless; the Trainer counts the steps.
    """

    def __init__(self, size: int, batch_size: int, seed: int, drop_last: bool):
        self.size, self.batch_size, self.seed = int(size), int(batch_size), int(seed)
        whole, rest = divmod(self.size, self.batch_size)
        self.per_epoch = max(whole if drop_last else whole + bool(rest), 1)
        self.start_step = 0  # set by Trainer.run to the step it resumes from

    def batch(self, step: int) -> list:
        epoch, position = divmod(step, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        chunk = order[position * self.batch_size:(position + 1) * self.batch_size]
        return [(step * self.batch_size + offset, int(index)) for offset, index in enumerate(chunk)]

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


class SeededDraws:
    """``dataset[index]`` with the randomness of draw ``draw`` seeded by (seed, draw): MONAI's random
    transforms (``transform.set_random_state``) and torch's generator, the latter restored afterwards, so
    fetching items (also ahead, as accelerate's loader does) never moves the training's own random stream."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        import torch

        draw, index = key
        seed = int(np.random.SeedSequence([self.seed, draw]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transform = getattr(self.dataset, "transform", None)
            if hasattr(transform, "set_random_state"):
                transform.set_random_state(seed=seed)
            return self.dataset[index]


def step_loader(dataset, batch_size: int, seed: int):
    """The training DataLoader of every trainer: ``StepBatches`` over ``SeededDraws`` (exact resume)."""
    import torch

    batch_size = int(batch_size)
    sampler = StepBatches(len(dataset), batch_size, seed, drop_last=len(dataset) > batch_size)
    # Its own generator: starting an iterator draws a base seed, which must not come from the training's
    # stream (a resumed run starts its iterator at another point of it).
    return torch.utils.data.DataLoader(SeededDraws(dataset, seed), batch_sampler=sampler,
                                       generator=torch.Generator().manual_seed(seed))


def _step_batches(loader) -> StepBatches | None:
    """The StepBatches under a (possibly accelerate-wrapped) loader, or None."""
    sampler = loader
    for _ in range(4):
        sampler = getattr(sampler, "batch_sampler", None)
        if sampler is None or isinstance(sampler, StepBatches):
            return sampler
    return None


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
        with written_or_removed(f"The checkpoint {target.name}", partial, "the earlier checkpoints are kept; free "
                                "some space and run the same command with --resume"):
            self.accelerator.save_state(str(partial))
            (partial / TRAINER_STATE).write_text(json.dumps({"step": self.step, "kind": self.args.kind}),
                                                 encoding="utf-8")
        give_umask_modes(partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        keep = max(int(self.training.get("keep_checkpoints", 2)), 1)
        complete = sorted((p for p in target.parent.glob("step-*") if p.name.split("-")[1].isdigit()),
                          key=lambda p: int(p.name.split("-")[1]))
        for stale in complete[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)

    def load_checkpoint(self, checkpoint: Path) -> None:
        step = checkpoint_step(checkpoint)
        if step is None:
            raise ValueError(f"{TRAINER_STATE} does not read")
        self.accelerator.load_state(str(checkpoint))
        self.step = step

    def resume(self, checkpoints: list[Path]) -> Path:
        """Load the newest checkpoint that reads (``checkpoints`` newest first) and return it.

        A checkpoint damaged after it was written (a full disk, a copy cut short) is skipped with a warning,
        so one bad file costs the steps since the checkpoint before it, not the run.
        """
        problems = []
        for checkpoint in checkpoints:
            try:
                self.load_checkpoint(checkpoint)
            except Exception as error:  # noqa: BLE001 (torch, safetensors, pickle and accelerate each raise their own)
                problems.append(f"{checkpoint.name}: {first_line(error)}")
                continue
            refuse_steps_below(self.step, int(self.training["max_steps"]), self.out)
            if problems:
                print(f"warning: skipped damaged checkpoint(s) ({'; '.join(problems)}); resuming from "
                      f"{checkpoint.name}.", file=sys.stderr)
            self._forget_log_after(self.step)
            return checkpoint
        raise InputError(f"No checkpoint in {self.out / 'checkpoints'} could be read ({'; '.join(problems)}); "
                         "start again in a new output directory.")

    def _forget_log_after(self, step: int) -> None:
        """Drop log.jsonl lines past ``step``: they are trained again, and the log is to read as one run."""
        log = self.out / "log.jsonl"
        if not self.accelerator.is_main_process or not log.is_file():
            return
        kept = []
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                logged = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short when the run was stopped
            if logged <= step:
                kept.append(line + "\n")
        staging = log.with_name(log.name + ".partial")
        staging.write_text("".join(kept), encoding="utf-8")
        staging.replace(log)

    def run(self, loader, train_step) -> list[float]:
        """Call ``train_step(batch) -> loss`` until max_steps; returns the losses of this session.

        ``loader``: a ``step_loader`` (prepared by accelerate or not), which continues at the resumed step;
        any other iterable of batches is taken as it is.
        """
        from tqdm.auto import tqdm

        sampler = _step_batches(loader)
        if sampler is not None:
            sampler.start_step = self.step
            batches = iter(loader)
        else:
            batches = loader if hasattr(loader, "__next__") else infinite(loader)

        max_steps = int(self.training["max_steps"])
        every = int(self.training.get("checkpoint_every", 500))
        log_every = int(self.training.get("log_every", 10))
        losses: list[float] = []
        started = time.time()
        bar = tqdm(total=max_steps, initial=self.step, desc=self.args.kind, disable=not self.accelerator.is_main_process)
        with (self.out / "log.jsonl").open("a", encoding="utf-8") as log, contextlib.closing(bar):
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
        return losses


def set_threads(args) -> None:
    """``--num-threads`` of a train command (0 leaves torch's default)."""
    import torch

    if args.num_threads is not None and args.num_threads < 0:
        raise InputError(f"--num-threads must be 0 (torch's default) or more, not {args.num_threads}.")
    if args.num_threads:
        from ..model.loading import resolve_threads  # the one rule: 1 to the usable CPUs

        torch.set_num_threads(resolve_threads(args.num_threads, "--num-threads"))


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_inputs(data_dir, **models) -> dict:
    """What a run is trained from, for ``config["inputs"]``: the data set's table and each given model's
    weights by sha256, so that --resume refuses other data, another --vae or --anatomy-controller."""
    import hashlib

    from ..model.info import weights_hash

    table = Path(data_dir) / "findings.csv"
    inputs = {"data": hashlib.sha256(table.read_bytes()).hexdigest() if table.is_file() else None}
    return {**inputs, **{name: weights_hash(path) for name, path in models.items() if path}}


def write_resolved_config(out: Path, config: dict) -> None:
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


@contextlib.contextmanager
def written_or_removed(what: str, staging: Path, then: str = "free some space and run the same command again"):
    """Write ``staging`` in the block; on failure remove it and raise one StorageError sentence.

    torch and safetensors report a full disk as a RuntimeError or their own error class, not an OSError, so
    the CLI's OSError sentence does not catch them.
    """
    try:
        yield
    except XRealError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as error:  # noqa: BLE001 (torch, safetensors and accelerate raise their own types)
        shutil.rmtree(staging, ignore_errors=True)
        reason = _write_reason(error, staging.parent)
        raise StorageError(f"{what} could not be written in {staging.parent} ({reason}); {then}.", reason) from None


def _write_reason(error: Exception, folder: Path) -> str:
    if isinstance(error, OSError):
        return os_reason(error)
    text = str(error)
    try:
        full = shutil.disk_usage(folder).free < (16 << 20)
    except OSError:
        full = False
    if full or "No space left" in text or "unexpected pos" in text:  # torch's zip writer on a full disk
        return "the disk is full"
    return first_line(error)


def publish(staging: Path, final: Path) -> None:
    """Replace ``final`` by the completely written ``staging`` directory (its files with the umask's modes)."""
    give_umask_modes(staging)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
