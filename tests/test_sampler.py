"""The guided DDIM step: guidance enters x̂0 only; the direction term keeps the unguided noise."""

from dataclasses import replace

import pytest
import torch

from dragondiffusion import sampler as sampler_module
from dragondiffusion.attention import BankMode
from dragondiffusion.ddim import DDIMTimesteps, invert_step, predict_x0, step_to
from dragondiffusion.errors import InputError
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


def test_dragon_mode_guides_globally_diffeditor_regionally():
    """DiffEditor: ∇E_edit inside the edit mask M, ∇E_content outside it. DragonDiffusion (the
    `dragon` schedule): ∇(E_edit + E_content) everywhere, in one backward pass. Here E_edit
    reads the whole latent and E_content nothing, so only the global gradient reaches cells
    outside M (upstream's alg='D' kept the regional split: not the paper's method)."""
    z = torch.randn(1, 4, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1.0

    def energy(current, reference):
        return (current[0] ** 2).sum(), 0.0 * current[0].sum()

    plan = EditPlan("test", z, energy, mask, BankMode.OFF, range(0), 1.0, 2.0, 0.5)
    features = lambda z, t, text: [z]  # noqa: E731
    full = 0.5 * 2.0 * 2 * 4 * z  # k·E_scale·∇ of the sum of squares upsampled 2× (4 copies)
    for schedule, expected, backward in (
        (GuidanceSchedule.diffeditor(50), full * mask, 2),
        (GuidanceSchedule.dragon(50), full, 1),
    ):
        counts = Evaluations()
        args = (features, plan, z, 981, None, [], counts, schedule.regional)
        g = sampler_module.energy_gradient(*args)
        assert torch.allclose(g, expected, atol=1e-5), schedule.mode
        assert counts.backward == backward and counts.features == 1
    assert GuidanceSchedule.diffeditor(50).regional and not GuidanceSchedule.dragon(50).regional


def blend_sampler(pipe, inversion, share, seen):
    """A plain (unguided) sampler over `inversion` whose plan edits a 4×4-cell box and blends the
    background back for `share` of the steps; `seen` collects each step's output."""
    z = inversion.latents[-1]
    region = torch.zeros_like(z[:, :1], dtype=torch.bool)
    region[..., 6:10, 8:12] = True
    n = inversion.num_steps
    plan = EditPlan(
        "test", z, None, region.float(), BankMode.OFF, range(0), 1.0, 0.0, 0.0,
        sde_mask=region, blend_background=share,
    )  # fmt: skip
    cond, uncond = pipe.encode_text(inversion.prompts[0])
    sampler = Sampler(
        pipe.unet, pipe.features, pipe.memory_bank, inversion, plan,
        GuidanceSchedule("test", n, frozenset()), DDIMTimesteps(pipe.scheduler, n), cond, uncond,
        Evaluations(), callback=lambda info: seen.append(info["z"].clone()),
    )  # fmt: skip
    outside = torch.ones_like(region)
    outside[..., 5:11, 7:13] = False  # the region grown by one cell
    return sampler, outside.expand_as(z)


def test_background_blending_resets_the_latent_outside_the_region(pipe, inversion):
    n = inversion.num_steps
    seen: list[torch.Tensor] = []
    sampler, outside = blend_sampler(pipe, inversion, 1.0, seen)
    z0 = sampler.run()
    for i, z in enumerate(seen[:-1]):
        assert torch.equal(z[outside], inversion.at_step(i + 1)[:1][outside]), i
    assert torch.equal(z0[outside], inversion.latents[0][outside]), "the input, exactly"
    free: list[torch.Tensor] = []
    plain = blend_sampler(pipe, inversion, 0.0, free)[0].run()
    assert not torch.allclose(plain[outside], inversion.latents[0][outside], atol=1e-3)
    inside = ~outside
    inside[..., 5:11, 7:13] = False
    inside[..., 6:10, 8:12] = True
    assert not torch.allclose(z0[inside], inversion.latents[0][inside], atol=1e-3)
    # Half the steps: blended for the first n/2, free afterwards.
    half: list[torch.Tensor] = []
    blend_sampler(pipe, inversion, 0.5, half)[0].run()
    k = n // 2
    assert torch.equal(half[k - 1][outside], inversion.at_step(k)[:1][outside])
    assert not torch.equal(half[k][outside], inversion.at_step(k + 1)[:1][outside])


def test_background_blending_is_a_share_of_the_steps():
    z = torch.zeros(1, 4, 8, 8)
    plan = EditPlan("test", z, None, z[:, :1], BankMode.OFF, range(0), 1.0, 0.0, 0.0)
    assert replace(plan, blend_background=1.0).blend_steps(50) == 0, "no region, no blending"
    region = torch.ones_like(z[:, :1], dtype=torch.bool)
    assert replace(plan, sde_mask=region, blend_background=0.6).blend_steps(50) == 30
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(InputError, match="blend_background"):
            replace(plan, blend_background=bad)


def level_sampler(pipe, inversion, feature_timestep, guided, substeps=1):
    """A sampler over `inversion` whose plan reads features at `feature_timestep`, brought there
    in `substeps` DDIM steps."""
    z = inversion.latents[-1]
    n = inversion.num_steps
    plan = EditPlan(
        "test", z, None, torch.ones(1), BankMode.OFF, range(0), 1.0, 1.0, 1.0,
        feature_timestep=feature_timestep, feature_substeps=substeps,
    )  # fmt: skip
    cond, uncond = pipe.encode_text(inversion.prompts[0])
    return Sampler(
        pipe.unet, pipe.features, pipe.memory_bank, inversion, plan,
        GuidanceSchedule("test", n, frozenset(guided)), DDIMTimesteps(pipe.scheduler, n), cond,
        uncond, Evaluations(),
    )  # fmt: skip


def test_noisier_steps_read_features_at_the_level(pipe, inversion, monkeypatch):
    """Above the level: the step's own prediction brought there by one deterministic DDIM step,
    against the inversion's features at the level (computed once); at or below it: unchanged."""
    seen = []

    def fake_gradient(features, plan, z, t, text, reference, counts, regional=True):
        seen.append((z.clone(), t, reference))
        return torch.full_like(z, 0.3)

    monkeypatch.setattr(sampler_module, "energy_gradient", fake_gradient)
    s = level_sampler(pipe, inversion, 520.0, guided={0, 2, 6})
    steps = s.steps
    assert steps.timesteps[:7] == [901, 801, 701, 601, 501, 401, 301]
    assert s.level == 4 and s.reads_at_level(0) and not s.reads_at_level(4)
    calls = s.counts.features
    level_features = s.reference_features(0)
    assert s.reference_features(2) is level_features, "computed once"
    assert s.counts.features == calls + len(inversion.latents[0])
    for got, want in zip(level_features, s.trajectory_features(4), strict=True):
        assert torch.equal(got, want)
    assert s.reference_features(4) is level_features, "and reused at the level's own step"
    own = s.reference_features(6)
    assert not torch.equal(own[0], level_features[0])
    z = inversion.at_step(0)[:1]
    with torch.no_grad():
        eps = pipe.unet(z, steps.timesteps[0], encoder_hidden_states=s.cond).sample
        out = s.step(0, z, level_features)
    # The gradient at the brought latent enters x̂0 as it is (no chain-rule factor).
    a, a_next = steps.alpha[0], steps.alpha_next[0]
    assert torch.allclose(out, step_to(predict_x0(z, eps + 0.3, a), eps, a_next), atol=1e-5)
    with torch.no_grad():
        z6 = inversion.at_step(6)[:1]
        s.step(6, z6, own)
    (z_read, t_read, reference), (z_own, t_own, _) = seen
    assert t_read == 501 and reference is level_features
    assert torch.allclose(z_read, invert_step(z, eps, steps.alpha[0], steps.alpha[4]), atol=1e-5)
    assert not torch.allclose(z_read, z, atol=1e-2)
    assert t_own == 301 and torch.equal(z_own, z6)


def test_the_level_is_off_by_default_and_checked(pipe, inversion):
    s = level_sampler(pipe, inversion, 0.0, guided={0})
    assert s.level is None and not s.reads_at_level(0)
    assert torch.equal(s.reference_features(0)[0], s.trajectory_features(0)[0])
    top = level_sampler(pipe, inversion, 5000.0, guided={0})
    assert top.level == 0 and not top.reads_at_level(0), "no step is noisier than the first"
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(InputError, match="feature_timestep"):
            level_sampler(pipe, inversion, bad, guided={0})


def test_level_path_splits_the_way_down_in_equal_jumps():
    assert sampler_module.level_path(0, 24, 1) == [0, 24]
    assert sampler_module.level_path(0, 24, 2) == [0, 12, 24]
    assert sampler_module.level_path(0, 9, 3) == [0, 3, 6, 9]
    assert sampler_module.level_path(2, 9, 2) == [2, 6, 9]  # round(3.5) is 4: half to even
    assert sampler_module.level_path(3, 4, 3) == [3, 4], "no more jumps than steps"
    assert sampler_module.level_path(0, 24, 10**12) == list(range(25)), "and no long loop"


def test_substeps_bring_the_prediction_down_step_by_step(pipe, inversion):
    """Two substeps: the step's own noise to the midpoint, one plain conditional pass there, then
    on to the level; counted as `bring` passes. One substep is the single jump."""
    s = level_sampler(pipe, inversion, 520.0, guided={0}, substeps=2)
    steps, z = s.steps, inversion.at_step(0)[:1]
    assert s.level == 4
    with torch.no_grad():
        eps = pipe.unet(z, steps.timesteps[0], encoder_hidden_states=s.cond).sample
        brought = s.bring(0, z, eps)
        mid = invert_step(z, eps, steps.alpha[0], steps.alpha[2])
        eps_mid = pipe.unet(mid, steps.timesteps[2], encoder_hidden_states=s.cond).sample
        want = invert_step(mid, eps_mid, steps.alpha[2], steps.alpha[4])
        one = level_sampler(pipe, inversion, 520.0, guided={0}).bring(0, z, eps)
    assert torch.allclose(brought, want, atol=1e-5)
    assert s.counts.bring == 1 and s.counts.as_dict()["forward"] == 1
    assert torch.allclose(one, invert_step(z, eps, steps.alpha[0], steps.alpha[4]), atol=1e-5)
    assert not torch.allclose(brought, one, atol=1e-3)


@pytest.mark.parametrize(
    "bad", [0, 1.5, -2.0, float("nan"), float("inf"), -(10**400), True, "2", None]
)
def test_substeps_are_a_whole_number(pipe, inversion, bad):
    with pytest.raises(InputError, match="feature_substeps must be a whole number"):
        level_sampler(pipe, inversion, 520.0, guided={0}, substeps=bad)
    assert (
        level_sampler(pipe, inversion, 520.0, guided={0}, substeps=3.0).plan.feature_substeps == 3
    )


def test_sampling_builds_no_autograd_graph_even_with_trainable_weights(pipe, scene, inversion):
    """The sampler runs under no_grad (the energies take their own gradients): a UNet weight
    left trainable (as diffusers leaves an IP-Adapter's) must not chain every step's latent
    into one growing graph."""
    weight = next(pipe.unet.parameters())
    weight.requires_grad_(True)
    try:
        result = pipe.move(inversion, scene[1], (35, 45), (100, 45), num_inference_steps=10)
    finally:
        weight.requires_grad_(False)
    assert not result.latent.requires_grad
