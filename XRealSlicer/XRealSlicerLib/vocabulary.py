"""Segment names, colours and terminology from the engine's ``vocabulary.json``.

The Slicer side reads the same file the engine writes its DICOM SEG codes from,
so a segment created here and a segment coming back in a result always agree.
Segments are recognised by their terminology codes first (robust to renaming),
then by name (display name, name or alias, case-insensitive). An "Attention" segment (painted where the
image should draw attention: the engine blurs it into the ``attention`` ControlNet's map) is neither
anatomy nor a finding.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from xreal_engine.errors import InputError
from xreal_engine.vocabulary import numbered_name as _numbered

from .enginepath import vocabulary_path

ANATOMY = "anatomy"
PATHOLOGY = "pathology"
ATTENTION = "attention"
UNASSIGNED_PATHOLOGY = "Pathology"  # a new pathology segment's name until its finding is chosen
ATTENTION_NAME = "Attention"  # an attention segment's name: "Attention", "Attention 2", ...
ATTENTION_COLOR = (1.0, 0.35, 0.2)  # when the vocabulary has no attention region entry of its own
_number_suffix = re.compile(r"\s+\d+$")


@dataclass(frozen=True)
class SegmentKind:
    """What a segment means for the engine: an anatomy label value, or a finding."""

    kind: str  # ANATOMY, PATHOLOGY or ATTENTION
    label: Optional[int] = None  # anatomy label value
    finding: Optional[str] = None  # finding name as the engine knows it


@dataclass(frozen=True)
class SegmentTemplate:
    """How to create a segment in Slicer: name, colour (0..1) and terminology string."""

    name: str
    color: Tuple[float, float, float]
    terminology: str
    meaning: SegmentKind


def _code_key(code_text: str) -> Tuple[str, str]:
    """``scheme^value^meaning`` -> (scheme, value); empty for ``^^``."""
    parts = (code_text or "").split("^")
    if len(parts) < 2 or not parts[1]:
        return ("", "")
    return (parts[0].strip().upper(), parts[1].strip())


def parse_terminology(entry: str) -> Optional[Dict[str, Tuple[str, str]]]:
    """Split a Slicer terminology string into its code keys (None if it is not one).

    Format (vtkSlicerTerminologiesModuleLogic): ``context~category~type~typeModifier~regionContext~region~regionModifier``.
    """
    if not entry or "~" not in entry:
        return None
    fields = entry.split("~")
    if len(fields) < 3:
        return None
    fields += [""] * (7 - len(fields))
    return {
        "category": _code_key(fields[1]),
        "type": _code_key(fields[2]),
        "type_modifier": _code_key(fields[3]),
        "region": _code_key(fields[5]),
    }


def _entry_code(entry: dict, key: str) -> Tuple[str, str]:
    code = entry.get(key)
    if not code:
        return ("", "")
    return (str(code["scheme"]).upper(), str(code["value"]))


class Vocabulary:
    """Anatomy labels and findings, with lookups used to build a generation request."""

    def __init__(self, data: dict):
        self.data = data
        self.anatomy = list(data["anatomy"])
        self.findings = list(data["findings"])

    @classmethod
    def load(cls, path: Optional[Path] = None) -> "Vocabulary":
        path = Path(path) if path else vocabulary_path()
        with open(path, encoding="utf-8") as handle:
            return cls(json.load(handle))

    # --------------------------------------------------------------- creation

    def anatomy_templates(self, labels: Optional[List[int]] = None) -> List[SegmentTemplate]:
        """One template per anatomy label (only ``labels`` if given, e.g. the model's)."""
        wanted = None if labels is None else {int(label) for label in labels}
        return [
            SegmentTemplate(
                name=entry["display_name"],
                color=_unit_color(entry["color"]),
                terminology=entry["slicer_terminology_entry"],
                meaning=SegmentKind(ANATOMY, label=int(entry["label"])),
            )
            for entry in self.anatomy
            if wanted is None or int(entry["label"]) in wanted
        ]

    def finding_template(self, finding: str, segment_name: Optional[str] = None) -> SegmentTemplate:
        """Template for a pathology segment of ``finding`` (name defaults to the finding's display name).

        InputError for a finding this module's vocabulary does not know (a newer remote engine).
        """
        entry = self.finding_entry(finding)
        if entry is None:
            raise InputError(f"The finding '{finding}' is not in this module's vocabulary; the engine is newer than "
                             "the XRealSlicer extension. Update the extension in the Extension Manager.")
        return SegmentTemplate(
            name=segment_name or entry["display_name"],
            color=_unit_color(entry["color"]),
            terminology=entry["slicer_terminology_entry"],
            meaning=SegmentKind(PATHOLOGY, finding=entry["name"]),
        )

    def finding_entry(self, finding: str) -> Optional[dict]:
        wanted = (finding or "").strip().lower()
        for entry in self.findings:
            names = [entry["name"], entry.get("display_name", "")] + list(entry.get("aliases", []))
            if wanted in {name.lower() for name in names if name}:
                return entry
        return None

    def finding_display_name(self, finding: str) -> str:
        entry = self.finding_entry(finding)
        return entry["display_name"] if entry else finding

    # --------------------------------------------------------------- pathology segment names

    def attention_template(self, existing: List[str]) -> SegmentTemplate:
        """A new attention segment: "Attention" (numbered if taken), coded as the vocabulary's attention
        region when it has one (the engine's SEG codes the attention region with the same entry)."""
        entry = self.data.get("attention_region") or {}
        color = _unit_color(entry["color"]) if entry.get("color") else ATTENTION_COLOR
        return SegmentTemplate(_numbered(ATTENTION_NAME, existing), color, _terminology_of(self.data, entry),
                               SegmentKind(ATTENTION))

    def new_pathology_name(self, existing: List[str]) -> str:
        """The name of a new pathology segment that has no finding yet: "Pathology", "Pathology 2", ..."""
        return _numbered(UNASSIGNED_PATHOLOGY, existing)

    def name_for_finding(self, current: str, finding: str, existing: List[str]) -> str:
        """The segment's name once its finding is chosen: the finding's display name (numbered if taken).

        Only a name the module gave ("Pathology 2", or another finding's display name, numbered or not)
        is replaced; a name the user typed is kept.
        """
        automatic = [UNASSIGNED_PATHOLOGY] + [entry.get("display_name") or entry["name"] for entry in self.findings]
        base = _number_suffix.sub("", (current or "").strip())
        if current and base.lower() not in {name.lower() for name in automatic}:
            return current
        others = [name for name in existing if name != current]
        return _numbered(self.finding_display_name(finding), others)

    # --------------------------------------------------------------- recognition

    def classify(self, segment_name: str, terminology: str = "") -> Optional[SegmentKind]:
        """What a Slicer segment stands for: terminology codes first, then its name; None if unknown."""
        codes = parse_terminology(terminology)
        attention = self.data.get("attention_region") or {}
        if codes and codes["type"][1] and attention.get("type") and codes["type"] == _entry_code(attention, "type"):
            return SegmentKind(ATTENTION)
        if codes and codes["type"][1]:
            for entry in self.anatomy:
                if codes["type"] == _entry_code(entry, "type") and codes["type_modifier"] == _entry_code(entry, "type_modifier"):
                    return SegmentKind(ANATOMY, label=int(entry["label"]))
            for entry in self.findings:
                if codes["type"] == _entry_code(entry, "type"):
                    return SegmentKind(PATHOLOGY, finding=entry["name"])
        wanted = (segment_name or "").strip().lower()
        if _number_suffix.sub("", wanted) == ATTENTION_NAME.lower():
            return SegmentKind(ATTENTION)
        for entry in self.anatomy:
            if wanted in {entry["name"].lower(), entry["display_name"].lower()}:
                return SegmentKind(ANATOMY, label=int(entry["label"]))
        entry = self.finding_entry(wanted)
        if entry is not None:
            return SegmentKind(PATHOLOGY, finding=entry["name"])
        return None


def _terminology_of(data: dict, entry: dict) -> str:
    """A Slicer terminology string for a vocabulary entry without one of its own ('' without codes)."""
    if entry.get("slicer_terminology_entry"):
        return str(entry["slicer_terminology_entry"])
    if not (entry.get("category") and entry.get("type")):
        return ""

    def code(key):
        value = entry.get(key)
        return f"{value['scheme']}^{value['value']}^{value['meaning']}" if value else "^^"

    return "~".join([data.get("slicer_terminology_context", ""), code("category"), code("type"), "^^",
                     data.get("slicer_anatomic_context", ""), code("anatomic_region"), "^^"])


def _unit_color(color) -> Tuple[float, float, float]:
    """Vocabulary colours are 0..255; Slicer segments take 0..1."""
    values = [float(c) for c in color][:3]
    if max(values) > 1.0:
        values = [c / 255.0 for c in values]
    return (values[0], values[1], values[2])
