"""Rows without a manifest: every template x anatomy edit x finding x seed (a balanced data set).

``--from-templates [NAMES] --findings cardiomegaly,pneumonia,none --seeds 0:1000 --augment-anatomy``.
The anatomy edits are the evaluation's counterfactuals (``training/evaluate.py``: the heart scaled about
its centre, each lung's width scaled), the pathology region of a finding is the evaluation's drawn
region (around the heart for cardiomegaly, else the lower right lung) on the edited anatomy. Edited
anatomies and regions are written as PNGs into ``OUT/inputs/`` so that every row is an ordinary
file-based request; the rows are ordered seed first, so a run stopped half-way is still balanced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError, XRealError, shown
from ..generate import GenerationRequest, prepare_request
from ..model.info import canonical_finding
from ..model.sampling import SETTINGS, SamplingParameters
from .exports import png_bytes
from .manifest import BatchRow, find_templates, template_files

NO_FINDING = "none"  # in --findings: the anatomy alone, no pathology region
AUGMENT_HEART_SCALES = (1.0, 1.25)  # --augment-anatomy: the evaluation's HEART_SCALE ...
AUGMENT_LUNG_WIDTHS = (1.0, 0.8)  # ... and LUNG_WIDTH_SCALE, each with the unchanged anatomy
MAX_ROWS = 10_000_000


@dataclass
class Design:
    templates: Optional[list]  # template names; None = every anatomy_*.png
    findings: list
    seeds: object  # a list or a range (parse_seeds)
    heart_scales: tuple = (1.0,)
    lung_widths: tuple = (1.0,)


def parse_seeds(text: str):
    """``0:1000`` (start included, stop excluded, like range), ``3,7,9`` or ``5``.

    A range stays a ``range``: its length and ends are arithmetic, so ``0:4294967295`` is refused
    by the row limit before a list of four billion seeds is built.
    """
    try:
        if ":" in text:
            start, _, stop = text.partition(":")
            seeds = range(int(start), int(stop))
        else:
            seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--seeds must be START:STOP or a comma-separated list of whole numbers, not '{shown(text)}'.")
    if not seeds:
        raise InputError(f"--seeds '{shown(text)}' gives no seed.")
    count = seeds.stop - seeds.start if isinstance(seeds, range) else len(seeds)  # len() overflows past 2**63
    if count > MAX_ROWS:
        raise InputError(f"--seeds '{shown(text)}' gives {count} seeds; at most {MAX_ROWS} rows are possible.")
    if isinstance(seeds, range):  # no repeats in a range; its ends are its first and last
        low, high = seeds[0], seeds[-1]
    else:
        refuse_repeats("--seeds", seeds)
        low, high = min(seeds), max(seeds)
    for seed in (low, high):
        SETTINGS["seed"].check(seed)
    return seeds


def parse_scales(text: str, option: str) -> tuple:
    try:
        scales = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        scales = ()
    if not scales or not all(0.3 <= scale <= 3.0 for scale in scales):
        raise InputError(f"{option} must be a comma-separated list of factors from 0.3 to 3, not '{shown(text)}'.")
    refuse_repeats(option, scales)
    return scales


def refuse_repeats(option: str, values) -> None:
    """A value given twice would make two rows of one name (one image, counted twice): refused."""
    seen = set()
    for value in values:
        key = value.lower() if isinstance(value, str) else value
        if key in seen:
            raise InputError(f"{option} gives {shown(str(value))} twice; list each value once.")
        seen.add(key)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_") or "x"


def _factor(value: float) -> str:
    """A factor in a row name: short (1.25, 2), yet exact, so two factors never share a name (1.0000001)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def plan_design(design: Design, model_info, templates: Optional[Path], inputs_dir: Path, sampling: dict):
    """(rows, {input path: PNG bytes}) for ``design``; InputError before anything is written."""
    from ..training.evaluate import enlarge_heart, narrow_lungs, pathology_region

    folder = find_templates(templates)
    available = template_files(folder)
    names = design.templates or [name for name in available if name.startswith("anatomy_")]
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        raise InputError(f"--from-templates: no template {', '.join(map(shown, unknown)) or 'anatomy_*'} in {folder} "
                         f"(templates: {', '.join(available) or 'none'}).")
    refuse_repeats("--from-templates", names)
    findings = []
    for finding in design.findings:
        finding = finding.strip()
        findings.append(NO_FINDING if finding.lower() == NO_FINDING else
                        canonical_finding(finding, model_info.findings))
    refuse_repeats("--findings", findings)  # after canonicalising: 'Pneumonia' and 'pneumonia' are one
    SamplingParameters.from_public(model_info.defaults, sampling)  # one refusal, not one per row
    variants = [(h, w) for h in design.heart_scales for w in design.lung_widths]
    count = len(design.seeds) * len(names) * len(variants) * len(findings)
    if count > MAX_ROWS:
        raise InputError(f"The design has {count} rows; at most {MAX_ROWS} are possible in one output directory.")

    inputs_dir = Path(inputs_dir)
    files, cells = {}, []  # cells: (template, heart, width, finding, anatomy path, region path or None, name stem)
    for template in names:
        try:
            labels = prepare_request(GenerationRequest(anatomy_path=available[template], seed=0), model_info).anatomy
        except XRealError as error:
            raise InputError(f"--from-templates: template {template}: {error}") from None
        for heart, width in variants:
            stem = template + (f"-heart{_factor(heart)}" if heart != 1 else "") + \
                (f"-lungs{_factor(width)}" if width != 1 else "")
            edited = labels
            if width != 1:
                edited = narrow_lungs(edited, width)
            if heart != 1:
                edited = enlarge_heart(edited, heart)
            anatomy_path = available[template]
            if edited is not labels:
                anatomy_path = inputs_dir / f"{stem}.png"
                files[anatomy_path] = png_bytes(edited.astype(np.uint8))
            for finding in findings:
                region_path = None
                if finding != NO_FINDING:
                    region_path = inputs_dir / f"{stem}__{_slug(finding)}.png"
                    region = pathology_region(edited, finding)
                    if not region.any():
                        raise InputError(f"--from-templates: template {template} has no structure to draw a "
                                         f"{finding} region on (the heart, or the right lung).")
                    files[region_path] = png_bytes(region.astype(np.uint8))
                cells.append((template, heart, width, finding, anatomy_path, region_path,
                              f"{stem}-{_slug(finding)}"))
    rows = []
    for seed in design.seeds:
        for template, heart, width, finding, anatomy_path, region_path, stem in cells:
            rows.append(BatchRow(
                row=len(rows) + 1, name=f"{stem}-s{seed:06d}", anatomy=str(anatomy_path),
                pathologies=((str(region_path), finding),) if region_path else (), seed=seed, sampling=dict(sampling),
                design={"template": template, "finding": None if finding == NO_FINDING else finding,
                        "heart_scale": heart, "lung_width": width},
            ))
    return rows, files

