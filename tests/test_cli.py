import json

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
    assert rec["edit"] == "move" and rec["seed"] == 5 and rec["steps"] == 6
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


def test_cli_info(tiny_bundle, capsys):
    assert main(["info", "--model", str(tiny_bundle), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "dragondiffusion 0.1" in out and "torch" in out and "diffusers" in out
    assert "device: cpu" in out and "feature blocks: up_blocks[1, 2]" in out
    assert "native resolution: 128 px" in out
