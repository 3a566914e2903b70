"""Masks and points on the image, the feature grid and the latent grid.

Every position is given in pixels of the *working image* (the resized input the model sees) and
mapped to a grid by that grid's own scale, so latents, energy masks and features are always moved by
the same physical offset (upstream scaled the latent offset differently from the mask offset).
Content moved past a border is clipped, never wrapped around (upstream used `torch.roll`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

LATENT_COVER = 0.2
"""A latent cell that an object covers by at least this share is the object's in a move, resize
or paste: its noise is copied to the new place, the cell gets the edit energy's gradient, and a
move gives fresh noise only to the cells the object left that it covers less. The energy grid
keeps the half rule (`mask_to_grid`'s default). Resize, first 16 scenes of the quality benchmark,
size error (|log₂| of the area ratio): 0.30 at 0.2, 0.32 at 0.35, 0.44 at 0.5, 0.48 for any cover
(> 0); the mask scaled on the latent grid: 0.39. A small object's side is about 3 latent cells,
so at 0.5 its partly covered rim gets fresh noise and it shrinks too far, and at 0 the rim keeps
the object's noise and it hardly shrinks. For shifts (50 move scenes, against the half rule):
size error 0.52 → 0.32, placement 0.55 → 0.51 cells, vacated area 35.0 → 35.2 dB; 50 paste
scenes: found 43 either way, size error 0.59 → 0.49. A shift and a scale of 0.98 now take the
same cells (the half rule for shifts left a seam at scale 1). The noise is still warped a whole
cell at a time, so at a shift of a fraction of a cell one rim row or column of the target may
take a neighbouring cell's noise."""

Point = tuple[float, float]
Size = tuple[int, int]  # (width, height)


def grow(mask: torch.Tensor, margin: int) -> torch.Tensor:
    """A (…, H, W) float 0/1 mask grown by `margin` cells in every direction (a square
    neighbourhood); the same tensor when `margin` ≤ 0."""
    if margin <= 0:
        return mask
    return F.max_pool2d(mask, 2 * margin + 1, stride=1, padding=margin)


def dilate(mask: np.ndarray, margin: int) -> np.ndarray:
    """A (H, W) bool mask grown by `margin` pixels in every direction (a square neighbourhood)."""
    grown = grow(torch.from_numpy(mask.astype(np.float32))[None, None], margin)
    return grown[0, 0].numpy() > 0


def working_size(width: int, height: int, resolution: int, multiple: int) -> Size:
    """Size with area ≈ resolution², the input's aspect ratio, and sides multiples of `multiple`."""
    if width <= 0 or height <= 0:
        raise InputError(f"image has size {width}×{height}; give a non-empty image")
    k = math.sqrt(resolution * resolution / (width * height))
    side = lambda s: max(multiple, round(s * k / multiple) * multiple)  # noqa: E731
    return side(width), side(height)


def scale_point(point: Point, from_size: Size, to_size: Size) -> Point:
    """A point in pixels of an image of `from_size` expressed in pixels of one of `to_size`."""
    return point[0] * to_size[0] / from_size[0], point[1] * to_size[1] / from_size[1]


def source_coords(
    grid: tuple[int, int], image_size: Size, src: Point, dst: Point, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each cell of an (h, w) grid, the continuous (x, y) grid position it is copied from.

    The transform maps an image point p to dst + scale·(p − src): `src` lands on `dst` and the
    content is scaled about it. Positions are in grid cells, cell centres at integers.
    """
    h, w = grid
    width, height = image_size
    u = (torch.arange(w, dtype=torch.float64) + 0.5) * width / w
    v = (torch.arange(h, dtype=torch.float64) + 0.5) * height / h
    px = src[0] + (u - dst[0]) / scale
    py = src[1] + (v - dst[1]) / scale
    return px * w / width - 0.5, py * h / height - 0.5


def warp(
    x: torch.Tensor,
    image_size: Size,
    src: Point,
    dst: Point,
    scale: float = 1.0,
    mode: str = "nearest",
) -> torch.Tensor:
    """Move and scale the content of `x` (B, C, h, w) so image point `src` lands on `dst`.

    `scale` is about `src`. Cells whose source lies outside the grid become zero (no wrap-around).
    "nearest" rounds half-cells the same way everywhere, so a mask and a feature map warped with the
    same arguments stay cell-for-cell aligned.
    """
    if scale <= 0:
        raise InputError(f"scale must be positive, got {scale}")
    h, w = x.shape[-2:]
    cx, cy = source_coords((h, w), image_size, src, dst, scale)
    if mode == "nearest":
        ix = torch.floor(cx + 0.5).long()
        iy = torch.floor(cy + 0.5).long()
        valid = ((iy >= 0) & (iy < h))[:, None] & ((ix >= 0) & (ix < w))[None, :]
        out = x[..., iy.clamp(0, h - 1)[:, None], ix.clamp(0, w - 1)[None, :]]
        return out * valid.to(device=x.device, dtype=x.dtype)
    if mode == "bilinear":
        gx = (cx + 0.5) * 2 / w - 1
        gy = (cy + 0.5) * 2 / h - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)
        grid = grid.to(device=x.device, dtype=x.dtype).expand(x.shape[0], h, w, 2)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    raise ValueError(f"unknown warp mode {mode!r}")


def mask_to_grid(mask: torch.Tensor, grid: tuple[int, int], cover: float = 0.5) -> torch.Tensor:
    """A boolean (B, 1, h, w) mask: the cells the full-size `mask` covers by at least `cover`
    (> 0; half by default)."""
    if cover <= 0:
        raise ValueError(f"cover must be positive, got {cover}")
    m = mask.float()
    if tuple(m.shape[-2:]) == tuple(grid):
        return m > 0.5
    return F.interpolate(m, size=grid, mode="area") >= cover


def scaled_mask(
    mask: torch.Tensor, size: Size, src: Point, dst: Point, scale: float
) -> torch.Tensor:
    """A full-resolution mask (1, 1, H, W) moved so `src` lands on `dst` and scaled by `scale`
    about it, in pixels: bool, same shape."""
    return warp(mask.float(), size, src, dst, scale) > 0.5


def moved_region(
    mask: torch.Tensor,
    grid: tuple[int, int],
    size: Size,
    src: Point,
    dst: Point,
    scale: float,
    cover: float | None = None,
) -> torch.Tensor:
    """The object mask (1, 1, H, W) at working size moved (and scaled) on `grid`, bool.

    With `cover` None (the energy grid): a shift (scale 1) moves the object's grid mask (cells at
    least half covered) on the grid, cell for cell as `warp` moves the features, so a mask and
    the features warped with it stay aligned; a resize scales the mask in pixels first
    (`scaled_mask`) and takes the cells it covers by at least half: scaled on a coarse grid, a
    mask a few cells wide hardly changes (3 cells at 0.8 stay 3), so a resize would not ask for a
    new size at all. The features are still scaled on the grid (nearest), so a rim cell of the
    scaled mask may take its reference feature from a cell the object covers only partly.
    With a `cover` (> 0; the latent grid, `LATENT_COVER`): shift or scale, the cells the object
    moved in pixels covers by at least that share.
    """
    if cover is None and scale == 1.0:
        return warp(mask_to_grid(mask, grid).float(), size, src, dst) > 0.5
    moved = scaled_mask(mask, size, src, dst, scale)
    return mask_to_grid(moved, grid, 0.5 if cover is None else cover)


def require_nonempty(mask: torch.Tensor, what: str, fix: str) -> torch.Tensor:
    """Return `mask` unchanged, or raise InputError when it selects nothing."""
    if not bool(mask.any()):
        h, w = mask.shape[-2:]
        raise InputError(f"{what} is empty on the {w}×{h} grid; {fix}")
    return mask


def require_latent_cells(mask: torch.Tensor, what: str, cover: float = 0.5) -> torch.Tensor:
    """Return a latent-grid mask (its cells covered by at least `cover`) unchanged, or raise
    InputError when it covers no latent cell.

    The energy grid is twice as fine as the latent grid, so a small region can pass the energy
    checks and still select no latent cell: its edit would silently do nothing.
    """
    return require_nonempty(
        mask,
        what,
        f"it covers less than {cover:.0%} of every latent cell (8 × 8 working pixels); draw a "
        "larger mask or use a higher --resolution",
    )


def latent_cells(
    mask: torch.Tensor, latent_hw: tuple[int, int], what: str, cover: float = 0.5
) -> torch.Tensor:
    """The latent cells the full-size `mask` covers by at least `cover`; InputError naming `what`
    and that cover when there are none (`require_latent_cells`)."""
    return require_latent_cells(mask_to_grid(mask, latent_hw, cover), what, cover)


def cell_of(point: Point, image_size: Size, grid: tuple[int, int]) -> tuple[int, int]:
    """The (x, y) cell of an (h, w) grid holding an image point, clamped per axis to the grid."""
    h, w = grid
    cx = min(max(int(point[0] * w / image_size[0]), 0), w - 1)
    cy = min(max(int(point[1] * h / image_size[1]), 0), h - 1)
    return cx, cy


def cell_centre(cell: tuple[int, int], image_size: Size, grid: tuple[int, int]) -> Point:
    """The image point at the centre of an (x, y) cell of an (h, w) grid."""
    h, w = grid
    return (cell[0] + 0.5) * image_size[0] / w, (cell[1] + 0.5) * image_size[1] / h


def patch(
    cell: tuple[int, int], grid: tuple[int, int], radius: int = 1, device=None
) -> torch.Tensor:
    """A boolean (1, 1, h, w) square of (2·radius+1)² cells around `cell`, clipped to the grid."""
    h, w = grid
    m = torch.zeros(1, 1, h, w, dtype=torch.bool, device=device)
    x, y = cell
    m[..., max(y - radius, 0) : y + radius + 1, max(x - radius, 0) : x + radius + 1] = True
    return m


def mask_centre(mask: torch.Tensor, image_size: Size) -> Point:
    """Centre of the bounding box of a (1, 1, h, w) mask, in image pixels."""
    h, w = mask.shape[-2:]
    ys, xs = mask[0, 0].nonzero(as_tuple=True)
    cx = (xs.min() + xs.max() + 1).item() / 2 * image_size[0] / w
    cy = (ys.min() + ys.max() + 1).item() / 2 * image_size[1] / h
    return cx, cy


def require_visible(target: torch.Tensor, original: torch.Tensor, scale: float, what: str) -> None:
    """Raise InputError when less than half of a moved/scaled region stays inside the image."""
    expected = float(original.sum()) * scale * scale
    if expected < 1 and not target.any():
        smallest = 1 / math.sqrt(max(1.0, float(original.sum())))
        raise InputError(
            f"{what} would shrink to less than one cell of the {target.shape[-1]}×"
            f"{target.shape[-2]} feature grid at scale {scale:g}; give a scale of at least "
            f"{smallest:.2g}"
        )
    visible = float(target.sum()) / expected
    if visible < 0.5:
        raise InputError(
            f"{what} would be {100 * (1 - visible):.0f}% outside the image; move it less far "
            "or scale it less"
        )
