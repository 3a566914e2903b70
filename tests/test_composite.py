"""Keeping the background: the input's own pixels outside the edit's grown, feathered region."""

import numpy as np
import PIL.Image
import pytest
import torch

from dragondiffusion import cli
from dragondiffusion.cli import main
from dragondiffusion.composite import (
    Vacated,
    background_alpha,
    chessboard_distance,
    default_margin,
    fill_from_outside,
    fill_thin_vacated,
    keep_background,
    thin_vacated,
)
from dragondiffusion.errors import InputError
from dragondiffusion.geometry import dilate
from dragondiffusion.io import read_record


def one_pixel_region(h: int = 32, w: int = 48, y: int = 12, x: int = 20) -> torch.Tensor:
    region = torch.zeros(1, 1, h, w, dtype=torch.bool)
    region[..., y, x] = True
    return region


def test_alpha_is_one_near_the_region_ramps_over_the_rest_of_the_margin_and_is_zero_beyond():
    alpha = background_alpha(one_pixel_region(), (48, 32), 6)
    assert alpha.shape == (32, 48)
    assert (alpha[9:16, 17:24] == 1).all()  # the pixel and 3 px (half the margin) around it
    ramp = alpha[12, 23:28]  # to the right: distances 3 … 7
    assert ramp.tolist() == pytest.approx([1, 3 / 4, 2 / 4, 1 / 4, 0])
    square = np.zeros((32, 48), bool)
    square[6:19, 14:27] = True  # every pixel within 6 px (a square neighbourhood)
    assert (alpha[square] > 0).all() and (alpha[~square] == 0).all()


def test_margin_zero_is_the_region_itself_and_other_output_sizes_keep_all_of_it():
    region = one_pixel_region()
    assert np.array_equal(background_alpha(region, (48, 32), 0), region[0, 0].float().numpy())
    # At 3× the working size the region's pixel covers a 3×3 block; at half size the block of
    # 2×2 working pixels it lies in.
    big = background_alpha(region, (144, 96), 0)
    assert big.sum() == 9 and (big[36:39, 60:63] == 1).all()
    small = background_alpha(region, (24, 16), 0)
    assert small.sum() == 1 and small[6, 10] == 1
    # At ratios that are not whole numbers every output pixel overlapping the region's pixel.
    odd = background_alpha(region, (60, 40), 0)  # 1.25×: the pixel spans 15.0-16.25 and 25-26.25
    assert odd.sum() == 4 and (odd[15:17, 25:27] == 1).all()


def test_chessboard_distance_is_exact_and_the_margin_costs_nothing_however_wide():
    rng = np.random.default_rng(3)
    mask = rng.random((23, 31)) < 0.03
    ys, xs = np.nonzero(mask)
    brute = np.array(
        [[np.maximum(abs(ys - y), abs(xs - x)).min() for x in range(31)] for y in range(23)]
    )
    assert np.array_equal(chessboard_distance(mask), brute)
    assert np.isinf(chessboard_distance(np.zeros((4, 5), bool))).all()
    # One pass over the pixels whatever the margin: a huge one keeps nothing of the input here.
    alpha = background_alpha(one_pixel_region(), (48, 32), 10**9)
    assert (alpha == 1).all()


def test_outside_pixels_are_the_inputs_exactly():
    rng = np.random.default_rng(0)
    original = PIL.Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    edited = PIL.Image.fromarray(np.zeros((32, 48, 3), np.uint8))
    region = one_pixel_region()
    out = np.asarray(keep_background(edited, original, region, 4))
    alpha = background_alpha(region, (48, 32), 4)
    assert np.array_equal(out[alpha == 0], np.asarray(original)[alpha == 0])
    assert (out[alpha == 1] == 0).all() and (alpha == 1).sum() == 25


def test_default_margin_is_one_feature_cell_in_output_pixels():
    assert default_margin((128, 128), (128, 128), 4.0) == 4
    assert default_margin((512, 384), (1024, 768), 4.0) == 8
    assert default_margin((128, 128), (32, 32), 4.0) == 1  # never below one pixel


def square(size: int, top: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[top : top + side, top : top + side] = True
    return mask


def test_thin_vacated_is_the_ring_a_shrinking_object_leaves_not_a_moves_wide_area():
    old, new = square(40, 10, 20), square(40, 13, 14)  # 3 px of ring on every side
    ring = thin_vacated(old, new, 8)
    expected = np.zeros_like(old)
    expected[9:31, 9:31] = True  # the old place grown by 1 px (its blended edge) …
    expected[13:27, 13:27] = False  # … less the new place
    assert np.array_equal(ring, expected)
    assert not thin_vacated(old, new, 3).any()  # the ring's 4-5 px of both distances > 3
    # A move far away leaves a wide area: no pixel of it is within 8 px of both.
    far = np.zeros((40, 80), bool)
    far[10:30, 10:30], moved = True, np.zeros((40, 80), bool)
    moved[10:30, 50:70] = True
    assert not thin_vacated(far, moved, 8).any()
    # A short move leaves a 4-px strip beside the new place (and the old place's 1-px blended
    # edge along it): thin, every pixel of it.
    short = np.roll(far, 4, axis=1)
    assert np.array_equal(thin_vacated(far, short, 8), dilate(far, 1) & ~short)
    assert not thin_vacated(old, np.zeros_like(old), 100).any()  # no new place: nothing thin


def test_fill_from_outside_continues_the_surroundings_inward_and_touches_nothing_else():
    flat = np.full((30, 30, 3), (90, 140, 30), np.uint8)
    painted = flat.copy()
    painted[10:20, 10:20] = (255, 0, 0)  # an object on a flat background
    hole = square(30, 9, 12)
    filled = fill_from_outside(painted, hole)
    assert np.array_equal(filled, flat)  # the object gone, the flat colour continued
    # A horizontal ramp: the filled pixels stay within the ramp's values on their rows, and
    # the pixels outside the hole are the image's own.
    ramp = np.repeat(np.linspace(0, 250, 30, dtype=np.uint8)[None, :, None], 30, 0).repeat(3, 2)
    filled = fill_from_outside(ramp, hole)
    assert np.array_equal(filled[~hole], ramp[~hole])
    assert (filled[hole] >= ramp[:, 8].min() - 1).all() and (
        filled[hole] <= ramp[:, 21].max() + 1
    ).all()
    # Asked for a thin strip only, it stops after the rings that reach it: the same values there.
    strip = hole & ~square(30, 11, 8)
    partial = fill_from_outside(ramp, hole, strip)
    assert np.array_equal(partial[strip], filled[strip])
    assert np.array_equal(partial[~hole], ramp[~hole])
    assert np.array_equal(fill_from_outside(ramp, np.zeros_like(hole)), ramp)
    assert np.array_equal(fill_from_outside(ramp, np.ones_like(hole)), ramp)  # nothing to fill from


def test_keep_background_fills_the_ring_from_the_original_not_the_edit():
    original = np.full((40, 40, 3), (90, 140, 30), np.uint8)
    original[10:30, 10:30] = (255, 0, 0)
    edited = np.full((40, 40, 3), (60, 60, 60), np.uint8)  # the model's: everything grey
    old, new = torch.from_numpy(square(40, 10, 20)), torch.from_numpy(square(40, 13, 14))
    places = Vacated(old[None, None], new[None, None], (20, 20), (20, 20), 0.7)  # about the centre
    region = places.old | places.new
    args = (PIL.Image.fromarray(edited), PIL.Image.fromarray(original), region, 2)
    out = np.asarray(keep_background(*args, places, 8))
    plain = np.asarray(keep_background(*args))
    ring = thin_vacated(old.numpy(), new.numpy(), 8)
    assert (out[ring] == (90, 140, 30)).all()  # the background, not the red object
    assert (plain[ring] == 60).all()  # without the places: the model's pixels
    assert np.array_equal(out[~ring], plain[~ring])
    assert np.array_equal(np.asarray(keep_background(*args, places, 0)), plain)


def test_thin_strips_next_to_the_new_place_carry_the_objects_surroundings_along():
    # The red square casts a 2-px shadow (the flat colour at half its brightness) on the flat
    # background; it shrinks to 0.7 about its centre, leaving a 3-px ring.
    flat, dark = (90, 140, 30), (45, 70, 15)
    original = np.full((40, 40, 3), flat, np.uint8)
    original[8:32, 8:32] = dark
    original[10:30, 10:30] = (255, 0, 0)
    old, new = square(40, 10, 20), square(40, 13, 14)
    places = Vacated(torch.from_numpy(old)[None, None], torch.from_numpy(new)[None, None],
                     (20, 20), (20, 20), 0.7)  # fmt: skip
    strips, filled = fill_thin_vacated(original, places, 8)
    assert np.array_equal(strips, thin_vacated(old, new, 8))
    # Beside the new place the band came along (it lies inside the old place's grown edge, so
    # continuing the outside inward would give the flat colour there); at the old outline
    # the flat colour.
    beside = dilate(new, 1) & ~new
    assert (np.subtract(flat, filled[beside], dtype=int).sum(axis=1) > 100).all()  # darker
    outline = dilate(old, 1) & ~old
    assert (np.abs(filled[outline].astype(int) - flat) <= 12).all()
    # Something of another hue beside it is not its shadow: it stays where it was.
    other = original.copy()
    other[(original == dark).all(axis=-1)] = (30, 60, 200)  # a blue band instead of the shadow
    inward = fill_from_outside(other, dilate(old, 2), strips)
    assert np.array_equal(fill_thin_vacated(other, places, 8)[1][strips], inward[strips])
    # Moved far (a surroundings 20 px away, over twice the strips' width): only the inward fill.
    far = Vacated(places.old, places.new, (20, 20), (40, 20), 1.0)
    strips_far, filled_far = fill_thin_vacated(original, far, 8)
    inward = fill_from_outside(original, dilate(old, 2), strips_far)
    assert np.array_equal(filled_far[strips_far], inward[strips_far])


def test_carried_moves_and_scales_the_image_as_the_edit_moves_the_object():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    working = torch.zeros(1, 1, 20, 30, dtype=torch.bool)  # the output is twice the working size
    colours, shift, inside = Vacated(working, working, (5, 5), (8, 5), 1.0).carried(image)
    assert np.allclose(colours[:, 6:], image[:, :-6]) and np.allclose(shift, 6)
    assert not inside[:, :6].any() and inside[:, 6:].all()
    # Halved about (10, 10) (working px): no shift at that point, more with the distance from it.
    _, shift, inside = Vacated(working, working, (10, 10), (10, 10), 0.5).carried(image)
    assert shift[19:21, 19:21].max() < 1 and inside[19:21, 19:21].all()
    assert shift[0, 0] == pytest.approx(np.hypot(19.5, 19.5), rel=1e-6)
    assert not inside[0, 0]  # it came from (-19.5, -19.5): outside the image


def test_edit_keeps_the_background_by_default_changing_only_near_the_object(pipe, scene, inversion):
    img, mask = scene
    kw = dict(prompt="a red square", num_inference_steps=10, seed=7)
    plain = pipe.move(inversion, mask, (35, 45), (100, 45), keep_background=False, **kw)
    kept = pipe.move(inversion, mask, (35, 45), (100, 45), **kw)
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
    # Both ways round, without sampling again: the kept result holds the whole image.
    assert np.array_equal(np.asarray(kept.resynthesised), full)
    unkept = kept.without_background_kept()
    assert np.array_equal(np.asarray(unkept.image), full) and not unkept.record["keep_background"]
    assert plain.without_background_kept() is plain
    # Every pixel beyond the margin around the object's old and new places is the input's; the
    # margin is one feature cell of the working image, in output pixels.
    margin = kept.record["background_margin"]
    working = kept.record["working_size"]
    cell = working[1] / (2 * kept.latent.shape[-2])  # the energy grid is twice the latent's
    assert margin == default_margin(tuple(working), kept.image.size, cell) >= 1
    # Its thin vacated strips (two cells wide at most) are filled from the input's surroundings.
    assert kept.record["thin_vacated"] == 2 * margin and kept.vacated is not None
    before, after = kept.vacated.at(kept.image.size)
    strips = thin_vacated(before, after, 2 * margin)
    filled = fill_from_outside(np.asarray(img), dilate(before, 2))
    assert np.array_equal(out[strips], filled[strips])
    alpha = background_alpha(kept.region, kept.image.size, margin)
    assert np.array_equal(out[alpha == 0], img[alpha == 0]) and (alpha == 0).mean() > 0.5
    assert kept.region.shape[-2:] == (working[1], working[0])
    # Another margin from the plain result, or from the kept one (its whole image, not its
    # composite: the same pixels either way).
    wider = plain.with_background_kept(margin=margin + 8)
    assert wider.record["background_margin"] == margin + 8
    wide = background_alpha(kept.region, kept.image.size, margin + 8)
    assert (wide > 0).sum() > (alpha > 0).sum()
    assert not np.array_equal(np.asarray(wider.image), out)
    rekept = kept.with_background_kept(margin=margin + 8)
    assert np.array_equal(np.asarray(rekept.image), np.asarray(wider.image))
    assert rekept.record["background_margin"] == margin + 8
    with pytest.raises(InputError, match="background_margin must be a whole number"):
        plain.with_background_kept(margin=-2)
    bare = type(plain)(plain.image, plain.latent, dict(plain.record))
    with pytest.raises(InputError, match="no edit region"):
        bare.with_background_kept()
    # Round trips: un-keeping and keeping again gives the kept image; a plain result made by
    # hand (no `resynthesised`) keeps its whole image through with_background_kept.
    again = kept.without_background_kept().with_background_kept()
    assert np.array_equal(np.asarray(again.image), out) and again.record == kept.record
    hand = type(plain)(plain.image, plain.latent, dict(plain.record), plain.region, plain.original)
    back = hand.with_background_kept().without_background_kept()
    assert np.array_equal(np.asarray(back.image), full) and not back.record["keep_background"]
    edge = plain.with_background_kept(margin=0)  # the region's pixels only
    zero = background_alpha(kept.region, kept.image.size, 0)
    assert np.array_equal(np.asarray(edge.image)[zero == 0], img[zero == 0])
    assert np.array_equal(np.asarray(edge.image)[zero == 1], full[zero == 1])
    # A kept result without its whole image (made by hand) can neither re-keep nor un-keep.
    partial = type(kept)(kept.image, kept.latent, dict(kept.record), kept.region, kept.original)
    with pytest.raises(InputError, match="no edit region and re-synthesised image"):
        partial.with_background_kept(margin=margin + 8)
    with pytest.raises(InputError, match="does not hold its re-synthesised image"):
        partial.without_background_kept()


def test_cli_keeps_the_background_unless_told_not_to(tmp_path, scene, tiny_bundle, capsys):
    img, mask = scene
    PIL.Image.fromarray(img).save(tmp_path / "in.png")
    PIL.Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    args = [
        "move", "--model", str(tiny_bundle), "--image", str(tmp_path / "in.png"),
        "--mask", str(tmp_path / "mask.png"), "--from", "35,45", "--to", "100,50",
        "--steps", "4", "--device", "cpu", "--quiet", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    assert read_record(out)["keep_background"] is True
    with PIL.Image.open(out) as im:
        default = np.asarray(im.convert("RGB")).copy()
    assert main([*args, "--keep-background"]) == 0  # the same, said
    with PIL.Image.open(out) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), default)
    assert main([*args, "--no-keep-background"]) == 0
    assert read_record(out)["keep_background"] is False
    with PIL.Image.open(out) as im:
        assert not np.array_equal(np.asarray(im.convert("RGB"))[:, 140:], img[:, 140:])
    assert main([*args, "--background-margin", "9"]) == 0
    assert read_record(out)["background_margin"] == 9
    # Without the flag the CLI leaves the choice to EditOptions' default.
    parse = cli.build_parser().parse_args
    assert "keep_background" not in cli.edit_options(parse(cli.joined_values(args)))
    said = cli.edit_options(
        parse(cli.joined_values([*args, "--keep-background", "--background-margin", "9"]))
    )
    assert said["keep_background"] is True and said["background_margin"] == 9
    assert main([*args, "--no-keep-background", "--background-margin", "9"]) == 2
    assert "leave out --no-keep-background or the margin" in capsys.readouterr().err
    # Refused before the model loads (a model that does not exist is never looked at).
    unloadable = [a if a != str(tiny_bundle) else str(tmp_path / "no-model") for a in args]
    assert main([*unloadable, "--background-margin", "-1"]) == 2
    assert "--background-margin must be a whole number of pixels ≥ 0" in capsys.readouterr().err
    with PIL.Image.open(out) as im:
        assert np.array_equal(np.asarray(im.convert("RGB"))[:, 140:], img[:, 140:])
