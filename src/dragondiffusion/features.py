"""Decoder features for the energies, captured by forward hooks on the same UNet (DIFT-style).

DragonDiffusion compares the outputs of two decoder blocks: the one at 1/16 of the image (semantic)
and the one at 1/8 (geometric); for SD 1.x these are `up_blocks[1]` and `up_blocks[2]`. A model may
name other blocks in its `dragondiffusion.json` ("feature_blocks"): the embedded 128-pixel model
uses only the 1/8 block, whose 1/16 block is an 8×8 grid too coarse to place small objects. The
forward pass is stopped right after the last needed block, so deeper blocks never run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError


class _StopForward(Exception):
    """Raised from a hook to end the UNet's forward once the needed features are captured."""


def feature_blocks(unet: torch.nn.Module) -> tuple[int, int]:
    """Indices of the decoder blocks whose outputs are at 1/2 and 1/1 of the latent resolution."""
    down = sum(b.downsamplers is not None for b in unet.down_blocks)
    factor, found = 2**down, {}
    for i, block in enumerate(unet.up_blocks):
        if getattr(block, "upsamplers", None) is not None:
            factor //= 2
        found.setdefault(factor, i)
    if 2 not in found or 1 not in found:
        raise InputError(
            "cannot find decoder blocks at 1/16 and 1/8 of the image in this UNet; "
            "use a Stable Diffusion 1.x-format model"
        )
    return found[2], found[1]


def whole_numbers(values: object) -> bool:
    """Whether `values` is a non-empty list or tuple of ints (bools are not numbers here)."""
    return (
        isinstance(values, list | tuple)
        and bool(values)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    )


def checked_blocks(unet: torch.nn.Module, blocks: tuple[int, ...]) -> tuple[int, ...]:
    """`blocks` as a sorted tuple, or InputError unless they are distinct decoder block indices."""
    count = len(unet.up_blocks)
    if (
        not whole_numbers(blocks)
        or len(set(blocks)) != len(blocks)
        or not all(0 <= b < count for b in blocks)
    ):
        raise InputError(
            f"feature blocks must be distinct indices of the UNet's {count} decoder blocks "
            f"(0 to {count - 1}), got {list(blocks)!r}; leave them out for DragonDiffusion's two"
        )
    return tuple(sorted(blocks))


class FeatureExtractor:
    """Calls the UNet and returns the outputs of the chosen decoder blocks, stopping after them."""

    def __init__(self, unet: torch.nn.Module, blocks: tuple[int, ...] | None = None) -> None:
        self.unet = unet
        self.blocks = feature_blocks(unet) if blocks is None else checked_blocks(unet, blocks)
        self.calls = 0

    def __call__(
        self, latents: torch.Tensor, timestep: torch.Tensor | int, text: torch.Tensor
    ) -> list[torch.Tensor]:
        captured: dict[int, torch.Tensor] = {}
        last = max(self.blocks)

        def hook(index: int):
            def capture(_module, _inputs, output):
                captured[index] = output
                if index == last:
                    raise _StopForward

            return capture

        handles = [self.unet.up_blocks[i].register_forward_hook(hook(i)) for i in self.blocks]
        try:
            self.unet(latents, timestep, encoder_hidden_states=text)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        self.calls += 1
        return [captured[i] for i in self.blocks]


def energy_grid(latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The grid the energies live on: twice the latent resolution (H/4 of the image for SD)."""
    return latent_hw[0] * 2, latent_hw[1] * 2


def upsample(maps: list[torch.Tensor], grid: tuple[int, int]) -> list[torch.Tensor]:
    """Resize every feature map to the energy grid with nearest interpolation (as upstream)."""
    return [F.interpolate(m, size=grid, mode="nearest") for m in maps]
