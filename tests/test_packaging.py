"""A non-editable install carries the embedded model: package-data covers a saved bundle."""

import glob
import os
import shutil
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def package_data() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["setuptools"]["package-data"]["dragondiffusion"]


def shipped(package_dir: Path, patterns: list[str]) -> set[str]:
    """Files setuptools' build_py takes as package data: each pattern globbed recursively under
    the package folder, files only (as `build_py.find_data_files` does)."""
    found = set()
    for pattern in patterns:
        for match in glob.glob(os.path.join(package_dir, pattern), recursive=True):
            if os.path.isfile(match):
                found.add(Path(match).relative_to(package_dir).as_posix())
    return found


def test_package_data_ships_every_file_of_a_saved_bundle(tmp_path, tiny_bundle):
    package = tmp_path / "dragondiffusion"
    shutil.copytree(tiny_bundle, package / "demo_model")
    # What the training script's export adds to save_pretrained's files.
    (package / "demo_model" / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (package / "demo_model" / "tokenizer" / "vocab.json").write_text("{}")
    (package / "py.typed").touch()
    (package / "demo_model" / "notes.md").write_text("not shipped")
    files = {p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()}
    wanted = files - {"demo_model/notes.md"}
    assert {f.rsplit(".", 1)[-1] for f in wanted} >= {"json", "txt", "safetensors"}
    assert "demo_model/unet/diffusion_pytorch_model.safetensors" in wanted
    assert "demo_model/model_index.json" in wanted
    assert shipped(package, package_data()) == wanted
