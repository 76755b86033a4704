"""The control maps and their requests (io/controls.py, control_spec.py): no torch, no model.

Every map is float32 in [0, 1] at the size asked for; every bad request or file is refused with one
sentence; a source of another size than the image is resampled and a warning says so.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xreal_engine.errors import InputError
from xreal_engine.io import controls
from xreal_engine.io.controls import (ATTENTION_SIGMA_FRACTION, CONTROL_NAMES, CONTROL_SCALE_RANGE, ControlRequest,
                                      attention_from_fixations, attention_from_region, canny_map, check_scale,
                                      control_map, lung_map, load_control, parse_control, read_fixations_csv,
                                      sobel_map, texture_map)


def one_sentence(error: InputError) -> str:
    text = str(error)
    assert "\n" not in text and text.endswith(".") and "Traceback" not in text, text
    return text


def chest(size: int = 96) -> np.ndarray:
    """A grey 'X-ray': smooth background, two darker lungs with noisy texture, a bright step edge."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    image = 0.6 + 0.1 * np.sin(6 * x)
    lungs = ((x - 0.3) / 0.15) ** 2 + ((y - 0.5) / 0.3) ** 2 < 1
    image[lungs] = 0.3 + 0.15 * rng.random(int(lungs.sum()))
    return np.clip(image, 0, 1).astype(np.float32)


def labels(size: int = 96) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    result = np.zeros((size, size), np.uint8)
    result[((x - 0.3) / 0.15) ** 2 + ((y - 0.5) / 0.3) ** 2 < 1] = 2
    result[((x - 0.7) / 0.15) ** 2 + ((y - 0.5) / 0.3) ** 2 < 1] = 1
    result[((x - 0.55) / 0.1) ** 2 + ((y - 0.65) / 0.1) ** 2 < 1] = 3
    return result


# ----------------------------------------------------------------------------- requests


@pytest.mark.parametrize("text, expected", [
    ("sobel:ref.png:0.5", ControlRequest("sobel", Path("ref.png"), 0.5)),
    ("sobel:ref.png", ControlRequest("sobel", Path("ref.png"), None)),
    ("Canny:/data/a:b/ref.png:2", ControlRequest("canny", Path("/data/a:b/ref.png"), 2.0)),  # ':' inside the path
    ("texture:ref.nrrd:0", ControlRequest("texture", Path("ref.nrrd"), 0.0)),
    ("lungs", ControlRequest("lungs", None, None)),
    ("lungs:1.5", ControlRequest("lungs", None, 1.5)),
    ("attention:fix.csv", ControlRequest("attention", Path("fix.csv"), None)),
    ("attention:painted.png:0.05", ControlRequest("attention", Path("painted.png"), 0.05)),
])
def test_parse_control(text, expected):
    assert parse_control(text) == expected


def test_scale_range_both_ends_accepted_just_outside_refused():
    low, high = CONTROL_SCALE_RANGE
    assert (low, high) == (0.0, 2.0)
    assert check_scale(low) == 0.0 and check_scale(high) == 2.0
    assert parse_control("sobel:r.png:0").scale == 0.0 and parse_control("sobel:r.png:2").scale == 2.0
    for bad in (-0.001, 2.001, float("nan"), float("inf"), "abc", True):
        with pytest.raises(InputError) as caught:
            check_scale(bad, "sobel")
        assert "sobel scale" in one_sentence(caught.value) and "from 0 to 2" in str(caught.value)
    for text in ("sobel:r.png:-0.001", "sobel:r.png:2.001", "lungs:2.5"):
        with pytest.raises(InputError, match="outside \\[0, 2\\]"):
            parse_control(text)


@pytest.mark.parametrize("text, words", [
    ("edges:ref.png", "Unknown control 'edges'; the controls are sobel, canny, texture, lungs, attention"),
    ("sobel", "needs a reference X-ray"),
    ("canny:0.5", "needs a reference X-ray"),
    ("attention", "needs a map image or a fixation CSV"),
    ("lungs:mask.png", "computed from the anatomy label map"),
    ("sobel::0.5", "empty file name"),
])
def test_bad_control_requests_are_one_sentence(text, words):
    with pytest.raises(InputError) as caught:
        parse_control(text)
    assert words in one_sentence(caught.value)


def test_the_same_control_twice_is_refused():
    with pytest.raises(InputError, match="more than once"):
        controls.check_requests([parse_control("sobel:a.png"), parse_control("sobel:b.png:0.5")])
    assert len(controls.check_requests([parse_control("sobel:a.png"), parse_control("lungs")])) == 2


# ----------------------------------------------------------------------------- maps


@pytest.mark.parametrize("name", CONTROL_NAMES)
@pytest.mark.parametrize("size", [32, 64])
def test_every_map_is_float32_in_unit_range_at_the_size_asked(name, size):
    image, anatomy = chest(), labels()
    heat = attention_from_fixations(np.array([[40.0, 50.0, 0.4]]), image.shape)
    result = control_map(name, reference=image, labels=anatomy, attention=heat, size=size)
    assert result.shape == (size, size) and result.dtype == np.float32
    assert 0.0 <= result.min() and result.max() <= 1.0 and result.max() > 0


def test_sobel_is_zero_on_a_flat_image_and_high_on_an_edge():
    assert not sobel_map(np.full((32, 32), 0.4, np.float32)).any()
    step = np.zeros((32, 32), np.float32)
    step[:, 16:] = 1.0
    edges = sobel_map(step)
    assert edges[:, 15:17].min() > 0.9 and edges[:, :10].max() == 0 and edges[:, 22:].max() == 0


def test_canny_marks_the_step_and_nothing_else():
    step = np.zeros((64, 64), np.float32)
    step[:, 32:] = 1.0
    edges = canny_map(step)
    assert set(np.unique(edges)) <= {0.0, 1.0}
    columns = np.nonzero(edges[10:54].any(axis=0))[0]
    assert columns.min() >= 30 and columns.max() <= 33 and edges[10:54, 31:33].any(axis=1).all()


def test_texture_is_higher_in_noisy_lungs_than_on_smooth_background():
    image = chest(128)
    lungs = labels(128) == 2
    texture = texture_map(image)
    assert texture[lungs].mean() > 2 * texture[~lungs & (labels(128) == 0)].mean()


def test_lung_map_is_labels_one_and_two():
    anatomy = labels()
    np.testing.assert_array_equal(lung_map(anatomy), np.isin(anatomy, (1, 2)).astype(np.float32))
    with pytest.raises(InputError, match="no lungs"):
        control_map("lungs", labels=(anatomy == 3).astype(np.uint8) * 3, size=32)


def test_fixations_x_is_the_column_and_longer_fixations_weigh_more():
    heat = attention_from_fixations(np.array([[10.0, 40.0, 0.2], [50.0, 20.0, 0.8]]), (64, 80))
    assert heat.shape == (64, 80)
    assert np.unravel_index(np.argmax(heat), heat.shape) == (20, 50)  # (row = y, column = x)
    assert heat[20, 50] == pytest.approx(1.0) and 0.1 < heat[40, 10] < 0.5
    sigma = ATTENTION_SIGMA_FRACTION * 80
    assert heat[20, 50 + int(round(3 * sigma))] < 0.05  # a Gaussian of the documented sigma
    outside_only = attention_from_fixations(np.array([[500.0, 5.0, 1.0]]), (64, 64))
    assert not outside_only.any()


def test_painted_region_is_blurred_into_a_soft_map():
    region = np.zeros((64, 64), bool)
    region[20:44, 20:44] = True
    soft = attention_from_region(region)
    assert soft[32, 32] == pytest.approx(1.0) and soft[0, 0] < 0.01
    assert 0.2 < soft[32, 20] < 0.8  # soft at the edge
    assert (soft >= 0.5)[24:40, 24:40].all() and not (soft >= 0.5)[:14].any()


# ----------------------------------------------------------------------------- files


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_fixation_csv_plain_and_reflacx_layouts(tmp_path):
    plain = read_fixations_csv(write_text(tmp_path / "a.csv", "x,y,duration\n10,20,0.5\n30.5,40,0.25\n"))
    np.testing.assert_allclose(plain, [[10, 20, 0.5], [30.5, 40, 0.25]])
    reflacx = read_fixations_csv(write_text(
        tmp_path / "fixations.csv",
        "timestamp_start_fixation,timestamp_end_fixation,average_x_position,average_y_position,pupil_area\n"
        "1.0,1.5,100,200,3\n2.0,2.25,110,210,3\n"))
    np.testing.assert_allclose(reflacx, [[100, 200, 0.5], [110, 210, 0.25]])


@pytest.mark.parametrize("text, words", [
    ("a,b,c\n1,2,3\n", "is not the documented fixation CSV"),
    ("x,y\n1,2\n", "is not the documented fixation CSV"),
    ("x,y,duration\n", "has no fixations"),
    ("x,y,duration\n1,2,soon\n", "row 2 has a duration that is not a number"),
    ("x,y,duration\n1,2,-0.5\n", "negative duration"),
    ("x,y,duration\n1,2,0\n", "no fixation with a positive duration"),
    ("x,y,duration\n1,nan,0.3\n", "NaN or infinite"),
    ("x,y,duration,x\n1,2,0.3,200\n", "has the column x twice"),
])
def test_bad_fixation_files_are_one_sentence(tmp_path, text, words):
    with pytest.raises(InputError) as caught:
        read_fixations_csv(write_text(tmp_path / "fix.csv", text))
    assert words in one_sentence(caught.value) and "fix.csv" in str(caught.value)


def test_binary_fixation_file_is_refused(tmp_path):
    path = tmp_path / "fix.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage")
    with pytest.raises(InputError, match="not a text CSV"):
        read_fixations_csv(path)


def save_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_load_reference_records_hash_and_resamples_a_wrong_size_with_a_warning(tmp_path):
    same = save_png(tmp_path / "same.png", (chest(96) * 255).astype(np.uint8))
    other = save_png(tmp_path / "other.png", (chest(48) * 255).astype(np.uint8))
    loaded = load_control(parse_control(f"sobel:{same}:0.5"), size=32, input_shape=(96, 96))
    assert loaded.map.shape == (32, 32) and loaded.warnings == [] and loaded.scale == 0.5
    assert loaded.source_name == "same.png"
    assert loaded.source_sha256 == hashlib.sha256(same.read_bytes()).hexdigest()
    resampled = load_control(parse_control(f"texture:{other}"), size=32, input_shape=(96, 96))
    assert resampled.map.shape == (32, 32)
    assert resampled.warnings == ["The texture control other.png is 48x48 pixels, not the 96x96 of the image; it was "
                                  "resampled to the model's 32x32."]


def test_load_attention_from_fixations_painted_region_and_heatmap(tmp_path):
    csv = write_text(tmp_path / "fix.csv", "x,y,duration\n60,30,0.5\n200,10,0.1\n")
    from_fixations = load_control(parse_control(f"attention:{csv}"), size=32, input_shape=(96, 96))
    assert from_fixations.warnings == ["1 of the 2 fixations in fix.csv lie outside the 96x96 image and were left out."]
    assert np.unravel_index(np.argmax(from_fixations.map), (32, 32)) == (10, 20)  # (30, 60) / 3
    painted = np.zeros((96, 96), np.uint8)
    painted[30:60, 30:60] = 255
    region = load_control(parse_control(f"attention:{save_png(tmp_path / 'painted.png', painted)}"), size=32,
                          input_shape=(96, 96))
    assert region.region()[12:18, 12:18].all() and not region.region()[:5].any()
    heat = (attention_from_region(painted > 0) * 255).astype(np.uint8)
    kept = load_control(parse_control(f"attention:{save_png(tmp_path / 'heat.png', heat)}"), size=96,
                        input_shape=(96, 96))
    np.testing.assert_allclose(kept.map, heat / 255.0, atol=1e-6)  # a heatmap is used as it is


def test_normalised_fixation_coordinates_earn_a_warning(tmp_path):
    """Coordinates are pixels; 0..1 values would all land in the top-left pixel, silently."""
    normalised = write_text(tmp_path / "norm.csv", "x,y,duration\n0.2,0.25,0.3\n0.5,0.5,0.5\n")
    loaded = load_control(parse_control(f"attention:{normalised}"), size=32, input_shape=(96, 96))
    assert len(loaded.warnings) == 1 and "multiplied by its size (96x96)" in loaded.warnings[0]
    pixels = write_text(tmp_path / "pixels.csv", "x,y,duration\n20,25,0.3\n50,50,0.5\n")
    assert load_control(parse_control(f"attention:{pixels}"), size=32, input_shape=(96, 96)).warnings == []


def test_load_refusals_are_one_sentence(tmp_path):
    cases = [
        (parse_control(f"sobel:{tmp_path / 'missing.png'}"), "does not exist"),
        (parse_control(f"attention:{write_text(tmp_path / 'far.csv', 'x,y,duration' + chr(10) + '500,500,1' + chr(10))}"),
         "None of the fixations in far.csv fall inside the 96x96 image"),
        (parse_control(f"attention:{save_png(tmp_path / 'flat.png', np.zeros((96, 96), np.uint8))}"), "has a single grey level"),
        (parse_control(f"sobel:{write_text(tmp_path / 'fix.csv', 'x,y,duration' + chr(10) + '1,2,3' + chr(10))}"),
         "fix.csv"),
        (ControlRequest("lungs"), "needs an anatomy label map"),
        (parse_control(f"sobel:{save_png(tmp_path / 'ref.png', (chest(96) * 255).astype(np.uint8))}:abc"),
         "The sobel control's scale 'abc' is not a number"),
        (ControlRequest("attention", tmp_path), "is a directory"),
    ]
    for request, words in cases:
        with pytest.raises(InputError) as caught:
            load_control(request, size=32, input_shape=(96, 96))
        assert words in one_sentence(caught.value), (request, str(caught.value))


def test_lungs_from_the_anatomy_records_the_anatomy_file(tmp_path):
    anatomy_path = save_png(tmp_path / "anatomy.png", labels())
    loaded = load_control(ControlRequest("lungs", None, 1.0), size=48, input_shape=(96, 96), labels=labels(),
                          labels_path=anatomy_path)
    assert loaded.source_name == "anatomy.png"
    assert loaded.source_sha256 == hashlib.sha256(anatomy_path.read_bytes()).hexdigest()
    np.testing.assert_array_equal(loaded.map > 0, np.isin(labels()[1::2, 1::2], (1, 2)))


def test_what_the_slicer_module_sends_a_0_1_nrrd_region_and_a_float_nrrd_reference(tmp_path):
    import SimpleITK as sitk

    painted = np.zeros((96, 96), np.uint8)
    painted[30:60, 30:60] = 1  # a 0/1 label volume, as Slicer exports a segment
    sitk.WriteImage(sitk.GetImageFromArray(painted), str(tmp_path / "attention.nrrd"))
    region = load_control(parse_control(f"attention:{tmp_path / 'attention.nrrd'}:1.5"), size=32, input_shape=(96, 96))
    np.testing.assert_allclose(region.map, control_map("attention", attention=attention_from_region(painted > 0),
                                                       size=32))
    reference = chest(96)
    sitk.WriteImage(sitk.GetImageFromArray(reference), str(tmp_path / "reference.nrrd"))
    sobel = load_control(parse_control(f"sobel:{tmp_path / 'reference.nrrd'}:0.5"), size=32, input_shape=(96, 96))
    np.testing.assert_allclose(sobel.map, control_map("sobel", reference=reference, size=32), atol=1e-6)
    assert sobel.warnings == [] and region.warnings == []
