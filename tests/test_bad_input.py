"""Bad values given to the Python API: a clear InputError before any work, never a traceback
from inside torch, PIL or diffusers, and never a NaN written as a black image."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import pytest
import torch

from dragondiffusion.edit_defaults import EditDefaults
from dragondiffusion.edits import DragWeights, MoveWeights
from dragondiffusion.errors import InputError, SamplingDiverged
from dragondiffusion.geometry import require_visible
from dragondiffusion.io import RECORD_KEY, read_record, save_png
from dragondiffusion.models import load
from dragondiffusion.pipeline import MAX_RESOLUTION, EditOptions

FROM, TO = (35, 45), (100, 45)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(seed="abc"), "seed must be a whole number"),
        (dict(seed=1.5), "seed must be a whole number"),
        (dict(seed=2**64), r"seed must lie in \[-2\*\*63, 2\*\*64\)"),
        (dict(num_inference_steps=2.5), "steps must be a whole number"),
        (dict(num_inference_steps=True), "steps must be a whole number"),
        (dict(sde_strength="0.5"), "sde_strength must be a number"),
        (dict(ip_scale=math.inf), "ip_scale must be a finite number"),
        (dict(keep_background="yes"), "keep_background must be True or False"),
        (dict(memory_bank=2), "memory_bank must be True or False"),
        (dict(background_margin=-1), "background_margin must be a whole number of pixels ≥ 0"),
        (dict(background_margin=2.5), "background_margin must be a whole number"),
    ],
)
def test_edit_options_refuse_values_of_the_wrong_kind(options, match):
    with pytest.raises(InputError, match=match):
        EditOptions(**options)


def test_edit_options_take_numpy_numbers_and_flags_as_python_ones():
    """What the record (JSON) holds must be Python's own types, whatever the caller passed."""
    options = EditOptions(
        num_inference_steps=np.int64(4),
        seed=np.uint32(7),
        resolution=np.int64(128),
        sde_strength=np.float32(0.5),
        ip_scale=np.float64(0.2),
        keep_background=1,
        memory_bank=np.bool_(False),
        background_margin=np.int64(6),
    )
    assert type(options.num_inference_steps) is int and options.num_inference_steps == 4
    assert type(options.seed) is int and options.seed == 7
    assert type(options.resolution) is int and options.resolution == 128
    assert type(options.sde_strength) is float and options.sde_strength == 0.5
    assert type(options.ip_scale) is float
    assert options.keep_background is True and options.memory_bank is False
    assert type(options.background_margin) is int and options.background_margin == 6


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_inference_steps=2.5), "steps must be a whole number"),
        (dict(num_inference_steps="3"), "steps must be a whole number"),
        (dict(prompt=None), r'prompt must be text \(""'),
        (dict(reference=True, reference_prompt=3), "reference prompt must be text"),
    ],
)
def test_invert_refuses_values_of_the_wrong_kind(pipe, scene, kwargs, match):
    if kwargs.pop("reference", None):
        kwargs["reference"] = scene[0]
    with pytest.raises(InputError, match=match):
        pipe.invert(scene[0], **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scale="2"), "scale must be a number"),
        (dict(scale=math.nan), "scale must be a positive number"),
        (dict(target=(80,)), r"--to point must be an \(x, y\) pair"),
        (dict(target=(80, math.nan)), "--to point y must be a finite number"),
        (dict(source="40,64"), r"--from point must be an \(x, y\) pair"),
        (dict(scale=1e-6), "less than one cell of the 48×32 feature grid"),
        (dict(weights=DragWeights()), "the weights of a move must be a MoveWeights"),
        (dict(weights=MoveWeights(guidance_scale=math.nan)), "guidance_scale must be finite"),
        (dict(weights=MoveWeights(energy_scale=-1.0)), "energy_scale must be finite and ≥ 0"),
        (dict(weights=MoveWeights(w_edit="4")), "MoveWeights.w_edit must be a number"),
        (dict(resolution=256), "leave the resolution out"),
        (
            dict(weights=MoveWeights(feature_timestep=5000.0)),
            r"MoveWeights\.feature_timestep is 5000, beyond the model's 1000 training timesteps",
        ),
    ],
)
def test_move_refuses_bad_values_before_sampling(pipe, scene, inversion, kwargs, match):
    args = dict(mask=scene[1], source=FROM, target=TO)
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        pipe.move(inversion, **args)


def test_numpy_numbers_given_to_a_move_reach_a_json_record(pipe, scene, inversion, tmp_path):
    weights = replace(MoveWeights(), energy_scale=np.float32(400.0), w_edit=np.int64(4))
    result = pipe.move(
        inversion,
        scene[1],
        np.array(FROM),
        np.array(TO, np.float32),
        scale=np.float32(1.0),
        weights=weights,
        seed=np.int64(0),
        sde_strength=np.float32(0.4),
    )
    assert result.record["edit"] == "move" and result.record["scale"] == 1.0
    assert result.record["from"] == [35.0, 45.0] and result.record["weights"]["w_edit"] == 4.0
    result.save(tmp_path / "out.png")
    assert read_record(tmp_path / "out.png")["energy_scale"] == 400.0


def test_a_one_cell_object_may_shrink_a_little():
    """A shrink whose expected size is under a cell is refused only where nothing is left."""
    one = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    one[..., 3, 3] = True
    require_visible(one, one, 0.9, "the moved object")  # 0.81 of a cell expected, 1 kept
    with pytest.raises(InputError, match="less than one cell of the 8×8 feature grid"):
        require_visible(torch.zeros_like(one), one, 0.9, "the moved object")


@pytest.mark.parametrize(
    "points,match",
    [
        ((40, 64, 60, 64), r"pair 1 is 40"),
        ([((40, 64),)], r"pair 1 is \(\(40, 64\),\)"),
        ([((40, 64), (60,))], r"target 1 must be an \(x, y\) pair"),
        ("40,64 60,64", r"points must be a list of \(\(x, y\), \(x, y\)\) pairs"),
    ],
)
def test_drag_refuses_malformed_points(pipe, scene, inversion, points, match):
    with pytest.raises(InputError, match=match):
        pipe.drag(inversion, np.ones_like(scene[1]), points)


def test_paste_refuses_a_malformed_offset(pipe, scene):
    with pytest.raises(InputError, match="offset x must be a finite number"):
        pipe.paste(scene[0], scene[0], scene[1], offset=(math.nan, 0))


def test_resolution_has_an_upper_bound(pipe):
    with pytest.raises(InputError, match=f"above the largest working size.*{MAX_RESOLUTION}"):
        pipe.working_size((160, 96), MAX_RESOLUTION + 1)
    assert pipe.working_size((160, 96), MAX_RESOLUTION)[0] > 0


def test_a_diverging_edit_stops_with_a_clear_error_not_a_black_image(pipe, scene, inversion):
    """An energy scale far beyond any model's (here 1e30) overflows the latent: the sampler stops
    at that step instead of decoding NaN to an all-black PNG."""
    weights = MoveWeights(energy_scale=1e30)
    with pytest.raises(SamplingDiverged, match=r"the move diverged at step \d+ of 10.*1e\+30"):
        pipe.move(inversion, scene[1], FROM, TO, weights=weights)


def test_a_bundle_asking_more_steps_than_the_model_has_names_its_file(pipe):
    kept = pipe.edit_defaults
    defaults = EditDefaults.parse({"steps": {"drag": 5000}}, "bundle/dragondiffusion.json")
    with pytest.raises(InputError, match=r"bundle/dragondiffusion\.json: steps of drag is 5000"):
        pipe.edit_defaults = defaults
    assert pipe.edit_defaults is kept


def test_a_bundle_reading_features_beyond_the_models_timesteps_names_its_file(pipe):
    """A feature_timestep above the model's timesteps would silently act as 0 (no step is
    noisier than it); the error names the file and the first edit it reaches (resize, which
    follows move's entry, comes after move)."""
    kept = pipe.edit_defaults
    weights = {"weights": {"move": {"feature_timestep": 1001.0}}}
    defaults = EditDefaults.parse(weights, "bundle/dragondiffusion.json")
    match = r"bundle/dragondiffusion\.json: move: feature_timestep is 1001, beyond the model's 1000"
    with pytest.raises(InputError, match=match):
        pipe.edit_defaults = defaults
    assert pipe.edit_defaults is kept
    pipe.edit_defaults = EditDefaults.parse(
        {"weights": {"move": {"feature_timestep": 1000.0}}}, "bundle/dragondiffusion.json"
    )
    pipe.edit_defaults = kept


def test_an_inversion_from_another_model_is_refused(pipe, scene, inversion):
    """Another model's trajectory and memory bank would edit with the wrong UNet (and a record
    naming that other model) or fail deep in torch where shapes differ."""
    with pytest.raises(InputError, match="made by model 'other', not by this pipeline's"):
        pipe.move(replace(inversion, model="other"), scene[1], FROM, TO)
    narrower = replace(inversion, latents=inversion.latents[:, :, :2])
    with pytest.raises(InputError, match="latents, prompt embeddings or memory bank do not fit"):
        pipe.move(narrower, scene[1], FROM, TO)


def test_results_are_written_as_png_only_and_read_back_with_clear_errors(tmp_path):
    image = PIL.Image.new("RGB", (8, 8))
    with pytest.raises(InputError, match=r"must end in \.png"):
        save_png(image, tmp_path / "out.jpg", {"edit": "move"})
    assert not list(tmp_path.iterdir())
    save_png(image, tmp_path / "out.png", {"edit": "move"})
    assert read_record(tmp_path / "out.png") == {"edit": "move"}
    with pytest.raises(InputError, match="does not exist"):
        read_record(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(InputError, match="not an image Pillow can read"):
        read_record(tmp_path / "notes.txt")
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text(RECORD_KEY, "[1, 2")
    image.save(tmp_path / "damaged.png", pnginfo=info)
    with pytest.raises(InputError, match="record is damaged"):
        read_record(tmp_path / "damaged.png")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(model=3), "model must be a folder or a hub id"),
        (dict(model=" "), "model is empty"),
        (dict(model=None, dtype=torch.int8), "holds no fractions"),
        (dict(model=None, dtype=["float32"]), "unknown dtype"),
        (dict(model=None, device=[1]), "unknown device"),
    ],
)
def test_load_refuses_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        load(**kwargs)


def test_load_names_a_file_given_as_the_model(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="is a file; give the bundle's folder"):
        load(tmp_path / "model.safetensors")


def test_threads_far_above_the_cores_are_refused(capsys):
    import os

    from dragondiffusion.cli import main

    many = 4 * (os.cpu_count() or 1) + 1
    assert main(["info", "--threads", str(many)]) == 2
    assert f"--threads {many} is far above this machine's" in capsys.readouterr().err
