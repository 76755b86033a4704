"""Where the rows run: each backend yields one outcome per row (``worker.RowWorker.run``) as rows finish.

- ``local``: this process (``--workers 1``), or a ``concurrent.futures`` process pool of N workers
  (spawned, each loads the model once in its initializer);
- ``ray``: Ray Data ``map_batches`` with a stateful callable (one :class:`RowWorker` per actor,
  ``num_gpus=1`` per actor when the cluster has GPUs); connects to ``--ray-address`` or starts a
  local instance. The output directory must be on storage every node writes to;
- ``accelerate``: every process of ``accelerate launch`` runs the command; each takes its share of the
  rows with ``PartialState().split_between_processes`` on its own device.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Iterator, Optional

from ..errors import InputError
from .worker import RowWorker, WorkerSettings

RAY_INSTALL_HINT = "pip install 'xreal-engine[ray]'"
MAX_RAY_BLOCKS = 2000  # one block per row up to this many: outcomes stream back as rows finish

_process_worker: Optional[RowWorker] = None  # the local pool's worker, one per process


def iter_local(rows: list, settings: WorkerSettings, workers: int = 1) -> Iterator[dict]:
    if not rows:
        return
    if workers <= 1:
        worker = RowWorker(settings)
        for row in rows:
            yield worker.run(row)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_process_worker, initargs=(settings.to_dict(),))
    try:
        futures = [pool.submit(_run_in_process_worker, row) for row in rows]
        for future in as_completed(futures):
            yield future.result()
    finally:  # stopped early (Ctrl-C, an error): queued rows are not started; running ones finish or stop
        pool.shutdown(wait=True, cancel_futures=True)


def _start_process_worker(settings: dict) -> None:
    global _process_worker
    _process_worker = RowWorker(WorkerSettings(**settings))


def _run_in_process_worker(row: dict) -> dict:
    return _process_worker.run(row)


class RayRowWorker:
    """Ray Data's stateful callable: the model is loaded once, when the actor starts."""

    def __init__(self, settings: dict):
        self.worker = RowWorker(WorkerSettings(**settings))

    def __call__(self, batch: dict) -> dict:
        return {"outcome": [json.dumps(self.worker.run(json.loads(text))) for text in batch["row"]]}


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InputError(f"--backend ray needs Ray, which is not installed: {RAY_INSTALL_HINT}") from None
    return ray


def iter_ray(rows: list, settings: WorkerSettings, workers: int, address: Optional[str] = None) -> Iterator[dict]:
    """Rows as a Ray dataset through ``map_batches(RayRowWorker)``; an instance already initialised is used."""
    import logging

    ray = import_ray()
    if not rows:
        return
    started_here = not ray.is_initialized()
    if started_here:  # a cluster (--ray-address), or a new local instance with this machine's cores
        options = {"address": address} if address else {"include_dashboard": False}
        ray.init(log_to_driver=False, logging_level=logging.WARNING, **options)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # our bar and failures.csv say what happens
        gpus = ray.cluster_resources().get("GPU", 0) if settings.device != "cpu" else 0
        threads = settings.threads or 1
        dataset = ray.data.from_items([{"row": json.dumps(row)} for row in rows],
                                      override_num_blocks=min(len(rows), MAX_RAY_BLOCKS))
        outcomes = dataset.map_batches(
            RayRowWorker, fn_constructor_kwargs={"settings": replace(settings, threads=threads).to_dict()},
            batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers or max(1, int(gpus))), num_cpus=threads,
            num_gpus=1 if gpus >= 1 else 0,
        )
        for item in outcomes.iter_rows():
            yield json.loads(item["outcome"])
    finally:
        if started_here:
            ray.shutdown()


def accelerate_state(device: str = "auto"):
    """This process's place in an ``accelerate launch`` / ``torchrun`` group (one process without a launcher)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())  # CPU processes: gloo


def iter_accelerate(rows: list, settings: WorkerSettings, state) -> Iterator[dict]:
    """This process's share of the rows, on this process's device (cuda:<local rank> under a multi-GPU launch)."""
    with state.split_between_processes(rows) as mine:
        mine = list(mine)
    if not mine:
        return
    if settings.device == "auto":
        settings = replace(settings, device=str(state.device) if state.device.type == "cuda" else "cpu")
    worker = RowWorker(settings)
    for row in mine:
        yield worker.run(row)
