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
