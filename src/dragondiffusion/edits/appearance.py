"""Appearance replacement (upstream §3.2): the base object takes the look of a reference object.

The base and reference images are inverted together. The edit energy compares *mean-pooled*
features (global similarity), so the object keeps its shape and takes the reference's colour and
texture; the memory bank is a composite of base tokens outside the base mask and reference tokens
inside the reference mask for steps 0–35 of 50. Optionally (`match_statistics`, not upstream) the
object's latent takes the reference object's statistics over the last steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..attention import BankMode
from ..energy import global_similarity, inverse_energy, local_similarity
from ..features import energy_grid
from ..geometry import latent_cells, mask_to_grid, require_nonempty
from ..inversion import Inversion
from ..latent_statistics import StatisticsMatch
from ..sampler import EditPlan, scaled_step


@dataclass(frozen=True)
class AppearanceWeights:
    """Upstream demo defaults: CFG 5, E_scale 2·10³, k 0.04, w_edit 3.5, w_content 5."""

    guidance_scale: float = 5.0
    energy_scale: float = 2000.0
    k: float = 0.04
    w_edit: float = 3.5
    w_content: float = 5.0
    blend_background: float = 0.0  # not upstream: see sampler.EditPlan
    feature_timestep: float = 0.0  # not upstream: see sampler.EditPlan
    feature_substeps: float = 1.0  # not upstream: see sampler.EditPlan
    match_statistics: float = 0.0
    """Not upstream: share of the steps, from the last, after each of which the object's latent
    takes the reference object's per-channel mean and spread at the same noise level (AdaIN on
    the latent; `latent_statistics`). 0 never (upstream's mean-feature energy alone)."""


def plan_appearance(
    inversion: Inversion,
    mask: torch.Tensor,
    reference_mask: torch.Tensor,
    weights: AppearanceWeights | None = None,
) -> EditPlan:
    """Build the plan from a two-image inversion [base, reference] and (1, 1, H, W) masks at
    working size."""
    w = weights or AppearanceWeights()
    z_T = inversion.latents[-1][:1]
    latent_hw = tuple(z_T.shape[-2:])
    grid = energy_grid(latent_hw)
    base = require_nonempty(mask_to_grid(mask, grid), "the object mask", "draw a larger mask")
    ref = require_nonempty(
        mask_to_grid(reference_mask, grid), "the reference mask", "draw a larger mask"
    )
    outside = require_nonempty(
        ~base, "the area outside the object", "the mask covers the whole image; draw a smaller one"
    )

    def energy(current: list[torch.Tensor], reference: list[torch.Tensor]):
        e_edit = e_content = 0.0
        for f, g in zip(current, reference, strict=True):
            g_base, g_ref = g[:1], g[1:2]
            e_content = e_content + inverse_energy(
                w.w_content, local_similarity(f, g_base, outside, remapped=True)
            )
            e_edit = e_edit + inverse_energy(
                w.w_edit, global_similarity(f, base, g_ref, ref, remapped=True)
            )
        return e_edit.sum(), e_content.sum()

    base_latent = latent_cells(mask, latent_hw, "the object mask on the latent grid")
    statistics = StatisticsMatch.for_share(
        mask, reference_mask, latent_hw, w.match_statistics, inversion.num_steps
    )
    return EditPlan(
        edit="appearance",
        z_init=z_T,
        energy=energy,
        edit_mask=base_latent.to(z_T.dtype),
        bank_mode=BankMode.COMPOSITE,
        bank_steps=range(scaled_step(36, inversion.num_steps)),
        guidance_scale=w.guidance_scale,
        energy_scale=w.energy_scale,
        k=w.k,
        blend_background=w.blend_background,
        feature_timestep=w.feature_timestep,
        feature_substeps=w.feature_substeps,
        sde_mask=base_latent,
        region=mask.bool(),
        composite_masks=(mask, reference_mask),
        statistics=statistics,
        params={"weights": asdict(w)},
    )
