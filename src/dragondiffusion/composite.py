"""Keeping the background: paste the input back outside the region an edit changes.

The method re-synthesises the whole image, so even pixels far from the edit pass through the VAE
and drift (a small model blurs them; SD 1.5 loses fine texture). With `keep_background` the output
is the input wherever the edit had no business changing it: outside the edit's region (the
regional-SDE mask of the plan: the object's old and new places for move, the object for
appearance, the editable region for drag, the pasted region for paste), grown by one latent cell
and feathered over one more, so the seam falls in content the model has already matched to its
surroundings. Pixels beyond the feather are the input's own, exactly. Effects the model adds
outside the region (a shadow cast by a moved object) are lost; that is the trade.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .geometry import grow


def background_alpha(region: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 weight of the edited image at output `size` (W, H): 1 on the region grown
    by one cell of its grid, falling linearly to 0 over one more cell, 0 beyond.

    region: (1, 1, h, w) bool on a grid covering the image (the latent grid)."""
    width, height = size
    h, w = region.shape[-2:]
    cell = max(1, round(max(height / h, width / w)))
    mask = F.interpolate(region.float().cpu(), size=(height, width), mode="nearest")
    grown = grow(mask, cell)
    # A box filter of 2·cell+1 on the grown mask is 1 inside it, 0 beyond one more cell.
    feather = F.avg_pool2d(
        F.pad(grown, (cell, cell, cell, cell), mode="replicate"), 2 * cell + 1, stride=1
    )
    alpha = torch.maximum(grown, feather).clamp(0, 1)
    return alpha[0, 0].numpy().astype(np.float32)


def keep_background(
    edited: PIL.Image.Image, original: PIL.Image.Image, region: torch.Tensor
) -> PIL.Image.Image:
    """`edited` inside the grown, feathered `region`, `original` (same size) outside it."""
    if edited.size != original.size:
        original = original.resize(edited.size, PIL.Image.LANCZOS)
    alpha = background_alpha(region, edited.size)[..., None]
    new = np.asarray(edited.convert("RGB"), np.float32)
    old = np.asarray(original.convert("RGB"), np.float32)
    mixed = alpha * new + (1.0 - alpha) * old
    return PIL.Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8))
