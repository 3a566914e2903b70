"""The guided DDIM step: guidance enters x̂0 only; the direction term keeps the unguided noise."""

import torch

from dragondiffusion import sampler as sampler_module
from dragondiffusion.attention import BankMode
from dragondiffusion.ddim import DDIMTimesteps, predict_x0, step_to
from dragondiffusion.sampler import EditPlan, Evaluations, GuidanceSchedule, Sampler


def test_guidance_enters_x0_only(pipe, inversion, monkeypatch):
    """z_{t-1} = √ᾱ_next·x̂0(ε + g) + √(1−ᾱ_next)·ε (upstream §1.4), not ε + g in both terms."""
    z = inversion.latents[-1]
    g = torch.full_like(z, 0.3)
    monkeypatch.setattr(sampler_module, "energy_gradient", lambda *args, **kwargs: g)
    n = inversion.num_steps
    plan = EditPlan("test", z, None, torch.ones(1), BankMode.OFF, range(0), 1.0, 1.0, 1.0)
    steps = DDIMTimesteps(pipe.scheduler, n)
    cond, uncond = pipe.encode_text(inversion.prompts[0])
    s = Sampler(
        pipe.unet, pipe.features, pipe.memory_bank, inversion, plan,
        GuidanceSchedule("test", n, frozenset({0})), steps, cond, uncond, Evaluations(),
    )  # fmt: skip
    with torch.no_grad():
        eps = pipe.unet(z, steps.timesteps[0], encoder_hidden_states=cond).sample
        guided = s.step(0, z, reference=[])
        unguided = s.step(0, z, reference=None)
    a, a_next = steps.alpha[0], steps.alpha_next[0]
    assert torch.allclose(unguided, step_to(predict_x0(z, eps, a), eps, a_next), atol=1e-5)
    assert torch.allclose(guided, step_to(predict_x0(z, eps + g, a), eps, a_next), atol=1e-5)
    both_terms = step_to(predict_x0(z, eps + g, a), eps + g, a_next)
    assert not torch.allclose(guided, both_terms, atol=1e-3)
