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
from .edits.move import MoveWeights, plan_move
from .errors import InputError
from .features import FeatureExtractor
from .geometry import Point, Size, scale_point, working_size
from .inversion import Inversion, ddim_invert
from .io import load_image, load_mask, save_png
from .sampler import EditPlan, Evaluations, GuidanceSchedule, sample

# SD 1.5's DDIM configuration: the timesteps 981, 961, …, 1 of upstream's 50-step runs.
SD15_DDIM = {
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}


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
    ) -> Inversion:
        """DDIM-invert `image` (path, PIL or array) into a reusable trajectory + memory bank."""
        if num_inference_steps < 2:
            raise InputError(f"steps must be at least 2, got {num_inference_steps}")
        image = load_image(image)
        size = self.working_size(image.size, resolution)
        z0 = self.encode_image(image, size)
        text, _ = self.encode_text(prompt)
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
            prompts=[prompt],
            working_size=size,
            input_sizes=[image.size],
            model=self.model_name,
        )

    # ---- generation branch ------------------------------------------------------------------
    def run_plan(
        self,
        inversion: Inversion,
        plan: EditPlan,
        mode: str,
        seed: int,
        output_size: str,
        started: float,
    ) -> EditResult:
        """Sample the plan with the shared guided sampler and package the result."""
        if output_size not in ("input", "working"):
            raise InputError(f"output_size must be 'input' or 'working', not {output_size!r}")
        steps = DDIMTimesteps(self.scheduler, inversion.num_steps)
        schedule = GuidanceSchedule.for_mode(mode, len(steps))
        cond, uncond = self.encode_text(inversion.prompts[0])
        counts = Evaluations(inversion=inversion.num_steps * inversion.latents.shape[1])
        torch.manual_seed(seed)
        with self.progress_bar(total=len(steps)) as bar:
            bar.set_description(plan.edit)
            z = sample(
                self.unet,
                self.features,
                self.memory_bank,
                inversion,
                plan,
                schedule,
                steps,
                cond,
                uncond,
                counts,
                callback=lambda _: bar.update(),
            )
        image = self.decode(z)
        if output_size == "input":
            image = image.resize(inversion.input_sizes[0], PIL.Image.LANCZOS)
        record = {
            "dragondiffusion": __version__,
            "edit": plan.edit,
            "model": inversion.model,
            "prompt": inversion.prompts[0],
            "mode": mode,
            "seed": seed,
            "steps": inversion.num_steps,
            "guided_steps": sorted(schedule.guided),
            "guidance_scale": plan.guidance_scale,
            "energy_scale": plan.energy_scale,
            "k": plan.k,
            "bank": {
                "mode": plan.bank_mode.value,
                "steps": [plan.bank_steps.start, plan.bank_steps.stop],
            },
            "working_size": list(inversion.working_size),
            "input_size": list(inversion.input_sizes[0]),
            "output_size": list(image.size),
            "device": str(self.device),
            "dtype": str(self.unet.dtype).removeprefix("torch."),
            "evaluations": counts.as_dict(),
            "seconds": round(time.perf_counter() - started, 3),
            **plan.params,
        }
        return EditResult(image=image, latent=z, record=record)

    def prepare(self, image, prompt: str, num_inference_steps: int, resolution: int | None):
        """An Inversion from an image (inverting it) or the given Inversion (reused as is)."""
        if isinstance(image, Inversion):
            return image
        return self.invert(image, prompt, num_inference_steps, resolution)

    def to_working(self, inversion: Inversion, point: Point) -> Point:
        return scale_point(point, inversion.input_sizes[0], inversion.working_size)

    def mask_tensor(self, mask, inversion: Inversion, what: str) -> torch.Tensor:
        """A user mask at input size → (1, 1, H, W) float tensor at working size (bilinear > ½)."""
        arr = load_mask(mask, inversion.input_sizes[0], what).astype(np.float32)
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
        num_inference_steps: int = 50,
        mode: str = "dragon",
        seed: int = 42,
        resolution: int | None = None,
        output_size: str = "input",
        weights: MoveWeights | None = None,
    ) -> EditResult:
        """Move the object in `mask` so that `source` lands on `target`, scaled by `scale`.

        image: a path, PIL image, array, or an `Inversion` from `invert` (reused, not recomputed).
        mask / reference_region: white = selected, same size as the image. Points are (x, y)
        pixels of the input image. Returns the edited image and a full parameter record.
        """
        started = time.perf_counter()
        if not np.isfinite(scale) or scale <= 0:
            raise InputError(f"scale must be a positive number, got {scale}")
        inversion = self.prepare(image, prompt, num_inference_steps, resolution)
        for name, p in (("from", source), ("to", target)):
            w, h = inversion.input_sizes[0]
            if not (0 <= p[0] <= w and 0 <= p[1] <= h):
                raise InputError(f"--{name} point {p} lies outside the {w}×{h} image")
        plan = plan_move(
            inversion,
            self.mask_tensor(mask, inversion, "object mask"),
            self.to_working(inversion, source),
            self.to_working(inversion, target),
            scale,
            None
            if reference_region is None
            else self.mask_tensor(reference_region, inversion, "reference region"),
            weights,
        )
        plan.params.update({"from": list(source), "to": list(target)})
        return self.run_plan(inversion, plan, mode, seed, output_size, started)
