import numpy as np
import pytest
import torch

from dragondiffusion.edits.move import MoveWeights, move_masks, plan_move
from dragondiffusion.errors import InputError
from dragondiffusion.features import energy_grid, upsample
from dragondiffusion.sampler import Evaluations, energy_gradient


def square_mask(size, box):
    w, h = size
    m = torch.zeros(1, 1, h, w)
    x0, y0, x1, y1 = box
    m[..., y0:y1, x0:x1] = 1
    return m


def centroid(mask):
    ys, xs = mask[0, 0].nonzero(as_tuple=True)
    return xs.float().mean().item(), ys.float().mean().item()


SIZE, GRID = (192, 128), (64, 96)  # a working size and a grid of 2 px per cell (h, w)
PLAN_GRID = (32, 48)  # the energy grid of the `inversion` fixture: latents 16×24, 4 px per cell


def test_no_wrap_around_when_pushed_past_the_border():
    mask = square_mask(SIZE, (150, 40, 182, 72))  # near the right edge
    m = move_masks(mask, SIZE, GRID, (166, 56), (186, 56), 1.0, None)
    assert m.target.sum() == 11 * 16, "10 of the object's 32 px columns must be clipped"
    assert not m.target[..., :40].any(), "nothing may reappear on the left side"
    assert m.target[..., -1].any()


def test_moving_entirely_out_is_a_clear_error():
    mask = square_mask(SIZE, (150, 40, 182, 72))
    with pytest.raises(InputError, match="outside the image"):
        move_masks(mask, SIZE, GRID, (166, 56), (400, 56), 1.0, None)


def test_in_place_enlargement_has_no_vacated_area_and_finite_energy(pipe, inversion):
    mask = square_mask(SIZE, (80, 48, 112, 80))
    m = move_masks(mask, SIZE, GRID, (96, 64), (96, 64), 1.5, None)
    assert not m.vacated.any()
    assert m.target.sum() == 24 * 24  # 16×16 cells scaled by 1.5
    plan = plan_move(inversion, mask, (96, 64), (96, 64), 1.5)
    feats = [torch.randn(1, 8, *PLAN_GRID) for _ in range(2)]
    e_edit, e_content = plan.energy(feats, feats)
    assert torch.isfinite(e_edit) and torch.isfinite(e_content)


def test_a_small_shrink_changes_the_masks_on_coarse_grids(inversion):
    """A resize scales the mask in pixels: a 24-px square scaled by 0.8 (19.2 px) loses its
    half-covered rim cells on the energy grid (4 px), leaving a vacated ring."""
    mask = square_mask(SIZE, (64, 40, 88, 64))
    m = move_masks(mask, SIZE, PLAN_GRID, (76, 52), (76, 52), 0.8, None)
    assert int(m.target.sum()) == 6 * 6 - 4  # 20 px after rounding: corners under half
    assert int(m.vacated.sum()) == 4 and not (m.vacated & m.target).any()


@pytest.mark.parametrize(("scale", "side"), [(0.5, 2), (1.25, 6)])
def test_a_resize_marks_latent_cells_by_how_much_the_scaled_object_covers(inversion, scale, side):
    """A 32-px square on 8-px latent cells (4 × 4), scaled about its centre: by 0.5 it covers 2 ×
    2 cells exactly; by 1.25 (40 px) half of one more cell on each side and a quarter of each
    corner cell: the corners count only because LATENT_COVER is below a quarter."""
    mask = square_mask(SIZE, (64, 32, 96, 64))
    plan = plan_move(inversion, mask, (80, 48), (80, 48), scale)
    assert int(plan.edit_mask.sum()) == side * side


def test_landscape_offsets_are_scaled_per_axis_and_equal_on_every_grid(inversion):
    """Latent masks, energy masks and the copied noise all move by the same physical offset."""
    mask = square_mask(SIZE, (24, 40, 56, 72))
    plan = plan_move(inversion, mask, (40, 56), (136, 88))
    masks = move_masks(mask, SIZE, PLAN_GRID, (40, 56), (136, 88), 1.0, None)
    cx, cy = centroid(masks.target)
    assert (cx + 0.5) * 4 == pytest.approx(136, abs=2)  # 4 working px per energy cell
    assert (cy + 0.5) * 4 == pytest.approx(88, abs=2)
    lx, ly = centroid(plan.edit_mask)
    assert (lx + 0.5) * 8 == pytest.approx(136, abs=4)  # 8 working px per latent cell
    assert (ly + 0.5) * 8 == pytest.approx(88, abs=4)
    z_T = inversion.latents[-1]
    # the noise at the target is the object's inverted noise from 96 px right, 32 px down
    assert torch.equal(plan.z_init[..., 9:11, 15:19], z_T[..., 5:7, 3:7])
    assert torch.equal(plan.z_init[..., 0:4, :], z_T[..., 0:4, :])


def test_regional_gradient_mask(pipe, inversion):
    mask = square_mask(SIZE, (24, 40, 56, 72))
    plan = plan_move(inversion, mask, (40, 56), (100, 56))
    z = inversion.at_step(1)
    t = 900
    text = inversion.text[:1]
    ref = upsample(pipe.features(z, t, text), energy_grid((16, 24)))
    counts = Evaluations()
    g = energy_gradient(pipe.features, plan, z + 0.1, t, text, ref, counts)
    assert counts.features == 1 and counts.backward == 2
    inside = plan.edit_mask.bool().expand_as(g)
    assert g[inside].abs().sum() > 0 and g[~inside].abs().sum() > 0
    plan.edit_mask = torch.ones_like(plan.edit_mask)
    only_edit = energy_gradient(pipe.features, plan, z + 0.1, t, text, ref, counts)
    assert torch.allclose(only_edit[inside], g[inside])


def test_move_end_to_end_counts_and_record(pipe, scene):
    img, mask = scene
    result = pipe.move(img, mask, (35, 45), (100, 45), prompt="a red square", seed=3, mode="dragon")
    assert result.image.size == (160, 96)
    assert np.isfinite(np.asarray(result.image, dtype=float)).all()
    rec = result.record
    # 50-step dragon schedule: 50 inversion passes; 50 CFG pairs; guidance at steps 0-29, each
    # one feature pass on the current latent (backpropagated once: the global gradient of the
    # edit and content energies) and one on the trajectory latent.
    assert rec["evaluations"] == {
        "inversion": 50,
        "denoise": 100,
        "features": 60,
        "backward": 30,
        "rollback": 0,
        "bring": 0,
        "forward": 210,
    }
    assert rec["schedule"]["guided"] == list(range(30)) and not rec["schedule"]["regional"]
    assert rec["schedule"]["sde"] == [] and rec["schedule"]["time_travel"] == []
    assert rec["schedule"]["background_blended"] == 0  # upstream's weights: no blending
    assert rec["bank"] == {"mode": "replace", "steps": [5, 50]}
    assert rec["from"] == [35, 45] and rec["to"] == [100, 45] and rec["scale"] == 1.0
    assert rec["weights"]["w_edit"] == 4.0 and rec["guidance_scale"] == 4.0
    assert rec["energy_scale"] == 500.0 and rec["k"] == 0.08
    assert rec["seed"] == 3 and rec["steps"] == 50 and rec["mode"] == "dragon"


def test_same_seed_same_output_and_inversion_reuse(pipe, scene, inversion):
    img, mask = scene
    kw = dict(prompt="a red square", num_inference_steps=10, seed=7)
    a = pipe.move(img, mask, (35, 45), (100, 60), **kw)
    b = pipe.move(inversion, mask, (35, 45), (100, 60), **kw)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    resized = pipe.move(inversion, mask, (35, 45), (100, 60), scale=1.2, **kw)
    assert not np.array_equal(np.asarray(a.image), np.asarray(resized.image))


def test_bank_is_replaced_only_from_step_5_of_50(pipe, scene, inversion):
    _img, mask = scene
    bank = pipe.memory_bank
    bank.used, bank.log_use = [], True
    try:
        pipe.move(inversion, mask, (35, 45), (100, 60), num_inference_steps=10)
    finally:
        bank.log_use = False
    steps = sorted({s for _, s, mode in bank.used if mode == "replace"})
    assert steps == list(range(1, 10))  # step 5 of 50 is step 1 of 10
    assert {layer for layer, _, _ in bank.used} == set(pipe.bank_layers)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(source=(35, 45), target=(500, 45)), "outside"),
        (dict(source=(35, 45), target=(100, 45), scale=0.0), "scale"),
        (dict(source=(35, 45), target=(100, 45), mask=np.zeros((96, 160), bool)), "empty"),
        (dict(source=(35, 45), target=(100, 45), mask=np.ones((50, 50), bool)), "same image"),
    ],
)
def test_bad_input_gets_a_clear_error(pipe, scene, inversion, kwargs, match):
    args = dict(mask=scene[1])
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        pipe.move(inversion, **args)


def test_object_smaller_than_a_latent_cell_is_a_clear_error_not_a_silent_no_op(pipe, inversion):
    """A 3×3 px object of the 160×96 input (3.6 px at the 192×128 working size) passes the
    energy-grid checks (about 0.6 of its best 4-px cell) but covers no latent cell by
    LATENT_COVER (about 0.15 of its best 8-px cell; review finding: the edit mask was all zeros
    and the move silently did nothing). A 5×5 px one at the working size (25 of a cell's 64 px)
    is an object the move can take."""
    mask = np.zeros((96, 160), bool)
    mask[40:43, 40:43] = True
    with pytest.raises(InputError, match=r"latent grid.*less than 20% of every latent cell"):
        pipe.move(inversion, mask, (41, 41), (100, 41))
    small = square_mask(SIZE, (40, 40, 45, 45))  # at the working size: latent cell (5, 5)
    plan = plan_move(inversion, small, (42, 42), (106, 42))
    assert plan.edit_mask[0, 0].nonzero().tolist() == [[5, 13]]


def test_a_shift_keeps_the_latent_cells_the_object_partly_covers(inversion):
    """A 20-px square at x 30-49 covers latent cells 3 and 6 (8 px each) by a quarter, 4 and 5
    fully: all four are the object's on the latent grid (LATENT_COVER), so its noise rim moves
    with it and the vacated cells are exactly the four it left. Rows y 39-71: latent row 4 is
    covered an eighth (not the object's), rows 5-8 fully. The energy grid keeps the half rule
    and moves its grid mask cell for cell: 4-px row 9 is covered a quarter (out), columns 7 and
    12 a half (in)."""
    mask = square_mask(SIZE, (30, 39, 50, 72))
    plan = plan_move(inversion, mask, (40, 56), (104, 56))  # 64 px = 8 latent cells right
    cells = plan.edit_mask[0, 0]
    assert cells.any(dim=0).nonzero().flatten().tolist() == [11, 12, 13, 14]
    assert cells.any(dim=1).nonzero().flatten().tolist() == [5, 6, 7, 8]
    z_T = inversion.latents[-1]
    assert torch.equal(plan.z_init[..., 5:9, 11], z_T[..., 5:9, 3])  # the rim's own noise
    left = (plan.sde_mask & ~plan.edit_mask.bool())[0, 0].any(dim=0).nonzero().flatten().tolist()
    assert left == [3, 4, 5, 6]
    masks = move_masks(mask, SIZE, PLAN_GRID, (40, 56), (104, 56), 1.0, None)
    assert masks.target[0, 0].any(dim=0).nonzero().flatten().tolist() == list(range(23, 29))
    assert masks.target[0, 0].any(dim=1).nonzero().flatten().tolist() == list(range(10, 18))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(resolution=-128), "resolution must be a positive"),
        (dict(resolution=0), "resolution must be a positive"),
        (dict(resolution=10), "resolution 10 px is below this model's smallest working size"),
        (dict(num_inference_steps=5000), "training timesteps"),
    ],
)
def test_bad_options_are_clear_errors_before_any_work(pipe, scene, kwargs, match):
    with pytest.raises(InputError, match=match):
        pipe.move(scene[0], scene[1], (35, 45), (100, 45), **kwargs)


def test_models_with_more_latent_channels_edit_end_to_end(tmp_path, scene):
    """The embedded model's VAE has 8 latent channels (SD 1.x: 4): nothing may assume 4."""
    import dragondiffusion
    from dragondiffusion.testing import build_tiny_bundle

    pipe8 = dragondiffusion.load(build_tiny_bundle(tmp_path / "eight", latent_channels=8))
    pipe8.set_progress_bar_config(disable=True)
    img, mask = scene
    inversion = pipe8.invert(img, "a red square", num_inference_steps=4)
    assert inversion.latents.shape[2] == 8
    result = pipe8.move(inversion, mask, (35, 45), (100, 45), num_inference_steps=4, seed=0)
    assert result.image.size == (160, 96)
    assert result.record["evaluations"]["backward"] > 0


def test_vacated_noise_replaces_the_start_latent_where_the_object_left_only(inversion):
    mask = square_mask(SIZE, (24, 40, 56, 72))  # latent cells x 3-6, y 5-8
    args = (inversion, mask, (40, 56), (100, 56), 1.0, None)
    kept = plan_move(*args)
    fresh = plan_move(*args, MoveWeights(vacated_noise=1.0), seed=5)
    half = plan_move(*args, MoveWeights(vacated_noise=0.5), seed=5)
    z_T = inversion.latents[-1][:1]
    vacated = (kept.sde_mask & ~kept.edit_mask.bool()).expand_as(z_T)
    assert vacated[0, 0, 5:9, 3:7].all() and vacated.sum() == 4 * 16
    assert torch.equal(kept.z_init[vacated], z_T[vacated])  # upstream: the object's own noise
    assert torch.equal(fresh.z_init[~vacated], kept.z_init[~vacated])
    assert not torch.allclose(fresh.z_init[vacated], z_T[vacated], atol=0.1)
    mixed = 0.5**0.5 * z_T[vacated] + 0.5**0.5 * fresh.z_init[vacated]
    assert torch.allclose(half.z_init[vacated], mixed, atol=1e-6)
    other_seed = plan_move(*args, MoveWeights(vacated_noise=1.0), seed=6)
    assert not torch.equal(other_seed.z_init[vacated], fresh.z_init[vacated])
    assert torch.equal(
        plan_move(*args, MoveWeights(vacated_noise=1.0), seed=5).z_init, fresh.z_init
    )


def test_vacated_noise_is_not_the_noise_the_regional_sde_draws_and_is_checked(inversion):
    """The sampler's generator, seeded with the edit's seed, draws the SDE's noise; the vacated
    area's noise must come from another stream, or the SDE would push along the start noise."""
    mask = square_mask(SIZE, (24, 40, 56, 72))
    args = (inversion, mask, (40, 56), (100, 56), 1.0, None)
    plan = plan_move(*args, MoveWeights(vacated_noise=1.0), seed=42)
    vacated = (plan.sde_mask & ~plan.edit_mask.bool()).expand_as(plan.z_init)
    sde_noise = torch.randn(plan.z_init.shape, generator=torch.Generator().manual_seed(42))
    assert not torch.allclose(plan.z_init[vacated], sde_noise[vacated], atol=0.1)
    for bad in (1.5, -0.5, float("nan")):
        with pytest.raises(InputError, match="vacated_noise must lie in"):
            plan_move(*args, MoveWeights(vacated_noise=bad))


def test_the_record_counts_the_blended_steps(pipe, inversion, scene):
    weights = MoveWeights(blend_background=0.5, vacated_noise=1.0)
    result = pipe.move(inversion, scene[1], (35, 45), (100, 45), weights=weights)
    assert result.record["schedule"]["background_blended"] == inversion.num_steps // 2
    assert result.record["weights"]["vacated_noise"] == 1.0


def test_the_public_move_scales_points_per_axis_for_masks_and_noise_alike(
    pipe, scene, inversion, monkeypatch
):
    """Upstream's bug #1 through `pipe.move`: a 160×96 input works at 192×128 (×1.2 in x, ×4/3
    in y), so input points (40, 48) → (120, 48) are (48, 64) → (144, 64) at working size, a
    shift of 12 latent cells (8 px each); the object's inverted noise must land there, where
    its moved mask lands (upstream seeded z_T with the unscaled offsets)."""
    from dragondiffusion import pipeline as pipeline_module

    plans = []

    def spy(*args, **kwargs):
        plans.append((args, plan_move(*args, **kwargs)))
        return plans[-1][1]

    monkeypatch.setattr(pipeline_module, "plan_move", spy)
    pipe.move(inversion, scene[1], (40, 48), (120, 48))
    (args, plan) = plans[0]
    assert args[2] == pytest.approx((48.0, 64.0)) and args[3] == pytest.approx((144.0, 64.0))
    z_T = inversion.latents[-1][:1]
    # the square covers working x 24-60, y 40-80: latent cells x 3-7, y 5-9 (wholly inside)
    assert torch.equal(plan.z_init[..., 5:10, 15:19], z_T[..., 5:10, 3:7])
    assert plan.edit_mask[0, 0, 5:10, 15:19].all() and not plan.edit_mask[0, 0, :, :13].any()
