"""Keeping the background: the input's own pixels outside the edit's grown, feathered region."""

import numpy as np
import PIL.Image
import pytest
import torch

from dragondiffusion.cli import main
from dragondiffusion.composite import background_alpha, keep_background
from dragondiffusion.errors import InputError
from dragondiffusion.io import read_record


def test_alpha_is_one_on_the_grown_region_ramps_over_one_cell_and_is_zero_beyond():
    region = torch.zeros(1, 1, 4, 6, dtype=torch.bool)
    region[..., 1, 2] = True  # latent cell (row 1, col 2) = pixels y 8-15, x 16-23 at 8 px/cell
    alpha = background_alpha(region, (48, 32))
    assert alpha.shape == (32, 48)
    assert (alpha[0:24, 8:32] == 1).all()  # the cell grown by 8 px on every side
    ramp = alpha[12, 32:41]  # to the right: falls from 1 to 0 over the next 8 px
    assert ramp[0] < 1 and ramp[-1] == 0 and (np.diff(ramp) <= 0).all()
    assert (alpha[:, 40:] == 0).all() and (alpha[24:] < 1).all()


def test_outside_pixels_are_the_inputs_exactly():
    rng = np.random.default_rng(0)
    original = PIL.Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    edited = PIL.Image.fromarray(np.zeros((32, 48, 3), np.uint8))
    region = torch.zeros(1, 1, 4, 6, dtype=torch.bool)
    region[..., 1, 2] = True
    out = np.asarray(keep_background(edited, original, region))
    alpha = background_alpha(region, (48, 32))
    assert np.array_equal(out[alpha == 0], np.asarray(original)[alpha == 0])
    assert (out[alpha == 1] == 0).all()


def test_edit_with_keep_background_changes_only_near_the_object(pipe, scene, inversion):
    img, mask = scene
    kw = dict(prompt="a red square", num_inference_steps=10, seed=7)
    plain = pipe.move(inversion, mask, (35, 45), (100, 45), **kw)
    kept = pipe.move(inversion, mask, (35, 45), (100, 45), keep_background=True, **kw)
    assert kept.record["keep_background"] and not plain.record["keep_background"]
    out, full = np.asarray(kept.image), np.asarray(plain.image)
    # Far from the old (x 20-50) and new (x 85-115; its latent cells reach ~120) places the
    # input comes back exactly; the plain output passes everything through the VAE.
    far = (slice(None), slice(140, 160))
    assert np.array_equal(out[far], img[far])
    assert not np.array_equal(full[far], img[far])
    # Inside the new place the edited pixels are kept.
    assert np.array_equal(out[35:55, 90:110], full[35:55, 90:110])
    # The same image from the plain result, without sampling again; the plain one is untouched.
    later = plain.with_background_kept()
    assert np.array_equal(np.asarray(later.image), out) and later.record["keep_background"]
    assert np.array_equal(np.asarray(plain.image), full) and not plain.record["keep_background"]
    assert kept.with_background_kept() is kept
    bare = type(plain)(plain.image, plain.latent, dict(plain.record))
    with pytest.raises(InputError, match="no edit region"):
        bare.with_background_kept()


def test_cli_keep_background_flag(tmp_path, scene, tiny_bundle):
    img, mask = scene
    PIL.Image.fromarray(img).save(tmp_path / "in.png")
    PIL.Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    args = [
        "move", "--model", str(tiny_bundle), "--image", str(tmp_path / "in.png"),
        "--mask", str(tmp_path / "mask.png"), "--from", "35,45", "--to", "100,50",
        "--steps", "4", "--device", "cpu", "--quiet", "--keep-background", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    assert read_record(out)["keep_background"] is True
    with PIL.Image.open(out) as im:
        assert np.array_equal(np.asarray(im.convert("RGB"))[:, 140:], img[:, 140:])
