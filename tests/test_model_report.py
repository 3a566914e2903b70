"""The demo-model measurements on the tiny random bundle: shapes, ranges, exact values.

Random weights make poor pictures, so nothing here asserts quality; test_demo_model_quality.py
does that for the trained embedded model.
"""

import math

import numpy as np
import PIL.Image
import pytest
import torch

from dragondiffusion import model_report, scenes
from dragondiffusion.model_report import (
    best_matches,
    correspondence_errors,
    inversion_round_trip,
    measure,
    psnr,
    save_figure,
    shifted,
    text_to_image,
    vae_round_trip,
    write_report,
)


def test_psnr_is_infinite_for_equal_images_and_exact_for_a_known_error():
    a = np.random.default_rng(0).integers(20, 200, (8, 8, 3), dtype=np.uint8)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 10) == pytest.approx(10 * math.log10(255**2 / 100))  # MSE 100: 28.13 dB
    b = a.copy()
    b[0, 0, 0] += 255 - int(b[0, 0, 0])  # one channel of one pixel off
    mse = (255 - int(a[0, 0, 0])) ** 2 / a.size
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / mse))
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, a[:4])


def test_best_matches_finds_a_known_shift_exactly():
    f = torch.randn(16, 6, 7, generator=torch.Generator().manual_seed(0))
    g = torch.roll(f, shifts=(1, 2), dims=(1, 2))  # content moves 2 cells right and 1 down
    cells = torch.tensor([[x, y] for y in range(5) for x in range(5)])
    assert torch.equal(best_matches(f, g, cells), cells + torch.tensor([2, 1]))


def test_shifted_moves_every_object_and_keeps_the_background():
    scene = scenes.random_scene(3, n_objects=3)
    moved = shifted(scene, 5.0, -2.0)
    assert moved.background == scene.background
    for a, b in zip(scene.objects, moved.objects, strict=True):
        assert b.shape.centre == (a.shape.centre[0] + 5.0, a.shape.centre[1] - 2.0)
        assert (b.colour, b.texture, b.shape.size) == (a.colour, a.texture, a.shape.size)


def test_vae_round_trip_keeps_the_size(pipe):
    image = PIL.Image.fromarray(scenes.render(scenes.random_scene(0))[0])
    out = vae_round_trip(pipe, image)
    assert out.size == image.size and out.mode == "RGB"
    assert 0 < psnr(np.asarray(out), np.asarray(image)) < math.inf


def test_inversion_round_trip_gives_both_reconstructions(pipe):
    image = PIL.Image.fromarray(scenes.render(scenes.random_scene(1))[0])
    trips = inversion_round_trip(pipe, image, "a red circle", steps=3)
    assert set(trips) == {"plain", "bank"}
    for out in trips.values():
        assert out.size == image.size
        assert 0 < psnr(np.asarray(out), np.asarray(image)) < math.inf


def test_text_to_image_grid_shape(pipe):
    rows = text_to_image(pipe, ["a red circle on a blue floor", "a star"], seeds=(0,), steps=2)
    assert [len(r) for r in rows] == [1, 1]
    assert rows[0][0].size == (128, 128)


@pytest.mark.parametrize("timestep", [261, 741])
def test_correspondence_errors_are_finite_distances_in_cells(pipe, timestep):
    scene = scenes.random_scene(4)
    errors = correspondence_errors(pipe, scene, timestep=timestep)
    assert list(errors) == ["up_blocks[1]", "up_blocks[2]"]
    for block, side in (("up_blocks[1]", 8), ("up_blocks[2]", 16)):
        e = errors[block]
        assert e.ndim == 1 and len(e) > 0
        assert np.isfinite(e).all() and (e >= 0).all() and (e <= side * math.sqrt(2)).all()


def test_measure_and_write_report(pipe, tmp_path):
    photo = PIL.Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (90, 140, 3), dtype=np.uint8)
    )
    report = measure(
        pipe,
        {"noise": photo},
        scene_seeds=[0, 1],
        inversion_scenes=1,
        correspondence_seeds=[2],
        steps=2,
        captions=["a red circle on a blue floor"],
        sample_seeds=[0],
        timesteps=[261],
        log=lambda _: None,
    )
    assert set(report.vae_psnr) == {"scene 0", "scene 1", "photo noise"}
    assert set(report.inversion_psnr) == {"scene 0", "photo noise"}
    assert report.sizes["photo noise"] == (128, 64)  # ≈ its own area, sides multiples of 64
    values = [*report.vae_psnr.values()]
    values += [v for modes in report.inversion_psnr.values() for v in modes.values()]
    values += [*report.correspondence[261].values()]
    assert all(np.isfinite(values))
    assert report.feature_grids == {"up_blocks[1]": 8, "up_blocks[2]": 16}

    path = write_report(report, tmp_path / "docs")
    text = path.read_text()
    assert path == tmp_path / "docs" / "demo-model.md"
    assert "| VAE reconstruction PSNR, mean | 2 scenes |" in text
    assert "photo noise (128×64)" in text and "up_blocks[2] (16×16 cells)" in text
    for name in ("reconstruction", "samples"):
        figure = tmp_path / "docs" / "images" / f"demo-model-{name}.png"
        assert f"](images/demo-model-{name}.png)" in text
        assert figure.stat().st_size < model_report.MAX_FIGURE_BYTES
        with PIL.Image.open(figure) as im:
            im.verify()


def test_save_figure_fits_the_byte_limit(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    path = save_figure(PIL.Image.fromarray(noise), tmp_path / "f.png", limit=60_000)
    assert path.stat().st_size <= 60_000
    with PIL.Image.open(path) as im:
        assert im.width <= 400 and im.height == im.width
