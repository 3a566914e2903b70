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
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

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


def build_tiny_pipeline(
    seed: int = 0, sample_size: int = 16, latent_channels: int = 4
) -> StableDiffusionPipeline:
    """A random SD-1.x-structured pipeline: 8x VAE, `sample_size`² latents with
    `latent_channels` channels (SD 1.x: 4), 32-dim text encoder."""
    import tempfile

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
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
        latent_channels=latent_channels,
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


def build_tiny_bundle(
    path: str | Path, seed: int = 0, sample_size: int = 16, latent_channels: int = 4
) -> Path:
    """Save a tiny random SD-1.x bundle to `path` (diffusers layout, safetensors) and return it."""
    path = Path(path)
    pipe = build_tiny_pipeline(seed, sample_size, latent_channels)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_image_encoder(seed: int = 0) -> CLIPVisionModelWithProjection:
    """A random CLIP image encoder at toy width: 32×32 input, 8×8 patches (17 tokens), width 32."""
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=16,
        )
    )


def tiny_ip_adapter(
    unet: UNet2DConditionModel,
    encoder: CLIPVisionModelWithProjection,
    plus: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random IP-Adapter weights for `unet` and `encoder` in the original checkpoint layout.

    `image_proj.*`: with `plus`, IP-Adapter Plus's resampler (the layout of DragonDiffusion's
    ip_sd15_64.bin: 4 blocks, here 1 head of 64 and 4 queries) over the encoder's penultimate
    hidden states; else plain IP-Adapter's projection of the image embedding to 4 tokens.
    `ip_adapter.{k}.to_k_ip/to_v_ip.weight`: one pair per cross-attention layer, k being its index
    among `unet.attn_processors` (1, 3, 5, … for SD's attn1/attn2 pairs).
    """
    gen = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * shape[-1] ** -0.5

    def norm(prefix: str, width: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": torch.ones(width), f"{prefix}.bias": torch.zeros(width)}

    cross = unet.config.cross_attention_dim
    if plus:
        width, dim, inner = encoder.config.hidden_size, 32, 64  # diffusers reads heads = rows / 64
        proj = {
            "latents": w(1, 4, dim),
            "proj_in.weight": w(dim, width),
            "proj_in.bias": torch.zeros(dim),
            "proj_out.weight": w(cross, dim),
            "proj_out.bias": torch.zeros(cross),
            **norm("norm_out", cross),
        }
        for i in range(4):
            attn, ff = f"layers.{i}.0", f"layers.{i}.1"
            proj |= {
                **norm(f"{attn}.norm1", dim),
                **norm(f"{attn}.norm2", dim),
                f"{attn}.to_q.weight": w(inner, dim),
                f"{attn}.to_kv.weight": w(2 * inner, dim),
                f"{attn}.to_out.weight": w(dim, inner),
                **norm(f"{ff}.0", dim),
                f"{ff}.1.weight": w(4 * dim, dim),
                f"{ff}.3.weight": w(dim, 4 * dim),
            }
    else:
        embed = encoder.config.projection_dim
        proj = {"proj.weight": w(4 * cross, embed), "proj.bias": torch.zeros(4 * cross)}
        proj |= norm("norm", cross)
    state = {f"image_proj.{k}": v for k, v in proj.items()}
    modules = dict(unet.named_modules())
    for k, name in enumerate(unet.attn_processors):
        attn = modules[name.removesuffix(".processor")]
        if attn.is_cross_attention:
            state[f"ip_adapter.{k}.to_k_ip.weight"] = w(attn.to_k.out_features, cross)
            state[f"ip_adapter.{k}.to_v_ip.weight"] = w(attn.to_v.out_features, cross)
    return state


def write_tiny_image_prompt(
    folder: str | Path, unet: UNet2DConditionModel, plus: bool = True, seed: int = 0
) -> Path:
    """Write a tiny `image_encoder/` and a matching `ip-adapter.safetensors` for `unet` into
    `folder` (h94/IP-Adapter's layout); return the checkpoint's path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    encoder = build_tiny_image_encoder(seed)
    encoder.save_pretrained(folder / "image_encoder")
    path = folder / "ip-adapter.safetensors"
    save_file(tiny_ip_adapter(unet, encoder, plus, seed), path)
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
