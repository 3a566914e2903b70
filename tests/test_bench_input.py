"""Bad input to the benchmarks, the demo and the measuring scripts: a clear InputError before
any model loads, and nothing the user gave overwritten. No model is loaded here (every model
path given does not exist: the checks must come first)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dragondiffusion import demo
from dragondiffusion.bench import quality, report
from dragondiffusion.bench.report import COLUMNS
from dragondiffusion.bench.sections import check_sections
from dragondiffusion.cli import main
from dragondiffusion.errors import InputError

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def script(name: str):
    """A script of scripts/ as a module."""
    sys.path.insert(0, str(SCRIPTS))  # evaluate_demo_model imports train_demo_model
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def settings(tmp_path: Path, **changes) -> quality.Settings:
    """Small settings of a model that does not exist (loading it would fail)."""
    given = {"model": str(tmp_path / "no-model"), "n": 1, "edits": ("move",), "baseline": False}
    return quality.Settings(**{**given, "ablations": (), "modes": ("diffeditor",), **changes})


def saved_run(tmp_path: Path) -> dict:
    """A quality.json as an unfinished run writes it, with one row."""
    run = quality.QualityRun(settings(tmp_path), "m", "cpu", 4.0)
    run.results = [
        {
            "edit": "move",
            "case": 1,
            "seeds": [1],
            "variant": "identity",
            "seconds": 0.0,
            "inversion_seconds": 0.0,
            **{key: 1.0 for key, _ in COLUMNS},
        }
    ]
    return json.loads(report.summary(run, "incomplete"))


def first_row(saved: dict, **changes) -> dict:
    return {**saved, "results": [{**saved["results"][0], **changes}]}


DAMAGED = {
    "empty": (b"", "not readable as JSON"),
    "truncated": (b'{"dragondiffusion": "0.1", "sta', "not readable as JSON"),
    "binary": (b"\xff\xfe\x00\x01", "not readable as JSON"),
    "a list": (b"[1, 2]", "a JSON list, not an object"),
    "no results": (lambda s: {k: v for k, v in s.items() if k != "results"}, "no results"),
    "results a number": (lambda s: {**s, "results": 5}, "results are not a list"),
    "a row without case": (
        lambda s: {**s, "results": [{k: v for k, v in s["results"][0].items() if k != "case"}]},
        "result 1 has no case",
    ),
    "seconds text": (lambda s: first_row(s, seconds="abc"), "result 1 has a seconds that is not"),
    "run seconds text": (lambda s: {**s, "seconds": "abc"}, "its seconds are not a number"),
    "a metric text": (lambda s: first_row(s, image_psnr="x"), "has a image_psnr that is not a"),
    "threads text": (lambda s: {**s, "threads": "2"}, "threads are not a whole number"),
}


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("damage", DAMAGED)
def test_a_damaged_quality_json_is_named_and_kept(tmp_path, damage, resume):
    out = tmp_path / "out"
    out.mkdir()
    content, what = DAMAGED[damage]
    if callable(content):
        content = json.dumps(content(saved_run(tmp_path))).encode()
    (out / quality.SUMMARY).write_bytes(content)
    message = rf"quality.json is damaged \(.*{re.escape(what)}.*\); move it away or give another"
    with pytest.raises(InputError, match=message):
        quality.quality(settings(tmp_path), out, docs=None, log=lambda _: None, resume=resume)
    assert (out / quality.SUMMARY).read_bytes() == content
    assert sorted(p.name for p in out.iterdir()) == [quality.SUMMARY]


def test_the_cli_names_a_damaged_quality_json_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / quality.SUMMARY).write_text("[]")
    base = ["bench", "quality", "--model", str(tmp_path / "no-model"), "--no-docs", "--n", "1"]
    assert main([*base, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dragondiffusion: error: ") and err.count("\n") == 1
    assert "quality.json is damaged (a JSON list, not an object)" in err


def test_a_sound_quality_json_still_resumes_to_the_settings_check(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / quality.SUMMARY).write_text(json.dumps(saved_run(tmp_path)))
    with pytest.raises(InputError, match="pass --resume"):
        quality.quality(settings(tmp_path), out, docs=None, log=lambda _: None)
    with pytest.raises(InputError, match="other settings"):
        quality.quality(settings(tmp_path, seed=1), out, None, lambda _: None, resume=True)


def test_an_output_folder_that_cannot_be_made_is_refused_before_the_model_loads(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    message = r"cannot make '.*afile/sub' \('.*afile' is not a folder\); choose another --out"
    with pytest.raises(InputError, match=message):
        quality.quality(settings(tmp_path), afile / "sub", docs=None, log=lambda _: None)
    with pytest.raises(InputError, match=message):
        demo.demo(afile / "sub", model=str(tmp_path / "no-model"), log=lambda _: None)
    with pytest.raises(InputError, match=r"cannot make '.*afile/sub' \(.*\); choose another"):
        demo.make_folder(afile / "sub")
    assert afile.read_text() == "mine"
    if Path("/proc/self").is_dir():  # root may "write" in /proc by os.access, but cannot
        with pytest.raises(InputError, match=r"cannot make '/proc/qb' \(cannot write in '/proc'"):
            demo.demo("/proc/qb", model=str(tmp_path / "no-model"), log=lambda _: None)


def test_a_users_own_demo_json_does_not_make_the_folder_the_demos(tmp_path):
    proj = tmp_path / "proj"
    (proj / "move").mkdir(parents=True)
    files = {
        "demo.json": '{"my": "config"}',
        "index.html": "<p>mine</p>",
        "move/input.png": "my picture",
    }
    for name, text in files.items():
        (proj / name).write_text(text)
    for own in ('{"my": "config"}', "not json", '["dragondiffusion", "status"]'):
        (proj / "demo.json").write_text(own)
        with pytest.raises(InputError, match="already holds files that the demo did not write"):
            demo.demo(proj, model=str(tmp_path / "no-model"), log=lambda _: None)
    for name, text in list(files.items())[1:]:
        assert (proj / name).read_text() == text
    # A demo.json the demo wrote makes the folder the demo's.
    (proj / "demo.json").write_text(demo.summary([], "m", 0.0, "incomplete"))
    assert demo.prepare_output(proj) == proj


def test_a_docs_file_that_cannot_be_written_is_refused_before_the_run(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    message = r"cannot write '.*afile/x.md' \('.*afile' is not a folder\); give another markdown"
    with pytest.raises(InputError, match=message):
        check_sections(afile / "x.md", "quality:tiny")
    with pytest.raises(InputError, match=message):
        quality.quality(settings(tmp_path), tmp_path / "out", afile / "x.md", lambda _: None)
    assert not (tmp_path / "out").exists()
    if Path("/proc/self").is_dir():
        with pytest.raises(InputError, match=r"cannot write '/proc/x.md' \(cannot write in"):
            check_sections("/proc/x.md", "quality:tiny")


def test_set_refuses_a_repeated_value_or_weight():
    with pytest.raises(InputError, match="--set energy_scale: 1 given more than once"):
        quality.Settings(edits=("move",), sweep=(("energy_scale", (1.0, 2.0, 1.0)),))
    twice = (("energy_scale", (1.0,)), ("energy_scale", (2.0,)))
    with pytest.raises(InputError, match="--set energy_scale: given more than once"):
        quality.Settings(edits=("move",), sweep=twice)


def test_set_refuses_a_feature_timestep_beyond_the_models():
    scheduler = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))
    pipe = SimpleNamespace(scheduler=scheduler)
    sweep = (("feature_timestep", (0.0, 5000.0)),)
    chosen = quality.Settings(edits=("move",), steps=10, ablations=(), sweep=sweep)
    with pytest.raises(
        InputError,
        match="--set feature_timestep is 5000, beyond the model's 1000 training timesteps",
    ):
        chosen.check_model(pipe)
    at_most = (("feature_timestep", (1000.0,)),)
    quality.Settings(edits=("move",), steps=10, ablations=(), sweep=at_most).check_model(pipe)
    other = quality.Settings(edits=("move",), steps=10, ablations=(), sweep=(("k", (9e9,)),))
    other.check_model(pipe)  # only feature_timestep is a timestep


def test_a_lock_of_a_running_process_says_which_file_to_delete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / quality.LOCK).write_text(str(os.getppid()))  # alive: the process that ran pytest
    lock = str(out / quality.LOCK)
    taken = pytest.raises(InputError, match=rf"if no benchmark is running there, delete {lock}")
    with taken, quality.folder_lock(out):
        pass
    assert (out / quality.LOCK).read_text() == str(os.getppid())


def test_n_is_capped_so_drawing_the_scenes_is_never_hours_of_silence():
    with pytest.raises(InputError, match="--n must be 1 to 10000 scenes per edit, got 100000"):
        quality.Settings(n=100_000)
    assert quality.Settings(n=quality.MAX_SCENES).n == 10_000


EDIT_COSTS = {
    "--steps 1": "--steps must be at least 2, got 1",
    "--threads 0": "--threads must be at least 1, got 0",
    "--modes bogus": "--modes: bogus is not a choice",
    "--edits move,bogus": "--edits: bogus is not a choice",
    "--device bogus": "unknown device 'bogus'",
    "--out DOCS": "is a folder; give the markdown file",
    "--out AFILE/x.md": "is not a folder); give another markdown file",
}


EVALUATE = {
    "--threads -1": "--threads must be at least 1, got -1",
    "--threads 0": "--threads must be at least 1, got 0",
    "--scenes 0": "--scenes must be 1 to",
    "--scenes -1": "--scenes must be 1 to",
    "--scenes 1 --inversion-scenes 5": "--inversion-scenes must be 0 to --scenes (1)",
    "--out AFILE": "is not a folder; choose another --out",
}


SCRIPT_CASES = [
    *(("edit_costs", args, message) for args, message in EDIT_COSTS.items()),
    *(("evaluate_demo_model", args, message) for args, message in EVALUATE.items()),
]


@pytest.mark.parametrize("name,args,message", SCRIPT_CASES)
def test_scripts_refuse_bad_options_before_measuring(name, args, message, tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "afile").write_text("mine")
    argv = args.replace("DOCS", str(tmp_path / "docs")).replace("AFILE", str(tmp_path / "afile"))
    extra = ["--model", str(tmp_path / "no-model")] if name == "evaluate_demo_model" else []
    assert script(name).main([*argv.split(), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{name}: error: ") and err.count("\n") == 1
    assert message in err
    assert (tmp_path / "afile").read_text() == "mine"
