"""Shared fixtures: a tiny random SD-1.x bundle built from configs, offline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch

from dragondiffusion.testing import build_tiny_bundle


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def pipe(tiny_bundle):
    import dragondiffusion

    p = dragondiffusion.load(tiny_bundle, device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def embedded():
    """The embedded demo model on the CPU, loaded once per test module (slow checks)."""
    import dragondiffusion

    pipe = dragondiffusion.load(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def scene():
    """A 160×96 (landscape) image with a red square object and its mask."""
    rng = np.random.default_rng(0)
    img = np.zeros((96, 160, 3), np.uint8)
    img[..., 1] = np.linspace(60, 160, 160, dtype=np.uint8)[None, :]
    img[..., 2] = rng.integers(0, 40, (96, 160), dtype=np.uint8)
    img[30:60, 20:50] = [230, 20, 20]
    mask = np.zeros((96, 160), bool)
    mask[30:60, 20:50] = True
    return img, mask


@pytest.fixture(scope="session")
def inversion(pipe, scene):
    torch.manual_seed(0)
    return pipe.invert(scene[0], "a red square", num_inference_steps=10)
