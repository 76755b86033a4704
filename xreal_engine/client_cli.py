"""``xreal-engine submit``: send one job to a running engine service and fetch its result.

Uses only :mod:`xreal_engine.client`, so it works against a remote GPU server from any
machine with Python. Progress goes to stderr; the result files land in ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .client import EngineClient, EngineError
from .errors import InputError


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("XREAL_ENGINE_URL", "http://127.0.0.1:8000"),
                        help="engine URL (default $XREAL_ENGINE_URL or http://127.0.0.1:8000)")
    parser.add_argument("--token", default=None, help="access token (default $XREAL_ENGINE_TOKEN)")
    parser.add_argument("--anatomy", type=Path, help="anatomy label map: PNG, NRRD, NIfTI, .seg.nrrd or DICOM-SEG")
    parser.add_argument("--pathology-mask", type=Path, action="append", default=[], metavar="FILE",
                        help="a pathology region (repeatable; each needs a --finding in the same order)")
    parser.add_argument("--finding", action="append", default=[], metavar="NAME",
                        help="finding of the pathology mask at the same position; '' removes a finding (edit mode)")
    parser.add_argument("--image", type=Path, help="edit mode: the X-ray to edit")
    parser.add_argument("--source", metavar="NAME", help="edit mode: the engine fetches the X-ray from this PACS source")
    parser.add_argument("--study", metavar="UID", help="with --source: Study Instance UID")
    parser.add_argument("--series", metavar="UID", help="with --source: Series Instance UID")
    parser.add_argument("--instance", metavar="UID", help="with --source: SOP Instance UID (default: first image)")
    parser.add_argument("--seed", type=int, help="random seed (default: one chosen by the engine, reported back)")
    parser.add_argument("--steps", type=int, help="DDIM steps per stage (default: the model's)")
    parser.add_argument("--anatomy-steps", type=int, help="anatomy-stage steps that follow the mask (0..steps)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (0..50)")
    parser.add_argument("--eta", type=float, help="DDIM eta (0..1)")
    parser.add_argument("--push-to", metavar="NAME", help="PACS destination configured on the engine")
    parser.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    parser.add_argument("--out", type=Path, required=True, help="directory for the result files")


def run(args) -> int:
    if len(args.pathology_mask) != len(args.finding):
        raise InputError(
            f"Give exactly one --finding per --pathology-mask ({len(args.pathology_mask)} masks, "
            f"{len(args.finding)} findings).")
    for path in [args.anatomy, args.image, *args.pathology_mask]:
        if path is not None and not path.is_file():
            raise InputError(f"The file {path} does not exist.")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise InputError(f"The output directory {args.out} already exists and is not empty; choose a new one.")
    if args.image is not None and args.source is not None:
        raise InputError("Use either --image or --source, not both.")
    source = None
    if args.source is not None:
        source = {"source": args.source, "study": args.study, "series": args.series, "instance": args.instance}
        source = {key: value for key, value in source.items() if value}
    token = args.token if args.token is not None else os.environ.get("XREAL_ENGINE_TOKEN")
    client = EngineClient(args.url, token=token)
    try:
        job = client.submit(args.anatomy, list(zip(args.pathology_mask, args.finding)), args.image,
                            seed=args.seed, steps=args.steps, anatomy_steps=args.anatomy_steps,
                            guidance=args.guidance, eta=args.eta, push_to=args.push_to, source=source)
        print(f"Job {job['id']} queued (seed {job['parameters']['seed']}).", file=sys.stderr)
        for warning in job.get("warnings", []):
            print(f"warning: {warning}", file=sys.stderr)
        job = client.wait(job["id"], callback=_print_progress, timeout=args.timeout)
        print(file=sys.stderr)
        if job["state"] != "succeeded":
            message = (job.get("error") or {}).get("message") or f"the job ended {job['state']}"
            raise InputError(f"The engine did not produce a result: {message}")
        written = client.download_all(job["id"], args.out)
    except EngineError as error:
        raise InputError(f"{error.message}") from None
    print(f"Wrote {len(written)} files to {args.out}/ (job {job['id']}).")
    if job.get("push"):
        push = job["push"]
        print(f"PACS push to {push.get('destination')}: {'ok' if push.get('ok') else push.get('message')}",
              file=sys.stderr)
    return 0


def _print_progress(job: dict) -> None:
    if job["state"] == "queued":
        text = f"queued (position {job.get('queue_position')})"
    else:
        percent = 100 * (job.get("progress") or 0)
        eta = job.get("eta_seconds")
        text = f"{job['state']} {job.get('stage') or ''} {percent:5.1f}%" + (f" ETA {eta:.0f} s" if eta else "")
    print(f"\r{text:<60}", end="", file=sys.stderr, flush=True)
