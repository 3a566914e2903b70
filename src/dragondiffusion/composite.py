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

A move or resize also leaves thin strips of its old place uncovered (the ring a shrinking object
leaves, the slivers beside a short move), narrower than a latent cell: the model tends to keep
the object's old outline there. The kept background fills those pixels (`thin_vacated`: within
`THIN_VACATED_CELLS` feature cells of both the background and the object's new place) from the
input instead of the model's pixels (`fill_thin_vacated`): with the object's own surroundings
carried along with it (`Vacated.carried`: its contact shadow and shading move and scale with it)
where they come from nearby (at most the strips' width away, fading out by twice that: a
resize's, a short move's) and keep the hue of the background there (not another object beside
the old place), else with the input's surroundings continued inward (`fill_from_outside`: a long
move's surroundings come from elsewhere in the image).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .errors import InputError, require_whole
from .geometry import Point, dilate, warp

THIN_VACATED_CELLS = 2
"""A pixel a move or resize vacates counts as thin when its distances to the background and to
the object's new place add up to at most this many feature cells (measured on 50 move and 50
resize scenes against 1.5, 3 and 4: docs/benchmarks.md, "Filling the thin vacated strips")."""
SAME_HUE = 0.04
"""A colour carried into a thin vacated strip counts fully when its `chromaticity` is within this
L1 distance of the inward fill's, not at all beyond twice it (0.02-0.1 measured alike on 30
resize scenes: docs/benchmarks.md, "Thin strips: the object's surroundings carried along")."""
HUE_FLOOR = 8.0
"""Added to each channel (0-255) before `chromaticity`."""


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
    inside = at_size(region, size)
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


@dataclass(frozen=True)
class Vacated:
    """A move's or resize's object places, (1, 1, H, W) bool at the working size, and the move
    that takes the one to the other: `source` lands on `target` (working pixels) and the object
    is scaled by `scale` about it."""

    old: torch.Tensor
    new: torch.Tensor
    source: Point
    target: Point
    scale: float

    def at(self, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Both at output `size` (W, H): an output pixel belongs to a place it overlaps."""
        return at_size(self.old, size), at_size(self.new, size)

    def on_cpu(self) -> Vacated:
        """The same places and move, the masks on the CPU."""
        return replace(self, old=self.old.detach().cpu(), new=self.new.detach().cpu())

    def carried(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`image` ((H, W, 3) uint8 at the output size) moved and scaled as the edit moves the
        object (bilinear): (H, W, 3) float64 colours; (H, W) the distance in output pixels from
        each pixel to where its colour came from; (H, W) bool, whether that lies in the image."""
        h, w = image.shape[:2]
        working = (self.old.shape[-1], self.old.shape[-2])
        layers = torch.from_numpy(np.concatenate([image, np.ones((h, w, 1), np.uint8)], -1))
        moved = warp(layers.permute(2, 0, 1)[None].double(), working, self.source, self.target,
                     self.scale, mode="bilinear")[0].permute(1, 2, 0).numpy()  # fmt: skip
        # A pixel centre p (working pixels) takes its colour from source + (p − target) / scale.
        sx, sy = w / working[0], h / working[1]
        x = (np.arange(w) + 0.5) / sx
        y = (np.arange(h) + 0.5) / sy
        dx = (x - self.source[0] - (x - self.target[0]) / self.scale) * sx
        dy = (y - self.source[1] - (y - self.target[1]) / self.scale) * sy
        shift = np.hypot(dx[None, :], dy[:, None])
        return moved[..., :3], shift, moved[..., 3] > 1 - 1e-6


def at_size(mask: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the (1, 1, h, w) mask at `size` (W, H), every output pixel it overlaps."""
    width, height = size
    return F.adaptive_max_pool2d(mask.float().cpu(), (height, width))[0, 0].numpy() > 0


def thin_vacated(old: np.ndarray, new: np.ndarray, width: float) -> np.ndarray:
    """(H, W) bool: the pixels of the old place (grown by 1 px, its blended edge) that the new
    place does not cover and whose distances to the background beyond the old place and to the
    new place add up to at most `width` (square neighbourhoods): the strips too thin for the
    model to redraw."""
    grown = dilate(old, 1)
    to_background = chessboard_distance(~grown)
    return grown & ~new & (to_background + chessboard_distance(new) <= width)


def fill_thin_vacated(
    original: np.ndarray, vacated: Vacated, width: float
) -> tuple[np.ndarray, np.ndarray]:
    """The thin vacated strips of an output the size of `original` ((H, W, 3) uint8, the
    input at the output size), (H, W) bool, and their (H, W, 3) uint8 colours (valid on them):
    the input's surroundings carried along with the object (`Vacated.carried`) where they come
    from at most `width` pixels away and are of the hue of the input's surroundings continued
    inward (`fill_from_outside`; within `SAME_HUE`), blended linearly into those between once
    and twice either bound, those alone beyond (or where the carried colour would come from
    outside the image)."""
    before, after = vacated.at(original.shape[1::-1])
    strips = thin_vacated(before, after, width)
    if not strips.any():
        return strips, original.copy()
    inward = fill_from_outside(original, dilate(before, 2), strips).astype(np.float64)
    carried, shift, inside = vacated.carried(original)
    weight = np.clip(2.0 - shift / width, 0.0, 1.0) * inside
    # A shadow or shading darkens the background, keeping its hue; a colour of another hue is
    # something else near the old place (another object), which stays where it was.
    apart = np.abs(chromaticity(carried) - chromaticity(inward)).sum(axis=-1)
    weight *= np.clip(2.0 - apart / SAME_HUE, 0.0, 1.0)
    mixed = weight[..., None] * carried + (1.0 - weight[..., None]) * inward
    return strips, np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def chromaticity(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) each colour's share of its channels' sum, its hue and saturation without its
    brightness (after `HUE_FLOOR` is added to every channel, so near-black noise has none)."""
    lifted = rgb.astype(np.float64) + HUE_FLOOR
    return lifted / lifted.sum(axis=-1, keepdims=True)


def fill_from_outside(
    image: np.ndarray, hole: np.ndarray, needed: np.ndarray | None = None
) -> np.ndarray:
    """(H, W, 3) uint8: `image` with `hole` filled from outside inward, one ring of pixels at a
    time, each the mean of its already-known neighbours (of 8); untouched outside `hole`. With
    `needed` ((H, W) bool), the filling stops once those pixels are filled (the rest of the hole
    may stay unfilled): a thin strip needs a few rings, not the whole old place."""
    out = image.copy()
    if not hole.any() or hole.all():
        return out
    ys, xs = np.nonzero(hole)
    top, left = max(ys.min() - 1, 0), max(xs.min() - 1, 0)
    box = (slice(top, ys.max() + 2), slice(left, xs.max() + 2))
    values, known = image[box].astype(np.float64), ~hole[box]
    wanted = None if needed is None else needed[box]
    while not (known.all() if wanted is None else known[wanted].all()):
        total = neighbour_sum(values * known[..., None])
        count = neighbour_sum(known.astype(np.float64))
        front = ~known & (count > 0)
        if not front.any():  # a hole the box's known pixels cannot reach (none: it has a rim)
            break
        values[front] = total[front] / count[front][:, None]
        known = known | front
    out[box] = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return out


def neighbour_sum(values: np.ndarray) -> np.ndarray:
    """Each pixel's sum over its 3×3 neighbourhood (zero beyond the edges)."""
    h, w = values.shape[:2]
    padded = np.pad(values, [(1, 1), (1, 1)] + [(0, 0)] * (values.ndim - 2))
    return sum(padded[i : i + h, j : j + w] for i in range(3) for j in range(3))


def keep_background(
    edited: PIL.Image.Image,
    original: PIL.Image.Image,
    region: torch.Tensor,
    margin: int,
    vacated: Vacated | None = None,
    thin: float = 0.0,
) -> PIL.Image.Image:
    """`edited` on `region` and within `margin` pixels of it (feathered), `original` (resized to
    the same size) beyond; with `vacated`, the thin vacated strips (`thin_vacated`, `thin`
    output pixels) filled from the original (`fill_thin_vacated`)."""
    if edited.size != original.size:
        original = original.resize(edited.size, PIL.Image.LANCZOS)
    alpha = background_alpha(region, edited.size, margin)[..., None]
    new = np.asarray(edited.convert("RGB"), np.float32)
    old = np.asarray(original.convert("RGB"))
    mixed = np.clip(np.rint(alpha * new + (1.0 - alpha) * old), 0, 255).astype(np.uint8)
    if vacated is not None and thin > 0:
        strips, filled = fill_thin_vacated(old, vacated, thin)
        mixed[strips] = filled[strips]
    return PIL.Image.fromarray(mixed)
