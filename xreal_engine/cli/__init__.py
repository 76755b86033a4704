"""``xreal-engine`` command line.

Each subcommand lives in the module that owns the work; that module exposes
``configure_parser(parser)`` and ``run(args) -> int``. This file only wires them
up and turns user-facing errors into one readable line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
import warnings

from .. import __version__
from ..errors import XRealError, os_sentence, shown

MESSAGE_LIMIT = 1000  # characters of an error line; longer echoes are shortened
# What an interrupted command keeps, where it is not "nothing" (its own staging is removed either way).
INTERRUPTED_KEEPS = {"train": "the complete checkpoints written so far are kept; go on with --resume"}

# name -> (module, one-line help). Modules are imported only when their command runs.
SUBCOMMANDS = {
    "generate": ("xreal_engine.cli.generate", "generate a synthetic chest X-ray from anatomy and pathology masks"),
    "generate-batch": ("xreal_engine.cli.generate_batch", "generate a synthetic data set from a manifest or templates"),
    "info": ("xreal_engine.cli.info", "describe a model directory"),
    "convert": ("xreal_engine.model.convert", "convert the official XReal checkpoints into a model directory"),
    "serve": ("xreal_engine.service.serve", "run the HTTP engine service"),
    "submit": ("xreal_engine.cli.submit", "submit a job to a running engine service"),
    "train": ("xreal_engine.training.cli", "train an autoencoder, anatomy controller, LDM or segmenter"),
    "prepare-data": ("xreal_engine.training.prepare_data", "convert a data set to the training layout"),
    "evaluate": ("xreal_engine.training.evaluate", "evaluate a model on held-out anatomy masks"),
    "push": ("xreal_engine.pacs.transfer", "send result DICOM files to a configured PACS destination"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose refusals are one line, as every other refusal (argparse prints the whole usage first);
    its sub-command parsers are of this class too (``add_subparsers`` uses the parent's type)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {shown(message, MESSAGE_LIMIT)} ({self.prog} --help lists the options)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All subcommands are listed; only ``command``'s module is imported (it may need torch)."""
    parser = OneLineParser(prog="xreal-engine", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"xreal-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.command_parsers = {}  # an unknown option is refused by its command's parser (main)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        command_parser = parser.command_parsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        command_parser.set_defaults(_module=module_name)
        if name == command:
            importlib.import_module(module_name).configure_parser(command_parser)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            parser.command_parsers.get(getattr(args, "command", None), parser).error(
                f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as stop:  # --help, --version, or OneLineParser's refusal (already printed)
        return stop.code if isinstance(stop.code, int) else 2
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    # pydicom warns (in several lines, quoting the bytes) about every oddity of a damaged file; the
    # readers say in one sentence what is wrong with it.
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    module = importlib.import_module(args._module)
    try:
        with _terminate_as_interrupt(args.command != "serve"):  # serve stops its own way on SIGTERM
            return int(module.run(args) or 0)
    except XRealError as error:  # one sentence; control characters escaped, so a file name cannot drive the terminal
        print(f"xreal-engine {args.command}: error: {shown(error, MESSAGE_LIMIT)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if _stdout_closed():  # `xreal-engine info --json | head`: the reader has all it wanted, as for any tool
            return 128 + signal.SIGPIPE
        print(f"xreal-engine {args.command}: error: a connection or pipe was closed by the other end.",
              file=sys.stderr)
        return 2
    except OSError as error:  # a file that cannot be read or written where no reader said so more precisely
        print(f"xreal-engine {args.command}: error: {shown(os_sentence(error, 'A file could not be used'), MESSAGE_LIMIT)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        print(f"xreal-engine {args.command}: interrupted; {INTERRUPTED_KEEPS.get(args.command, 'nothing was written')}.",
              file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130


def _stdout_closed() -> bool:
    """True when standard output's reader went away; it is then pointed at /dev/null, so that the
    interpreter's final flush does not complain about it a second time."""
    import select

    try:
        poller = select.poll()  # a pipe without readers reports POLLERR to its writer
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        if not any(events & select.POLLERR for _fd, events in poller.poll(0)):
            return False
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # no poll here, or no real standard output
        return False
    return True


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's stop), handled like Ctrl-C: staging folders are removed on the way out."""


@contextlib.contextmanager
def _terminate_as_interrupt(enabled: bool):
    """While a command runs, SIGTERM raises :class:`Terminated` (the previous handler is restored after)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
