"""`dragondiffusion demo` on the tiny random bundle: every file, the sheet, the page, the errors."""

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from dragondiffusion import demo, models
from dragondiffusion.cli import main
from dragondiffusion.errors import InputError
from dragondiffusion.figures import GAP, header_height
from dragondiffusion.io import read_record

EDITS = ["move", "resize", "appearance", "drag", "paste"]
TWO_IMAGE_EDITS = {"appearance", "paste"}


@pytest.fixture(scope="module")
def demo_run(tiny_bundle, tmp_path_factory):
    """One CLI demo run at 2 steps: (exit code, stdout, output folder, model loads)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    loads = []
    real_load = models.load

    def counting_load(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load", counting_load)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = main(
                ["demo", "--model", str(tiny_bundle), "--steps", "2", "--device", "cpu",
                 "--out", str(out)]
            )  # fmt: skip
    return code, stdout.getvalue(), out, loads


def test_examples_are_deterministic_and_clear():
    first, second = demo.examples(), demo.examples()
    assert [e.name for e in first] == EDITS
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a.expected, b.expected)
        assert np.array_equal(a.arguments["image"], b.arguments["image"])
    for example in first:
        image = example.arguments["image"]
        assert image.shape == example.expected.shape == (128, 128, 3)
        # Objects change pixels by far more than 40 levels, soft shadows by less.
        change = np.abs(image.astype(int) - example.expected.astype(int)).max(axis=-1)
        changed = change > 40
        assert changed.sum() > 300, f"{example.name}: the expected change is too small to see"
        # Clear edits happen away from the border: no object is pushed out of the picture.
        border = np.ones_like(changed)
        border[2:-2, 2:-2] = False
        assert not (changed & border).any(), example.name
        for key in ("mask", "reference_mask"):
            if key in example.arguments:
                mask = example.arguments[key]
                assert mask.dtype == bool and 100 < mask.sum() < 0.3 * mask.size
    move, resize = first[0], first[1]
    assert move.inversion == resize.inversion, "move and resize share one inversion"
    assert len({e.inversion for e in first}) == 4


def test_examples_scale_with_the_model_resolution():
    small, large = demo.examples(128), demo.examples(256)
    for s, big in zip(small, large, strict=True):
        assert big.expected.shape == (256, 256, 3)
        if "mask" in s.arguments:
            ratio = big.arguments["mask"].sum() / s.arguments["mask"].sum()
            assert 3.5 < ratio < 4.5
    assert large[0].arguments["target"][0] == pytest.approx(2 * small[0].arguments["target"][0])


def test_demo_cli_writes_every_file_and_loads_the_model_once(demo_run):
    code, _, out, loads = demo_run
    assert code == 0
    assert len(loads) == 1
    for name in EDITS:
        folder = out / name
        expected = {"input.png", "expected.png", "output.png"}
        expected |= {"reference.png", "reference_mask.png"} if name in TWO_IMAGE_EDITS else set()
        expected |= {"mask.png"} if name != "paste" else set()
        assert {p.name for p in folder.iterdir()} == expected
        for file in expected:
            with PIL.Image.open(folder / file) as im:
                assert im.size == (128, 128)
        assert read_record(folder / "output.png")["edit"] == name
    assert not list(out.rglob(".*.tmp")), "no temporary files left behind"


def test_demo_contact_sheet_has_a_row_per_edit(demo_run):
    _, _, out, _ = demo_run
    with PIL.Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.height == header_height(titled=True) + len(EDITS) * (demo.CELL + GAP)
        assert sheet.width > 3 * demo.CELL


def test_demo_page_links_existing_files(demo_run):
    _, _, out, _ = demo_run
    page = (out / "index.html").read_text()
    links = set(re.findall(r'(?:src|href)="([^"]+)"', page))
    assert "contact_sheet.png" in links and "move/output.png" in links
    assert len(links) == 1 + sum(4 + 2 * (n in TWO_IMAGE_EDITS) - (n == "paste") for n in EDITS)
    for link in links:
        assert (out / link).is_file(), link


def test_demo_prints_progress_and_a_timing_table(demo_run):
    _, stdout, out, _ = demo_run
    assert "loading model" in stdout and "[5/5] paste" in stdout
    table = stdout[stdout.index("edit          seconds") :]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:6]}
    assert list(rows) == EDITS
    assert rows["resize"][2] == "reused"
    summary = json.loads((out / demo.SUMMARY).read_text())
    assert summary["status"] == "complete" and len(summary["edits"]) == 5
    for edit in summary["edits"]:
        assert edit["seconds"] > 0 and edit["unet_forward"] > 0 and edit["unet_backward"] > 0
        assert edit["record"]["steps"] == 2


def test_demo_names_the_embedded_model_by_name_not_by_its_install_path(
    tmp_path, tiny_bundle, monkeypatch
):
    monkeypatch.setattr(models, "EMBEDDED_MODEL", tiny_bundle)
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["demo", "--out", str(out), "--steps", "2", "--device", "cpu"]) == 0
    assert json.loads((out / "demo.json").read_text())["model"] == models.EMBEDDED_NAME
    assert str(tiny_bundle) not in (out / "index.html").read_text()


def test_demo_without_model_and_without_embedded_bundle_is_a_clear_error(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(models, "EMBEDDED_MODEL", tmp_path / "no_demo_model")
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dragondiffusion: error: ")
    assert "no embedded demo model" in err and "--model" in err
    assert not out.exists()


def test_demo_never_writes_into_a_folder_of_other_files(tmp_path, tiny_bundle, capsys):
    (tmp_path / "holiday.png").write_bytes(b"not mine")
    args = ["demo", "--model", str(tiny_bundle), "--steps", "2", "--out", str(tmp_path)]
    assert main(args) == 2
    assert "did not write" in capsys.readouterr().err
    assert (tmp_path / "holiday.png").read_bytes() == b"not mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["holiday.png"]
    with pytest.raises(InputError, match="is a file"):
        demo.prepare_output(tmp_path / "holiday.png")
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / demo.SUMMARY).write_text("{}")  # not a summary the demo wrote
    with pytest.raises(InputError, match="did not write"):
        demo.prepare_output(tmp_path / "again")
    (tmp_path / "again" / demo.SUMMARY).write_text(demo.summary([], "m", 0.0, "incomplete"))
    assert demo.prepare_output(tmp_path / "again") == tmp_path / "again"


def test_demo_rejects_too_few_steps(tmp_path, tiny_bundle, capsys):
    args = ["demo", "--model", str(tiny_bundle), "--steps", "1", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "at least 2" in capsys.readouterr().err
    assert not Path(tmp_path / "o").exists()


def test_demo_without_steps_runs_each_edit_at_the_models_own(tmp_path, tiny_bundle):
    import shutil

    from dragondiffusion.edit_defaults import DEFAULTS_FILE

    bundle = tmp_path / "fast"
    shutil.copytree(tiny_bundle, bundle)
    own = {"move": 3, "appearance": 2, "drag": 2, "paste": 2}
    (bundle / DEFAULTS_FILE).write_text(json.dumps({"steps": own}))
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert (
            main(["demo", "--model", str(bundle), "--device", "cpu", "--out", str(tmp_path / "o")])
            == 0
        )
    summary = json.loads((tmp_path / "o" / demo.SUMMARY).read_text())
    steps = [e["record"]["steps"] for e in summary["edits"]]
    assert steps == [3, 3, 2, 2, 2]  # move, resize (move's), appearance, drag, paste
    assert "(3 steps)" in stdout.getvalue() and "(2 steps)" in stdout.getvalue()
    table = stdout.getvalue()[stdout.getvalue().index("edit          seconds") :]
    assert table.splitlines()[2].split()[2] == "reused"  # resize reuses move's inversion
