"""Content dragging (upstream §3.3): handle points pull their content to target points.

Each handle→target pair compares a 3×3 patch of the energy grid (H/4) at the target with the
original features of the patch at the handle; a contrast term asks the old place to change, and
the content energy keeps everything outside the editable region. Deliberate deviations: points are
clamped against their own axis (upstream clamped x against the grid height), the reference patch is
aligned by a cell-exact shift instead of raster-order pairing, a target patch's cells whose
handle-side cell lies off the grid (a handle on the image's edge) are left out of the edit term
instead of comparing against zero features (a fixed similarity that no sampling could raise), and
a zero-length drag (handle and target in one cell) has no contrast term instead of a NaN.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..attention import BankMode
from ..energy import contrast_energy, inverse_energy, local_similarity
from ..errors import InputError
from ..features import energy_grid
from ..geometry import (
    Point,
    cell_centre,
    cell_of,
    grow,
    latent_cells,
    mask_to_grid,
    patch,
    require_nonempty,
    warp,
)
from ..inversion import Inversion
from ..sampler import EditPlan, scaled_step


@dataclass(frozen=True)
class DragWeights:
    """Upstream demo defaults: CFG 4, E_scale 2·10³, k 0.04, weights 4/6, contrast 0.2."""

    guidance_scale: float = 4.0
    energy_scale: float = 2000.0
    k: float = 0.04
    w_edit: float = 4.0
    w_content: float = 6.0
    w_inpaint: float = 0.2
    blend_background: float = 0.0  # not upstream: see sampler.EditPlan
    feature_timestep: float = 0.0  # not upstream: see sampler.EditPlan
    feature_substeps: float = 1.0  # not upstream: see sampler.EditPlan


@dataclass(frozen=True)
class DragPair:
    """One handle→target pair on a grid: cells, the centres of those cells, and the patches."""

    handle: tuple[int, int]
    target: tuple[int, int]
    src: Point
    dst: Point
    handle_patch: torch.Tensor
    target_patch: torch.Tensor
    landing: torch.Tensor
    """The target patch's cells that the shift from the handle fills: those whose handle-side
    cell lies on the grid (all nine, unless the handle is on the grid's edge)."""


def drag_pair(handle: Point, target: Point, size, grid: tuple[int, int], device) -> DragPair:
    """Snap a pair of working-image points to cells of `grid` and build their 3×3 patches."""
    h_cell, t_cell = cell_of(handle, size, grid), cell_of(target, size, grid)
    src, dst = cell_centre(h_cell, size, grid), cell_centre(t_cell, size, grid)
    target_patch = patch(t_cell, grid, device=device)
    on_grid = warp(torch.ones(1, 1, *grid, device=device), size, src, dst) > 0.5
    return DragPair(
        h_cell,
        t_cell,
        src,
        dst,
        patch(h_cell, grid, device=device),
        target_patch,
        target_patch & on_grid,
    )


def on_pixels(pairs: list[DragPair], hw: tuple[int, int]) -> torch.Tensor:
    """The pairs' handle and target patches (energy grid) as a (1, 1, H, W) bool mask at the
    working size: the points may lie up to a cell outside the editable region, and what is
    dragged lands on the target patch, so a kept background must not cover them."""
    cells = torch.zeros_like(pairs[0].handle_patch)
    for p in pairs:
        cells = cells | p.handle_patch | p.target_patch
    return F.interpolate(cells.float(), size=tuple(hw), mode="nearest") > 0.5


def require_points_inside(pairs: list[DragPair], editable: torch.Tensor) -> None:
    """InputError unless every handle and target cell lies in the editable region or within one
    cell of it. The content energy holds everything outside the region (and background blending
    resets it), so a point there cannot move: the edit would silently do nothing."""
    reach = grow(editable.float(), 1)[0, 0] > 0
    for n, pair in enumerate(pairs, start=1):
        for which, (x, y) in (("handle", pair.handle), ("target", pair.target)):
            if not bool(reach[y, x]):
                raise InputError(
                    f"the {which} of drag pair {n} lies outside the editable region, where "
                    "nothing may change; draw the region over every handle and target point"
                )


def plan_drag(
    inversion: Inversion,
    mask: torch.Tensor,
    points: list[tuple[Point, Point]],
    weights: DragWeights | None = None,
) -> EditPlan:
    """Build the drag plan: `mask` (1, 1, H, W) editable region at working size, points as
    (handle, target) pairs in working-image pixels."""
    w = weights or DragWeights()
    size = inversion.working_size
    z_T = inversion.latents[-1][:1]
    latent_hw = tuple(z_T.shape[-2:])
    grid = energy_grid(latent_hw)
    editable = require_nonempty(
        mask_to_grid(mask, grid), "the editable region", "draw a larger region"
    )
    outside = require_nonempty(
        ~editable,
        "the area outside the editable region",
        "the region covers the whole image; leave some of the image outside it",
    )
    if not points:
        raise InputError("no drag points given; give at least one handle→target pair")
    pairs = [drag_pair(h, t, size, grid, z_T.device) for h, t in points]
    require_points_inside(pairs, editable)

    def energy(current: list[torch.Tensor], reference: list[torch.Tensor]):
        e_edit = e_content = 0.0
        for f, g in zip(current, reference, strict=True):
            for p in pairs:
                g_moved = warp(g, size, p.src, p.dst)
                e_edit = e_edit + inverse_energy(
                    w.w_edit, local_similarity(f, g_moved, p.landing, remapped=True)
                )
                old_place = p.handle_patch & ~p.target_patch
                if bool(old_place.any()):
                    e_edit = e_edit + contrast_energy(
                        w.w_inpaint, local_similarity(f, g, old_place, remapped=True)
                    )
            e_content = e_content + inverse_energy(
                w.w_content, local_similarity(g, f, outside, remapped=True)
            )
        layers = len(current)
        return e_edit.sum() / (layers * len(pairs)), e_content.sum() / layers

    # z_T: each pair copies the 3×3 latent patch at the handle to the target (in pair order).
    z_init = z_T
    for handle, target in points:
        lp = drag_pair(handle, target, size, latent_hw, z_T.device)
        z_init = torch.where(lp.landing, warp(z_init, size, lp.src, lp.dst), z_init)
    editable_latent = latent_cells(mask, latent_hw, "the editable region on the latent grid")
    n = inversion.num_steps
    return EditPlan(
        edit="drag",
        z_init=z_init,
        energy=energy,
        edit_mask=editable_latent.to(z_T.dtype),
        bank_mode=BankMode.CONCAT,
        bank_steps=range(scaled_step(5, n), n),
        guidance_scale=w.guidance_scale,
        energy_scale=w.energy_scale,
        k=w.k,
        blend_background=w.blend_background,
        feature_timestep=w.feature_timestep,
        feature_substeps=w.feature_substeps,
        sde_mask=editable_latent,
        region=mask.bool() | on_pixels(pairs, mask.shape[-2:]),
        params={
            "cells": [[list(p.handle), list(p.target)] for p in pairs],
            "weights": asdict(w),
        },
    )
