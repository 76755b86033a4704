"""The job arguments shared by ``generate`` (local) and ``submit`` (to a service).

Their ranges are not checked here: the one sampling policy (``model/sampling.py``) checks
them wherever a request arrives, with the same sentence.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ..model.sampling import FAST_PRESET, SAMPLERS, SETTINGS


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
    parser.add_argument("--seed", type=int, help=f"random seed 0..{SETTINGS['seed'].high:.0f} "
                        "(default: a random one, recorded in provenance.json)")
    add_sampling_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="result directory (must not exist or be empty)")


def add_sampling_arguments(parser) -> None:
    """The sampling flags (all but the seed); ranges are checked by model/sampling.py, not here."""
    parser.add_argument("--steps", type=int, help=f"diffusion steps per stage, {_range('num_inference_steps')} "
                        "(default: the model's, usually 100)")
    parser.add_argument("--anatomy-steps", type=int,
                        help="anatomy-stage steps that hold the drawn anatomy, 0..steps (default: the model's share "
                             "of the steps, e.g. 80 of 100 for the demo model, 50 of 100 in XReal)")
    parser.add_argument("--guidance", type=float,
                        help=f"classifier-free guidance of the pathology stage, {_range('guidance_scale')} (default 7)")
    parser.add_argument("--eta", type=float, help=f"DDIM eta, {_range('eta')} (default 1 as the original)")
    parser.add_argument("--sampler", choices=SAMPLERS,
                        help="ddim (XReal's, the default), dpmpp (DPM-Solver++ 2M) or unipc: the last two need far "
                             "fewer steps")
    parser.add_argument("--fast", action="store_true",
                        help=f"fast preset: {FAST_PRESET['sampler']} with {FAST_PRESET['num_inference_steps']} steps "
                             "(anatomy held for the model's share of them) unless --sampler/--steps say otherwise")


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


def sampling_arguments(args) -> dict:
    """The sampling settings the user gave besides the seed, by public name (None = the model's default)."""
    return {"steps": args.steps, "anatomy_steps": args.anatomy_steps, "guidance": args.guidance,
            "eta": args.eta, "sampler": args.sampler, "fast": args.fast or None}


def _range(name: str) -> str:
    setting = SETTINGS[name]
    return f"{setting.low:g}..{setting.high:g}"
