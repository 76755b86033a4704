"""Synthetic SC + SEG checked by independent readers: dciodvfy, dcmqi, dcmdump, highdicom, pydicom."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from xreal_engine import __version__
from xreal_engine.io.dicom import SegmentSpec, build_secondary_capture, build_segmentation, write_dicom_pair
from xreal_engine.errors import InputError

DCIODVFY = shutil.which("dciodvfy")
DCMDUMP = shutil.which("dcmdump")
SEGIMAGE2ITKIMAGE = shutil.which("segimage2itkimage") or str(Path(sys.executable).parent / "segimage2itkimage")

PROVENANCE = {
    "engine_version": __version__,
    "model_id": "xreal-test-tiny",
    "weights_hash": "sha256:0123abcd",
    "seed": 7,
    "steps": 20,
    "anatomy_steps": 10,
    "guidance": 7.0,
    "findings": ["nodule"],
}

# The geometry the slicer-guide asks for is not part of the SC IOD; dciodvfy flags it as a
# Standard Extended SOP Class. These, and the unknown Synthetic Data tag, are the only messages allowed.
SC_EXTENSION_ATTRIBUTES = {
    "Image Position (Patient)",
    "Image Orientation (Patient)",
    "Frame of Reference UID",
    "Position Reference Indicator",
}


def ellipse(shape, centre, radii) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1.0


def chest_segments(shape, n_segments: int) -> list[SegmentSpec]:
    """Up to 4 anatomy segments (lungs, heart, aorta) then pathologies; the nodule lies inside the left lung."""
    r, c = shape
    specs = [
        SegmentSpec(ellipse(shape, (0.5 * r, 0.3 * c), (0.3 * r, 0.14 * c)), label=2),  # right lung, image left
        SegmentSpec(ellipse(shape, (0.5 * r, 0.7 * c), (0.3 * r, 0.14 * c)), label=1),
        SegmentSpec(ellipse(shape, (0.62 * r, 0.55 * c), (0.15 * r, 0.15 * c)), label=3),
        SegmentSpec(ellipse(shape, (0.3 * r, 0.52 * c), (0.08 * r, 0.04 * c)), label=4),
        SegmentSpec(ellipse(shape, (0.45 * r, 0.7 * c), (0.05 * r, 0.05 * c)), finding="nodule"),
        SegmentSpec(ellipse(shape, (0.75 * r, 0.3 * c), (0.06 * r, 0.12 * c)), finding="Pleural Effusion"),
        SegmentSpec(ellipse(shape, (0.3 * r, 0.25 * c), (0.05 * r, 0.05 * c)), removal=True),  # an edit's removal region
        SegmentSpec(ellipse(shape, (0.4 * r, 0.65 * c), (0.12 * r, 0.1 * c)), attention=True),  # the attention control's region
    ]
    return specs[:n_segments]


def synthetic_image(shape) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return (0.5 + 0.5 * np.sin(rows / 9.0) * np.cos(cols / 13.0)).astype(np.float32)


# name: (shape, number of segments, pixel spacing (row, col))
CASES = {
    "square256_1seg_no_pathology": ((256, 256), 1, (1.5625, 1.5625)),
    "nonsquare_8seg_overlap": ((256, 192), 8, (400 / 256, 400 / 192)),  # spacing that needs DS rounding
    "wide_3seg_empty_skipped": ((200, 320), 3, (1.0, 1.0)),
    "square1024_5seg": ((1024, 1024), 5, (0.39, 0.39)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def written(request, tmp_path_factory):
    shape, n_segments, spacing = CASES[request.param]
    specs = chest_segments(shape, n_segments)
    if request.param.startswith("wide"):
        specs.append(SegmentSpec(np.zeros(shape, bool), finding="pneumonia"))  # empty: must be skipped
    out_dir = tmp_path_factory.mktemp(request.param)
    image = synthetic_image(shape)
    uids = write_dicom_pair(out_dir, image, spacing, specs, PROVENANCE)
    kept = [spec for spec in specs if spec.mask.any()]
    return {"dir": out_dir, "uids": uids, "image": image, "spacing": spacing, "segments": kept, "shape": shape}


def test_local_times_say_their_offset_from_utc(written):
    """Content/Study/Instance Creation times are local; TimezoneOffsetFromUTC makes them comparable with
    provenance.json's UTC "created" (one clock, two notations)."""
    import datetime

    for name in ("sc.dcm", "seg.dcm"):
        dataset = pydicom.dcmread(written["dir"] / name, stop_before_pixels=True)
        assert dataset.TimezoneOffsetFromUTC == datetime.datetime.now().astimezone().strftime("%z"), name
        assert len(dataset.TimezoneOffsetFromUTC) == 5 and dataset.TimezoneOffsetFromUTC[0] in "+-"


def dciodvfy_messages(path: Path) -> list[str]:
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith(("Error", "Warning"))]


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian dicom3tools) is not installed")
def test_dciodvfy_reports_only_the_unknown_synthetic_data_tag(written):
    synthetic_error = "Error - Attribute with an even group number is not a recognized standard attribute - (0x0008,0x001c)  ? "
    for name in ("sc.dcm", "seg.dcm"):
        messages = dciodvfy_messages(written["dir"] / name)
        errors = [m for m in messages if m.startswith("Error")]
        assert errors == [synthetic_error], (name, messages)
        for message in messages:
            if message.startswith("Warning - Attribute is not present in standard DICOM IOD"):
                attribute = message.split(")", 1)[1].split(" ", 2)[-1].strip()
                assert name == "sc.dcm" and attribute in SC_EXTENSION_ATTRIBUTES or "(0x0008,0x001c)" in message, message
            elif message.startswith("Warning"):
                assert "Standard Extended SOP Class" in message, message


@pytest.mark.skipif(not Path(SEGIMAGE2ITKIMAGE).exists(), reason="dcmqi is not installed")
def test_dcmqi_masks_equal_inputs_on_the_sc_grid(written, tmp_path):
    run = subprocess.run(
        [SEGIMAGE2ITKIMAGE, "--inputDICOM", str(written["dir"] / "seg.dcm"), "--outputDirectory", str(tmp_path), "--outputType", "nrrd"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    complaints = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith(("W:", "E:", "F:"))]
    assert complaints == []
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert len(meta["segmentAttributes"]) == len(written["segments"])
    row_spacing, col_spacing = written["spacing"]
    for number, spec in enumerate(written["segments"], start=1):
        image = sitk.ReadImage(str(tmp_path / f"{number}.nrrd"))
        # Same pixels, same geometry as the Slicer canvas: origin 0, identity LPS direction, (column, row) spacing.
        assert image.GetOrigin() == pytest.approx((0.0, 0.0, 0.0))
        assert image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
        assert image.GetSpacing()[:2] == pytest.approx((col_spacing, row_spacing))
        array = sitk.GetArrayFromImage(image)
        assert array.shape == (1, *written["shape"])
        np.testing.assert_array_equal(array[0] != 0, spec.mask)
        attributes = meta["segmentAttributes"][number - 1][0]
        entry = spec.vocabulary_entry()
        assert attributes["SegmentedPropertyTypeCodeSequence"]["CodeValue"] == entry["type"]["value"]
        assert attributes["SegmentAlgorithmType"] == "MANUAL"
        assert attributes["recommendedDisplayRGBValue"] == pytest.approx(entry["color"], abs=1)


def test_gdcm_reads_the_sc_on_the_same_grid_as_the_seg(written):
    """Slicer's scalar-volume loader reads an SC through GDCM: it must land at origin 0, identity, (column, row) spacing."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(written["dir"] / "sc.dcm"))
    image = reader.Execute()
    row_spacing, col_spacing = written["spacing"]
    assert image.GetOrigin() == pytest.approx((0.0, 0.0, 0.0))
    assert image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert image.GetSpacing()[:2] == pytest.approx((col_spacing, row_spacing))
    expected = np.round(written["image"].astype(np.float64) * 65535).astype(np.uint16)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).reshape(written["shape"]), expected)


@pytest.mark.skipif(DCMDUMP is None, reason="dcmdump (Debian dcmtk) is not installed")
def test_dcmdump_prints_without_complaint(written):
    for name in ("sc.dcm", "seg.dcm"):
        run = subprocess.run([DCMDUMP, str(written["dir"] / name)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0
        assert run.stderr.strip() == ""
        assert "SYNTHETIC" in run.stdout


def test_highdicom_reads_both_with_codes_colours_and_reference(written):
    sc = pydicom.dcmread(written["dir"] / "sc.dcm")
    seg = hd.seg.segread(written["dir"] / "seg.dcm")
    assert seg.number_of_segments == len(written["segments"])
    assert seg.get_source_image_uids() == [(sc.StudyInstanceUID, sc.SeriesInstanceUID, sc.SOPInstanceUID)]
    assert seg.FrameOfReferenceUID == sc.FrameOfReferenceUID
    pixels = seg.get_pixels_by_source_instance([sc.SOPInstanceUID])
    for number, spec in enumerate(written["segments"], start=1):
        np.testing.assert_array_equal(pixels[0, ..., number - 1] > 0, spec.mask)
        description = seg.get_segment_description(number)
        entry = spec.vocabulary_entry()
        assert description.segment_label == entry["display_name"]
        assert description.segmented_property_category.value == entry["category"]["value"]
        assert description.segmented_property_type.value == entry["type"]["value"]
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.MANUAL
        assert description.RecommendedDisplayCIELabValue == list(hd.color.CIELabColor.from_rgb(*entry["color"]).value)
        if entry.get("type_modifier"):
            modifier = description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
            assert modifier.CodeValue == entry["type_modifier"]["value"]
        if entry.get("anatomic_region"):
            assert description.AnatomicRegionSequence[0].CodeValue == entry["anatomic_region"]["value"]
    # Plane geometry that dcmqi needs, equal to the SC's.
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx(written["spacing"])
    for frame in seg.PerFrameFunctionalGroupsSequence:
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == [0, 0, 0]


def test_pydicom_round_trip_and_synthetic_markings(written):
    path = written["dir"] / "sc.dcm"
    sc = pydicom.dcmread(path)
    buffer = io.BytesIO()
    sc.save_as(buffer, enforce_file_format=True)
    again = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert again == sc
    expected = np.round(written["image"].astype(np.float64) * 65535).astype(np.uint16)
    np.testing.assert_array_equal(again.pixel_array, expected)

    assert sc.PhotometricInterpretation == "MONOCHROME2" and sc.BitsAllocated == 16 and sc.BitsStored == 16
    assert float(sc.WindowWidth) > 0 and sc.WindowCenter is not None
    assert sc.ConversionType == "SYN" and list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert sc.SyntheticData == "YES" and sc.BurnedInAnnotation == "NO"
    assert sc.SeriesDescription.startswith("SYNTHETIC")
    assert sc.Modality == "OT"
    assert sc.Manufacturer and sc.ManufacturerModelName == "xreal-engine" and sc.SoftwareVersions == __version__
    assert sc.PatientName == "Synthetic^XReal" and sc.PatientID.startswith("XREAL-")
    # Geometry from slicer-guide section 6, with Patient Orientation consistent with identity orientation.
    assert [float(v) for v in sc.ImagePositionPatient] == [0, 0, 0]
    assert [float(v) for v in sc.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert list(sc.PatientOrientation) == ["L", "P"]
    assert [float(v) for v in sc.PixelSpacing] == pytest.approx(written["spacing"])
    assert [float(v) for v in sc.NominalScannedPixelSpacing] == pytest.approx(written["spacing"])
    assert sc.FrameOfReferenceUID == written["uids"]["frame_of_reference_uid"]
    # Provenance: the full dict, machine-readable, in Image Comments.
    assert json.loads(sc.ImageComments.split(" ", 1)[1]) == PROVENANCE
    assert "seed=7" in sc.DerivationDescription

    seg = pydicom.dcmread(written["dir"] / "seg.dcm")
    assert seg.SyntheticData == "YES" and seg.SeriesDescription.startswith("SYNTHETIC")
    assert seg.ImageComments == sc.ImageComments
    assert seg.StudyInstanceUID == sc.StudyInstanceUID and seg.PatientID == sc.PatientID
    assert written["uids"] == {
        "study_instance_uid": sc.StudyInstanceUID,
        "sc_series_instance_uid": sc.SeriesInstanceUID,
        "sc_sop_instance_uid": sc.SOPInstanceUID,
        "seg_series_instance_uid": seg.SeriesInstanceUID,
        "seg_sop_instance_uid": seg.SOPInstanceUID,
        "frame_of_reference_uid": sc.FrameOfReferenceUID,
    }
    assert sorted(p.name for p in written["dir"].iterdir()) == ["sc.dcm", "seg.dcm"]


# ----------------------------------------------------------------------------- edit mode and study reuse


def real_source_dataset() -> pydicom.Dataset:
    """A DX header as a hospital would send it, with attributes that must NOT leak into the result."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    ds.SOPInstanceUID = hd.UID()
    ds.SeriesInstanceUID = hd.UID()
    ds.StudyInstanceUID = hd.UID()
    ds.SpecificCharacterSet = "ISO_IR 100"  # Latin-1 source: the name must survive into the UTF-8 result
    ds.PatientName = "Müller^Jürgen"
    ds.PatientID = "MRN-12345"
    ds.IssuerOfPatientID = "HOSPITAL"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.StudyID = "S1"
    ds.AccessionNumber = "ACC42"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.StudyDescription = "CHEST PA"
    ds.InstitutionName = "General Hospital"
    ds.StationName = "XR-ROOM-3"
    ds.PatientAge = "054Y"
    ds.OperatorsName = "Tech^One"
    ds.Modality = "DX"
    ds.add_new(0x00091010, "LO", "private vendor data")
    return ds


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian dicom3tools) is not installed")
def test_edit_mode_keeps_patient_and_study_and_copies_nothing_else(tmp_path):
    source = real_source_dataset()
    shape = (256, 256)
    uids = write_dicom_pair(tmp_path, synthetic_image(shape), (0.5, 0.5), chest_segments(shape, 5), PROVENANCE, source=source)
    sc = pydicom.dcmread(tmp_path / "sc.dcm")
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    for keyword in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                    "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription"):
        assert sc[keyword].value == source[keyword].value, keyword
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber"):
        assert seg[keyword].value == source[keyword].value, keyword
    assert uids["study_instance_uid"] == source.StudyInstanceUID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID and sc.SOPInstanceUID != source.SOPInstanceUID
    for keyword in ("InstitutionName", "StationName", "PatientAge", "OperatorsName"):
        assert keyword not in sc and keyword not in seg, keyword
    assert not any(element.tag.is_private for element in sc.iterall())
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    assert sc.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert sc.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.Modality == "OT" and sc.SyntheticData == "YES"
    errors = [m for m in dciodvfy_messages(tmp_path / "sc.dcm") if m.startswith("Error")]
    assert errors == ["Error - Attribute with an even group number is not a recognized standard attribute - (0x0008,0x001c)  ? "]


def test_new_synthetic_patient_by_default_and_study_reuse():
    shape = (64, 64)
    first = build_secondary_capture(synthetic_image(shape), (1.0, 1.0), PROVENANCE)
    second = build_secondary_capture(synthetic_image(shape), (1.0, 1.0), PROVENANCE)
    assert first.StudyInstanceUID != second.StudyInstanceUID and first.PatientID != second.PatientID
    same_study = build_secondary_capture(synthetic_image(shape), (1.0, 1.0), PROVENANCE, study=first)
    assert same_study.StudyInstanceUID == first.StudyInstanceUID and same_study.PatientID == first.PatientID
    assert same_study.SeriesInstanceUID != first.SeriesInstanceUID and "SourceImageSequence" not in same_study


# ----------------------------------------------------------------------------- refusals


def test_mask_of_wrong_size_is_refused_and_nothing_written(tmp_path):
    out_dir = tmp_path / "out"
    specs = chest_segments((256, 256), 2) + [SegmentSpec(np.ones((128, 128), bool), finding="nodule")]
    with pytest.raises(InputError, match=r"Segment mask 3 has shape \(128, 128\) but the image is 256x256"):
        write_dicom_pair(out_dir, synthetic_image((256, 256)), (1.0, 1.0), specs, PROVENANCE)
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_unknown_finding_is_refused_and_nothing_written(tmp_path):
    specs = chest_segments((128, 128), 2) + [SegmentSpec(ellipse((128, 128), (60, 60), (5, 5)), finding="broken heart")]
    with pytest.raises(InputError, match="Unknown finding 'broken heart'; known findings are: .*cardiomegaly"):
        write_dicom_pair(tmp_path, synthetic_image((128, 128)), (1.0, 1.0), specs, PROVENANCE)
    assert list(tmp_path.iterdir()) == []


def test_segment_needs_exactly_one_meaning():
    sc = build_secondary_capture(synthetic_image((64, 64)), (1.0, 1.0), PROVENANCE)
    for ambiguous in (SegmentSpec(np.ones((64, 64), bool), label=1, finding="nodule"),
                      SegmentSpec(np.ones((64, 64), bool), finding="nodule", removal=True),
                      SegmentSpec(np.ones((64, 64), bool), removal=True, attention=True),
                      SegmentSpec(np.ones((64, 64), bool))):
        with pytest.raises(InputError, match="exactly one of an anatomy label, a finding, the removal flag or the "
                                             "attention flag"):
            build_segmentation(sc, [ambiguous], PROVENANCE)
    with pytest.raises(InputError, match="no non-empty segment"):
        build_segmentation(sc, [SegmentSpec(np.zeros((64, 64), bool), label=1)], PROVENANCE)


def test_only_sc_when_every_segment_is_empty(tmp_path):
    uids = write_dicom_pair(tmp_path, synthetic_image((64, 64)), (1.0, 1.0), [SegmentSpec(np.zeros((64, 64), bool), label=1)], PROVENANCE)
    assert [p.name for p in tmp_path.iterdir()] == ["sc.dcm"]
    assert uids["seg_sop_instance_uid"] is None and uids["sc_sop_instance_uid"]


@pytest.mark.parametrize(
    "image, spacing, message",
    [
        (np.zeros((16, 16), np.float32), (1, 1), "outside 32..6000"),
        (np.zeros((64, 64, 3), np.float32), (1, 1), "must be 2D"),
        (np.full((64, 64), np.nan, np.float32), (1, 1), "NaN"),
        (np.zeros((64, 64), np.float32), (0, 1), "pixel_spacing_mm"),
    ],
)
def test_bad_generated_image_is_refused(tmp_path, image, spacing, message):
    with pytest.raises(InputError, match=message):
        write_dicom_pair(tmp_path, image, spacing, chest_segments((64, 64), 1), PROVENANCE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("source_says, expected", [("YES", "YES"), ("NO", "NO"), (None, "YES")])
def test_an_edit_keeps_the_sources_burned_in_annotation(source_says, expected):
    """An edit keeps the source's pixels outside its region, and with them any burned-in text."""
    source = real_source_dataset()
    if source_says is not None:
        source.BurnedInAnnotation = source_says
    shape = (64, 64)
    edited = build_secondary_capture(synthetic_image(shape), (1.0, 1.0), {**PROVENANCE, "mode": "edit"}, source=source)
    assert edited.BurnedInAnnotation == expected
    assert edited.DerivationDescription.startswith("Edited real image: ")
    generated = build_secondary_capture(synthetic_image(shape), (1.0, 1.0), {**PROVENANCE, "mode": "generate"})
    assert generated.BurnedInAnnotation == "NO"


def test_an_edit_of_a_synthetic_image_is_not_called_real():
    shape = (64, 64)
    synthetic = build_secondary_capture(synthetic_image(shape), (1.0, 1.0), PROVENANCE)
    edited = build_secondary_capture(synthetic_image(shape), (1.0, 1.0), {**PROVENANCE, "mode": "edit"}, source=synthetic)
    assert edited.DerivationDescription.startswith("Edited synthetic image: ")
    assert edited.BurnedInAnnotation == "NO"  # the engine's own image said NO


def test_provenance_too_long_for_image_comments_stays_valid_json(tmp_path):
    """Image Comments (LT) holds 10240 characters; a longer provenance is shortened, never cut mid-JSON."""
    from xreal_engine.io.dicom import IMAGE_COMMENTS_MAX, PROVENANCE_PREFIX, provenance_comment

    exactly = {"seed": 7, "note": ""}
    exactly["note"] = "x" * (IMAGE_COMMENTS_MAX - len(provenance_comment(exactly)))
    assert len(provenance_comment(exactly)) == IMAGE_COMMENTS_MAX
    assert json.loads(provenance_comment(exactly)[len(PROVENANCE_PREFIX):]) == exactly  # fits: kept whole
    long = {**PROVENANCE, "warnings": [f"segment {i}: " + "w" * 200 for i in range(90)], "files": ["f" * 6000]}
    comment = provenance_comment(long)
    parsed = json.loads(comment[len(PROVENANCE_PREFIX):])
    assert len(comment) <= IMAGE_COMMENTS_MAX and parsed["shortened"] == ["warnings"]
    assert {key: parsed[key] for key in PROVENANCE} == PROVENANCE and parsed["files"] == long["files"]
    uids = write_dicom_pair(tmp_path, synthetic_image((64, 64)), (1.0, 1.0), chest_segments((64, 64), 3), long)
    for name in ("sc.dcm", "seg.dcm"):
        assert pydicom.dcmread(tmp_path / name).ImageComments == comment, name
    assert uids["sc_sop_instance_uid"]


def test_repeated_findings_get_numbered_segment_labels():
    shape = (64, 64)
    sc = build_secondary_capture(synthetic_image(shape), (1.0, 1.0), PROVENANCE)
    region = ellipse(shape, (32, 32), (8, 8))
    specs = chest_segments(shape, 3) + [SegmentSpec(region, finding="pneumonia")] * 3
    seg = build_segmentation(sc, specs, PROVENANCE)
    assert [item.SegmentLabel for item in seg.SegmentSequence] == [
        "Right lung", "Left lung", "Heart", "Pneumonia", "Pneumonia 2", "Pneumonia 3"]
