"""Object pasting (upstream §3.4): an object from a reference image is pasted into the base image.

The reference object is moved by `offset` and scaled by `scale` about its own centre (upstream
scaled about the image centre with a wrap-around roll and unscaled latent offsets); its inverted
noise is copied into z_T there, a local edit energy pulls the pasted region toward the reference
object's features, and the memory bank is a composite of base and reference tokens (steps 0–35).

Deviation: upstream scaled the reference *image* (nearest, about the image centre) before
inverting it. Here the reference is inverted as it is and its z_T and features are warped
afterwards (nearest), and the bank composite reads the reference's own tokens inside its unscaled
mask, so one inversion serves every offset and scale. For scale > 1 this repeats noise cells of
z_T inside the pasted object (upstream's nearest scaling of the image did the same to pixels).
The pasted object's masks are the reference mask scaled in pixels, then put on each grid
(`geometry.moved_region`, as for a resize).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..attention import BankMode
from ..energy import inverse_energy, local_similarity
from ..features import energy_grid
from ..geometry import (
    LATENT_COVER,
    Point,
    latent_cells,
    mask_centre,
    mask_to_grid,
    moved_region,
    require_latent_cells,
    require_nonempty,
    require_visible,
    scaled_mask,
    warp,
)
from ..inversion import Inversion
from ..latent_statistics import StatisticsMatch
from ..sampler import EditPlan, scaled_step


@dataclass(frozen=True)
class PasteWeights:
    """Upstream demo defaults: CFG 4, E_scale 1.5·10³, k 0.04, w_edit 4, w_content 6."""

    guidance_scale: float = 4.0
    energy_scale: float = 1500.0
    k: float = 0.04
    w_edit: float = 4.0
    w_content: float = 6.0
    blend_background: float = 0.0  # not upstream: see sampler.EditPlan
    feature_timestep: float = 0.0  # not upstream: see sampler.EditPlan
    feature_substeps: float = 1.0  # not upstream: see sampler.EditPlan
    match_statistics: float = 0.0
    """Not upstream: share of the steps, from the last, after each of which the pasted object's
    latent takes the reference object's per-channel mean and spread at the same noise level (as
    for appearance; `latent_statistics`)."""


def plan_paste(
    inversion: Inversion,
    reference_mask: torch.Tensor,
    offset: Point,
    scale: float = 1.0,
    weights: PasteWeights | None = None,
) -> EditPlan:
    """Build the paste plan from a two-image inversion [base, reference]; `reference_mask`
    (1, 1, H, W) at working size, `offset` (dx, dy) in working-image pixels."""
    w = weights or PasteWeights()
    size = inversion.working_size
    z_T = inversion.latents[-1]
    latent_hw = tuple(z_T.shape[-2:])
    grid = energy_grid(latent_hw)
    ref = require_nonempty(
        mask_to_grid(reference_mask, grid), "the reference object mask", "draw a larger mask"
    )
    src = mask_centre(ref, size)
    dst = (src[0] + offset[0], src[1] + offset[1])
    pasted = moved_region(reference_mask, grid, size, src, dst, scale)
    require_visible(pasted, ref, scale, "the pasted object")
    outside = require_nonempty(
        ~pasted, "the area outside the pasted object", "paste a smaller object (lower --scale)"
    )

    def energy(current: list[torch.Tensor], reference: list[torch.Tensor]):
        e_edit = e_content = 0.0
        for f, g in zip(current, reference, strict=True):
            g_base, g_ref = g[:1], warp(g[1:2], size, src, dst, scale)
            e_content = e_content + inverse_energy(
                w.w_content, local_similarity(f, g_base, outside, remapped=True)
            )
            e_edit = e_edit + inverse_energy(
                w.w_edit, local_similarity(f, g_ref, pasted, remapped=True)
            )
        return e_edit.sum(), e_content.sum()

    # The reference object itself must cover latent cells: its noise is what gets copied.
    latent_cells(
        reference_mask, latent_hw, "the reference object mask on the latent grid", LATENT_COVER
    )
    pasted_latent = require_latent_cells(
        moved_region(reference_mask, latent_hw, size, src, dst, scale, LATENT_COVER),
        "the pasted object on the latent grid",
        LATENT_COVER,
    )
    z_init = torch.where(pasted_latent, warp(z_T[1:2], size, src, dst, scale), z_T[:1])
    pasted_full = scaled_mask(reference_mask, size, src, dst, scale)
    statistics = StatisticsMatch.for_share(
        pasted_full,
        reference_mask,
        latent_hw,
        w.match_statistics,
        inversion.num_steps,
        LATENT_COVER,
    )
    return EditPlan(
        edit="paste",
        z_init=z_init,
        energy=energy,
        edit_mask=pasted_latent.to(z_T.dtype),
        bank_mode=BankMode.COMPOSITE,
        bank_steps=range(scaled_step(36, inversion.num_steps)),
        guidance_scale=w.guidance_scale,
        energy_scale=w.energy_scale,
        k=w.k,
        blend_background=w.blend_background,
        feature_timestep=w.feature_timestep,
        feature_substeps=w.feature_substeps,
        sde_mask=pasted_latent,
        region=pasted_full,
        composite_masks=(pasted_full.float(), reference_mask),
        statistics=statistics,
        params={"scale": scale, "weights": asdict(w)},
    )
