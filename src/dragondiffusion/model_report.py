"""How good is a model for editing? The measurements of `docs/demo-model.md`.

- VAE reconstruction PSNR: encode (posterior mean) and decode, against the image at the size the
  model sees.
- DDIM inversion → reconstruction PSNR: `pipe.invert`, then deterministic DDIM back from z_T with
  the conditional prompt, no CFG and no guidance; once plain and once with the memory bank
  replacing the decoder self-attention K/V at every step (what the edits do outside the edit).
- Text-to-image samples for a few captions, and for one-object captions naming each object
  colour, whether the samples' dominant object colour is the named one (`named_colours`); for
  one naming each shape class, which class's outline best fits the red region (`named_shapes`).
- Decoder-feature correspondence: a scene and the same scene with every object moved by a known
  offset; for each object cell of the first, the arg-max-cosine cell of the second; the mean
  distance to the true cell, per feature block, in that block's own cells. The blocks are
  DragonDiffusion's two (1/16 and 1/8 of the image), at a noise level given by a timestep; also
  the two compared together as an energy that uses both does (the sum of their cosines, on the
  finer grid). The target applies to what each edit's energies compare (`pipe.features_for`).
  Two ways to bring an image to that noise level: fresh random noise, independent per image
  (DIFT's protocol), or the image's own DDIM inversion (what the energies compare: the reference
  features come from the inversion's trajectory, and sampling starts from its z_T; the noised
  rows carry the target at DIFT's own t only, `DIFT_TIMESTEP`). Where the
  model's edits read their features at a fixed level at noisier steps (`feature_timestep`), the
  same at every noisier t read that way, for each such level (`feature_levels`; a resize may
  read at another level than a move: `decoder_features`' `read_at`).
- An object moved in a held-out photo at the photo's own size (`photo_move`): the background
  PSNR outside the object's old and new places, and the shift of the object's colour centroid
  against the shift asked for, with the model's whole re-synthesised image
  (`keep_background=False`) and with the photo's own background kept (the default).
"""

from __future__ import annotations

import io
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
import torch.nn.functional as F

from . import __version__, scenes
from .ddim import DDIMTimesteps
from .edit_defaults import WEIGHTS
from .errors import InputError
from .figures import annotate, contact_sheet
from .geometry import Point, Size, dilate, mask_to_grid
from .io import atomic_write
from .sampler import level_path, nearest_step, require_substeps, walk

SAMPLE_CAPTIONS = (
    "a red circle on a blue floor",
    "a yellow striped star on a noisy green background",
    "a blue square and a pink heart on a beige and grey gradient",
    "a green dotted triangle and a white ring on a brown floor",
)
"""Captions for the text-to-image grid, in the scene captions' vocabulary."""
DIFT_TIMESTEP = 261
"""DIFT's timestep for SD (Tang et al. 2023, "Emergent Correspondence from Image Diffusion"):
the noised protocol's rows carry the correspondence target there only. At noisier t fresh noise
on both images is what no energy compares (the reference features are the inversion's, the
edited latent the sampler's deterministic path from the inversion's z_T, with a little fresh
noise inside the edit at the regional-SDE steps): those rows show how fast the features fade."""
CORRESPONDENCE_TIMESTEPS = (DIFT_TIMESTEP, 501, 741, 901, 981)
"""Noise levels of the correspondence check: DIFT's t = 261 and four inside the guided steps
(DiffEditor guides at t ≈ 981…421; 981 is the first, noisiest step of 50)."""
INVERSION_STEPS = 50
"""DDIM steps of the inversions the "inverted" correspondence reads (its timesteps must be on
their grid: 981, 961, …, 1 for SD 1.5's schedule)."""
LATENTS = ("noised", "inverted")
"""How the correspondence check brings an image to timestep t (see the module doc)."""
ENTROPY_SCENES = 4
"""Held-out scenes (the first correspondence seeds) for the attention entropy."""
MAX_FIGURE_BYTES = 300_000


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images of equal shape; +inf when equal."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def as_array(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def model_input(pipe, image: PIL.Image.Image | np.ndarray, size: Size | None = None):
    """The image as the model sees it: RGB, resized (Lanczos) to `size` or its working size."""
    if isinstance(image, np.ndarray):
        image = PIL.Image.fromarray(image)
    image = image.convert("RGB")
    size = size or pipe.working_size(image.size)
    return image if image.size == size else image.resize(size, PIL.Image.Resampling.LANCZOS)


# ---------------------------------------------------------------------------------------------
# Reconstructions.


@torch.no_grad()
def vae_round_trip(pipe, image: PIL.Image.Image) -> PIL.Image.Image:
    """The image encoded to the VAE's posterior mean and decoded, at the image's own size."""
    x = pipe.image_processor.preprocess(image, height=image.height, width=image.width)
    z = pipe.vae.encode(x.to(pipe.device, pipe.vae.dtype)).latent_dist.mean
    return pipe.image_processor.postprocess(pipe.vae.decode(z).sample.float(), "pil")[0]


def inversion_round_trip(
    pipe, image: PIL.Image.Image, prompt: str, steps: int = 50
) -> dict[str, PIL.Image.Image]:
    """The image inverted with `steps` DDIM steps and sampled back: {"plain": …, "bank": …}."""
    inversion = pipe.invert(
        image, prompt, steps, resolution=round(math.sqrt(math.prod(image.size)))
    )
    return {
        mode: pipe.decode(pipe.reconstruct(inversion, bank=mode == "bank"))
        for mode in ("plain", "bank")
    }


# ---------------------------------------------------------------------------------------------
# Text to image.


def text_to_image(
    pipe,
    captions: Sequence[str],
    seeds: Sequence[int] = (0, 1),
    steps: int = 50,
    guidance_scale: float = 4.0,
) -> list[list[PIL.Image.Image]]:
    """One row per caption, one image per seed, at the model's native resolution."""
    side = pipe.native_resolution
    return [
        [
            pipe(
                caption,
                height=side,
                width=side,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed),
            ).images[0]
            for seed in seeds
        ]
        for caption in captions
    ]


COLOUR_CAPTION = "a {} circle on a grey floor"
"""The one-object caption of the named-colour check. The grey floor is far from every object
colour; the scene generator's walls (any background colour, darkened) are nearer their own
background colour than any object colour, but a sample's wall need not be: a wall much brighter
than the generator's white ones would count as a white object."""


PALETTE = np.array(
    [*scenes.OBJECT_COLOURS.values(), *scenes.BACKGROUND_COLOURS.values()], np.float32
)
"""The scene generator's object colours, then its background colours (sRGB)."""


def nearest_palette(image: PIL.Image.Image) -> np.ndarray:
    """(H, W) index into PALETTE of each pixel's nearest colour (object colours come first)."""
    pixels = as_array(image).astype(np.float32)
    return ((pixels[..., None, :] - PALETTE) ** 2).sum(-1).argmin(-1)


def dominant_object_colour(image: PIL.Image.Image) -> str:
    """The object colour (scenes.OBJECT_COLOURS) most pixels of the image are nearest to, where
    the palette also holds the background colours (scenes.BACKGROUND_COLOURS), whose pixels do
    not count; "" when every pixel is nearest a background colour."""
    names = list(scenes.OBJECT_COLOURS)
    counts = np.bincount(nearest_palette(image).ravel(), minlength=len(PALETTE))[: len(names)]
    return names[int(counts.argmax())] if counts.any() else ""


def named_samples(
    pipe,
    caption: str,
    names: Sequence[str],
    known: Sequence[str],
    what: str,
    classify: Callable[[PIL.Image.Image], str],
    seeds: Sequence[int],
    steps: int,
    guidance_scale: float,
) -> dict[str, list[str]]:
    """For each name (one of `known`, else InputError naming `what`), text-to-image samples of
    `caption` with `{}` filled by it, one per seed, each put through `classify`."""
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"unknown {what} {', '.join(unknown)}; use {', '.join(known)}")
    captions = [caption.format(n) for n in names]
    rows = text_to_image(pipe, captions, seeds, steps, guidance_scale)
    return {n: [classify(im) for im in row] for n, row in zip(names, rows, strict=True)}


def named_colours(
    pipe,
    colours: Sequence[str] = tuple(scenes.OBJECT_COLOURS),
    seeds: Sequence[int] = (0, 1),
    steps: int = 20,
    guidance_scale: float = 4.0,
) -> dict[str, list[str]]:
    """For each colour, the dominant object colour of text-to-image samples of COLOUR_CAPTION
    naming it, one per seed: whether the samples show the colour they are asked for."""
    return named_samples(
        pipe,
        COLOUR_CAPTION,
        colours,
        tuple(scenes.OBJECT_COLOURS),
        "object colour",
        dominant_object_colour,
        seeds,
        steps,
        guidance_scale,
    )


def named_share(found: dict[str, list[str]]) -> float:
    """The share of samples whose found colour (or shape) is the one their caption names."""
    hits = [name == named for named, names in found.items() for name in names]
    return sum(hits) / len(hits) if hits else math.nan


SHAPE_CAPTION = "a red {} on a grey floor"
"""The one-object caption of the named-shape check."""
SHAPE_ANGLES = 24
"""Rotations (every 15°) a shape template is tried at."""


def nearest_colour_mask(image: PIL.Image.Image, colour: str) -> np.ndarray:
    """(H, W) bool: pixels nearest `colour` among the object and background colours."""
    return nearest_palette(image) == list(scenes.OBJECT_COLOURS).index(colour)


@cache
def _unit_area(kind: str, samples: int = 401) -> float:
    """Area of shape `kind` in its own frame (units of its size)."""
    u, v = np.meshgrid(np.linspace(-1.2, 1.2, samples), np.linspace(-1.2, 1.2, samples))
    return float(scenes.inside_shape(kind, u, v).mean() * 2.4**2)


def shape_template(
    kind: str, grid: tuple[np.ndarray, np.ndarray], centre: Point, size: float, turn: float
) -> np.ndarray:
    """(H, W) bool: shape `kind` of radius `size` px, its frame's origin at `centre`, turned by
    `turn` radians, over the pixel centres `grid` (x, y)."""
    c, s = math.cos(turn), math.sin(turn)
    dx, dy = grid[0] - centre[0], grid[1] - centre[1]
    return scenes.inside_shape(kind, (c * dx + s * dy) / size, (c * dy - s * dx) / size)


def best_shape(mask: np.ndarray, angles: int = SHAPE_ANGLES) -> tuple[str, float]:
    """The shape class whose template best overlaps the mask, and that overlap (IoU): each
    template has the mask's area, its centroid on the mask's, at the best of `angles`
    rotations. ("", 0.0) for an empty mask, or one so small that no template covers a pixel."""
    if not mask.any():
        return "", 0.0
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean(), ys.mean()
    y, x = np.mgrid[: mask.shape[0], : mask.shape[1]].astype(np.float64) + 0.5
    best = ("", 0.0)
    for kind in scenes.SHAPE_CLASSES:
        size = math.sqrt(mask.sum() / _unit_area(kind))
        for step in range(angles):
            turn = 2 * math.pi * step / angles
            first = shape_template(kind, (x, y), (cx, cy), size, turn)
            if not first.any():
                continue
            # Shift it so its own centroid (not its frame's origin) lands on the mask's.
            ty, tx = np.nonzero(first)
            placed = shape_template(
                kind, (x, y), (2 * cx - tx.mean(), 2 * cy - ty.mean()), size, turn
            )
            iou = (placed & mask).sum() / (placed | mask).sum()
            if iou > best[1]:
                best = (kind, float(iou))
    return best


def named_shapes(
    pipe,
    shapes: Sequence[str] = scenes.SHAPE_CLASSES,
    seeds: Sequence[int] = (0, 1),
    steps: int = 20,
    guidance_scale: float = 4.0,
) -> dict[str, list[str]]:
    """For each shape class, the best-fitting shape class (`best_shape`) of the largest red
    region of text-to-image samples of SHAPE_CAPTION naming it, one per seed ("": no red, or a
    region too small for any template to cover a pixel). Needs scipy (the bench extra)."""
    from .bench.metrics import largest_component  # scipy; bench.metrics imports this module

    return named_samples(
        pipe,
        SHAPE_CAPTION,
        shapes,
        scenes.SHAPE_CLASSES,
        "shape class",
        lambda image: best_shape(largest_component(nearest_colour_mask(image, "red")))[0],
        seeds,
        steps,
        guidance_scale,
    )


# ---------------------------------------------------------------------------------------------
# Feature correspondence.


def shifted(scene: scenes.Scene, dx: float, dy: float) -> scenes.Scene:
    """The scene with every object moved by (dx, dy) pixels; the background stays."""
    for index in range(len(scene.objects)):
        scene = scenes.move_object(scene, index, dx, dy)
    return scene


@torch.no_grad()
def noised_latent(
    pipe, image: np.ndarray, timestep: int, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The image's latent (`pipe.encode_latent` at the image's size) noised to `timestep` with
    `noise` (1, C, H/8, W/8), and the timestep as a tensor for the UNet."""
    z0 = pipe.encode_latent(PIL.Image.fromarray(image), (image.shape[1], image.shape[0]))
    t = torch.tensor([timestep], device=pipe.device)
    return pipe.scheduler.add_noise(z0, noise.to(z0.device, z0.dtype), t), t


@torch.no_grad()
def inverted_latent(
    pipe, image: np.ndarray, prompt: str, timestep: int, cache: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The image's DDIM inversion (INVERSION_STEPS steps, `prompt`) at `timestep`, and the
    timestep as a tensor. `cache` (any dict) keeps each image's trajectory for other timesteps."""
    cache = {} if cache is None else cache
    key = (image.tobytes(), image.shape, prompt)
    if key not in cache:
        inversion = pipe.invert(PIL.Image.fromarray(image), prompt, INVERSION_STEPS)
        steps = DDIMTimesteps(pipe.scheduler, INVERSION_STEPS)
        cache[key] = inversion.latents, steps.timesteps
    latents, timesteps = cache[key]
    if timestep not in timesteps:
        raise InputError(
            f"t = {timestep} is not a step of a {INVERSION_STEPS}-step inversion; "
            f"use one of {timesteps[0]}, {timesteps[1]}, …, {timesteps[-1]}"
        )
    z = latents[INVERSION_STEPS - timesteps.index(timestep)]
    return z, torch.tensor([timestep], device=pipe.device)


def level_timesteps(pipe, timestep: int, read_at: int | None, substeps: int) -> list[int]:
    """The timesteps from `timestep` down to `read_at` in `substeps` DDIM steps (more than one:
    along `level_path` on an INVERSION_STEPS-step grid), both ends included; [] where nothing
    is brought (`read_at` None or not below `timestep`)."""
    substeps = require_substeps(substeps)
    if read_at is None or read_at >= timestep:
        return []
    if substeps == 1:
        return [timestep, read_at]
    grid = DDIMTimesteps(pipe.scheduler, INVERSION_STEPS).timesteps
    if timestep not in grid or read_at not in grid:
        raise InputError(
            f"substeps > 1 need t = {timestep} and read_at = {read_at} on the grid of a "
            f"{INVERSION_STEPS}-step run ({grid[0]}, {grid[1]}, …, {grid[-1]})"
        )
    return [grid[i] for i in level_path(grid.index(timestep), grid.index(read_at), substeps)]


@torch.no_grad()
def decoder_features(
    pipe,
    image: np.ndarray,
    prompt: str,
    timestep: int,
    noise: torch.Tensor,
    latents: str = "noised",
    cache: dict | None = None,
    read_at: int | None = None,
    substeps: int = 1,
) -> list[torch.Tensor]:
    """DragonDiffusion's two decoder feature maps (`pipe.features`, whatever blocks an edit's
    energies use), each (C, h, w) at its block's own resolution, of the image's latent at
    `timestep`: noised with `noise`, or its DDIM inversion (`latents` "inverted"; `cache` as in
    `inverted_latent`). With `read_at` below `timestep`, read as the sampler does at a plan's
    level (`EditPlan.feature_timestep`): the latent brought to `read_at` by `substeps`
    deterministic DDIM steps (`EditPlan.feature_substeps`; more than one: along `level_path` on
    an INVERSION_STEPS-step grid), each with the UNet's predicted noise (one plain conditional
    pass), and the features read there."""
    path = level_timesteps(pipe, timestep, read_at, substeps)
    if latents == "inverted":
        zt, t = inverted_latent(pipe, image, prompt, timestep, cache)
    else:
        zt, t = noised_latent(pipe, image, timestep, noise)
    text = pipe.encode_text(prompt)[0]
    if path:
        alpha = pipe.scheduler.alphas_cumprod
        zt, _ = walk(pipe.unet, zt, [(a, float(alpha[a])) for a in path], text)
        t = torch.tensor([read_at], device=pipe.device)
    return [m[0].float() for m in pipe.features(zt, t, text)]


def cosines(f: torch.Tensor, g: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """For cells (N, 2) (x, y) of map f (C, h, w): the cosine similarity over channels with
    every cell of map g (C, h, w), (N, h·w) in raster order."""
    c, h, w = g.shape
    source = F.normalize(f[:, cells[:, 1], cells[:, 0]].T, dim=1)
    return source @ F.normalize(g.reshape(c, h * w), dim=0)


def best_matches(similarity: torch.Tensor, width: int) -> torch.Tensor:
    """The (x, y) cell of highest similarity per row of (N, h·w) on a grid `width` wide."""
    best = similarity.argmax(dim=1)
    return torch.stack([best % width, best // width], dim=1)


def object_cells(masks: list[np.ndarray], grid: tuple[int, int]) -> torch.Tensor:
    """(h, w) bool: the cells of the grid at least half covered by some object's mask."""
    union = torch.from_numpy(np.any(masks, axis=0))[None, None]
    return mask_to_grid(union, grid)[0, 0]


def summed(blocks: Sequence[int]) -> str:
    """The name of several blocks compared together: "up_blocks[1]+up_blocks[2]"."""
    return "+".join(f"up_blocks[{b}]" for b in blocks)


def correspondence_errors(
    pipe,
    scene: scenes.Scene,
    offset_cells: tuple[int, int] = (1, 1),
    timestep: int = 261,
    seed: int = 0,
    latents: str = "noised",
    cache: dict | None = None,
    read_at: int | None = None,
    substeps: int = 1,
) -> dict[str, np.ndarray]:
    """Arg-max-cosine matching errors between a scene and the scene shifted by a known offset.

    The offset is given in cells of the coarsest feature block, so that the true match is a
    whole cell in every block. The two images get independent noise (one shared noise pattern
    would itself match best at zero displacement), or each its own DDIM inversion (`latents`
    "inverted"; `cache` keeps the inversions for other timesteps). Per block ("up_blocks[i]"):
    the error (distance between the matched and the true cell, in that block's cells) of every
    cell that is object in both images, with its true match inside the image. With two blocks
    or more, also roughly what an energy comparing them together sees (`summed(blocks)`): every
    block upsampled to the finest grid (nearest, as the energies do), the sum of their cosine
    similarities, errors in cells of the finest grid. With `read_at` below `timestep`, as the
    energies read at a plan's level: the scene (the reference) at `read_at`, the shifted scene
    (the edit's current latent) at `timestep` brought to `read_at` in `substeps` DDIM steps
    (`decoder_features`).
    """
    side = scene.size // pipe.vae_scale_factor
    shape = (2, 1, pipe.unet.config.in_channels, side, side)
    noises = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    prompt = scenes.caption(scene)
    image, masks = scenes.render(scene)
    at_level = read_at is not None and read_at < timestep
    first_t = read_at if at_level else timestep
    first = decoder_features(pipe, image, prompt, first_t, noises[0], latents, cache)
    coarsest = min(m.shape[-1] for m in first)
    dx, dy = (o * scene.size / coarsest for o in offset_cells)
    moved_image, moved_masks = scenes.render(shifted(scene, dx, dy))
    second = decoder_features(
        pipe, moved_image, prompt, timestep, noises[1], latents, cache, read_at, substeps
    )

    def errors_on(
        grid: tuple[int, int], similarity: Callable[[torch.Tensor], torch.Tensor]
    ) -> np.ndarray:
        h, w = grid
        shift = torch.tensor([round(dx * w / scene.size), round(dy * h / scene.size)])
        ys, xs = object_cells(masks, grid).nonzero(as_tuple=True)
        cells = torch.stack([xs, ys], dim=1)
        true = cells + shift
        inside = (true >= 0).all(dim=1) & (true[:, 0] < w) & (true[:, 1] < h)
        cells, true = cells[inside], true[inside]
        on_object = object_cells(moved_masks, grid)[true[:, 1], true[:, 0]]
        cells, true = cells[on_object], true[on_object]
        found = best_matches(similarity(cells), w)
        return (found - true).float().norm(dim=1).numpy()

    errors = {}
    for block, f, g in zip(pipe.features.blocks, first, second, strict=True):
        grid = tuple(f.shape[-2:])
        errors[f"up_blocks[{block}]"] = errors_on(grid, partial(cosines, f, g))
    if len(first) > 1:
        finest = max((tuple(m.shape[-2:]) for m in first), key=lambda hw: hw[0] * hw[1])
        up = [
            [F.interpolate(m[None], size=finest, mode="nearest")[0] for m in maps]
            for maps in (first, second)
        ]

        def together(cells: torch.Tensor) -> torch.Tensor:
            return sum(cosines(f, g, cells) for f, g in zip(*up, strict=True))

        errors[summed(pipe.features.blocks)] = errors_on(finest, together)
    return errors


# ---------------------------------------------------------------------------------------------
# Moving an object in a held-out photo.

COFFEE_CUP: tuple[Point, ...] = (
    (300, 10), (352, 15), (382, 22), (404, 38), (422, 60), (428, 100), (444, 122), (464, 155),
    (482, 205), (480, 260), (462, 302), (432, 338), (395, 368), (352, 387), (300, 397),
    (250, 396), (200, 384), (158, 362), (122, 336), (93, 302), (74, 264), (69, 214),
    (78, 162), (100, 122), (130, 92), (168, 76), (172, 50), (192, 30), (240, 14),
)  # fmt: skip
"""The cup with its saucer and spoon in scikit-image's `coffee` photo (600×400): a polygon in
photo pixels, clockwise from the top of the cup's rim, drawn by hand a few pixels outside the
rims of the saucer and the cup (checked by drawing its outline over the photo)."""


def red_glaze(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: the red-brown glaze of the cup and saucer in the `coffee` photo.

    The rule: green below 0.3 × red, and red above 40 (not near black). The table's wood is
    orange (green ≈ 0.4-0.8 × red), the crema, the white rim and the spoon are not counted. On
    the photo, 98 % of these pixels lie inside COFFEE_CUP, they cover 45 % of it, and 0.7 % of
    the photo 16 px or more outside it (tests/test_model_report.py checks this).
    """
    rgb = np.asarray(image)[..., :3].astype(np.int32)
    red, green = rgb[..., 0], rgb[..., 1]
    return (10 * green < 3 * red) & (red > 40)


@dataclass(frozen=True)
class PhotoMove:
    """An object move to measure on a held-out photo: the photo's name and size, the object's
    polygon in its pixels, the shift (dx, dy) in pixels, a colour rule that picks the object's
    pixels out of an image (H, W, 3) → (H, W) bool, and the prompt."""

    photo: str
    size: Size
    polygon: tuple[Point, ...]
    shift: Point
    colour: Callable[[np.ndarray], np.ndarray]
    prompt: str = "a photo"


COFFEE_MOVE = PhotoMove("coffee", (600, 400), COFFEE_CUP, (80.0, 0.0), red_glaze)
"""Cup and saucer 80 px right: the saucer's rim (x ≈ 70-480) stays 40 px inside the photo.
"a photo" is the caption the training gave photo crops."""
PHOTO_MOVE_RESOLUTION: int | None = None
"""Working resolution of the photo move (area ≈ N²); None: the photo's own area, sides rounded
to the model's size multiple (576×384 for the 600×400 coffee photo, about 2.5 minutes on 2 CPU
cores). The model's native 128 would squash that photo to 128×128 at a fifth of its size."""
BACKGROUND_MARGIN = 16
"""Pixels around the object's old and new places left out of the background PSNR: the edges
blend there."""


def polygon_mask(size: Size, polygon: Sequence[Point]) -> np.ndarray:
    """(H, W) bool of an image of `size` (width, height): True inside the polygon."""
    canvas = PIL.Image.new("L", size, 0)
    PIL.ImageDraw.Draw(canvas).polygon([tuple(p) for p in polygon], fill=255)
    return np.asarray(canvas) > 0


def shift_mask(mask: np.ndarray, shift: Point) -> np.ndarray:
    """The mask moved by (dx, dy), rounded to whole pixels; what leaves the image is dropped."""
    dx, dy = (round(s) for s in shift)
    h, w = mask.shape
    out = np.zeros_like(mask)
    if abs(dx) < w and abs(dy) < h:
        out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
            max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
        ]
    return out


def masked_psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """PSNR in dB of two uint8 (H, W, 3) images over the pixels where the (H, W) mask is True;
    NaN when it selects none."""
    if a.shape != b.shape or a.shape[:2] != where.shape:
        raise ValueError(f"shapes differ: {a.shape}, {b.shape}, mask {where.shape}")
    if not where.any():
        return math.nan
    return psnr(a[where], b[where])


def centroid(mask: np.ndarray) -> Point:
    """(x, y) mean pixel position of the mask; (NaN, NaN) when it is empty."""
    ys, xs = np.nonzero(mask)
    return (float(xs.mean()), float(ys.mean())) if len(xs) else (math.nan, math.nan)


def resampled(image: np.ndarray, size: Size) -> np.ndarray:
    """The image resized (Lanczos) to `size` and back to its own: what a round trip through a
    working size of `size` loses even when the model itself loses nothing."""
    own = (image.shape[1], image.shape[0])
    small = PIL.Image.fromarray(image).resize(size, PIL.Image.Resampling.LANCZOS)
    return np.asarray(small.resize(own, PIL.Image.Resampling.LANCZOS))


@dataclass
class PhotoMoveResult:
    """The measured photo move. Pixels are the photo's own."""

    photo: str
    size: Size
    working_size: Size
    steps: int
    shift: Point
    """The shift asked for."""
    moved: Point
    """The shift of the object's colour centroid, input → output, inside `region`."""
    object_pixels: tuple[int, int]
    """Pixels of the object's colour in `region`, input and output."""
    background_psnr: float
    resampling_psnr: float
    """The background PSNR of the photo only resized to the working size and back: a ceiling."""
    background_share: float
    """Share of the photo's pixels that count as background."""
    margin: int
    seconds: float = 0.0
    kept_moved: Point = (math.nan, math.nan)
    """`moved` of the output with the background kept (`keep_background`)."""
    kept_background_psnr: float = math.nan
    """`background_psnr` of the output with the background kept."""
    kept_margin: int | None = None
    """The kept background's margin, output pixels (None: not recorded)."""


def moved_places(mask: np.ndarray, shift: Point, margin: int = BACKGROUND_MARGIN) -> np.ndarray:
    """(H, W) bool: the object's old place and its place moved by `shift`, grown by `margin`;
    the rest is background."""
    return dilate(mask | shift_mask(mask, shift), margin)


def move_measures(
    photo: np.ndarray,
    output: np.ndarray,
    mask: np.ndarray,
    shift: Point,
    colour: Callable[[np.ndarray], np.ndarray],
    margin: int = BACKGROUND_MARGIN,
) -> dict:
    """The numbers of a move of `mask` by `shift` that turned `photo` into `output` (both uint8
    (H, W, 3) at the photo's size): background PSNR outside the old and new places grown by
    `margin`, and the shift of the centroid of the object's colour inside them."""
    places = moved_places(mask, shift, margin)
    before, after = colour(photo) & places, colour(output) & places
    (x0, y0), (x1, y1) = centroid(before), centroid(after)
    return {
        "moved": (x1 - x0, y1 - y0),
        "object_pixels": (int(before.sum()), int(after.sum())),
        "background_psnr": masked_psnr(output, photo, ~places),
        "background_share": float((~places).mean()),
    }


def own_area(size: Size) -> int:
    """√(width·height): the working resolution that keeps an image at about its own area."""
    return round(math.sqrt(size[0] * size[1]))


def check_move(
    pipe, photos: dict[str, PIL.Image.Image], task: PhotoMove, resolution: int | None
) -> int:
    """Raise InputError unless the photos hold the task's photo at its size, the shift keeps
    the object inside it, and `resolution` is a valid working resolution (None: the photo's own
    area); returns that resolution."""
    if task.photo not in photos:
        raise InputError(
            f"the photo move needs the {task.photo!r} photo, but the photos are "
            f"{', '.join(photos) or 'none'}; add it, or pass move=None to skip the move"
        )
    photo = photos[task.photo]
    if photo.size != tuple(task.size):
        raise InputError(
            f"the {task.photo} photo is {photo.width}×{photo.height}, but the object polygon is "
            f"drawn for {task.size[0]}×{task.size[1]}; pass the original photo"
        )
    mask = polygon_mask(photo.size, task.polygon)
    if shift_mask(mask, task.shift).sum() < mask.sum():
        raise InputError(
            f"moving the object by {task.shift} px takes part of it out of the "
            f"{photo.width}×{photo.height} photo; choose a smaller shift"
        )
    if resolution is None:
        resolution = own_area(photo.size)
    pipe.working_size(photo.size, resolution)
    return resolution


def photo_move(
    pipe,
    photo: PIL.Image.Image,
    task: PhotoMove = COFFEE_MOVE,
    resolution: int | None = PHOTO_MOVE_RESOLUTION,
    steps: int = 50,
    seed: int = 42,
    margin: int = BACKGROUND_MARGIN,
) -> tuple[PhotoMoveResult, PIL.Image.Image, PIL.Image.Image]:
    """Move the task's object in the photo with `pipe.move` (DiffEditor mode, output at the
    photo's own size, working size from `resolution`, None: the photo's own area) and measure
    the model's whole re-synthesised image (`keep_background=False`) and the same edit with the
    background kept (`with_background_kept`, no second sampling); returns the numbers, the
    re-synthesised photo and the photo with its background kept."""
    photo = photo.convert("RGB")
    resolution = check_move(pipe, {task.photo: photo}, task, resolution)
    mask = polygon_mask(photo.size, task.polygon)
    started = time.perf_counter()
    source = centroid(mask)
    target = (source[0] + task.shift[0], source[1] + task.shift[1])
    result = pipe.move(
        photo,
        mask,
        source,
        target,
        prompt=task.prompt,
        num_inference_steps=steps,
        seed=seed,
        resolution=resolution,
        output_size="input",
        keep_background=False,
    )
    before, after = as_array(photo), as_array(result.image)
    working = tuple(result.record["working_size"])
    measures = move_measures(before, after, mask, task.shift, task.colour, margin)
    kept = result.with_background_kept()
    with_kept = move_measures(before, as_array(kept.image), mask, task.shift, task.colour, margin)
    ceiling = resampled(before, working)
    background = ~moved_places(mask, task.shift, margin)
    numbers = PhotoMoveResult(
        photo=task.photo,
        size=photo.size,
        working_size=working,
        steps=steps,
        shift=task.shift,
        resampling_psnr=masked_psnr(ceiling, before, background),
        margin=margin,
        seconds=time.perf_counter() - started,
        kept_moved=with_kept["moved"],
        kept_background_psnr=with_kept["background_psnr"],
        kept_margin=kept.record["background_margin"],
        **measures,
    )
    return numbers, result.image, kept.image


def photo_move_figure(
    photo: PIL.Image.Image,
    output: PIL.Image.Image,
    task: PhotoMove,
    cell: int = 384,
    kept: PIL.Image.Image | None = None,
) -> PIL.Image.Image:
    """One row: the photo with the object's outline and the move's arrow | the edited photo
    | (if given) the edited photo with its background kept."""
    mask = polygon_mask(photo.size, task.polygon)
    source = centroid(mask)
    target = (source[0] + task.shift[0], source[1] + task.shift[1])
    dx, dy = task.shift
    row = [annotate(photo, cell, [mask], [(source, target)]), output]
    headers = [f"input: object, move {dx:+.0f}, {dy:+.0f} px", "output, keep_background=False"]
    if kept is not None:
        row.append(kept)
        headers.append("output (background kept: the default)")
    return contact_sheet(
        [row],
        [task.photo],
        headers,
        cell=cell,
        label_width=110,
        cell_height=round(cell * photo.height / photo.width),
    )


# ---------------------------------------------------------------------------------------------
# The report.


@dataclass
class ModelReport:
    """Every measured number and the figures of `docs/demo-model.md`.

    Images are named "scene <seed>" (held-out procedural scenes at the native resolution) or
    "photo <name>" (at their own size, sides rounded to the model's size multiple).
    """

    model: str
    device: str
    parameters: dict[str, int]
    steps: int
    sizes: dict[str, Size]
    vae_psnr: dict[str, float]
    inversion_psnr: dict[str, dict[str, float]]
    """image → "plain" / "bank" → dB."""
    correspondence: dict[int, dict[str, float]]
    """timestep → block, or blocks compared together (`summed`) → mean error in cells of that
    block (of the finest of those blocks)."""
    correspondence_scenes: int
    feature_grids: dict[str, int]
    """block (or blocks compared together) → side of its grid on a native-resolution scene."""
    energy_blocks: dict[str, list[str]] = field(default_factory=dict)
    """block, or blocks compared together → the edits whose energies compare exactly those."""
    photo_move: PhotoMoveResult | None = None
    """The object moved in a held-out photo (figure "photo-move"); None when not measured."""
    attention_entropy: dict[int, dict[str, float]] = field(default_factory=dict)
    """timestep → token grid → mean normalised entropy of the decoder self-attention."""
    correspondence_inverted: dict[int, dict[str, float]] = field(default_factory=dict)
    """As `correspondence`, each image brought to t by its own DDIM inversion ({}: not run)."""
    named_colours: dict[str, list[str]] = field(default_factory=dict)
    """colour named in COLOUR_CAPTION → the dominant object colour of each seed's sample ({}:
    not run)."""
    named_shapes: dict[str, list[str]] = field(default_factory=dict)
    """shape named in SHAPE_CAPTION → the best-fitting shape class of each seed's sample ({}:
    not run)."""
    feature_levels: dict[int, list[str]] = field(default_factory=dict)
    """Each timestep at which edits read their energies' features at noisier guided steps →
    those edits (`feature_levels`); {}: every edit reads at each step's own level."""
    correspondence_at_level: dict[int, dict[str, dict[int, dict[str, float]]]] = field(
        default_factory=dict
    )
    """level → "noised" / "inverted" → t above the level → as `correspondence`, for what that
    level's edits compare (`level_blocks`): the shifted scene brought from t to the level and
    read there, the scene read there ({}: no level)."""
    level_substeps: dict[int, dict[str, int]] = field(default_factory=dict)
    """level → block (or blocks compared together) → in how many DDIM steps its rows of
    `correspondence_at_level` bring the shifted scene to the level: as the level's edits that
    compare it do (`block_substeps`; where they differ, the number most of them name, which the
    report's words then give for all of them). Always on an INVERSION_STEPS-step grid, whatever
    steps the edits run."""
    seconds: float = 0.0
    figures: dict[str, PIL.Image.Image] = field(default_factory=dict)

    def reading_level(self, edit: str) -> int | None:
        """The level at which `edit` reads its features at noisier steps; None: its own."""
        return next((t for t, edits in self.feature_levels.items() if edit in edits), None)


def energy_blocks(pipe) -> dict[str, list[str]]:
    """What an edit's energies compare → those edits: one block ("up_blocks[2]"), or several
    compared together (`summed`, "up_blocks[1]+up_blocks[2]": their cosines add up)."""
    used: dict[str, list[str]] = {}
    for edit in WEIGHTS:
        blocks = pipe.features_for(edit).blocks
        used.setdefault(summed(blocks), []).append(edit)
    return used


def feature_levels(pipe) -> dict[int, list[str]]:
    """Each timestep at which some of the model's edits read their energies' features at noisier
    guided steps (`feature_timestep` of their weights, on the grid of an INVERSION_STEPS-step
    run, as the sampler puts it) → those edits, the least noisy level first; {} where every
    edit reads at each step's own level."""
    steps = DDIMTimesteps(pipe.scheduler, INVERSION_STEPS)
    levels: dict[int, list[str]] = {}
    for edit in WEIGHTS:
        timestep = pipe.edit_defaults.weights(edit).feature_timestep
        if timestep:
            levels.setdefault(steps.timesteps[nearest_step(steps, timestep)], []).append(edit)
    return dict(sorted(levels.items()))


def measured_blocks(pipe) -> list[str]:
    """The keys `correspondence_errors` measures: each of DragonDiffusion's blocks
    ("up_blocks[i]"), then, with several, the blocks compared together (`summed`)."""
    blocks = [f"up_blocks[{b}]" for b in pipe.features.blocks]
    return blocks + ([summed(pipe.features.blocks)] if len(blocks) > 1 else [])


def level_blocks(pipe, level_edits: Sequence[str]) -> list[str]:
    """Of `measured_blocks`, what these edits' energies compare (a block, or blocks summed:
    `energy_blocks`) and each block of such a sum alone."""
    compared = [key for key, users in energy_blocks(pipe).items() if set(users) & set(level_edits)]
    parts = {block for key in compared for block in key.split("+")}
    return [key for key in measured_blocks(pipe) if key in compared or key in parts]


def feature_substeps(pipe, edits: Sequence[str]) -> int:
    """In how many DDIM steps these edits bring a noisier step's prediction to their level
    (`feature_substeps` of their weights); where they differ, the number most of them name."""
    counts = [int(pipe.edit_defaults.weights(edit).feature_substeps) for edit in edits]
    return max(sorted(set(counts)), key=counts.count) if counts else 1


def block_substeps(pipe, level_edits: Sequence[str], blocks: Iterable[str]) -> dict[str, int]:
    """Each block (or blocks compared together) → the substeps of the level edits that compare
    exactly it (`energy_blocks`); a comparison no level edit makes: those of all of them."""
    used = energy_blocks(pipe)
    fallback = feature_substeps(pipe, level_edits)
    steps = {}
    for block in blocks:
        edits = [e for e in used.get(block, []) if e in level_edits]
        steps[block] = feature_substeps(pipe, edits) if edits else fallback
    return steps


def correspondence_at_level(
    pipe,
    seeds: Sequence[int],
    timesteps: Iterable[int],
    level: int,
    level_edits: Sequence[str],
    latents: str = "inverted",
    cache: dict | None = None,
) -> tuple[dict[int, dict[str, float]], dict[str, int]]:
    """`mean_correspondence` read at `level` from every noisier timestep, for what the level's
    edits compare (`level_blocks`), each block (or blocks compared together) brought there in
    the substeps of the level edits that compare it (`block_substeps`; one pass over the scenes
    per distinct number); also those numbers."""
    steps = block_substeps(pipe, level_edits, level_blocks(pipe, level_edits))
    found = {}
    for t in (t for t in timesteps if t > level):
        by_steps = {
            k: mean_correspondence(
                pipe, seeds, t, latents=latents, cache=cache, read_at=level, substeps=k
            )
            for k in sorted(set(steps.values()))
        }
        found[t] = {block: by_steps[k][block] for block, k in steps.items()}
    return found, steps


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else math.nan


def own_size(pipe, photo: PIL.Image.Image) -> PIL.Image.Image:
    """A photo at about its own area, sides rounded to the model's size multiple."""
    return model_input(pipe, photo, pipe.working_size(photo.size, own_area(photo.size)))


def normalised_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy of attention weights (…, T) over their last axis, divided by log T: 1 for uniform
    attention (every token alike), 0 for attention on a single token."""
    tokens = weights.shape[-1]
    if tokens < 2:
        return torch.zeros(weights.shape[:-1])
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1)
    return entropy / math.log(tokens)


def attention_entropy(pipe, seeds: Sequence[int], timestep: int) -> dict[str, float]:
    """Mean normalised entropy of the decoder self-attention (the memory bank's layers) on
    held-out scenes noised to `timestep`, per token grid ("16×16", …). Near 1 the attention is
    almost uniform: it pools the image rather than matching tokens, so swapping its keys and
    values for another image's (the memory bank) cannot carry content to matching places."""
    values: dict[str, list[float]] = {}

    def probe(layer: str, query: torch.Tensor, key: torch.Tensor) -> None:
        weights = torch.softmax(query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5, dim=-1)
        side = round(math.sqrt(key.shape[-2]))
        values.setdefault(f"{side}×{side}", []).append(normalised_entropy(weights).mean().item())

    side = pipe.native_resolution
    latent = side // pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, latent, latent)
    pipe.memory_bank.probe = probe
    try:
        for seed in seeds:
            scene = scenes.random_scene(seed, side)
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            noisy, step = noised_latent(pipe, scenes.render(scene)[0], timestep, noise)
            with torch.no_grad():
                pipe.unet(noisy, step, pipe.encode_text(scenes.caption(scene))[0])
    finally:
        pipe.memory_bank.probe = None
    by_side = sorted(values.items(), key=lambda kv: int(kv[0].split("×")[0]))
    return {grid: mean(v) for grid, v in by_side}


def mean_correspondence(
    pipe,
    seeds: Sequence[int],
    timestep: int,
    offset_cells: tuple[int, int] = (1, 1),
    latents: str = "noised",
    cache: dict | None = None,
    read_at: int | None = None,
    substeps: int = 1,
) -> dict[str, float]:
    """Mean matching error per block over all object cells of the scenes with these seeds
    (`latents`, `cache`, `read_at`, `substeps`: as in `correspondence_errors`)."""
    if latents not in LATENTS:
        raise InputError(f"latents must be one of {', '.join(LATENTS)}, not {latents!r}")
    errors: dict[str, list[np.ndarray]] = {}
    for seed in seeds:
        scene = scenes.random_scene(seed, pipe.native_resolution)
        found = correspondence_errors(
            pipe, scene, offset_cells, timestep, 0, latents, cache, read_at, substeps
        )
        for block, e in found.items():
            errors.setdefault(block, []).append(e)
    return {block: mean(np.concatenate(e)) for block, e in errors.items()}


def measure(
    pipe,
    photos: dict[str, PIL.Image.Image],
    scene_seeds: Sequence[int] = range(16),
    inversion_scenes: int = 4,
    correspondence_seeds: Sequence[int] = range(16),
    steps: int = 50,
    captions: Sequence[str] = SAMPLE_CAPTIONS,
    sample_seeds: Sequence[int] = (0, 1),
    timesteps: Sequence[int] = CORRESPONDENCE_TIMESTEPS,
    move: PhotoMove | None = COFFEE_MOVE,
    photo_resolution: int | None = PHOTO_MOVE_RESOLUTION,
    log: Callable[[str], None] = print,
) -> ModelReport:
    """Measure a loaded pipeline on held-out scenes and photos (see the module doc).

    The VAE runs on every scene of `scene_seeds` and every photo; the inversion on the first
    `inversion_scenes` scenes and every photo (prompt: the scene's caption, "a photo"). `move`
    (None: skipped) runs on `photos[move.photo]` with `steps` steps at `photo_resolution`
    (None: the photo's own area).
    """
    if move is not None:  # fail now, not after the other measurements
        check_move(pipe, photos, move, photo_resolution)
    started = time.perf_counter()
    side = pipe.native_resolution
    images, prompts = {}, {}
    for seed in scene_seeds:
        scene = scenes.random_scene(seed, side)
        images[f"scene {seed}"] = PIL.Image.fromarray(scenes.render(scene)[0])
        prompts[f"scene {seed}"] = scenes.caption(scene)
    for name, photo in photos.items():
        images[f"photo {name}"] = own_size(pipe, photo)
        prompts[f"photo {name}"] = "a photo"

    log(f"VAE round trip: {len(images)} images")
    vae = {name: vae_round_trip(pipe, image) for name, image in images.items()}
    inverted = [f"scene {s}" for s in scene_seeds[:inversion_scenes]]
    inverted += [f"photo {n}" for n in photos]
    trips = {}
    for name in inverted:
        log(f"inversion round trip, {steps} steps: {name} ({prompts[name]!r})")
        trips[name] = inversion_round_trip(pipe, images[name], prompts[name], steps)

    log(f"feature correspondence: {len(correspondence_seeds)} scenes at t = {list(timesteps)}")
    correspondence = {t: mean_correspondence(pipe, correspondence_seeds, t) for t in timesteps}
    log(f"the same on DDIM-inverted latents ({INVERSION_STEPS}-step inversions)")
    kept: dict = {}  # each scene's inversion, read at every timestep
    on_inversions = {
        t: mean_correspondence(pipe, correspondence_seeds, t, latents="inverted", cache=kept)
        for t in timesteps
    }
    levels = feature_levels(pipe)
    at_level: dict[int, dict[str, dict[int, dict[str, float]]]] = {}
    substeps: dict[int, dict[str, int]] = {}
    for level, level_edits in levels.items():
        log(f"the same read at t = {level} from the noisier levels (as {', '.join(level_edits)})")
        for latents in LATENTS:
            at_level.setdefault(level, {})[latents], substeps[level] = correspondence_at_level(
                pipe, correspondence_seeds, timesteps, level, level_edits, latents, kept
            )
    del kept
    latent = side // pipe.vae_scale_factor
    # feature_blocks picks the decoder blocks at 1/2 and 1/1 of the latent resolution; the two
    # compared together are on the finer block's grid.
    grids = dict(zip(measured_blocks(pipe), (latent // 2, latent, latent), strict=True))

    entropy_seeds = correspondence_seeds[:ENTROPY_SCENES]
    log(f"decoder self-attention entropy: {len(entropy_seeds)} scenes at t = {list(timesteps)}")
    entropy = {t: attention_entropy(pipe, entropy_seeds, t) for t in timesteps}

    log(f"text to image: {len(captions)} captions × {len(sample_seeds)} seeds, {steps} steps")
    samples = text_to_image(pipe, captions, sample_seeds, steps)
    log(f"named colours: {len(scenes.OBJECT_COLOURS)} captions × {len(sample_seeds)} seeds")
    colours = named_colours(pipe, seeds=sample_seeds, steps=steps)
    log(f"named shapes: {len(scenes.SHAPE_CLASSES)} captions × {len(sample_seeds)} seeds")
    shapes = named_shapes(pipe, seeds=sample_seeds, steps=steps)

    moved = None
    if move is not None:
        at = "its own area" if photo_resolution is None else f"area ≈ {photo_resolution}²"
        log(f"photo move: {move.photo} by {move.shift} px, {steps} steps at {at}")
        moved, edited, kept_bg = photo_move(pipe, photos[move.photo], move, photo_resolution, steps)

    report = ModelReport(
        model=pipe.model_name,
        device=str(pipe.device),
        parameters={
            n: sum(p.numel() for p in getattr(pipe, n).parameters())
            for n in ("unet", "vae", "text_encoder")
        },
        steps=steps,
        sizes={name: image.size for name, image in images.items()},
        vae_psnr={n: psnr(as_array(vae[n]), as_array(images[n])) for n in images},
        inversion_psnr={
            n: {mode: psnr(as_array(out), as_array(images[n])) for mode, out in trip.items()}
            for n, trip in trips.items()
        },
        correspondence=correspondence,
        correspondence_scenes=len(correspondence_seeds),
        feature_grids=grids,
        energy_blocks=energy_blocks(pipe),
        photo_move=moved,
        attention_entropy=entropy,
        correspondence_inverted=on_inversions,
        named_colours=colours,
        named_shapes=shapes,
        feature_levels=levels,
        correspondence_at_level=at_level,
        level_substeps=substeps,
    )
    report.figures["reconstruction"] = contact_sheet(
        [[images[n], vae[n], trips[n]["plain"], trips[n]["bank"]] for n in trips],
        list(trips),
        ["input", "VAE", "inversion, plain DDIM", "inversion + bank"],
        cell=160,
        label_width=110,
    )
    report.figures["samples"] = contact_sheet(
        samples, list(captions), [f"seed {s}" for s in sample_seeds], cell=160, label_width=200
    )
    if move is not None:
        report.figures["photo-move"] = photo_move_figure(
            photos[move.photo], edited, move, kept=kept_bg
        )
    report.seconds = time.perf_counter() - started
    return report


# ---------------------------------------------------------------------------------------------
# Writing docs/demo-model.md.


def save_figure(image: PIL.Image.Image, path: Path, limit: int = MAX_FIGURE_BYTES) -> Path:
    """Write a PNG of at most `limit` bytes: as is if it fits, else with a 256-colour palette,
    else halved in size until it fits (figures are committed to the repository)."""

    def encoded(im: PIL.Image.Image) -> bytes:
        buffer = io.BytesIO()
        im.save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()

    data = encoded(image)
    while len(data) > limit:
        palette = image.quantize(256, method=PIL.Image.Quantize.MEDIANCUT)
        data = encoded(palette)
        if len(data) > limit:
            image = image.resize(
                (image.width // 2, image.height // 2), PIL.Image.Resampling.LANCZOS
            )
            data = encoded(image)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _db(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return "∞" if math.isinf(value) else f"{value:.1f} dB"


def energy_users(report: ModelReport, block: str) -> tuple[list[str], str]:
    """The edits whose energies compare exactly `block` (a block or blocks summed), and the
    table's words for who compares it."""
    used = report.energy_blocks.get(block, [])
    within = [key for key in report.energy_blocks if block in key.split("+")]
    if used:
        return used, f"; energies of {', '.join(used)}" if len(used) < len(WEIGHTS) else ""
    if within:
        return used, "; in the energies only with " + ", ".join(
            " + ".join(b for b in key.split("+") if b != block) for key in within
        )
    return used, "; energies of none"


def markdown(report: ModelReport, images: dict[str, str]) -> str:
    """The text of docs/demo-model.md; `images` maps figure names to paths relative to it."""
    scene_names = [n for n in report.vae_psnr if n.startswith("scene ")]
    photo_names = [n for n in report.vae_psnr if n.startswith("photo ")]
    inverted = [n for n in report.inversion_psnr if n.startswith("scene ")]
    scene_size = "×".join(map(str, report.sizes[scene_names[0]])) if scene_names else "?"
    params = ", ".join(f"{n} {v / 1e6:.2f} M" for n, v in report.parameters.items())
    lines = [
        "# The embedded demo model: measurements",
        "",
        f"Measured by `python scripts/evaluate_demo_model.py` with dragondiffusion "
        f"{__version__} on `{report.device}` in {report.seconds / 60:.1f} minutes.",
        f"Model: `{report.model}` ({params} parameters). Held-out scenes are procedural scenes "
        "with seeds below the training script's `TRAIN_SEED_FLOOR`, at "
        f"{scene_size}; held-out photos are scikit-image's, never seen in training, at about "
        "their own size.",
        "",
        "| measurement | images | result | target |",
        "|---|---|---|---|",
        f"| VAE reconstruction PSNR, mean | {len(scene_names)} scenes | "
        f"{_db(mean(report.vae_psnr[n] for n in scene_names))} | ≥ 30 dB |",
    ]
    for name in photo_names:
        size = "×".join(map(str, report.sizes[name]))
        lines.append(
            f"| VAE reconstruction PSNR | {name} ({size}) | {_db(report.vae_psnr[name])} | |"
        )
    for mode, label in (("plain", "plain DDIM"), ("bank", "with the memory bank, as edits")):
        lines.append(
            f"| inversion → reconstruction PSNR, {report.steps} steps, {label}, mean | "
            f"{len(inverted)} scenes | "
            f"{_db(mean(report.inversion_psnr[n][mode] for n in inverted))} | ≥ 25 dB |"
        )
        for name in photo_names:
            lines.append(
                f"| inversion → reconstruction PSNR, {report.steps} steps, {label} | {name} | "
                f"{_db(report.inversion_psnr[name][mode])} | |"
            )
    protocols: list[tuple[str, dict[int, dict[str, float]], int | None, bool]] = [
        ("noised", report.correspondence, None, True)
    ]
    if report.correspondence_inverted:
        protocols.append(("DDIM-inverted", report.correspondence_inverted, None, False))
    for level, by_latents in report.correspondence_at_level.items():
        for latents, measured in by_latents.items():
            how = "noised" if latents == "noised" else "DDIM-inverted"
            protocols.append((f"{how}, read at t = {level}", measured, level, latents == "noised"))
    for (how, measured, level, noised), t in itertools.product(protocols, report.correspondence):
        fading = noised and t > DIFT_TIMESTEP  # no energy compares these: no target
        for block, error in measured.get(t, {}).items():
            compared, who = energy_users(report, block)
            if level is not None:  # the edits that read this block at the level
                used = [e for e in compared if e in report.feature_levels[level]]
                if used:
                    who = f"; energies of {', '.join(used)}" if len(used) < len(WEIGHTS) else ""
            else:  # edits that read at a level at t compare these features only in its rows
                elsewhere: dict[int, list[str]] = {}
                for edit in compared:
                    at = report.reading_level(edit)
                    if at is not None and t > at:
                        elsewhere.setdefault(at, []).append(edit)
                used = [e for e in compared if not any(e in v for v in elsewhere.values())]
                for at, edits in sorted(elsewhere.items()):
                    who += f"; read at t = {at} by {', '.join(edits)}"
                if elsewhere and used:  # "; resize reads here", not "..., resize here"
                    who += f"; {', '.join(used)} read{'s' if len(used) == 1 else ''} here"
            side = report.feature_grids[block]
            what = block.replace("+", " + ") + (", summed cosines" if "+" in block else "")
            brought = 1 if level is None else report.level_substeps.get(level, {}).get(block, 1)
            steps = f" in {brought} DDIM steps" if brought > 1 else ""
            lines.append(
                f"| feature correspondence error, t = {t}, {how}{steps}, {what} "
                f"({side}×{side} cells{who}) | "
                f"{report.correspondence_scenes} scenes | {error:.2f} cells | "
                f"{'≤ 1 cell' if used and not fading else '–'} |"
            )
    named = (
        (
            report.named_colours,
            COLOUR_CAPTION.format("<colour>"),
            "dominant object colour is the named one",
            len(scenes.OBJECT_COLOURS),
        ),
        (
            report.named_shapes,
            SHAPE_CAPTION.format("<shape>"),
            "red region is best fitted by the named shape",
            len(scenes.SHAPE_CLASSES),
        ),
    )
    for found, caption, what, classes in named:
        if found:
            lines.append(
                f'| text to image, "{caption}" (CFG 4): samples whose {what} (chance 1 in '
                f"{classes}) | {sum(len(v) for v in found.values())} samples | "
                f"{named_share(found):.0%} | |"
            )
    for t, grids in report.attention_entropy.items():
        for grid, value in grids.items():
            lines.append(
                f"| decoder self-attention entropy, t = {t}, {grid} tokens (1 = uniform) | "
                f"{min(ENTROPY_SCENES, report.correspondence_scenes)} scenes | {value:.3f} | |"
            )
    lines += [
        "",
        "PSNR compares with the input at the size the model sees. Inversion uses the scene's "
        'caption (photos: "a photo") and samples back from z_T with the same prompt, no '
        "classifier-free guidance and no energy guidance. Correspondence: every object of a "
        "scene moved by one cell of the coarse feature block, each image brought to t by "
        "fresh random noise of its own (noised; DIFT's protocol) or by its own "
        f"{INVERSION_STEPS}-step DDIM inversion with its caption (DDIM-inverted: what the "
        "energies compare, whose reference features come from the inversion's trajectory "
        "and whose sampling starts from its z_T); "
        "for each object cell of the first image, the cell of the second with the highest "
        "cosine similarity of the features of DragonDiffusion's two decoder blocks (1/16 and "
        "1/8 of the image), each alone and the two together (the sum of their cosines on the "
        "finer grid, the coarser block upsampled nearest: roughly the displacement an energy "
        "that sums one term per block favours); the mean distance to the true cell, in "
        "cells of that block (together: of the finer one). The target applies to what an "
        "edit's energies compare (`feature_blocks` in the model's dragondiffusion.json; "
        "unnamed edits compare both blocks) at the level they read it, DDIM-inverted, and "
        f"to DIFT's protocol at DIFT's t = {DIFT_TIMESTEP}; the noised rows at noisier t have "
        "none, since no energy compares two images each under fresh noise (the reference "
        "features are the inversion's, the edited latent follows the sampler's deterministic "
        "path from the inversion's z_T, with a little fresh noise inside the edit at the "
        "regional-SDE steps): they show how fast the features fade under noise. The edits' "
        "levels: " + levels_text(report) + "Attention entropy: the entropy of the softmax "
        "weights of the decoder self-attention layers (those the memory bank swaps) divided by "
        "log(tokens); near 1 the attention is almost uniform, pooling the image instead of "
        "matching tokens, so the memory bank cannot carry content to matching places.",
        "",
    ]
    checks = [("colours", report.named_colours), ("shapes", report.named_shapes)]
    missed = {
        what: "; ".join(
            f"{named} → {', '.join(n or 'none' for n in names if n != named)}"
            for named, names in found.items()
            if any(n != named for n in names)
        )
        or "none"
        for what, found in checks
        if found
    }
    if missed:
        lines += [
            "Named colours and shapes: each pixel of a sample goes to the nearest of the scene "
            "generator's object and background colours; the object colour with most pixels is "
            "the sample's colour. Its shape: the largest connected red region, against each "
            "shape class's outline with the region's area, centroid on its centroid, at the "
            f"best of {SHAPE_ANGLES} rotations; the class with the highest intersection over "
            "union (every single object of 40 rendered scenes gets its own class). Missed: "
            + "; ".join(f"{what}: {text}" for what, text in missed.items())
            + ".",
            "",
        ]
    titles = {
        "reconstruction": "Input, VAE reconstruction, and inversion round trips",
        "samples": "Text-to-image samples (CFG 4)",
    }
    for name, path in images.items():
        if name != "photo-move":
            lines += [f"## {titles.get(name, name)}", "", f"![{name}]({path})", ""]
    if report.photo_move is not None:
        lines += photo_move_section(report.photo_move, images.get("photo-move"))
    return "\n".join(lines)


def levels_text(report: ModelReport) -> str:
    """Where the model's edits read their features, in words (`feature_levels`)."""
    if not report.feature_levels:
        return "each guided step's own. "
    where = "; ".join(f"{', '.join(e)} at t = {t}" for t, e in report.feature_levels.items())
    edits = [e for users in report.energy_blocks.values() for e in users]
    own = [e for e in WEIGHTS if e in edits and report.reading_level(e) is None]
    return (
        "the model's edits read their features at a fixed level at every noisier guided step "
        f"(`feature_timestep` in its dragondiffusion.json; {where}"
        + ("; a resize is a move with a scale other than 1" if "resize" in edits else "")
        + "): the step's own latent is brought there by "
        + steps_down(report)
        + ", and the reference features are the inversion's at that level; the rows 'read at "
        f"t = …' measure that on a {INVERSION_STEPS}-step run's grid (the first image read at "
        "the level, the shifted one brought there from t the same way, each DDIM step with one "
        "plain conditional UNet pass: the sampler's first one, its own predicted noise, also "
        "carries the memory bank). "
        + (f"{', '.join(own)} read at each step's own level. " if own else "")
    )


def steps_down(report: ModelReport) -> str:
    """How the level edits bring a latent to their level, in words (`level_substeps`)."""
    edits: dict[int, list[str]] = {}
    for level, level_edits in report.feature_levels.items():
        for block, users in report.energy_blocks.items():
            for edit in users:
                if edit in level_edits:
                    k = report.level_substeps.get(level, {}).get(block, 1)
                    edits.setdefault(k, []).append(edit)

    def words(k: int) -> str:
        if k == 1:
            return "one deterministic DDIM step with the UNet's predicted noise"
        return (
            f"{k} deterministic DDIM steps of about equal length on the run's own grid "
            "(`feature_substeps`), each with the UNet's predicted noise"
        )

    if len(edits) <= 1:
        return words(next(iter(edits), 1))
    return " or by ".join(f"{words(k)} ({', '.join(edits[k])})" for k in sorted(edits))


def _px(value: float) -> str:
    return "not found" if math.isnan(value) else f"{value:+.1f} px"


def photo_move_section(result: PhotoMoveResult, figure: str | None) -> list[str]:
    """The lines of the "Moving an object in a held-out photo" section; `figure` is the path
    of its picture relative to the markdown, if any."""
    w, h = result.size
    ww, wh = result.working_size
    (dx, dy), (mx, my) = result.shift, result.moved
    before, after = result.object_pixels
    kept = f"{after / before:.0%}" if before else "n/a"
    kx, ky = result.kept_moved
    own = (ww * wh) / (w * h)
    lines = [
        "## Moving an object in a held-out photo",
        "",
        f"The cup with its saucer in scikit-image's `{result.photo}` photo ({w}×{h}, never seen "
        f"in training), moved {dx:+.0f}, {dy:+.0f} px by `pipe.move` (DiffEditor mode, "
        f'prompt "a photo", {result.steps} steps) at a working size of {ww}×{wh} '
        f"({own:.0%} of the photo's area; sides are multiples of the model's size multiple), "
        "the output "
        f"resized back to the photo's own size; {result.seconds:.0f} s.",
        "",
        "| measurement | result |",
        "|---|---|",
        f"| object shift asked, x / y | {_px(dx)} / {_px(dy)} |",
        f"| `keep_background=False`: object shift measured (centroid of the cup's red glaze), "
        f"x / y | {_px(mx)} / {_px(my)} |",
        f"| `keep_background=False`: red-glaze pixels, output / input | {after} / {before} "
        f"({kept}) |",
        f"| `keep_background=False`: background PSNR against the photo "
        f"({result.background_share:.0%} of it) | {_db(result.background_psnr)} |",
        f"| the photo only resized to {ww}×{wh} and back (the ceiling of the above) | "
        f"{_db(result.resampling_psnr)} |",
        f"| background kept (the default): object shift measured, x / y | {_px(kx)} / {_px(ky)} |",
        f"| background kept (the default): background PSNR | {_db(result.kept_background_psnr)} |",
        "",
        "The background is every pixel more than "
        f"{result.margin} px away from the object's old and new places (their edges blend). "
        "The object's colour is a fixed rule (green < 0.3 × red, red > 40) that picks the "
        "cup's and saucer's glaze and not the wooden table; its centroid is taken inside the "
        "same old-and-new area, in the photo and in the output. The model re-synthesises "
        "every pixel, so its background drifts (the ceiling row is what the resizing alone "
        "costs); by default (`keep_background=True`) the photo's own pixels are put back beyond "
        f"{'a margin' if result.kept_margin is None else f'{result.kept_margin} px'} of the "
        "object's old and new places (the default margin: one feature cell of the working "
        "image, the outer half a feathered seam; the same edit, from "
        "`result.with_background_kept()`, no second sampling).",
        "",
    ]
    if figure:
        lines += [f"![photo-move]({figure})", ""]
    return lines


def write_report(report: ModelReport, out: str | Path, appendix: str = "") -> Path:
    """Write out/demo-model.md (then `appendix`) and its figures out/images/demo-model-<name>.png;
    return the md."""
    out = Path(out)
    images = {}
    for name, figure in report.figures.items():
        save_figure(figure, out / "images" / f"demo-model-{name}.png")
        images[name] = f"images/demo-model-{name}.png"
    text = markdown(report, images) + appendix
    return atomic_write(out / "demo-model.md", lambda tmp: Path(tmp).write_text(text, "utf-8"))
