import numpy as np
import pytest
import torch

from dragondiffusion.errors import InputError
from dragondiffusion.geometry import (
    mask_to_grid,
    moved_region,
    require_nonempty,
    scale_point,
    scaled_mask,
    warp,
    working_size,
)


def test_working_size_area_and_multiples():
    assert working_size(512, 512, 512, 64) == (512, 512)
    # upstream's example: a 1024×768 photo at 768 area becomes 896×640
    assert working_size(1024, 768, 768, 64) == (896, 640)
    assert working_size(600, 400, 256, 64) == (320, 192)
    assert working_size(600, 400, 128, 64) == (128, 128)  # 64-multiples are coarse at 128
    assert working_size(10, 1000, 128, 64) == (64, 1280)
    with pytest.raises(InputError):
        working_size(0, 10, 128, 64)


def test_scale_point_keeps_axes():
    assert scale_point((100, 50), (200, 100), (400, 100)) == (200, 50)


def dot(h, w, y, x):
    m = torch.zeros(1, 1, h, w)
    m[..., y, x] = 1
    return m


def test_warp_identity_and_integer_shift():
    x = torch.arange(48.0).view(1, 1, 6, 8)
    assert torch.equal(warp(x, (64, 48), (10, 10), (10, 10)), x)
    # image 64×48 on an 8×6 grid: 8 px per cell; +16 px in x is +2 cells
    moved = warp(x, (64, 48), (0, 0), (16, 0))
    assert torch.equal(moved[..., 2:], x[..., :-2])
    assert torch.equal(moved[..., :2], torch.zeros(1, 1, 6, 2))


def test_warp_never_wraps_around():
    x = dot(4, 4, 1, 3)  # a dot at the right edge
    moved = warp(x, (4, 4), (0, 0), (1, 0))
    assert moved.sum() == 0, "content pushed past the border must vanish, not reappear left"


def test_warp_half_cell_shift_moves_every_cell_the_same_way():
    x = torch.arange(1.0, 9.0).view(1, 1, 1, 8)
    moved = warp(x, (32, 4), (0, 0), (2, 0))  # 4 px per cell: a half-cell shift
    nonzero = moved[moved != 0]
    assert len(torch.unique(nonzero)) == len(nonzero), "no cell duplicated"
    assert len(nonzero) >= 7


def test_warp_landscape_uses_each_axis_own_scale():
    # 160×96 image on a 20×12 grid (8 px per cell); move 80 px right, 24 px down
    x = dot(12, 20, 2, 3)
    moved = warp(x, (160, 96), (0, 0), (80, 24))
    assert moved[0, 0].nonzero().tolist() == [[2 + 3, 3 + 10]]


def test_warp_same_offset_on_every_grid():
    # the same physical move on the latent grid and the twice-finer energy grid
    coarse = warp(dot(12, 20, 4, 4), (160, 96), (0, 0), (32, 16))
    fine = warp(dot(24, 40, 8, 8), (160, 96), (0, 0), (32, 16))
    assert coarse[0, 0].nonzero().tolist() == [[6, 8]]
    assert fine[0, 0].nonzero().tolist() == [[12, 16]]


def test_warp_scale_about_source_point():
    m = torch.zeros(1, 1, 16, 16)
    m[..., 6:10, 6:10] = 1  # 4×4 square centred at pixel 8
    big = warp(m, (16, 16), (8, 8), (8, 8), scale=2.0)
    assert big.sum() == 64 and big[..., 4:12, 4:12].all()
    small = warp(m, (16, 16), (8, 8), (8, 8), scale=0.5)
    assert small.sum() == 4 and small[..., 7:9, 7:9].all()
    with pytest.raises(InputError):
        warp(m, (16, 16), (8, 8), (8, 8), scale=0)


def test_warp_bilinear_matches_nearest_on_integer_shifts():
    x = torch.randn(1, 3, 6, 8)
    a = warp(x, (64, 48), (0, 0), (8, 16), mode="bilinear")
    b = warp(x, (64, 48), (0, 0), (8, 16), mode="nearest")
    assert torch.allclose(a, b, atol=1e-5)


def test_mask_to_grid_half_coverage_and_empty_error():
    m = torch.zeros(1, 1, 8, 8)
    m[..., 0:4, 0:2] = 1  # covers exactly half of the top-left 4×4 cell
    assert mask_to_grid(m, (2, 2))[0, 0].tolist() == [[True, False], [False, False]]
    m[..., 0:4, 0:1] = 0
    with pytest.raises(InputError, match="empty on the 2×2 grid; draw"):
        require_nonempty(mask_to_grid(m, (2, 2)), "the mask", "draw a larger one")


def test_one_dilation_for_arrays_and_tensors():
    from dragondiffusion.geometry import dilate, grow

    mask = np.zeros((9, 9), bool)
    mask[4, 4] = mask[0, 8] = True
    grown = dilate(mask, 1)
    assert grown.sum() == 9 + 4  # a full 3×3 square, and one clipped at the corner
    assert grown[3:6, 3:6].all() and grown[0:2, 7:9].all() and not grown[6:, :3].any()
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    assert torch.equal(grow(tensor, 1)[0, 0] > 0, torch.from_numpy(grown))
    assert grow(tensor, 0) is tensor and np.array_equal(dilate(mask, 0), mask)


def test_moved_region_shift_is_the_grid_masks_warp_without_a_cover_and_in_pixels_with_one():
    mask = torch.zeros(1, 1, 64, 96)
    mask[..., 10:30, 13:41] = 1  # cells of 4 px: partly covered edges
    grid, size = (16, 24), (96, 64)
    on_grid = warp(mask_to_grid(mask, grid).float(), size, (20, 20), (50, 31)) > 0.5
    assert torch.equal(moved_region(mask, grid, size, (20, 20), (50, 31), 1.0), on_grid)
    # In pixels: y 21-40, x 43-70; edge cells covered 1/4 (x 40-43, y 40-43) and 3/4, so
    # corner cells 1/16, 3/16 (under a fifth) and 9/16.
    for cover, rows, columns, cells in ((0.2, 6, 8, 45), (0.5, 5, 7, 35), (0.9, 4, 6, 24)):
        moved = moved_region(mask, grid, size, (20, 20), (50, 31), 1.0, cover)
        assert moved[0, 0].any(dim=1).sum() == rows and moved[0, 0].any(dim=0).sum() == columns
        assert int(moved.sum()) == cells


def test_moved_region_scales_in_pixels_and_takes_cells_by_cover():
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1  # 32 px: 4 × 4 cells of 8 px
    grid, size, centre = (8, 8), (64, 64), (32, 32)
    assert torch.equal(scaled_mask(mask, size, centre, centre, 0.5)[0, 0].nonzero().amin(0),
                       torch.tensor([24, 24]))  # fmt: skip
    half = moved_region(mask, grid, size, centre, centre, 0.5)
    assert half[0, 0, 3:5, 3:5].all() and int(half.sum()) == 4
    # 1.25: 40 px, rims half a cell wide, corner cells a quarter covered
    assert int(moved_region(mask, grid, size, centre, centre, 1.25, 0.5).sum()) == 6 * 6 - 4
    assert int(moved_region(mask, grid, size, centre, centre, 1.25, 0.2).sum()) == 6 * 6
    assert int(moved_region(mask, grid, size, centre, centre, 1.25, 0.6).sum()) == 4 * 4
    with pytest.raises(ValueError, match="cover must be positive"):
        moved_region(mask, grid, size, centre, centre, 1.25, 0.0)


def test_moved_region_clips_at_the_border():
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 40:60] = 1
    region = moved_region(mask, (8, 8), (64, 64), (50, 32), (60, 32), 1.5)
    assert region[0, 0, :, -1].any() and not region[0, 0, :, :3].any()  # nothing wraps round
