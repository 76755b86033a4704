"""The ``xreal-engine serve`` command: settings from the command line, the socket, uvicorn.

Start-up contract for launchers: the FIRST line on stdout is ``XREAL_ENGINE_URL=<url>``
(e.g. ``XREAL_ENGINE_URL=http://127.0.0.1:43125``), printed as soon as the socket listens,
so ``--port 0`` can pick a free port. Everything else (logs) goes to stderr. Stop it with
``POST /api/v1/shutdown`` (or SIGTERM/Ctrl-C, or closing stdin with ``--exit-with-stdin``);
after a graceful shutdown the exit status is 0, whatever stopped it.

Security: loopback by default, and always a token: ``XREAL_ENGINE_TOKEN``, ``--token-file``
(or ``--token``, which shows in ``ps`` and earns a warning); without one, a loopback engine
makes one up and leaves it in ``client.local_token_path(port)`` (mode 0600, removed at exit),
where ``submit`` and ``EngineClient`` on this machine find it. Any other address needs an
explicit token. Failure to start (a bad option, an unwritable data directory, a busy port)
is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from ..client import TOKEN_ENVIRONMENT, local_token_path, new_token, remove_local_token, resolve_token, write_local_token
from ..errors import InputError, os_reason
from ..model.loading import AUTO_RUNTIME, add_unet_runtime_arguments, unet_runtime
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
    add_unet_runtime_arguments(parser, long_lived=True)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of the worker (default: $OMP_NUM_THREADS, else half the CPUs, at least 1)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="where the job database, uploads and results live (default ./xreal-engine-data)")
    parser.add_argument("--token", default=None,
                        help="access token required on every endpoint except health; shows in the process list, so "
                             f"prefer ${TOKEN_ENVIRONMENT} or --token-file (default on loopback: a random one, left in "
                             f"{local_token_path(0).parent}/engine-PORT.token for local clients)")
    parser.add_argument("--token-file", type=Path, default=None, help="read the access token from this file's first line")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="a web origin (e.g. https://viewer.example) whose pages may call the API from a browser "
                             "(repeatable; default none: requests from web pages are refused)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a further host name clients use to reach the engine (repeatable; default: the --host "
                             "address, plus localhost names on loopback; any name on 0.0.0.0)")
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
    """The settings; a loopback engine without a token gets a random one (``args.generated_token`` is then True)."""
    try:
        token, warning = resolve_token(args.token, getattr(args, "token_file", None))
    except ValueError as error:
        raise InputError(str(error)) from None
    if warning:
        print(f"xreal-engine serve: warning: {warning}", file=sys.stderr)
    if not is_loopback(args.host) and not token:
        raise InputError(
            f"Refusing to listen on {args.host} without an access token; set {TOKEN_ENVIRONMENT} or pass "
            "--token-file (or listen on 127.0.0.1).")
    if token is not None and len(token) < 8:
        raise InputError("The access token is too short; use at least 8 characters.")
    args.generated_token = token is None
    token = token or new_token()
    for origin in getattr(args, "allow_origin", []):
        if not origin.startswith(("http://", "https://")) or origin.rstrip("/").count("/") != 2:
            raise InputError(f"--allow-origin {origin!r} is not an origin; give scheme://host[:port], e.g. "
                             "https://viewer.example.")
    for name in ("max_upload_bytes", "max_queued_jobs"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1.")
    if args.retention_hours < 0:
        raise InputError("--retention-hours must be 0 (keep forever) or more.")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port} is not a port number (0..65535).")
    runtime = unet_runtime(args.freeze, args.compile, args.eager, default=AUTO_RUNTIME)
    return ServiceSettings(model=args.model, device=args.device, dtype=args.dtype, unet_runtime=runtime,
                           data_dir=args.data_dir,
                           token=token, max_upload_bytes=args.max_upload_bytes,
                           max_queued_jobs=args.max_queued_jobs, retention_hours=args.retention_hours,
                           pacs_config=args.pacs_config, host=args.host,
                           allowed_hosts=tuple(getattr(args, "allow_host", [])),
                           allowed_origins=tuple(getattr(args, "allow_origin", [])))


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
    from ..model.loading import resolve_threads  # no torch: exported for torch to read when the worker loads it

    os.environ["OMP_NUM_THREADS"] = str(resolve_threads(args.threads))
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # per-object chatter, UIDs only
    app = create_app(settings)  # resolves the model directory: a wrong --model fails here
    sock = _listen(args.host, args.port)
    port = sock.getsockname()[1]
    remove_local_token(port)  # a killed engine's leftover: this port was free
    if args.generated_token:
        try:
            token_path = write_local_token(port, settings.token)
        except OSError as error:
            sock.close()
            raise InputError(f"The access token file {local_token_path(port)} cannot be written "
                             f"({os_reason(error)}); set {TOKEN_ENVIRONMENT} to choose a token.") from None
        print(f"xreal-engine serve: access token in {token_path} (readable only by you; xreal-engine submit and "
              f"EngineClient on this machine read it there)", file=sys.stderr, flush=True)
    url_host = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host
    _raise_open_file_limit()
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=5,
                            log_level=args.log_level)
    server = uvicorn.Server(config)
    app.state.request_shutdown = lambda: setattr(server, "should_exit", True)
    app.state.exiting = lambda: server.should_exit
    # uvicorn re-raises a SIGTERM/SIGINT after its graceful shutdown, which would make the exit status
    # -15 (or a KeyboardInterrupt); with these handlers in place it re-raises into "shut down", and we return 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: app.state.request_shutdown())
    if args.exit_with_stdin:
        threading.Thread(target=_shutdown_at_stdin_eof, args=(app.state.request_shutdown,), daemon=True,
                         name="xreal-stdin-watch").start()
    try:
        print(f"XREAL_ENGINE_URL=http://{url_host}:{port}", flush=True)
        server.run(sockets=[sock])
    finally:
        if args.generated_token:
            remove_local_token(port, settings.token)
    log.info("engine stopped")
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


def _raise_open_file_limit() -> None:
    """Take the soft limit of open files up to the hard one (1024 on many desktops): every connection
    holds a file, so another local user opening a thousand idle ones could otherwise lock every client out."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20  # Linux refuses an unlimited soft limit
    if soft != resource.RLIM_INFINITY and wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass  # keep the limit the engine was given

