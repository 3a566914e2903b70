"""Statistics matching (AdaIN on the latent) for appearance replacement."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from dragondiffusion import models
from dragondiffusion.attention import BankMode
from dragondiffusion.ddim import DDIMTimesteps
from dragondiffusion.edits.appearance import AppearanceWeights, plan_appearance
from dragondiffusion.edits.paste import PasteWeights, plan_paste
from dragondiffusion.errors import InputError
from dragondiffusion.latent_statistics import StatisticsMatch, channel_statistics, match_statistics
from dragondiffusion.sampler import EditPlan, Evaluations, GuidanceSchedule, Sampler

SIZE = (192, 128)  # working size of the 160×96 `scene` fixture; latents 16×24


def cells(h, w, y0, y1, x0, x1):
    m = torch.zeros(1, 1, h, w, dtype=torch.bool)
    m[..., y0:y1, x0:x1] = True
    return m


def test_matched_cells_take_the_source_statistics_and_the_rest_stays():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=gen)
    source = 3.0 + 0.5 * torch.randn(1, 4, 8, 8, generator=gen)
    target, source_cells = cells(8, 8, 2, 5, 2, 6), cells(8, 8, 0, 4, 4, 8)
    coverage = target.float()
    coverage[..., 5, 2:6] = 0.5  # a half-covered row below the object's cells
    out = match_statistics(z, target, coverage, source, source_cells)
    mean, spread = channel_statistics(out, target)
    want_mean, want_spread = channel_statistics(source, source_cells)
    assert torch.allclose(mean, want_mean, atol=1e-5)
    assert torch.allclose(spread, want_spread, atol=1e-5)
    assert not torch.allclose(want_mean, channel_statistics(z, target)[0], atol=0.5)
    untouched = coverage == 0
    assert torch.equal(out[untouched.expand_as(z)], z[untouched.expand_as(z)])
    # Half-covered cells outside the measured ones move halfway by the shift of the mean.
    shift = want_mean - channel_statistics(z, target)[0]
    half = out[..., 5:6, 2:6] - z[..., 5:6, 2:6]
    assert torch.allclose(half, 0.5 * shift.expand_as(half), atol=1e-5)


def test_a_one_cell_object_and_its_partly_covered_neighbours_stay_bounded():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 8, 8, generator=gen)
    source = torch.randn(1, 4, 8, 8, generator=gen)
    one = cells(8, 8, 3, 4, 3, 4)  # spread 0 over one cell
    coverage = torch.zeros(1, 1, 8, 8)
    coverage[..., 2:5, 2:5] = 0.3
    coverage[..., 3, 3] = 1.0
    out = match_statistics(z, one, coverage, source, cells(8, 8, 0, 8, 0, 8))
    assert torch.isfinite(out).all() and (out - z).abs().max() < 10
    source_mean = channel_statistics(source, cells(8, 8, 0, 8, 0, 8))[0]
    assert torch.allclose(out[..., 3, 3], source_mean[..., 0, 0], atol=1e-5)
    shift = source_mean[..., 0, 0] - z[..., 3, 3]  # a neighbour moves by 0.3 of the mean's shift
    assert torch.allclose(out[..., 2, 2] - z[..., 2, 2], 0.3 * shift, atol=1e-5)


def test_the_match_covers_the_last_share_of_the_steps_and_follows_the_outline():
    mask = torch.zeros(1, 1, 128, 192)
    mask[..., 16:48, 20:44] = 1  # latent cells x 2.5-5.5 (8 px each): edge cells half covered
    match = StatisticsMatch.for_share(mask, mask, (16, 24), 0.2, 50)
    assert match.first_step == 40
    assert StatisticsMatch.for_share(mask, mask, (16, 24), 1.0, 50).first_step == 0
    assert StatisticsMatch.for_share(mask, mask, (16, 24), 0.2, 2).first_step == 1, "at least one"
    assert match.coverage[0, 0, 3, 2].item() == pytest.approx(0.5)
    assert match.coverage[0, 0, 3, 3].item() == 1.0 and match.coverage[0, 0, 3, 6].item() == 0
    assert match.cells[0, 0, 3, 2] and not match.cells[0, 0, 3, 6]  # ≥ half covered counts
    with pytest.raises(InputError, match="the reference mask"):
        StatisticsMatch.for_share(mask, torch.zeros_like(mask), (16, 24), 0.2, 50)
    assert StatisticsMatch.for_share(mask, mask, (16, 24), 0.0, 50) is None, "0: no match"
    with pytest.raises(InputError, match=r"match_statistics must lie in \[0, 1\]"):
        StatisticsMatch.for_share(mask, mask, (16, 24), 1.5, 50)


def test_the_sampler_matches_after_each_of_the_last_steps_only(pipe, inversion):
    """Matched against the input's own trajectory (source image 0) over the last half."""
    n = inversion.num_steps
    z = inversion.latents[-1]
    region = cells(16, 24, 4, 8, 4, 8)
    match = StatisticsMatch(region, region.float(), cells(16, 24, 8, 12, 12, 20), n // 2, 0)
    plan = EditPlan(
        "test", z, None, region.float(), BankMode.OFF, range(0), 1.0, 0.0, 0.0,
        statistics=match,
    )  # fmt: skip
    seen: list[torch.Tensor] = []
    cond, uncond = pipe.encode_text(inversion.prompts[0])
    Sampler(
        pipe.unet, pipe.features, pipe.memory_bank, inversion, plan,
        GuidanceSchedule("test", n, frozenset()), DDIMTimesteps(pipe.scheduler, n), cond, uncond,
        Evaluations(), callback=lambda info: seen.append(info["z"].clone()),
    ).run()  # fmt: skip
    for i, latent in enumerate(seen):
        source = channel_statistics(inversion.at_step(i + 1)[:1], match.source_cells)
        own = channel_statistics(latent, region)
        matched = all(torch.allclose(a, b, atol=1e-4) for a, b in zip(own, source, strict=True))
        assert matched == (i >= n // 2), i


def test_appearance_plans_the_match_only_when_asked(pipe, scene):
    img, _ = scene
    obj = torch.zeros(1, 1, 128, 192)
    obj[..., 40:72, 24:56] = 1
    inv2 = pipe.invert(img, "a scene", 10, reference=np.ascontiguousarray(img[:, ::-1]))
    assert plan_appearance(inv2, obj, obj).statistics is None, "upstream: no match"
    plan = plan_appearance(inv2, obj, obj, AppearanceWeights(match_statistics=0.3))
    assert plan.statistics.first_step == 7 and plan.statistics.source == 1
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InputError, match="match_statistics must lie in"):
            plan_appearance(inv2, obj, obj, AppearanceWeights(match_statistics=bad))


def test_paste_matches_the_pasted_region_to_the_reference_object(pipe, scene):
    img, _ = scene
    obj = torch.zeros(1, 1, 128, 192)
    obj[..., 40:72, 24:56] = 1  # latent cells x 3-6, y 5-8
    inv2 = pipe.invert(img, "a scene", 10, reference=np.ascontiguousarray(img[:, ::-1]))
    assert plan_paste(inv2, obj, (64, 0)).statistics is None, "upstream: no match"
    plan = plan_paste(inv2, obj, (64, 0), weights=PasteWeights(match_statistics=0.5))
    match = plan.statistics
    assert match.first_step == 5 and match.source == 1
    assert torch.equal(match.cells, plan.sde_mask), "the pasted object's cells"
    assert match.source_cells[0, 0, 5:9, 3:7].all() and match.source_cells.sum() == 16
    with pytest.raises(InputError, match="match_statistics must lie in"):
        plan_paste(inv2, obj, (64, 0), weights=PasteWeights(match_statistics=2.0))


def test_a_matched_edit_changes_the_object_and_records_its_weight(pipe, scene):
    img, mask = scene
    ref = np.zeros_like(img)
    ref[...] = (20, 20, 230)  # a blue reference object on a blue background
    kw = dict(num_inference_steps=6, seed=1)
    weights = AppearanceWeights(match_statistics=0.5)
    plain = pipe.appearance(img, mask, ref, mask, **kw)
    matched = pipe.appearance(img, mask, ref, mask, weights=weights, **kw)
    assert matched.record["weights"]["match_statistics"] == 0.5
    assert matched.record["schedule"]["statistics_matched"] == 3
    assert plain.record["schedule"]["statistics_matched"] == 0
    a, b = (np.asarray(r.image, dtype=float) for r in (plain, matched))
    assert np.abs(a[mask] - b[mask]).mean() > 2 * np.abs(a[~mask] - b[~mask]).mean()


@pytest.mark.skipif(
    not (models.EMBEDDED_MODEL / "model_index.json").is_file(), reason="no embedded demo model"
)
def test_on_the_trained_model_the_object_takes_the_references_colour():
    """The tiny test model's VAE is untrained, so colour is checked on the embedded model."""
    import dragondiffusion

    pipe = dragondiffusion.load(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    image = np.full((128, 128, 3), 150, np.uint8)
    mask = np.zeros((128, 128), bool)
    mask[40:88, 40:88] = True
    image[mask] = (220, 30, 30)
    reference = image.copy()
    reference[mask] = (30, 30, 220)
    blue_minus_red = {}
    for share in (0.0, 0.3):
        weights = replace(pipe.edit_defaults.weights("appearance"), match_statistics=share)
        done = pipe.appearance(
            image, mask, reference, mask, prompt="a red square", reference_prompt="a blue square",
            weights=weights, num_inference_steps=10, seed=0,
        )  # fmt: skip
        out = np.asarray(done.image, float)
        blue_minus_red[share] = float((out[mask][:, 2] - out[mask][:, 0]).mean())
    assert blue_minus_red[0.3] > blue_minus_red[0.0] + 200, blue_minus_red  # measured −181 → +169


def test_nothing_outside_the_blended_region_moves_even_where_the_match_reaches(pipe, inversion):
    n = inversion.num_steps
    z = inversion.latents[-1]
    region = cells(16, 24, 4, 8, 4, 8)
    coverage = torch.zeros(1, 1, 16, 24)
    coverage[..., 2:10, 2:10] = 0.4  # reaches beyond the region grown by one cell
    coverage[region] = 1.0
    match = StatisticsMatch(region, coverage, cells(16, 24, 8, 12, 12, 20), 0, 0)
    plan = EditPlan(
        "test", z, None, region.float(), BankMode.OFF, range(0), 1.0, 0.0, 0.0,
        sde_mask=region, blend_background=1.0, statistics=match,
    )  # fmt: skip
    cond, uncond = pipe.encode_text(inversion.prompts[0])
    z0 = Sampler(
        pipe.unet, pipe.features, pipe.memory_bank, inversion, plan,
        GuidanceSchedule("test", n, frozenset()), DDIMTimesteps(pipe.scheduler, n), cond, uncond,
        Evaluations(),
    ).run()  # fmt: skip
    outside = torch.ones_like(region)
    outside[..., 3:9, 3:9] = False  # the region grown by one cell
    outside = outside.expand_as(z0)
    assert torch.equal(z0[outside], inversion.latents[0][outside])
    assert not torch.allclose(z0[..., 4:8, 4:8], inversion.latents[0][..., 4:8, 4:8], atol=1e-3)
