"""``xreal-engine generate``: one synthetic X-ray (or one edit) into a result directory, on this machine."""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

from ..batch.quality import AnatomyCheck, QualityRejected, check_min_dice
from ..errors import shown
from ..files import check_new_directory
from ..generate import GenerationRequest, generate_to_directory, prepare_request
from ..model.info import ModelInfo, resolve_model
from ..model.loading import add_unet_runtime_arguments, configure_threads, load_pipeline, resolve_threads
from ..model.loading import select_device, unet_runtime
from ..model.sampling import MAX_SEED
from .arguments import add_request_arguments, check_request_arguments, control_requests, sampling_arguments
from .arguments import add_quality_arguments, quality_arguments


def configure_parser(parser) -> None:
    parser.add_argument("--model", default="demo", help="model directory, or 'demo' for the shipped demo model (default)")
    add_request_arguments(parser)
    parser.add_argument("--pacs-config", type=Path, help="PACS configuration file (see xreal-engine push --help)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, float32 on CPU), float32, float16, bfloat16")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: $OMP_NUM_THREADS, else half the CPUs, at least 1)")
    add_unet_runtime_arguments(parser)
    add_quality_arguments(parser.add_argument_group("quality check (the shipped anatomy segmenter, as generate-batch)"))


def run(args) -> int:
    check_request_arguments(args)
    select_device(args.device, args.dtype)  # refuse a bad --device/--dtype/--threads before any work
    resolve_threads(args.threads)
    runtime = unet_runtime(args.freeze, args.compile)
    quality_check, min_dice, segmenter = quality_arguments(args, checked_by_default=False)
    check_min_dice(min_dice)
    seed = args.seed if args.seed is not None else random.randrange(MAX_SEED + 1)
    out_dir = args.out
    check_new_directory(out_dir)

    pacs_config = None
    if args.source is not None or args.push_to is not None:
        from ..pacs.config import load_config

        pacs_config = load_config(args.pacs_config)
        if args.push_to is not None:
            pacs_config.node(args.push_to, "destination")  # an unknown destination is refused before any work

    with tempfile.TemporaryDirectory(prefix="xreal-source-") as fetch_dir:
        image_path = args.image
        if args.source is not None:
            from ..pacs.transfer import fetch_source

            image_path = fetch_source(
                args.source, args.study, args.series, args.instance, dest_dir=Path(fetch_dir), config=pacs_config
            )
        request = GenerationRequest(
            anatomy_path=args.anatomy,
            pathologies=list(zip(args.pathology_mask, args.finding)),
            image_path=image_path,
            seed=seed,
            sampling=sampling_arguments(args),
            controls=control_requests(args),
        )
        model_info = ModelInfo.load(resolve_model(args.model))
        prepared = prepare_request(request, model_info)
        for warning in prepared.warnings:
            print(f"warning: {shown(warning, 500)}", file=sys.stderr)
        print(f"Loading model {model_info.model_id} ...", file=sys.stderr)
        configure_threads(args.threads)
        pipe = load_pipeline(args.model, args.device, args.dtype, runtime=runtime)
        check = None
        if quality_check:  # the per-image check of generate-batch: Dice per requested structure in provenance.json
            check = AnatomyCheck.load(segmenter, device=str(pipe.device), min_dice=min_dice)
        print(f"Generating on {pipe.device} (seed {seed}) ...", file=sys.stderr)
        try:
            with _ProgressBars() as progress:  # closed before anything else is printed
                provenance = generate_to_directory(pipe, prepared, out_dir, progress=progress, quality=check)
        except QualityRejected as rejected:  # --min-dice: nothing was written
            print(f"xreal-engine generate: the image was not written: {rejected}", file=sys.stderr)
            return 1
    print(f"Wrote {out_dir}/: sc.dcm, seg.dcm, preview.png, provenance.json, segments.json "
          f"({provenance['generation_seconds']:.1f} s)")
    if provenance.get("quality"):
        dice = provenance["quality"]["anatomy_dice"]
        print("anatomy followed: Dice " + " / ".join(f"{value:.2f}" for value in dice.values())
              + f" ({', '.join(dice)})")
    elif check is not None:
        print("warning: no anatomy was requested, so the quality check had nothing to score", file=sys.stderr)
    if args.push_to is None:
        return 0
    from ..pacs.config import PacsError
    from ..pacs.transfer import format_report, push_result

    try:
        report = push_result(args.push_to, out_dir, config=pacs_config)  # the local result stays whatever happens
    except PacsError as error:  # the result is written: exit 1 as for a refused instance (submit does the same)
        if error.report:  # what was sent before the destination failed (as `push` shows it)
            print(format_report(error.report))
        print(f"xreal-engine generate: the result is kept in {out_dir}/, but sending it failed: "
              f"{shown(str(error), 500)}", file=sys.stderr)
        return 1
    print(format_report(report))
    return 0 if report["failed"] == 0 else 1


class _ProgressBars:
    """One tqdm bar per pipeline stage, on stderr."""

    def __init__(self):
        self._bar = None
        self._stage = None

    def __call__(self, stage: str, step: int, total: int) -> None:
        from tqdm import tqdm

        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = tqdm(total=total, desc=f"{stage:>10}", unit="step", file=sys.stderr, leave=True)
        self._bar.n = step
        self._bar.refresh()

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
