"""DiffEditor's image prompt: IP-Adapter decoupled cross-attention, switched on per sampler step.

DiffEditor conditions the generation branch on an image as well as on text: CLIP image tokens,
projected by a trained adapter, enter every cross-attention through their own K/V projections
(IP-Adapter's decoupled cross-attention), weighted by a small scale. Upstream turns it on only at
steps 10–19 of 50, with scale 0.1, and never during the inversion, the energy-feature passes or the
time-travel rollback (§1.4, §1.7 and §7.3 #6 of our reading of the code). The unconditional CFG
branch sees the embedding of an all-zeros image (for plain IP-Adapter, diffusers' zero embedding).

The weights, the processors, the CLIP preprocessing and the encoding are diffusers' own
(`load_ip_adapter`, `IPAdapterAttnProcessor2_0`, `prepare_ip_adapter_image_embeds`,
`set_ip_adapter_scale`). This module finds the files and holds the per-edit embeddings and the
on/off gate.

Once an adapter is loaded, the diffusers UNet needs image embeddings at every call. A forward
pre-hook supplies them to the calls that bring none (inversion, feature passes, rollback, the
passes that bring a prediction to the feature level, the sampler's CFG pass). While the gate
is off, the scale is 0, so the image branch is skipped and the unconditional embedding only
satisfies the UNet's signature. While the gate is on, the hook gives
the CFG pair [unconditional; image prompt]. diffusers passes the image tokens to the processors
*beside* the text, never appended to it. Upstream appended the base image's tokens to the text
context for appearance and paste, so they leaked into the text K/V (§7.3 #5); that cannot happen
here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from torch.utils.hooks import RemovableHandle

from .errors import InputError

# Upstream squashes the image prompt to 256×256 (aspect not kept) before CLIP's own preprocessing.
PROMPT_SIZE = 256
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def weight_file(adapter: str | os.PathLike, weight_name: str | None = None) -> Path:
    """The adapter checkpoint: `adapter` itself, or `weight_name` (default: the only
    .safetensors/.bin file) in the folder `adapter`."""
    path = Path(adapter).expanduser()
    if path.is_dir():
        if weight_name is not None:
            path = path / weight_name
        else:
            found = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
            if len(found) != 1:
                raise InputError(
                    f"IP-Adapter folder {str(path)!r} holds {len(found)} .safetensors/.bin files; "
                    "give the checkpoint file itself (or weight_name)"
                )
            path = found[0]
    if not path.is_file():
        raise InputError(
            f"IP-Adapter checkpoint {str(path)!r} does not exist; give an IP-Adapter .safetensors "
            "or .bin file (e.g. ip-adapter-plus_sd15.safetensors or DragonDiffusion's "
            "ip_sd15_64.bin)"
        )
    if path.suffix not in WEIGHT_SUFFIXES:
        raise InputError(f"IP-Adapter checkpoint {str(path)!r} must be a .safetensors or .bin file")
    return path


def encoder_folder(weights: Path, image_encoder: str | os.PathLike | None) -> Path | None:
    """The image-encoder folder: the given one, else `image_encoder` beside the checkpoint
    (h94/IP-Adapter's layout), else None (use the pipeline's own encoder)."""
    if image_encoder is not None:
        path = Path(image_encoder).expanduser()
        if not (path / "config.json").is_file():
            raise InputError(
                f"image encoder {str(path)!r} is not a CLIPVisionModelWithProjection folder (no "
                "config.json); give e.g. h94/IP-Adapter's models/image_encoder"
            )
        return path
    beside = weights.parent / "image_encoder"
    return beside if (beside / "config.json").is_file() else None


def load_image_encoder(path: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A CLIPVisionModelWithProjection from a local folder, with clear errors."""
    from transformers import CLIPVisionModelWithProjection

    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise InputError(
            f"could not load the image encoder from {str(path)!r}: {err}. Give a "
            "CLIPVisionModelWithProjection folder (e.g. h94/IP-Adapter's models/image_encoder)"
        ) from err
    return encoder.requires_grad_(False).to(device)


def square(image: PIL.Image.Image) -> PIL.Image.Image:
    """The image prompt as upstream feeds it to CLIP: resized to 256×256."""
    return image.convert("RGB").resize((PROMPT_SIZE, PROMPT_SIZE), PIL.Image.BICUBIC)


@dataclass
class ImagePrompt:
    """A loaded adapter and its gate. `gate(on)` is the sampler's `set_image_prompt`.

    idle: (1, 1, …) unconditional embedding, given to the UNet while the gate is off.
    embeds: (2, 1, …) [unconditional; image prompt] of the current edit, None between edits.
    """

    adapter: str
    image_encoder: str
    set_scale: Callable[[float], None]
    idle: torch.Tensor
    embeds: torch.Tensor | None = None
    scale: float = 0.0
    on: bool = False
    handle: RemovableHandle | None = None

    def attach(self, unet: torch.nn.Module) -> None:
        self.handle = unet.register_forward_pre_hook(self.add_image_embeds, with_kwargs=True)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def gate(self, on: bool) -> None:
        """Image prompt on (at the edit's scale) or off (scale 0: the image branch is skipped)."""
        self.on = on and self.embeds is not None
        self.set_scale(self.scale if self.on else 0.0)

    def image_embeds(self, batch: int) -> torch.Tensor:
        """The image embeddings for a UNet call on `batch` samples."""
        if not self.on:
            return self.idle.expand(batch, *self.idle.shape[1:])
        assert self.embeds is not None
        if batch == 2:  # the CFG pair, ordered [unconditional; conditional] as in `cfg_noise`
            return self.embeds
        if batch == 1:  # CFG scale 1: the conditional pass alone
            return self.embeds[1:]
        raise RuntimeError(f"the image prompt is on for a UNet call on {batch} samples, not 1 or 2")

    def add_image_embeds(
        self, _unet: torch.nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        """Forward pre-hook: add `added_cond_kwargs["image_embeds"]` to calls that lack it."""
        added = kwargs.get("added_cond_kwargs") or {}
        if "image_embeds" in added:
            return None
        sample = args[0] if args else kwargs["sample"]
        embeds = self.image_embeds(sample.shape[0]).to(sample.device)
        return args, {**kwargs, "added_cond_kwargs": {**added, "image_embeds": [embeds]}}

    @contextmanager
    def active(self, embeds: torch.Tensor, scale: float) -> Iterator[Callable[[bool], None]]:
        """Use `embeds` at `scale` during one edit; yields the gate, which starts off."""
        self.embeds, self.scale = embeds, scale
        self.gate(False)
        try:
            yield self.gate
        finally:
            self.embeds, self.scale = None, 0.0
            self.gate(False)

    def record(self, scale: float, steps: frozenset[int], image: str) -> dict:
        """The parameter-record entry of an edit that used this image prompt."""
        return {
            "adapter": self.adapter,
            "image_encoder": self.image_encoder,
            "scale": scale,
            "steps": sorted(steps),
            "image": image,
        }
