import pytest
import torch
from diffusers import DDIMScheduler

from dragondiffusion.ddim import DDIMTimesteps, invert_step, predict_x0, sigma, step_to
from dragondiffusion.pipeline import SD15_DDIM
from dragondiffusion.testing import SD15_SCHEDULER


def sd15():
    return DDIMScheduler.from_config(DDIMScheduler(**SD15_SCHEDULER).config, **SD15_DDIM)


def test_sd15_timesteps_match_upstream():
    steps = DDIMTimesteps(sd15(), 50)
    assert steps.timesteps[0] == 981 and steps.timesteps[-1] == 1
    assert all(a - b == 20 for a, b in zip(steps.timesteps, steps.timesteps[1:], strict=False))
    cumprod = sd15().alphas_cumprod
    assert steps.alpha[0] == pytest.approx(float(cumprod[981]))
    assert steps.alpha_next[0] == pytest.approx(float(cumprod[961]))
    # past the end: final_alpha_cumprod = ᾱ_0 because set_alpha_to_one is False
    assert steps.alpha_next[-1] == pytest.approx(float(cumprod[0]))


def test_inversion_step_is_the_inverse_of_a_ddim_step_for_fixed_noise():
    torch.manual_seed(0)
    z, eps = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    up = invert_step(z, eps, 0.9, 0.3)
    assert torch.allclose(invert_step(up, eps, 0.3, 0.9), z, atol=1e-5)


def test_step_formulas():
    z, eps = torch.tensor([1.0]), torch.tensor([0.5])
    x0 = predict_x0(z, eps, 0.64)
    assert x0.item() == pytest.approx((1 - 0.6 * 0.5) / 0.8)
    assert step_to(x0, eps, 0.64).item() == pytest.approx(1.0)
    assert sigma(0.5, 0.8, 0.0) == 0.0
    assert sigma(0.5, 0.8, 1.0) == pytest.approx(((0.2 / 0.5) * (1 - 0.5 / 0.8)) ** 0.5)
