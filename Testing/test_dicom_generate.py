"""`xreal-engine generate` writes a DICOM pair that independent readers accept, in both modes (tiny random model)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from xreal_engine.cli import main
from xreal_engine.io.dicom import PROVENANCE_PREFIX

SEGIMAGE2ITKIMAGE = shutil.which("segimage2itkimage") or str(Path(sys.executable).parent / "segimage2itkimage")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from xreal_engine.model.random_model import create_random_model

    return create_random_model(tmp_path_factory.mktemp("model") / "tiny", preset="tiny")


@pytest.fixture(scope="module")
def inputs(shared_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    labels = np.asarray(Image.open(shared_dir / "data" / "cxr" / "wingspan" / "labels" / "ws_0001.png"))
    anatomy = folder / "anatomy.png"
    Image.fromarray(labels).save(anatomy)
    rows, cols = np.nonzero(labels == 1)  # a nodule inside the left lung
    region = np.zeros(labels.shape, np.uint8)
    r, c = int(rows.mean()), int(cols.mean())
    region[r - 8 : r + 8, c - 8 : c + 8] = 255
    Image.fromarray(region).save(folder / "nodule.png")

    image = np.asarray(Image.open(shared_dir / "data" / "cxr" / "wingspan" / "images" / "ws_0001.png").convert("L"))
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.InstitutionName = "Doe^John", "MRN-1", "DX", "Hospital"
    ds.set_pixel_data(image.astype(np.uint16) * 16, "MONOCHROME2", 12)
    ds.ImagerPixelSpacing = [1.4, 1.4]
    ds.save_as(folder / "dx.dcm", enforce_file_format=True)
    return {"anatomy": anatomy, "nodule": folder / "nodule.png", "dx": folder / "dx.dcm", "labels": labels, "region": region > 0}


def dcmqi_masks(seg_path: Path, out_dir: Path) -> list[np.ndarray]:
    import SimpleITK as sitk

    out_dir.mkdir()
    run = subprocess.run([SEGIMAGE2ITKIMAGE, "--inputDICOM", str(seg_path), "--outputDirectory", str(out_dir)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    count = len(json.loads((out_dir / "meta.json").read_text())["segmentAttributes"])
    return [sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / f"{n}.nrrd")))[0] != 0 for n in range(1, count + 1)]


@pytest.mark.skipif(not Path(SEGIMAGE2ITKIMAGE).exists(), reason="dcmqi is not installed")
def test_generate_writes_a_pair_on_the_input_grid(tiny_model, inputs, tmp_path):
    out = tmp_path / "result"
    code = main(["generate", "--model", str(tiny_model), "--anatomy", str(inputs["anatomy"]), "--pathology-mask", str(inputs["nodule"]),
                 "--finding", "nodule", "--seed", "3", "--out", str(out)])
    assert code == 0
    sc = pydicom.dcmread(out / "sc.dcm")
    provenance = json.loads((out / "provenance.json").read_text())
    assert (sc.Rows, sc.Columns) == inputs["labels"].shape
    assert sc.SOPInstanceUID == provenance["dicom"]["sc_sop_instance_uid"]
    recorded = json.loads(sc.ImageComments[len(PROVENANCE_PREFIX):])
    assert recorded["seed"] == 3 and recorded["model_id"] == provenance["model_id"] and recorded["findings"] == ["nodule"]
    masks = dcmqi_masks(out / "seg.dcm", tmp_path / "dcmqi")
    expected = [inputs["labels"] == label for label in (1, 2, 3)] + [inputs["region"]]
    assert len(masks) == len(expected)
    for got, want in zip(masks, expected):
        np.testing.assert_array_equal(got, want)


def test_generate_edit_mode_joins_the_source_study(tiny_model, inputs, tmp_path):
    out = tmp_path / "edited"
    code = main(["generate", "--model", str(tiny_model), "--image", str(inputs["dx"]), "--pathology-mask", str(inputs["nodule"]),
                 "--finding", "nodule", "--seed", "0", "--out", str(out)])
    assert code == 0
    source = pydicom.dcmread(inputs["dx"])
    sc = pydicom.dcmread(out / "sc.dcm")
    seg = pydicom.dcmread(out / "seg.dcm")
    assert sc.StudyInstanceUID == seg.StudyInstanceUID == source.StudyInstanceUID
    assert sc.PatientID == source.PatientID and sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "InstitutionName" not in sc and sc.SyntheticData == "YES"
    assert [float(v) for v in sc.PixelSpacing] == [1.4, 1.4]  # the source's field of view is carried over


def test_an_edit_of_a_source_without_pixel_spacing_says_the_spacing_is_assumed(tiny_model, inputs, tmp_path):
    source = pydicom.dcmread(inputs["dx"])
    del source.ImagerPixelSpacing
    source.SOPInstanceUID = generate_uid()
    source.save_as(tmp_path / "nospacing.dcm", enforce_file_format=True)
    out = tmp_path / "edited"
    assert main(["generate", "--model", str(tiny_model), "--image", str(tmp_path / "nospacing.dcm"), "--pathology-mask",
                 str(inputs["nodule"]), "--finding", "nodule", "--seed", "0", "--out", str(out)]) == 0
    warnings = json.loads((out / "provenance.json").read_text())["warnings"]
    assert any(w.startswith("The X-ray to edit records no pixel spacing; the results assume") for w in warnings), warnings
    with_spacing = tmp_path / "with"
    assert main(["generate", "--model", str(tiny_model), "--image", str(inputs["dx"]), "--pathology-mask",
                 str(inputs["nodule"]), "--finding", "nodule", "--seed", "0", "--out", str(with_spacing)]) == 0
    assert not any("pixel spacing" in w for w in json.loads((with_spacing / "provenance.json").read_text())["warnings"])


def test_edit_that_only_removes_a_finding_still_records_its_region_in_the_seg(tiny_model, inputs, tmp_path):
    """The removal region is one of the masks that produced the image, so the SEG carries it (coded as a region of interest)."""
    import highdicom as hd

    out = tmp_path / "removed"
    code = main(["generate", "--model", str(tiny_model), "--image", str(inputs["dx"]), "--pathology-mask", str(inputs["nodule"]),
                 "--finding", "", "--seed", "0", "--out", str(out)])
    assert code == 0
    sc = pydicom.dcmread(out / "sc.dcm")
    seg = hd.seg.segread(out / "seg.dcm")
    assert seg.number_of_segments == 1
    description = seg.get_segment_description(1)
    assert description.segment_label == "Removed finding (inpainted)"
    assert (description.segmented_property_type.scheme_designator, description.segmented_property_type.value) == ("NCIt", "C85402")
    assert seg.get_source_image_uids() == [(sc.StudyInstanceUID, sc.SeriesInstanceUID, sc.SOPInstanceUID)]
    np.testing.assert_array_equal(seg.get_pixels_by_source_instance([sc.SOPInstanceUID])[0, ..., 0] > 0, inputs["region"])
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["dicom"]["seg_sop_instance_uid"] == seg.SOPInstanceUID
    entries = json.loads((out / "segments.json").read_text())["segments"]
    assert [(e["kind"], e["finding"], e["name"]) for e in entries] == [("removed", None, "removed finding")]
