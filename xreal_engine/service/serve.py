"""The ``xreal-engine serve`` command: settings from the command line, the socket, uvicorn.

Start-up contract for launchers: the FIRST line on stdout is ``XREAL_ENGINE_URL=<url>``
(e.g. ``XREAL_ENGINE_URL=http://127.0.0.1:43125``), printed as soon as the socket listens,
so ``--port 0`` can pick a free port. Everything else (logs) goes to stderr. Stop it with
``POST /api/v1/shutdown`` (or SIGTERM/Ctrl-C, or closing stdin with ``--exit-with-stdin``).

Security: loopback by default; any other address needs a token (``--token`` or
``XREAL_ENGINE_TOKEN``).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import threading
from pathlib import Path

from ..errors import InputError
from .app import create_app
from .settings import (DEFAULT_DATA_DIR, DEFAULT_MAX_QUEUED_JOBS, DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_PORT,
                       DEFAULT_RETENTION_HOURS, ServiceSettings)

log = logging.getLogger("xreal_engine.server")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others need a token)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}; 0 picks a free one). The first stdout line is XREAL_ENGINE_URL=<url>.")
    parser.add_argument("--model", default="demo", help="'demo' (the shipped demo model) or a model directory")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, float32 on CPU), float32, float16, bfloat16")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="where the job database, uploads and results live (default ./xreal-engine-data)")
    parser.add_argument("--token", default=None,
                        help="access token required on every endpoint except health (default: $XREAL_ENGINE_TOKEN)")
    parser.add_argument("--max-upload-bytes", type=int, default=DEFAULT_MAX_UPLOAD_BYTES,
                        help="largest accepted job request, all files together (default 100 MiB)")
    parser.add_argument("--max-queued-jobs", type=int, default=DEFAULT_MAX_QUEUED_JOBS,
                        help="jobs that may wait in the queue; more are refused with 429 (default 16)")
    parser.add_argument("--retention-hours", type=float, default=DEFAULT_RETENTION_HOURS,
                        help="finished jobs and their results are deleted after this many hours (0 keeps them; default 72)")
    parser.add_argument("--pacs-config", type=Path, default=None, help="PACS configuration file for push_to / source")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--exit-with-stdin", action="store_true",
                        help="shut down when standard input closes: a launcher keeps it open, so the engine "
                             "never outlives it, even after a crash")


def settings_from_args(args) -> ServiceSettings:
    token = args.token if args.token is not None else os.environ.get("XREAL_ENGINE_TOKEN") or None
    if not is_loopback(args.host) and not token:
        raise InputError(
            f"Refusing to listen on {args.host} without an access token; pass --token or set XREAL_ENGINE_TOKEN "
            "(or listen on 127.0.0.1).")
    if token is not None and len(token) < 8:
        raise InputError("The access token is too short; use at least 8 characters.")
    for name in ("max_upload_bytes", "max_queued_jobs"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1.")
    if args.retention_hours < 0:
        raise InputError("--retention-hours must be 0 (keep forever) or more.")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port} is not a port number (0..65535).")
    return ServiceSettings(model=args.model, device=args.device, dtype=args.dtype, data_dir=args.data_dir,
                           token=token, max_upload_bytes=args.max_upload_bytes,
                           max_queued_jobs=args.max_queued_jobs, retention_hours=args.retention_hours,
                           pacs_config=args.pacs_config)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if os.name != "nt":  # on Windows SO_REUSEADDR would let a second process share the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as error:
        sock.close()
        raise InputError(f"Cannot listen on {host}:{port} ({error.strerror or error}).") from None
    sock.listen(128)  # connections queue from now on, so a launcher may connect as soon as it reads the URL
    return sock


def run(args) -> int:
    import uvicorn

    settings = settings_from_args(args)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # per-object chatter, UIDs only
    app = create_app(settings)  # resolves the model directory: a wrong --model fails here
    sock = _listen(args.host, args.port)
    port = sock.getsockname()[1]
    url_host = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host
    print(f"XREAL_ENGINE_URL=http://{url_host}:{port}", flush=True)
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=5,
                            log_level=args.log_level)
    server = uvicorn.Server(config)
    app.state.request_shutdown = lambda: setattr(server, "should_exit", True)
    app.state.exiting = lambda: server.should_exit
    if args.exit_with_stdin:
        threading.Thread(target=_shutdown_at_stdin_eof, args=(app.state.request_shutdown,), daemon=True,
                         name="xreal-stdin-watch").start()
    server.run(sockets=[sock])
    return 0


def _shutdown_at_stdin_eof(request_shutdown) -> None:
    """Block until the launcher closes our stdin (or dies), then shut down like ``POST /shutdown``."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    log.info("standard input closed: the launcher is gone, shutting down")
    request_shutdown()
