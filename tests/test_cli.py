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
