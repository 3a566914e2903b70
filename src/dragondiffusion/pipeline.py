"""DragonPipeline: a diffusers Stable Diffusion pipeline that also inverts and edits real images.

Load once (`from_pretrained` or `dragondiffusion.load`), invert an image once, edit it many times.
Plain text-to-image (`pipe(prompt)`) still works: the memory-bank processors are inert unless an
inversion or an edit switches them on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from . import __version__
from .attention import MemoryBank, install_memory_bank
from .ddim import DDIMTimesteps
from .edits import (
    AppearanceWeights,
    DragWeights,
    MoveWeights,
    PasteWeights,
    plan_appearance,
    plan_drag,
    plan_move,
    plan_paste,
)
from .errors import InputError
from .features import FeatureExtractor
from .geometry import Point, Size, scale_point, working_size
from .inversion import Inversion, ddim_invert
from .io import load_image, load_mask, save_png
from .sampler import MODES, EditPlan, Evaluations, GuidanceSchedule, Sampler

# SD 1.5's DDIM configuration: the timesteps 981, 961, …, 1 of upstream's 50-step runs.
SD15_DDIM = {
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}


@dataclass(frozen=True)
class EditOptions:
    """Settings every edit shares (defaults: upstream's demo, DiffEditor sampler, 50 steps)."""

    num_inference_steps: int = 50
    mode: str = "diffeditor"
    seed: int = 42
    resolution: int | None = None
    output_size: str = "input"
    sde_strength: float = 0.4
    sde_strength_outside: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.output_size not in ("input", "working"):
            raise InputError(f"output_size must be 'input' or 'working', not {self.output_size!r}")
        if self.num_inference_steps < 2:
            raise InputError(f"steps must be at least 2, got {self.num_inference_steps}")
        for name in ("sde_strength", "sde_strength_outside"):
            if not 0 <= getattr(self, name) <= 1:
                raise InputError(f"{name} must lie in [0, 1], got {getattr(self, name)}")


@dataclass
class EditResult:
    """An edited image, the latent it decodes from, and the record of everything that made it."""

    image: PIL.Image.Image
    latent: torch.Tensor
    record: dict

    def save(self, path) -> None:
        """Write the image as PNG with the record as JSON metadata (atomic)."""
        save_png(self.image, path, self.record)


class DragonPipeline(StableDiffusionPipeline):
    """Stable Diffusion 1.x with DragonDiffusion editing: `invert`, then `move` (and more)."""

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = False,
    ) -> None:
        if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
            raise InputError(
                f"the model predicts {scheduler.config.prediction_type!r}, not noise (epsilon); "
                "use a Stable Diffusion 1.x model"
            )
        scheduler = DDIMScheduler.from_config(scheduler.config, **SD15_DDIM)
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False)
        self.memory_bank = MemoryBank()
        self.bank_layers = install_memory_bank(unet, self.memory_bank)
        self.features = FeatureExtractor(unet)
        self.model_name = getattr(unet.config, "_name_or_path", "") or "unknown"

    # ---- geometry ---------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: VAE factor × the UNet's total downsampling."""
        down = sum(b.downsamplers is not None for b in self.unet.down_blocks)
        return self.vae_scale_factor * 2**down

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def working_size(self, size: Size, resolution: int | None = None) -> Size:
        """The (width, height) the model works at for an input of `size` (area ≈ resolution²)."""
        return working_size(*size, resolution or self.native_resolution, self.size_multiple)

    # ---- encoders ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional "") text embeddings, each (1, 77, D)."""
        cond, uncond = self.encode_prompt(prompt, self.device, 1, True, negative_prompt="")
        return cond, uncond

    @torch.no_grad()
    def encode_image(self, image: PIL.Image.Image, size: Size) -> torch.Tensor:
        """VAE posterior mean × scaling factor of the image resized to `size`: (1, 4, h, w)."""
        x = self.image_processor.preprocess(image, height=size[1], width=size[0])
        x = x.to(device=self.device, dtype=self.vae.dtype)
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> PIL.Image.Image:
        x = self.vae.decode(z / self.vae.config.scaling_factor).sample
        return self.image_processor.postprocess(x.float(), output_type="pil")[0]

    # ---- guidance branch --------------------------------------------------------------------
    def invert(
        self,
        image,
        prompt: str = "",
        num_inference_steps: int = 50,
        resolution: int | None = None,
        reference=None,
        reference_prompt: str | None = None,
    ) -> Inversion:
        """DDIM-invert `image` (path, PIL or array) into a reusable trajectory + memory bank.

        With `reference`, the reference image (resized to the image's working size) is inverted
        in the same batch, as appearance replacement and pasting need.
        """
        if num_inference_steps < 2:
            raise InputError(f"steps must be at least 2, got {num_inference_steps}")
        images = [load_image(image)]
        prompts = [prompt]
        if reference is not None:
            images.append(load_image(reference, "reference image"))
            prompts.append(prompt if reference_prompt is None else reference_prompt)
        size = self.working_size(images[0].size, resolution)
        z0 = torch.cat([self.encode_image(im, size) for im in images])
        text = torch.cat([self.encode_text(p)[0] for p in prompts])
        steps = DDIMTimesteps(self.scheduler, num_inference_steps)
        with self.progress_bar(total=len(steps)) as bar:
            bar.set_description("inversion")
            latents, memory = ddim_invert(
                self.unet, steps, z0, text, self.memory_bank, on_step=bar.update
            )
        return Inversion(
            latents=latents,
            memory=memory,
            text=text,
            prompts=prompts,
            working_size=size,
            input_sizes=[im.size for im in images],
            model=self.model_name,
        )

    def prepare(
        self,
        image,
        prompt: str,
        options: EditOptions,
        reference=None,
        reference_prompt: str | None = None,
    ) -> Inversion:
        """An Inversion from an image (inverting it) or the given Inversion (reused as is)."""
        images = 1 if reference is None else 2
        if isinstance(image, Inversion):
            if image.latents.shape[1] != images:
                raise InputError(
                    f"this edit needs an inversion of {images} image(s), the given one holds "
                    f"{image.latents.shape[1]}; invert with{'' if images == 2 else 'out'} "
                    "a reference image"
                )
            return image
        return self.invert(
            image,
            prompt,
            options.num_inference_steps,
            options.resolution,
            reference,
            reference_prompt,
        )

    # ---- generation branch ------------------------------------------------------------------
    def run_plan(
        self, inversion: Inversion, plan: EditPlan, options: EditOptions, started: float
    ) -> EditResult:
        """Sample the plan with the shared guided sampler and package the result."""
        steps = DDIMTimesteps(self.scheduler, inversion.num_steps)
        schedule = GuidanceSchedule.for_mode(
            options.mode,
            len(steps),
            **(
                {"eta_inside": options.sde_strength, "eta_outside": options.sde_strength_outside}
                if options.mode == "diffeditor"
                else {}
            ),
        )
        cond, uncond = self.encode_text(inversion.prompts[0])
        counts = Evaluations(inversion=inversion.num_steps * inversion.latents.shape[1])
        with self.progress_bar(total=len(steps)) as bar:
            bar.set_description(plan.edit)
            z = Sampler(
                unet=self.unet,
                features=self.features,
                bank=self.memory_bank,
                inversion=inversion,
                plan=plan,
                schedule=schedule,
                steps=steps,
                cond=cond,
                uncond=uncond,
                counts=counts,
                generator=torch.Generator().manual_seed(options.seed),
                callback=lambda _: bar.update(),
            ).run()
        image = self.decode(z)
        if options.output_size == "input":
            image = image.resize(inversion.input_sizes[0], PIL.Image.LANCZOS)
        record = {
            "dragondiffusion": __version__,
            "edit": plan.edit,
            "model": inversion.model,
            "prompts": inversion.prompts,
            "mode": options.mode,
            "seed": options.seed,
            "steps": inversion.num_steps,
            "schedule": {
                "guided": sorted(schedule.guided),
                "sde": sorted(schedule.sde),
                "time_travel": sorted(schedule.time_travel),
                "repeats": schedule.repeats,
                "eta_inside": schedule.eta_inside,
                "eta_outside": schedule.eta_outside,
            },
            "guidance_scale": plan.guidance_scale,
            "energy_scale": plan.energy_scale,
            "k": plan.k,
            "bank": {
                "mode": plan.bank_mode.value,
                "steps": [plan.bank_steps.start, plan.bank_steps.stop],
            },
            "working_size": list(inversion.working_size),
            "input_sizes": [list(s) for s in inversion.input_sizes],
            "output_size": list(image.size),
            "device": str(self.device),
            "dtype": str(self.unet.dtype).removeprefix("torch."),
            "evaluations": counts.as_dict(),
            "seconds": round(time.perf_counter() - started, 3),
            **plan.params,
        }
        return EditResult(image=image, latent=z, record=record)

    def to_working(self, inversion: Inversion, point: Point, what: str) -> Point:
        """A point in input-image pixels → working-image pixels; must lie in the image."""
        w, h = inversion.input_sizes[0]
        if not (0 <= point[0] <= w and 0 <= point[1] <= h):
            raise InputError(f"{what} {tuple(point)} lies outside the {w}×{h} image")
        return scale_point(point, inversion.input_sizes[0], inversion.working_size)

    def mask_tensor(self, mask, inversion: Inversion, what: str, index: int = 0) -> torch.Tensor:
        """A user mask at the size of input `index` → (1, 1, H, W) float at working size."""
        arr = load_mask(mask, inversion.input_sizes[index], what).astype(np.float32)
        t = torch.from_numpy(arr)[None, None]
        w, h = inversion.working_size
        t = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
        return (t > 0.5).float().to(self.device)

    def move(
        self,
        image,
        mask,
        source: Point,
        target: Point,
        scale: float = 1.0,
        prompt: str = "",
        reference_region=None,
        weights: MoveWeights | None = None,
        **options,
    ) -> EditResult:
        """Move the object in `mask` so that `source` lands on `target`, scaled by `scale`.

        image: a path, PIL image, array, or an `Inversion` from `invert` (reused, not recomputed).
        mask / reference_region: white = selected, same size as the image. Points are (x, y)
        pixels of the input image. `options` are the fields of `EditOptions` (steps, mode, seed,
        resolution, output size, SDE strengths). Returns the image and a full parameter record.
        """
        started, opts = time.perf_counter(), EditOptions(**options)
        if not np.isfinite(scale) or scale <= 0:
            raise InputError(f"scale must be a positive number, got {scale}")
        inversion = self.prepare(image, prompt, opts)
        region = None
        if reference_region is not None:
            region = self.mask_tensor(reference_region, inversion, "reference region")
        plan = plan_move(
            inversion,
            self.mask_tensor(mask, inversion, "object mask"),
            self.to_working(inversion, source, "--from point"),
            self.to_working(inversion, target, "--to point"),
            scale,
            region,
            weights,
        )
        plan.params.update({"from": list(source), "to": list(target)})
        return self.run_plan(inversion, plan, opts, started)

    def appearance(
        self,
        image,
        mask,
        reference,
        reference_mask,
        prompt: str = "",
        reference_prompt: str | None = None,
        weights: AppearanceWeights | None = None,
        **options,
    ) -> EditResult:
        """Give the object in `mask` the appearance of the object in `reference_mask` of
        `reference` (another image, resized to this one's working size).

        `image` may be an `Inversion` made with `invert(image, reference=reference)`.
        """
        started, opts = time.perf_counter(), EditOptions(**options)
        inversion = self.prepare(image, prompt, opts, reference, reference_prompt)
        plan = plan_appearance(
            inversion,
            self.mask_tensor(mask, inversion, "object mask"),
            self.mask_tensor(reference_mask, inversion, "reference mask", index=1),
            weights,
        )
        return self.run_plan(inversion, plan, opts, started)

    def drag(
        self,
        image,
        mask,
        points: list[tuple[Point, Point]],
        prompt: str = "",
        weights: DragWeights | None = None,
        **options,
    ) -> EditResult:
        """Drag content: each (handle, target) pair of input-image points moves the content at
        the handle to the target, within the editable region `mask`."""
        started, opts = time.perf_counter(), EditOptions(**options)
        inversion = self.prepare(image, prompt, opts)
        working = [
            (
                self.to_working(inversion, h, f"handle {n + 1}"),
                self.to_working(inversion, t, f"target {n + 1}"),
            )
            for n, (h, t) in enumerate(points)
        ]
        plan = plan_drag(
            inversion, self.mask_tensor(mask, inversion, "editable region"), working, weights
        )
        plan.params["points"] = [[list(h), list(t)] for h, t in points]
        return self.run_plan(inversion, plan, opts, started)

    def paste(
        self,
        image,
        reference,
        reference_mask,
        offset: Point = (0.0, 0.0),
        scale: float = 1.0,
        prompt: str = "",
        reference_prompt: str | None = None,
        weights: PasteWeights | None = None,
        **options,
    ) -> EditResult:
        """Paste the object in `reference_mask` of `reference` into `image`, moved by `offset`
        (dx, dy input-image pixels) from where it sits in the reference, scaled by `scale`."""
        started, opts = time.perf_counter(), EditOptions(**options)
        if not np.isfinite(scale) or scale <= 0:
            raise InputError(f"scale must be a positive number, got {scale}")
        inversion = self.prepare(image, prompt, opts, reference, reference_prompt)
        w, h = inversion.input_sizes[0]
        working_offset = (
            offset[0] * inversion.working_size[0] / w,
            offset[1] * inversion.working_size[1] / h,
        )
        plan = plan_paste(
            inversion,
            self.mask_tensor(reference_mask, inversion, "reference mask", index=1),
            working_offset,
            scale,
            weights,
        )
        plan.params["offset"] = list(offset)
        return self.run_plan(inversion, plan, opts, started)
