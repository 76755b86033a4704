"""The job arguments shared by ``generate`` (local) and ``submit`` (to a service).

Their ranges are not checked here: the one sampling policy (``model/sampling.py``) checks
them wherever a request arrives, with the same sentence.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..control_spec import CONTROL_NAMES, CONTROL_SCALE_RANGE, parse_control
from ..errors import InputError
from ..model.sampling import CONTROL_STAGES, DEFAULT_CONTROL_STAGES, FAST_PRESET, SAMPLERS, SETTINGS


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
    low, high = CONTROL_SCALE_RANGE
    parser.add_argument("--control", action="append", default=[], metavar="NAME[:FILE][:SCALE]",
                        help=f"steer with the model's ControlNet NAME ({', '.join(CONTROL_NAMES)}; repeatable): "
                             "sobel/canny/texture:REFERENCE-X-RAY, attention:MAP-IMAGE or FIXATIONS.csv (x,y,duration), "
                             f"lungs (from --anatomy); SCALE {low:g}..{high:g} (default: the model's)")
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
                             "of the steps, e.g. 85 of 100 for the demo model, 50 of 100 in XReal)")
    parser.add_argument("--guidance", type=float,
                        help=f"classifier-free guidance of the pathology stage, {_range('guidance_scale')} (default 7)")
    parser.add_argument("--eta", type=float, help=f"DDIM eta, {_range('eta')} (default 1 as the original)")
    parser.add_argument("--sampler", choices=SAMPLERS,
                        help="ddim (XReal's, the default), dpmpp (DPM-Solver++ 2M) or unipc: the last two need far "
                             "fewer steps")
    parser.add_argument("--fast", action="store_true",
                        help=f"fast preset: {FAST_PRESET['sampler']} with {FAST_PRESET['num_inference_steps']} steps "
                             "(anatomy held for the model's share of them) unless --sampler/--steps say otherwise")
    parser.add_argument("--control-stages", choices=CONTROL_STAGES,
                        help=f"the stages the --control ControlNets steer (default {DEFAULT_CONTROL_STAGES})")
    parser.add_argument("--keep-outside-region", action=argparse.BooleanOptionalAction, default=None,
                        help="after each pathology stage keep the previous image outside the (feathered) region "
                             "(default: the model's; off in XReal)")


def check_request_arguments(args) -> None:
    """Refusals that need no model and no engine: pairing of masks and findings, image vs source."""
    if len(args.pathology_mask) != len(args.finding):
        masks, findings = len(args.pathology_mask), len(args.finding)
        raise InputError(f"Give exactly one --finding per --pathology-mask ({masks} mask{'s' * (masks != 1)}, "
                         f"{findings} finding{'s' * (findings != 1)}).")
    if args.image is not None and args.source is not None:
        raise InputError("Use either --image or --source, not both.")
    if args.source is not None and not (args.study and args.series):
        raise InputError("--source needs --study and --series (and optionally --instance).")
    given = [flag for flag, value in (("--study", args.study), ("--series", args.series), ("--instance", args.instance))
             if value is not None]
    if args.source is None and given:  # they name the PACS image to edit; alone they would be ignored
        raise InputError(f"{' and '.join(given)} {'names' if len(given) == 1 else 'name'} the image to fetch from a "
                         "PACS; give --source NAME too.")
    control_requests(args)  # a bad --control is refused before any work


def control_requests(args) -> list:
    """The ``--control`` values as ``control_spec.ControlRequest`` (names and scales checked, no file read)."""
    return [parse_control(text) for text in getattr(args, "control", None) or []]


def sampling_arguments(args) -> dict:
    """The sampling settings the user gave besides the seed, by public name (None = the model's default)."""
    return {"steps": args.steps, "anatomy_steps": args.anatomy_steps, "guidance": args.guidance,
            "eta": args.eta, "sampler": args.sampler, "fast": args.fast or None,
            "control_stages": getattr(args, "control_stages", None),
            "keep_outside_region": getattr(args, "keep_outside_region", None)}


def _range(name: str) -> str:
    setting = SETTINGS[name]
    return f"{setting.low:g}..{setting.high:g}"


def add_quality_arguments(parser) -> None:
    """The per-image anatomy check (``batch/quality.py``), shared by ``generate`` (off unless asked) and
    ``generate-batch`` (on unless --no-quality-check); :func:`quality_arguments` reads them."""
    parser.add_argument("--quality-check", action=argparse.BooleanOptionalAction, default=None,
                        help="segment the image with the shipped anatomy segmenter and record the Dice of each requested "
                             "structure in provenance.json (generate-batch: on by default)")
    parser.add_argument("--min-dice", type=float, metavar="DICE",
                        help="refuse (generate-batch: drop and record) an image whose Dice for a requested structure is "
                             "below this, 0..1, e.g. 0.8; implies --quality-check")
    parser.add_argument("--segmenter", type=Path, help="segmenter directory for the check (default: the shipped one)")


def quality_arguments(args, checked_by_default: bool) -> tuple:
    """(check or not, minimum Dice or None, segmenter directory or None); the range is batch/quality.py's."""
    enabled = args.quality_check if args.quality_check is not None else (checked_by_default or args.min_dice is not None)
    if args.min_dice is not None and not enabled:
        raise InputError("--min-dice needs the quality check; leave out --no-quality-check.")
    return enabled, args.min_dice, args.segmenter
