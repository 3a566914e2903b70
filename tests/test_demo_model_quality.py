"""Quality of the trained embedded model on held-out scenes (slow; needs the bundle in the package).

Thresholds sit a little below what was measured on these subsets (2026-11-27, the bundle of
UNet step 14847; docs/demo-model.md has the same measurements on more scenes), so a worse model
fails. A strict xfail records what misses 1 cell without being a target (the coarse feature block
alone: no energy compares it alone) and turns red once it is met.
"""

import numpy as np
import PIL.Image
import pytest

from dragondiffusion import scenes
from dragondiffusion.model_report import (
    as_array,
    energy_blocks,
    inversion_round_trip,
    mean,
    mean_correspondence,
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
