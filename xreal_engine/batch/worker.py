"""One batch worker: the model (and the segmenter) loaded once, then rows run through ``generate.py``.

Every backend builds one :class:`RowWorker` per process / Ray actor / accelerate rank and hands it
rows as plain dicts (``BatchRow.to_json()``: picklable and JSON-able). A row's outcome is a plain
dict too: ``{"name", "row", "status": finished|failed|dropped|stopped, "reason", "quality", "seconds"}``.
A row is finished only when ``generate_to_directory`` renamed its directory into place. ``stopped``: the
disk is full (or over quota): not the row's fault, and every further row would fail alike, so the run
stops and the row stays pending for the next run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..errors import StorageError, XRealError, os_reason
from ..model.loading import AUTO_RUNTIME
from .manifest import BatchRow

IMAGES_DIR = "images"  # OUT/images/<name>/: one result directory per finished row
STOPPED = "stopped"  # a row's outcome when the disk is full: the run stops, the row is not a failure


@dataclass
class WorkerSettings:
    model: str
    out_dir: str
    device: str = "auto"
    dtype: str = "auto"
    # model/loading.py UNET_RUNTIMES: eager (--eager), frozen (--freeze), compiled (--compile), or AUTO_RUNTIME
    # (frozen for a small UNet on a CPU, else eager: what serve and generate-batch run without a flag)
    unet_runtime: str = AUTO_RUNTIME
    threads: Optional[int] = None  # torch CPU threads of this worker; None: model/loading.py's rule
    quality_check: bool = True
    segmenter: Optional[str] = None  # segmenter directory; None: the shipped one
    min_dice: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


def is_finished(result_dir: Path) -> bool:
    """Renamed into place (staging directories are hidden siblings) and complete."""
    return (Path(result_dir) / "provenance.json").is_file()


def disk_full(error: BaseException) -> bool:
    """The disk (or the quota) is full: a StorageError saying so, or an OSError ENOSPC / EDQUOT."""
    if isinstance(error, StorageError):
        return error.disk_full
    return isinstance(error, OSError) and StorageError("", os_reason(error)).disk_full


class RowWorker:
    def __init__(self, settings: WorkerSettings):
        from diffusers.utils import logging as diffusers_logging

        from ..model.loading import configure_threads, load_pipeline

        configure_threads(settings.threads)
        diffusers_logging.disable_progress_bar()  # one bar per run (the command's), not one per worker's load
        self.settings = settings
        self.images_dir = Path(settings.out_dir) / IMAGES_DIR
        self.pipe = load_pipeline(settings.model, settings.device, settings.dtype, runtime=settings.unet_runtime)
        # Rows of this worker that share an anatomy and seed share its anatomy stage (model/anatomy_cache.py).
        self.pipe.enable_anatomy_stage_cache()
        self.check = None
        if settings.quality_check:
            from .quality import AnatomyCheck

            self.check = AnatomyCheck.load(settings.segmenter, device=str(self.pipe.device),
                                           min_dice=settings.min_dice)

    def run(self, row: dict) -> dict:
        from ..generate import generate_to_directory, prepare_request
        from .quality import QualityRejected

        batch_row = BatchRow.from_json(row)
        out_dir = self.images_dir / batch_row.name
        outcome = {"name": batch_row.name, "row": batch_row.row, "status": "finished", "reason": "",
                   "quality": None, "seconds": 0.0}
        started = time.monotonic()
        try:
            if not is_finished(out_dir):
                prepared = prepare_request(batch_row.request(), self.pipe.model_info)
                provenance = generate_to_directory(self.pipe, prepared, out_dir, quality=self.check)
                outcome["quality"] = provenance.get("quality")
        except QualityRejected as rejected:
            outcome.update(status="dropped", reason=str(rejected), quality=rejected.quality)
        except Exception as error:  # one row's failure is recorded; the run goes on
            if is_finished(out_dir):  # another process finished it meanwhile (a run killed just before)
                return outcome
            if disk_full(error):
                outcome.update(status=STOPPED, reason=str(error))
                return outcome
            reason = str(error) if isinstance(error, XRealError) else f"{type(error).__name__}: {error}"
            outcome.update(status="failed", reason=" ".join(reason.split()) or type(error).__name__)
        outcome["seconds"] = round(time.monotonic() - started, 3)
        return outcome
