"""The guidance branch: DDIM inversion of a real image into a trajectory and a memory bank."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import PIL.Image
import torch

from .attention import BankMode, MemoryBank
from .ddim import DDIMTimesteps, invert_step
from .geometry import Size


@dataclass
class Inversion:
    """Everything the generation branch reuses from one inversion; edit it as often as you like.

    latents: (N+1, B, 4, h, w), z_0 (the encoded image) … z_N (the inverted noise).
    memory: decoder self-attention K/V per (layer, denoising step), on the compute device.
    text: (B, 77, D) conditional prompt embeddings the inversion used.
    images: the B input images as loaded (the image prompt encodes the last one).
    """

    latents: torch.Tensor
    memory: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]
    text: torch.Tensor
    prompts: list[str]
    working_size: Size
    input_sizes: list[Size]
    model: str
    images: list[PIL.Image.Image]

    @property
    def num_steps(self) -> int:
        return self.latents.shape[0] - 1

    def at_step(self, i: int) -> torch.Tensor:
        """The trajectory latent at the noise level of denoising step i (z_N at i = 0)."""
        return self.latents[self.num_steps - i]

    def nbytes(self) -> int:
        """Bytes held: trajectory latents plus memory bank."""
        bank = sum(k.nbytes + v.nbytes for k, v in self.memory.values())
        return self.latents.nbytes + bank


@torch.no_grad()
def ddim_invert(
    unet: torch.nn.Module,
    steps: DDIMTimesteps,
    z0: torch.Tensor,
    text: torch.Tensor,
    bank: MemoryBank,
    on_step: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Deterministic DDIM inversion z_0 → z_N, prompt-conditioned, no CFG, recording the bank.

    Inversion step j evaluates the UNet at z_j with the timestep of denoising step i = N−1−j and
    moves to that step's noise level; the K/V it sees are stored under step i, the step of the
    generation branch that starts from the same noise level.
    """
    n = len(steps)
    bank.store, bank.mode = {}, BankMode.RECORD
    latents, z = [z0], z0
    try:
        for j in range(n):
            i = n - 1 - j
            bank.step = i
            eps = unet(z, steps.timesteps[i], encoder_hidden_states=text).sample
            z = invert_step(z, eps, steps.alpha_next[i], steps.alpha[i])
            latents.append(z)
            if on_step is not None:
                on_step()
    finally:
        bank.mode = BankMode.OFF
    return torch.stack(latents), bank.store
