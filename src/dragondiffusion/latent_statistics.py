"""Matching a region's latent statistics to another's (AdaIN on the latent; not upstream).

Appearance replacement's energy compares *mean-pooled* features: it asks the object to look like
the reference on average. A model with weak features (the embedded one) barely moves the object's
colour that way, because the inverted start latent keeps encoding the old look. Adaptive instance
normalisation (Huang & Belongie 2017) is the direct form of "take this look": standardise each
latent channel over the object's cells, then give it the reference object's mean and spread.

Paste has the same gap: the pasted object starts from the reference's inverted noise, but the
composite attention and the base image around it wash its colours out; matching its latent to the
reference object's restores them.

Applied to the latent after each of the last steps, at the reference's own inversion latent of
the same noise level: late enough that the object's shape has formed (earlier, the shift of the
mean grows the object into a blob), early enough that the steps after it re-draw the edges.
Cells partly covered by the object move by the share they are covered, so the edit follows the
object's outline, not the latent grid's; cells covered less than half are not part of the
statistics and take only the shift of the mean. The sampler blends the background back after the
match, so nothing outside the edit's region moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import require_share
from .geometry import latent_cells, mask_to_grid, require_latent_cells

EPS = 1e-6


def channel_statistics(z: torch.Tensor, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of `z` (1, C, h, w) over `cells` (1, 1, h, w) bool,
    each (1, C, 1, 1). One cell has spread 0."""
    values = z[0][:, cells[0, 0]]
    mean = values.mean(dim=1)
    spread = values.std(dim=1, unbiased=False)
    return mean[None, :, None, None], spread[None, :, None, None]


def match_statistics(
    z: torch.Tensor,
    cells: torch.Tensor,
    coverage: torch.Tensor,
    source: torch.Tensor,
    source_cells: torch.Tensor,
) -> torch.Tensor:
    """`z` with each channel renormalised to `source`'s statistics where `coverage` > 0.

    z, source: (1, C, h, w) latents; cells / source_cells: (1, 1, h, w) bool, the cells whose
    statistics are measured; coverage: (1, 1, h, w) in [0, 1], how far each cell moves to its
    renormalised value (0 keeps it exactly). Cells outside `cells` (covered less than half) only
    take the shift of the mean: standardising them by statistics they are not part of could
    multiply them without bound (a one-cell object has spread 0)."""
    mean, spread = channel_statistics(z, cells)
    source_mean, source_spread = channel_statistics(source, source_cells)
    standardised = (z - mean) / (spread + EPS) * source_spread + source_mean
    shifted = z + (source_mean - mean)
    renormalised = torch.where(cells, standardised, shifted)
    return z + coverage * (renormalised - z)


def object_cells(
    mask: torch.Tensor, latent_hw: tuple[int, int], min_cover: float, what: str
) -> torch.Tensor:
    """The latent cells `mask` covers by at least half, or by at least `min_cover` when it covers
    none by half; InputError when it covers none by `min_cover` either."""
    cells = mask_to_grid(mask, latent_hw)
    if cells.any() or min_cover >= 0.5:
        return require_latent_cells(cells, what)
    return latent_cells(mask, latent_hw, what, min_cover)


@dataclass(frozen=True)
class StatisticsMatch:
    """What the sampler renormalises, and from which step on.

    cells: the object's cells (at least half covered); coverage: the share of each cell the object
    covers; source_cells: the reference object's cells in the inversion's image `source`;
    first_step: the first step after which the match is applied (it is applied after every later
    step too, the last leaving the output latent; a share above 0 matches at least the last
    step)."""

    cells: torch.Tensor
    coverage: torch.Tensor
    source_cells: torch.Tensor
    first_step: int
    source: int = 1

    @classmethod
    def for_share(
        cls,
        mask: torch.Tensor,
        source_mask: torch.Tensor,
        latent_hw: tuple[int, int],
        share: float,
        num_steps: int,
        min_cover: float = 0.5,
    ) -> StatisticsMatch | None:
        """Match the object under `mask` to the one under `source_mask` (full-size (1, 1, H, W)
        masks) over the last `share` of `num_steps` steps; None when `share` is 0 (the
        `match_statistics` weight: InputError outside [0, 1]). The statistics come from the
        cells each object covers by at least half; an object that covers none by half (a small
        one, which an edit whose latent masks take cells by `min_cover` still accepts) uses the
        cells it covers by at least `min_cover`."""
        require_share("match_statistics", share, "of the steps")
        if share == 0:
            return None
        cells = object_cells(mask, latent_hw, min_cover, "the object mask")
        source_cells = object_cells(source_mask, latent_hw, min_cover, "the reference mask")
        coverage = F.interpolate(mask.float(), size=latent_hw, mode="area").clamp(0, 1)
        matched = max(1, round(share * num_steps))
        return cls(cells, coverage, source_cells, num_steps - matched)

    def apply(self, z: torch.Tensor, source_latents: torch.Tensor) -> torch.Tensor:
        """z (1, C, h, w) matched to image `source` of `source_latents` (the inversion's batch at
        z's noise level)."""
        source = source_latents[self.source : self.source + 1]
        return match_statistics(z, self.cells, self.coverage.to(z), source.to(z), self.source_cells)
