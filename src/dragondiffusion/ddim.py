"""Deterministic DDIM steps over ᾱ (alphas_cumprod), written out as in the DDIM paper.

These are the small formulas the inversion, the guided sampler, the regional SDE and the
time-travel rollback are built from; `z` is a latent, `eps` a noise prediction, `a_*` values of ᾱ.
"""

from __future__ import annotations

import torch

from .errors import InputError


def predict_x0(z: torch.Tensor, eps: torch.Tensor, a_t: float) -> torch.Tensor:
    """The clean latent implied by z at ᾱ_t and the noise eps: (z − √(1−ᾱ_t)·eps) / √ᾱ_t."""
    return (z - (1 - a_t) ** 0.5 * eps) / a_t**0.5


def step_to(x0: torch.Tensor, eps: torch.Tensor, a_next: float, sigma: float = 0.0) -> torch.Tensor:
    """The latent at ᾱ_next on the path through x0 with direction eps, less the noise share σ²."""
    return a_next**0.5 * x0 + (1 - a_next - sigma**2) ** 0.5 * eps


def sigma(a_t: float, a_prev: float, eta: float) -> float:
    """DDIM's σ for a step ᾱ_t → ᾱ_prev with stochasticity η (η = 1 is DDPM's posterior)."""
    return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5


def invert_step(z: torch.Tensor, eps: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
    """One deterministic DDIM step from noise level ᾱ_from to ᾱ_to (either direction)."""
    return step_to(predict_x0(z, eps, a_from), eps, a_to)


class DDIMTimesteps:
    """Timesteps and ᾱ values of an N-step DDIM run, in denoising order (i = 0 is the noisiest).

    Built from a diffusers DDIM scheduler configured as SD 1.5 ("leading" spacing, steps_offset 1:
    981, 961, …, 1 for 50 steps). `alpha[i]` is ᾱ at step i's timestep and `alpha_next[i]` is ᾱ
    one step later (t − 1000/N), which is ᾱ_0 (`final_alpha_cumprod`) past the end.
    """

    def __init__(self, scheduler, num_steps: int) -> None:
        most = scheduler.config.num_train_timesteps
        if not 2 <= num_steps <= most:
            raise InputError(
                f"steps must lie between 2 and the model's {most} training timesteps, "
                f"got {num_steps}"
            )
        scheduler.set_timesteps(num_steps)
        self.timesteps = [int(t) for t in scheduler.timesteps]
        ratio = scheduler.config.num_train_timesteps // num_steps
        self.ratio = ratio
        cumprod = scheduler.alphas_cumprod
        final = float(scheduler.final_alpha_cumprod)
        self.alpha = [float(cumprod[t]) for t in self.timesteps]
        self.alpha_next = [
            float(cumprod[t - ratio]) if t >= ratio else final for t in self.timesteps
        ]

    def __len__(self) -> int:
        return len(self.timesteps)
