"""DragonPipeline: a diffusers Stable Diffusion pipeline that also inverts and edits real images.

Load once (`from_pretrained` or `dragondiffusion.load`), invert an image once, edit it many times.
Plain text-to-image (`pipe(prompt)`) still works: the memory-bank processors are inert unless an
inversion or an edit switches them on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors import SafetensorError

from . import __version__
from .attention import BankMode, MemoryBank, install_memory_bank
from .composite import THIN_VACATED_CELLS, Vacated, default_margin, keep_background, margin_given
from .ddim import DDIMTimesteps
from .edit_defaults import (
    DEFAULT_STEPS,
    WEIGHTS,
    EditDefaults,
    checked_weights,
    level_problem,
)
from .edits import (
    AppearanceWeights,
    DragWeights,
    MoveWeights,
    PasteWeights,
    move_kind,
    plan_appearance,
    plan_drag,
    plan_move,
    plan_paste,
)
from .errors import InputError, SamplingDiverged, require_number, require_point, require_whole
from .features import FeatureExtractor, energy_grid
from .geometry import Point, Size, scale_point, working_size
from .image_prompt import ImagePrompt, encoder_folder, load_image_encoder, square, weight_file
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
    """Settings every edit shares (defaults: upstream's demo, DiffEditor sampler, 50 steps; not
    in upstream: the kept background)."""

    num_inference_steps: int | None = None
    """DDIM steps; None: those of a given Inversion, else the model's default for the edit
    (`EditDefaults.num_steps`: its dragondiffusion.json "steps", else 50)."""
    mode: str = "diffeditor"
    seed: int = 42
    resolution: int | None = None
    output_size: str = "input"
    sde_strength: float = 0.4
    sde_strength_outside: float = 0.0
    ip_scale: float = 0.1
    memory_bank: bool = True
    """False: plain self-attention at every step, the bank unread (an ablation)."""
    keep_background: bool = True
    """True (the default): the input's own pixels beyond `background_margin` of the edit's
    region (see `composite`), so the rest of the image does not pass through the VAE and drift;
    False: the method's whole re-synthesised image (what the model adds beyond the margin, such
    as a moved object's shadow, stays). Either way the result holds both
    (`EditResult.with_background_kept`, `without_background_kept`)."""
    background_margin: int | None = None
    """Output pixels around the edit's region that stay the edit's (the outer half a feathered
    seam) when the background is kept; None: one feature cell of the energies (4 working pixels
    for 8-pixel latent cells) in output pixels. Wider forgives a mask drawn tighter than the
    object. The record's `background_margin` is the one used, or without keep_background the
    one `EditResult.with_background_kept()` would use."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.output_size not in ("input", "working"):
            raise InputError(f"output_size must be 'input' or 'working', not {self.output_size!r}")
        if self.num_inference_steps is not None:
            object.__setattr__(self, "num_inference_steps", steps_given(self.num_inference_steps))
        seed = require_whole("seed", self.seed)
        if not -(2**63) <= seed < 2**64:
            raise InputError(f"seed must lie in [-2**63, 2**64), got {seed}")
        object.__setattr__(self, "seed", seed)
        if self.resolution is not None:
            object.__setattr__(self, "resolution", require_whole("resolution", self.resolution))
        for name in ("sde_strength", "sde_strength_outside"):
            value = require_number(name, getattr(self, name))
            if not 0 <= value <= 1:
                raise InputError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
            object.__setattr__(self, name, value)
        ip_scale = require_number("ip_scale", self.ip_scale)
        if ip_scale < 0:
            raise InputError(f"ip_scale must be a number ≥ 0, got {self.ip_scale}")
        object.__setattr__(self, "ip_scale", ip_scale)
        for name in ("memory_bank", "keep_background"):
            value = getattr(self, name)
            if not isinstance(value, bool | np.bool_ | int | np.integer) or value not in (0, 1):
                raise InputError(f"{name} must be True or False, got {value!r}")
            object.__setattr__(self, name, bool(value))
        if self.background_margin is not None:
            object.__setattr__(self, "background_margin", margin_given(self.background_margin))


def steps_given(steps: object) -> int:
    """A step count given to an edit or an inversion: a whole number ≥ 2, else InputError."""
    steps = require_whole("steps", steps)
    if steps < 2:
        raise InputError(f"steps must be at least 2, got {steps}")
    return steps


def prompt_given(prompt: object, what: str = "prompt") -> str:
    """A prompt: text ("" for none), else InputError."""
    if not isinstance(prompt, str):
        raise InputError(f'{what} must be text ("" for none), got {prompt!r}')
    return prompt


MAX_RESOLUTION = 4096
"""The largest working resolution (px, the side of a square of the same area) an edit accepts:
SD 1.5 at 4096² already holds 262 144 latent cells, far beyond what it was trained for."""


@dataclass
class EditResult:
    """An edited image, the latent its re-synthesised image decodes from (`whole`; `image` is
    that with the input's background kept, by default), and the record of everything that made
    it."""

    image: PIL.Image.Image
    latent: torch.Tensor
    record: dict
    region: torch.Tensor | None = None
    """The pixels the edit was asked to change, (1, 1, H, W) bool at the working size (the
    plan's `region`), for `with_background_kept`; None where the edit has none."""
    original: PIL.Image.Image | None = None
    """The input image, for `with_background_kept`."""
    resynthesised: PIL.Image.Image | None = None
    """The method's whole re-synthesised image, before any background was kept (the same as
    `image` without keep_background); None: not known."""
    vacated: Vacated | None = None
    """A move's or resize's old and new places, for the thin vacated strips the kept background
    fills (`composite.thin_vacated`; the record's `thin_vacated` output pixels)."""

    def save(self, path) -> None:
        """Write the image as PNG with the record as JSON metadata (atomic)."""
        save_png(self.image, path, self.record)

    def with_background_kept(self, margin: int | None = None) -> EditResult:
        """This edit with the input's own pixels beyond `margin` output pixels of its region, as
        `keep_background=True` makes it, without sampling again (e.g. to show a UI's choice of
        margin, or both images).

        margin: None: the edit's own `background_margin` (its record's)."""
        recorded = self.record.get("background_margin")
        margin = recorded if margin is None else margin_given(margin)
        if self.record.get("keep_background") and margin == recorded:
            return self
        whole = self.whole
        if self.region is None or self.original is None or whole is None:
            raise InputError(
                "this result carries no edit region and re-synthesised image to keep the "
                "background with; run the edit with keep_background=True instead"
            )
        if margin is None:
            raise InputError("this result records no background margin; give one (pixels)")
        thin = self.record.get("thin_vacated", 0)
        image = keep_background(whole, self.original, self.region, margin, self.vacated, thin)
        record = {**self.record, "keep_background": True, "background_margin": margin}
        return replace(self, image=image, record=record, resynthesised=whole)

    def without_background_kept(self) -> EditResult:
        """This edit as `keep_background=False` makes it, the method's whole re-synthesised
        image, without sampling again."""
        if not self.record.get("keep_background"):
            return self
        if self.whole is None:
            raise InputError(
                "this result does not hold its re-synthesised image; "
                "run the edit with keep_background=False instead"
            )
        return replace(self, image=self.whole, record={**self.record, "keep_background": False})

    @property
    def whole(self) -> PIL.Image.Image | None:
        """The re-synthesised image: `resynthesised`, or `image` where no background is kept."""
        if self.resynthesised is not None or self.record.get("keep_background"):
            return self.resynthesised
        return self.image


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
        """DragonDiffusion's two decoder blocks: the energies' features, except for edits in
        `feature_overrides` (and what `model_report` measures, whatever those say)."""
        self.feature_overrides: dict[str, FeatureExtractor] = {}
        """edit → its own feature blocks (the model's dragondiffusion.json "feature_blocks")."""
        self.model_name = getattr(unet.config, "_name_or_path", "") or "unknown"
        self.image_prompt: ImagePrompt | None = None
        self.edit_defaults = EditDefaults()

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
        if resolution is not None and require_whole("resolution", resolution) <= 0:
            raise InputError(
                f"resolution must be a positive whole number of pixels, got {resolution!r}; "
                f"leave it out for the model's native {self.native_resolution}"
            )
        if resolution is not None and resolution > MAX_RESOLUTION:
            raise InputError(
                f"resolution {resolution} px is above the largest working size this package "
                f"accepts ({MAX_RESOLUTION}); give a smaller one (this model's native is "
                f"{self.native_resolution})"
            )
        if resolution is not None and resolution < self.size_multiple:
            raise InputError(
                f"resolution {resolution} px is below this model's smallest working size: its "
                f"sides are multiples of {self.size_multiple} px; give at least "
                f"{self.size_multiple}, or leave it out for the native {self.native_resolution}"
            )
        return working_size(*size, resolution or self.native_resolution, self.size_multiple)

    # ---- encoders ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional "") text embeddings, each (1, 77, D)."""
        cond, uncond = self.encode_prompt(prompt, self.device, 1, True, negative_prompt="")
        return cond, uncond

    @torch.no_grad()
    def encode_latent(self, image: PIL.Image.Image, size: Size) -> torch.Tensor:
        """VAE posterior mean × scaling factor of the image resized to `size`: (1, 4, h, w).

        (Not `encode_image`: that name is diffusers' CLIP encoding, which the image prompt uses.)
        """
        x = self.image_processor.preprocess(image, height=size[1], width=size[0])
        x = x.to(device=self.device, dtype=self.vae.dtype)
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> PIL.Image.Image:
        x = self.vae.decode(z / self.vae.config.scaling_factor).sample
        if not torch.isfinite(x).all():
            raise SamplingDiverged(
                f"the VAE decoded NaN or infinite values (in {str(self.vae.dtype)[6:]}); "
                "load the model in float32 (--dtype float32)"
            )
        return self.image_processor.postprocess(x.float(), output_type="pil")[0]

    # ---- image prompt (DiffEditor, optional) ------------------------------------------------
    def load_image_prompt(
        self,
        adapter: str | os.PathLike,
        weight_name: str | None = None,
        image_encoder: str | os.PathLike | None = None,
    ) -> None:
        """Load IP-Adapter weights for DiffEditor's image prompt (see `image_prompt`); edits then
        use it at their schedule's image-prompt steps, at `ip_scale`. Replaces any earlier adapter;
        after a failed load none is left.

        adapter: the checkpoint (keys `image_proj.*` and `ip_adapter.*`, .safetensors or .bin),
        or its folder (with `weight_name` if it holds several). image_encoder: a
        CLIPVisionModelWithProjection folder; default: `image_encoder` beside the checkpoint,
        else the pipeline's own.
        """
        weights = weight_file(adapter, weight_name)
        encoder = encoder_folder(weights, image_encoder)
        if encoder is None and self.image_encoder is None:
            raise InputError(
                f"no image encoder for IP-Adapter {str(weights)!r}: pass image_encoder "
                "(--image-encoder), a CLIPVisionModelWithProjection folder such as "
                "h94/IP-Adapter's models/image_encoder"
            )
        if self.image_prompt is not None:
            self.image_prompt.detach()
            self.image_prompt = None
        if encoder is not None:
            clip = load_image_encoder(encoder, self.device, self.dtype)
            self.register_modules(image_encoder=clip)
        try:
            self.load_ip_adapter(
                str(weights), subfolder="", weight_name=weights.name, image_encoder_folder=None
            )
            idle = self.encode_image_prompt(PIL.Image.new("RGB", (8, 8)))[:1]
            with torch.no_grad():
                self.unet.encoder_hid_proj([idle])  # fails here if the adapter misfits the encoder
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
            self.unload_ip_adapter()
            raise InputError(
                f"could not load IP-Adapter {str(weights)!r} with image encoder "
                f"{str(encoder or 'of the pipeline')!r}: {err}. Give an SD 1.x IP-Adapter "
                "checkpoint and the image encoder it was trained with"
            ) from err
        name = str(encoder) if encoder is not None else self.image_encoder.name_or_path
        self.image_prompt = ImagePrompt(str(weights), name, self.set_ip_adapter_scale, idle)
        self.image_prompt.attach(self.unet)

    def load_ip_adapter(self, *args, **kwargs) -> None:
        """diffusers' IP-Adapter loader that keeps the memory bank on the decoder self-attention.

        diffusers rebuilds every processor it does not replace by calling its class without
        arguments, which a memory-bank processor cannot take: plain processors go in first, and
        the bank comes back after, beside the IP processors. The image prompt starts off; edits
        use it only when loaded through `load_image_prompt`, which calls this.
        """
        self.unet.set_attn_processor(AttnProcessor2_0())
        try:
            super().load_ip_adapter(*args, **kwargs)
        finally:
            self.bank_layers = install_memory_bank(self.unet, self.memory_bank)
        self.unet.requires_grad_(False)  # diffusers leaves the adapter's projections trainable
        self.set_ip_adapter_scale(0.0)

    def unload_ip_adapter(self) -> None:
        """diffusers' unloader, keeping the memory bank; also drops the image-prompt gate."""
        if self.image_prompt is not None:
            self.image_prompt.detach()
            self.image_prompt = None
        self.unet.set_attn_processor(AttnProcessor2_0())
        try:
            super().unload_ip_adapter()
        finally:
            self.bank_layers = install_memory_bank(self.unet, self.memory_bank)

    @torch.no_grad()
    def encode_image_prompt(self, image: PIL.Image.Image) -> torch.Tensor:
        """(2, 1, …) CLIP embeddings [unconditional; `image`] for the loaded adapter.

        Preprocessing: squashed to 256×256 as upstream, then diffusers' `encode_image` with the
        pipeline's CLIPImageProcessor (an SD 1.5 bundle's: shortest side 224, centre crop 224,
        CLIP normalisation, as upstream; without one, diffusers makes one at the encoder's input
        size). Unconditional: for hidden-state adapters (IP-Adapter Plus, DragonDiffusion's) the
        encoder on an all-zeros pixel tensor, as upstream; for plain IP-Adapter, zeros (as
        IP-Adapter itself and diffusers do).
        """
        return self.prepare_ip_adapter_image_embeds([square(image)], None, self.device, 1, True)[0]

    def image_prompt_record(
        self, inversion: Inversion, schedule: GuidanceSchedule, options: EditOptions
    ) -> dict | None:
        """What the record says about the image prompt: None without an adapter."""
        if self.image_prompt is None:
            return None
        image = "reference" if len(inversion.images) > 1 else "input"
        return self.image_prompt.record(options.ip_scale, schedule.image_prompt, image)

    @contextmanager
    def image_prompt_gate(
        self, inversion: Inversion, steps: frozenset[int], scale: float
    ) -> Iterator[Callable[[bool], None] | None]:
        """The sampler's image-prompt switch for one edit; None without adapter, steps or scale.

        The image prompt is the reference image where there is one (appearance, paste), else the
        input image (move, drag): the last image of the inversion.
        """
        if self.image_prompt is None or not steps or scale == 0:
            yield None
            return
        embeds = self.encode_image_prompt(inversion.images[-1])
        with self.image_prompt.active(embeds, scale) as gate:
            yield gate

    # ---- guidance branch --------------------------------------------------------------------
    def invert(
        self,
        image,
        prompt: str = "",
        num_inference_steps: int | None = None,
        resolution: int | None = None,
        reference=None,
        reference_prompt: str | None = None,
        edit: str | None = None,
    ) -> Inversion:
        """DDIM-invert `image` (path, PIL or array) into a reusable trajectory + memory bank.

        With `reference`, the reference image (resized to the image's working size) is inverted
        in the same batch, as appearance replacement and pasting need. Steps: those given, else
        the model's count for `edit` (e.g. "drag", whose edits reuse it), else 50.
        """
        if num_inference_steps is None:
            if edit is not None and edit not in WEIGHTS:
                raise InputError(f"edit must be one of {', '.join(WEIGHTS)}; not {edit!r}")
            num_inference_steps = (
                DEFAULT_STEPS if edit is None else self.edit_defaults.num_steps(edit)
            )
        num_inference_steps = steps_given(num_inference_steps)
        images = [load_image(image)]
        prompts = [prompt_given(prompt)]
        if reference is not None:
            images.append(load_image(reference, "reference image"))
            given = prompt if reference_prompt is None else reference_prompt
            prompts.append(prompt_given(given, "reference prompt"))
        size = self.working_size(images[0].size, resolution)
        z0 = torch.cat([self.encode_latent(im, size) for im in images])
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
            images=images,
        )

    @torch.no_grad()
    def reconstruct(
        self, inversion: Inversion, bank: bool = True, start: torch.Tensor | None = None
    ) -> torch.Tensor:
        """z_0 (1, 4, h, w) sampled back from the inversion's z_T (or `start`): deterministic
        DDIM, the conditional prompt, no CFG, no energy. With `bank` the decoder self-attention
        reads the recorded K/V at every step (replace mode), as the edits do outside the edit.
        `pipe.decode(pipe.reconstruct(inv))` shows how faithfully an inversion can be edited."""
        n = inversion.num_steps
        cond, uncond = self.encode_text(inversion.prompts[0])
        z_T = inversion.latents[-1][:1] if start is None else start
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
            unet=self.unet,
            features=self.features,
            bank=self.memory_bank,
            inversion=inversion,
            plan=plan,
            schedule=GuidanceSchedule("unguided", n, frozenset()),
            steps=DDIMTimesteps(self.scheduler, n),
            cond=cond,
            uncond=uncond,
            counts=Evaluations(),
        )
        return sampler.run()

    def prepare(
        self,
        image,
        prompt: str,
        options: EditOptions,
        edit: str,
        reference=None,
        reference_prompt: str | None = None,
    ) -> Inversion:
        """An Inversion from an image (inverting it with the options' steps, else the model's
        default for `edit`) or the given Inversion (reused as is; its steps are the edit's)."""
        images = 1 if reference is None else 2
        steps = options.num_inference_steps
        if isinstance(image, Inversion):
            self.require_own(image)
            if image.latents.shape[1] != images:
                raise InputError(
                    f"this edit needs an inversion of {images} image(s), the given one holds "
                    f"{image.latents.shape[1]}; invert with{'' if images == 2 else 'out'} "
                    "a reference image"
                )
            if steps is not None and steps != image.num_steps:
                raise InputError(
                    f"the given inversion has {image.num_steps} steps, the edit asks for "
                    f"{steps}; leave the steps out (an inversion fixes them) or invert again "
                    f"with {steps} steps"
                )
            resolution = options.resolution
            if resolution is not None:
                size = self.working_size(image.input_sizes[0], resolution)
                if size != image.working_size:
                    raise InputError(
                        f"the given inversion works at {image.working_size[0]}×"
                        f"{image.working_size[1]}, resolution {resolution} asks for "
                        f"{size[0]}×{size[1]}; leave the resolution out (an inversion fixes "
                        "it) or invert again with it"
                    )
            return image
        return self.invert(
            image,
            prompt,
            steps,
            options.resolution,
            reference,
            reference_prompt,
            edit,
        )

    def require_own(self, inversion: Inversion) -> None:
        """InputError unless `inversion` was made by this model: its trajectory, memory bank and
        prompt embeddings are this UNet's and VAE's (another model's would edit with the wrong
        ones, or fail deep inside torch where their shapes differ)."""
        w, h = inversion.working_size
        latent = (
            self.unet.config.in_channels,
            h // self.vae_scale_factor,
            w // self.vae_scale_factor,
        )
        layers = {layer for layer, _ in inversion.memory}
        if inversion.model != self.model_name:
            raise InputError(
                f"the given inversion was made by model {inversion.model!r}, not by this "
                f"pipeline's ({self.model_name!r}); invert the image again with this pipeline"
            )
        if (
            tuple(inversion.latents.shape[2:]) != latent
            or inversion.text.shape[-1] != self.text_encoder.config.hidden_size
            or not layers <= set(self.bank_layers)
        ):
            raise InputError(
                "the given inversion's latents, prompt embeddings or memory bank do not fit this "
                f"model ({self.model_name!r}); invert the image again with this pipeline"
            )

    # ---- generation branch ------------------------------------------------------------------
    def run_plan(
        self, inversion: Inversion, plan: EditPlan, options: EditOptions, started: float
    ) -> EditResult:
        """Sample the plan with the shared guided sampler and package the result."""
        if not options.memory_bank:
            plan = replace(plan, bank_steps=range(0))
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
        gate = self.image_prompt_gate(inversion, schedule.image_prompt, options.ip_scale)
        with self.progress_bar(total=len(steps)) as bar, gate as set_image_prompt:
            bar.set_description(plan.edit)
            sampler = Sampler(
                unet=self.unet,
                features=self.features_for(plan.edit),
                bank=self.memory_bank,
                inversion=inversion,
                plan=plan,
                schedule=schedule,
                steps=steps,
                cond=cond,
                uncond=uncond,
                counts=counts,
                generator=torch.Generator().manual_seed(options.seed),
                set_image_prompt=set_image_prompt,
                callback=lambda _: bar.update(),
            )
            z = sampler.run()
        image = self.decode(z)
        if options.output_size == "input":
            image = image.resize(inversion.input_sizes[0], PIL.Image.LANCZOS)
        region = None if plan.region is None else plan.region.detach().cpu()
        places = plan.vacated
        if places is not None:  # kept with the result: on the CPU, like the region
            places = places.on_cpu()
        cell = inversion.working_size[1] / energy_grid(tuple(z.shape[-2:]))[0]
        one_cell = default_margin(inversion.working_size, image.size, cell)  # output px
        margin = one_cell if options.background_margin is None else options.background_margin
        thin = THIN_VACATED_CELLS * one_cell if places is not None else 0
        whole, kept = image, options.keep_background and region is not None
        if kept:
            image = keep_background(image, inversion.images[0], region, margin, places, thin)
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
                "regional": schedule.regional,
                "sde": sorted(schedule.sde),
                "time_travel": sorted(schedule.time_travel),
                "repeats": schedule.repeats,
                "eta_inside": schedule.eta_inside,
                "eta_outside": schedule.eta_outside,
                "background_blended": plan.blend_steps(inversion.num_steps),
                "statistics_matched": 0
                if plan.statistics is None
                else inversion.num_steps - plan.statistics.first_step,
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
            "keep_background": kept,
            "background_margin": margin,
            "thin_vacated": thin,
            "feature_blocks": list(self.features_for(plan.edit).blocks),
            "features_read_at": sampler.features_read_at(),
            "device": str(self.device),
            "dtype": str(self.unet.dtype).removeprefix("torch."),
            "image_prompt": self.image_prompt_record(inversion, schedule, options),
            "evaluations": counts.as_dict(),
            "seconds": round(time.perf_counter() - started, 3),
            **plan.params,
        }
        return EditResult(image, z, record, region, inversion.images[0], whole, places)

    def to_working(self, inversion: Inversion, point: Point, what: str) -> Point:
        """A point in input-image pixels → working-image pixels; must lie in the image."""
        point = require_point(point, what)
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

    @property
    def edit_defaults(self) -> EditDefaults:
        """The model's own defaults (its bundle's dragondiffusion.json), else upstream's.

        Setting them also sets each edit's feature blocks (`feature_overrides`; InputError if
        the UNet lacks those blocks, and then nothing changes)."""
        return self._edit_defaults

    @edit_defaults.setter
    def edit_defaults(self, defaults: EditDefaults) -> None:
        if not isinstance(defaults, EditDefaults):
            raise TypeError(
                f"edit_defaults must be an EditDefaults (dragondiffusion.edit_defaults), "
                f"got {type(defaults).__name__}; EditDefaults.read(folder) reads a bundle's"
            )
        most = self.scheduler.config.num_train_timesteps
        for edit, count in defaults.steps.items():
            if count > most:
                raise InputError(
                    f"{defaults.source}: steps of {edit} is {count}, more than the model's "
                    f"{most} training timesteps; give at most {most}"
                )
        for edit in WEIGHTS:
            if problem := level_problem(defaults.weights(edit).feature_timestep, most):
                raise InputError(f"{defaults.source}: {edit}: {problem}")
        self.feature_overrides = {
            edit: FeatureExtractor(self.unet, blocks)
            for edit in WEIGHTS
            if (blocks := defaults.blocks(edit)) is not None
        }
        self._edit_defaults = defaults

    def features_for(self, edit: str) -> FeatureExtractor:
        """The feature extractor of an edit's energies (an EditPlan's `edit`: "resize" for a
        move with a scale other than 1). `feature_overrides` holds one per edit, resize's
        copied from move's where the model names none: set `edit_defaults` to change both."""
        return self.feature_overrides.get(edit, self.features)

    def weights_from(self, given: object) -> str:
        """Where an edit's weights came from, for its record."""
        return "argument" if given is not None else self.edit_defaults.source

    def weights_for(self, edit: str, given: object) -> Any:
        """The weights an edit runs with: those given (checked, also against the model's
        timesteps), else the model's defaults (checked when they were set)."""
        if given is None:
            return self.edit_defaults.weights(edit)
        weights = checked_weights(edit, given)
        if problem := level_problem(
            weights.feature_timestep, self.scheduler.config.num_train_timesteps
        ):
            raise InputError(f"{type(weights).__name__}.{problem}")
        return weights

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
        resolution, output size, SDE strengths, image-prompt scale). Returns the image and a full
        parameter record.
        """
        started, opts = time.perf_counter(), EditOptions(**options)
        scale = require_number("scale", scale, positive=True)
        source = require_point(source, "--from point")
        target = require_point(target, "--to point")
        edit = move_kind(scale)
        inversion = self.prepare(image, prompt, opts, edit)
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
            self.weights_for(edit, weights),
            seed=opts.seed,
        )
        plan.params.update({"from": list(source), "to": list(target)})
        plan.params["weights_from"] = self.weights_from(weights)
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
        inversion = self.prepare(image, prompt, opts, "appearance", reference, reference_prompt)
        plan = plan_appearance(
            inversion,
            self.mask_tensor(mask, inversion, "object mask"),
            self.mask_tensor(reference_mask, inversion, "reference mask", index=1),
            self.weights_for("appearance", weights),
        )
        plan.params["weights_from"] = self.weights_from(weights)
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
        points = point_pairs(points)
        inversion = self.prepare(image, prompt, opts, "drag")
        working = [
            (
                self.to_working(inversion, h, f"handle {n + 1}"),
                self.to_working(inversion, t, f"target {n + 1}"),
            )
            for n, (h, t) in enumerate(points)
        ]
        region = self.mask_tensor(mask, inversion, "editable region")
        plan = plan_drag(inversion, region, working, self.weights_for("drag", weights))
        plan.params["points"] = [[list(h), list(t)] for h, t in points]
        plan.params["weights_from"] = self.weights_from(weights)
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
        scale = require_number("scale", scale, positive=True)
        offset = require_point(offset, "offset")
        inversion = self.prepare(image, prompt, opts, "paste", reference, reference_prompt)
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
            self.weights_for("paste", weights),
        )
        plan.params["offset"] = list(offset)
        plan.params["weights_from"] = self.weights_from(weights)
        return self.run_plan(inversion, plan, opts, started)


def point_pairs(points: object) -> list[tuple[Point, Point]]:
    """Drag points as a list of (handle, target) pairs of (x, y) numbers, else InputError."""
    message = "points must be a list of ((x, y), (x, y)) pairs: (handle, target) in pixels"
    if isinstance(points, str | bytes) or not isinstance(points, Iterable):
        raise InputError(f"{message}; got {points!r}")
    pairs = []
    for n, pair in enumerate(points):
        try:
            handle, target = pair
        except (TypeError, ValueError):
            raise InputError(f"{message}; pair {n + 1} is {pair!r}") from None
        pairs.append(
            (require_point(handle, f"handle {n + 1}"), require_point(target, f"target {n + 1}"))
        )
    return pairs
