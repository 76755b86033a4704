"""vocabulary.json: the codes, colours and Slicer terminology strings the SEG writer and the Slicer module share."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydicom.sr.codedict import codes

from xreal_engine import vocabulary
from xreal_engine.errors import InputError
from xreal_engine.io.masks import _parse_terminology

REQUIRED_FINDINGS = [
    "cardiomegaly", "pneumonia", "pleural effusion", "pneumothorax", "consolidation",
    "ground-glass opacity", "nodule", "edema", "atelectasis", "mass", "no finding",
]


def test_anatomy_labels_and_slicer_codes():
    names = {label: vocabulary.anatomy_entry(label)["name"] for label in (1, 2, 3, 4)}
    assert names == {1: "left lung", 2: "right lung", 3: "heart", 4: "aorta"}
    left, right, heart, aorta = (vocabulary.anatomy_entry(label) for label in (1, 2, 3, 4))
    # DICOM codes as pydicom's code dictionary knows them (CID 7150/7151, laterality CID 244).
    assert left["type"]["value"] == codes.SCT.Lung.value and right["type"]["value"] == codes.SCT.Lung.value
    assert left["type_modifier"]["value"] == codes.SCT.Left.value and right["type_modifier"]["value"] == codes.SCT.Right.value
    assert heart["type"]["value"] == codes.SCT.Heart.value and aorta["type"]["value"] == codes.SCT.Aorta.value
    # Colours of Slicer's "DICOM master list" terminology for these structures.
    assert left["color"] == right["color"] == [197, 165, 145]
    assert heart["color"] == [206, 110, 84] and aorta["color"] == [224, 97, 76]
    # Recognised by type + laterality whatever category code the writing tool used (Slicer's or current DICOM's).
    lung, left_code = left["type"], left["type_modifier"]
    assert vocabulary.anatomy_label_for_codes({"scheme": "SCT", "value": "91723000", "meaning": "Anatomical Structure"}, lung, left_code) == 1
    assert vocabulary.anatomy_label_for_codes(left["category"], lung, None) is None
    with pytest.raises(InputError, match="Anatomy label 9 is not in the vocabulary"):
        vocabulary.anatomy_entry(9)


def test_required_findings_present_with_codes_region_and_colour():
    assert set(REQUIRED_FINDINGS) <= set(vocabulary.finding_names())
    for entry in vocabulary.load_vocabulary()["findings"]:
        for key in ("category", "type", "anatomic_region"):
            assert entry[key]["scheme"] in ("SCT", "DCM") and entry[key]["value"].isdigit() and entry[key]["meaning"]
        assert len(entry["color"]) == 3 and all(0 <= v <= 255 for v in entry["color"])
    assert vocabulary.finding_entry("pleural effusion")["type"]["value"] == codes.SCT.PleuralEffusion.value
    assert vocabulary.finding_entry("pneumothorax")["type"]["value"] == codes.SCT.Pneumothorax.value
    assert vocabulary.finding_entry("nodule")["type"]["value"] == codes.SCT.Nodule.value
    assert vocabulary.finding_entry("mass")["type"]["value"] == codes.SCT.Mass.value
    # Ground-glass opacity has no SNOMED CT code in DICOM's thoracic findings (CID 6102); DCM 112120 is the DICOM one.
    assert vocabulary.finding_entry("GGO")["type"] == {"scheme": "DCM", "value": "112120", "meaning": "Ground glass opacity"}


def test_finding_lookup_is_case_insensitive_and_unknown_lists_known():
    assert vocabulary.finding_entry("CARDIOMEGALY")["name"] == "cardiomegaly"
    assert vocabulary.finding_entry("Ground_Glass Opacity")["name"] == "ground-glass opacity"
    assert vocabulary.finding_entry("Pleural Effusion")["name"] == "pleural effusion"
    with pytest.raises(InputError) as refusal:
        vocabulary.finding_entry("fractured rib")
    message = str(refusal.value)
    assert message.startswith("Unknown finding 'fractured rib'") and all(name in message for name in REQUIRED_FINDINGS)


def test_slicer_terminology_strings_round_trip_to_codes():
    document = vocabulary.load_vocabulary()
    for entry in document["anatomy"]:
        fields = entry["slicer_terminology_entry"].split("~")
        assert len(fields) == 7 and fields[0] == document["slicer_terminology_context"] and fields[4] == document["slicer_anatomic_context"]
        category, type_, modifier = _parse_terminology("TerminologyEntry:" + entry["slicer_terminology_entry"])
        assert vocabulary.anatomy_label_for_codes(category, type_, modifier) == entry["label"]
    for entry in document["findings"]:
        _, type_, _ = _parse_terminology("TerminologyEntry:" + entry["slicer_terminology_entry"])
        assert vocabulary.finding_for_codes(type_) == entry["name"]
        region = entry["slicer_terminology_entry"].split("~")[5].split("^")
        assert region[1] == entry["anatomic_region"]["value"]


def test_vocabulary_module_needs_only_the_standard_library():
    code = "import sys, xreal_engine.vocabulary as v; v.load_vocabulary(); print(sorted(m for m in ('numpy', 'torch', 'pydicom', 'SimpleITK') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
