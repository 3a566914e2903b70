"""`dragondiffusion bench quality`: every edit against its exact expected result.

Held-out procedural scenes (`cases`) are edited by the method (one row per sampler mode), by its
ablations (in the first mode), by a naive cut-paste-inpaint baseline (`baseline`) and by nobody
(identity: the input itself), and each output is compared with the scene generator's exact
expected image. One more row, exact, measures the expected image itself: what the measurements
read off a perfect edit (their own noise: segmentation edges, patch tracking); and another, vae,
the expected image after a round trip through the model's VAE: about the best a latent-diffusion
edit's whole re-synthesised image can do, since every pixel of it passes through the VAE (not a
strict bound; the method's rows keep the input's own pixels beyond the edit's region by default,
`Settings.keep_background`).
Rows: variant × edit; columns: the means over the scenes (NaN values, e.g. an empty vacated
area, are left out of a mean; an infinite PSNR makes the mean infinite):

- found: share of scenes where the edited object was segmented in the output (metrics.segment:
  the largest connected set of pixels of the object's expected colours), at least FOUND_SHARE of
  the expected object's size;
- size: |log₂(segmented object's area / expected object's area)|, 0 for the right size, 1 for
  double or half the area (NaN where not found): for resize, whether the size changed as asked
  (a signed ratio would average enlargements and reductions away); the exact row's is not quite
  0 (edge pixels blend with what lies behind the object);
- place px / place cells: move, resize, appearance, paste: the distance between the centroid of
  the segmented object and that of the expected object (NaN where not found); drag: the distance
  between where the handle's content is found in the output (metrics.track_point: the input's
  patch of one cell's radius around the handle, best match within 1.5 × the drag distance of
  the target) and the target. Cells are the energy grid's (`features.energy_grid`, 4 working
  pixels for SD-format models), measured in output pixels;
- obj PSNR / obj SSIM / hist: the expected object's pixels, output against expected: PSNR, mean
  SSIM map, and the total-variation distance of their colour histograms;
- bg PSNR / bg SSIM: every pixel farther than one feature cell from what the edit may change
  (old and new place, moved shadows, and for drag the editable region), output against
  expected (identical to the input there);
- vac PSNR / ghost (move, resize): the vacated area, the old place less the new one grown by
  1 px: PSNR against the true background, and the share of its pixels that still have the
  object's colour;
- img PSNR / img SSIM: the whole image.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .. import __version__
from ..demo import make_folder, prepare_output, run_example, write_png, write_text
from ..edit_defaults import WEIGHTS, level_problem, weight_problem
from ..errors import InputError, SamplingDiverged
from ..features import energy_grid
from ..geometry import dilate
from ..io import atomic_write
from ..model_report import as_array, masked_psnr, model_input, psnr, vae_round_trip
from ..sampler import MODES
from . import ABLATIONS, EDITS
from .baseline import baseline, require_cv2
from .cases import Case, draw_cases
from .metrics import (
    ObjectColours,
    centroid_error,
    ghost_fraction,
    histogram_distance,
    mean_over,
    point_errors,
    segment,
    ssim,
)
from .report import COLUMNS, brief, model_label, section, sheet, summary, table, working_text
from .sections import check_sections, write_section
from .workers import check_workers, side_by_side, threads_each

if TYPE_CHECKING:
    from ..pipeline import DragonPipeline, EditResult

MAX_SCENES = 10_000
"""The most scenes per edit (`--n`): every scene is drawn before the first runs."""
FOUND_SHARE = 0.25
"""A segmented object smaller than this share of the expected object counts as not found."""
SUMMARY = "quality.json"
"""Written first (status "incomplete"), after every case, and last; marks a folder as the
benchmark's output, and is what `--resume` continues from."""
EXAMPLES = "examples"
"""Folder (in the output folder) of each edit's first case's outputs, `EDIT-VARIANT.png`: the
contact sheet of a resumed run that did not produce them itself."""
# ---------------------------------------------------------------------------------------------
# What runs.


@dataclass(frozen=True)
class Variant:
    """One way of producing an output for a case: a group of rows of the table.

    mode None: not the method (identity, baseline). Otherwise the method with this sampler mode,
    `steps` (None: the model's default for each edit, or `FEWER_SHARE` of it where `fewer`), the
    memory bank on or off, and the named weights of the edit overridden.
    """

    name: str
    label: str
    mode: str | None = None
    steps: int | None = None
    fewer: bool = False
    """The fewer-steps ablation: without `steps`, FEWER_SHARE of each edit's own steps."""
    memory_bank: bool = True
    weights: tuple[tuple[str, float], ...] = ()
    keep_background: bool = True
    """The input's own pixels beyond the default margin (`EditOptions.keep_background`)."""
    upstream_features: bool = False
    """Compare DragonDiffusion's two decoder blocks whatever the model's feature_blocks say."""


IDENTITY = Variant("identity", "identity (input)")
EXACT = Variant("exact", "exact (expected image)")
CEILING = Variant("vae", "exact through the VAE (ceiling)")
"""The expected image encoded and decoded by the model's VAE: about the best a latent-diffusion
edit can reach, since it re-synthesises every pixel through the VAE (not a strict bound: another
latent may decode closer, and keep_background pastes input pixels back)."""
BASELINE = Variant("baseline", "baseline (cut-paste + Telea)")


FEWER_SHARE = 0.4
"""The fewer-steps ablation's steps, as a share of the method's (20 of 50)."""


def fewer_of(steps: int) -> int:
    """The fewer-steps ablation's step count for a method run of `steps` steps."""
    return max(2, round(FEWER_SHARE * steps))


def steps_of(pipe: DragonPipeline, edit: str, variant: Variant) -> int:
    """The DDIM steps a method variant runs `edit` with (see Variant)."""
    if variant.steps is not None:
        return variant.steps
    own = pipe.edit_defaults.num_steps(edit)
    return fewer_of(own) if variant.fewer else own


def ablation(
    name: str, mode: str, steps: int | None, fewer_steps: int | None, keep: bool = True
) -> Variant:
    """The method in `mode` with one part taken away (see ABLATIONS); steps None: each edit's
    own (the model's default), fewer_steps None: FEWER_SHARE of them; keep: the method keeps
    the background (every ablation but no-keep-background does as the method does)."""
    if name == "no-keep-background":
        return Variant(name, f"{mode} − kept background", mode, steps, keep_background=False)
    return replace(taken_away(name, mode, steps, fewer_steps), keep_background=keep)


def taken_away(name: str, mode: str, steps: int | None, fewer_steps: int | None) -> Variant:
    """`ablation` with the background kept."""
    if name == "no-bank":
        return Variant(name, f"{mode} − memory bank", mode, steps, memory_bank=False)
    if name == "no-content":
        return Variant(name, f"{mode} − content energy", mode, steps, weights=(("w_content", 0),))
    if name == "no-edit":
        return Variant(name, f"{mode} − edit energy", mode, steps, weights=(("w_edit", 0),))
    if name == "no-blend":
        weights = (("blend_background", 0),)
        return Variant(name, f"{mode} − background blending", mode, steps, weights=weights)
    if name == "no-match":
        weights = (("match_statistics", 0),)
        return Variant(name, f"{mode} − statistics match", mode, steps, weights=weights)
    if name == "fewer-steps":
        count = "40 % of the steps" if fewer_steps is None else f"{fewer_steps} steps"
        return Variant(name, f"{mode}, {count}", mode, fewer_steps, fewer=True)
    if name == "two-blocks":
        label = f"{mode}, upstream's two feature blocks"
        return Variant(name, label, mode, steps, upstream_features=True)
    raise ValueError(f"unknown ablation {name!r}; choose from {', '.join(ABLATIONS)}")


def require_known(
    names: Sequence[str], allowed: Sequence[str], option: str, empty: bool = False
) -> tuple[str, ...]:
    """The names, each once, in order; InputError when one is unknown, or none is given and
    `empty` is False."""
    unknown = [n for n in names if n not in allowed]
    if unknown or not (names or empty):
        given = ", ".join(unknown) if unknown else "nothing"
        raise InputError(
            f"{option}: {given} is not a choice; give a comma-separated list of "
            f"{', '.join(allowed)}" + (", or none" if empty else "")
        )
    return tuple(dict.fromkeys(names))


def choices(text: str, allowed: Sequence[str], option: str, empty: bool = False) -> tuple[str, ...]:
    """A command-line list of `allowed` names, comma-separated ("none": no name, when `empty`)."""
    if empty and text.strip() == "none":
        return ()
    names = [n.strip() for n in text.split(",") if n.strip()]
    return require_known(names, allowed, option, empty=False)


@dataclass(frozen=True)
class Settings:
    """What `bench quality` runs; the defaults are the documented full run."""

    model: str | None = None
    n: int = 50
    edits: tuple[str, ...] = EDITS
    modes: tuple[str, ...] = MODES
    steps: int | None = None
    """DDIM steps of every edit; None: each edit's default for the model (`num_steps`)."""
    seed: int = 0
    ablations: tuple[str, ...] = ABLATIONS
    fewer_steps: int | None = None
    """Steps of the fewer-steps ablation; None: 40 % of each edit's steps (20 of 50)."""
    baseline: bool = True
    keep_background: bool = True
    """False (`--no-keep-background`): every method row on the model's whole re-synthesised
    image, as `keep_background=False` makes it (the no-keep-background ablation is then the
    method itself)."""
    device: str | None = None
    dtype: str | None = None
    sweep: tuple[tuple[str, tuple[float, ...]], ...] = ()
    """Weights to try (`--set NAME=V1,V2`): one row of the method in the first mode per
    combination of the values, the other weights at the model's defaults."""
    resolution: int | None = None
    """Working resolution of the edits (and of the VAE ceiling), px as √area; None: the
    model's native one. The scenes, the metrics' masks and the feature cell they count in stay
    at the native resolution, so runs at different resolutions compare row for row."""

    def __post_init__(self) -> None:
        if not 1 <= self.n <= MAX_SCENES:
            raise InputError(
                f"--n must be 1 to {MAX_SCENES} scenes per edit, got {self.n} (the scenes are "
                "drawn before the first one runs)"
            )
        if not 0 <= self.seed < 2**63:
            raise InputError(f"--seed must be a whole number ≥ 0, got {self.seed}")
        if self.steps is not None and self.steps < 2:
            raise InputError(f"--steps must be at least 2, got {self.steps}")
        if self.resolution is not None and self.resolution < 1:
            raise InputError(
                f"--resolution must be a positive number of pixels, got {self.resolution}; "
                "leave it out for the model's native resolution"
            )
        if self.steps is not None:
            self.check_fewer(self.steps, "--steps")
        elif self.fewer_steps is not None and self.fewer_steps < 2:
            raise InputError(f"--fewer-steps must be at least 2, got {self.fewer_steps}")
        require_known(self.edits, EDITS, "--edits")
        require_known(self.modes, MODES, "--mode")
        require_known(self.ablations, ABLATIONS, "--ablations", empty=True)
        self.check_sweep()

    def check_sweep(self) -> None:
        """InputError unless every --set names a weight of every edit once, with valid values,
        each once (a repeated value would make two rows of the same outputs)."""
        names = [name for name, _ in self.sweep]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InputError(
                f"--set {', '.join(twice)}: given more than once; give each weight in one --set "
                f"with all its values, e.g. {twice[0]}=0,1"
            )
        for name, values in self.sweep:
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise InputError(
                    f"--set {name}: {', '.join(f'{v:g}' for v in repeated)} given more than "
                    "once; give each value once"
                )
            for edit in self.edits:
                known = WEIGHTS[edit].__dataclass_fields__
                if name not in known:
                    raise InputError(
                        f"--set {name}: {edit} has no such weight; its weights are "
                        f"{', '.join(known)}"
                    )
            problems = [weight_problem(name, v) for v in values]
            if not values or any(problems):
                problem = next((p for p in problems if p), "must be finite and ≥ 0")
                raise InputError(f"--set {name}: every value {problem}, e.g. {name}=0,1")

    def check_fewer(self, steps: int, what: str) -> None:
        """InputError unless the fewer-steps ablation (if asked for) runs 2 ≤ n < `steps`
        steps; `what` names where `steps` comes from."""
        fewer = self.fewer_steps if self.fewer_steps is not None else fewer_of(steps)
        if "fewer-steps" in self.ablations and not 2 <= fewer < steps:
            raise InputError(
                f"the fewer-steps ablation needs 2 ≤ --fewer-steps < {what} ({steps}), got "
                f"{fewer}; give another --fewer-steps or leave fewer-steps out of --ablations"
            )

    def working_resolution(self, pipe: DragonPipeline) -> int | None:
        """--resolution where the edits work at another size than the model's native one; None
        where they work at the native size (a --resolution that rounds to it included), so such
        a run writes the native docs section, whose rows it reproduces (the scenes are square,
        at the native resolution)."""
        native = pipe.native_resolution
        if self.resolution is None:
            return None
        same = pipe.working_size((native, native), self.resolution) == (native, native)
        return None if same else self.resolution

    def check_model(self, pipe: DragonPipeline) -> None:
        """Check the steps against the model's per-edit defaults (when --steps is not given),
        and a --set feature_timestep against the model's timesteps."""
        most = pipe.scheduler.config.num_train_timesteps
        if self.resolution is not None:
            size = pipe.native_resolution
            try:
                pipe.working_size((size, size), self.resolution)
            except InputError as err:
                raise InputError(f"--{err}") from None
        for name, values in self.sweep:
            if name == "feature_timestep" and (problem := level_problem(max(values), most)):
                raise InputError(f"--set {problem}")
        if self.steps is None:
            for edit in self.edits:
                steps = pipe.edit_defaults.num_steps(edit)
                self.check_fewer(steps, f"{edit}'s default steps")

    @property
    def fewer(self) -> int | None:
        """The step count of the fewer-steps ablation; None: 40 % of each edit's steps."""
        if self.fewer_steps is not None or self.steps is None:
            return self.fewer_steps
        return fewer_of(self.steps)

    def variants(self) -> list[Variant]:
        """Identity, exact, its VAE ceiling, baseline, the method in each mode, then the
        ablations in the first mode."""
        rows = [IDENTITY, EXACT, CEILING, *([BASELINE] if self.baseline else [])]
        keep, first = self.keep_background, self.modes[0]
        rows += [Variant(m, m, m, self.steps, keep_background=keep) for m in self.modes]
        rows += [ablation(a, first, self.steps, self.fewer, keep) for a in self.ablations]
        names = [name for name, _ in self.sweep]
        combos = itertools.product(*(values for _, values in self.sweep)) if names else ()
        for combo in combos:
            weights = tuple(zip(names, combo, strict=True))
            text = ", ".join(f"{n}={v:g}" for n, v in weights)
            name, label = f"set {text}", f"{first} {text}"
            rows.append(
                Variant(name, label, first, self.steps, weights=weights, keep_background=keep)
            )
        return rows

    def command(self) -> str:
        """The command line that runs these settings."""
        parts = ["dragondiffusion bench quality"]
        if self.model is not None:
            parts.append(f"--model {self.model}")
        parts += [
            f"--n {self.n}",
            f"--edits {','.join(self.edits)}",
            f"--mode {','.join(self.modes)}",
            *([f"--steps {self.steps}"] if self.steps is not None else []),
            f"--seed {self.seed}",
            *([f"--resolution {self.resolution}"] if self.resolution is not None else []),
            f"--ablations {','.join(self.ablations) or 'none'}",
        ]
        if "fewer-steps" in self.ablations and self.fewer is not None:
            parts.append(f"--fewer-steps {self.fewer}")
        if not self.baseline:
            parts.append("--no-baseline")
        if not self.keep_background:
            parts.append("--no-keep-background")
        # .15g: every value as given (plain :g keeps 6 digits), e.g. for --resume to match.
        parts += [f"--set {n}={','.join(f'{v:.15g}' for v in values)}" for n, values in self.sweep]
        parts += [f"--device {self.device}"] if self.device is not None else []
        parts += [f"--dtype {self.dtype}"] if self.dtype is not None else []
        return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Running and measuring.


def cell_pixels(pipe: DragonPipeline, size: int) -> float:
    """Output pixels per energy-grid cell for a square input of `size` pixels."""
    w, h = pipe.working_size((size, size))
    grid = energy_grid((h // pipe.vae_scale_factor, w // pipe.vae_scale_factor))
    return size / grid[1]


def own_weights(base: Any, weights: tuple[tuple[str, float], ...]) -> dict[str, float]:
    """Those of `weights` that the edit's weights dataclass `base` has: an ablation's weight an
    edit lacks (match_statistics for move) leaves that edit as it is; --set checks its names
    against every edit up front."""
    names = {f.name for f in fields(base)}
    return {k: v for k, v in weights if k in names}


def effective(pipe: DragonPipeline, edit: str, variant: Variant) -> tuple | None:
    """What decides a method variant's output for `edit` (None: not the method). Variants with
    equal keys make the same image from the same case (an ablation of a part the edit lacks:
    match_statistics for move, upstream's blocks where the model overrides none), so the run
    makes it once."""
    if variant.mode is None:
        return None
    base = pipe.edit_defaults.weights(edit)
    own = own_weights(base, variant.weights)
    changed = tuple((k, v) for k, v in own.items() if getattr(base, k) != v)
    upstream = variant.upstream_features and edit in pipe.feature_overrides
    mode, steps = variant.mode, steps_of(pipe, edit, variant)
    return (mode, steps, variant.memory_bank, variant.keep_background, changed, upstream)


def twin_key(pipe: DragonPipeline, edit: str, variant: Variant) -> tuple | None:
    """The `effective` key of the variant with keep_background the other way: the same edit,
    composited or not (`EditResult.with_background_kept`, `without_background_kept`)."""
    return effective(pipe, edit, replace(variant, keep_background=not variant.keep_background))


def produce(
    pipe: DragonPipeline,
    case: Case,
    variant: Variant,
    inversions: dict[int, dict],
    seed: int,
    cell_px: float,
    results: dict[tuple, EditResult] | None = None,
    resolution: int | None = None,
) -> tuple[np.ndarray, float]:
    """The variant's output (H, W, 3) uint8 for the case, and the seconds it spent inverting
    the case's image(s) (0 when an earlier variant did); the model works at `resolution`
    (None: its native one).

    inversions: steps → the case's inversions of that many steps (shared by the variants).
    results: the case's method results by `effective` key (filled here): a variant whose twin
    (`twin_key`) is there takes the twin's output with its background kept or not, instead of
    sampling again.
    """
    if variant is IDENTITY:
        return case.image, 0.0
    if variant is EXACT:
        return case.expected, 0.0
    if variant is CEILING:
        size = case.expected.shape[1::-1]
        working = pipe.working_size(size, resolution)
        decoded = vae_round_trip(pipe, model_input(pipe, case.expected, working))
        return as_array(model_input(pipe, as_array(decoded), size)), 0.0
    if variant is BASELINE:
        return baseline(case.example.edit, case.example.arguments, cell_px), 0.0
    twin = None if results is None else results.get(twin_key(pipe, case.example.kind, variant))
    if twin is not None:
        kept = variant.keep_background
        other = twin.with_background_kept() if kept else twin.without_background_kept()
        return np.asarray(other.image.convert("RGB")), 0.0
    options: dict[str, Any] = {
        "mode": variant.mode,
        "memory_bank": variant.memory_bank,
        "keep_background": variant.keep_background,
    }
    if variant.weights:
        base = pipe.edit_defaults.weights(case.example.kind)
        options["weights"] = replace(base, **own_weights(base, variant.weights))
    steps = steps_of(pipe, case.example.kind, variant)
    chosen = pipe.feature_overrides
    if variant.upstream_features:
        pipe.feature_overrides = {}
    try:
        store = inversions.setdefault(steps, {})
        done = run_example(pipe, case.example, steps, store, seed, resolution=resolution, **options)
    except SamplingDiverged:
        # A --set value too strong for the model: scored as nothing (black), as the NaN it
        # stopped at would have decoded, and the other rows of the run go on.
        return np.zeros_like(case.expected), 0.0
    finally:
        pipe.feature_overrides = chosen
    if results is not None:
        results[effective(pipe, case.example.kind, variant)] = done.result
    return np.asarray(done.result.image.convert("RGB")), done.inversion_seconds or 0.0


def measure(case: Case, output: np.ndarray, cell_px: float) -> dict[str, float]:
    """Every metric of the module doc for one output (uint8, the expected image's shape)."""
    truth = case.expected
    if output.shape != truth.shape:
        raise ValueError(f"output is {output.shape}, the expected image {truth.shape}")
    obj = case.expected_mask
    colours = ObjectColours.of(truth, obj)
    found = segment(output, colours)
    if found.sum() < FOUND_SHARE * obj.sum():
        found = np.zeros_like(found)
    if case.points is not None:
        patch = max(2, round(cell_px))
        errors = point_errors(case.image, output, case.points.source, case.points.target, patch)
        place = float(errors.mean())
    else:
        place = centroid_error(found, obj)
    image_ssim, ssim_map = ssim(output, truth)
    background = ~dilate(case.edited, max(1, round(cell_px)))
    vacated = case.vacated(1) if case.edit in ("move", "resize") else np.zeros_like(obj)
    return {
        "found": float(found.any()),
        "size": abs(math.log2(found.sum() / obj.sum())) if found.any() else math.nan,
        "place_px": place,
        "place_cells": place / cell_px,
        "object_psnr": masked_psnr(output, truth, obj),
        "object_ssim": mean_over(ssim_map, obj),
        "histogram": histogram_distance(output[obj], truth[obj]),
        "background_psnr": masked_psnr(output, truth, background),
        "background_ssim": mean_over(ssim_map, background),
        "vacated_psnr": masked_psnr(output, truth, vacated),
        "ghost": ghost_fraction(output, vacated, colours),
        "image_psnr": psnr(output, truth),
        "image_ssim": image_ssim,
    }


@dataclass(frozen=True)
class Earlier:
    """What an earlier, unfinished run of the same settings left: its per-output rows (those
    of whole cases are kept) and the seconds it ran."""

    results: list[dict[str, Any]]
    seconds: float
    threads: int | None = None
    """Torch threads per process it ran with (None: not recorded)."""


@functools.cache
def source_digest() -> str:
    """A hash of this package's Python source (every module, by path): a development install
    keeps its version string while its code changes what an edit does."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def fingerprint(pipe: DragonPipeline) -> str:
    """A short hash of what the results depend on besides the settings: the model's weights
    (UNet, text encoder, VAE: about 1024 evenly spaced values of each parameter, so SD 1.5
    costs no more than a tiny model), its latent scale, its edit defaults (dragondiffusion.json)
    and this package's version and source (`source_digest`). A run is continued only where all
    of them are the same."""
    digest = hashlib.sha256()
    context = (
        __version__,
        source_digest(),
        pipe.vae.config.scaling_factor,
        sorted(pipe.edit_defaults.overrides.items()),
        sorted(pipe.edit_defaults.steps.items()),
        sorted((e, f.blocks) for e, f in pipe.feature_overrides.items()),
    )
    digest.update(json.dumps(context, sort_keys=True, default=str).encode())
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        for name, parameter in part.named_parameters():
            flat = parameter.detach().flatten()
            sample = flat[:: max(1, flat.numel() // 1024)].float().cpu().numpy()
            digest.update(name.encode() + sample.tobytes())
    return digest.hexdigest()[:16]


@dataclass
class QualityRun:
    """A finished (or partial) benchmark: settings, per-output metrics, and the example sheet.

    results: one dict per (edit, case, variant): edit, case, seeds, variant, seconds (the edit's
    own), inversion_seconds (the case's inversion, shared by its variants, on the row that ran
    it; 0 elsewhere) and every metric of COLUMNS.
    """

    settings: Settings
    model: str
    device: str
    cell_px: float
    results: list[dict[str, Any]] = field(default_factory=list)
    examples: list[tuple[Case, dict[str, np.ndarray]]] = field(default_factory=list)
    seconds: float = 0.0
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())
    fingerprint: str = ""
    """The model's weights' `fingerprint` ("" where not taken)."""
    steps: dict[str, int] = field(default_factory=dict)
    """edit → the DDIM steps of its method rows (--steps, else the model's default)."""
    workers: int = 1
    """Processes that ran the cases (the last session's, where resumed)."""
    threads: int = 0
    """Torch threads of each of them (0: not started)."""

    def steps_text(self) -> str:
        """ "50 steps", or each edit's where they differ ("steps: move 50, drag 20")."""
        counts = set(self.steps.values())
        if not counts:  # not started
            given = self.settings.steps
            return "each edit's default steps" if given is None else f"{given} steps"
        if len(counts) == 1:
            return f"{counts.pop()} steps"
        return "steps: " + ", ".join(f"{e} {n}" for e, n in self.steps.items())


def example_path(folder: Path, edit: str, variant: str) -> Path:
    return folder / EXAMPLES / f"{edit}-{variant}.png"


def saved_examples(
    folder: Path | None, edit: str, names: list[str]
) -> dict[str, np.ndarray] | None:
    """The outputs of the edit's first case that an earlier run saved; None if any is missing."""
    if folder is None or not all(example_path(folder, edit, n).is_file() for n in names):
        return None
    outputs = {}
    for name in names:
        with Image.open(example_path(folder, edit, name)) as image:
            outputs[name] = np.asarray(image.convert("RGB"))
    return outputs


def earlier_case(
    earlier: Earlier | None, edit: str, k: int, case: Case, names: list[str]
) -> list[dict[str, Any]] | None:
    """The earlier run's rows of this case, one per variant in order; None unless it has them
    all, for the same scene(s)."""
    if earlier is None:
        return None
    rows = {
        r["variant"]: r
        for r in earlier.results
        if r["edit"] == edit
        and r["case"] == k
        and r["seeds"] == list(case.seeds)
        and all(key in r for key, _ in COLUMNS)  # measured with every metric of this version
    }
    return [rows[n] for n in names] if all(n in rows for n in names) else None


def scene_line(edit: str, k: int, n: int, case: Case) -> str:
    """The log's heading of a case: "[move 3/50] scene 1000042"."""
    return f"[{edit} {k}/{n}] scene {', '.join(map(str, case.seeds))}"


def case_rows(
    pipe: DragonPipeline,
    settings: Settings,
    variants: list[Variant],
    edit: str,
    k: int,
    case: Case,
    cell_px: float,
    log: Callable[[str], None],
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Every variant's row (metrics and seconds) for case `k` of `edit`, and its outputs by
    variant name. The case's inversions are shared by its variants; a variant that makes the
    same image as an earlier one (`effective`) takes that output and its seconds."""
    log(f"{scene_line(edit, k, settings.n, case)}: {case.example.title}")
    inversions: dict[int, dict] = {}
    outputs: dict[str, np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    made: dict[tuple, tuple[str, float]] = {}  # effective options → variant, seconds
    results: dict[tuple, EditResult] = {}  # effective options → the method's result
    for variant in variants:
        key = effective(pipe, case.example.kind, variant)
        inverting = 0.0  # seconds spent inverting the case (once, by the first edit)
        flipped = None  # the same edit with the background kept the other way, if made
        if key is not None:
            source = twin_key(pipe, case.example.kind, variant)
            flipped = made.get(source) if source in results else None
        if key in made:  # the same image: its seconds are those of making it
            twin, seconds = made[key]
            output, note = outputs[twin], f"  (the output of {twin})"
        else:
            began = time.perf_counter()
            output, inverting = produce(
                pipe,
                case,
                variant,
                inversions,
                settings.seed,
                cell_px,
                results,
                settings.resolution,
            )
            seconds, note = time.perf_counter() - began - inverting, ""
            if flipped is not None:  # its twin's output, composited or not: that cost too
                seconds += flipped[1]
                kept = "kept" if variant.keep_background else "not kept"
                note = f"  (the output of {flipped[0]}, background {kept})"
            if key is not None:
                made[key] = variant.name, seconds
            if inverting:
                note = f"  (+ {inverting:.1f} s inverting, shared)"
        metrics = measure(case, output, cell_px)
        rows.append(
            {
                "edit": edit,
                "case": k,
                "seeds": list(case.seeds),
                "variant": variant.name,
                "seconds": round(seconds, 3),
                "inversion_seconds": round(inverting, 3),
                **metrics,
            }
        )
        outputs[variant.name] = output
        log(f"    {variant.label:<32}{seconds:7.1f} s   {brief(metrics)}{note}")
    return rows, outputs


def run(
    pipe: DragonPipeline,
    settings: Settings,
    log: Callable[[str], None] = print,
    after_case: Callable[[QualityRun], None] | None = None,
    earlier: Earlier | None = None,
    folder: Path | None = None,
    stamp: str | None = None,
    workers: int = 1,
    threads: int | None = None,
) -> QualityRun:
    """Run every case of every edit through every variant and measure it.

    Scenes are rendered at the model's native resolution; the first case of each edit is kept
    for the contact sheet. `after_case` gets the run so far after each case (to save partial
    results). earlier: an unfinished run of the same settings on the same model: its whole cases
    are taken over, not run again. folder: where the first cases' outputs are saved
    (`EXAMPLES`), and read back for cases taken over (None: nothing written). stamp: the
    model's `fingerprint`, where the caller has taken it already. workers: processes that run
    the cases side by side, each loading `settings.model` (the model `pipe` came from) and
    using `threads` torch threads (`workers.side_by_side`); 1: the cases run here, one after
    another, on `pipe` (`threads` unused: the caller's torch setting holds). The rows come back
    in the same order either way, and are the same for the same threads per process.
    """
    check_workers(workers, threads)
    size = pipe.native_resolution
    cell_px = cell_pixels(pipe, size)
    result = QualityRun(settings, settings.model or pipe.model_name, str(pipe.device), cell_px)
    result.fingerprint = stamp if stamp is not None else fingerprint(pipe)
    settings.check_model(pipe)
    method = Variant("method", "method", settings.modes[0], settings.steps)
    result.steps = {edit: steps_of(pipe, edit, method) for edit in settings.edits}
    variants = settings.variants()
    names = [v.name for v in variants]
    started, before = time.perf_counter(), earlier.seconds if earlier else 0.0
    result.seconds = before
    pending: list[tuple[str, int, Case]] = []
    firsts: dict[str, Case] = {}  # edit → its first case, for the contact sheet
    for edit in settings.edits:
        cases = draw_cases(edit, settings.n, settings.seed, size)
        firsts[edit] = cases[0]
        for k, case in enumerate(cases, 1):
            rows = earlier_case(earlier, edit, k, case, names)
            examples = None
            if rows is not None:
                examples = saved_examples(folder, edit, names) if k == 1 else {}
            if examples is None:
                pending.append((edit, k, case))
                continue
            log(f"{scene_line(edit, k, settings.n, case)}: measured by the earlier run")
            result.results += rows
            if k == 1:
                result.examples.append((case, examples))
    if workers > 1 and pending:
        result.workers = min(workers, len(pending))  # a worker per case at most
        result.threads = threads_each(result.workers, threads)
        finished = side_by_side(
            pending, settings, cell_px, result.fingerprint, result.workers, result.threads, log
        )
    else:
        result.threads = torch.get_num_threads()
        finished = (
            (edit, k, *case_rows(pipe, settings, variants, edit, k, case, cell_px, log))
            for edit, k, case in pending
        )
    if earlier is not None and earlier.threads not in (None, result.threads):
        log(
            f"note: the earlier run used {earlier.threads} torch thread(s) per process, this one "
            f"{result.threads}: a few means may differ in their last digit from one run's"
        )
    with contextlib.closing(finished):  # an error here ends the workers too
        for edit, k, rows, outputs in finished:
            result.results += rows
            if k == 1:
                result.examples.append((firsts[edit], outputs))
                if folder is not None:
                    for name, output in outputs.items():
                        write_png(output, example_path(folder, edit, name))
            result.seconds = before + time.perf_counter() - started
            if after_case is not None:
                after_case(result)
    # Cases finish in any order side by side: the rows and examples go back in the settings'.
    order = {edit: i for i, edit in enumerate(settings.edits)}
    place = {name: i for i, name in enumerate(names)}
    result.results.sort(key=lambda r: (order[r["edit"]], r["case"], place[r["variant"]]))
    result.examples.sort(key=lambda example: order[example[0].edit])
    return result


def damaged(folder: Path, what: str) -> InputError:
    """The error for an output folder whose quality.json cannot be what the benchmark wrote."""
    return InputError(f"{folder}/{SUMMARY} is damaged ({what}); move it away or give another --out")


def is_number(value: object) -> bool:
    """Whether a JSON value is a number (NaN and Infinity too; not true or false)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


ROW_KEYS: dict[str, type] = {"edit": str, "case": int, "seeds": list, "variant": str}
"""Keys every row of quality.json's results has, and their JSON types."""


def row_problem(row: object) -> str | None:
    """What is wrong with one row of quality.json's results, or None."""
    if not isinstance(row, dict):
        return "is not an object"
    for key, kind in ROW_KEYS.items():
        if key not in row:
            return f"has no {key}"
        if not isinstance(row[key], kind) or isinstance(row[key], bool):
            return f"has a {key} that is not a {kind.__name__}"
    for key in ("seconds", "inversion_seconds", *(k for k, _ in COLUMNS)):
        if key in row and not is_number(row[key]):
            return f"has a {key} that is not a number"
    return None


def summary_problem(saved: object) -> str | None:
    """What is wrong with the structure of a parsed quality.json, or None (the keys this
    package writes and reads back, with their types)."""
    if not isinstance(saved, dict):
        return f"a JSON {type(saved).__name__}, not an object"
    missing = [k for k in ("dragondiffusion", "status", "results") if k not in saved]
    if missing:
        return f"no {', '.join(missing)}"
    if not isinstance(saved["status"], str):
        return "its status is not text"
    if not isinstance(saved["results"], list):
        return "its results are not a list"
    if not is_number(saved.get("seconds", 0.0)):
        return "its seconds are not a number"
    threads = saved.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)):
        return "its threads are not a whole number"
    for i, row in enumerate(saved["results"]):
        problem = row_problem(row)
        if problem is not None:
            return f"result {i + 1} {problem}"
    return None


def read_summary(folder: Path) -> dict[str, Any] | None:
    """The folder's quality.json, its structure checked (None: there is none); InputError
    (`damaged`) when it is not the JSON the benchmark writes."""
    path = folder / SUMMARY
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise damaged(folder, f"not readable as JSON: {err}") from None
    problem = summary_problem(saved)
    if problem is not None:
        raise damaged(folder, problem)
    return saved


def as_saved(settings: Settings) -> dict[str, Any]:
    """The settings as quality.json holds them (tuples read back as lists)."""
    return json.loads(json.dumps(asdict(settings)))


def read_earlier(folder: Path, settings: Settings, resume: bool) -> dict[str, Any] | None:
    """The output folder's quality.json when `resume` is asked and it holds a run of these
    settings (None: nothing to continue). Refuses to start afresh over an unfinished run (its
    results would be lost), to continue a run of other settings, and a damaged quality.json
    (`read_summary`)."""
    saved = read_summary(folder)
    if saved is None:
        return None
    unfinished = saved["status"] == "incomplete" and saved["results"]
    if not resume:
        if unfinished:
            raise InputError(
                f"{folder} holds an unfinished benchmark ({len(saved['results'])} outputs "
                f"measured); pass --resume to continue it, or give another --out"
            )
        return None
    given = saved.get("settings")
    if isinstance(given, dict):  # a field added since (--resolution) at its default
        given = {**as_saved(Settings()), **given}
    if given != as_saved(settings):
        raise InputError(
            f"--resume: {folder} holds a benchmark of other settings ({saved.get('command')}); "
            "run that command with --resume, or give another --out"
        )
    return saved


def resumable(saved: dict[str, Any], pipe: DragonPipeline, stamp: str, folder: Path) -> Earlier:
    """The earlier run, once its model (`stamp`: this model's `fingerprint`) and device are
    known to be this run's."""
    if saved.get("fingerprint") != stamp:
        raise InputError(
            f"--resume: the model (its weights or edit defaults) or the package (its version "
            f"or source code) differs from the run in {folder}; give another --out to "
            "benchmark this one"
        )
    if saved.get("device") != str(pipe.device):
        raise InputError(
            f"--resume: the run in {folder} ran on {saved.get('device')}, this one on "
            f"{pipe.device}; continue it on a machine where it picks the same device, or give "
            "another --out"
        )
    return Earlier(saved["results"], float(saved.get("seconds", 0.0)), saved.get("threads"))


LOCK = ".running"
"""Held in the output folder while a benchmark writes there (its process id)."""


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold `folder`/.running while the block runs: a second benchmark writing to the same
    folder (e.g. a --resume while the first still runs) would mix their results. A lock left by
    a process that no longer runs (killed) is taken over."""
    make_folder(folder)
    path = folder / LOCK
    for _ in range(2):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            text = path.read_text().strip() if path.exists() else ""
            if text.isdigit() and process_alive(int(text)):
                raise InputError(
                    f"another benchmark (process {text}) is writing to {folder}; wait for it to "
                    f"end, or give another --out (if no benchmark is running there, delete "
                    f"{path})"
                ) from None
            path.unlink(missing_ok=True)  # stale: its process has ended
    else:
        raise InputError(f"could not take {path}; remove it if no benchmark is running")
    os.write(handle, str(os.getpid()).encode())
    os.close(handle)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def quality(
    settings: Settings,
    out: str | Path = "quality-bench",
    docs: str | Path | None = "docs/benchmarks.md",
    log: Callable[[str], None] = print,
    resume: bool = False,
    workers: int = 1,
    threads: int | None = None,
) -> QualityRun:
    """Load the model, run the benchmark, print the table and write its files.

    out/: quality.json (settings, table, every output's metrics; rewritten after every case),
    quality.md (the section), contact_sheet.png, examples/ (the sheet's pictures). docs: the
    markdown file that gets the section `quality:<model>` (None: none). resume: continue the
    unfinished run in `out` (same settings, model weights and device): its finished cases are
    kept, the rest run. Only one benchmark at a time writes to a folder (`folder_lock`).
    workers, threads: see `run` (a run may be resumed with other workers; keep its threads
    per process for the same numbers).
    """
    check_workers(workers, threads)
    if docs is not None:
        check_sections(docs, docs_section(settings.model)[0])  # fail now, not after the run
    if Path(out).is_dir():
        read_summary(Path(out))  # a damaged quality.json is said so, not taken for foreign
    folder = prepare_output(out, SUMMARY, "quality benchmark", own=(LOCK,))
    with folder_lock(folder):
        saved = read_earlier(folder, settings, resume)
        if resume and saved is None:
            log(f"--resume: no earlier run in {folder}; starting afresh")
        return measured(settings, folder, docs, log, saved, workers, threads)


def docs_section(
    model: str | None, resolution: int | None = None, kept: bool = True
) -> tuple[str, str]:
    """The key and title of `model`'s section in the docs file; a run at another working
    resolution, or on the whole re-synthesised images (not `kept`), has a section of its own."""
    label = model_label(model)
    key, title = f"quality:{label}", f"Quality: {label}"
    if resolution is not None:
        key, title = f"{key}@{resolution}px", f"{title}, working at {resolution} px"
    if not kept:
        key, title = f"{key}:whole", f"{title}, whole re-synthesised images"
    return key, title


def measured(
    settings: Settings,
    folder: Path,
    docs: str | Path | None,
    log: Callable[[str], None],
    saved: dict[str, Any] | None,
    workers: int = 1,
    threads: int | None = None,
) -> QualityRun:
    """`quality`'s work once the folder is checked and held."""
    from ..models import default_model, load

    if settings.baseline:
        require_cv2()  # fail now, not after the long run
    name = default_model() if settings.model is None else settings.model
    log(f"loading model {name} …")
    pipe = load(name, settings.device, settings.dtype)
    pipe.set_progress_bar_config(disable=True)
    settings.check_model(pipe)  # fail now, not after loading an earlier run
    working = settings.working_resolution(pipe)
    stamp = fingerprint(pipe)
    earlier = resumable(saved, pipe, stamp, folder) if saved is not None else None
    variants = settings.variants()
    log(
        f"{settings.n} scene(s) × {len(settings.edits)} edit(s) × {len(variants)} variant(s) at "
        f"{pipe.native_resolution} px{working_text(working)} on {pipe.device}; "
        f"writing to {folder}/"
    )
    if earlier is None:
        started = QualityRun(settings, name, str(pipe.device), 0, fingerprint=stamp)
        write_text(folder / SUMMARY, summary(started, "incomplete"))
    # quality.json holds every finished case, so a run cut short (a time limit) still counts,
    # and --resume continues it.
    done = run(
        pipe,
        settings,
        log,
        lambda partial: write_text(folder / SUMMARY, summary(partial, "incomplete")),
        earlier,
        folder,
        stamp,
        workers,
        threads,
    )
    text = section(done)
    atomic_write(
        folder / "contact_sheet.png", lambda tmp: sheet(done).save(tmp, "PNG", optimize=True)
    )
    write_text(folder / "quality.md", text + "\n")
    write_text(folder / SUMMARY, summary(done, "complete"))
    log(table(done))
    if docs is not None:
        key, title = docs_section(settings.model, working, settings.keep_background)
        write_section(docs, key, title, text)
        log(f"wrote the section '{title}' of {docs}")
    log(f"wrote {folder}/contact_sheet.png, quality.md and {SUMMARY} in {done.seconds:.1f} s")
    return done
