"""Reading user images and masks (`io.load_image`, `io.load_mask`) and atomic writes: odd but
valid files are read as viewers show them, bad ones give an InputError naming the file."""

from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from dragondiffusion.errors import InputError
from dragondiffusion.io import atomic_write, load_image, load_mask

ORIENTATION = 0x0112
"""The EXIF tag of a photo's orientation (6: shown turned 90° clockwise)."""


def grey16(levels: np.ndarray) -> PIL.Image.Image:
    """A 16-bit greyscale image (mode I;16) of uint16 `levels`."""
    image = PIL.Image.fromarray(levels.astype(np.uint16))
    assert image.mode == "I;16"
    return image


def test_16_bit_grey_image_is_scaled_to_8_bits_not_clipped_white(tmp_path):
    levels = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (16, 1))
    grey16(levels).save(tmp_path / "g16.png")
    with PIL.Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # Pillow's own convert("RGB") would clip it white
    expected = np.rint(levels / 257)
    for given in (tmp_path / "g16.png", grey16(levels)):
        rgb = np.asarray(load_image(given)).astype(float)
        assert rgb.shape == (16, 32, 3)
        assert np.abs(rgb - expected[..., None]).max() <= 1


@pytest.mark.parametrize(
    "levels,mode,expected",
    [
        (np.array([[0, 32639, 65535, 70000]], np.int32), "I", [0, 127, 255, 255]),
        (np.array([[0, 100, 200, 255]], np.int32), "I", [0, 100, 200, 255]),  # 8-bit data
        (np.array([[0.0, 0.5, 1.0, 0.25]], np.float32), "F", [0, 128, 255, 64]),
        (np.array([[-3.0, 100.0, 300.0, 2.0]], np.float32), "F", [0, 100, 255, 2]),
    ],
)
def test_32_bit_and_float_grey_images_are_scaled(levels, mode, expected):
    image = PIL.Image.fromarray(np.repeat(np.repeat(levels, 8, axis=0), 2, axis=1))
    assert image.mode == mode
    rgb = np.asarray(load_image(image))
    assert rgb[0, ::2, 0].tolist() == expected


def test_16_bit_mask_selects_above_half_its_range(tmp_path):
    levels = np.zeros((16, 16), np.uint16)
    levels[:, 4:8], levels[:, 8:] = 30000, 40000
    grey16(levels).save(tmp_path / "m16.png")
    mask = load_mask(tmp_path / "m16.png", (16, 16))
    assert not mask[:, :8].any() and mask[:, 8:].all()
    ones = (levels > 0).astype(np.uint16)  # a 0/1 mask saved in 16 bits selects its 1s too
    grey16(ones).save(tmp_path / "m01.png")
    assert np.array_equal(load_mask(tmp_path / "m01.png", (16, 16)), ones == 1)


def damaged(tmp_path: Path) -> dict[str, Path]:
    """Files Pillow cannot read: truncated, not an image, empty."""
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        tmp_path / "whole.png"
    )
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"this is not a picture" * 10)
    (tmp_path / "empty.png").write_bytes(b"")
    return {
        "trunc": tmp_path / "trunc.png",
        "garbage": tmp_path / "garbage.png",
        "empty": tmp_path / "empty.png",
    }


@pytest.mark.parametrize("what", ["image", "mask"])
def test_damaged_files_are_input_errors_naming_the_file(tmp_path, what):
    files = damaged(tmp_path)
    problems = {"trunc": "is truncated or damaged; re-save it", "garbage": "is not an image"}
    problems["empty"] = problems["garbage"]
    for name, path in files.items():
        with pytest.raises(InputError) as err:
            load_image(path) if what == "image" else load_mask(path, (64, 64))
        assert f"{what} file {str(path)!r} {problems[name]}" in str(err.value)
    with pytest.raises(InputError, match="does not exist; check the path"):
        load_image(tmp_path / "nope.png") if what == "image" else load_mask(
            tmp_path / "nope.png", (64, 64)
        )


def test_huge_image_is_refused_with_its_size(tmp_path, monkeypatch):
    PIL.Image.new("L", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # refuses above 2000 pixels
    for load in (load_image, lambda path: load_mask(path, (64, 64))):
        with pytest.raises(
            InputError, match=r"is too large: 4,096 pixels, at most 2,000; downscale"
        ):
            load(tmp_path / "big.png")


def turned_photo() -> tuple[PIL.Image.Image, np.ndarray]:
    """A 40×20 image stored sideways with EXIF orientation 6, and how it is shown (20×40)."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = 255  # the stored left edge is shown at the top
    image = PIL.Image.fromarray(stored)
    image.getexif()[ORIENTATION] = 6
    return image, np.rot90(stored, -1)


def test_exif_orientation_turns_images_and_masks_upright(tmp_path):
    image, shown = turned_photo()
    exif = image.getexif()
    image.save(tmp_path / "photo.png", exif=exif)
    PIL.Image.fromarray(shown[..., 0]).save(tmp_path / "drawn.png")  # a mask drawn as shown
    image.convert("L").save(tmp_path / "sideways_mask.png", exif=exif)
    loaded = load_image(tmp_path / "photo.png")
    assert loaded.size == (20, 40)
    assert np.array_equal(np.asarray(loaded), shown)
    # An image the caller holds is taken as stored: masks and points made on its pixels match.
    assert np.array_equal(np.asarray(load_image(image)), np.asarray(image))
    for mask in ("drawn.png", "sideways_mask.png"):
        selected = load_mask(tmp_path / mask, (20, 40))
        assert selected[:10].all() and not selected[10:].any()


def test_zero_one_mask_selects_its_ones(tmp_path):
    levels = np.zeros((16, 16), np.uint8)
    levels[4:8, 4:8] = 1
    PIL.Image.fromarray(levels).save(tmp_path / "m01.png")
    for given in (tmp_path / "m01.png", levels, PIL.Image.fromarray(levels)):
        assert np.array_equal(load_mask(given, (16, 16)), levels == 1)
    grey = levels * 200 + 1  # 1 and 201: an 8-bit mask, white selects
    assert np.array_equal(load_mask(grey, (16, 16)), levels == 1)


def test_empty_and_faint_masks_say_what_marks_the_region():
    with pytest.raises(InputError, match=r"mask is empty \(no white pixels\)"):
        load_mask(np.zeros((16, 16), np.uint8), (16, 16))
    with pytest.raises(InputError, match=r"brightest is 100 of 255\): white \(>127\) marks"):
        load_mask(np.full((16, 16), 100, np.uint8), (16, 16))
    with pytest.raises(InputError, match=r"mask is an array of shape \(\) but the image is 16×16"):
        load_mask(np.array(5, np.uint8), (16, 16))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_image_arrays_with_one_three_or_four_channels(channels):
    pixels = np.random.default_rng(channels).integers(0, 255, (12, 10, channels), np.uint8)
    rgb = np.asarray(load_image(pixels))
    assert rgb.shape == (12, 10, 3)
    assert np.array_equal(rgb, np.broadcast_to(pixels[..., :3], (12, 10, 3)))


def test_other_image_arrays_are_refused_naming_the_shapes():
    for array in (np.zeros((12, 10, 2), np.uint8), np.zeros((12, 10), np.uint16)):
        with pytest.raises(InputError, match=r"\(H, W, 3\) or \(H, W, 4\); got"):
            load_image(array)


def test_atomic_write_where_no_file_can_be_made_is_an_input_error(tmp_path):
    (tmp_path / "file.png").write_bytes(b"x")
    target = tmp_path / "file.png" / "out.png"
    with pytest.raises(InputError, match=rf"cannot write {str(target)!r} .*choose another path"):
        atomic_write(target, lambda tmp: Path(tmp).write_text("x"))
    assert (tmp_path / "file.png").read_bytes() == b"x"


def test_atomic_write_lets_the_writers_error_through_and_leaves_no_temporary_file(tmp_path):
    def failing(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("the writer failed")

    with pytest.raises(RuntimeError, match="the writer failed"):
        atomic_write(tmp_path / "out.txt", failing)
    assert list(tmp_path.iterdir()) == []
    assert (
        atomic_write(tmp_path / "out.txt", lambda tmp: Path(tmp).write_text("x")).read_text() == "x"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
