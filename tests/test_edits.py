import numpy as np
import pytest
import torch

from dragondiffusion.attention import BankMode
from dragondiffusion.edits.appearance import plan_appearance
from dragondiffusion.edits.drag import drag_pair, plan_drag
from dragondiffusion.edits.paste import PasteWeights, plan_paste
from dragondiffusion.errors import InputError
from dragondiffusion.geometry import warp

SIZE = (192, 128)  # working size of the 160×96 `scene` fixture; latents 16×24, energy grid 32×48


def box(size, x0, y0, x1, y1):
    m = torch.zeros(1, 1, size[1], size[0])
    m[..., y0:y1, x0:x1] = 1
    return m


def test_drag_points_are_clamped_on_their_own_axis():
    """Upstream clamped x against the grid height: a bug on landscape images."""
    p = drag_pair((190, 60), (191, 127), SIZE, (32, 48), "cpu")
    assert p.handle == (47, 15) and p.target == (47, 31)
    assert p.target_patch[0, 0, 30:, 46:].all() and p.target_patch.sum() == 4  # clipped 3×3


def test_drag_copies_the_handle_latent_patch_and_keeps_the_rest(inversion):
    mask = box(SIZE, 0, 0, 192, 96)
    plan = plan_drag(inversion, mask, [((40, 40), (80, 40))])
    z_T = inversion.latents[-1]
    # 8 working px per latent cell: handle cell (5, 5) → target cell (10, 5)
    assert torch.equal(plan.z_init[..., 4:7, 9:12], z_T[..., 4:7, 4:7])
    assert torch.equal(plan.z_init[..., 4:7, :9], z_T[..., 4:7, :9])
    assert plan.params["cells"] == [[[10, 10], [20, 10]]]
    assert plan.bank_mode is BankMode.CONCAT and plan.bank_steps == range(1, 10)


def test_a_drag_from_the_edge_compares_only_cells_it_can_fill(inversion):
    """A handle on the grid's first column: a third of its target patch would read source cells
    off the grid (zero features, a fixed cosine of 0 that no sampling raises). Those cells are
    left out, so the exact answer, the handle's features shifted onto the target, reaches the
    edit term's minimum w_edit/(α+β) = 0.8 (+ 0.2 of contrast where the old place is unchanged)."""
    grid = (32, 48)
    edge = drag_pair((1, 40), (41, 40), SIZE, grid, "cpu")  # cell (0, 10) → (10, 10)
    assert edge.target_patch.sum() == 9 and edge.landing.sum() == 6
    assert not edge.landing[0, 0, 9:12, 9].any() and edge.landing[0, 0, 9:12, 10:12].all()
    inner = drag_pair((40, 40), (80, 40), SIZE, grid, "cpu")
    assert torch.equal(inner.landing, inner.target_patch)
    plan = plan_drag(inversion, box(SIZE, 0, 0, 192, 96), [((1, 40), (41, 40))])
    g = torch.randn(1, 4, *grid, generator=torch.Generator().manual_seed(0))
    f = torch.where(edge.landing, warp(g, SIZE, edge.src, edge.dst), g)
    e_edit, _ = plan.energy([f], [g])
    assert e_edit.item() == pytest.approx(0.8 + 0.2, abs=1e-5)


def test_zero_length_drag_and_empty_regions(inversion):
    mask = box(SIZE, 0, 0, 192, 96)
    plan = plan_drag(inversion, mask, [((40, 40), (41, 41))])
    feats = [torch.randn(1, 4, 32, 48) for _ in range(2)]
    e_edit, e_content = plan.energy(feats, feats)
    assert torch.isfinite(e_edit) and torch.isfinite(e_content)
    with pytest.raises(InputError, match="covers the whole image"):
        plan_drag(inversion, box(SIZE, 0, 0, 192, 128), [((40, 40), (80, 40))])
    with pytest.raises(InputError, match="no drag points"):
        plan_drag(inversion, mask, [])


def test_drag_points_outside_the_editable_region_are_refused(inversion):
    """Energy grid cells are 4 working px; a point one cell beyond the region is accepted."""
    region = box(SIZE, 32, 32, 96, 64)  # cells x 8-23, y 8-15
    plan_drag(inversion, region, [((40, 40), (99, 67))])  # target in cell (24, 16): one out
    with pytest.raises(InputError, match="the target of drag pair 2 lies outside"):
        plan_drag(inversion, region, [((40, 40), (80, 40)), ((40, 40), (150, 40))])
    with pytest.raises(InputError, match="the handle of drag pair 1 lies outside"):
        plan_drag(inversion, region, [((10, 10), (40, 40))])


def test_each_plan_names_the_pixels_it_may_change(inversion):
    """The region keep_background keeps the input around: a drag's also holds its handle and
    target patches (3×3 cells of 4 px), since a point may lie a cell outside the mask."""
    region = box(SIZE, 32, 32, 96, 64)
    plan = plan_drag(inversion, region, [((40, 40), (99, 67))])  # target cell (24, 16)
    assert plan.region.dtype == torch.bool and plan.region.shape == (1, 1, 128, 192)
    assert plan.region[0, 0, 32:64, 32:96].all()  # the editable region
    assert plan.region[0, 0, 60:72, 92:104].all()  # the target's patch, cells 23-25 × 15-17
    assert plan.region[0, 0, 72:, :].sum() == 0 and plan.region[0, 0, :, 104:].sum() == 0
    assert plan.region.sum() == 64 * 32 + 12 * 12 - 4 * 4  # the patch overlaps the box by 4×4


def test_paste_is_clipped_not_wrapped_and_copies_reference_noise(pipe, scene):
    img, _mask = scene
    inv = pipe.invert(img, "a scene", 4, reference=img[:, ::-1].copy())
    ref_mask = box(SIZE, 24, 40, 56, 72)
    plan = plan_paste(inv, ref_mask, (136, 0))  # object centre 40 → 176: 8 px past the edge
    assert plan.edit_mask[..., :, :10].sum() == 0, "nothing wraps to the left side"
    assert plan.edit_mask[..., :, -1].any()
    z_T = inv.latents[-1]
    assert torch.equal(plan.z_init[0, :, 5:9, 20:23], z_T[1, :, 5:9, 3:6])
    assert torch.equal(plan.z_init[0, :, :5], z_T[0, :, :5])
    with pytest.raises(InputError, match="outside the image"):
        plan_paste(inv, ref_mask, (180, 0))


def test_appearance_and_paste_name_the_object_and_the_pasted_object_in_pixels(pipe, scene):
    img, _mask = scene
    inv = pipe.invert(img, "a scene", 2, reference=img[:, ::-1].copy())
    mask, ref_mask = box(SIZE, 24, 40, 56, 72), box(SIZE, 100, 20, 140, 60)
    plan = plan_appearance(inv, mask, ref_mask)
    assert torch.equal(plan.region, mask.bool())
    pasted = plan_paste(inv, ref_mask, (-50, 30), 0.5).region  # 40 px → 20 px about its centre
    assert pasted.dtype == torch.bool and pasted.shape == (1, 1, 128, 192)
    assert pasted.sum() == 20 * 20 and pasted[0, 0, 60:80, 60:80].all()


@pytest.mark.parametrize(("scale", "side"), [(0.5, 2), (1.0, 4), (1.25, 6)])
def test_a_scaled_paste_covers_the_latent_cells_of_the_scaled_object(pipe, scene, scale, side):
    """A 32-px reference square on 8-px latent cells (4 × 4), pasted 64 px right: by 0.5 it
    covers 2 × 2 cells; by 1.25 (40 px) half of one more cell on each side and a quarter of each
    corner cell, which count at LATENT_COVER."""
    img, _mask = scene
    inv = pipe.invert(img, "a scene", 2, reference=img[:, ::-1].copy())
    plan = plan_paste(inv, box(SIZE, 32, 32, 64, 64), (64, 0), scale)
    assert int(plan.edit_mask.sum()) == side * side


def test_a_small_pasted_object_matches_statistics_on_the_cells_it_covers_by_a_fifth(pipe, scene):
    """A 6×6 px reference (x 36-41, y 40-45) covers latent cell (5, 4) by 24 of 64 px and no
    cell by half: paste takes it (LATENT_COVER), and so must its statistics match (review
    finding: it raised "less than 50 % of every latent cell" from the match instead)."""
    img, _mask = scene
    inv = pipe.invert(img, "a scene", 2, reference=img[:, ::-1].copy())
    weights = PasteWeights(match_statistics=0.2)
    plan = plan_paste(inv, box(SIZE, 36, 40, 42, 46), (64, 0), weights=weights)
    assert plan.statistics.source_cells[0, 0].nonzero().tolist() == [[5, 4]]
    assert plan.statistics.cells[0, 0].nonzero().tolist() == [[5, 12]]
    assert plan.edit_mask[0, 0].nonzero().tolist() == [[5, 12]]


@pytest.mark.parametrize("scale", [0.6, 1.0, 1.5])
def test_resizing_works_below_at_and_above_one(pipe, inversion, scene, scale):
    result = pipe.move(inversion, scene[1], (35, 45), (80, 48), scale=scale)
    assert result.record["scale"] == scale
    assert np.isfinite(np.asarray(result.image, dtype=float)).all()


def test_resize_that_no_longer_fits_is_a_clear_error(pipe, inversion, scene):
    with pytest.raises(InputError, match="outside the image"):
        pipe.move(inversion, scene[1], (35, 45), (35, 45), scale=6.0)


def test_appearance_drag_paste_end_to_end(pipe, scene):
    img, mask = scene
    ref = np.ascontiguousarray(img[::-1])
    ref_mask = np.ascontiguousarray(mask[::-1])
    kw = dict(num_inference_steps=6, seed=1)
    app = pipe.appearance(img, mask, ref, ref_mask, prompt="a square", **kw)
    assert app.record["edit"] == "appearance" and app.record["bank"]["mode"] == "composite"
    assert app.record["prompts"] == ["a square", "a square"]
    drag = pipe.drag(img, mask, [((35, 45), (45, 45)), ((30, 40), (30, 30))], **kw)
    assert drag.record["points"] == [[[35, 45], [45, 45]], [[30, 40], [30, 30]]]
    paste = pipe.paste(img, ref, ref_mask, offset=(60, 0), scale=0.8, **kw)
    assert paste.record["offset"] == [60, 0] and paste.record["scale"] == 0.8
    for r in (app, drag, paste):
        assert r.image.size == (160, 96)
        assert np.isfinite(np.asarray(r.image, dtype=float)).all()


def test_composite_bank_is_used_for_steps_0_to_35_of_50(pipe, scene):
    img, mask = scene
    bank = pipe.memory_bank
    bank.used, bank.log_use = [], True
    try:
        pipe.appearance(img, mask, img, mask, num_inference_steps=10)
    finally:
        bank.log_use = False
    assert sorted({s for _, s, m in bank.used if m == "composite"}) == list(range(7))


def test_inversion_with_wrong_image_count_is_refused(pipe, inversion, scene):
    with pytest.raises(InputError, match="inversion of 2 image"):
        pipe.appearance(inversion, scene[1], scene[0], scene[1])


# Hand values of each edit's energy terms when current and reference features are the same
# constant vector (every cosine is 1, so every raw similarity is 1 and every remapped one is 1;
# the energy grid is 32×48 and all regions stay inside it). Two feature layers each.
#   move:       E_edit = 2·0.5·4/(1+4)                     = 0.8
#               E_content = 2·[0.5·6/5 + 0.5·0.2·1 + 0.8/5] = 1.72   (content, contrast, inpaint)
#   drag:       E_edit = 2·(4/5 + 0.2·1) / (2·1 pair)      = 1.0    (edit + "inpaint" contrast)
#               E_content = 2·6/5 / 2                       = 1.2
#   appearance: E_edit = 2·3.5/5 = 1.4;  E_content = 2·5/5 = 2.0
#   paste:      E_edit = 2·4/5   = 1.6;  E_content = 2·6/5 = 2.4
def constant_features(batch: int) -> list[torch.Tensor]:
    return [torch.ones(batch, 3, 32, 48) for _ in range(2)]


def test_energy_weights_hand_values(pipe, inversion, scene):
    from dragondiffusion.edits.appearance import plan_appearance
    from dragondiffusion.edits.move import plan_move

    img, _ = scene
    obj = box(SIZE, 24, 40, 56, 72)
    one, two = constant_features(1), constant_features(2)
    cases = {
        "move": (plan_move(inversion, obj, (40, 56), (120, 56)).energy(one, one), (0.8, 1.72)),
        "drag": (
            plan_drag(inversion, box(SIZE, 0, 0, 192, 96), [((40, 40), (80, 40))]).energy(one, one),
            (1.0, 1.2),
        ),
    }
    inv2 = pipe.invert(img, "a scene", 4, reference=img[:, ::-1].copy())
    cases["appearance"] = (plan_appearance(inv2, obj, obj).energy(one, two), (1.4, 2.0))
    cases["paste"] = (plan_paste(inv2, obj, (60, 0)).energy(one, two), (1.6, 2.4))
    for edit, ((e_edit, e_content), expected) in cases.items():
        assert (e_edit.item(), e_content.item()) == pytest.approx(expected, abs=1e-5), edit
