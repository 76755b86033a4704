"""load_masks: every input format, mapping of segments to labels, each validation refusal; resample_to_grid."""

from __future__ import annotations

import re

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from xreal_engine.io.dicom import SegmentSpec, write_dicom_pair
from xreal_engine.errors import InputError
from xreal_engine.io.masks import load_masks, read_pathology_mask, resample_to_grid
from xreal_engine.vocabulary import anatomy_entry, finding_entry

KNOWN = {1, 2, 3, 4}
SHAPE = (128, 96)  # non-square on purpose: catches row/column swaps


def ellipse(shape, centre, radii) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1.0


def anatomy_map(shape=SHAPE, with_aorta=False) -> np.ndarray:
    r, c = shape
    labels = np.zeros(shape, np.uint8)
    labels[ellipse(shape, (0.5 * r, 0.3 * c), (0.3 * r, 0.14 * c))] = 2
    labels[ellipse(shape, (0.5 * r, 0.7 * c), (0.3 * r, 0.14 * c))] = 1
    labels[ellipse(shape, (0.62 * r, 0.52 * c), (0.14 * r, 0.12 * c))] = 3
    if with_aorta:
        labels[ellipse(shape, (0.3 * r, 0.52 * c), (0.06 * r, 0.03 * c))] = 4
    return labels


def nodule(shape=SHAPE) -> np.ndarray:
    return ellipse(shape, (0.45 * shape[0], 0.7 * shape[1]), (5, 5))


def save_png(path, array):
    Image.fromarray(array).save(path)
    return path


def save_itk(path, array, spacing=(1.0, 1.0), slice_axis=False):
    """Write with SimpleITK; spacing is (row, column)."""
    image = sitk.GetImageFromArray(array[np.newaxis] if slice_axis else array)
    image.SetSpacing((spacing[1], spacing[0], 1.0) if slice_axis else (spacing[1], spacing[0]))
    sitk.WriteImage(image, str(path))
    return path


def terminology(entry: dict) -> str:
    return "TerminologyEntry:" + entry["slicer_terminology_entry"] + "|"


def save_seg_nrrd(path, layers: np.ndarray, segments: list[dict], spacing=(0.5, 0.5)):
    """A Slicer-style .seg.nrrd: layers (rows, cols, n_layers) of label values, Segment<i>_* header fields."""
    image = sitk.GetImageFromArray(layers[np.newaxis], isVector=True)
    image.SetSpacing((spacing[1], spacing[0], 1.0))
    for index, segment in enumerate(segments):
        image.SetMetaData(f"Segment{index}_ID", f"Segment_{index + 1}")
        image.SetMetaData(f"Segment{index}_Name", segment["name"])
        image.SetMetaData(f"Segment{index}_LabelValue", str(segment["value"]))
        image.SetMetaData(f"Segment{index}_Layer", str(segment.get("layer", 0)))
        image.SetMetaData(f"Segment{index}_Tags", segment.get("tags", ""))
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    sitk.WriteImage(image, str(path))
    return path


# ----------------------------------------------------------------------------- formats


def test_png_label_map_and_binary_pathology(tmp_path):
    labels = anatomy_map()
    anatomy = save_png(tmp_path / "anatomy.png", labels)
    region = save_png(tmp_path / "nodule.png", nodule().astype(np.uint8) * 255)
    result = load_masks(anatomy, [(region, "nodule")], known_labels=KNOWN)
    np.testing.assert_array_equal(result.anatomy, labels)
    assert result.anatomy.dtype == np.uint8
    assert len(result.pathologies) == 1
    assert result.pathologies[0].finding == "nodule" and result.pathologies[0].name == "Nodule"
    np.testing.assert_array_equal(result.pathologies[0].mask, nodule())
    # PNG records no spacing: the default field of view spreads over the grid.
    assert result.pixel_spacing_mm == pytest.approx((400.0 / 128, 400.0 / 96))
    assert result.warnings == []


def test_palette_png_labels_are_its_indices(tmp_path):
    labels = anatomy_map()
    image = Image.fromarray(labels, mode="L").convert("P")
    image.putpalette([0, 0, 0, 197, 165, 145, 190, 160, 140, 206, 110, 84] + [0] * 756)
    image.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(load_masks(tmp_path / "palette.png", [], known_labels=KNOWN).anatomy, labels)


def test_16bit_png_and_label_warning(tmp_path):
    labels = anatomy_map(with_aorta=True).astype(np.uint16)
    anatomy = save_png(tmp_path / "anatomy16.png", labels)
    result = load_masks(anatomy, [], known_labels=KNOWN, label_warnings={4: "No aorta in training; ignored."}, default_field_of_view_mm=300)
    np.testing.assert_array_equal(result.anatomy, labels)
    assert result.warnings == ["No aorta in training; ignored."]
    assert result.pixel_spacing_mm == pytest.approx((300 / 128, 300 / 96))


@pytest.mark.parametrize("suffix, slice_axis", [(".nrrd", False), (".nii.gz", False), (".nii.gz", True), (".nrrd", True)])
def test_nrrd_and_nifti_with_spacing(tmp_path, suffix, slice_axis):
    labels = anatomy_map()
    anatomy = save_itk(tmp_path / f"anatomy{suffix}", labels, spacing=(0.7, 0.4), slice_axis=slice_axis)
    region = save_itk(tmp_path / f"region{suffix}", nodule().astype(np.uint8), spacing=(0.7, 0.4), slice_axis=slice_axis)
    result = load_masks(anatomy, [(region, "nodule")], known_labels=KNOWN)
    np.testing.assert_array_equal(result.anatomy, labels)
    np.testing.assert_array_equal(result.pathologies[0].mask, nodule())
    assert result.pixel_spacing_mm == pytest.approx((0.7, 0.4))


def test_seg_nrrd_terminology_first_then_name_with_overlapping_layers(tmp_path):
    labels = anatomy_map()
    layers = np.zeros((*SHAPE, 2), np.uint8)
    layers[..., 0][labels == 1] = 1
    layers[..., 0][labels == 2] = 2
    layers[..., 1][labels == 3] = 1
    layers[..., 1][nodule()] = 2  # overlaps the left lung in another layer
    segments = [
        # Named misleadingly: the terminology (left lung) must win over the name.
        {"name": "Segment_1", "value": 1, "tags": terminology(anatomy_entry(1))},
        {"name": "Right Lung", "value": 2},  # no terminology: the name decides
        {"name": "heart", "value": 1, "layer": 1},
        {"name": "Nodule", "value": 2, "layer": 1, "tags": terminology(finding_entry("nodule"))},
    ]
    anatomy = save_seg_nrrd(tmp_path / "anatomy.seg.nrrd", layers, segments)
    result = load_masks(anatomy, [(anatomy, "nodule")], known_labels=KNOWN)
    expected = labels.copy()
    np.testing.assert_array_equal(result.anatomy, expected)
    assert any("Nodule" in w and "ignored" in w for w in result.warnings)
    # As a pathology input a segmentation gives the union of its segments.
    union = (labels > 0) | nodule()
    np.testing.assert_array_equal(result.pathologies[0].mask, union)
    assert result.pixel_spacing_mm == pytest.approx((0.5, 0.5))

    single = save_seg_nrrd(tmp_path / "nodule.seg.nrrd", (nodule().astype(np.uint8))[..., np.newaxis], [{"name": "Nodule", "value": 1}])
    np.testing.assert_array_equal(read_pathology_mask(single), nodule())


def write_slicer_seg_nrrd(path, layers: np.ndarray, header_fields: list[str], spacing=0.5):
    """Byte-for-byte the layout Slicer's segmentation storage node writes: 4D, 'list' axis first, key:=value fields."""
    rows, cols, n_layers = layers.shape
    header = "\n".join(
        [
            "NRRD0004",
            "type: unsigned char",
            "dimension: 4",
            "space: left-posterior-superior",
            f"sizes: {n_layers} {cols} {rows} 1",
            f"space directions: none ({spacing},0,0) (0,{spacing},0) (0,0,1)",
            "kinds: list domain domain domain",
            "encoding: raw",
            "space origin: (0,0,0)",
            "Segmentation_MasterRepresentation:=Binary labelmap",
            "Segmentation_ReferenceImageExtentOffset:=0 0 0",
            *header_fields,
        ]
    )
    path.write_bytes((header + "\n\n").encode() + np.ascontiguousarray(layers, dtype=np.uint8).tobytes())
    return path


def test_seg_nrrd_in_slicer_layout(tmp_path):
    labels = anatomy_map()
    layers = np.zeros((*SHAPE, 2), np.uint8)
    layers[..., 0][labels == 1] = 1
    layers[..., 0][labels == 2] = 2
    layers[..., 0][labels == 3] = 3
    layers[..., 1][nodule()] = 1
    fields = []
    for index, (name, value, layer, entry) in enumerate(
        [("Left lung", 1, 0, anatomy_entry(1)), ("Right lung", 2, 0, anatomy_entry(2)), ("Heart", 3, 0, anatomy_entry(3)), ("Nodule", 1, 1, finding_entry("nodule"))]
    ):
        fields += [f"Segment{index}_ID:=Segment_{index + 1}", f"Segment{index}_Name:={name}", f"Segment{index}_LabelValue:={value}",
                   f"Segment{index}_Layer:={layer}", f"Segment{index}_Tags:={terminology(entry)}"]
    path = write_slicer_seg_nrrd(tmp_path / "drawing.seg.nrrd", layers, fields)
    result = load_masks(path, [], known_labels=KNOWN)
    np.testing.assert_array_equal(result.anatomy, labels)
    assert result.pixel_spacing_mm == pytest.approx((0.5, 0.5))
    cropped = write_slicer_seg_nrrd(tmp_path / "cropped.seg.nrrd", layers, fields)
    cropped.write_bytes(cropped.read_bytes().replace(b"ExtentOffset:=0 0 0", b"ExtentOffset:=5 7 0"))
    with pytest.raises(InputError, match="cropped.seg.nrrd was saved cropped to its segments"):
        load_masks(cropped, [], known_labels=KNOWN)


def test_seg_nrrd_unknown_segment_is_refused(tmp_path):
    layers = (anatomy_map() > 0).astype(np.uint8)[..., np.newaxis]
    path = save_seg_nrrd(tmp_path / "odd.seg.nrrd", layers, [{"name": "spleen", "value": 1}])
    with pytest.raises(InputError, match="Segment 'spleen' in odd.seg.nrrd is not an anatomy structure the engine knows"):
        load_masks(path, [], known_labels=KNOWN)


def test_dicom_seg_as_anatomy_and_as_pathology(tmp_path):
    labels = anatomy_map(with_aorta=True)
    specs = [SegmentSpec(labels == value, label=value) for value in (1, 2, 3, 4)] + [SegmentSpec(nodule(), finding="nodule")]
    image = np.zeros(SHAPE, np.float32)
    write_dicom_pair(tmp_path / "anatomy", image, (0.6, 0.45), specs, {"model_id": "m"})
    write_dicom_pair(tmp_path / "region", image, (0.6, 0.45), [SegmentSpec(nodule(), finding="nodule")], {"model_id": "m"})
    result = load_masks(tmp_path / "anatomy" / "seg.dcm", [(tmp_path / "region" / "seg.dcm", "nodule")], known_labels=KNOWN)
    np.testing.assert_array_equal(result.anatomy, labels)
    np.testing.assert_array_equal(result.pathologies[0].mask, nodule())
    assert result.pixel_spacing_mm == pytest.approx((0.6, 0.45))
    assert any("Nodule" in w for w in result.warnings)
    with pytest.raises(InputError, match="sc.dcm is a DICOM image, not a DICOM Segmentation"):
        load_masks(tmp_path / "anatomy" / "sc.dcm", [], known_labels=KNOWN)


# ----------------------------------------------------------------------------- refusals


def test_unreadable_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG but not really" * 10)
    with pytest.raises(InputError, match=r"^garbage.png is not a PNG, NRRD, NIfTI or DICOM file"):
        load_masks(garbage, [], known_labels=KNOWN)
    text = tmp_path / "notes.txt"
    text.write_text("left lung here")
    with pytest.raises(InputError, match=r"^notes.txt is not a PNG, NRRD, NIfTI or DICOM file"):
        load_masks(text, [], known_labels=KNOWN)


@pytest.mark.parametrize("suffix", [".mhd", ".mha", ".tif", ".jpg"])
def test_formats_simpleitk_reads_but_the_engine_does_not_are_refused_by_the_one_sniff(tmp_path, suffix):
    """A MetaImage header may name any file as its pixels (like a detached NRRD); TIFF and JPEG are not
    label maps. Only PNG, NRRD, NIfTI and DICOM are read, by the CLI as by the service."""
    from xreal_engine.io.images import read_source_image

    path = tmp_path / f"anatomy{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(anatomy_map()), str(path))
    for read in (lambda p: load_masks(p, [], known_labels=KNOWN), read_source_image):
        with pytest.raises(InputError, match=rf"anatomy{re.escape(suffix)} is not a PNG, NRRD, NIfTI or DICOM file"):
            read(path)
    with pytest.raises(InputError, match="missing.png does not exist"):
        load_masks(tmp_path / "missing.png", [], known_labels=KNOWN)


def test_volume_rgb_and_float_are_refused(tmp_path):
    volume = np.stack([anatomy_map()] * 3)
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(tmp_path / "volume.nrrd"))
    with pytest.raises(InputError, match="volume.nrrd is a 3D volume with 3 slices"):
        load_masks(tmp_path / "volume.nrrd", [], known_labels=KNOWN)
    rgb = np.stack([anatomy_map()] * 3, axis=-1)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "rgb.png")
    with pytest.raises(InputError, match=r"rgb.png is a colour \(RGB\) image"):
        load_masks(tmp_path / "rgb.png", [], known_labels=KNOWN)
    save_itk(tmp_path / "soft.nrrd", anatomy_map().astype(np.float32) * 0.5)
    with pytest.raises(InputError, match="soft.nrrd holds non-integer values"):
        load_masks(tmp_path / "soft.nrrd", [], known_labels=KNOWN)


def test_empty_anatomy_and_unknown_labels_are_refused(tmp_path):
    empty = save_png(tmp_path / "empty.png", np.zeros(SHAPE, np.uint8))
    with pytest.raises(InputError, match="empty.png is empty"):
        load_masks(empty, [], known_labels=KNOWN)
    labels = anatomy_map()
    labels[:5, :5] = 7
    odd = save_png(tmp_path / "odd.png", labels)
    with pytest.raises(InputError, match=r"odd.png contains label values \[7\] that the model does not know"):
        load_masks(odd, [], known_labels=KNOWN)
    aorta = save_png(tmp_path / "aorta.png", anatomy_map(with_aorta=True))
    with pytest.raises(InputError, match=r"label values \[4\]"):
        load_masks(aorta, [], known_labels={1, 2, 3})


@pytest.mark.parametrize(
    "shape, message",
    [((20, 20), "20x20 pixels, which cannot be a chest image"), ((64, 200), "aspect ratio beyond 1:2"), ((31, 40), "each side must be 32 to 6000"),
     ((6001, 3100), "at most 6000 pixels per side")],
)
def test_impossible_sizes_are_refused(tmp_path, shape, message):
    labels = np.zeros(shape, np.uint8)
    labels[shape[0] // 4 : shape[0] // 2, shape[1] // 4 : shape[1] // 2] = 1
    path = save_itk(tmp_path / "size.nrrd", labels)
    with pytest.raises(InputError, match=message):
        load_masks(path, [], known_labels=KNOWN)


def test_pathology_refusals(tmp_path):
    anatomy = save_png(tmp_path / "anatomy.png", anatomy_map())
    empty = save_png(tmp_path / "empty_region.png", np.zeros(SHAPE, np.uint8))
    with pytest.raises(InputError, match="empty_region.png is empty"):
        load_masks(anatomy, [(empty, "nodule")], known_labels=KNOWN)
    outside = np.zeros(SHAPE, np.uint8)
    outside[:4, :4] = 255  # a corner, far from every organ
    corner = save_png(tmp_path / "corner.png", outside)
    with pytest.raises(InputError, match="corner.png lies entirely outside the body"):
        load_masks(anatomy, [(corner, "nodule")], known_labels=KNOWN)
    small = save_png(tmp_path / "small.png", np.full((64, 64), 255, np.uint8))
    with pytest.raises(InputError, match="small.png is 64x64 pixels but the anatomy anatomy.png is 96x128"):
        load_masks(anatomy, [(small, "nodule")], known_labels=KNOWN)
    # A region just outside an organ (within the small margin) is accepted: masks are drawn by hand.
    near = np.zeros(SHAPE, np.uint8)
    lung_cols = np.nonzero(anatomy_map()[64] == 1)[0]
    near[62:66, lung_cols.max() + 2 : lung_cols.max() + 4] = 255
    accepted = load_masks(anatomy, [(save_png(tmp_path / "near.png", near), "")], known_labels=KNOWN)
    assert accepted.pathologies[0].name == "removed finding"


# ----------------------------------------------------------------------------- resampling


def test_resample_labels_and_masks_nearest_and_exact_on_blocks():
    blocks = np.kron(np.arange(1, 5, dtype=np.uint8).reshape(2, 2), np.ones((64, 48), np.uint8))  # 128x96
    down = resample_to_grid(blocks, (32, 24), "labels")
    assert down.dtype == np.uint8 and down.shape == (32, 24)
    np.testing.assert_array_equal(down, np.kron(np.arange(1, 5, dtype=np.uint8).reshape(2, 2), np.ones((16, 12), np.uint8)))
    up = resample_to_grid(down, (128, 96), "labels")
    np.testing.assert_array_equal(up, blocks)
    mask = resample_to_grid(nodule(), (256, 192), "mask")
    assert mask.dtype == bool and set(np.unique(mask)) == {False, True}
    assert abs(int(mask.sum()) - 4 * int(nodule().sum())) < 0.15 * 4 * nodule().sum()


def test_resample_image_linear_keeps_mean_and_range():
    rows, cols = np.mgrid[:300, :200]
    image = (0.5 + 0.4 * np.sin(rows / 20.0) * np.cos(cols / 15.0)).astype(np.float32)
    small = resample_to_grid(image, (64, 64), "image")
    assert small.dtype == np.float32 and small.shape == (64, 64)
    assert abs(float(small.mean()) - float(image.mean())) < 0.01
    assert small.min() >= image.min() - 1e-4 and small.max() <= image.max() + 1e-4
    back = resample_to_grid(small, (300, 200), "image")
    assert np.abs(back - image).mean() < 0.03
    with pytest.raises(ValueError):
        resample_to_grid(image, (64, 64), "cubic")


# ----------------------------------------------------------------------------- real chest X-ray masks


def test_real_label_maps_and_pathology_masks(shared_dir, tmp_path):
    """Real annotations (../shared/data/cxr): wingspan maps load as they are; real GGO regions lie inside the body;
    covid_seg_nc's cardiomediastinum (label 5) is not a label the model knows."""
    cxr = shared_dir / "data" / "cxr"
    for label_png in sorted((cxr / "wingspan" / "labels").glob("*.png"))[:5]:
        result = load_masks(label_png, [], known_labels=KNOWN)
        assert result.anatomy.shape == (256, 256)
        assert {1, 2, 3} <= set(np.unique(result.anatomy).tolist())
    covid_ids = sorted(p.stem for p in (cxr / "covid_seg_nc" / "pathology_bits").glob("*.png"))
    checked = 0
    for image_id in covid_ids:
        bits = np.asarray(Image.open(cxr / "covid_seg_nc" / "pathology_bits" / f"{image_id}.png"))
        ggo = (bits & 1) > 0
        if not ggo.any():
            continue
        labels = np.asarray(Image.open(cxr / "covid_seg_nc" / "labels" / f"{image_id}.png"))
        with pytest.raises(InputError, match=r"label values \[5\]"):
            load_masks(cxr / "covid_seg_nc" / "labels" / f"{image_id}.png", [], known_labels=KNOWN)
        lungs_only = save_png(tmp_path / f"{image_id}_lungs.png", np.where(labels == 5, 0, labels).astype(np.uint8))
        region = save_png(tmp_path / f"{image_id}_ggo.png", ggo.astype(np.uint8) * 255)
        result = load_masks(lungs_only, [(region, "ground-glass opacity")], known_labels=KNOWN)
        np.testing.assert_array_equal(result.pathologies[0].mask, ggo)
        assert result.pathologies[0].name == "Ground-glass opacity"
        checked += 1
        if checked == 3:
            break
    assert checked == 3


def _seg_from(sources, pixel_array, segmentation_type, path):
    import highdicom as hd

    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Nodule",
        segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure"),
        segmented_property_type=hd.sr.CodedConcept("27925004", "SCT", "Nodule"),
        algorithm_type="MANUAL",
    )
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixel_array, segmentation_type=segmentation_type, segment_descriptions=[description],
        series_instance_uid=hd.UID(), series_number=1, sop_instance_uid=hd.UID(), instance_number=1, manufacturer="other tool",
        manufacturer_model_name="x", software_versions="1", device_serial_number="1",
    )
    seg.save_as(path)
    return path


def _geometry_sc(z: float, frame_of_reference: str):
    from xreal_engine.io.dicom import build_secondary_capture

    sc = build_secondary_capture(np.zeros(SHAPE, np.float32), (1.0, 1.0), {})
    sc.ImagePositionPatient = [0.0, 0.0, z]
    sc.FrameOfReferenceUID = frame_of_reference
    sc.SliceThickness = 1.0
    return sc


def test_dicom_seg_fractional_and_3d(tmp_path):
    import highdicom as hd

    frame_of_reference = hd.UID()
    core, ring = nodule(), ellipse(SHAPE, (0.45 * SHAPE[0], 0.7 * SHAPE[1]), (9, 9))
    probability = np.where(core, 0.9, np.where(ring, 0.3, 0.0)).astype(np.float32)
    fractional = _seg_from([_geometry_sc(0.0, frame_of_reference)], probability[np.newaxis], "FRACTIONAL", tmp_path / "fractional.dcm")
    np.testing.assert_array_equal(read_pathology_mask(fractional), core)

    sources = [_geometry_sc(z, frame_of_reference) for z in (0.0, 1.0)]
    sources[1].StudyInstanceUID, sources[1].SeriesInstanceUID = sources[0].StudyInstanceUID, sources[0].SeriesInstanceUID
    volume = _seg_from(sources, np.stack([core, core]).astype(np.uint8), "BINARY", tmp_path / "volume.dcm")
    with pytest.raises(InputError, match="volume.dcm is a 3D segmentation with 2 planes"):
        read_pathology_mask(volume)


@pytest.mark.parametrize("segmentation_type", ["BINARY", "LABELMAP"])
def test_a_2d_dicom_seg_without_slice_thickness_and_a_label_map_seg_are_read(tmp_path, segmentation_type):
    """Slice Thickness in Pixel Measures is Type 1C (for volumes): a 2D SEG may lack it, which highdicom's
    reader would refuse; and a Label Map Segmentation (SOP class ...66.7) holds the same masks."""
    import highdicom as hd
    import pydicom

    source = _geometry_sc(0.0, hd.UID())
    path = _seg_from([source], nodule()[np.newaxis].astype(np.uint8), segmentation_type, tmp_path / "seg.dcm")
    dataset = pydicom.dcmread(path)
    measures = dataset.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    if "SliceThickness" in measures:
        del measures.SliceThickness
        dataset.save_as(path)
    assert ("1.2.840.10008.5.1.4.1.1.66.7" if segmentation_type == "LABELMAP" else "1.2.840.10008.5.1.4.1.1.66.4") \
        == pydicom.dcmread(path).SOPClassUID
    np.testing.assert_array_equal(read_pathology_mask(path), nodule())


def test_a_nrrd_whose_pixels_are_another_file_is_refused(tmp_path):
    """ITK would read whatever path ``data file:`` names (any file the engine can read) as pixels."""
    secret = tmp_path / "secret.raw"
    secret.write_bytes(anatomy_map().tobytes())
    for name, field in (("absolute.nrrd", f"data file: {secret}"), ("relative.nrrd", "datafile: secret.raw"),
                        ("crlf.nrrd", "Data  File : secret.raw")):
        header = f"NRRD0004\ntype: uint8\ndimension: 2\nsizes: {SHAPE[1]} {SHAPE[0]}\nencoding: raw\n{field}\n"
        path = tmp_path / name
        path.write_bytes(header.replace("\n", "\r\n" if name.startswith("crlf") else "\n").encode())
        with pytest.raises(InputError, match=rf"^{name} is a NRRD header whose pixels are in a separate data file"):
            load_masks(path, [], known_labels=KNOWN)
    attached = tmp_path / "attached.nrrd"  # the same header with the data inside: read as usual
    attached.write_bytes(f"NRRD0004\ntype: uint8\ndimension: 2\nsizes: {SHAPE[1]} {SHAPE[0]}\nencoding: raw\n\n"
                         .encode() + anatomy_map().tobytes())
    np.testing.assert_array_equal(load_masks(attached, [], known_labels=KNOWN).anatomy, anatomy_map())


def test_a_dicom_seg_made_by_dcmqi_is_read(tmp_path):
    """dcmqi (and so Slicer's DICOM-SEG export) leaves out "spatial locations preserved"; one plane needs none."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    tool = shutil.which("itkimage2segimage") or str(Path(sys.executable).parent / "itkimage2segimage")
    if not Path(tool).exists():
        pytest.skip("dcmqi is not installed")
    labels = anatomy_map()
    write_dicom_pair(tmp_path / "sc", np.zeros(SHAPE, np.float32), (0.6, 0.45),
                     [SegmentSpec(labels == 1, label=1)], {"model_id": "m"})
    volume = sitk.GetImageFromArray(labels[np.newaxis])
    volume.SetSpacing((0.45, 0.6, 1.0))
    sitk.WriteImage(volume, str(tmp_path / "labels.nrrd"))
    attributes = []
    for value in (1, 2, 3):
        entry = anatomy_entry(value)
        code = {"CodeValue": entry["type"]["value"], "CodingSchemeDesignator": entry["type"]["scheme"],
                "CodeMeaning": entry["type"]["meaning"]}
        item = {"labelID": value, "SegmentLabel": entry["display_name"], "SegmentAlgorithmType": "MANUAL",
                "SegmentedPropertyCategoryCodeSequence": {"CodeValue": entry["category"]["value"],
                                                          "CodingSchemeDesignator": entry["category"]["scheme"],
                                                          "CodeMeaning": entry["category"]["meaning"]},
                "SegmentedPropertyTypeCodeSequence": code}
        if entry.get("type_modifier"):
            item["SegmentedPropertyTypeModifierCodeSequence"] = {
                "CodeValue": entry["type_modifier"]["value"], "CodingSchemeDesignator": entry["type_modifier"]["scheme"],
                "CodeMeaning": entry["type_modifier"]["meaning"]}
        attributes.append(item)
    meta = {"ContentCreatorName": "Test", "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1",
            "SeriesDescription": "dcmqi anatomy", "SeriesNumber": "300", "InstanceNumber": "1",
            "BodyPartExamined": "CHEST", "segmentAttributes": [attributes], "ContentLabel": "SEG",
            "ContentDescription": "anatomy"}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    subprocess.run([tool, "--inputImageList", str(tmp_path / "labels.nrrd"), "--inputDICOMList",
                    str(tmp_path / "sc" / "sc.dcm"), "--inputMetadata", str(tmp_path / "meta.json"),
                    "--outputDICOM", str(tmp_path / "dcmqi.dcm")], check=True, capture_output=True, timeout=120)
    result = load_masks(tmp_path / "dcmqi.dcm", [], known_labels=KNOWN)
    np.testing.assert_array_equal(result.anatomy, labels)
