"""The Generate button without Slicer: the panel's values and the drawn masks -> the jobs of one run.

``XRealSlicer.py`` reads the MRML side (segments as arrays, the canvas geometry, the markups path in
RAS, the edit source) and hands plain values to :func:`plan_jobs`, which validates everything like the
engine does, writes the request files and returns one :class:`JobSpec` per image: N seeds for
Variations, one per position for Interpolate (same seed, the pathology moved along the path), each with
the run's ControlNet controls (XRealSlicerLib.controls). The panel's rules (which controls apply, what the progress bar and status line show) are here too.
No Qt here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from xreal_engine.errors import InputError

from . import connection, controls, parameters, series
from .jobs import DONE, FAILED, FINAL, JobEvent, JobSpec
from .request import REMOVE_FINDING, CanvasGeometry, SegmentInput, build_inputs, write_request_files
from .vocabulary import Vocabulary


@dataclass
class PanelSettings:
    """The Generate section's values (None = the model's default)."""

    seed: int = 0
    steps: Optional[int] = None
    anatomy_steps: Optional[int] = None
    guidance: Optional[float] = None
    sampler: Optional[str] = None
    fast: bool = False
    variations: int = 1
    interpolate: bool = False
    interpolation_steps: int = 8
    edit_mode: bool = False
    push_to: Optional[str] = None
    control_stages: Optional[str] = None  # where the ControlNets steer (None = the policy's default)
    use_reference: bool = False  # the loaded X-ray (canvas) as the reference of a radiomics map
    reference_control: Optional[str] = None  # sobel / canny / texture (None = the model's first)
    reference_scale: Optional[float] = None  # None = the model's default scale
    attention_scale: Optional[float] = None


@dataclass
class EditSource:
    """Edit mode: the X-ray to edit, as a DICOM file (preferred: the result joins its study), as the
    canvas pixels, or fetched by the engine from one of its PACS sources."""

    file: Optional[Path] = None
    pixels: Optional[np.ndarray] = None
    pacs: Optional[Dict[str, str]] = None


@dataclass
class InterpolationPath:
    """Interpolate: the markups points in RAS and the canvas's RAS-to-IJK matrix (4x4)."""

    points_ras: np.ndarray
    ras_to_ijk: np.ndarray


@dataclass
class RunPlan:
    jobs: List[JobSpec]
    parameters: parameters.SamplingParameters
    warnings: List[str] = field(default_factory=list)


def check_drawing(segments: Sequence[SegmentInput], canvas: CanvasGeometry, vocabulary: Vocabulary,
                  edit_mode: bool = False) -> List[str]:
    """The checks that need no engine (empty anatomy, a painted segment without a finding, a 3D canvas),
    before a local engine is started for the first Generate; the model's own labels and findings are
    checked again by :func:`plan_jobs` once it runs. Returns the warnings."""
    labels = [template.meaning.label for template in vocabulary.anatomy_templates()]
    findings = [entry["name"] for entry in vocabulary.findings]
    return build_inputs(segments, canvas, vocabulary, labels, findings, edit_mode=edit_mode).warnings


def plan_jobs(segments: Sequence[SegmentInput], canvas: CanvasGeometry, vocabulary: Vocabulary, info: Mapping,
              panel: PanelSettings, run_dir: Path, *, edit_source: Optional[EditSource] = None,
              selected_segment: Optional[str] = None, path: Optional[InterpolationPath] = None,
              reference: Optional[np.ndarray] = None) -> RunPlan:
    """Validate the drawing and the settings against the connected model and write one request per image.

    ``selected_segment``: the pathology that Interpolate moves (the segment list's current one; the first
    pathology when it is not one). ``reference``: the canvas pixels, the radiomics reference when
    ``panel.use_reference``. InputError with one sentence for anything the engine would refuse.
    """
    resolved = parameters.panel_parameters(parameters.model_defaults(info), steps=panel.steps,
                                           anatomy_steps=panel.anatomy_steps, guidance=panel.guidance,
                                           sampler=panel.sampler, fast=panel.fast,
                                           control_stages=panel.control_stages)
    inputs = build_inputs(segments, canvas, vocabulary, list(connection.model_anatomy_labels(info)),
                          connection.model_findings(info), edit_mode=panel.edit_mode)
    planned = controls.plan_controls(controls.model_controlnets(info), use_reference=panel.use_reference,
                                     reference_control=panel.reference_control,
                                     reference_scale=panel.reference_scale, reference=reference,
                                     attention=inputs.attention, attention_scale=panel.attention_scale)
    edit_source = edit_source or EditSource()
    if panel.edit_mode and edit_source.file is None and edit_source.pixels is None and not edit_source.pacs:
        raise InputError("Editing needs the X-ray: its DICOM file, its pixels or a PACS source.")
    run_dir = Path(run_dir)

    def job(name: str, seed: int) -> JobSpec:
        files = write_request_files(inputs, run_dir / name, parameters.request_values(resolved, seed, panel.fast),
                                    edit_image=edit_source.pixels if panel.edit_mode else None,
                                    edit_image_file=edit_source.file if panel.edit_mode else None,
                                    controls=planned)
        files.control_stages = resolved.control_stages if planned else None
        files.push_to = panel.push_to or None
        files.source = edit_source.pacs if panel.edit_mode else None
        return JobSpec(files, run_dir / name / "result", name)

    if not panel.interpolate:
        jobs = [job(f"seed-{seed}", seed) for seed in series.variation_seeds(panel.seed, panel.variations)]
        return RunPlan(jobs, resolved, list(inputs.warnings))

    names = [name for _mask, _finding, name in inputs.pathologies]
    if not names:
        raise InputError("Paint a pathology segment (with its finding) to interpolate first.")
    if path is None:
        raise InputError("Choose the path (a markups curve or point list) to move the pathology along.")
    index = names.index(selected_segment) if selected_segment in names else 0
    positions = series.positions_along_path(series.ras_to_pixel(path.points_ras, path.ras_to_ijk),
                                            panel.interpolation_steps)
    mask, finding, name = inputs.pathologies[index]
    jobs = []
    for number, moved in enumerate(series.interpolated_masks(mask, positions), start=1):
        inputs.pathologies[index] = (moved, finding, name)
        jobs.append(job(f"position-{number:02d}", panel.seed))
    inputs.pathologies[index] = (mask, finding, name)
    return RunPlan(jobs, resolved, list(inputs.warnings))


# ----------------------------------------------------------------------------- the panel's rules

def finding_choices(findings: Sequence[str], vocabulary: Vocabulary, edit_mode: bool) -> List[Tuple[str, str]]:
    """(finding, label) of the Finding list: the model's findings; when editing an X-ray and the model has no
    "no finding" of its own, also the removal (the region is inpainted without a finding)."""
    choices = [(finding, vocabulary.finding_display_name(finding)) for finding in findings]
    if edit_mode and REMOVE_FINDING not in {finding.lower() for finding in findings}:
        choices.append((REMOVE_FINDING, "No finding (remove it; edit mode)"))
    return choices


def control_states(*, interpolate: bool, edit_mode: bool, fast: bool, controlnets: Mapping[str, float] = None,
                   use_reference: bool = False) -> Dict[str, bool]:
    """Which Generate controls apply (the others are disabled, so nothing is silently ignored).

    Interpolate makes one image per path position with one seed: Variations does not apply, the path and
    its positions do. Fast preview lets the preset choose the steps, anatomy steps and sampler. Editing an
    X-ray runs only the pathology stage: no anatomy steps; the PACS source applies only there. The ControlNet
    controls apply only to the ControlNets the model has (``controlnets``: ``controls.model_controlnets``).
    """
    controlnets = controlnets or {}
    radiomics = bool(controls.reference_choices(controlnets))
    return {
        "reference": radiomics,
        "referenceControl": radiomics and use_reference,
        "referenceScale": radiomics and use_reference,
        "attention": controls.ATTENTION in controlnets,
        "controlStages": bool(controlnets),
        "variations": not interpolate,
        "interpolationPath": interpolate,
        "interpolationSteps": interpolate,
        "steps": not fast,
        "anatomySteps": not fast and not edit_mode,
        "sampler": not fast,
        "pacsSource": edit_mode,
    }


@dataclass
class PanelProgress:
    """What a job event changes in the panel."""

    status: str
    bar: Optional[int] = None  # None: keep the bar where it is (a failure or cancel stops it there)
    finished: bool = False  # the run is over: Cancel turns back into Generate
    error: Optional[str] = None  # a failure to show in a message box


def panel_progress(event: JobEvent, notes: Sequence[str] = ()) -> PanelProgress:
    """The progress bar (whole run, 0..100), the status line and the end of a run, from one job event.

    ``notes`` (e.g. "The segment 'Pathology' is empty and was left out.") stay in the status line
    behind the progress until the run ends.
    """
    bar = None
    if event.state not in FINAL or event.state == DONE:
        bar = 100 if event.state == DONE else int(round(100 * event.fraction))
    status = event.status_text()
    if notes:
        status += " " + " ".join(notes)
    return PanelProgress(status, bar, event.state in FINAL, event.message if event.state == FAILED else None)
