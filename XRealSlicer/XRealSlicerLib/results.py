"""A downloaded result directory -> what Slicer imports and shows.

The engine writes ``sc.dcm``, ``seg.dcm``, ``preview.png``, ``provenance.json``,
``segments.json`` and ``segments/<n>_<name>.png``. The GUI imports the two DICOM
files with ``DICOMUtils.importDicom(dir, copyFiles=True)`` and loads them by the
series UIDs taken from provenance (``seriesUIDsForFiles`` cannot find copied
files). Without a DICOM-SEG loader (Slicer <= 5.10 without QuantitativeReporting)
it rebuilds the segments from the plain masks with :func:`read_fallback_segments`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from xreal_engine.control_spec import REFERENCE_CONTROLS
from xreal_engine.errors import InputError
from xreal_engine.vocabulary import numbered_name

from .vocabulary import Vocabulary

SC_FILE = "sc.dcm"
SEG_FILE = "seg.dcm"
PROVENANCE_FILE = "provenance.json"
SEGMENTS_FILE = "segments.json"
PREVIEW_FILE = "preview.png"


@dataclass
class FallbackSegment:
    """One segment rebuilt without a SEG loader: pixels on the SC grid + how Slicer should show it."""

    name: str
    color: Tuple[float, float, float]  # 0..1
    terminology: str  # Slicer terminology string ('' when the vocabulary has no entry)
    array: np.ndarray  # (1, rows, columns) uint8, 1 inside
    kind: str = ""
    finding: Optional[str] = None
    label: Optional[int] = None


@dataclass
class GenerationResult:
    """The files and identifiers of one finished job, as the GUI needs them."""

    directory: Path
    sc_path: Path
    seg_path: Optional[Path]
    provenance: dict
    sc_series_uid: str
    seg_series_uid: Optional[str]
    study_uid: Optional[str]
    warnings: List[str] = field(default_factory=list)
    job: dict = field(default_factory=dict)  # the engine's final job status (push report, warnings)

    @property
    def series_uids(self) -> List[str]:
        return [uid for uid in (self.sc_series_uid, self.seg_series_uid) if uid]

    @property
    def dicom_files(self) -> List[Path]:
        return [p for p in (self.sc_path, self.seg_path) if p is not None]


def _uid(mapping: dict, *names: str) -> Optional[str]:
    for name in names:
        value = mapping.get(name)
        if value:
            return str(value)
    return None


def series_uids_from(provenance: dict, job: Optional[dict] = None) -> Dict[str, Optional[str]]:
    """SC/SEG series and study UIDs from the engine's job response or provenance (either naming style)."""
    sources = []
    if job:
        sources.append(job.get("dicom") or {})
    sources.append(provenance.get("dicom") or {})
    found: Dict[str, Optional[str]] = {"sc_series": None, "seg_series": None, "study": None}
    for source in sources:
        if isinstance(source.get("dicom"), dict):  # the job API nests provenance's "dicom" block
            source = source["dicom"]
        sc = source.get("sc") if isinstance(source.get("sc"), dict) else {}
        seg = source.get("seg") if isinstance(source.get("seg"), dict) else {}
        found["sc_series"] = found["sc_series"] or _uid(sc, "series_instance_uid", "SeriesInstanceUID", "series_uid") \
            or _uid(source, "sc_series_instance_uid", "sc_series_uid")
        found["seg_series"] = found["seg_series"] or _uid(seg, "series_instance_uid", "SeriesInstanceUID", "series_uid") \
            or _uid(source, "seg_series_instance_uid", "seg_series_uid")
        found["study"] = found["study"] or _uid(sc, "study_instance_uid", "StudyInstanceUID", "study_uid") \
            or _uid(source, "study_instance_uid", "study_uid")
    return found


def _series_uid_from_file(path: Path) -> Tuple[Optional[str], Optional[str]]:
    """(series, study) read from the DICOM header; pydicom is bundled with Slicer."""
    import pydicom

    dataset = pydicom.dcmread(str(path), stop_before_pixels=True,
                              specific_tags=["SeriesInstanceUID", "StudyInstanceUID"])
    return str(dataset.get("SeriesInstanceUID", "")) or None, str(dataset.get("StudyInstanceUID", "")) or None


def read_result(directory: Path, job: Optional[dict] = None) -> GenerationResult:
    """Check a downloaded result directory and collect what the GUI loads; InputError if incomplete."""
    directory = Path(directory)
    sc_path = directory / SC_FILE
    if not sc_path.is_file():
        raise InputError(f"The result in {directory} has no {SC_FILE}; the download is incomplete.")
    seg_path = directory / SEG_FILE if (directory / SEG_FILE).is_file() else None
    provenance = {}
    if (directory / PROVENANCE_FILE).is_file():
        provenance = json.loads((directory / PROVENANCE_FILE).read_text(encoding="utf-8"))
    uids = series_uids_from(provenance, job)
    if not uids["sc_series"]:
        uids["sc_series"], uids["study"] = _series_uid_from_file(sc_path)
    if seg_path is not None and not uids["seg_series"]:
        uids["seg_series"], _ = _series_uid_from_file(seg_path)
    return GenerationResult(
        directory=directory,
        sc_path=sc_path,
        seg_path=seg_path,
        provenance=provenance,
        sc_series_uid=uids["sc_series"],
        seg_series_uid=uids["seg_series"] if seg_path is not None else None,
        study_uid=uids["study"],
        warnings=list(provenance.get("warnings", [])),
        job=dict(job or {}),
    )


def _read_mask_png(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.shape[0] != 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise InputError(f"The segment mask {path.name} is not a 2D image.")
    return array


def read_fallback_segments(directory: Path, vocabulary: Optional[Vocabulary] = None) -> List[FallbackSegment]:
    """Rebuild the result's segments from ``segments.json`` + per-segment PNG masks (no SEG loader needed)."""
    directory = Path(directory)
    index_path = directory / SEGMENTS_FILE
    if not index_path.is_file():
        raise InputError(f"The result in {directory} has no {SEGMENTS_FILE}, so its segments cannot be rebuilt.")
    entries = json.loads(index_path.read_text(encoding="utf-8")).get("segments", [])
    vocabulary = vocabulary or Vocabulary.load()
    segments = []
    for entry in sorted(entries, key=lambda e: int(e.get("segment_number", 0))):
        mask_path = directory / entry["file"]
        if not mask_path.is_file():
            raise InputError(f"The segment mask {entry['file']} listed in {SEGMENTS_FILE} is missing.")
        array = (_read_mask_png(mask_path) > 0).astype(np.uint8)[np.newaxis]
        terminology = ""
        display_name = entry.get("name", mask_path.stem)
        if entry.get("kind") == "anatomy" and entry.get("label") is not None:
            for template in vocabulary.anatomy_templates([int(entry["label"])]):
                terminology, display_name = template.terminology, template.name
        elif entry.get("kind") == "attention":  # the attention control's region: coded as the engine codes it
            terminology = vocabulary.attention_template([]).terminology
        elif entry.get("finding"):
            vocab_entry = vocabulary.finding_entry(entry["finding"])
            if vocab_entry is not None:
                terminology, display_name = vocab_entry["slicer_terminology_entry"], vocab_entry["display_name"]
        display_name = numbered_name(display_name, [segment.name for segment in segments])  # as in the SEG
        color = entry.get("color") or [128, 128, 128]
        values = [float(c) for c in color][:3]
        if max(values) > 1.0:
            values = [c / 255.0 for c in values]
        segments.append(FallbackSegment(
            name=display_name,
            color=(values[0], values[1], values[2]),
            terminology=terminology,
            array=array,
            kind=entry.get("kind", ""),
            finding=entry.get("finding"),
            label=entry.get("label"),
        ))
    return segments



def push_summary(report: Optional[dict]) -> str:
    """One sentence for the panel from the engine's PACS push report."""
    if not report:
        return "The result was not sent to a PACS."
    destination = report.get("destination", "the PACS")
    if "accepted" not in report:
        return f"Sending to {destination} failed: {report.get('message', 'no details')}"
    failed = [item for item in report.get("instances", []) if item.get("status") != "accepted"]
    text = f"{report['accepted']} of {report['accepted'] + len(failed)} objects accepted by {destination}."
    if failed:
        text += " Not accepted: " + "; ".join(f"{item.get('file', '?')} ({item.get('detail', '')})" for item in failed)
    return text


# ----------------------------------------------------------------------------- the Results list


def provenance_summary(provenance: dict) -> str:
    """One line of what made a result (seed, model, settings), for the results list."""
    parts = []
    if provenance.get("seed") is not None:
        parts.append(f"seed {provenance['seed']}")
    if provenance.get("model_id"):
        parts.append(str(provenance["model_id"]))
    steps, anatomy = provenance.get("steps"), provenance.get("anatomy_steps")
    if steps is not None:
        parts.append(f"{steps} steps" + (f" ({anatomy} anatomy)" if anatomy is not None else ""))
    if provenance.get("guidance") is not None:
        parts.append(f"guidance {provenance['guidance']:g}")
    if provenance.get("sampler"):
        parts.append(str(provenance["sampler"]))
    if provenance.get("mode") == "edit":
        parts.append("edit")
    findings = [f for f in provenance.get("findings") or [] if f]
    if findings:
        parts.append(", ".join(findings))
    used = controls_used(provenance)
    if used:
        parts.append("controls " + ", ".join(f"{name} {scale:g}" for name, scale in used))
    if provenance.get("anatomy_stage_reused") is True:  # the engine's anatomy-stage cache: same anatomy image
        parts.append("anatomy stage reused")
    return " · ".join(parts)


def controls_used(provenance: dict) -> List[Tuple[str, float]]:
    """(name, scale) of each ControlNet control that made the result (provenance ``controls``)."""
    used = []
    for entry in provenance.get("controls") or []:
        if not isinstance(entry, dict) or not entry.get("name"):
            continue
        scale = entry.get("scale")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            continue
        used.append((str(entry["name"]), float(scale)))
    return used


def control_stages_of(provenance: dict) -> Optional[str]:
    """The control stages setting that made a result: provenance's ``control_stages``, else what its controls'
    ``stages`` say (the setting, or the list of stages steered, e.g. ["anatomy", "pathology"]); None if neither."""
    if isinstance(provenance.get("control_stages"), str):
        return provenance["control_stages"]
    for entry in provenance.get("controls") or []:
        stages = entry.get("stages") if isinstance(entry, dict) else None
        if isinstance(stages, str) and stages:
            return stages
        if isinstance(stages, list) and stages:
            return "both" if set(stages) == {"anatomy", "pathology"} else str(stages[0])
    return None


def quality_summary(provenance: dict) -> Optional[str]:
    """How well the image follows the drawn anatomy, when the result carries the quality check's figure:
    "anatomy followed: Dice 0.91 / 0.93 / 0.89 (left lung / right lung / heart)".

    ``provenance["quality"]["anatomy_dice"]`` is ``{structure: Dice}`` (the batch quality check,
    ``xreal_engine/batch/quality.py``, writes it); None when the result has no such figure (older engines,
    or the check did not run): nothing is shown.
    """
    quality = provenance.get("quality")
    dice = quality.get("anatomy_dice") if isinstance(quality, dict) else None
    if not isinstance(dice, dict) or not dice:
        return None
    values = []
    for structure, value in dice.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        values.append((str(structure), float(value)))
    if not values:
        return None
    figures = " / ".join(f"{value:.2f}" for _name, value in values)
    return f"anatomy followed: Dice {figures} ({' / '.join(name for name, _value in values)})"


def result_label(label: str, provenance: dict) -> str:
    """The results list's line: the job's label, then its provenance and, where checked, how well it followed
    the drawn anatomy (so every result shows its figure, not only the selected one)."""
    summary = " · ".join(filter(None, [provenance_summary(provenance), quality_summary(provenance)]))
    return f"{label or 'result'}: {summary}" if summary else (label or "result")


def settings_from_provenance(provenance: dict) -> Dict[str, object]:
    """The Generate section's values that reproduce a result ("Generate again with these settings").

    Parameter-node fields (seed, steps, anatomySteps, guidance, sampler, and the ControlNet settings when
    provenance records ``controls``: whether the loaded X-ray is the radiomics reference, which map, the
    scales and stages); Fast preview is off, since the result's own steps and sampler are set explicitly, and
    one image is made (no variations, no interpolation): the result's own. Settings the result does not
    record are left out (the panel keeps its value).
    """
    fields = {"seed": ("seed", int), "steps": ("steps", int), "anatomy_steps": ("anatomySteps", int),
              "guidance": ("guidance", float)}
    settings: Dict[str, object] = {}
    for name, (field_name, kind) in fields.items():
        value = provenance.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            settings[field_name] = kind(value)
    if provenance.get("sampler"):
        settings["sampler"] = str(provenance["sampler"])
    if isinstance(provenance.get("controls"), list):
        used = controls_used(provenance)
        reference = [(name, scale) for name, scale in used if name in REFERENCE_CONTROLS]
        settings["useReference"] = bool(reference)
        if reference:
            settings["referenceControl"], settings["referenceScale"] = reference[0]
        for name, scale in used:
            if name == "attention":
                settings["attentionScale"] = scale
        if used and control_stages_of(provenance):
            settings["controlStages"] = control_stages_of(provenance)
    settings.update(fastPreview=False, variations=1, interpolate=False)
    return settings


def result_visibility(selected: Optional[str], results: List[str], canvas: Optional[str] = None
                      ) -> Dict[str, Tuple[str, ...]]:
    """Which slice views show each segmentation when a result is shown side by side.

    The selected result's segmentation over its SC in Red, the drawn masks over the canvas in Yellow, every
    other result's segmentation in no view: all results share origin 0 and identity geometry, so an earlier
    result's masks would otherwise lie on top of the current SC (an Interpolate run showed every position).
    """
    views: Dict[str, Tuple[str, ...]] = {node_id: () for node_id in results if node_id}
    if selected:
        views[selected] = ("Red",)
    if canvas:
        views[canvas] = ("Yellow",)
    return views
