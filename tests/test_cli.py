import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from dragondiffusion.cli import main
from dragondiffusion.io import read_record


@pytest.fixture
def files(tmp_path, scene):
    img, mask = scene
    PIL.Image.fromarray(img).save(tmp_path / "in.png")
    PIL.Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    return tmp_path


def move_args(files, tiny_bundle, *extra):
    return [
        "move", "--model", str(tiny_bundle), "--image", str(files / "in.png"),
        "--mask", str(files / "mask.png"), "--from", "35,45", "--to", "100,50",
        "--steps", "6", "--seed", "5", "--device", "cpu", "--quiet", *extra,
    ]  # fmt: skip


def test_cli_move_writes_png_with_round_tripping_record(files, tiny_bundle, capsys):
    out = files / "sub" / "out.png"
    assert main(move_args(files, tiny_bundle, "--scale", "0.8", "--out", str(out))) == 0
    with PIL.Image.open(out) as im:
        assert im.size == (160, 96)
    rec = read_record(out)
    assert rec["edit"] == "resize" and rec["seed"] == 5 and rec["steps"] == 6  # scale 0.8
    assert rec["from"] == [35.0, 45.0] and rec["to"] == [100.0, 50.0] and rec["scale"] == 0.8
    assert rec["model"] == str(tiny_bundle) and rec["device"] == "cpu"
    assert json.loads(json.dumps(rec)) == rec
    assert "wrote" in capsys.readouterr().out
    assert not list(out.parent.glob(".*.tmp")), "no temporary file left behind"


def test_cli_working_size_output(files, tiny_bundle):
    out = files / "w.png"
    assert main(move_args(files, tiny_bundle, "--output-size", "working", "--out", str(out))) == 0
    with PIL.Image.open(out) as im:
        assert im.size == (192, 128)


def test_cli_refuses_to_overwrite_an_input(files, tiny_bundle, capsys):
    before = (files / "in.png").read_bytes()
    assert main(move_args(files, tiny_bundle, "--out", str(files / "in.png"))) == 2
    assert "is one of the inputs" in capsys.readouterr().err
    assert (files / "in.png").read_bytes() == before


def test_cli_bad_input_errors_name_the_problem(files, tiny_bundle, capsys):
    PIL.Image.new("L", (10, 10), 255).save(files / "small.png")
    args = move_args(files, tiny_bundle, "--out", str(files / "o.png"))
    args[args.index("--mask") + 1] = str(files / "small.png")
    assert main(args) == 2
    assert "mask is 10×10 but the image is 160×96" in capsys.readouterr().err
    assert (
        main(
            [
                "move",
                "--image",
                "nope.png",
                "--mask",
                "m.png",
                "--from",
                "1,1",
                "--to",
                "2,2",
                "--model",
                str(files / "missing"),
                "--out",
                str(files / "o.png"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["move", "--from", "1;2"])


def test_cli_threads(tiny_bundle, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["info", "--model", str(tiny_bundle), "--device", "cpu", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert main(["info", "--model", str(tiny_bundle), "--threads", "0"]) == 2
        assert "--threads must be at least 1, got 0" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_cli_info(tiny_bundle, capsys):
    assert main(["info", "--model", str(tiny_bundle), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "dragondiffusion 0.1" in out and "torch" in out and "diffusers" in out
    assert "device: cpu" in out and "feature blocks: up_blocks[1, 2]" in out
    assert "native resolution: 128 px" in out
    assert "default steps: move 50, resize 50, appearance 50, drag 50, paste 50 (upstream)" in out


def test_outputs_get_ordinary_file_permissions(tmp_path):
    """Atomic writes must not leave owner-only (0600) files behind."""
    import os

    from dragondiffusion.io import atomic_write

    old = os.umask(0o022)
    try:
        out = atomic_write(tmp_path / "x.txt", lambda tmp: Path(tmp).write_text("x"))
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


@pytest.mark.parametrize(
    "edit,extra,expected",
    [
        (
            "appearance",
            ["--ref-image", "ref.png", "--ref-mask", "ref_mask.png", "--ref-prompt", "a blue one"],
            {"prompts": ["a red square", "a blue one"]},
        ),
        (
            "drag",
            ["--drag", "35,45:48,45", "--drag", "30,40:30,33"],
            {"points": [[[35.0, 45.0], [48.0, 45.0]], [[30.0, 40.0], [30.0, 33.0]]]},
        ),
        (
            "paste",
            ["--ref-image", "ref.png", "--ref-mask", "ref_mask.png", "--offset", "60,-10"],
            {"offset": [60.0, -10.0], "scale": 0.9},
        ),
    ],
)
def test_cli_appearance_drag_paste(files, tiny_bundle, edit, extra, expected):
    img = np.asarray(PIL.Image.open(files / "in.png"))
    mask = np.asarray(PIL.Image.open(files / "mask.png"))
    PIL.Image.fromarray(np.ascontiguousarray(img[::-1])).save(files / "ref.png")
    PIL.Image.fromarray(np.ascontiguousarray(mask[::-1])).save(files / "ref_mask.png")
    extra = [str(files / a) if a.endswith(".png") else a for a in extra]
    if edit == "paste":
        extra += ["--scale", "0.9"]
    out = files / f"{edit}.png"
    args = [
        edit, "--model", str(tiny_bundle), "--image", str(files / "in.png"),
        "--prompt", "a red square", "--steps", "4", "--device", "cpu", "--quiet",
        "--mode", "dragon", "--out", str(out), *extra,
    ]  # fmt: skip
    if edit != "paste":
        args += ["--mask", str(files / "mask.png")]
    assert main(args) == 0
    rec = read_record(out)
    assert rec["edit"] == edit and rec["mode"] == "dragon" and rec["steps"] == 4
    assert {k: rec[k] for k in expected} == expected
    with PIL.Image.open(out) as im:
        assert im.size == (160, 96)


def test_ctrl_c_is_a_message_and_exit_code_130(monkeypatch, capsys):
    from dragondiffusion import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_info", interrupted)
    monkeypatch.setattr(cli, "run_bench", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err == "dragondiffusion: interrupted\n"
    assert main(["bench", "quality"]) == 130
    assert "interrupted (finished scenes are kept: run it again with --resume)" in (
        capsys.readouterr().err
    )


def test_check_output_refuses_folders_and_paths_that_cannot_be_written(tmp_path):
    from dragondiffusion.cli import check_output
    from dragondiffusion.errors import InputError

    (tmp_path / "adir.png").mkdir()
    (tmp_path / "image.png").write_bytes(b"x")
    refused = {
        tmp_path / "adir.png": "is a folder; choose another --out",
        tmp_path / "image.png" / "out.png": f"{str(tmp_path / 'image.png')!r} is not a folder",
        tmp_path / "image.png" / "sub" / "out.png": "is not a folder; choose another --out",
    }
    if Path("/proc/self").is_dir():  # as root os.access allows it, but no file can be made there
        refused[Path("/proc/out.png")] = "cannot write in '/proc'; choose another --out"
    for out, message in refused.items():
        with pytest.raises(InputError) as err:
            check_output(str(out), [])
        assert str(err.value).startswith(f"--out {str(out)!r}") and message in str(err.value)
    assert check_output(str(tmp_path / "new" / "deep" / "out.png"), []).name == "out.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.png", "image.png"]


def test_cli_refuses_an_unwritable_out_before_loading_the_model(tmp_path, capsys):
    (tmp_path / "adir.png").mkdir()
    args = [
        "move", "--image", "in.png", "--mask", "m.png", "--from", "1,1", "--to", "2,2",
        "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "adir.png"),
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("dragondiffusion: error: --out ") and "is a folder" in err


def test_unsupported_devices_are_refused(capsys, monkeypatch):
    import torch

    from dragondiffusion.errors import InputError
    from dragondiffusion.models import pick_device

    assert main(["info", "--device", "meta"]) == 2
    assert "unsupported device 'meta'; use cpu, cuda, cuda:N or mps" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(InputError, match="has 2 CUDA GPU\\(s\\); use cuda:0 to cuda:1"):
        pick_device("cuda:2")


def test_point_options_take_negative_values(monkeypatch):
    from dragondiffusion import cli

    seen = []
    monkeypatch.setattr(cli, "run_edit", seen.append)
    common = ["--image", "a.png", "--out", "o.png"]
    assert main(["paste", *common, "--ref-image", "r.png", "--ref-mask", "m.png",
                 "--offset", "-10,0"]) == 0  # fmt: skip
    assert main(["move", *common, "--mask", "m.png", "--from", "-1,-2", "--to", "-.5,3",
                 "--seed", "-5"]) == 0  # fmt: skip
    assert main(["drag", *common, "--mask", "m.png", "--drag", "-1,2:3,-4", "--drag",
                 "1,2:3,4"]) == 0  # fmt: skip
    paste, move = seen[0], seen[1]
    assert paste.offset == (-10.0, 0.0)
    assert (move.source, move.target, move.seed) == ((-1.0, -2.0), (-0.5, 3.0), -5)
    assert seen[2].pairs == [((-1.0, 2.0), (3.0, -4.0)), ((1.0, 2.0), (3.0, 4.0))]


def test_point_options_are_every_option_taking_a_point_or_pair():
    import argparse

    from dragondiffusion import cli

    subparsers = next(
        a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    typed = {
        option
        for command in subparsers.choices.values()
        for action in command._actions
        if action.type in (cli.point, cli.pair)
        for option in action.option_strings
    }
    assert typed == set(cli.POINT_OPTIONS)


def test_cli_reads_images_and_masks_before_loading_the_model(files, capsys):
    """A bad mask is named before the model loads (here the model does not even exist), not
    after a multi-second load of Stable Diffusion."""
    PIL.Image.new("L", (10, 10), 255).save(files / "small.png")
    args = move_args(files, files / "no-such-model", "--out", str(files / "o.png"))
    args[args.index("--mask") + 1] = str(files / "small.png")
    assert main(args) == 2
    assert "object mask is 10×10 but the image is 160×96" in capsys.readouterr().err
