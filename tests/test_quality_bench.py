"""`dragondiffusion bench quality`: metrics by hand, cases, baseline, CLI files, determinism.

Nothing here asserts the method's quality on the tiny bundle: it has random weights. The quality
thresholds are in `test_embedded_model_quality_small_version` at the end (the trained embedded
model on 3 scenes per edit, about 2 minutes on 2 cores, in the default run; skipped where the
bundle is missing); the other checks on it there are slow.
"""

import contextlib
import importlib.util
import io
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dragondiffusion import models, scenes
from dragondiffusion.bench import ABLATIONS, EDITS, baseline, cases, metrics, quality, report
from dragondiffusion.bench.sections import write_section
from dragondiffusion.cli import main
from dragondiffusion.edit_defaults import EditDefaults
from dragondiffusion.errors import InputError, SamplingDiverged
from dragondiffusion.features import FeatureExtractor
from dragondiffusion.geometry import dilate
from dragondiffusion.model_report import masked_psnr, psnr

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_model.py"
FLAT = scenes.Background("gradient", "grey", "grey", 0.0, 0.5, 0, False)
GREY, RED = (140, 140, 140), (214, 39, 40)
RUN = {
    "n": 2,
    "steps": 2,
    "modes": ("diffeditor",),
    "ablations": ("no-bank", "no-edit", "no-keep-background"),
}
"""The small run of the CLI test and the determinism test (5 edits × 2 scenes × 6 variants)."""


def flat_scene(centre: tuple[float, float] = (40.0, 50.0)) -> scenes.Scene:
    """A flat red square on a flat grey background, no shadow."""
    square = scenes.SceneObject(scenes.Shape("square", centre, 14.0, 0.0), "red", "flat")
    return scenes.Scene(128, FLAT, (square,))


def square_image(x0: int, y0: int, side: int = 10, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((size, size, 3), GREY, np.uint8)
    mask = np.zeros((size, size), bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    image[mask] = RED
    return image, mask


# ---------------------------------------------------------------------------------------------
# Metrics, by hand.


def test_identical_images_have_infinite_psnr_and_unit_ssim():
    image, mask = square_image(10, 20)
    value, ssim_map = metrics.ssim(image, image)
    assert value == pytest.approx(1.0)
    assert np.allclose(ssim_map, 1.0)
    assert metrics.mean_over(ssim_map, mask) == pytest.approx(1.0)
    assert math.isnan(metrics.mean_over(ssim_map, np.zeros_like(mask)))
    assert psnr(image, image) == math.inf == masked_psnr(image, image, mask)


def test_ssim_of_a_region_is_the_mean_of_the_map_there():
    a, mask = square_image(10, 20)
    b = a.copy()
    b[mask] = (200, 60, 60)
    value, ssim_map = metrics.ssim(a, b)
    assert value < 1.0
    far = np.zeros_like(mask)
    far[50:, 40:] = True  # more than the 7×7 window's reach from the change
    assert metrics.mean_over(ssim_map, far) == pytest.approx(1.0)
    assert metrics.mean_over(ssim_map, mask) < 0.99


def test_histogram_distance_by_hand():
    black, white = np.zeros((4, 3), np.uint8), np.full((4, 3), 255, np.uint8)
    half = np.concatenate([black[:2], white[:2]])
    assert metrics.histogram_distance(black, black) == 0.0
    assert metrics.histogram_distance(black, white) == 1.0
    assert metrics.histogram_distance(black, half) == 0.5
    # 8 bins per channel: 0 and 31 share a bin, 32 does not.
    assert metrics.histogram_distance(black, np.full((4, 3), 31, np.uint8)) == 0.0
    assert metrics.histogram_distance(black, np.full((4, 3), 32, np.uint8)) == 1.0
    assert math.isnan(metrics.histogram_distance(black, black[:0]))


def test_centroid_error_of_a_known_shift():
    _, before = square_image(10, 20)
    _, after = square_image(13, 24)
    assert metrics.centroid_error(after, before) == pytest.approx(5.0)
    assert math.isnan(metrics.centroid_error(np.zeros_like(before), before))


def test_segmentation_finds_the_shifted_object_and_ignores_specks():
    truth, mask = square_image(10, 20)
    output, _ = square_image(13, 24)
    output[60, 60] = RED  # a stray pixel of the object's colour
    colours = metrics.ObjectColours.of(truth, mask)
    found = metrics.segment(output, colours)
    assert found.sum() == 100 and not found[60, 60]
    assert metrics.centroid_error(found, mask) == pytest.approx(5.0)
    # A colour half-way to the background is neither; a near-red one is the object.
    assert not colours.matches(np.array([[[177, 90, 90]]], np.uint8))[0, 0]
    assert colours.matches(np.array([[[200, 50, 50]]], np.uint8))[0, 0]


def test_largest_component_keeps_the_biggest_blob():
    mask = np.zeros((10, 10), bool)
    mask[0:2, 0:2] = True
    mask[5:9, 5:9] = True
    mask[4, 4] = True  # touches the big blob diagonally: 8-connected
    kept = metrics.largest_component(mask)
    assert kept.sum() == 17 and not kept[0, 0]
    assert not metrics.largest_component(np.zeros((3, 3), bool)).any()


def test_ghost_fraction_of_a_synthetic_image():
    truth, new_place = square_image(40, 40)
    vacated = np.zeros_like(new_place)
    vacated[10:20, 10:20] = True
    output = truth.copy()
    output[10:15, 10:20] = RED  # half of the old place still shows the object
    colours = metrics.ObjectColours.of(truth, new_place)
    assert metrics.ghost_fraction(output, vacated, colours) == 0.5
    assert metrics.ghost_fraction(truth, vacated, colours) == 0.0
    assert math.isnan(metrics.ghost_fraction(output, np.zeros_like(vacated), colours))


def test_track_point_finds_a_known_shift():
    rng = np.random.default_rng(0)
    before = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    after = np.roll(before, (-3, 5), axis=(0, 1))  # content moves 5 right, 3 up
    x, y = metrics.track_point(before, after, (20.5, 24.5), (25.5, 21.5), 3, 6)
    assert (x, y) == pytest.approx((25.5, 21.5), abs=0.25)
    errors = metrics.point_errors(
        before, after, np.array([[20.5, 24.5]]), np.array([[25.5, 21.5]]), 3
    )
    assert errors[0] < 0.25
    # Where nothing moved, the search (it reaches back to the source) finds the source.
    x, y = metrics.track_point(before, before, (20.5, 24.5), (25.5, 21.5), 3, 12)
    assert (x, y) == pytest.approx((20.5, 24.5), abs=0.25)


# ---------------------------------------------------------------------------------------------
# Cases.


@pytest.fixture(scope="module")
def drawn():
    return {edit: cases.draw_cases(edit, 3, 7, 128) for edit in EDITS}


def test_cases_are_deterministic_and_held_out(drawn):
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    train = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, train)
    spec.loader.exec_module(train)
    assert cases.HELD_OUT_SEEDS == train.TRAIN_SEED_FLOOR
    for edit, first in drawn.items():
        again = cases.draw_cases(edit, 3, 7, 128)
        assert [c.seeds for c in first] == [c.seeds for c in again]
        for a, b in zip(first, again, strict=True):
            assert np.array_equal(a.expected, b.expected) and np.array_equal(a.image, b.image)
        assert all(s < cases.HELD_OUT_SEEDS for c in first for s in c.seeds)
    other = cases.draw_cases("move", 3, 8, 128)
    assert [c.seeds for c in other] != [c.seeds for c in drawn["move"]]


def test_every_case_keeps_its_object_whole_and_inside(drawn):
    margin = cases.margin_for(128)
    for edit, drawn_cases in drawn.items():
        for case in drawn_cases:
            assert case.edit == edit
            for mask in (case.expected_mask, case.source_mask):
                assert not (mask[:margin].any() or mask[-margin:].any())
                assert not (mask[:, :margin].any() or mask[:, -margin:].any())
            assert case.expected_mask.sum() >= 64
            assert (case.edited >= case.expected_mask).all()
            a = case.example.arguments
            if edit == "move":
                shift = math.dist(a["source"], a["target"])
                assert 0.15 * 128 <= shift <= 0.35 * 128 and a["scale"] == 1.0
                assert case.vacated(1).sum() > 0
            if edit == "resize":
                assert a["source"] == a["target"]
                assert 0.7 <= a["scale"] <= 1.4 and abs(a["scale"] - 1) >= 0.1
            if edit == "drag":
                assert case.points.source.shape == (1, 2)
                assert tuple(case.points.source[0]) == a["points"][0][0]
                assert tuple(case.points.target[0]) == pytest.approx(a["points"][0][1])
            if edit == "paste":
                assert not case.source_mask.any() and len(case.seeds) == 2


def test_the_exact_result_scores_perfectly_and_the_input_does_not(drawn):
    for edit, drawn_cases in drawn.items():
        for case in drawn_cases:
            exact = quality.measure(case, case.expected, 4.0)
            assert exact["found"] == 1.0
            assert exact["object_psnr"] == exact["background_psnr"] == math.inf
            assert exact["image_psnr"] == math.inf and exact["image_ssim"] == pytest.approx(1.0)
            assert exact["histogram"] == 0.0
            assert exact["size"] < 0.25  # edge pixels blend with what lies behind
            assert exact["place_px"] < (2.0 if edit == "drag" else 0.6)
            same = quality.measure(case, case.image, 4.0)
            assert same["background_psnr"] == math.inf  # the input is exact outside the edit
            assert same["background_ssim"] == pytest.approx(1.0, abs=1e-4)
            if edit == "move":
                assert exact["ghost"] == 0.0 and exact["vacated_psnr"] == math.inf
                assert same["ghost"] > 0.8
                shift = math.dist(
                    case.example.arguments["source"], case.example.arguments["target"]
                )
                assert same["place_px"] == pytest.approx(shift, abs=1.0)
            if edit == "resize":  # the input's object has its old size
                scale = case.example.arguments["scale"]
                assert same["size"] == pytest.approx(abs(math.log2(scale**2)), abs=0.3)
            if edit == "drag":
                handle, target = case.example.arguments["points"][0]
                assert same["place_px"] > 0.5 * math.dist(handle, target)


# ---------------------------------------------------------------------------------------------
# Baseline.


def test_baseline_moves_a_flat_object_on_a_flat_background_exactly():
    scene = flat_scene()
    image, (mask,) = scenes.render(scene)
    expected, (moved_mask,) = scenes.moved(scene, 0, 30.0, 10.0)
    out = baseline.cut_and_paste(image, mask, (40.0, 50.0), (70.0, 60.0))
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert masked_psnr(out, expected, dilate(moved_mask, 1)) == math.inf
    vacated = mask & ~moved_mask
    assert masked_psnr(out, expected, vacated) >= 40.0  # Telea on a flat grey: off by ≤ 1
    assert psnr(out, expected) >= 45.0


def test_transformed_layer_puts_content_where_the_points_say():
    image = np.zeros((32, 32, 3), np.uint8)
    image[10, 10] = 255
    mask = np.zeros((32, 32), bool)
    mask[10, 10] = True
    colour, coverage = baseline.transformed_layer(image, mask, (10.5, 10.5), (20.5, 15.5))
    assert coverage[15, 20] == 1.0 and coverage.sum() == 1.0
    assert tuple(colour[15, 20]) == (255.0, 255.0, 255.0)
    # Scaling about the handle keeps the handle's pixel in place and grows the rest.
    block = np.zeros((32, 32), bool)
    block[8:12, 8:12] = True
    _, grown = baseline.transformed_layer(image, block, (10.0, 10.0), (10.0, 10.0), 2.0)
    assert grown[7:13, 7:13].min() == 1.0 and grown.sum() == pytest.approx(64)  # 4 × 16 px
    assert grown[5:15, 5:15].sum() == pytest.approx(64)  # [6, 14) blurred by half a pixel


def test_baseline_runs_every_edit_and_places_moves_and_pastes(drawn):
    for edit, drawn_cases in drawn.items():
        case = drawn_cases[0]
        out = baseline.baseline(case.example.edit, case.example.arguments, 4.0)
        assert out.dtype == np.uint8 and out.shape == case.expected.shape
        found = quality.measure(case, out, 4.0)
        assert found["background_psnr"] == math.inf  # it touches nothing outside the edit
        if edit in ("move", "paste"):
            assert found["found"] == 1.0 and found["place_px"] < 1.0


def test_missing_opencv_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(InputError, match=r"dragondiffusion\[bench\]"):
        baseline.require_cv2()


# ---------------------------------------------------------------------------------------------
# Settings, variants, the no-bank switch.


def test_settings_refuse_bad_choices():
    with pytest.raises(InputError, match="rotate"):
        quality.Settings(edits=("rotate",))
    with pytest.raises(InputError, match="--fewer-steps"):
        quality.Settings(steps=10, fewer_steps=10)
    with pytest.raises(InputError, match="--n"):
        quality.Settings(n=0)
    with pytest.raises(InputError, match="--mode"):
        quality.choices("", ("diffeditor", "dragon"), "--mode")
    assert quality.choices("none", ABLATIONS, "--ablations", empty=True) == ()
    assert quality.choices("move, drag,move", EDITS, "--edits") == ("move", "drag")
    quality.Settings(steps=10, fewer_steps=10, ablations=("no-bank",))  # no fewer-steps: fine
    assert quality.Settings(steps=50).fewer == 20 and quality.Settings(steps=10).fewer == 4
    assert quality.Settings().fewer is None  # 40 % of each edit's own steps
    assert "--steps" not in quality.Settings().command()
    with pytest.raises(InputError, match="--fewer-steps must be at least 2"):
        quality.Settings(fewer_steps=1)
    with pytest.raises(InputError, match="leave fewer-steps out"):
        quality.Settings(steps=2)  # 2 steps leave no fewer steps to run


def test_variants_are_identity_exact_baseline_modes_then_ablations():
    settings = quality.Settings(steps=30, fewer_steps=12)
    names = [v.name for v in settings.variants()]
    assert names == ["identity", "exact", "vae", "baseline", "diffeditor", "dragon", *ABLATIONS]
    by_name = {v.name: v for v in settings.variants()}
    assert not by_name["no-bank"].memory_bank and by_name["no-bank"].mode == "diffeditor"
    assert dict(by_name["no-content"].weights) == {"w_content": 0}
    assert dict(by_name["no-edit"].weights) == {"w_edit": 0}
    assert dict(by_name["no-blend"].weights) == {"blend_background": 0}
    assert dict(by_name["no-match"].weights) == {"match_statistics": 0}
    assert by_name["fewer-steps"].steps == 12 and by_name["dragon"].steps == 30
    unkept = by_name["no-keep-background"]
    assert not unkept.keep_background and unkept.steps == 30
    assert all(by_name[n].keep_background for n in ("diffeditor", "dragon", "no-bank"))
    assert by_name["two-blocks"].upstream_features and not by_name["diffeditor"].upstream_features
    assert "--fewer-steps 12" in settings.command()
    assert "baseline" not in [v.name for v in quality.Settings(baseline=False).variants()]


def test_without_steps_each_edit_runs_the_models_own_and_fewer_steps_a_share_of_them(pipe):
    defaults = pipe.edit_defaults
    try:
        pipe.edit_defaults = EditDefaults(steps={"drag": 20, "move": 30})
        by_name = {v.name: v for v in quality.Settings().variants()}
        method, fewer = by_name["diffeditor"], by_name["fewer-steps"]
        assert fewer.label == "diffeditor, 40 % of the steps"
        steps = {e: quality.steps_of(pipe, e, method) for e in ("drag", "move", "resize", "paste")}
        assert steps == {"drag": 20, "move": 30, "resize": 30, "paste": 50}
        assert [quality.steps_of(pipe, e, fewer) for e in ("drag", "paste")] == [8, 20]
        given = {v.name: v for v in quality.Settings(steps=10, fewer_steps=3).variants()}
        assert [quality.steps_of(pipe, "drag", given[n]) for n in ("dragon", "fewer-steps")] == [
            10,
            3,
        ]
        pipe.edit_defaults = EditDefaults(steps={"drag": 2})
        with pytest.raises(InputError, match="drag's default steps"):
            quality.Settings(edits=("drag",)).check_model(pipe)
        quality.Settings(edits=("move",)).check_model(pipe)  # move keeps 50
    finally:
        pipe.edit_defaults = defaults


def test_memory_bank_option_switches_the_bank_off(pipe, inversion, scene):
    mask = scene[1]
    bank = pipe.memory_bank
    used = {}
    for on in (True, False):
        bank.used, bank.log_use = [], True
        try:
            result = pipe.move(inversion, mask, (35, 45), (90, 45), memory_bank=on)
        finally:
            bank.log_use = False
        used[on] = list(bank.used)
        assert result.record["bank"]["steps"][1] == (10 if on else 0)
    assert used[True] and not used[False]


def test_two_blocks_ablation_edits_with_both_decoder_blocks_then_restores_the_models(
    pipe, drawn, monkeypatch
):
    seen = []

    def fake_run(pipe, example, steps, store, seed, **options):
        seen.append(pipe.features_for(example.edit).blocks)
        raise RuntimeError("stop after the call")

    monkeypatch.setattr(quality, "run_example", fake_run)
    chosen = pipe.feature_overrides
    pipe.feature_overrides = {"move": FeatureExtractor(pipe.unet, (2,))}
    try:
        variants = {v.name: v for v in quality.Settings(steps=4).variants()}
        for name in ("diffeditor", "two-blocks"):
            with pytest.raises(RuntimeError, match="stop after"):
                quality.produce(pipe, drawn["move"][0], variants[name], {}, 0, 4.0)
            assert pipe.features_for("move").blocks == (2,)
    finally:
        pipe.feature_overrides = chosen
    assert seen == [(2,), (1, 2)]


def test_no_match_ablation_zeroes_the_match_where_the_edit_has_one(pipe, drawn, monkeypatch):
    seen = {}

    def fake_run(pipe, example, steps, store, seed, **options):
        seen[example.edit] = options["weights"]
        raise RuntimeError("stop after the call")

    monkeypatch.setattr(quality, "run_example", fake_run)
    variant = {v.name: v for v in quality.Settings(steps=4).variants()}["no-match"]
    kept = pipe.edit_defaults
    model = EditDefaults({"paste": {"match_statistics": 0.5}, "move": {"energy_scale": 7.0}})
    pipe.edit_defaults = model
    try:
        for edit in ("move", "paste"):
            with pytest.raises(RuntimeError, match="stop after"):
                quality.produce(pipe, drawn[edit][0], variant, {}, 0, 4.0)
    finally:
        pipe.edit_defaults = kept
    assert seen["paste"].match_statistics == 0, "the model's 0.5 taken away"
    assert seen["paste"].energy_scale == model.weights("paste").energy_scale
    assert seen["move"] == model.weights("move"), "move has no match: the model's own weights"


def test_resolution_runs_the_edits_and_the_vae_ceiling_at_that_working_size(
    pipe, drawn, monkeypatch
):
    case = drawn["move"][0]  # 128 px: the tiny model's native resolution is not that
    side = case.expected.shape[0]
    native = pipe.working_size((side, side))
    larger = 2 * native[0]
    variant = {v.name: v for v in quality.Settings(steps=4).variants()}["diffeditor"]
    inversions: dict = {}
    output, _ = quality.produce(pipe, case, variant, inversions, 0, 4.0, resolution=larger)
    assert output.shape == case.expected.shape, "the output at the scene's size, to compare"
    (store,) = inversions.values()
    assert {inv.working_size for inv in store.values()} == {(larger, larger)}
    seen = []
    real = quality.vae_round_trip
    monkeypatch.setattr(
        quality, "vae_round_trip", lambda pipe, image: seen.append(image.size) or real(pipe, image)
    )
    for resolution in (larger, None):
        ceiling, _ = quality.produce(pipe, case, quality.CEILING, {}, 0, 4.0, resolution=resolution)
        assert ceiling.shape == case.expected.shape
    assert seen == [(larger, larger), native]


def test_resolution_is_checked_before_the_run_and_has_its_own_docs_section(pipe, monkeypatch):
    with pytest.raises(InputError, match="--resolution must be a positive number"):
        quality.Settings(resolution=0)
    with pytest.raises(InputError, match=r"^--resolution 100000 px is above"):
        quality.Settings(resolution=100_000).check_model(pipe)
    quality.Settings(resolution=2 * pipe.native_resolution).check_model(pipe)
    # A --resolution the model works at natively (or rounds to it) writes the native section.
    native = pipe.native_resolution
    assert quality.Settings().working_resolution(pipe) is None
    assert quality.Settings(resolution=native).working_resolution(pipe) is None
    assert quality.Settings(resolution=native + 1).working_resolution(pipe) is None
    assert quality.Settings(resolution=2 * native).working_resolution(pipe) == 2 * native
    assert "--resolution" not in quality.Settings().command()
    assert "--seed 0 --resolution 256 " in quality.Settings(resolution=256).command()
    assert quality.docs_section(None) == (
        "quality:embedded demo model",
        "Quality: embedded demo model",
    )
    assert quality.docs_section(None, 256) == (
        "quality:embedded demo model@256px",
        "Quality: embedded demo model, working at 256 px",
    )
    given = []
    monkeypatch.setattr(quality, "quality", lambda settings, *a, **k: given.append(settings))
    main(["bench", "quality", "--resolution", "192", "--no-docs"])
    assert given[0].resolution == 192


def test_the_kept_background_and_its_absence_share_one_sampling(pipe, drawn):
    """The method keeps the background; its no-keep-background ablation is the same edit's
    whole image, taken from the method's result (or the other way round) without sampling."""
    variants = {v.name: v for v in quality.Settings(steps=4).variants()}
    unkept, kept = variants["no-keep-background"], variants["diffeditor"]
    case = drawn["move"][0]
    alone = {v.name: quality.produce(pipe, case, v, {}, 0, 4.0)[0] for v in (unkept, kept)}
    assert not np.array_equal(alone["diffeditor"], alone["no-keep-background"])
    for first, second in ((kept, unkept), (unkept, kept)):
        made: dict = {}
        before, _ = quality.produce(pipe, case, first, {}, 0, 4.0, made)
        assert len(made) == 1
        reused, inverting = quality.produce(pipe, case, second, {}, 0, 4.0, made)
        assert inverting == 0.0 and len(made) == 1
        # each output as sampling it alone makes it, to the pixel
        assert np.array_equal(before, alone[first.name])
        assert np.array_equal(reused, alone[second.name])


def test_no_keep_background_puts_every_method_row_on_the_whole_image():
    settings = quality.Settings(
        edits=("move",), ablations=("no-bank", "no-keep-background"), keep_background=False,
        sweep=(("w_edit", (2.0,)),),
    )  # fmt: skip
    method = [v for v in settings.variants() if v.mode is not None]
    assert [v.name for v in method] == [
        *quality.MODES, "no-bank", "no-keep-background", "set w_edit=2",
    ]  # fmt: skip
    assert not any(v.keep_background for v in method)
    assert " --no-keep-background" in settings.command()
    kept = replace(settings, keep_background=True)
    assert [v.keep_background for v in kept.variants() if v.mode is not None] == [
        True, True, True, False, True,
    ]  # fmt: skip
    assert "--no-keep-background" not in kept.command()
    assert quality.docs_section(None, None, kept=False) == (
        "quality:embedded demo model:whole",
        "Quality: embedded demo model, whole re-synthesised images",
    )
    assert (
        quality.docs_section(None, 256, kept=False)[0] == "quality:embedded demo model@256px:whole"
    )


def test_a_diverging_variant_scores_black_and_the_run_goes_on(pipe, drawn, monkeypatch):
    """A --set value too strong for the model stops its edit (SamplingDiverged); the benchmark
    scores that output as nothing rather than stopping every other row."""

    def diverge(*args, **kwargs):
        raise SamplingDiverged("the move diverged at step 3 of 4")

    monkeypatch.setattr(quality, "run_example", diverge)
    variants = {v.name: v for v in quality.Settings(steps=4).variants()}
    case = drawn["move"][0]
    output, inverting = quality.produce(pipe, case, variants["diffeditor"], {}, 0, 4.0)
    assert output.shape == case.expected.shape and not output.any() and inverting == 0.0


def test_an_ablation_of_a_part_the_edit_lacks_reuses_the_methods_output(pipe, monkeypatch):
    made = []

    def fake_produce(pipe, case, variant, inversions, seed, cell_px, results=None, resolution=None):
        made.append((case.example.edit, variant.name))
        return np.clip(case.image.astype(int) + len(made), 0, 255).astype(np.uint8), 0.0  # own

    monkeypatch.setattr(quality, "produce", fake_produce)
    kept, chosen = pipe.edit_defaults, pipe.feature_overrides
    pipe.edit_defaults = EditDefaults({"paste": {"match_statistics": 0.5}})
    pipe.feature_overrides = {"move": FeatureExtractor(pipe.unet, (2,))}
    settings = quality.Settings(
        n=1, edits=("move", "paste"), modes=("diffeditor",), steps=4,
        ablations=("no-match", "two-blocks"), baseline=False,
    )  # fmt: skip
    try:
        run = quality.run(pipe, settings, log=lambda line: None)
    finally:
        pipe.edit_defaults, pipe.feature_overrides = kept, chosen
    method = [(e, v) for e, v in made if v not in ("identity", "exact", "vae")]
    # move has no match (its no-match is the method); paste's blocks are the model's own
    moves, pastes = [("move", "diffeditor"), ("move", "two-blocks")], [("paste", "diffeditor")]
    assert method == [*moves, *pastes, ("paste", "no-match")]
    rows = {(r["edit"], r["variant"]): r for r in run.results}
    assert rows["move", "no-match"]["seconds"] == rows["move", "diffeditor"]["seconds"]
    same = ("paste", "two-blocks"), ("paste", "diffeditor")
    assert rows[same[0]]["background_psnr"] == rows[same[1]]["background_psnr"]
    assert rows["paste", "no-match"]["background_psnr"] != rows[same[1]]["background_psnr"]


def test_the_sheet_has_a_baseline_column_only_when_the_run_has_a_baseline(drawn):
    case, widths = drawn["move"][0], {}
    for naive in (True, False):
        settings = quality.Settings(n=1, edits=("move",), modes=("diffeditor",), baseline=naive)
        run = quality.QualityRun(settings, "model", "cpu", 4.0)
        outputs = {"diffeditor": case.image} | ({"baseline": case.image} if naive else {})
        run.examples.append((case, outputs))
        widths[naive] = report.sheet(run).width
    assert widths[True] - widths[False] >= report.CELL, widths


# ---------------------------------------------------------------------------------------------
# The command and its files.


@pytest.fixture(scope="module")
def cli_run(tiny_bundle, tmp_path_factory):
    """One CLI run: (exit code, stdout, output folder, docs file)."""
    tmp = tmp_path_factory.mktemp("quality")
    docs = tmp / "benchmarks.md"
    write_section(docs, "edit-costs:tiny", "Edit costs: tiny", "the cost table")
    out = tmp / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(
            ["bench", "quality", "--model", str(tiny_bundle), "--device", "cpu",
             "--n", str(RUN["n"]), "--steps", str(RUN["steps"]), "--mode", "diffeditor",
             "--ablations", ",".join(RUN["ablations"]), "--out", str(out), "--docs", str(docs)]
        )  # fmt: skip
    return code, stdout.getvalue(), out, docs


def test_cli_prints_the_table_and_writes_sheet_json_and_docs_section(cli_run):
    code, stdout, out, docs = cli_run
    assert code == 0
    labels = ["identity (input)", "exact (expected image)", "exact through the VAE (ceiling)",
              "baseline (cut-paste + Telea)",
              "diffeditor", "diffeditor − memory bank", "diffeditor − edit energy",
              "diffeditor − kept background"]  # fmt: skip
    for label in labels:
        for edit in EDITS:
            assert f"| {label} | {edit} | 2 |" in stdout
    assert "[move 1/2] scene" in stdout and "[paste 2/2] scene" in stdout
    for name in ("contact_sheet.png", "quality.md", "quality.json"):
        assert (out / name).is_file()
    summary = json.loads((out / "quality.json").read_text())
    assert summary["status"] == "complete"
    assert len(summary["results"]) == RUN["n"] * len(EDITS) * len(labels)
    rows = summary["results"]
    inverted = [(r["edit"], r["case"], r["variant"]) for r in rows if r["inversion_seconds"] > 0]
    # each case's image(s) inverted once, by its first method row, and timed apart from the edit
    assert inverted == [(e, k, "diffeditor") for e in EDITS for k in range(1, RUN["n"] + 1)]
    assert "s inverting, shared)" in stdout
    assert summary["command"].startswith("dragondiffusion bench quality --model ")
    assert summary["command"].endswith(" --device cpu")  # what --resume must be given again
    text = docs.read_text()
    assert text.count("<!-- quality:") == 2 and "the cost table" in text
    assert "## Quality: tiny" in text and "| identity (input) | move | 2 |" in text
    from PIL import Image

    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 4 * 256 and sheet.height > 5 * 256


def test_identity_row_has_an_exact_background(cli_run):
    summary = json.loads((cli_run[2] / "quality.json").read_text())
    for r in summary["results"]:
        if r["variant"] in ("identity", "exact", "baseline"):
            assert r["background_psnr"] == math.inf
            assert r["background_ssim"] == pytest.approx(1, abs=1e-4)
        if r["variant"] == "identity" and r["edit"] == "move":
            assert r["ghost"] > 0.8
        if r["variant"] == "vae":  # the tiny model's untrained VAE: far from the expected image
            assert math.isfinite(r["image_psnr"]) and r["image_psnr"] < 30


def test_the_kept_background_restores_the_background_the_model_blurs(cli_run):
    """The tiny model's random VAE ruins every pixel (its whole image's background 12.0-17.6 dB
    on these 10 cases); the method keeps the input beyond a feature cell of what the edit was
    asked to change, and the benchmark's background begins a feature cell away, so it is the
    input's own (∞ in all 10 cases; with the earlier latent-cell region +8.3 to +14.6 dB). A
    scene whose rendered mask differs by a pixel from the edit's warped one may miss ∞ (63-95
    dB in 22 of 250 scenes of the embedded model's full run), so 8 of 10 are asked for."""
    summary = json.loads((cli_run[2] / "quality.json").read_text())
    by = {(r["edit"], r["case"], r["variant"]): r for r in summary["results"]}
    kept = 0
    for (edit, case, variant), row in by.items():
        if variant == "diffeditor":
            whole = by[(edit, case, "no-keep-background")]["background_psnr"]
            assert row["background_psnr"] > whole + 30, (edit, case)
            kept += row["background_psnr"] == math.inf
    assert kept >= 8


def without_timings(rows: list[dict]) -> list[dict]:
    """The rows without their times (the only part of a result that differs between runs)."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "inversion_seconds")} for r in rows]


def assert_same_rows(first: list[dict], second: list[dict]) -> None:
    """The same rows in the same order, every metric equal (NaN where NaN), times aside."""
    first, second = without_timings(first), without_timings(second)
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            same = a[key] == b[key] or (
                isinstance(a[key], float) and math.isnan(a[key]) and math.isnan(b[key])
            )
            assert same, (a["edit"], a["case"], a["variant"], key, a[key], b[key])


def test_results_are_deterministic(cli_run, pipe, tiny_bundle):
    summary = json.loads((cli_run[2] / "quality.json").read_text())
    again = quality.run(pipe, quality.Settings(model=str(tiny_bundle), **RUN), log=lambda _: None)
    assert_same_rows(summary["results"], again.results)


def test_workers_resume_a_run_side_by_side_with_the_same_results(cli_run, tiny_bundle, tmp_path):
    """--workers 2 continues a run whose second cases are missing: each worker loads the model
    and runs whole cases; the rows come back in the settings' order, equal to one process's."""
    import shutil

    whole = json.loads((cli_run[2] / "quality.json").read_text())
    out = tmp_path / "out"
    shutil.copytree(cli_run[2], out)
    partial = dict(whole, status="incomplete")
    partial["results"] = [r for r in whole["results"] if r["case"] == 1]
    (out / "quality.json").write_text(json.dumps(partial))
    settings = quality.Settings(model=str(tiny_bundle), device="cpu", **RUN)
    lines = []
    threads = torch.get_num_threads()  # that of the one-process run: the same float sums
    done = quality.quality(
        settings, out, docs=None, log=lines.append, resume=True, workers=2, threads=threads
    )
    assert f"running 5 case(s) in 2 worker processes, {threads} thread(s) each" in lines
    assert sum("measured by the earlier run" in line for line in lines) == len(EDITS)
    assert sum(line.startswith("[") and "2/2] scene" in line for line in lines) == len(EDITS)
    assert_same_rows(whole["results"], done.results)
    saved = json.loads((out / "quality.json").read_text())
    assert saved["status"] == "complete" and (saved["workers"], saved["threads"]) == (2, threads)
    assert_same_rows(whole["results"], saved["results"])
    assert [case.edit for case, _ in done.examples] == list(EDITS)


def test_a_run_saved_before_resolution_existed_resumes_at_the_native_one(
    cli_run, tiny_bundle, tmp_path
):
    saved = json.loads((cli_run[2] / "quality.json").read_text())
    saved["status"] = "incomplete"
    del saved["settings"]["resolution"]  # as a run of the version before wrote it
    (tmp_path / "quality.json").write_text(json.dumps(saved))
    settings = quality.Settings(model=str(tiny_bundle), device="cpu", **RUN)
    assert quality.read_earlier(tmp_path, settings, resume=True) is not None
    with pytest.raises(InputError, match="other settings"):
        quality.read_earlier(tmp_path, replace(settings, resolution=96), resume=True)


def test_a_worker_that_loads_other_weights_stops_the_run_with_the_reason(pipe, tiny_bundle):
    """The workers check the model they load against the parent's fingerprint (here a wrong
    one): the first case's error crosses the pool, names the problem and ends the workers."""
    settings = quality.Settings(model=str(tiny_bundle), device="cpu", **RUN)
    with pytest.raises(
        InputError,
        match=r"worker loaded .*, but its weights, edit defaults or package version differ",
    ):
        quality.run(pipe, settings, log=lambda _: None, stamp="0123456789abcdef", workers=2)
    with pytest.raises(InputError, match="--threads must be at least 1, got 0"):
        quality.run(pipe, settings, workers=2, threads=0)


def test_a_run_cut_short_keeps_every_finished_case_in_quality_json(
    tmp_path, tiny_bundle, monkeypatch
):
    produced = []
    real = quality.produce

    def produce_then_stop(pipe, case, variant, *args):
        if len(produced) == 4:  # the second case's first variant: cut off like a time limit
            raise KeyboardInterrupt
        produced.append(variant.name)
        return real(pipe, case, variant, *args)

    monkeypatch.setattr(quality, "produce", produce_then_stop)
    settings = quality.Settings(
        model=str(tiny_bundle), n=2, edits=("move",), modes=("diffeditor",), steps=2,
        ablations=(), baseline=False, device="cpu",
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        quality.quality(settings, tmp_path / "out", docs=None, log=lambda _: None)
    saved = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert saved["status"] == "incomplete"
    assert [(r["case"], r["variant"]) for r in saved["results"]] == [(1, v) for v in produced]
    assert len(saved["table"]) == len(produced)  # one row per variant, from case 1 alone

    # Started afresh, the unfinished run would be lost: refused. --resume runs case 2 alone.
    with pytest.raises(InputError, match=r"unfinished benchmark .* pass --resume"):
        quality.quality(settings, tmp_path / "out", docs=None, log=lambda _: None)
    produced.clear()
    monkeypatch.setattr(quality, "produce", lambda *a: (produced.append(a[2].name), real(*a))[1])
    lines = []
    done = quality.quality(settings, tmp_path / "out", docs=None, log=lines.append, resume=True)
    assert produced == ["identity", "exact", "vae", "diffeditor"]  # case 2 only
    assert any("[move 1/2]" in line and "earlier run" in line for line in lines)
    resumed = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert resumed["status"] == "complete" and resumed["seconds"] > saved["seconds"]
    assert (tmp_path / "out" / "contact_sheet.png").is_file()
    assert (tmp_path / "out" / "examples" / "move-diffeditor.png").is_file()
    # A finished run resumed runs nothing and keeps its time.
    produced.clear()
    quality.quality(settings, tmp_path / "out", docs=None, log=lambda _: None, resume=True)
    again = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert produced == [] and again["seconds"] == pytest.approx(resumed["seconds"], abs=0.01)
    # The same numbers as one uninterrupted run.
    monkeypatch.setattr(quality, "produce", real)
    whole = quality.quality(settings, tmp_path / "whole", docs=None, log=lambda _: None)
    assert json.dumps(without_timings(done.results)) == json.dumps(without_timings(whole.results))
    # Other settings or other weights are not continued.
    other = replace(settings, steps=3)
    with pytest.raises(InputError, match="other settings"):
        quality.quality(other, tmp_path / "out", docs=None, log=lambda _: None, resume=True)
    monkeypatch.setattr(quality, "fingerprint", lambda pipe: "0123456789abcdef")
    with pytest.raises(InputError, match="differs from the run"):
        quality.quality(settings, tmp_path / "out", docs=None, log=lambda _: None, resume=True)


def test_one_benchmark_at_a_time_writes_to_a_folder(tmp_path):
    import subprocess

    out = tmp_path / "out"
    with quality.folder_lock(out):
        assert (out / quality.LOCK).read_text() == str(os.getpid())
        taken = pytest.raises(InputError, match=r"another benchmark .* is writing to")
        with taken, quality.folder_lock(out):
            pass
        # The folder holding only the lock is still the benchmark's own.
        assert quality.prepare_output(out, quality.SUMMARY, "b", own=(quality.LOCK,)) == out
    assert not (out / quality.LOCK).exists()
    # A lock left by a process that has ended is taken over.
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (out / quality.LOCK).write_text(ended)
    with quality.folder_lock(out):
        assert (out / quality.LOCK).read_text() == str(os.getpid())


def test_the_fingerprint_follows_the_weights(pipe, monkeypatch):
    first = quality.fingerprint(pipe)
    assert quality.fingerprint(pipe) == first and len(first) == 16
    weight = next(pipe.unet.parameters())
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.view(-1)[0] += 1.0
        try:
            assert quality.fingerprint(pipe) != first
        finally:
            weight.copy_(kept)
    assert quality.fingerprint(pipe) == first
    # So do the model's edit defaults (its dragondiffusion.json).
    kept_defaults = pipe.edit_defaults
    pipe.edit_defaults = replace(kept_defaults, overrides={"move": {"energy_scale": 1.0}})
    try:
        assert quality.fingerprint(pipe) != first
    finally:
        pipe.edit_defaults = kept_defaults
    # And the package's source: a development install changes code under one version string.
    monkeypatch.setattr(quality, "source_digest", lambda: "edited")
    assert quality.fingerprint(pipe) != first


def test_the_source_digest_reads_every_module(tmp_path, monkeypatch):
    package = tmp_path / "package"
    (package / "bench").mkdir(parents=True)
    (package / "bench" / "quality.py").write_text("")
    (package / "edits.py").write_text("A = 1\n")
    monkeypatch.setattr(quality, "__file__", str(package / "bench" / "quality.py"))
    quality.source_digest.cache_clear()
    try:
        first = quality.source_digest()
        (package / "edits.py").write_text("A = 2\n")
        quality.source_digest.cache_clear()
        assert quality.source_digest() != first
    finally:
        quality.source_digest.cache_clear()


def test_cli_refuses_a_foreign_folder_and_bad_lists(tmp_path, tiny_bundle, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    base = ["bench", "quality", "--model", str(tiny_bundle), "--no-docs"]
    assert main([*base, "--out", str(tmp_path)]) == 2
    assert "did not write" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "new"), "--edits", "move,rotate"]) == 2
    assert "rotate" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    row = {"edit": "move", "case": 1, "seeds": [1], "variant": "identity"}
    saved = {"dragondiffusion": "0", "status": "incomplete", "results": [row], "command": "theirs"}
    (unfinished / "quality.json").write_text(json.dumps(saved))
    assert main([*base, "--out", str(unfinished)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([*base, "--out", str(unfinished), "--resume"]) == 2
    assert "other settings (theirs)" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "new"), "--workers", "0"]) == 2
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------
# The small version on the trained embedded model (slow).

EMBEDDED = {"n": 3, "modes": ("diffeditor",), "ablations": ("no-keep-background",)}
"""A few scenes per edit at the model's own steps (50 for move and resize, 20 for appearance,
drag and paste); 15 edits of the method, about 2 minutes on 2 cores (the whole images without
the kept background come from the same edits)."""
MOVE_PLACEMENT_CELLS = 0.6
"""Measured 0.17 cells (2026-11-27, UNet step 14847, the model's defaults: background blending,
fresh vacated noise, move's energies on the finer feature block, latent masks at LATENT_COVER;
0.36 with the half cover; 0.51 on 50 scenes; 0.66 with the UNet of step 11273; issue 6's
target: 1 cell)."""
MOVE_FOUND = 2 / 3
"""Measured 3 of 3 (1 of 3 with both feature blocks, step 11273; 46 of 50 on the 50-scene run,
45 with the half cover)."""
APPEARANCE_FOUND = 2 / 3
"""Measured 3 of 3 at the model's 20 steps as at 50 (2 of 3 at step 11273; 0 of 3 without
`match_statistics`; 45 of 50 on the 50-scene run, 44 at 20 steps)."""
APPEARANCE_OBJECT_PSNR_DB = 13.5
"""Measured 13.8 dB on the object's expected pixels at the model's 20 steps (14.1 at 50 steps;
13.6 at step 11273; 7.2 without `match_statistics`, 7.4 for the input itself)."""
PASTE_OBJECT_PSNR_DB = 13.0
"""Measured 14.6 dB on the pasted object's expected pixels at the model's 20 steps (15.0 at 50
steps; 14.3 with the half cover, at step 14847 as at 11273; 11.3 without `match_statistics`;
found in 2 of 3)."""
RESIZE_SIZE_ERROR = 0.45
"""Measured 0.24 (|log₂| of the segmented over the expected area, 0 is exact) on these 3 scenes
with the resize reading its features at t = 741 (2026-11-28); 0.33 at each step's own level,
with the masks scaled in pixels (0.34 before shifts took LATENT_COVER too); 0.77 before that,
worse than the unedited input's 0.59."""
BACKGROUND_PSNR_DB = {"move": 32.5, "resize": 31.5, "appearance": 34.0, "drag": 35.5, "paste": 32.5}
"""Floors of the re-synthesised background (without the kept background: what the sampler's
background blending keeps), a little below the measured 33.7, 32.1, 35.7, 36.8, 33.9 dB
(appearance, drag and paste at the model's 20 steps; resize 32.5 at each step's own level, before
it read at t = 741; appearance 34.8 at 50, 36.9 without `match_statistics` at step 11273; the
baseline's is exact by construction: it leaves every pixel outside the places it cuts and pastes
untouched)."""
no_embedded = pytest.mark.skipif(
    not (models.EMBEDDED_MODEL / "model_index.json").is_file(),
    reason="no embedded demo model in src/dragondiffusion/demo_model",
)
METHOD, NAIVE = "diffeditor", "baseline (cut-paste + Telea)"
WHOLE = "diffeditor − kept background"


@pytest.fixture(scope="module")
def embedded_run(embedded):
    return quality.run(embedded, quality.Settings(**EMBEDDED), log=lambda _: None)


@pytest.fixture(scope="module")
def embedded_rows(embedded_run):
    return {(r["variant"], r["edit"]): r for r in report.summarise(embedded_run)}


@no_embedded
def test_embedded_model_quality_small_version(embedded_rows, embedded_run):
    """Issue 6's small version, in the default run: 3 scenes per edit at the model's steps."""
    rows = embedded_rows
    assert rows[(METHOD, "move")]["place_cells"] <= MOVE_PLACEMENT_CELLS
    assert rows[(METHOD, "move")]["found"] >= MOVE_FOUND
    assert rows[(METHOD, "move")]["ghost"] <= 0.05
    assert rows[(METHOD, "appearance")]["found"] >= APPEARANCE_FOUND
    assert rows[(METHOD, "appearance")]["object_psnr"] >= APPEARANCE_OBJECT_PSNR_DB
    assert rows[(METHOD, "paste")]["object_psnr"] >= PASTE_OBJECT_PSNR_DB
    assert rows[(METHOD, "resize")]["size"] <= RESIZE_SIZE_ERROR
    for edit, floor in BACKGROUND_PSNR_DB.items():
        assert rows[(WHOLE, edit)]["background_psnr"] >= floor, edit
    # Kept: the input's own pixels, scene by scene (∞ in 41-50 of 50 scenes per edit on the full
    # run, the rest 63-95 dB; here ∞ in 14 of 15).
    kept = [r["background_psnr"] for r in embedded_run.results if r["variant"] == METHOD]
    assert len(kept) == 15 and min(kept) >= 60 and kept.count(math.inf) >= 12, kept


def vacated_psnr(rows: dict, edit: str) -> tuple[float, float]:
    """The vacated area's PSNR: (the method's, the baseline's)."""
    return rows[(METHOD, edit)]["vacated_psnr"], rows[(NAIVE, edit)]["vacated_psnr"]


MOVE_VACATED_SCENES = 8
"""Scenes of the move-only run that compares the vacated area with the baseline's. Measured
(2026-11-27, LATENT_COVER for shifts too): 39.1 against 33.1 dB on these 8, better in 6; 38.4
against 32.2 on 10; 35.2 against 32.0 on 50 (better in 32). The first 3 alone (the other slow
checks' scenes) give 35.1 against 35.5: one scene (a dotted triangle moved 42 px, 18 against 25
dB) outweighs the other two, and the fifth cover cost another 3.9 dB on a scene the method still
wins (43.3 → 39.5 dB against 41.8); 35.9 against 35.5 with the half cover before."""


@pytest.fixture(scope="module")
def move_rows(embedded):
    settings = quality.Settings(edits=("move",), **{**EMBEDDED, "n": MOVE_VACATED_SCENES})
    done = quality.run(embedded, settings, log=lambda _: None)
    return {(r["variant"], r["edit"]): r for r in report.summarise(done)}


@pytest.mark.slow
@no_embedded
def test_embedded_model_beats_the_baseline_on_the_area_a_move_vacates(move_rows):
    method, naive = vacated_psnr(move_rows, "move")
    assert method > naive, (method, naive)


@pytest.mark.slow
@no_embedded
def test_embedded_model_beats_the_baseline_on_the_ring_a_resize_vacates_in_these_scenes(
    embedded_rows,
):
    """Measured 48.8 against 41.9 dB on these 3 scenes (2 with a ring; 2026-11-29, the thin
    vacated strips filled with the object's surroundings carried along, in the background's
    hue; 40.6 without the hue bound, which carried a neighbouring object into one ring; 45.9
    with the inward fill alone, 16.2 with the model's pixels). On 50 scenes: 37.7 against 34.7,
    better in 22 of 30 shrinks."""
    method, naive = vacated_psnr(embedded_rows, "resize")
    assert method > naive, (method, naive)


def test_set_adds_one_method_row_per_combination_of_weights():
    settings = quality.Settings(
        edits=("move", "resize"), modes=("dragon", "diffeditor"), ablations=(), baseline=False,
        sweep=(("energy_scale", (4000.0, 8000.0)), ("w_edit", (2.0,))),
    )  # fmt: skip
    added = settings.variants()[5:]  # identity, exact, vae, dragon, diffeditor
    assert [(v.mode, v.weights) for v in added] == [
        ("dragon", (("energy_scale", 4000.0), ("w_edit", 2.0))),
        ("dragon", (("energy_scale", 8000.0), ("w_edit", 2.0))),
    ]
    assert added[0].label == "dragon energy_scale=4000, w_edit=2"
    assert settings.command().endswith("--set energy_scale=4000,8000 --set w_edit=2")
    precise = replace(settings, sweep=(("w_edit", (0.123456789,)),))
    assert precise.command().endswith("--set w_edit=0.123456789")


def test_set_refuses_unknown_weights_and_bad_values(capsys, tiny_bundle):
    with pytest.raises(InputError, match=r"w_inpaint.*appearance has no such weight.*w_content"):
        quality.Settings(edits=("move", "appearance"), sweep=(("w_inpaint", (1.0,)),))
    with pytest.raises(InputError, match="--set k: every value must be finite and ≥ 0"):
        quality.Settings(edits=("move",), sweep=(("k", (math.nan,)),))
    with pytest.raises(InputError, match=r"blend_background: every value must lie in \[0, 1\]"):
        quality.Settings(edits=("move",), sweep=(("blend_background", (0.0, 2.0)),))
    for bad in ("energy_scale", "energy_scale=", "=1", "energy_scale=a,b"):
        code = main(["bench", "quality", "--model", str(tiny_bundle), "--set", bad])
        assert code == 2
        assert "write NAME=V1,V2" in capsys.readouterr().err


def test_set_rows_run_with_their_weights(tiny_bundle):
    import dragondiffusion

    pipe = dragondiffusion.load(tiny_bundle, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    settings = quality.Settings(
        model=str(tiny_bundle), n=1, edits=("move",), modes=("dragon",), steps=2, ablations=(),
        baseline=False, sweep=(("energy_scale", (0.0, 5000.0)),),
    )  # fmt: skip
    done = quality.run(pipe, settings, log=lambda _: None)
    psnr_of = {r["variant"]: r["image_psnr"] for r in done.results}
    # Energy scale 0 switches guidance off: the output differs from the guided one.
    assert psnr_of["set energy_scale=0"] != psnr_of["set energy_scale=5000"]


def test_no_set_adds_no_rows():
    plain = quality.Settings(ablations=())
    assert [v.name for v in plain.variants()] == [
        "identity",
        "exact",
        "vae",
        "baseline",
        *quality.MODES,
    ]


def test_a_section_without_its_end_marker_is_refused_before_the_run(tmp_path):
    from dragondiffusion.bench.sections import check_sections

    docs = tmp_path / "benchmarks.md"
    write_section(docs, "edit-costs:tiny", "Edit costs: tiny", "the cost table")
    write_section(docs, "quality:tiny", "Quality: tiny", "the old table")
    text = docs.read_text()
    docs.write_text(text.replace("<!-- quality:tiny:end -->", ""))
    broken = docs.read_text()
    message = (
        "has the start marker of section quality:tiny but no end marker; restore "
        "`<!-- quality:tiny:end -->` or remove the start"
    )
    with pytest.raises(InputError, match=message):
        write_section(docs, "quality:tiny", "Quality: tiny", "the new table")
    check_sections(docs, "edit-costs:tiny")  # the other sections can still be written
    # The benchmark refuses before its output folder is made or its model loaded (none here).
    settings = quality.Settings(model=str(tmp_path / "tiny"), n=1, baseline=False)
    with pytest.raises(InputError, match=message):
        quality.quality(settings, tmp_path / "out", docs=docs, log=lambda _: None)
    assert not (tmp_path / "out").exists() and docs.read_text() == broken
    (tmp_path / "folder.md").mkdir()
    with pytest.raises(InputError, match="is a folder; give the markdown file"):
        write_section(tmp_path / "folder.md", "quality:tiny", "Quality: tiny", "the table")
