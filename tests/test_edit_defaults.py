"""A bundle's own edit weights (dragondiffusion.json): parsing, loading, use and record."""

import json
import shutil

import numpy as np
import pytest

import dragondiffusion
from dragondiffusion.edit_defaults import DEFAULTS_FILE, EditDefaults
from dragondiffusion.edits import AppearanceWeights, DragWeights, MoveWeights
from dragondiffusion.errors import InputError


def test_overrides_replace_only_the_named_weights(tmp_path):
    written = EditDefaults({"move": {"guidance_scale": 1.0, "energy_scale": 2000.0}})
    path = written.write(tmp_path)
    defaults = EditDefaults.read(tmp_path)
    assert defaults.source == str(path) and path.name == DEFAULTS_FILE
    move = defaults.weights("move")
    assert (move.guidance_scale, move.energy_scale) == (1.0, 2000.0)
    assert move.w_edit == MoveWeights().w_edit  # not named: upstream's value
    assert defaults.weights("appearance") == AppearanceWeights()
    assert EditDefaults.read(tmp_path / "absent").source == "upstream"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ('{"move": {}}', "expected"),
        ('{"weights": {"rotate": {}}}', "unknown edit 'rotate'"),
        ('{"weights": {"move": {"cfg": 1}}}', "move has no weight 'cfg'"),
        ('{"weights": {"move": {"energy_scale": "big"}}}', "must be a number"),
        ('{"weights": {"move": {"energy_scale": -1}}}', "finite and ≥ 0"),
        ('{"weights": {"paste": {"blend_background": 2}}}', r"blend_background must lie in \[0, 1"),
        ('{"weights": {"move": [1, 2]}}', "object of numbers"),
        ('{"weights": {"drag": {"feature_substeps": 0}}}', "feature_substeps must be a whole"),
        ('{"weights": {"drag": {"feature_substeps": 1.5}}}', "whole number of DDIM steps"),
        ('{"weights": {"move": {"k": 1' + "0" * 400 + "}}}", "finite and ≥ 0"),
        ("{}", "each optional"),
        ('{"weights": {}, "layers": [2]}', "each optional"),
        ('{"feature_blocks": [2]}', "must map edits to decoder block indices"),
        ('{"feature_blocks": {"rotate": [2]}}', "feature_blocks: unknown edit 'rotate'"),
        ('{"feature_blocks": {"move": 2}}', "of move must be a non-empty list"),
        ('{"feature_blocks": {"move": []}}', "non-empty list"),
        ('{"feature_blocks": {"move": [true]}}', "non-empty list"),
        ('{"feature_blocks": {"move": [1.5]}}', "non-empty list"),
        ('{"steps": 20}', "steps must map edits to step counts"),
        ('{"steps": {"rotate": 20}}', "steps: unknown edit 'rotate'"),
        ('{"steps": {"drag": 1}}', "steps of drag must be a whole number of at least 2, not 1"),
        ('{"steps": {"drag": 20.5}}', "whole number"),
        ('{"steps": {"drag": true}}', "whole number"),
        ('{"steps": {"drag": "20"}}', "whole number"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, text, message):
    (tmp_path / DEFAULTS_FILE).write_text(text)
    with pytest.raises(InputError, match=message):
        EditDefaults.read(tmp_path)


def test_a_bundle_with_defaults_edits_with_them_unless_weights_are_given(
    tiny_bundle, tmp_path, scene
):
    bundle = tmp_path / "tuned"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / DEFAULTS_FILE).write_text(json.dumps({"weights": {"move": {"guidance_scale": 1.5}}}))
    pipe = dragondiffusion.load(bundle, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    image, mask = scene
    inversion = pipe.invert(image, "a red square", num_inference_steps=4)
    tuned = pipe.move(inversion, mask, (35, 45), (60, 45), num_inference_steps=4)
    assert tuned.record["guidance_scale"] == 1.5
    assert tuned.record["weights_from"] == str(bundle / DEFAULTS_FILE)
    given = pipe.move(
        inversion, mask, (35, 45), (60, 45), weights=MoveWeights(), num_inference_steps=4
    )
    assert given.record["guidance_scale"] == 4.0 and given.record["weights_from"] == "argument"


def test_bundles_without_the_file_keep_upstream_weights(pipe, inversion, scene):
    result = pipe.move(inversion, scene[1], (35, 45), (60, 45), num_inference_steps=10)
    assert result.record["guidance_scale"] == MoveWeights().guidance_scale
    assert result.record["weights_from"] == "upstream"
    assert result.record["feature_blocks"] == [1, 2]


def test_moves_and_resizes_read_features_at_their_weights_level(pipe, inversion, scene):
    assert inversion.num_steps == 10  # timesteps 901, 801, …, 1
    assert pipe.move(inversion, scene[1], (35, 45), (60, 45)).record["features_read_at"] is None
    levelled = MoveWeights(feature_timestep=480.0)
    moved = pipe.move(inversion, scene[1], (35, 45), (60, 45), weights=levelled)
    assert moved.record["features_read_at"] == 501
    assert moved.record["weights"]["feature_timestep"] == 480.0
    resized = pipe.move(inversion, scene[1], (35, 45), (35, 45), scale=1.3, weights=levelled)
    assert resized.record["features_read_at"] == 501 and resized.record["edit"] == "resize"
    unlevelled = pipe.move(inversion, scene[1], (35, 45), (35, 45), scale=1.3)
    assert unlevelled.record["features_read_at"] is None  # upstream's defaults: its own level
    levelled_drag = DragWeights(feature_timestep=300.0)
    dragged = pipe.drag(inversion, scene[1], [((35, 45), (45, 45))], weights=levelled_drag)
    assert dragged.record["features_read_at"] == 301


def test_substeps_cost_one_plain_pass_per_further_step_and_are_recorded(pipe, inversion, scene):
    """Drag at 10 steps reads at t = 301 (step 6) from its guided steps 0, 1, 2 and 4 (step 4
    runs 3 times: time travel): two substeps cost one plain conditional pass per run, 6 in all,
    and change nothing else that is counted."""
    moves = [((35, 45), (45, 45))]
    one = pipe.drag(inversion, scene[1], moves, weights=DragWeights(feature_timestep=300.0))
    two = pipe.drag(
        inversion, scene[1], moves, weights=DragWeights(feature_timestep=300.0, feature_substeps=2)
    )
    assert two.record["schedule"]["guided"] == [0, 1, 2, 4]
    assert one.record["evaluations"]["bring"] == 0 and two.record["evaluations"]["bring"] == 6
    assert two.record["evaluations"]["forward"] == one.record["evaluations"]["forward"] + 6
    assert two.record["weights"]["feature_substeps"] == 2
    assert not np.array_equal(np.asarray(one.image), np.asarray(two.image))


def test_a_bundle_can_name_the_feature_blocks_of_its_energies(tiny_bundle, tmp_path, scene):
    written = EditDefaults({"move": {"guidance_scale": 1.0}}, feature_blocks={"move": (2,)})
    assert EditDefaults.read(written.write(tmp_path).parent).feature_blocks == {"move": (2,)}
    bundle = tmp_path / "fine"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / DEFAULTS_FILE).write_text(json.dumps({"feature_blocks": {"move": [2]}}))
    pipe = dragondiffusion.load(bundle, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.features_for("move").blocks == (2,) and pipe.features_for("drag").blocks == (1, 2)
    image, mask = scene
    inversion = pipe.invert(image, "a red square", num_inference_steps=4)
    result = pipe.move(inversion, mask, (35, 45), (60, 45), num_inference_steps=4)
    assert result.record["feature_blocks"] == [2]
    assert result.record["guidance_scale"] == MoveWeights().guidance_scale  # weights optional
    dragged = pipe.drag(image, mask, [((35, 45), (45, 45))], num_inference_steps=4)
    assert dragged.record["feature_blocks"] == [1, 2]
    (bundle / DEFAULTS_FILE).write_text(json.dumps({"feature_blocks": {"paste": [7]}}))
    with pytest.raises(InputError, match=r"decoder blocks \(0 to 3\), got \[7\]"):
        dragondiffusion.load(bundle, device="cpu")


def test_setting_a_pipelines_defaults_sets_its_feature_blocks_too(tiny_bundle):
    pipe = dragondiffusion.load(tiny_bundle, device="cpu")
    assert pipe.features_for("drag").blocks == (1, 2)
    pipe.edit_defaults = EditDefaults(feature_blocks={"drag": (2,)})
    assert pipe.features_for("drag").blocks == (2,) and pipe.features_for("move").blocks == (1, 2)
    kept = pipe.edit_defaults
    with pytest.raises(InputError, match=r"decoder blocks \(0 to 3\), got \[9\]"):
        pipe.edit_defaults = EditDefaults(feature_blocks={"move": (9,)})
    assert pipe.edit_defaults is kept and pipe.features_for("drag").blocks == (2,)
    pipe.edit_defaults = EditDefaults()
    assert pipe.features_for("drag").blocks == (1, 2) and pipe.feature_overrides == {}


def test_step_counts_round_trip_and_default_to_fifty(tmp_path):
    written = EditDefaults({"move": {"guidance_scale": 1.0}}, steps={"drag": 20, "move": 30})
    defaults = EditDefaults.read(written.write(tmp_path).parent)
    assert defaults.steps == {"drag": 20, "move": 30}
    assert [defaults.num_steps(e) for e in ("drag", "move", "resize", "paste")] == [20, 30, 30, 50]
    assert EditDefaults().num_steps("drag") == 50


def test_a_bundles_step_counts_are_each_edits_default_unless_steps_are_given(
    tiny_bundle, tmp_path, scene
):
    bundle = tmp_path / "fast"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / DEFAULTS_FILE).write_text(json.dumps({"steps": {"drag": 3, "move": 4}}))
    pipe = dragondiffusion.load(bundle, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    image, mask = scene
    dragged = pipe.drag(image, mask, [((35, 45), (45, 45))])
    assert dragged.record["steps"] == 3 and dragged.record["evaluations"]["inversion"] == 3
    moved = pipe.move(image, mask, (35, 45), (60, 45))
    assert moved.record["steps"] == 4
    assert (
        pipe.drag(image, mask, [((35, 45), (45, 45))], num_inference_steps=2).record["steps"] == 2
    )
    # An inversion fixes the steps: its own when none are given, an error when others are.
    inversion = pipe.invert(image, "", num_inference_steps=5)
    assert pipe.drag(inversion, mask, [((35, 45), (45, 45))]).record["steps"] == 5
    with pytest.raises(InputError, match="the given inversion has 5 steps, the edit asks for 3"):
        pipe.drag(inversion, mask, [((35, 45), (45, 45))], num_inference_steps=3)
    # invert can take an edit's own count, to be reused by that edit.
    assert pipe.invert(image, "", edit="drag").num_steps == 3
    assert pipe.invert(image, "", edit="resize").num_steps == 4  # move's
    assert pipe.invert(image, "").num_steps == 50
    with pytest.raises(InputError, match="edit must be one of move, resize, appearance, drag"):
        pipe.invert(image, "", edit="rotate")


def test_a_resize_takes_moves_entries_under_its_own(tiny_bundle, tmp_path, scene):
    """A resize (a move with a scale other than 1) is tuned as a move unless the bundle's
    file names "resize": its weights on top of move's, its feature blocks and steps if named."""
    defaults = EditDefaults(
        {"move": {"energy_scale": 8000.0, "feature_timestep": 501.0},
         "resize": {"feature_timestep": 741.0}},
        feature_blocks={"move": (2,)},
        steps={"move": 30},
    )  # fmt: skip
    resize = defaults.weights("resize")
    assert (resize.energy_scale, resize.feature_timestep) == (8000.0, 741.0)
    assert defaults.weights("move").feature_timestep == 501.0
    assert defaults.blocks("resize") == (2,) and defaults.num_steps("resize") == 30
    own = EditDefaults(feature_blocks={"move": (2,), "resize": (1, 2)}, steps={"resize": 40})
    assert own.blocks("resize") == (1, 2) and own.num_steps("resize") == 40
    assert own.num_steps("move") == 50 and EditDefaults().blocks("resize") is None

    bundle = tmp_path / "resize"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / DEFAULTS_FILE).write_text(
        json.dumps(
            {
                "weights": {
                    "move": {"guidance_scale": 1.5, "feature_timestep": 250.0},
                    "resize": {"feature_timestep": 480.0},
                },
                "feature_blocks": {"move": [2]},
                "steps": {"move": 4},
            }
        )
    )
    pipe = dragondiffusion.load(bundle, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    image, mask = scene
    inversion = pipe.invert(image, "a red square", edit="resize")
    assert inversion.num_steps == 4  # timesteps 751, 501, 251, 1
    moved = pipe.move(inversion, mask, (35, 45), (45, 45))
    resized = pipe.move(inversion, mask, (35, 45), (35, 45), scale=1.3)
    assert (moved.record["edit"], resized.record["edit"]) == ("move", "resize")
    assert (moved.record["features_read_at"], resized.record["features_read_at"]) == (251, 501)
    assert resized.record["guidance_scale"] == 1.5 and resized.record["feature_blocks"] == [2]
    assert resized.record["weights"]["feature_timestep"] == 480.0
