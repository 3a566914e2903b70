"""Keeping the background: paste the input back outside the pixels an edit changes.

The method re-synthesises the whole image, so even pixels far from the edit pass through the VAE and
drift (a small model blurs them; SD 1.5 loses fine texture). With `keep_background` (the default)
the output is the input wherever the edit had no business changing it: beyond a margin around the
edit's region in pixels (`EditPlan.region`: the object's old and new places for move and resize, the
object for appearance, the editable region and the points' patches for drag, the pasted object for
paste). The first half of the margin is the edit's own, the second half a linear seam, and every
pixel farther than the margin is the input's own, exactly. The default margin is one feature cell of
the energies (4 working pixels for SD's 8-pixel latent cells), the precision the edit places things
with; a mask drawn tighter than the object's edge needs a wider one (its rim would stay where it
was). Effects the model adds beyond the margin (a shadow cast by a moved object) are lost; that is
the trade.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .errors import InputError, require_whole


def chessboard_distance(mask: np.ndarray) -> np.ndarray:
    """(H, W) float64: every pixel's distance to the nearest True pixel of `mask` in a square
    neighbourhood (max(|dx|, |dy|); inf where `mask` has none). Two raster passes with unit
    steps to all eight neighbours, exact for this distance, whatever its size."""
    h, w = mask.shape
    d = np.where(mask, 0.0, np.inf)
    steps = np.arange(w, dtype=np.float64)
    for rows, step in ((range(h), -1), (range(h - 1, -1, -1), 1)):
        for y in rows:
            if 0 <= y + step < h:  # the row already passed: straight above / below or diagonal
                near = d[y + step]
                near = np.minimum(
                    near, np.minimum(np.r_[np.inf, near[:-1]], np.r_[near[1:], np.inf])
                )
                np.minimum(d[y], near + 1, out=d[y])
            row = d[y] if step < 0 else d[y, ::-1]  # along the row, in the pass's direction
            row[:] = np.minimum.accumulate(row - steps) + steps
    return d


def background_alpha(region: torch.Tensor, size: tuple[int, int], margin: int) -> np.ndarray:
    """(H, W) float32 weight of the edited image at output `size` (W, H): 1 on `region` and up
    to margin // 2 pixels from it, falling linearly over the rest of the margin, 0 on every
    pixel farther than `margin` from it (distances in a square neighbourhood).

    region: (1, 1, h, w) bool at the working size; an output pixel belongs to it when its area
    overlaps the region (so a different output size never shrinks it)."""
    width, height = size
    inside = F.adaptive_max_pool2d(region.float().cpu(), (height, width))[0, 0].numpy() > 0
    inner = margin // 2
    # At distance d beyond `inner` the weight is the share of the dilations by inner … margin
    # that reach the pixel.
    d = np.maximum(chessboard_distance(inside), inner)
    alpha = np.clip((margin - d + 1) / (margin - inner + 1), 0.0, 1.0)
    return alpha.astype(np.float32)


def default_margin(working: tuple[int, int], output: tuple[int, int], cell: float) -> int:
    """One feature cell (`cell` working pixels) in pixels of an output of size `output`."""
    stretch = max(output[0] / working[0], output[1] / working[1])
    return max(1, round(cell * stretch))


def margin_given(margin: object, name: str = "background_margin") -> int:
    """A background margin given by the user: a whole number of pixels ≥ 0, else InputError
    naming it `name` (the option as the user wrote it)."""
    value = require_whole(name, margin)
    if value < 0:
        raise InputError(
            f"{name} must be a whole number of pixels ≥ 0, got {margin!r} "
            "(0: the edit's region exactly, no seam)"
        )
    return value


def keep_background(
    edited: PIL.Image.Image, original: PIL.Image.Image, region: torch.Tensor, margin: int
) -> PIL.Image.Image:
    """`edited` on `region` and within `margin` pixels of it (feathered), `original` (resized to
    the same size) beyond."""
    if edited.size != original.size:
        original = original.resize(edited.size, PIL.Image.LANCZOS)
    alpha = background_alpha(region, edited.size, margin)[..., None]
    new = np.asarray(edited.convert("RGB"), np.float32)
    old = np.asarray(original.convert("RGB"), np.float32)
    mixed = alpha * new + (1.0 - alpha) * old
    return PIL.Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8))
