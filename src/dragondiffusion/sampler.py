"""The generation branch: guided DDIM sampling with classifier-free guidance and energy gradients.

At a guided step the energy gradient g is added to the CFG noise *only where x̂0 is formed*; the DDIM
direction term keeps the unguided noise (upstream §1.4). The gradient is regional:
g = k·E_scale·[M ⊙ ∇E_edit + (1−M) ⊙ ∇E_content], taken w.r.t. the current latent through a
feature-only pass of the same UNet (plain attention, conditional text only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .attention import BankMode, MemoryBank
from .ddim import DDIMTimesteps, predict_x0, step_to
from .features import FeatureExtractor, energy_grid, upsample
from .inversion import Inversion

EnergyFn = Callable[[list[torch.Tensor], list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
MODES = ("dragon",)


def scaled_step(step_of_50: int, num_steps: int) -> int:
    """A step index given for a 50-step run, mapped proportionally to a `num_steps` run."""
    return round(step_of_50 * num_steps / 50)


@dataclass(frozen=True)
class GuidanceSchedule:
    """Which denoising steps (i = 0 is the noisiest) get an energy gradient."""

    mode: str
    num_steps: int
    guided: frozenset[int]

    @classmethod
    def dragon(cls, num_steps: int) -> GuidanceSchedule:
        """DragonDiffusion: guidance at every one of the first 30 of 50 steps (proportional)."""
        return cls("dragon", num_steps, frozenset(range(scaled_step(30, num_steps))))

    @classmethod
    def for_mode(cls, mode: str, num_steps: int) -> GuidanceSchedule:
        if mode == "dragon":
            return cls.dragon(num_steps)
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


@dataclass
class EditPlan:
    """What an edit changes in the shared sampler: start latent, energy, masks and bank policy.

    z_init: (1, 4, h, w) start latent; edit_mask: (1, 1, h, w) M of the regional gradient (1 where
    the edit energy acts); energy(current, reference) → (E_edit, E_content), both scalars, from
    feature maps on the energy grid (current: batch 1; reference: the inversion's batch).
    """

    edit: str
    z_init: torch.Tensor
    energy: EnergyFn
    edit_mask: torch.Tensor
    bank_mode: BankMode
    bank_steps: range
    guidance_scale: float
    energy_scale: float
    k: float
    params: dict = field(default_factory=dict)


@dataclass
class Evaluations:
    """Counts of UNet evaluations, in samples (a CFG pair counts 2): what an edit costs."""

    inversion: int = 0
    denoise: int = 0
    features: int = 0
    backward: int = 0

    @property
    def forward(self) -> int:
        """All forward passes; feature passes stop after the second-to-last decoder block."""
        return self.inversion + self.denoise + self.features

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "forward": self.forward}


def cfg_noise(
    unet: torch.nn.Module,
    z: torch.Tensor,
    t: int,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    scale: float,
    counts: Evaluations,
) -> torch.Tensor:
    """Classifier-free-guided noise ε_u + s·(ε_c − ε_u); one conditional pass when s = 1."""
    if scale == 1.0:
        counts.denoise += z.shape[0]
        return unet(z, t, encoder_hidden_states=cond).sample
    eps = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    counts.denoise += 2 * z.shape[0]
    eps_u, eps_c = eps.chunk(2)
    return eps_u + scale * (eps_c - eps_u)


def energy_gradient(
    features: FeatureExtractor,
    plan: EditPlan,
    z: torch.Tensor,
    t: int,
    text: torch.Tensor,
    reference: list[torch.Tensor],
    counts: Evaluations,
) -> torch.Tensor:
    """g = k·E_scale·[M ⊙ ∇_z E_edit + (1−M) ⊙ ∇_z E_content] at latent z (1, 4, h, w)."""
    grid = energy_grid(tuple(z.shape[-2:]))
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        current = upsample(features(z, t, text), grid)
        counts.features += 1
        e_edit, e_content = plan.energy(current, reference)
        g_edit, g_content = (
            torch.autograd.grad(plan.energy_scale * e, z, retain_graph=True)[0]
            for e in (e_edit, e_content)
        )
        counts.backward += 2
    m = plan.edit_mask.to(z.dtype)
    return plan.k * (m * g_edit + (1 - m) * g_content)


@torch.no_grad()
def sample(
    unet: torch.nn.Module,
    features: FeatureExtractor,
    bank: MemoryBank,
    inversion: Inversion,
    plan: EditPlan,
    schedule: GuidanceSchedule,
    steps: DDIMTimesteps,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    counts: Evaluations,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Run the guided DDIM loop from plan.z_init and return z_0 (1, 4, h, w)."""
    z = plan.z_init
    feature_text = inversion.text[:1]
    grid = energy_grid(tuple(z.shape[-2:]))
    bank.store = inversion.memory
    try:
        for i, t in enumerate(steps.timesteps):
            bank.step = i
            bank.mode = plan.bank_mode if i in plan.bank_steps else BankMode.OFF
            eps = cfg_noise(unet, z, t, cond, uncond, plan.guidance_scale, counts)
            bank.mode = BankMode.OFF
            guided_eps = eps
            if i in schedule.guided:
                z_ref = inversion.at_step(i)
                reference = upsample(
                    features(z_ref, t, feature_text.expand(len(z_ref), -1, -1)), grid
                )
                counts.features += len(z_ref)
                g = energy_gradient(features, plan, z, t, feature_text, reference, counts)
                guided_eps = eps + g
            x0 = predict_x0(z, guided_eps, steps.alpha[i])
            z = step_to(x0, eps, steps.alpha_next[i])
            if callback is not None:
                callback({"i": i, "t": t, "z": z, "x0": x0, "guided": i in schedule.guided})
    finally:
        bank.mode = BankMode.OFF
    return z
