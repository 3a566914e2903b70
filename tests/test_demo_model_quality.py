"""Quality of the trained embedded model on held-out scenes (slow; needs the bundle in the package).

Thresholds sit a little below what was measured on these subsets (2026-11-27, the bundle of
UNet step 14847; docs/demo-model.md has the same measurements on more scenes), so a worse model
fails. Strict xfails record what misses 1 cell (the coarse feature block alone: no energy
compares it alone; both blocks summed read at t = 741 itself, which the edits no longer do) and
turn red once it is met.
"""

import numpy as np
import PIL.Image
import pytest

from dragondiffusion import scenes
from dragondiffusion.edit_defaults import WEIGHTS
from dragondiffusion.model_report import (
    as_array,
    correspondence_at_level,
    energy_blocks,
    feature_levels,
    inversion_round_trip,
    mean,
    mean_correspondence,
    named_colours,
    named_shapes,
    named_share,
    psnr,
    vae_round_trip,
)
from dragondiffusion.models import EMBEDDED_MODEL

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (EMBEDDED_MODEL / "model_index.json").is_file(),
        reason="no embedded demo model in src/dragondiffusion/demo_model yet",
    ),
]

SEEDS = range(8)  # held out: training scenes use seeds ≥ TRAIN_SEED_FLOOR


def scene_image(seed: int, size: int) -> tuple[PIL.Image.Image, str]:
    scene = scenes.random_scene(seed, size)
    return PIL.Image.fromarray(scenes.render(scene)[0]), scenes.caption(scene)


def test_vae_reconstructs_held_out_scenes(embedded):
    images = [scene_image(s, embedded.native_resolution)[0] for s in SEEDS]
    values = [psnr(as_array(vae_round_trip(embedded, im)), as_array(im)) for im in images]
    assert mean(values) >= 31.0, values  # measured 31.7 (target 30)


def test_inversion_round_trip_with_the_bank_reconstructs(embedded):
    values = []
    for seed in SEEDS[:2]:
        image, caption = scene_image(seed, embedded.native_resolution)
        out = inversion_round_trip(embedded, image, caption, steps=50)["bank"]
        values.append(psnr(as_array(out), as_array(image)))
    assert mean(values) >= 30.0, values  # measured 31.1 (target 25)


@pytest.fixture(scope="module")
def correspondence(embedded):
    return mean_correspondence(embedded, SEEDS, timestep=261)


def test_decoder_features_find_shifted_objects(correspondence):
    assert all(np.isfinite(list(correspondence.values())))
    assert correspondence["up_blocks[2]"] <= 0.3, correspondence  # measured 0.12 cells
    assert correspondence["up_blocks[1]"] <= 1.45, correspondence  # measured 1.29 cells
    together = correspondence["up_blocks[1]+up_blocks[2]"]
    assert together <= 0.65, correspondence  # measured 0.54 cells of the finer grid


def test_what_each_energy_compares_finds_shifted_objects_within_one_cell(embedded, correspondence):
    compared = energy_blocks(embedded)  # move: the finer block; the others: both together
    assert set(compared) == {"up_blocks[2]", "up_blocks[1]+up_blocks[2]"}, compared
    assert max(correspondence[key] for key in compared) <= 1.0, correspondence


@pytest.mark.xfail(
    strict=True,
    reason="the coarse 8x8 block alone misses by 1.29 cells (> 1); no energy compares it alone "
    "(appearance, drag and paste add its cosines to the finer block's)",
)
def test_the_coarse_block_alone_within_one_cell(correspondence):
    assert correspondence["up_blocks[1]"] <= 1.0, correspondence


@pytest.fixture(scope="module")
def on_inversions(embedded):
    """The same check on each image's own 50-step DDIM inversion (what the energies compare),
    at DIFT's t = 261 and two guided noise levels."""
    kept: dict = {}
    return {
        t: mean_correspondence(embedded, SEEDS, t, latents="inverted", cache=kept)
        for t in (261, 501, 741)
    }


def test_on_inverted_latents_what_each_energy_compares_is_within_one_cell_to_t_501(
    embedded, on_inversions
):
    compared = energy_blocks(embedded)
    # Measured on these 8 scenes: t = 261: 0.12 / 0.54 cells (finer block / both summed);
    # t = 501: 0.25 / 0.62 (with fresh noise instead: 0.65 / 1.17 on 16 scenes).
    assert on_inversions[261]["up_blocks[2]"] <= 0.3, on_inversions
    assert on_inversions[501]["up_blocks[2]"] <= 0.4, on_inversions
    assert on_inversions[501]["up_blocks[1]+up_blocks[2]"] <= 0.8, on_inversions
    for t in (261, 501):
        assert max(on_inversions[t][key] for key in compared) <= 1.0, (t, on_inversions)


def test_on_inverted_latents_moves_block_is_within_one_cell_at_t_741(on_inversions):
    assert on_inversions[741]["up_blocks[2]"] <= 0.8, on_inversions  # measured 0.61


@pytest.mark.xfail(
    strict=True,
    reason="read at t = 741 itself the two blocks summed miss by 1.34 cells on these scenes "
    "(1.49 on 16): the reason the embedded model's edits read their features at t = 501 at "
    "every noisier guided step (feature_timestep; the tests below)",
)
def test_on_inverted_latents_both_blocks_summed_within_one_cell_at_t_741(on_inversions):
    assert on_inversions[741]["up_blocks[1]+up_blocks[2]"] <= 1.0, on_inversions


@pytest.fixture(scope="module")
def level_inversions():
    return {}  # each scene's inversion, shared by the levels' fixtures


@pytest.fixture(scope="module")
def read_at_level(embedded, level_inversions):
    """As the energies read them: the step's latent brought to the model's level from t, in
    the substeps of the edits that compare each block (move: one; the others: two)."""
    levels = feature_levels(embedded)
    assert levels == {501: [e for e in WEIGHTS if e != "resize"], 741: ["resize"]}, levels
    found, steps = correspondence_at_level(
        embedded, SEEDS, (981, 941, 901, 741), 501, levels[501], cache=level_inversions
    )
    assert steps["up_blocks[2]"] == 1 and steps["up_blocks[1]+up_blocks[2]"] == 2, steps
    return found


def test_read_at_the_level_what_each_energy_compares_is_within_one_cell_at_every_guided_step(
    embedded, read_at_level
):
    # Measured on these 8 scenes (move's finer block in one step / both summed in two):
    # t = 981: 0.60 / 0.81; 941: 0.48 / 0.78; 901: 0.34 / 0.74; 741: 0.25 / 0.64 (16 scenes:
    # 981: 0.51 / 0.92; 901: 0.29 / 0.88; summed in one step, the earlier default, 981: 1.20).
    compared = energy_blocks(embedded)
    for t in (981, 941, 901, 741):
        assert read_at_level[t]["up_blocks[2]"] <= 0.7, (t, read_at_level)
        assert read_at_level[t]["up_blocks[1]+up_blocks[2]"] <= 0.9, (t, read_at_level)
        assert max(read_at_level[t][key] for key in compared) <= 1.0, (t, read_at_level)


def test_a_resize_reads_moves_block_within_one_cell_at_its_level(embedded, level_inversions):
    # A resize reads move's block at t = 741. Measured on these 8 scenes: t = 981 0.55, 941
    # 0.54, 901 0.53 cells (16 scenes: 0.81 and 0.78 at 981 and 901; read at each step's own
    # level, as before: 1.68 and 1.43).
    found, steps = correspondence_at_level(
        embedded, SEEDS, (981, 941, 901), 741, ["resize"], cache=level_inversions
    )
    assert steps == {"up_blocks[2]": 1}, steps
    for t in (981, 941, 901):
        assert found[t]["up_blocks[2]"] <= 0.7, (t, found)


def test_text_to_image_shows_the_named_colour(embedded):
    found = named_colours(embedded, seeds=(0, 1), steps=50)
    # measured 19 of 20 (a pink circle's second seed showed no object colour); chance 1 in 10
    assert named_share(found) >= 0.85, found


def test_text_to_image_draws_the_named_shape_more_often_than_chance(embedded):
    found = named_shapes(embedded, seeds=(0, 1), steps=50)
    # measured 11 of 16 (squares come out round, stars as crosses; chance 1 in 8)
    assert named_share(found) >= 0.6, found
