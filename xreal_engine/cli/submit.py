"""``xreal-engine submit``: send one job to a running engine service and fetch its result.

Uses only :mod:`xreal_engine.client`, so it works against a remote GPU server from any
machine with Python. Progress goes to stderr; the result files land in ``--out``. Text that
comes from the engine (warnings, errors, stages) is printed with control characters escaped.
The token: ``$XREAL_ENGINE_TOKEN``, ``--token-file`` or ``--token``; none for a local engine,
whose own token file the client reads.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..client import TOKEN_ENVIRONMENT, EngineClient, EngineError, resolve_token
from ..errors import InputError, shown
from ..files import check_new_directory, staged_directory
from .arguments import add_request_arguments, check_request_arguments, control_requests, sampling_arguments


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("XREAL_ENGINE_URL", "http://127.0.0.1:8000"),
                        help="engine URL (default $XREAL_ENGINE_URL or http://127.0.0.1:8000)")
    parser.add_argument("--token", default=None,
                        help=f"access token; shows in the process list, so prefer ${TOKEN_ENVIRONMENT} or --token-file "
                             "(default: $XREAL_ENGINE_TOKEN, or a local engine's own token file)")
    parser.add_argument("--token-file", type=Path, default=None, help="read the access token from this file's first line")
    add_request_arguments(parser)
    parser.add_argument("--timeout", type=float, default=None,
                        help="give up after this many seconds (the job is then cancelled on the engine)")


def run(args) -> int:
    check_request_arguments(args)
    controls = control_requests(args)
    for path in [args.anatomy, args.image, *args.pathology_mask, *(c.source for c in controls)]:
        if path is not None and path.is_dir():
            raise InputError(f"{path} is a directory, not a file.")
        if path is not None and not path.is_file():
            raise InputError(f"The file {path} does not exist.")
    if args.timeout is not None and not args.timeout > 0:
        raise InputError(f"--timeout must be more than 0 seconds (got {args.timeout:g}).")
    check_new_directory(args.out)
    source = None
    if args.source is not None:
        source = {"source": args.source, "study": args.study, "series": args.series, "instance": args.instance}
        source = {key: value for key, value in source.items() if value}
    try:
        token, warning = resolve_token(args.token, args.token_file)
    except ValueError as error:
        raise InputError(str(error)) from None
    if warning:
        print(f"xreal-engine submit: warning: {warning}", file=sys.stderr)
    try:
        client = EngineClient(args.url, token=token)
    except ValueError as error:
        raise InputError(str(error)) from None
    try:
        job = client.submit(args.anatomy, list(zip(args.pathology_mask, args.finding)), args.image,
                            seed=args.seed, push_to=args.push_to, source=source,
                            controls=[(c.name, c.source, c.scale) for c in controls], **sampling_arguments(args))
        print(f"Job {job['id']} queued (seed {job['parameters']['seed']}).", file=sys.stderr)
        for warning in job.get("warnings", []):
            print(f"warning: {shown(warning, 500)}", file=sys.stderr)
        job = _wait_or_cancel(client, job["id"], args.timeout)
        print(file=sys.stderr)
        if job["state"] != "succeeded":
            message = (job.get("error") or {}).get("message") or f"the job ended {job['state']}"
            raise InputError(f"The engine did not produce a result: {message}")
        with staged_directory(args.out) as staging:  # all files or none (a full disk leaves nothing)
            written = client.download_all(job["id"], staging)
    except EngineError as error:
        raise InputError(f"{error.message}") from None
    print(f"Wrote {len(written)} files to {args.out}/ (job {job['id']}).")
    push = job.get("push")
    if push:
        print(f"PACS push to {shown(push.get('destination'))}: "
              f"{'ok' if push.get('ok') else shown(push.get('message') or 'some instances failed', 500)}",
              file=sys.stderr)
        for item in push.get("instances", []) if not push.get("ok") else []:
            print(f"  {shown(item.get('file'))}: {shown(item.get('status'))} {shown(item.get('detail'), 200)}",
                  file=sys.stderr)
    return 1 if push and not push.get("ok") else 0  # the result is written; the push failed (as generate)


def _wait_or_cancel(client: EngineClient, job_id: str, timeout) -> dict:
    """The job's final status; on a timeout or Ctrl-C it is cancelled, so it does not hold the engine's worker
    for a result no one will fetch."""
    try:
        return client.wait(job_id, callback=_print_progress, timeout=timeout)
    except (KeyboardInterrupt, EngineError) as stop:
        if isinstance(stop, EngineError) and stop.code != "timeout":
            raise
        try:
            client.cancel(job_id)
            cancelled = "it was cancelled on the engine"
        except (EngineError, OSError):
            cancelled = f"cancelling it failed, so it may still run there (job {job_id})"
        print(file=sys.stderr)
        if isinstance(stop, KeyboardInterrupt):
            print(f"xreal-engine submit: {cancelled}.", file=sys.stderr)
            raise
        raise InputError(f"{stop.message.rstrip('.')}; {cancelled}.") from None


def _print_progress(job: dict) -> None:
    if job["state"] == "queued":
        text = f"queued (position {job.get('queue_position')})"
    else:
        percent = 100 * (job.get("progress") or 0)
        eta = job.get("eta_seconds")
        text = f"{shown(job['state'])} {shown(job.get('stage') or '')} {percent:5.1f}%" + (f" ETA {eta:.0f} s" if eta else "")
    print(f"\r{text:<60}", end="", file=sys.stderr, flush=True)
