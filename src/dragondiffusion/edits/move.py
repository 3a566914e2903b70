"""Object moving and resizing (upstream §3.1).

The object (mask m_gud) is moved so that the handle point lands on the target point and scaled by
`scale` about the handle. Deliberate deviations from upstream, each because upstream's choice
breaks for ordinary input: the scale is about the handle, not the image centre (so resizing does not
also move the object); moving is a clipped warp, not a wrap-around roll, and a move that pushes more
than half of the object out of the image is refused; the reference features are warped onto the
target cell by cell instead of pairing two masks in raster order (identical when nothing is
clipped, still aligned when the object is partly pushed out); a resize scales the object mask in
pixels before putting it on each grid (`moved_region`: on the grid a small object's mask hardly
changed size), and on the latent grid a move or resize takes every cell the moved object covers
by a fifth (`LATENT_COVER`; a moved object keeps its size better); and an empty vacated region
(an in-place enlargement) drops the contrast and inpainting terms instead of producing NaN.
A resize is this edit with a scale other than 1: its plan (and record) is named "resize", and a
model may tune it apart from a move (`edit_defaults.FOLLOWS`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..attention import BankMode
from ..composite import Vacated
from ..energy import contrast_energy, global_similarity, inverse_energy, local_similarity
from ..errors import require_share
from ..features import energy_grid
from ..geometry import (
    LATENT_COVER,
    Point,
    Size,
    latent_cells,
    mask_to_grid,
    moved_region,
    require_latent_cells,
    require_nonempty,
    require_visible,
    scaled_mask,
    warp,
)
from ..inversion import Inversion
from ..sampler import EditPlan, scaled_step


def move_kind(scale: float) -> str:
    """The edit a move with this scale is, for its plan, record and model defaults: "move" at
    scale 1, else "resize"."""
    return "move" if scale == 1 else "resize"


VACATED_NOISE_STREAM = 0x5EED
"""Offset of the seed of the vacated area's noise from the edit's seed, which the sampler's
regional SDE draws from: the two must not be the same numbers."""


@dataclass(frozen=True)
class MoveWeights:
    """Upstream demo defaults for moving: CFG 4, E_scale 0.5·10³, k 0.08, weights 4/6/0.2/0.8."""

    guidance_scale: float = 4.0
    energy_scale: float = 500.0
    k: float = 0.08
    w_edit: float = 4.0
    w_content: float = 6.0
    w_contrast: float = 0.2
    w_inpaint: float = 0.8
    blend_background: float = 0.0  # not upstream: see sampler.EditPlan
    feature_timestep: float = 0.0  # not upstream: see sampler.EditPlan
    feature_substeps: float = 1.0  # not upstream: see sampler.EditPlan
    vacated_noise: float = 0.0
    """Not upstream: share of fresh Gaussian noise in the start latent where the object was and
    no longer is, z = √(1−s)·z_T + √s·ε (0 keeps the object's inverted noise there, which
    tends to regrow it; 1 replaces it)."""


@dataclass(frozen=True)
class MoveMasks:
    """Boolean (1, 1, H, W) masks on the energy grid."""

    target: torch.Tensor  # m_gen: where the object goes
    other: torch.Tensor  # m_share: neither the old nor the new place
    vacated: torch.Tensor  # old place not covered by the new one (may be empty)
    reference: torch.Tensor  # what the vacated area should look like


def move_masks(
    mask: torch.Tensor,
    size: Size,
    grid: tuple[int, int],
    src: Point,
    dst: Point,
    scale: float,
    reference_region: torch.Tensor | None,
) -> MoveMasks:
    """The energy masks of a move on `grid`, from the object mask at working size (1, 1, H, W)."""
    original = require_nonempty(
        mask_to_grid(mask, grid), "the object mask", "draw a larger object mask"
    )
    target = moved_region(mask, grid, size, src, dst, scale)
    require_visible(target, original, scale, "the moved object")
    other = require_nonempty(
        ~(original | target),
        "the area outside the object",
        "the object covers the whole image; draw a smaller mask or move it less",
    )
    reference = other
    if reference_region is not None:
        reference = require_nonempty(
            mask_to_grid(reference_region, grid),
            "the reference region",
            "draw a larger reference region or leave it out",
        )
    return MoveMasks(target, other, original & ~target, reference)


def plan_move(
    inversion: Inversion,
    mask: torch.Tensor,
    src: Point,
    dst: Point,
    scale: float = 1.0,
    reference_region: torch.Tensor | None = None,
    weights: MoveWeights | None = None,
    seed: int = 0,
) -> EditPlan:
    """Build the move plan; `mask`/`reference_region` are (1, 1, H, W) at working size, points in
    working-image pixels; `seed` draws the vacated area's fresh noise (weights.vacated_noise).
    `reference_region` says what the vacated area should look like, so an edit that vacates
    nothing (an enlargement in place) has no use for it: it is checked, then unused."""
    w = weights or MoveWeights()
    size = inversion.working_size
    z_T = inversion.latents[-1][:1]
    latent_hw = tuple(z_T.shape[-2:])
    masks = move_masks(mask, size, energy_grid(latent_hw), src, dst, scale, reference_region)
    vacated = bool(masks.vacated.any())

    def energy(current: list[torch.Tensor], reference: list[torch.Tensor]):
        e_edit = e_content = 0.0
        for f, g in zip(current, reference, strict=True):
            g_moved = warp(g, size, src, dst, scale)
            e_edit = e_edit + inverse_energy(
                0.5 * w.w_edit, local_similarity(f, g_moved, masks.target)
            )
            e_content = e_content + inverse_energy(
                0.5 * w.w_content, local_similarity(f, g, masks.other)
            )
            if vacated:
                e_content = e_content + contrast_energy(
                    0.5 * w.w_contrast, local_similarity(f, g, masks.vacated, remapped=True)
                )
                e_content = e_content + inverse_energy(
                    w.w_inpaint,
                    global_similarity(f, masks.vacated, g, masks.reference, remapped=True),
                )
        return e_edit.sum(), e_content.sum()

    # The object's inverted noise is copied to its new place (the latent warped whole cells at a
    # time, nearest; the target cells come from the mask moved in pixels, so at a shift of a
    # fraction of a cell one rim row or column may take the noise of a cell beside the object).
    object_latent = latent_cells(
        mask, latent_hw, "the object mask on the latent grid", LATENT_COVER
    ).to(z_T.dtype)
    target_latent = require_latent_cells(
        moved_region(mask, latent_hw, size, src, dst, scale, LATENT_COVER),
        "the moved object on the latent grid",
        LATENT_COVER,
    )
    z_init = torch.where(target_latent, warp(z_T, size, src, dst, scale), z_T)
    require_share("vacated_noise", w.vacated_noise, "of the noise")
    if w.vacated_noise > 0:
        vacated_latent = object_latent.bool() & ~target_latent
        # Its own stream: the sampler's generator (seeded with `seed`) draws the SDE's noise.
        stream = torch.Generator().manual_seed((seed + VACATED_NOISE_STREAM) % 2**63)
        noise = torch.randn(z_T.shape, generator=stream)
        fresh = (1 - w.vacated_noise) ** 0.5 * z_T + w.vacated_noise**0.5 * noise.to(z_T)
        z_init = torch.where(vacated_latent, fresh, z_init)
    n = inversion.num_steps
    moved = scaled_mask(mask, size, src, dst, scale)
    return EditPlan(
        edit=move_kind(scale),
        z_init=z_init,
        energy=energy,
        edit_mask=target_latent.to(z_T.dtype),
        bank_mode=BankMode.REPLACE,
        bank_steps=range(scaled_step(5, n), n),
        guidance_scale=w.guidance_scale,
        energy_scale=w.energy_scale,
        k=w.k,
        blend_background=w.blend_background,
        feature_timestep=w.feature_timestep,
        feature_substeps=w.feature_substeps,
        sde_mask=target_latent | object_latent.bool(),
        region=mask.bool() | moved,
        vacated=Vacated(mask.bool(), moved, src, dst, scale),
        params={"scale": scale, "weights": asdict(w)},
    )
