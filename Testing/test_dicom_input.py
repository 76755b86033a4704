"""read_xray: DX / CR / SC X-rays in, LUTs and photometric handled, compressed syntaxes decoded, bad files refused."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from xreal_engine.io.dicom import build_secondary_capture, read_xray
from xreal_engine.errors import InputError

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def gradient(shape=(128, 96), high=4095) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return np.round(high * (rows + cols) / (shape[0] + shape[1] - 2)).astype(np.uint16)


def make_xray(path, pixels, *, sop_class=DX_STORAGE, photometric="MONOCHROME2", bits_stored=12, **attributes):
    """Write a minimal, valid single-frame grayscale X-ray file."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Patient"
    ds.PatientID = "P1"
    ds.Modality = "DX" if sop_class == DX_STORAGE else "CR"
    ds.set_pixel_data(pixels, photometric, bits_stored)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dx_window_applied_and_pixel_spacing_read(tmp_path):
    stored = gradient()
    path = make_xray(tmp_path / "dx.dcm", stored, PixelSpacing=[0.2, 0.25], WindowCenter=2048, WindowWidth=2048)
    xray = read_xray(path)
    assert xray.pixels.dtype == np.float32 and xray.pixels.shape == stored.shape
    # LINEAR window (PS3.3 C.11.2.1.2.1), output mapped to [0, 1].
    expected = np.clip((stored - (2048 - 0.5)) / (2048 - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(xray.pixels, expected, atol=1e-3)
    assert xray.pixels.min() == 0.0 and xray.pixels.max() == 1.0
    assert xray.pixel_spacing_mm == (0.2, 0.25) and xray.spacing_from_file
    assert "PixelData" not in xray.dataset and xray.dataset.PatientID == "P1"


def test_cr_monochrome1_inverted_imager_pixel_spacing(tmp_path):
    stored = gradient()
    path = make_xray(tmp_path / "cr.dcm", stored, sop_class=CR_STORAGE, photometric="MONOCHROME1", ImagerPixelSpacing=[0.15, 0.15])
    xray = read_xray(path)
    # No VOI: min-max of the stored values, then inverted so that dense (low MONOCHROME1 values) is white.
    np.testing.assert_allclose(xray.pixels, 1.0 - stored / stored.max(), atol=1e-6)
    assert xray.pixel_spacing_mm == (0.15, 0.15)


def test_monochrome1_with_inverse_presentation_lut_is_inverted_once(tmp_path):
    stored = gradient()
    path = make_xray(tmp_path / "dx1.dcm", stored, photometric="MONOCHROME1", PresentationLUTShape="INVERSE")
    np.testing.assert_allclose(read_xray(path).pixels, 1.0 - stored / stored.max(), atol=1e-6)


def test_rescale_and_voi_lut_sequence(tmp_path):
    stored = gradient(high=1023)
    lut = pydicom.Dataset()
    lut.LUTDescriptor = [256, 0, 8]
    lut.add_new(0x00283006, "US", list(range(255, -1, -1)))  # LUT Data, a reversing LUT: proves the sequence is used
    path = make_xray(tmp_path / "lut.dcm", stored, bits_stored=10, RescaleSlope=4, RescaleIntercept=0, RescaleType="US", VOILUTSequence=[lut])
    xray = read_xray(path)
    values = np.minimum(stored * 4, 255)
    np.testing.assert_allclose(xray.pixels, (255 - values) / 255.0, atol=1e-6)
    assert not xray.spacing_from_file
    assert xray.pixel_spacing_mm == pytest.approx((400.0 / 128, 400.0 / 96))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=["rle", "j2k", "jpegls"])
def test_compressed_transfer_syntaxes_decode_losslessly(tmp_path, syntax):
    stored = gradient()
    path = make_xray(tmp_path / "plain.dcm", stored, PixelSpacing=[0.3, 0.3])
    ds = pydicom.dcmread(path)
    ds.compress(syntax)
    ds.save_as(tmp_path / "compressed.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "compressed.dcm").file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_xray(tmp_path / "compressed.dcm").pixels, read_xray(path).pixels)


def test_jpeg_baseline_decodes(tmp_path):
    """8-bit lossy JPEG, the commonest compressed CR/DX export; decoded by pylibjpeg, compared with Pillow's decoding."""
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    stored = (gradient(high=255)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95)
    reference = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float64)
    ds = pydicom.dcmread(make_xray(tmp_path / "plain.dcm", stored, bits_stored=8))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    ds.save_as(tmp_path / "jpeg.dcm")
    pixels = read_xray(tmp_path / "jpeg.dcm").pixels
    expected = (reference - reference.min()) / (reference.max() - reference.min())
    np.testing.assert_allclose(pixels, expected, atol=2 / 255)


def _jpeg_xray(tmp_path, name="jpeg.dcm", **attributes):
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    stored = (gradient(high=255)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=90)
    ds = pydicom.dcmread(make_xray(tmp_path / f"plain-{name}", stored, bits_stored=8, PixelSpacing=[0.2, 0.2]))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(tmp_path / name)
    return tmp_path / name, stored.nbytes / len(ds.PixelData)


def test_an_edit_of_a_lossy_source_stays_marked_lossy(tmp_path):
    """PS3.3 C.7.6.1.1.5: once lossy-compressed, every derived image says so (an edit keeps the source's
    pixels outside its regions) -- whether the source says it, or only its transfer syntax shows it."""
    image = np.full((128, 96), 0.5, dtype=np.float32)
    said, _ = _jpeg_xray(tmp_path, "said.dcm", LossyImageCompression="01", LossyImageCompressionRatio="7.5",
                         LossyImageCompressionMethod="ISO_10918_1")
    silent, ratio = _jpeg_xray(tmp_path, "silent.dcm")
    for source, expected_ratio in ((said, "7.5"), (silent, f"{ratio:.2f}")):
        sc = build_secondary_capture(image, (0.2, 0.2), {"model_id": "m"}, source=read_xray(source).dataset)
        assert sc.LossyImageCompression == "01", source.name
        assert str(sc.LossyImageCompressionRatio) == expected_ratio
        assert sc.LossyImageCompressionMethod == "ISO_10918_1"
    lossless = make_xray(tmp_path / "plain.dcm", gradient(), PixelSpacing=[0.2, 0.2])
    sc = build_secondary_capture(image, (0.2, 0.2), {"model_id": "m"}, source=read_xray(lossless).dataset)
    assert sc.LossyImageCompression == "00" and "LossyImageCompressionRatio" not in sc
    assert build_secondary_capture(image, (0.2, 0.2), {"model_id": "m"}).LossyImageCompression == "00"


def test_our_own_secondary_capture_reads_back(tmp_path):
    image = np.linspace(0, 1, 200 * 160, dtype=np.float32).reshape(200, 160)
    build_secondary_capture(image, (0.7, 0.6), {"model_id": "m"}).save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    xray = read_xray(tmp_path / "sc.dcm")
    np.testing.assert_allclose(xray.pixels, image, atol=2e-5)
    assert xray.pixel_spacing_mm == (0.7, 0.6)


# ----------------------------------------------------------------------------- refusals


def test_not_dicom_is_refused(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("this is not an image\n" * 20)
    with pytest.raises(InputError, match=r"^notes.dcm: not a DICOM file"):
        read_xray(path)


def test_corrupt_dicom_is_refused(tmp_path):
    good = make_xray(tmp_path / "good.dcm", gradient())
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(good.read_bytes()[:600])
    with pytest.raises(InputError, match=r"^broken.dcm: "):
        read_xray(broken)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_xray(tmp_path / "absent.dcm")


def test_no_pixel_data_is_refused(tmp_path):
    path = make_xray(tmp_path / "x.dcm", gradient())
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(tmp_path / "header_only.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match="header_only.dcm: the DICOM file has no pixel data"):
        read_xray(tmp_path / "header_only.dcm")


def test_multiframe_is_refused(tmp_path):
    frames = np.stack([gradient(), gradient()])
    ds = pydicom.dcmread(make_xray(tmp_path / "one.dcm", gradient()))
    ds.set_pixel_data(frames, "MONOCHROME2", 12)
    ds.save_as(tmp_path / "multi.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match=r"multi-frame DICOM \(2 frames\) is not supported"):
        read_xray(tmp_path / "multi.dcm")


def test_colour_is_refused(tmp_path):
    rgb = np.zeros((64, 64, 3), np.uint8)
    ds = pydicom.dcmread(make_xray(tmp_path / "one.dcm", gradient()))
    ds.set_pixel_data(rgb, "RGB", 8)
    ds.save_as(tmp_path / "rgb.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match=r"colour images \(RGB\) are not supported"):
        read_xray(tmp_path / "rgb.dcm")


def test_unsupported_photometric_is_refused(tmp_path):
    ds = pydicom.dcmread(make_xray(tmp_path / "one.dcm", gradient()))
    ds.PhotometricInterpretation = "HSV"  # retired, single-sample: neither grayscale nor a colour model we accept
    ds.save_as(tmp_path / "hsv.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match="unsupported photometric interpretation HSV"):
        read_xray(tmp_path / "hsv.dcm")


def test_tiny_image_is_refused(tmp_path):
    path = make_xray(tmp_path / "tiny.dcm", gradient((16, 16)))
    with pytest.raises(InputError, match="16x16 pixels cannot be a chest X-ray"):
        read_xray(path)
