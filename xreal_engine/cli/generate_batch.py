"""``xreal-engine generate-batch``: a synthetic data set from a manifest or a design, resumable, local or on Ray.

The output directory::

    OUT/plan.jsonl      the rows this directory makes (inputs inside OUT relative to it, so OUT may move):
                        a restart must ask for the same rows (or more)
    OUT/images/<name>/  one result directory per finished row, as ``generate`` writes them (+ ``quality``)
    OUT/inputs/         the edited anatomies and drawn regions of a --from-templates design
    OUT/failures.csv    row, name, kind (failed | dropped), reason: the latest attempt of each unfinished row
    OUT/dataset.json    the provenance summary: engine version, model id, weights hash, counts, quality
    OUT/labels/ datalist.json imagefolder/ nnunet/   per --format (exports.py)

Every row is checked before anything is written; a restart skips the rows whose directory was renamed
into place, retries the others, and never makes a row twice. Exit status: 0 when every row is
finished, 1 when a row failed or was dropped, 2 for bad input, 130 when interrupted (143 by SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

from ..errors import DISK_FULL, InputError, StorageError
from ..model.info import ModelInfo, resolve_model, weights_hash
from ..model.loading import AUTO_RUNTIME, add_unet_runtime_arguments, resolve_threads, select_device, unet_runtime
from ..batch import backends
from ..batch.designs import AUGMENT_HEART_SCALES, AUGMENT_LUNG_WIDTHS, Design, parse_scales, parse_seeds, plan_design
from ..batch.exports import (FINDINGS_DIR, FORMATS, LABELS_DIR, SUMMARY_FILE, finished_records, summary, write_exports,
                      write_text_atomic)
from ..batch.manifest import check_rows, read_manifest, report_problems
from ..batch.plan import (PLAN_FILE, check_inputs_unchanged, check_same_plan, check_same_quality, read_plan,
                          write_plan)
from ..batch.progress import FailureLog, Progress
from ..batch.quality import check_min_dice, check_segmenter
from ..batch.worker import IMAGES_DIR, STOPPED, WorkerSettings, is_finished
from . import Terminated
from .arguments import add_quality_arguments, add_sampling_arguments, quality_arguments, sampling_arguments

FAILURES_FILE = "failures.csv"
INPUTS_DIR = "inputs"
LOCK_FILE = ".lock"
BACKENDS = ("local", "ray", "accelerate")


def configure_parser(parser) -> None:
    source = parser.add_argument_group("what to make (one of)")
    source.add_argument("--manifest", type=Path, help="CSV or JSONL manifest, one row per image (README: Synthetic datasets)")
    source.add_argument("--from-templates", nargs="?", const="", metavar="NAMES",
                        help="no manifest: the anatomy templates (all anatomy_* or a comma-separated list) x "
                             "--findings x --seeds (x --augment-anatomy)")
    source.add_argument("--findings", default="none",
                        help="with --from-templates: comma-separated findings; 'none' = anatomy only (default)")
    source.add_argument("--seeds", help="with --from-templates: START:STOP (stop excluded) or a comma-separated list")
    source.add_argument("--augment-anatomy", action="store_true",
                        help=f"with --from-templates: also the evaluation's counterfactual anatomies: heart x "
                             f"{AUGMENT_HEART_SCALES[1]:g}, lungs' width x {AUGMENT_LUNG_WIDTHS[1]:g}, and both")
    source.add_argument("--heart-scales", help="with --from-templates: heart scale factors, e.g. 1,1.1,1.25")
    source.add_argument("--lung-widths", help="with --from-templates: lung width factors, e.g. 1,0.9,0.8")
    source.add_argument("--templates", type=Path, help="templates folder (default: Resources/Templates beside the engine)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (new, or one to resume)")
    parser.add_argument("--format", action="append", default=[], metavar="LIST",
                        help=f"outputs, comma-separated or repeated: {', '.join(FORMATS)} (default results: the "
                             "per-image directories, always written)")
    parser.add_argument("--model", default="demo", help="model directory, or 'demo' (default)")
    parser.add_argument("--backend", choices=BACKENDS, default="local",
                        help="local (default), ray (Ray Data; pip install 'xreal-engine[ray]') or accelerate "
                             "(run under `accelerate launch`)")
    parser.add_argument("--workers", type=int, help="local: processes (default 1); ray: actors (default: the "
                        "cluster's GPUs, else 1), each loads the model once")
    parser.add_argument("--threads", type=int, help="torch CPU threads per worker (default: the engine's CPU "
                        "threads, shared out among --workers; 1 per Ray actor)")
    parser.add_argument("--ray-address", help="with --backend ray: an existing cluster (default: a local instance)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, float32 on CPU), float32, float16, bfloat16")
    add_unet_runtime_arguments(parser, long_lived=True)
    add_quality_arguments(parser.add_argument_group("quality check (the shipped anatomy segmenter on every image)"))
    add_sampling_arguments(parser.add_argument_group("sampling settings of rows that do not set their own"))


def _check_arguments(args) -> list:
    """Refusals that need nothing but the command line; returns the chosen formats."""
    formats = ["results"]
    for item in args.format:
        for name in (part.strip() for part in item.split(",")):
            if name not in FORMATS:
                raise InputError(f"--format {name!r} is not one of {', '.join(FORMATS)}.")
            if name not in formats:
                formats.append(name)
    design_options = [name for name in ("seeds", "heart_scales", "lung_widths") if getattr(args, name)]
    if args.augment_anatomy or args.findings != "none":
        design_options.append("findings / --augment-anatomy")
    if (args.manifest is None) == (args.from_templates is None):
        raise InputError("Give either --manifest FILE or --from-templates (with --seeds).")
    if args.manifest is not None and design_options:
        raise InputError(f"--{design_options[0].replace('_', '-')} belongs to --from-templates, not --manifest.")
    if args.from_templates is not None and not args.seeds:
        raise InputError("--from-templates needs --seeds, e.g. --seeds 0:100.")
    if args.workers is not None and args.workers < 1 or args.threads is not None and args.threads < 1:
        raise InputError("--workers and --threads must be at least 1.")
    if args.backend == "accelerate" and args.workers not in (None, 1):
        raise InputError("With --backend accelerate the processes are accelerate launch's: use --num_processes.")
    if args.ray_address and args.backend != "ray":
        raise InputError("--ray-address needs --backend ray.")
    if args.threads is not None and not args.ray_address:  # a cluster's nodes have their own CPUs
        resolve_threads(args.threads)  # 1 to the usable CPUs: refused now, not by the first worker
    args.quality_check, _, _ = quality_arguments(args, checked_by_default=True)
    check_min_dice(args.min_dice)
    if args.quality_check and args.segmenter is not None:
        check_segmenter(args.segmenter)
    return formats


def _design(args) -> Design:
    heart = parse_scales(args.heart_scales, "--heart-scales") if args.heart_scales else \
        (AUGMENT_HEART_SCALES if args.augment_anatomy else (1.0,))
    width = parse_scales(args.lung_widths, "--lung-widths") if args.lung_widths else \
        (AUGMENT_LUNG_WIDTHS if args.augment_anatomy else (1.0,))
    templates = [name.strip() for name in args.from_templates.split(",") if name.strip()] or None
    findings = [name for name in args.findings.split(",") if name.strip()] or ["none"]
    return Design(templates=templates, findings=findings, seeds=parse_seeds(args.seeds), heart_scales=heart,
                  lung_widths=width)


def run(args) -> int:
    formats = _check_arguments(args)
    if args.backend == "ray":
        backends.import_ray()  # the install hint before any work
    select_device(args.device, args.dtype)
    runtime = unet_runtime(args.freeze, args.compile, args.eager, default=AUTO_RUNTIME)
    model_dir = resolve_model(args.model)
    info = ModelInfo.load(model_dir)
    out = Path(args.out)
    _check_output_directory(out)
    sampling = sampling_arguments(args)
    sampling = {key: value for key, value in sampling.items() if value is not None}

    files, problems = {}, []
    if args.manifest is not None:
        rows, problems = read_manifest(args.manifest, args.templates, sampling)
    else:
        rows, files = plan_design(_design(args), info, args.templates, out.resolve() / INPUTS_DIR, sampling)
    check_same_plan(read_plan(out / PLAN_FILE), rows, out)
    done = frozenset(row.name for row in rows if is_finished(out / IMAGES_DIR / row.name))
    check_inputs_unchanged(rows, done, out / IMAGES_DIR)
    if args.manifest is not None:
        problems += check_rows(rows, info, skip=done)
    if problems:
        raise report_problems(problems, Path(args.manifest).name)
    weights = weights_hash(model_dir)
    previous = _read_json(out / SUMMARY_FILE)
    check_same_quality(previous, args.quality_check, args.min_dice, len(done), out)
    # exports are derived files: one asked for before is kept up to date too, never left stale beside the rest
    formats += [name for name in previous.get("formats", []) if name in FORMATS and name not in formats]
    if previous.get("weights_hash") not in (None, weights):
        raise InputError(f"{out} was made with the model {previous.get('model_id')} (other weights); "
                         "use the same --model or a new --out.")

    state = backends.accelerate_state(args.device) if args.backend == "accelerate" else None
    is_main = state is None or state.is_main_process
    failures = None  # the main process keeps failures.csv
    with _output_lock(out, is_main):
        if is_main:
            for path, data in files.items():
                if not (path.is_file() and path.read_bytes() == data):
                    write_text_atomic(path, data)
            write_plan(rows, out / PLAN_FILE)
            (out / IMAGES_DIR).mkdir(exist_ok=True)
            _remove_leftovers(out)
            failures = FailureLog(out / FAILURES_FILE, {row.name for row in rows} - done)
            started = summary(previous, model_info=info, weights_hash=weights, model=str(args.model), rows=rows,
                              records=finished_records(rows, out), failures=failures.entries, formats=formats,
                              quality_check=args.quality_check, min_dice=args.min_dice,
                              last_run={"backend": args.backend, "running": True})
            write_text_atomic(out / SUMMARY_FILE, json.dumps(started, indent=2) + "\n")  # the model, from now on
            previous = started
        if state is not None:
            state.wait_for_everyone()
        pending = [row.to_json() for row in rows if row.name not in done]
        workers = args.workers or 1
        threads = args.threads or (max(1, resolve_threads() // workers) if workers > 1 else None)  # shared out
        settings = WorkerSettings(model=str(model_dir), out_dir=str(out), device=args.device, dtype=args.dtype,
                                  unet_runtime=runtime, threads=threads, quality_check=args.quality_check,
                                  segmenter=str(args.segmenter) if args.segmenter else None, min_dice=args.min_dice)
        if args.backend == "local":
            outcomes = backends.iter_local(pending, settings, workers)
        elif args.backend == "ray":
            outcomes = backends.iter_ray(pending, settings, args.workers, args.ray_address)
        else:
            outcomes = backends.iter_accelerate(pending, settings, state)

        progress = Progress(len(rows), len(done), enabled=is_main)
        own, interrupted = [], 0
        try:
            for outcome in outcomes:
                own.append(outcome)
                if outcome["status"] == STOPPED:
                    break  # the disk is full: every further row would fail alike (worker.py)
                if is_main:
                    failures.record(outcome)
                progress.update(outcome)
        except KeyboardInterrupt as stop:
            interrupted = 143 if isinstance(stop, Terminated) else 130  # SIGTERM (cli/__init__.py) or Ctrl-C
        finally:
            progress.close()
            with contextlib.suppress(Exception):
                outcomes.close()
        if state is not None:
            from accelerate.utils import gather_object

            state.wait_for_everyone()
            workers = state.num_processes
            gathered = gather_object(own)  # in process order: the main process's own outcomes come first
            if is_main:
                for outcome in gathered[len(own):]:
                    if outcome["status"] != STOPPED:
                        failures.record(outcome)
                        progress.count(outcome)
                own = gathered
            else:
                state.wait_for_everyone()  # until the main process has written the exports and the summary
                return 0  # the main process reports

        stopped = next((outcome for outcome in own if outcome["status"] == STOPPED), None)
        if stopped is not None:  # the exports need space too: the next run rebuilds them
            _stop_on_full_disk(stopped, out, rows, state)
        records = write_exports(out, rows, formats, info)
        last_run = {"backend": args.backend, "workers": workers, "attempted": progress.attempted,
                    "finished": progress.finished, "failed": progress.failed, "dropped": progress.dropped,
                    "seconds": round(progress.seconds(), 1), "images_per_minute": round(progress.rate(), 2),
                    "interrupted": bool(interrupted)}
        dataset = summary(previous, model_info=info, weights_hash=weights, model=str(args.model), rows=rows,
                          records=records, failures=failures.entries, formats=formats,
                          quality_check=args.quality_check, min_dice=args.min_dice, last_run=last_run)
        write_text_atomic(out / SUMMARY_FILE, json.dumps(dataset, indent=2) + "\n")
        if state is not None:
            state.wait_for_everyone()
    counts = dataset["counts"]
    print(f"{counts['finished']} of {counts['rows']} rows finished in {out} ({counts['failed']} failed, "
          f"{counts['dropped']} dropped, {counts['pending']} pending; {last_run['images_per_minute']:.1f} images/min "
          f"this run){'; see failures.csv' if failures.entries else ''}.")
    if interrupted:
        print("xreal-engine generate-batch: interrupted; finished rows are kept, run the same command to go on.",
              file=sys.stderr)
        return interrupted
    return 1 if failures.entries else 0


def _stop_on_full_disk(stopped: dict, out: Path, rows: list, state) -> None:
    """One sentence for a full disk (not a failure per row); the finished rows stay, a re-run resumes."""
    finished = sum(is_finished(out / IMAGES_DIR / row.name) for row in rows)
    if state is not None:
        state.wait_for_everyone()  # the other processes wait for the main one's summary; there is none
    reason = stopped["reason"].rstrip(".")
    raise StorageError(f"generate-batch stopped at row {stopped['row']} ('{stopped['name']}'): {reason}. "
                       f"{finished} of {len(rows)} rows are finished and kept; free some space and run the same "
                       "command again to make the rest.", DISK_FULL)


# ----------------------------------------------------------------------------- the output directory


def _check_output_directory(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a directory.")
    if out.is_dir() and any(out.iterdir()) and not (out / PLAN_FILE).is_file():
        raise InputError(f"--out {out} is not empty and was not made by generate-batch; choose a new directory.")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _output_lock(out: Path, is_main: bool):
    """One run per output directory at a time (POSIX advisory lock on OUT/.lock)."""
    if not is_main:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(out / LOCK_FILE, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(f"Another generate-batch run is writing {out}; wait for it or choose another --out.") \
                from None
        yield


def _remove_leftovers(out: Path) -> None:
    """What a killed run left half-written: hidden staging directories and temporary files."""
    for folder in (out, out / IMAGES_DIR, out / INPUTS_DIR, out / LABELS_DIR, out / FINDINGS_DIR):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            name = entry.name
            if name.startswith(".") and (".partial-" in name or name.endswith((".new", ".old", ".tmp"))):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
