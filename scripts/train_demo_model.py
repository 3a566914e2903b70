"""Train the embedded demo model: a small Stable-Diffusion-1.x-format bundle for CPU use.

The model has SD 1.x's structure at small widths (8× VAE, a UNet with 3 cross-attention down
blocks + 1 plain and 1 plain up block + 3 cross-attention ones, a small CLIP text encoder, SD 1.5's
noise schedule) and works on 128×128 images (16×16 latents). Its latents have 16 channels, not SD
1.x's 4: at this size a 4-channel VAE stalled near 26 dB, and the UNet's cost barely depends on
the channel count (diffusers' pipelines read it from the UNet's config). It learns procedural
scenes (`dragondiffusion.scenes`) with their captions, plus random crops of the colour photos in
scikit-image's data module captioned "a photo".

Training runs in phases, each resumable and each stopping cleanly (checkpoint written) after
--minutes, after --steps, or on SIGINT/SIGTERM:

  vae      the autoencoder (L1 + image-gradient L1 + SD's small KL term)
  decoder  the VAE's decoder alone, encoder frozen (as SD's fine-tuned VAE decoders were); it can
           run beside the unet phase, since the latents the UNet learns do not change
  unet     UNet and text encoder together, on the frozen VAE's latents; 10 % of captions empty
  export   the bundle, via StableDiffusionPipeline.save_pretrained (fp16 safetensors)

On a 2-core machine, in the background, with one thread so the other core stays free:

  nohup python scripts/train_demo_model.py --phase vae --resume --minutes 120 --threads 1 \\
      >> training/demo-model/train.out 2>&1 &

Repeat with --resume until the logged PSNR stops improving, then the same for --phase unet,
then --phase export. On two cores the VAE and the UNet can train side by side (one thread each):
the UNet learns the latents of the VAE checkpoint as it was when the unet phase started. When
the vae phase has moved the encoder on since, the unet phase and export refuse until the UNet
is rebased, `--phase unet --resume --rebase` (same weights; the latents' scale is measured again
and the latent cache re-encoded), which adapts it far faster than training anew. Alternatively
`--phase decoder` fine-tunes the decoder alone (encoder frozen, as SD's fine-tuned VAE decoders)
beside the UNet; while its checkpoint exists the vae phase refuses (it would pair that decoder
with a changed encoder).

Where a GPU is at hand, `--device cuda` trains there (bf16 autocast; `--batch` and `--cache` set
this run's batch and latent-cache size, `--workers` render the cache in parallel; run.json records
them). scripts/device_train_unet.sh does this in one call of a lent GPU machine.

Everything lands in --out (default training/demo-model): config.json (the settings), run.json
(every run with its duration and speed), {phase}_log.jsonl (losses), checkpoints/{phase}.safetensors
(the one current checkpoint of each phase) and bundle/. The run folder is committed between
sessions (without bundle/ and train.out, see .gitignore), so a later session on a new machine
resumes where the last one stopped. `--smoke` runs every phase for a few steps at batch 2 into a
fresh folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dragondiffusion import scenes
from dragondiffusion.edit_defaults import DEFAULTS_FILE, EditDefaults
from dragondiffusion.testing import SD15_SCHEDULER, byte_alphabet

PHOTO_CAPTION = "a photo"
TRAIN_PHOTOS = (
    "astronaut",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "immunohistochemistry",
    "retina",
    "hubble_deep_field",
)
"""scikit-image colour photos that load offline and are used for training."""
HELD_OUT_PHOTOS = ("chelsea", "coffee")
"""scikit-image colour photos kept out of training, for evaluation and tests."""
TRAIN_SEED_FLOOR = 2**32
"""Training scenes use seeds at or above this; smaller seeds are never seen in training."""
PHASES = ("vae", "decoder", "unet", "export")
STREAMS = ("vae", "unet", "scaling", "decoder", "cache")
"""Independent random data streams: one per training phase, one for the latent scale."""
MAX_BUNDLE_BYTES = 30_000_000
IMAGE_SIZE = 128
"""Image side in pixels; the 8× VAE makes 16×16 latents."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; saved to config.json and reused on resume."""

    seed: int = 0
    vae_channels: tuple[int, ...] = (16, 32, 64, 128)
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 8
    latent_channels: int = 16
    """Channels of the VAE latent (SD 1.x: 4); the UNet's in/out channels follow it."""
    vae_crop: int = 64
    """Side of the random crops the VAE trains on: smaller crops of the same images cost less
    per step, and the fully convolutional VAE then runs at any size."""
    unet_channels: tuple[int, ...] = (64, 128, 128, 128)
    unet_layers_per_block: int = 1
    unet_norm_groups: int = 32
    unet_attention_head_dim: int = 8
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 512
    max_tokens: int = 77
    vae_batch: int = 16
    unet_batch: int = 32
    vae_lr: float = 5e-4
    unet_lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    kl_weight: float = 1e-6
    """SD's VAE KL weight, relative to a per-pixel reconstruction loss summed over the image."""
    gradient_weight: float = 1.0
    """Weight of the L1 loss on horizontal/vertical pixel differences, which keeps edges sharp."""
    vae_photo_share: float = 0.25
    unet_photo_share: float = 0.15
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = None
    """Min-SNR-γ loss weighting (Hang et al., 2023): each sample's noise MSE weighted by
    min(SNR(t), γ) / SNR(t), which takes weight off the nearly noise-free timesteps; None: plain
    MSE (SD's). The held-out loss is always plain MSE."""
    unet_cache: int = 16000
    """Training images (scenes and photo crops) whose VAE posteriors the unet phase encodes once
    and then samples batches from; 0 renders and encodes every batch afresh."""
    ema_decay: float = 0.999
    scaling_samples: int = 64
    """Training images whose latent standard deviation sets the VAE's scaling_factor."""
    eval_scenes: int = 16
    eval_every: int = 200
    log_every: int = 10
    checkpoint_minutes: float = 10.0

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        fields = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


SMOKE = {
    "vae_batch": 2,
    "unet_batch": 2,
    "scaling_samples": 4,
    "unet_cache": 8,
    "eval_scenes": 2,
    "eval_every": 2,
    "log_every": 1,
}
"""Overrides for --smoke: the real architecture at batch 2."""


# ---------------------------------------------------------------------------------------------
# Tokenizer: CLIP byte-level BPE whose merges spell every caption word as one token.


def caption_words() -> list[str]:
    """Every word of the training captions."""
    return sorted(set(scenes.vocabulary()) | set(PHOTO_CAPTION.split()))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges, in rank order, that turn each word (+ "</w>") into a single symbol.

    Classic BPE training run to completion: merge the most frequent adjacent pair (ties broken
    alphabetically) until no word has two symbols left. Encoding applies merges by rank, which
    replays this run, so each word encodes to one token.
    """
    spelled = [[*w[:-1], w[-1] + "</w>"] for w in words]
    merges = []
    while True:
        pairs = Counter(p for s in spelled for p in itertools.pairwise(s))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        spelled = [_merge(s, best) for s in spelled]


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def write_tokenizer_files(folder: Path) -> None:
    """Write vocab.json and merges.txt of the caption tokenizer into `folder`.

    The vocabulary holds CLIP's 512 byte symbols (so any text encodes without unknown tokens),
    every merge result, and the start/end tokens last, as in CLIP.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chars = byte_alphabet()
    merges = learn_merges(caption_words())
    tokens = [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in merges)]
    tokens = [*dict.fromkeys(tokens), "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")


def build_tokenizer(max_tokens: int = 77) -> CLIPTokenizer:
    """The caption tokenizer, loaded by transformers from `write_tokenizer_files`' files."""
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_tokens)


# ---------------------------------------------------------------------------------------------
# Models.


def build_components(config: TrainConfig) -> dict[str, Any]:
    """Freshly initialised vae, unet, text_encoder, tokenizer and scheduler (DDIM, SD 1.5)."""
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(config.max_tokens)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
        block_out_channels=config.vae_channels,
        layers_per_block=config.vae_layers_per_block,
        norm_num_groups=config.vae_norm_groups,
        latent_channels=config.latent_channels,
        sample_size=IMAGE_SIZE,
    )
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=config.unet_channels,
        layers_per_block=config.unet_layers_per_block,
        norm_num_groups=config.unet_norm_groups,
        attention_head_dim=config.unet_attention_head_dim,
        cross_attention_dim=config.text_hidden,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden,
            intermediate_size=config.text_intermediate,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return {
        "vae": vae,
        "unet": unet,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler(**SD15_SCHEDULER),
    }


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# Data. Every batch is a pure function of (seed, phase, step), so resumed runs see the same data.


PHOTO_ARCHIVE = "DRAGONDIFFUSION_PHOTO_ARCHIVE"
"""Environment variable naming an .npz of the photos by name (see --save-photos), for machines
whose scikit-image lacks them."""


def load_photos(names: tuple[str, ...]) -> list[Image.Image]:
    """scikit-image data photos as RGB PIL images (motorcycle_left/right: the stereo pair)."""
    if os.environ.get(PHOTO_ARCHIVE):
        with np.load(os.environ[PHOTO_ARCHIVE]) as archive:
            return [Image.fromarray(archive[n]).convert("RGB") for n in names]
    import skimage.data

    left, right, _ = skimage.data.stereo_motorcycle()
    special = {"motorcycle_left": left, "motorcycle_right": right}
    arrays = [special[n] if n in special else getattr(skimage.data, n)() for n in names]
    return [Image.fromarray(a).convert("RGB") for a in arrays]


def photo_crop(photo: Image.Image, rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float RGB: a random square crop (25-100 % of the short side), resized,
    maybe mirrored, with brightness, contrast and saturation jitter."""
    w, h = photo.size
    side = rng.uniform(0.25, 1.0) * min(w, h)
    x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    box = (x0, y0, x0 + side, y0 + side)
    image = np.asarray(photo.resize((size, size), Image.Resampling.BICUBIC, box=box), np.float32)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    grey = image.mean(axis=-1, keepdims=True)
    image = grey + (image - grey) * rng.uniform(0.7, 1.3)
    image = (image - image.mean()) * rng.uniform(0.8, 1.2) + image.mean()
    return np.clip(image * rng.uniform(0.8, 1.2), 0.0, 255.0)


def centre_crop(photo: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) float RGB of the largest centred square, resized."""
    w, h = photo.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return np.asarray(photo.resize((size, size), Image.Resampling.BICUBIC, box=box), np.float32)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """(B, 3, H, W) float32 in [-1, 1] from a list of (H, W, 3) RGB arrays in [0, 255]."""
    batch = torch.from_numpy(np.stack(images).astype(np.float32))
    return batch.permute(0, 3, 1, 2) / 127.5 - 1.0


def batch_rng(config: TrainConfig, stream: str, step: int) -> np.random.Generator:
    """The generator for one step of a data stream (a name in STREAMS)."""
    return np.random.default_rng([config.seed, STREAMS.index(stream), step])


def training_batch(
    rng: np.random.Generator, size: int, photo_share: float, photos: list[Image.Image]
) -> tuple[torch.Tensor, list[str]]:
    """`size` images (B, 3, H, W) in [-1, 1] with captions: random scenes, and photo crops for
    a `photo_share` of them."""
    images, captions = training_images(rng, size, photo_share, photos)
    return to_tensor(list(images)), captions


def training_images(
    rng: np.random.Generator, size: int, photo_share: float, photos: list[Image.Image]
) -> tuple[np.ndarray, list[str]]:
    """training_batch's images as (B, H, W, 3) uint8 RGB (numpy only: safe in worker processes)."""
    images, captions = [], []
    for _ in range(size):
        if rng.random() < photo_share:
            crop = photo_crop(photos[rng.integers(len(photos))], rng, IMAGE_SIZE)
            images.append(np.round(crop).astype(np.uint8))
            captions.append(PHOTO_CAPTION)
        else:
            seed = int(rng.integers(TRAIN_SEED_FLOOR, 2**63))
            scene = scenes.random_scene(seed, size=IMAGE_SIZE)
            images.append(scenes.render(scene)[0])
            captions.append(scenes.caption(scene))
    return np.stack(images), captions


def random_crops(images: torch.Tensor, side: int, rng: np.random.Generator) -> torch.Tensor:
    """A `side`-pixel square from a random place of each image (B, 3, H, W)."""
    height, width = images.shape[-2:]
    if side >= min(height, width):
        return images
    crops = []
    for image in images:
        top, left = rng.integers(height - side + 1), rng.integers(width - side + 1)
        crops.append(image[:, top : top + side, left : left + side])
    return torch.stack(crops)


def eval_batch(config: TrainConfig) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Held-out scenes (seeds 0, 1, ...) with captions, and the held-out photos."""
    shown = [scenes.random_scene(seed, size=IMAGE_SIZE) for seed in range(config.eval_scenes)]
    images = to_tensor([scenes.render(s)[0] for s in shown])
    photos = [centre_crop(p, IMAGE_SIZE) for p in load_photos(HELD_OUT_PHOTOS)]
    return images, [scenes.caption(s) for s in shown], to_tensor(photos)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two image batches in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b) ** 2).mean().item() / 4.0
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


# ---------------------------------------------------------------------------------------------
# Losses.


def vae_loss(
    vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator, config: TrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction L1 + L1 of pixel differences + KL, as in SD's VAE minus LPIPS and GAN."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    l1 = (recon - images).abs().mean()
    gradient = sum((recon.diff(dim=d) - images.diff(dim=d)).abs().mean() for d in (-1, -2)) / 2.0
    kl = posterior.kl().mean() / images[0].numel()
    loss = l1 + config.gradient_weight * gradient + config.kl_weight * kl
    return loss, {"l1": l1.item(), "kl": kl.item(), "psnr": psnr(recon.detach(), images)}


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """(B, tokens) token ids, padded to the tokenizer's length as the pipeline pads them."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@dataclass(frozen=True)
class Denoiser:
    """What the UNet phase trains (unet, text_encoder) and what it needs to do so."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    """Only its noise schedule is used, to noise latents (SD 1.5's, as in the bundle)."""

    def encode(self, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(B, tokens, hidden) caption embeddings the UNet attends to, for token ids."""
        return self.text_encoder(ids.to(device))[0]


def denoising_loss(
    model: Denoiser,
    latents: torch.Tensor,
    context: torch.Tensor,
    generator: torch.Generator,
    timesteps: torch.Tensor | None = None,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """SD's objective: MSE between the noise added at random timesteps and the UNet's estimate
    (per sample weighted by min(SNR, γ) / SNR when `min_snr_gamma` is γ).

    context: the captions' embeddings (`Denoiser.encode`). The noise and timesteps are drawn on
    the generator's device and moved to the latents'."""
    where = {"generator": generator, "device": generator.device}
    if timesteps is None:
        steps = model.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(latents),), **where)
    noise = torch.randn(latents.shape, **where).to(latents.device)
    timesteps = timesteps.to(latents.device)
    noisy = model.scheduler.add_noise(latents, noise, timesteps)
    prediction = model.unet(noisy, timesteps, context.to(latents.device)).sample
    if min_snr_gamma is None:
        return torch.nn.functional.mse_loss(prediction.float(), noise)
    errors = ((prediction.float() - noise) ** 2).flatten(1).mean(dim=1)
    return (snr_weights(model.scheduler, timesteps, min_snr_gamma) * errors).mean()


def snr_weights(scheduler: DDIMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR(t), γ) / SNR(t) with SNR(t) = ᾱ_t / (1 − ᾱ_t): 1 where the sample is noisier than
    SNR γ, smaller for the nearly clean timesteps."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1.0 - alphas)
    return snr.clamp(max=gamma) / snr


def encode_latents(
    vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator, scale: float
) -> torch.Tensor:
    """(B, 4, H/8, W/8) scaled latents sampled from the frozen VAE's posterior."""
    with torch.no_grad():
        return vae.encode(images).latent_dist.sample(generator) * scale


@dataclass(frozen=True)
class LatentCache:
    """VAE posteriors (mean, std; fp16, unscaled) of a fixed set of training images, with their
    captions' token ids, and optionally the captions' embeddings (while the text encoder is
    frozen, computed once); all on the training device."""

    mean: torch.Tensor
    std: torch.Tensor
    ids: torch.Tensor
    contexts: torch.Tensor | None = None

    def batch(
        self, rng: np.random.Generator, size: int, generator: torch.Generator, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`size` random entries: latents sampled from their posteriors and scaled, and the
        captions: their embeddings where the cache holds them, else their token ids."""
        index = torch.from_numpy(rng.integers(len(self.ids), size=size)).to(self.mean.device)
        mean, std = self.mean[index].float(), self.std[index].float()
        noise = torch.randn(mean.shape, generator=generator, device=generator.device)
        captions = self.ids if self.contexts is None else self.contexts
        return (mean + std * noise.to(mean.device)) * scale, captions[index]

    def with_contexts(self, model: Denoiser, dtype: torch.dtype, chunk: int = 1024) -> LatentCache:
        """This cache with every caption's embedding by `model`'s (frozen) text encoder."""
        with torch.no_grad():
            parts = [
                model.encode(self.ids[i : i + chunk], self.ids.device).to(dtype)
                for i in range(0, len(self.ids), chunk)
            ]
        return dataclasses.replace(self, contexts=torch.cat(parts))


def render_chunk(job: tuple[TrainConfig, int, int]) -> tuple[np.ndarray, list[str]]:
    """The cache's images [first, first + size) (a pure function of the config: any worker
    process renders the same ones). Photos come from the process's _WORKER_PHOTOS."""
    config, first, size = job
    rng = batch_rng(config, "cache", first)
    return training_images(rng, size, config.unet_photo_share, _WORKER_PHOTOS)


_WORKER_PHOTOS: list[Image.Image] = []
"""The training photos, set before the cache's worker processes fork."""


def _worker_signals() -> None:
    """In each render worker: SIGTERM back to its default, so that `Pool.terminate` ends the
    worker even when the parent has installed a StopRule (fork copies its handler, which only
    sets a flag: the pool's join then waited forever); SIGINT ignored (the parent handles it)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def render_pool(workers: int) -> Any:
    """A pool of `workers` forked render processes (None for one: render in this process)."""
    if workers <= 1:
        return None
    return mp.get_context("fork").Pool(workers, initializer=_worker_signals)


def latent_cache(
    config: TrainConfig,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    photos: list[Image.Image],
    out: Path,
    encoder: str,
    workers: int = 1,
) -> LatentCache:
    """The run's cache (out/cache/unet-latents.safetensors), encoded and written if absent, of
    another size, or made by another encoder (`encoder`: its `encoder_fingerprint`).

    It holds `config.unet_cache` images of the unet data stream's kind (scenes and photo crops)
    and depends only on the config and the frozen encoder, so it is not committed: a new machine
    rebuilds it (about 30 ms per image on one core; `workers` processes render in parallel, with
    the same result). It lives on the VAE's device."""
    path = out / "cache" / "unet-latents.safetensors"
    cached = None
    if path.exists():
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata()
        captions = json.loads(metadata["captions"])
        if metadata.get("encoder") == encoder and len(captions) == config.unet_cache:
            cached = load_file(path), captions
        else:
            print("cache: another encoder or size; encoding it again", flush=True)
    if cached is None:
        cached = encode_cache(config, vae, photos, workers)
        tensors, captions = cached
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        metadata = {"captions": json.dumps(captions), "encoder": encoder}
        save_file({k: v.cpu() for k, v in tensors.items()}, partial, metadata=metadata)
        partial.replace(path)
    tensors, captions = cached
    device = vae.device
    ids = tokenize(tokenizer, captions)
    return LatentCache(tensors["mean"].to(device), tensors["std"].to(device), ids.to(device))


def encode_cache(
    config: TrainConfig, vae: AutoencoderKL, photos: list[Image.Image], workers: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The cache's posteriors {"mean", "std"} (fp16, on the VAE's device) and captions."""
    means, stds, captions = [], [], []
    chunk, started = 64, time.perf_counter()
    jobs = [
        (config, f, min(chunk, config.unet_cache - f)) for f in range(0, config.unet_cache, chunk)
    ]
    _WORKER_PHOTOS[:] = photos
    pool = render_pool(workers)
    try:
        chunks = pool.imap(render_chunk, jobs) if pool else map(render_chunk, jobs)
        for n, (images, texts) in enumerate(chunks):
            with torch.no_grad():
                posterior = vae.encode(to_tensor(list(images)).to(vae.device)).latent_dist
            means.append(posterior.mean.half())
            stds.append(posterior.std.half())
            captions += texts
            if n % 20 == 0 or n == len(jobs) - 1:
                seconds = time.perf_counter() - started
                print(
                    f"cache: {len(captions)}/{config.unet_cache} images, {seconds:.0f} s",
                    flush=True,
                )
    finally:
        if pool:
            pool.terminate()
    return {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}, captions


def drop_captions(
    ids: torch.Tensor, empty: torch.Tensor, rng: np.random.Generator, rate: float
) -> torch.Tensor:
    """Captions (token ids (B, tokens) or embeddings (B, tokens, hidden)) with each replaced by
    the empty caption's (`empty`, one row) with probability `rate` (for classifier-free
    guidance)."""
    dropped = torch.from_numpy(rng.random(len(ids)) < rate).to(ids.device)
    return torch.where(dropped.view(-1, *[1] * empty.dim()), empty.to(ids.device), ids)


# ---------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file per phase holding fp16 weights (and EMA), bf16 Adam moments
# (fp16 would flush small second moments to zero) and the counters as metadata. It is written
# next to the old one and renamed over it, so a crash never leaves a broken checkpoint.


def checkpoint_path(out: Path, phase: str) -> Path:
    return out / "checkpoints" / f"{phase}.safetensors"


def to_float16(t: torch.Tensor) -> torch.Tensor:
    """Floating tensors as fp16; integer buffers (e.g. position ids) unchanged."""
    return t.half() if t.is_floating_point() else t


def to_float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def save_checkpoint(
    path: Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: list[torch.Tensor] | None,
    metadata: dict[str, Any],
) -> None:
    names = [n for n, _ in module.named_parameters()]
    tensors = {f"model.{k}": to_float16(v).cpu() for k, v in module.state_dict().items()}
    if ema is not None:
        tensors |= {f"ema.{n}": e.half().cpu() for n, e in zip(names, ema, strict=True)}
    adam_step = 0
    for name, param in zip(names, module.parameters(), strict=True):
        state = optimizer.state.get(param)
        if state:
            tensors[f"adam_avg.{name}"] = state["exp_avg"].bfloat16().cpu()
            tensors[f"adam_sq.{name}"] = state["exp_avg_sq"].bfloat16().cpu()
            adam_step = max(adam_step, int(state["step"]))
    write_checkpoint(path, tensors, {**metadata, "adam_step": adam_step})


def write_checkpoint(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]
) -> None:
    """Write tensors + JSON-encoded metadata next to `path`, then rename over it (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    raw = {k: json.dumps(v) for k, v in metadata.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata=raw)
    os.replace(partial, path)


def read_metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as f:
        raw = f.metadata()
    return {k: json.loads(v) for k, v in raw.items()}


def load_checkpoint(
    path: Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ema: list[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Restore what save_checkpoint wrote; return its metadata."""
    tensors = load_file(str(path))
    module.load_state_dict({k[6:]: to_float32(v) for k, v in tensors.items() if k[:6] == "model."})
    metadata = read_metadata(path)
    names = [n for n, _ in module.named_parameters()]
    if ema is not None:
        for name, e in zip(names, ema, strict=True):
            e.copy_(tensors[f"ema.{name}"].float())
    if optimizer is not None:
        for name, param in zip(names, module.parameters(), strict=True):
            if f"adam_avg.{name}" in tensors:
                optimizer.state[param] = {
                    "step": torch.tensor(float(metadata["adam_step"])),
                    "exp_avg": tensors[f"adam_avg.{name}"].to(param.device, torch.float32),
                    "exp_avg_sq": tensors[f"adam_sq.{name}"].to(param.device, torch.float32),
                }
    return metadata


def compact_checkpoint(path: Path) -> int:
    """Rewrite a checkpoint for committing: fp16 weights (and EMA) only, no Adam moments.

    A resumed run then starts its Adam moments afresh (load_checkpoint skips missing ones); the
    weights, EMA, step count and metadata carry over. Returns the new size in bytes.
    """
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("adam_")}
    write_checkpoint(path, tensors, {**read_metadata(path), "adam_step": 0})
    return path.stat().st_size


def ema_weights(path: Path) -> dict[str, torch.Tensor]:
    """The EMA parameters (and the plain buffers) of the UNet-phase module in a checkpoint."""
    tensors = load_file(str(path))
    weights = {k[6:]: v for k, v in tensors.items() if k[:6] == "model."}
    weights |= {k[4:]: v for k, v in tensors.items() if k[:4] == "ema."}
    return weights


# ---------------------------------------------------------------------------------------------
# The training loop, shared by both phases.


@dataclass
class Phase:
    """What differs between phases: the trained module, its loss, and extra checkpoint data.

    step_loss(step) returns the loss of the batch for `step` and metrics to log.
    evaluate() returns held-out metrics.
    """

    name: str
    module: torch.nn.Module
    lr: float
    step_loss: Callable[[int], tuple[torch.Tensor, dict[str, float]]]
    evaluate: Callable[[], dict[str, float]]
    use_ema: bool
    metadata: dict[str, Any]


@dataclass
class StopRule:
    """When a run ends: after `minutes`, at `max_steps` total steps, or on a signal."""

    minutes: float | None
    max_steps: int | None
    signalled: bool = False

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        print(f"signal {signum}: stopping after this step", flush=True)
        self.signalled = True

    def done(self, step: int, seconds: float, seconds_per_step: float) -> bool:
        if self.signalled or (self.max_steps is not None and step >= self.max_steps):
            return True
        return self.minutes is not None and seconds + seconds_per_step > 60.0 * self.minutes


@dataclass(frozen=True)
class Machine:
    """Where a run trains and what it may change for this machine alone (not in config.json):
    a larger batch and latent cache suit an accelerator; run.json records them."""

    device: str = "cpu"
    workers: int = 1
    """Processes that render the latent cache's images."""
    batch: int | None = None
    """Replaces the phase's batch size (vae_batch or unet_batch) for this run."""
    cache: int | None = None
    """Replaces unet_cache for this run."""
    checkpoint_minutes: float | None = None
    """Replaces checkpoint_minutes for this run (a lent machine may be taken back mid-run)."""
    decay_minutes: float | None = None
    """Decay the learning rate linearly to a tenth over the run's last minutes (`learning_rate`;
    needs --minutes)."""
    frozen_text: bool = False
    """unet phase, resumed: train the UNet alone; the text encoder's weights stay as they are
    (their EMA copy, which the export ships, converges to them), and the latent cache's caption
    embeddings are computed once (the encoder's forward and backward passes at 77 tokens cost
    about as much as the UNet's)."""

    @property
    def decay_seconds(self) -> float | None:
        return None if self.decay_minutes is None else 60.0 * self.decay_minutes

    def apply(self, config: TrainConfig, phase: str) -> TrainConfig:
        changes: dict[str, float] = {}
        if self.batch is not None:
            changes["unet_batch" if phase == "unet" else "vae_batch"] = self.batch
        if self.cache is not None:
            changes["unet_cache"] = self.cache
        if self.checkpoint_minutes is not None:
            changes["checkpoint_minutes"] = self.checkpoint_minutes
        return dataclasses.replace(config, **changes)


def learning_rate(
    base: float,
    steps_run: int,
    warmup_steps: int,
    seconds_left: float | None = None,
    decay_seconds: float | None = None,
    floor: float = 0.1,
) -> float:
    """The rate of a run's next step: a linear warm-up over its first `warmup_steps`, then
    `base`; with `decay_seconds` (a run of known length), a linear decay to `floor`·base over
    its last `decay_seconds` (a warm-up-stable-decay schedule: each run ends annealed, and the
    next warms up again).

    steps_run: steps this run has taken; seconds_left: until the run's --minutes are up."""
    rate = base * min(1.0, (steps_run + 1) / warmup_steps)
    if decay_seconds and seconds_left is not None:
        rate *= max(floor, min(1.0, seconds_left / decay_seconds))
    return rate


def trim_log(log: Path, last_step: int) -> None:
    """Drop log lines after `last_step`: steps a crashed run did not checkpoint are redone."""
    if log.exists():
        lines = log.read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["step"] <= last_step]
        log.write_text("".join(line + "\n" for line in kept))


def run_phase(
    phase: Phase,
    config: TrainConfig,
    out: Path,
    stop: StopRule,
    resume: bool,
    machine: Machine = Machine(),
) -> int:
    """Train until `stop` says so, checkpointing along the way; return the phase's step count.

    On CUDA the forward passes run under bf16 autocast (weights, gradients and Adam stay
    float32); held-out evaluation runs in float32 everywhere."""
    device = next(phase.module.parameters()).device
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    params = list(phase.module.parameters())
    optimizer = torch.optim.AdamW(params, lr=phase.lr, weight_decay=config.weight_decay)
    ema = [p.detach().clone() for p in params] if phase.use_ema else None
    path = checkpoint_path(out, phase.name)
    log = out / f"{phase.name}_log.jsonl"
    step, elapsed = 0, 0.0
    if path.exists():
        if not resume:
            raise SystemExit(f"{path} exists; pass --resume to continue it, or use another --out")
        metadata = load_checkpoint(path, phase.module, optimizer, ema)
        step, elapsed = metadata["step"], metadata["elapsed_s"]
        print(f"resumed {phase.name} at step {step} ({elapsed / 3600:.2f} h trained)", flush=True)
    # Every run warms its learning rate up from its own first step: a compacted checkpoint
    # brings no Adam moments, and Adam's first steps at the full rate (each about lr per weight,
    # whatever its gradient) jolt a trained model; the previous run may have decayed the rate.
    warm_from = step
    trim_log(log, step)
    start_step, start_time = step, time.monotonic()
    last_save, window, seconds_per_step = start_time, [], 0.0

    def checkpoint() -> None:
        meta = {
            **phase.metadata,
            "step": step,
            "elapsed_s": elapsed + time.monotonic() - start_time,
        }
        save_checkpoint(path, phase.module, optimizer, ema, meta)

    phase.module.train()
    while not stop.done(step, time.monotonic() - start_time, seconds_per_step):
        tick = time.monotonic()
        seconds_left = None
        if stop.minutes is not None:
            seconds_left = 60.0 * stop.minutes - (time.monotonic() - start_time)
        lr = learning_rate(
            phase.lr, step - warm_from, config.warmup_steps, seconds_left, machine.decay_seconds
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            loss, metrics = phase.step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        if ema is not None:
            # The usual EMA warm-up: early on the average follows the weights closely.
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        step += 1
        seconds_per_step = time.monotonic() - tick
        window.append({"loss": loss.detach(), **metrics, "s_per_step": seconds_per_step, "lr": lr})
        if step % config.log_every == 0 or step % config.eval_every == 0:
            record = {"step": step, "elapsed_s": round(elapsed + time.monotonic() - start_time)}
            record |= {
                k: round(float(np.mean([float(w[k]) for w in window])), 5) for k in window[0]
            }
            if step % config.eval_every == 0:
                record |= {f"eval_{k}": round(v, 5) for k, v in phase.evaluate().items()}
            with log.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
            window = []
        if time.monotonic() - last_save > 60.0 * config.checkpoint_minutes:
            checkpoint()
            last_save = time.monotonic()
    checkpoint()
    record_run(out, phase.name, start_step, step, time.monotonic() - start_time, machine)
    return step


def record_run(
    out: Path, phase: str, first: int, last: int, seconds: float, machine: Machine = Machine()
) -> None:
    """Append this run (steps, wall time, speed, threads, machine) to run.json and update phase
    totals."""
    path = out / "run.json"
    runs = json.loads(path.read_text()) if path.exists() else {"runs": [], "totals": {}}
    runs["runs"].append(
        {
            "phase": phase,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "steps": [first, last],
            "seconds": round(seconds, 1),
            "s_per_step": round(seconds / max(1, last - first), 3),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": dataclasses.asdict(machine),
            "device_name": device_name(machine.device),
            "command": sys.argv,
        }
    )
    if first == 0:  # a fresh start: earlier runs of the phase trained a discarded checkpoint
        runs["totals"][phase] = {"steps": 0, "seconds": 0.0}
    total = runs["totals"].setdefault(phase, {"steps": 0, "seconds": 0.0})
    total["steps"] = last
    total["seconds"] = round(total["seconds"] + seconds, 1)
    path.write_text(json.dumps(runs, indent=2) + "\n")


def training_summary(path: Path) -> str:
    """A markdown section from a run.json: per phase and device, the runs that trained the phase's
    current checkpoint (from its last fresh start on): steps, hours, samples seen, speed."""
    runs = json.loads(path.read_text())["runs"]
    config_path = path.parent / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    lines = [
        "",
        "## Training",
        "",
        f"From `{path.as_posix()}` (every run of `scripts/train_demo_model.py`; runs before a "
        "phase's last fresh start trained a checkpoint that was discarded and are left out).",
        "",
        "| phase | device | runs | steps | hours | batch | samples | s / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for phase in ("vae", "decoder", "unet"):
        mine = [r for r in runs if r["phase"] == phase]
        fresh = [i for i, r in enumerate(mine) if r["steps"][0] == 0]
        mine = mine[fresh[-1] :] if fresh else mine
        default = config.get("unet_batch" if phase == "unet" else "vae_batch", 0)
        groups: dict[tuple[str, int], list[dict]] = {}
        for r in mine:
            device = r.get("device_name") or ("cpu" if "+cpu" in r["torch"] else r["torch"])
            batch = (r.get("machine") or {}).get("batch") or default
            groups.setdefault((device, batch), []).append(r)
        for (device, batch), group in groups.items():
            steps = sum(r["steps"][1] - r["steps"][0] for r in group)
            seconds = sum(r["seconds"] for r in group)
            lines.append(
                f"| {phase} | {device} | {len(group)} | {steps} | {seconds / 3600:.2f} | "
                f"{batch} | {steps * batch} | {seconds / max(1, steps):.3f} |"
            )
    return "\n".join(lines) + "\n"


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


# ---------------------------------------------------------------------------------------------
# Phases.


def vae_phase(config: TrainConfig, parts: dict[str, Any], stream: str = "vae") -> Phase:
    vae: AutoencoderKL = parts["vae"]
    photos = load_photos(TRAIN_PHOTOS)
    eval_scenes, eval_photos = (t.to(vae.device) for t in eval_batch(config)[::2])

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rng = batch_rng(config, stream, step)
        images, _ = training_batch(rng, config.vae_batch, config.vae_photo_share, photos)
        images = random_crops(images, config.vae_crop, rng).to(vae.device)
        return vae_loss(vae, images, torch.Generator().manual_seed(step), config)

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            return {
                "psnr_scenes": psnr(vae(eval_scenes).sample, eval_scenes),
                "psnr_photos": psnr(vae(eval_photos).sample, eval_photos),
            }

    return Phase("vae", vae, config.vae_lr, step_loss, evaluate, use_ema=False, metadata={})


def load_frozen_vae(out: Path, vae: AutoencoderKL, decoder: bool = True) -> AutoencoderKL:
    """The VAE of the vae phase, with the decoder phase's decoder when there is one."""
    path = checkpoint_path(out, "vae")
    if not path.exists():
        raise SystemExit(f"no VAE checkpoint at {path}; run --phase vae first")
    load_checkpoint(path, vae)
    if decoder and checkpoint_path(out, "decoder").exists():
        load_checkpoint(checkpoint_path(out, "decoder"), decoder_module(vae))
    return vae.eval().requires_grad_(False)


def decoder_module(vae: AutoencoderKL) -> torch.nn.ModuleDict:
    """The VAE's decoding half; its state-dict keys are the VAE's own."""
    return torch.nn.ModuleDict({"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv})


def decoder_phase(config: TrainConfig, parts: dict[str, Any], out: Path) -> Phase:
    """Fine-tune the decoder on the frozen encoder's latents (same loss as the vae phase)."""
    vae = load_frozen_vae(out, parts["vae"], decoder=False)
    module = decoder_module(vae).train().requires_grad_(True)
    spec = vae_phase(config, parts, stream="decoder")
    return dataclasses.replace(spec, name="decoder", module=module)


def latent_scale(config: TrainConfig, vae: AutoencoderKL, photos: list[Image.Image]) -> float:
    """1 / standard deviation of the VAE's latents over training images (SD 1.x: 0.18215)."""
    rng = batch_rng(config, "scaling", 0)
    images, _ = training_batch(rng, config.scaling_samples, config.unet_photo_share, photos)
    generator = torch.Generator().manual_seed(config.seed)
    latents = encode_latents(vae, images.to(vae.device), generator, 1.0)
    return 1.0 / latents.std().item()


def encoder_fingerprint(out: Path) -> str:
    """A short hash of the vae checkpoint's encoder weights: which latents a UNet learned. The
    unet checkpoint and the latent cache record it, so a changed encoder is noticed."""
    tensors = load_file(checkpoint_path(out, "vae"))
    digest = hashlib.sha256()
    for key in sorted(tensors):
        if key.startswith(("model.encoder.", "model.quant_conv.")):
            digest.update(key.encode())
            digest.update(tensors[key].float().numpy().tobytes())
    return digest.hexdigest()[:16]


def require_same_encoder(out: Path) -> str:
    """The VAE checkpoint's `encoder_fingerprint`; refuse when the UNet checkpoint learned
    another encoder's latents."""
    path = checkpoint_path(out, "unet")
    trained_on = read_metadata(path).get("encoder") if path.exists() else None
    encoder = encoder_fingerprint(out)
    if trained_on is not None and trained_on != encoder:
        raise SystemExit(
            "the VAE's encoder changed since the UNet last trained (the vae phase ran again); "
            "continue the UNet on the new latents first: --phase unet --resume --rebase"
        )
    return encoder


def unet_phase(
    config: TrainConfig,
    parts: dict[str, Any],
    out: Path,
    rebase: bool,
    workers: int = 1,
    frozen_text: bool = False,
) -> Phase:
    """The UNet and text encoder on the frozen VAE's latents.

    rebase: the encoder changed since the UNet's checkpoint (the vae phase ran on): keep the
    UNet's weights, measure the latents' scale again and re-encode the cache, and train on.
    workers: processes that render the latent cache's images. frozen_text: train the UNet
    alone (`Machine.frozen_text`)."""
    vae = load_frozen_vae(out, parts["vae"])
    photos = load_photos(TRAIN_PHOTOS)
    previous = checkpoint_path(out, "unet")
    encoder = encoder_fingerprint(out) if rebase else require_same_encoder(out)
    # The scale is fixed when the phase starts, and again at a rebase: the UNet learns latents
    # at that scale.
    if previous.exists() and not rebase:
        scale = read_metadata(previous)["scaling_factor"]
    else:
        scale = latent_scale(config, vae, photos)
    model = Denoiser(parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"])
    module = torch.nn.ModuleDict({"unet": model.unet, "text_encoder": model.text_encoder})
    device, tokenizer = vae.device, model.tokenizer
    eval_images, eval_captions, _ = eval_batch(config)
    eval_generator = torch.Generator().manual_seed(0)
    eval_latents = encode_latents(vae, eval_images.to(device), eval_generator, scale)
    eval_ids = tokenize(tokenizer, eval_captions)
    eval_steps = torch.linspace(50, 950, len(eval_latents)).long()
    empty = tokenize(tokenizer, [""])[0]
    model.text_encoder.requires_grad_(not frozen_text)

    cache = None
    if config.unet_cache:
        cache = latent_cache(config, vae, tokenizer, photos, out, encoder, workers)
    embedded, empty_context = False, empty

    def embed_captions() -> None:
        """Frozen text: the cache's and the empty caption's embeddings, once. Made at the first
        step, because run_phase loads the checkpoint's text encoder after this phase is built
        (2026-11-26: made here before, they came from a freshly initialised encoder)."""
        nonlocal cache, empty_context, embedded
        if cache is not None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            cache = cache.with_contexts(model, dtype)
        with torch.no_grad():
            empty_context = model.encode(empty[None], device)[0]
        embedded = True

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if frozen_text and not embedded:
            embed_captions()
        rng = batch_rng(config, "unet", step)
        generator = torch.Generator(device).manual_seed(step)
        if cache is not None:
            latents, captions = cache.batch(rng, config.unet_batch, generator, scale)
        else:
            size, share = config.unet_batch, config.unet_photo_share
            images, texts = training_batch(rng, size, share, photos)
            latents = encode_latents(vae, images.to(device), generator, scale)
            captions = tokenize(tokenizer, texts)
        blank = empty if captions.dtype == torch.long else empty_context
        captions = drop_captions(captions, blank, rng, config.caption_dropout)
        if captions.dtype == torch.long:  # token ids: through the text encoder
            with torch.set_grad_enabled(not frozen_text):
                captions = model.encode(captions, device)
        gamma = config.min_snr_gamma
        return denoising_loss(model, latents, captions, generator, min_snr_gamma=gamma), {}

    def evaluate() -> dict[str, float]:
        # Noise from a CPU generator: the same held-out loss on every device.
        generator = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            context = model.encode(eval_ids, device)
            loss = denoising_loss(model, eval_latents, context, generator, eval_steps)
        return {"loss": loss.item()}

    metadata = {"scaling_factor": scale, "encoder": encoder}
    return Phase("unet", module, config.unet_lr, step_loss, evaluate, True, metadata)


def export_bundle(config: TrainConfig, out: Path, bundle: Path) -> Path:
    """Write the bundle from the phases' checkpoints (EMA weights for UNet and text encoder)."""
    parts = build_components(config)
    vae = load_frozen_vae(out, parts["vae"])
    path = checkpoint_path(out, "unet")
    if not path.exists():
        raise SystemExit(f"no UNet checkpoint at {path}; run --phase unet first")
    require_same_encoder(out)
    module = torch.nn.ModuleDict({"unet": parts["unet"], "text_encoder": parts["text_encoder"]})
    module.load_state_dict({k: to_float32(v) for k, v in ema_weights(path).items()})
    vae.register_to_config(scaling_factor=read_metadata(path)["scaling_factor"])
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=parts["unet"],
        scheduler=parts["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for part in (vae, parts["unet"], parts["text_encoder"]):
        part.half()
    staging = bundle.with_name(bundle.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging, safe_serialization=True)
    finish_bundle(staging)
    if (out / DEFAULTS_FILE).exists():  # the model's own edit weights (see edit_defaults)
        EditDefaults.read(out).write(staging)
    shutil.rmtree(bundle, ignore_errors=True)
    os.replace(staging, bundle)
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    print(f"wrote {bundle} ({size / 1e6:.1f} MB)", flush=True)
    if size > MAX_BUNDLE_BYTES:
        raise SystemExit(f"bundle is {size / 1e6:.1f} MB, over the 30 MB budget; narrow the model")
    return bundle


def finish_bundle(bundle: Path) -> None:
    """Make the saved bundle load the same way with every supported transformers version.

    transformers ≥ 5 loads weights in their stored dtype unless the config names one, while
    diffusers loads into float32: an fp16 text encoder would then feed a float32 UNet. Naming
    float32 keeps storage fp16 and computation float32. vocab.json + merges.txt are what
    transformers 4's CLIPTokenizer reads (5 writes only tokenizer.json).
    """
    config_path = bundle / "text_encoder" / "config.json"
    text_config = json.loads(config_path.read_text())
    text_config["dtype"] = text_config["torch_dtype"] = "float32"
    config_path.write_text(json.dumps(text_config, indent=2) + "\n")
    write_tokenizer_files(bundle / "tokenizer")


# ---------------------------------------------------------------------------------------------
# Command line.


def load_config(out: Path, smoke: bool) -> TrainConfig:
    """The run's config: config.json in `out` if there is one, else the defaults (written)."""
    path = out / "config.json"
    if path.exists():
        return TrainConfig.from_json(path.read_text())
    config = dataclasses.replace(TrainConfig(), **SMOKE) if smoke else TrainConfig()
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_json() + "\n")
    return config


def run(
    phase: str,
    out: Path,
    stop: StopRule,
    resume: bool,
    bundle: Path | None,
    rebase: bool = False,
    machine: Machine = Machine(),
) -> None:
    if rebase and phase != "unet":
        raise SystemExit("--rebase belongs to --phase unet")
    if machine.frozen_text and phase != "unet":
        raise SystemExit("--freeze-text belongs to --phase unet")
    if machine.frozen_text and not (resume and checkpoint_path(out, "unet").exists()):
        raise SystemExit(
            "--freeze-text continues a trained UNet phase: pass --resume, with a checkpoint"
        )
    if machine.decay_minutes is not None and machine.decay_minutes <= 0:
        raise SystemExit(f"--decay-minutes must be above 0, got {machine.decay_minutes}")
    config = machine.apply(load_config(out, smoke=False), phase)
    if phase == "export":
        export_bundle(config, out, bundle or out / "bundle")
        return
    parts = build_components(config)
    device = torch.device(machine.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    for key in ("vae", "unet", "text_encoder"):
        parts[key].to(device)
    if phase == "vae":
        if checkpoint_path(out, "decoder").exists():
            raise SystemExit(
                "the decoder phase has fine-tuned this VAE's decoder for its current encoder; "
                "to train the whole VAE again, move checkpoints/decoder.safetensors away (the "
                "vae phase trains its own decoder) and afterwards continue the UNet with "
                "--phase unet --resume --rebase"
            )
        if checkpoint_path(out, "unet").exists():
            print("vae: the UNet will need --rebase after this (its latents change)", flush=True)
        spec = vae_phase(config, parts)
    elif phase == "decoder":
        spec = decoder_phase(config, parts, out)
    else:
        spec = unet_phase(config, parts, out, rebase, machine.workers, machine.frozen_text)
    counts = {k: parameter_count(parts[k]) for k in ("vae", "unet", "text_encoder")}
    batch = config.unet_batch if phase == "unet" else config.vae_batch
    print(f"{phase}: parameters {counts}, batch {batch}, device {device}", flush=True)
    stop.install()
    run_phase(spec, config, out, stop, resume, machine)


def smoke(out: Path) -> None:
    """All phases for 3 steps each at batch 2, then check the bundle with plain diffusers."""
    if out.exists():
        raise SystemExit(f"{out} exists; --smoke needs a fresh --out folder")
    load_config(out, smoke=True)
    for phase in ("vae", "decoder", "unet"):
        run(phase, out, StopRule(minutes=None, max_steps=3), resume=False, bundle=None)
    run("export", out, StopRule(minutes=None, max_steps=None), resume=False, bundle=None)
    pipeline = StableDiffusionPipeline.from_pretrained(out / "bundle")
    image = pipeline(
        scenes.caption(scenes.random_scene(0)), num_inference_steps=2, output_type="np"
    ).images[0]
    print(f"smoke: bundle loads with diffusers and generates {image.shape}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", choices=PHASES, help="what to train or write")
    parser.add_argument("--out", type=Path, default=Path("training/demo-model"), help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue the phase's checkpoint")
    parser.add_argument("--minutes", type=float, help="stop cleanly after this many minutes")
    parser.add_argument("--steps", type=int, help="stop when the phase reaches this many steps")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--bundle", type=Path, help="export destination (default OUT/bundle)")
    parser.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes rendering the unet latent cache"
    )
    parser.add_argument("--batch", type=int, help="this run's batch size (not saved in config)")
    parser.add_argument("--cache", type=int, help="this run's unet_cache size (not saved)")
    parser.add_argument(
        "--checkpoint-minutes", type=float, help="this run's checkpoint interval (not saved)"
    )
    parser.add_argument(
        "--decay-minutes",
        type=float,
        help="decay the learning rate linearly to a tenth over the run's last minutes "
        "(needs --minutes)",
    )
    parser.add_argument(
        "--freeze-text",
        action="store_true",
        help="unet phase: this run trains the UNet alone (caption embeddings computed once)",
    )
    parser.add_argument(
        "--save-photos",
        type=Path,
        metavar="NPZ",
        help=f"write the training and held-out photos to NPZ (read back via ${PHOTO_ARCHIVE})",
    )
    parser.add_argument("--smoke", action="store_true", help="a few steps of every phase")
    parser.add_argument(
        "--rebase",
        action="store_true",
        help="unet phase: the VAE's encoder changed; rescale, re-encode the cache, train on",
    )
    parser.add_argument(
        "--compact",
        nargs="+",
        choices=PHASES[:3],
        metavar="PHASE",
        help="drop these phases' Adam moments from their checkpoints before committing them",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.save_photos:
        names = TRAIN_PHOTOS + HELD_OUT_PHOTOS
        arrays = {n: np.asarray(p) for n, p in zip(names, load_photos(names), strict=True)}
        np.savez_compressed(args.save_photos, **arrays)
    elif args.smoke:
        smoke(args.out)
    elif args.compact:
        for phase in args.compact:
            size = compact_checkpoint(checkpoint_path(args.out, phase))
            print(f"{checkpoint_path(args.out, phase)}: {size / 1e6:.1f} MB", flush=True)
    elif args.phase is None:
        parser.error("pass --phase vae|decoder|unet|export, or --smoke")
    else:
        if args.decay_minutes is not None and args.minutes is None:
            parser.error("--decay-minutes needs --minutes (the run's length)")
        stop = StopRule(args.minutes, args.steps)
        machine = Machine(
            args.device,
            args.workers,
            args.batch,
            args.cache,
            args.checkpoint_minutes,
            args.decay_minutes,
            args.freeze_text,
        )
        run(args.phase, args.out, stop, args.resume, args.bundle, args.rebase, machine)


if __name__ == "__main__":
    main()
