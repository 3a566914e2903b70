import pytest
import torch

from dragondiffusion.ddim import sigma, step_to
from dragondiffusion.sampler import GuidanceSchedule, regional_sde_step, scaled_step


def test_dragon_schedule():
    s = GuidanceSchedule.dragon(50)
    assert s.guided == frozenset(range(30))
    assert not s.sde and not s.time_travel and not s.image_prompt
    assert GuidanceSchedule.dragon(20).guided == frozenset(range(12))


def test_diffeditor_schedule_matches_upstream_at_50_steps():
    s = GuidanceSchedule.diffeditor(50)
    assert s.guided == frozenset([*range(10), *range(10, 30, 2)])
    assert s.sde == frozenset(range(11, 20))
    assert s.time_travel == frozenset({22, 24, 26, 28}) and s.repeats == 3
    assert s.image_prompt == frozenset(range(10, 20))
    assert (s.eta_inside, s.eta_outside) == (0.4, 0.0)
    assert s.runs(22, guided_edit=True) == 3 and s.runs(22, guided_edit=False) == 1
    assert s.runs(23, guided_edit=True) == 1


def test_schedules_scale_with_the_step_count():
    assert scaled_step(30, 10) == 6 and scaled_step(5, 10) == 1
    s = GuidanceSchedule.diffeditor(100)
    assert s.guided == frozenset([*range(20), *range(20, 60, 2)])
    assert s.time_travel == frozenset(range(42, 60, 2))
    with pytest.raises(ValueError, match="unknown mode"):
        GuidanceSchedule.for_mode("dragon+", 50)


def test_regional_sde_step():
    torch.manual_seed(0)
    x0, eps, noise = torch.randn(3, 1, 4, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    a_t, a_next = 0.4, 0.5
    z = regional_sde_step(x0, eps, a_t, a_next, mask, 0.0, 0.0, noise)
    assert torch.allclose(z, step_to(x0, eps, a_next))
    z = regional_sde_step(x0, eps, a_t, a_next, mask, 0.4, 0.0, noise)
    s_in = sigma(a_t, a_next, 0.4)
    inside = step_to(x0, eps, a_next, s_in) + s_in * noise
    assert torch.allclose(z[..., 0, 0], inside[..., 0, 0])
    assert torch.allclose(z[..., 1, 1], step_to(x0, eps, a_next)[..., 1, 1])


# Golden evaluation counts of 50-step runs, derived from the schedules:
#   dragon: 50 CFG steps × 2 samples = 100 denoise; 30 guided steps, each 1 feature pass on the
#   current latent (backpropagated once: the global gradient of E_edit + E_content) + 1 per
#   trajectory image.
#   diffeditor: 20 guided steps, 4 of which (22, 24, 26, 28) run 3 times: 50 + 4×2 = 58 CFG runs
#   = 116 denoise samples; 20 + 4×2 = 28 guided runs → 28 current feature passes and 56
#   backward passes; trajectory features once per guided step (they do not change between runs):
#   20 per image; 2 rollbacks per time-travel step (none after the last run) = 8.
GOLDEN = {
    ("move", "dragon"): dict(
        inversion=50, denoise=100, features=60, backward=30, rollback=0, bring=0
    ),
    ("move", "diffeditor"): dict(
        inversion=50, denoise=116, features=48, backward=56, rollback=8, bring=0
    ),
    ("appearance", "dragon"): dict(
        inversion=100, denoise=100, features=90, backward=30, rollback=0, bring=0
    ),
    ("appearance", "diffeditor"): dict(
        inversion=100, denoise=116, features=68, backward=56, rollback=8, bring=0
    ),
}


@pytest.mark.parametrize("edit,mode", list(GOLDEN))
def test_golden_evaluation_counts(pipe, scene, edit, mode):
    img, mask = scene
    if edit == "move":
        result = pipe.move(img, mask, (35, 45), (100, 45), mode=mode)
    else:
        result = pipe.appearance(img, mask, img[::-1].copy(), mask[::-1].copy(), mode=mode)
    expected = GOLDEN[(edit, mode)]
    expected["forward"] = sum(v for k, v in expected.items() if k != "backward")
    assert result.record["evaluations"] == expected
