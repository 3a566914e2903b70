"""How good is a model for editing? The measurements of `docs/demo-model.md`.

- VAE reconstruction PSNR: encode (posterior mean) and decode, against the image at the size the
  model sees.
- DDIM inversion → reconstruction PSNR: `pipe.invert`, then deterministic DDIM back from z_T with
  the conditional prompt, no CFG and no guidance; once plain and once with the memory bank
  replacing the decoder self-attention K/V at every step (what the edits do outside the edit).
- Text-to-image samples for a few captions.
- Decoder-feature correspondence: a scene and the same scene with every object moved by a known
  offset; for each object cell of the first, the arg-max-cosine cell of the second; the mean
  distance to the true cell, per feature block, in that block's own cells. The features are the
  ones the energies compare (`pipe.features`), at a noise level given by a timestep.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from . import __version__, scenes
from .attention import BankMode
from .ddim import DDIMTimesteps
from .figures import contact_sheet
from .geometry import Size, mask_to_grid
from .inversion import Inversion
from .io import atomic_write
from .sampler import EditPlan, Evaluations, GuidanceSchedule, Sampler

SAMPLE_CAPTIONS = (
    "a red circle on a blue floor",
    "a yellow striped star on a noisy green background",
    "a blue square and a pink heart on a beige and grey gradient",
    "a green dotted triangle and a white ring on a brown floor",
)
"""Captions for the text-to-image grid, in the scene captions' vocabulary."""
CORRESPONDENCE_TIMESTEPS = (261, 501, 741)
"""Noise levels of the correspondence check: DIFT's t = 261 and two inside the guided steps."""
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


def reconstruct(pipe, inversion: Inversion, bank: bool) -> torch.Tensor:
    """z_0 (1, 4, h, w) sampled back from the inversion's z_T: deterministic DDIM, conditional
    prompt, no CFG, no energy; with `bank` the decoder self-attention takes the recorded K/V at
    every step (replace mode), as the edits do."""
    n = inversion.num_steps
    cond, uncond = pipe.encode_text(inversion.prompts[0])
    z_T = inversion.latents[-1][:1]
    plan = EditPlan(
        edit="reconstruction",
        z_init=z_T,
        energy=None,
        edit_mask=torch.zeros_like(z_T[:, :1]),
        bank_mode=BankMode.REPLACE if bank else BankMode.OFF,
        bank_steps=range(n),
        guidance_scale=1.0,
        energy_scale=0.0,
        k=0.0,
    )
    sampler = Sampler(
        unet=pipe.unet,
        features=pipe.features,
        bank=pipe.memory_bank,
        inversion=inversion,
        plan=plan,
        schedule=GuidanceSchedule("unguided", n, frozenset()),
        steps=DDIMTimesteps(pipe.scheduler, n),
        cond=cond,
        uncond=uncond,
        counts=Evaluations(),
    )
    return sampler.run()


def inversion_round_trip(
    pipe, image: PIL.Image.Image, prompt: str, steps: int = 50
) -> dict[str, PIL.Image.Image]:
    """The image inverted with `steps` DDIM steps and sampled back: {"plain": …, "bank": …}."""
    inversion = pipe.invert(
        image, prompt, steps, resolution=round(math.sqrt(math.prod(image.size)))
    )
    return {
        mode: pipe.decode(reconstruct(pipe, inversion, bank=mode == "bank"))
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


# ---------------------------------------------------------------------------------------------
# Feature correspondence.


def shifted(scene: scenes.Scene, dx: float, dy: float) -> scenes.Scene:
    """The scene with every object moved by (dx, dy) pixels; the background stays."""
    for index in range(len(scene.objects)):
        scene = scenes.move_object(scene, index, dx, dy)
    return scene


@torch.no_grad()
def decoder_features(
    pipe, image: np.ndarray, prompt: str, timestep: int, noise: torch.Tensor
) -> list[torch.Tensor]:
    """The energies' decoder feature maps, each (C, h, w) at its block's own resolution, of the
    image's latent noised to `timestep` with `noise` (1, 4, H/8, W/8)."""
    size = (image.shape[1], image.shape[0])
    x = pipe.image_processor.preprocess(PIL.Image.fromarray(image), height=size[1], width=size[0])
    z0 = pipe.vae.encode(x.to(pipe.device, pipe.vae.dtype)).latent_dist.mean
    z0 = z0 * pipe.vae.config.scaling_factor
    t = torch.tensor([timestep], device=pipe.device)
    zt = pipe.scheduler.add_noise(z0, noise.to(z0.device, z0.dtype), t)
    text = pipe.encode_text(prompt)[0]
    return [m[0].float() for m in pipe.features(zt, t, text)]


def best_matches(f: torch.Tensor, g: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """For cells (N, 2) (x, y) of map f (C, h, w): the (x, y) cell of map g with the highest
    cosine similarity over channels, (N, 2)."""
    c, h, w = g.shape
    source = F.normalize(f[:, cells[:, 1], cells[:, 0]].T, dim=1)
    target = F.normalize(g.reshape(c, h * w), dim=0)
    best = (source @ target).argmax(dim=1)
    return torch.stack([best % w, best // w], dim=1)


def object_cells(masks: list[np.ndarray], grid: tuple[int, int]) -> torch.Tensor:
    """(h, w) bool: the cells of the grid at least half covered by some object's mask."""
    union = torch.from_numpy(np.any(masks, axis=0))[None, None]
    return mask_to_grid(union, grid)[0, 0]


def correspondence_errors(
    pipe,
    scene: scenes.Scene,
    offset_cells: tuple[int, int] = (1, 1),
    timestep: int = 261,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Arg-max-cosine matching errors between a scene and the scene shifted by a known offset.

    The offset is given in cells of the coarsest feature block, so that the true match is a
    whole cell in every block. The two images get independent noise: one shared noise pattern
    would itself match best at zero displacement. Per block
    ("up_blocks[i]"): the error (distance between the matched and the true cell, in that block's
    cells) of every cell that is object in both images, with its true match inside the image.
    """
    side = scene.size // pipe.vae_scale_factor
    noises = torch.randn((2, 1, 4, side, side), generator=torch.Generator().manual_seed(seed))
    prompt = scenes.caption(scene)
    image, masks = scenes.render(scene)
    first = decoder_features(pipe, image, prompt, timestep, noises[0])
    coarsest = min(m.shape[-1] for m in first)
    dx, dy = (o * scene.size / coarsest for o in offset_cells)
    moved_image, moved_masks = scenes.render(shifted(scene, dx, dy))
    second = decoder_features(pipe, moved_image, prompt, timestep, noises[1])
    errors = {}
    for block, f, g in zip(pipe.features.blocks, first, second, strict=True):
        h, w = f.shape[-2:]
        shift = torch.tensor([round(dx * w / scene.size), round(dy * h / scene.size)])
        ys, xs = object_cells(masks, (h, w)).nonzero(as_tuple=True)
        cells = torch.stack([xs, ys], dim=1)
        true = cells + shift
        inside = (true >= 0).all(dim=1) & (true[:, 0] < w) & (true[:, 1] < h)
        cells, true = cells[inside], true[inside]
        on_object = object_cells(moved_masks, (h, w))[true[:, 1], true[:, 0]]
        cells, true = cells[on_object], true[on_object]
        found = best_matches(f, g, cells)
        errors[f"up_blocks[{block}]"] = (found - true).float().norm(dim=1).numpy()
    return errors


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
    """timestep → block → mean error in that block's cells."""
    correspondence_scenes: int
    feature_grids: dict[str, int]
    """block → side of its grid on a native-resolution scene."""
    seconds: float = 0.0
    figures: dict[str, PIL.Image.Image] = field(default_factory=dict)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else math.nan


def own_size(pipe, photo: PIL.Image.Image) -> PIL.Image.Image:
    """A photo at about its own area, sides rounded to the model's size multiple."""
    area = round(math.sqrt(photo.width * photo.height))
    return model_input(pipe, photo, pipe.working_size(photo.size, area))


def mean_correspondence(
    pipe, seeds: Sequence[int], timestep: int, offset_cells: tuple[int, int] = (1, 1)
) -> dict[str, float]:
    """Mean matching error per block over all object cells of the scenes with these seeds."""
    errors: dict[str, list[np.ndarray]] = {}
    for seed in seeds:
        scene = scenes.random_scene(seed, pipe.native_resolution)
        for block, e in correspondence_errors(pipe, scene, offset_cells, timestep).items():
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
    log: Callable[[str], None] = print,
) -> ModelReport:
    """Measure a loaded pipeline on held-out scenes and photos (see the module doc).

    The VAE runs on every scene of `scene_seeds` and every photo; the inversion on the first
    `inversion_scenes` scenes and every photo (prompt: the scene's caption, "a photo").
    """
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
    latent = side // pipe.vae_scale_factor
    # feature_blocks picks the decoder blocks at 1/2 and 1/1 of the latent resolution.
    coarse, fine = pipe.features.blocks
    grids = {f"up_blocks[{coarse}]": latent // 2, f"up_blocks[{fine}]": latent}

    log(f"text to image: {len(captions)} captions × {len(sample_seeds)} seeds, {steps} steps")
    samples = text_to_image(pipe, captions, sample_seeds, steps)

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
    return "∞" if math.isinf(value) else f"{value:.1f} dB"


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
    for t, blocks in report.correspondence.items():
        for block, error in blocks.items():
            side = report.feature_grids[block]
            lines.append(
                f"| feature correspondence error, t = {t}, {block} ({side}×{side} cells) | "
                f"{report.correspondence_scenes} scenes | {error:.2f} cells | ≤ 1 cell |"
            )
    lines += [
        "",
        "PSNR compares with the input at the size the model sees. Inversion uses the scene's "
        'caption (photos: "a photo") and samples back from z_T with the same prompt, no '
        "classifier-free guidance and no energy guidance. Correspondence: every object of a "
        "scene moved by one cell of the coarse feature block (each image noised to t); "
        "for each object cell of the first image, the cell of the second with the highest "
        "cosine similarity of the decoder features the energies use; the mean distance to the "
        "true cell, in cells of that block.",
        "",
    ]
    titles = {
        "reconstruction": "Input, VAE reconstruction, and inversion round trips",
        "samples": "Text-to-image samples (CFG 4)",
    }
    for name, path in images.items():
        lines += [f"## {titles.get(name, name)}", "", f"![{name}]({path})", ""]
    return "\n".join(lines)


def write_report(report: ModelReport, out: str | Path) -> Path:
    """Write out/demo-model.md and its figures out/images/demo-model-<name>.png; return the md."""
    out = Path(out)
    images = {}
    for name, figure in report.figures.items():
        save_figure(figure, out / "images" / f"demo-model-{name}.png")
        images[name] = f"images/demo-model-{name}.png"
    text = markdown(report, images)
    return atomic_write(out / "demo-model.md", lambda tmp: Path(tmp).write_text(text, "utf-8"))
