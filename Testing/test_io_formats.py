"""The one file sniff and the header-only checks: a huge or 3D image is refused before any pixel is decoded."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from xreal_engine.errors import InputError
from xreal_engine.io.formats import MAX_IMAGE_SIDE, check_image_header, header_sizes, sniff_file, sniff_format
from xreal_engine.io.images import read_source_image
from xreal_engine.io.masks import read_pathology_mask


def png_claiming(path, width: int, height: int):
    """A tiny PNG whose IHDR announces width x height (its pixel data is far too short to decode)."""
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def test_sniff_reads_bytes_not_names(tmp_path):
    disguised = tmp_path / "mask.dcm"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(disguised, format="PNG")
    assert sniff_file(disguised) == "png"
    assert sniff_format(b"\0" * 128 + b"DICM") == "dicom" and sniff_format(b"NRRD0004\n") == "nrrd"
    assert sniff_format(b"GIF89a") is None


@pytest.mark.parametrize("side", [MAX_IMAGE_SIDE + 1, 20000])
def test_a_huge_png_header_is_refused_before_decoding(tmp_path, side):
    path = png_claiming(tmp_path / "bomb.png", side, side)
    assert header_sizes(path, "png") == [side, side]
    for read in (read_pathology_mask, read_source_image):
        with pytest.raises(InputError, match=f"at most {MAX_IMAGE_SIDE} pixels per side"):
            read(path)


def test_the_largest_allowed_side_passes_the_header_check(tmp_path):
    assert check_image_header(png_claiming(tmp_path / "edge.png", MAX_IMAGE_SIDE, 64)) == "png"


def test_a_3d_volume_is_refused_from_its_header(tmp_path):
    path = tmp_path / "volume.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 40, 40), np.uint8)), str(path), True)
    with pytest.raises(InputError, match="3D volume with 5 slices"):
        check_image_header(path)


def test_directories_missing_files_and_nan_images_get_their_own_sentence(tmp_path):
    with pytest.raises(InputError, match="is a directory, not a file"):
        read_pathology_mask(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        read_pathology_mask(tmp_path / "absent.png")
    image = np.full((40, 40), 0.5, np.float32)
    image[3, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(image), str(tmp_path / "nan.nrrd"))
    with pytest.raises(InputError, match="NaN or infinite"):
        read_source_image(tmp_path / "nan.nrrd")


def test_a_deflated_dicom_is_refused_from_its_file_meta_before_anything_is_inflated(tmp_path):
    """Deflate can hide gigabytes in a small upload; only the (never deflated) file meta is read."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    def dicom(path, syntax):
        dataset = pydicom.Dataset()
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = syntax
        dataset.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        dataset.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        dataset.SOPClassUID, dataset.SOPInstanceUID = SecondaryCaptureImageStorage, pydicom.uid.generate_uid()
        dataset.Rows, dataset.Columns, dataset.SamplesPerPixel, dataset.BitsAllocated = 64, 64, 1, 8
        dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 7, 0
        dataset.PhotometricInterpretation, dataset.PixelData = "MONOCHROME2", bytes(64 * 64)
        dataset.save_as(path, enforce_file_format=True)
        return path

    assert check_image_header(dicom(tmp_path / "plain.dcm", ExplicitVRLittleEndian)) == "dicom"
    deflated = dicom(tmp_path / "deflated.dcm", DeflatedExplicitVRLittleEndian)
    for read in (check_image_header, read_pathology_mask, read_source_image):
        with pytest.raises(InputError, match="uses the Deflated transfer syntax"):
            read(deflated)


@pytest.mark.parametrize("offset", [1e15, -1.0, float("nan")])
def test_a_nifti_whose_voxels_start_far_beyond_its_header_is_refused(tmp_path, offset):
    """A gzipped NIfTI could otherwise make the engine inflate a terabyte to reach its voxels."""
    import gzip

    path = tmp_path / "far.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 40), np.float32)), str(path))
    raw = bytearray(gzip.decompress(path.read_bytes()))
    assert check_image_header(path) == "nifti.gz"  # as written: voxels right after the header
    raw[108:112] = struct.pack("<f", offset)
    path.write_bytes(gzip.compress(bytes(raw)))
    for read in (check_image_header, read_pathology_mask):
        with pytest.raises(InputError, match="puts its voxels .* bytes in; it is not a valid image"):
            read(path)
