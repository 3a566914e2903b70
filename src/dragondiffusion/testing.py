"""Tiny random-initialised SD-1.x-format bundles for tests and smoke runs.

The bundle has Stable Diffusion 1.x's structure (3 cross-attention down blocks + 1 plain, decoder
blocks 1-3 with self-attention, an 8x VAE, a CLIP text encoder) at toy widths, so every code path
that a real SD 1.5 model takes is exercised without downloading anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def byte_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2, CLIP) uses to stand for bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def write_char_tokenizer(path: Path) -> CLIPTokenizer:
    """Write a CLIP BPE tokenizer with a character-level vocabulary (no merges) and load it."""
    path.mkdir(parents=True, exist_ok=True)
    chars = byte_alphabet()
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77)


def build_tiny_pipeline(seed: int = 0, sample_size: int = 16) -> StableDiffusionPipeline:
    """A random SD-1.x-structured pipeline: 8x VAE, `sample_size`² latents, 32-dim text encoder."""
    import tempfile

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=4,
        cross_attention_dim=32,
    )
    with torch.no_grad():
        # A trained UNet's noise prediction changes slowly along a DDIM path; a random one does
        # not, and DDIM inversion then cannot round-trip. A damped output layer restores that.
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=sample_size * 8,
        # Random VAE posteriors are small; this gives latents of about unit std, like SD's 0.18215.
        scaling_factor=4.0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_char_tokenizer(Path(tmp))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_bundle(path: str | Path, seed: int = 0, sample_size: int = 16) -> Path:
    """Save a tiny random SD-1.x bundle to `path` (diffusers layout, safetensors) and return it."""
    path = Path(path)
    build_tiny_pipeline(seed, sample_size).save_pretrained(path, safe_serialization=True)
    return path


def write_example(folder: str | Path) -> Path:
    """Write a tiny random bundle plus an example image and object mask into `folder`.

    A smoke run of the whole install (`python -m dragondiffusion.testing DIR`); the random model
    produces noise-like pictures, so this checks the machinery, not the quality.
    """
    import numpy as np
    import PIL.Image

    folder = Path(folder)
    build_tiny_bundle(folder / "model")
    yy, xx = np.mgrid[0:128, 0:128]
    img = np.stack([xx, yy, 255 - xx], axis=-1).astype(np.uint8)
    mask = (abs(xx - 40) < 16) & (abs(yy - 64) < 16)
    img[mask] = [230, 30, 30]
    PIL.Image.fromarray(img).save(folder / "image.png")
    PIL.Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "mask.png")
    return folder


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m dragondiffusion.testing FOLDER")
    print(f"wrote {write_example(sys.argv[1])}/{{model,image.png,mask.png}}")
