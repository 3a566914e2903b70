"""A non-editable install carries the embedded model: package-data covers a saved bundle."""

import glob
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dragondiffusion import models

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


def test_the_embedded_bundle_is_shipped_whole_and_within_its_size_budget():
    package = ROOT / "src" / "dragondiffusion"
    bundle = package / "demo_model"
    files = {p.relative_to(package).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert "demo_model/model_index.json" in files
    assert files == {f for f in shipped(package, package_data()) if f.startswith("demo_model/")}
    assert sum((package / f).stat().st_size for f in files) <= models.EMBEDDED_MAX_BYTES


def test_the_embedded_model_loads_by_default_and_with_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    import dragondiffusion

    pipe = dragondiffusion.load(device="cpu")
    assert pipe.model_name == models.EMBEDDED_NAME
    # The bundle's own edit defaults apply (no CFG on the small model).
    assert pipe.edit_defaults.weights("move").guidance_scale == 1.0
    assert pipe.unet.dtype == torch.float32  # fp16 on disk, float32 on the CPU
    plain = StableDiffusionPipeline.from_pretrained(models.EMBEDDED_MODEL, safety_checker=None)
    assert plain.unet.config.cross_attention_dim == pipe.unet.config.cross_attention_dim
    with safe_open(
        models.EMBEDDED_MODEL / "unet" / "diffusion_pytorch_model.safetensors", "pt"
    ) as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118 (fp16)


def test_the_embedded_bundles_edit_defaults_are_those_its_training_run_exports():
    """`train_demo_model.py` copies its run folder's dragondiffusion.json into every bundle it
    exports: the two must agree, or the next export silently changes the model's defaults."""
    from dragondiffusion.edit_defaults import EditDefaults

    run = ROOT / "training" / "demo-model"
    shipped, exported = EditDefaults.read(models.EMBEDDED_MODEL), EditDefaults.read(run)
    assert shipped.source != "upstream" and exported.source != "upstream"
    for name in ("overrides", "feature_blocks", "steps"):
        assert getattr(shipped, name) == getattr(exported, name), name
    assert shipped.steps == {"appearance": 20, "drag": 20, "paste": 20}
