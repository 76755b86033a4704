"""``xreal-engine`` command line.

Each subcommand lives in the module that owns the work; that module exposes
``configure_parser(parser)`` and ``run(args) -> int``. This file only wires them
up and turns user-facing errors into one readable line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from . import __version__
from .errors import InputError, XRealError

# name -> (module, one-line help). Modules are imported only when their command runs.
SUBCOMMANDS = {
    "generate": ("xreal_engine.generate", "generate a synthetic chest X-ray from anatomy and pathology masks"),
    "info": ("xreal_engine.models", "describe a model directory"),
    "convert": ("xreal_engine.convert", "convert the official XReal checkpoints into a model directory"),
    "serve": ("xreal_engine.server", "run the HTTP engine service"),
    "submit": ("xreal_engine.client_cli", "submit a job to a running engine service"),
    "train": ("xreal_engine.training.cli", "train an autoencoder, anatomy controller, LDM or segmenter"),
    "prepare-data": ("xreal_engine.training.data", "convert a data set to the training layout"),
    "evaluate": ("xreal_engine.evaluate", "evaluate a model on held-out anatomy masks"),
    "push": ("xreal_engine.pacs", "send result DICOM files to a configured PACS destination"),
}


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """The job arguments shared by ``generate`` (local) and ``submit`` (to a service): masks, edit mode, sampling."""
    parser.add_argument("--anatomy", type=Path, help="anatomy label map: PNG, NRRD, NIfTI, Slicer .seg.nrrd or DICOM-SEG")
    parser.add_argument("--pathology-mask", type=Path, action="append", default=[], metavar="FILE",
                        help="a pathology region (repeatable; each needs a --finding in the same order)")
    parser.add_argument("--finding", action="append", default=[], metavar="NAME",
                        help="finding for the pathology mask at the same position; '' removes a finding (edit mode)")
    parser.add_argument("--image", type=Path, help="edit mode: the X-ray to edit (DICOM DX/CR/SC, PNG, NRRD)")
    parser.add_argument("--source", metavar="NAME", help="edit mode: fetch the X-ray from this configured PACS source")
    parser.add_argument("--study", metavar="UID", help="with --source: Study Instance UID")
    parser.add_argument("--series", metavar="UID", help="with --source: Series Instance UID")
    parser.add_argument("--instance", metavar="UID", help="with --source: SOP Instance UID (default: first image)")
    parser.add_argument("--push-to", metavar="NAME", help="send sc.dcm + seg.dcm to this PACS destination when done")
    parser.add_argument("--seed", type=int, help="random seed (default: a random one, recorded in provenance.json)")
    parser.add_argument("--steps", type=int, help="DDIM steps per stage (default: the model's, usually 100)")
    parser.add_argument("--anatomy-steps", type=int, help="anatomy-stage steps that follow the mask (0..steps; default: the model's, 50 of 100 in XReal)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance of the pathology stage (0..50, default 7)")
    parser.add_argument("--eta", type=float, help="DDIM eta (0..1, default 1 as the original)")
    parser.add_argument("--out", type=Path, required=True, help="result directory (must not exist or be empty)")


def check_request_arguments(args) -> None:
    """Refusals that need no model and no engine: pairing of masks and findings, image vs source."""
    if len(args.pathology_mask) != len(args.finding):
        raise InputError(
            f"Give exactly one --finding per --pathology-mask ({len(args.pathology_mask)} masks, "
            f"{len(args.finding)} findings)."
        )
    if args.image is not None and args.source is not None:
        raise InputError("Use either --image or --source, not both.")
    if args.source is not None and not (args.study and args.series):
        raise InputError("--source needs --study and --series (and optionally --instance).")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All subcommands are listed; only ``command``'s module is imported (it may need torch)."""
    parser = argparse.ArgumentParser(prog="xreal-engine", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"xreal-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        command_parser.set_defaults(_module=module_name)
        if name == command:
            importlib.import_module(module_name).configure_parser(command_parser)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except XRealError as error:
        print(f"xreal-engine {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xreal-engine {args.command}: interrupted; nothing was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
