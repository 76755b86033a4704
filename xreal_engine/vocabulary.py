"""The single source of anatomy labels and findings (names, DICOM codes, colours).

Reads ``vocabulary.json`` beside this file. Standard library only, because the
Slicer module reads the same file in Slicer's bare Python. The codes are those
of the DICOM segmentation context groups (CID 7150 categories, CID 7151/7159
types, CID 6102 for ground-glass opacity, which has no SNOMED CT code there) and
match Slicer's "DICOM master list" terminology, so segments round-trip between
Slicer, the engine and DICOM SEG with the same meaning.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

from .errors import InputError

VOCABULARY_PATH = Path(__file__).with_name("vocabulary.json")


@functools.lru_cache(maxsize=1)
def _parsed() -> dict:
    with open(VOCABULARY_PATH, encoding="utf-8") as handle:
        return json.load(handle)


def load_vocabulary() -> dict:
    """The parsed JSON (a private copy: callers may modify it)."""
    return copy.deepcopy(_parsed())


def anatomy_entry(label: int) -> dict:
    """The entry of an anatomy label value (1 left lung, 2 right lung, 3 heart, 4 aorta)."""
    for entry in _parsed()["anatomy"]:
        if entry["label"] == int(label):
            return copy.deepcopy(entry)
    known = ", ".join(f"{e['label']} {e['name']}" for e in _parsed()["anatomy"])
    raise InputError(f"Anatomy label {label} is not in the vocabulary; known labels are {known}.")


def normalise_name(name: str) -> str:
    """Lower case, with '_', '-' and repeated spaces folded to single spaces ("Ground_Glass-Opacity" -> "ground glass opacity")."""
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())


def _finding_keys(entry: dict) -> set[str]:
    return {normalise_name(entry["name"]), normalise_name(entry["display_name"])} | {
        normalise_name(alias) for alias in entry.get("aliases", [])
    }


def finding_names() -> list[str]:
    """Canonical finding names, in vocabulary order."""
    return [entry["name"] for entry in _parsed()["findings"]]


def finding_entry(name: str) -> dict:
    """The entry of a finding, matched case-insensitively by name, display name or alias."""
    key = normalise_name(name)
    for entry in _parsed()["findings"]:
        if key in _finding_keys(entry):
            return copy.deepcopy(entry)
    raise InputError(f"Unknown finding {name!r}; known findings are: {', '.join(finding_names())}.")


def removal_region_entry() -> dict:
    """The entry for an edit-mode region whose finding was removed (inpainted with the empty prompt)."""
    return copy.deepcopy(_parsed()["removal_region"])


def attention_region_entry() -> dict:
    """The entry for the attention control's region (its map at least 0.5): coded as a saliency region."""
    return copy.deepcopy(_parsed()["attention_region"])


def numbered_name(base: str, existing) -> str:
    """``base``, or ``base N`` with the smallest N >= 2 that no existing name has (case-insensitive).

    How two segments with one meaning are told apart ("Pneumonia", "Pneumonia 2"): the Slicer module
    names its segments this way, and the engine labels DICOM-SEG segments the same way.
    """
    taken = {name.strip().lower() for name in existing}
    if base.lower() not in taken:
        return base
    number = 2
    while f"{base} {number}".lower() in taken:
        number += 1
    return f"{base} {number}"


def anatomy_label_for_name(name: str) -> int | None:
    """The label whose name or display name equals ``name`` (normalised), else None."""
    key = normalise_name(name)
    for entry in _parsed()["anatomy"]:
        if key in (normalise_name(entry["name"]), normalise_name(entry["display_name"])):
            return entry["label"]
    return None


def _same_code(a: dict | None, b: dict | None) -> bool:
    if not a or not b:
        return not a and not b
    return (a["scheme"], a["value"]) == (b["scheme"], b["value"])


def anatomy_label_for_codes(category: dict | None, type_: dict | None, type_modifier: dict | None = None) -> int | None:
    """The label whose type and type modifier codes equal the given ones (scheme and value), else None.

    The category is not compared: tools disagree on it (SCT 123037004 in Slicer, 91723000 in
    current DICOM) while type + laterality already identify the structure. Same rule as the Slicer side.
    """
    for entry in _parsed()["anatomy"]:
        if _same_code(entry["type"], type_) and _same_code(entry.get("type_modifier"), type_modifier):
            return entry["label"]
    return None


def finding_for_codes(type_: dict | None) -> str | None:
    """The finding name whose type code equals ``type_`` (scheme and value), else None."""
    for entry in _parsed()["findings"]:
        if _same_code(entry["type"], type_):
            return entry["name"]
    return None
