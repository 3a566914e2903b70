"""Half precision end to end (the default on CUDA), run on the CPU with the tiny bundle."""

import numpy as np
import pytest
import torch

import dragondiffusion


@pytest.fixture(scope="module")
def half_pipe(tiny_bundle):
    p = dragondiffusion.load(tiny_bundle, device="cpu", dtype="float16")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("edit", ["move", "drag", "paste", "appearance"])
def test_float16_edits_give_finite_latents(half_pipe, scene, edit):
    """Warps leave zero feature vectors at borders; in fp16 their cosine used to be NaN."""
    img, mask = scene
    ref, ref_mask = np.ascontiguousarray(img[::-1]), np.ascontiguousarray(mask[::-1])
    kw = {"num_inference_steps": 4, "mode": "dragon"}
    if edit == "move":
        result = half_pipe.move(img, mask, (35, 45), (100, 45), **kw)
    elif edit == "drag":
        editable = np.zeros_like(mask)
        editable[10:80, 10:90] = True
        result = half_pipe.drag(img, editable, [((35, 45), (60, 45))], **kw)
    elif edit == "paste":
        result = half_pipe.paste(img, ref, ref_mask, offset=(60, 0), **kw)
    else:
        result = half_pipe.appearance(img, mask, ref, ref_mask, **kw)
    assert result.latent.dtype == torch.float16
    assert torch.isfinite(result.latent).all()
    assert result.record["dtype"] == "float16"
