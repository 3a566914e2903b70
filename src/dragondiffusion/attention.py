"""Cross-branch self-attention: the memory bank and the processors that read it.

During inversion the decoder self-attention layers *record* their keys and values at every step
(the memory bank of the guidance branch). During guided sampling the same layers let the generation
branch's queries read those keys/values: *replace* its own (move), *concat* them to its own
(drag), or a masked *composite* of two recorded images (appearance, paste). One `MemoryBank` object
holds the policy (mode, step) and the storage; the processors only ask it what to do, so a test can
read off which layers used the bank at which step. Installed through diffusers' attention-processor
API.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor2_0,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
)

from .errors import InputError


class BankMode(str, Enum):
    """What decoder self-attention does with the memory bank."""

    OFF = "off"  # plain self-attention (feature passes, rollback, steps outside the bank range)
    RECORD = "record"  # inversion: store this step's K/V
    REPLACE = "replace"  # use the bank's K/V instead of the own ones
    CONCAT = "concat"  # attend to own and bank tokens together
    COMPOSITE = "composite"  # bank tokens of image 0 outside mask 0 + of image 1 inside mask 1


@dataclass
class MemoryBank:
    """Keys and values of the decoder self-attention layers, per layer and denoising step.

    `store[(layer, step)] = (K, V)`, each (B_inv, tokens, channels) after the K/V projections.
    `step` is the denoising index i (0 = noisiest); inversion step j records under i = N−1−j.
    """

    store: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    mode: BankMode = BankMode.OFF
    step: int = 0
    composite_masks: tuple[torch.Tensor, torch.Tensor] | None = None
    used: list[tuple[str, int, str]] = field(default_factory=list)
    log_use: bool = False
    probe: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None
    """Called by every bank layer with (layer, queries, keys), each (B, heads, tokens, dim) as
    the attention uses them (diagnostics, e.g. `model_report.attention_entropy`)."""

    @property
    def layers(self) -> list[str]:
        return sorted({name for name, _ in self.store})

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.store.values())

    def lookup(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self.store[(layer, self.step)]
        except KeyError:
            raise RuntimeError(
                f"memory bank has no entry for {layer} at step {self.step}: invert the image "
                "with the same number of steps as the edit"
            ) from None

    def own(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The edited image's entries (image 0 of the inversion, which may also hold a
        reference image): (1, tokens, C) each."""
        k, v = self.lookup(layer)
        return k[:1], v[:1]

    def composite(self, layer: str, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bank tokens of image 0 outside its mask, then of image 1 inside its mask: (1, n, C).
        A layer whose token grid is too coarse to hold any of either (image 0's mask covers
        every token, image 1's none) reads image 0's own tokens: attention over no keys would
        silently give zeros."""
        assert self.composite_masks is not None
        k, v = self.lookup(layer)
        keep = [token_mask(m, tokens) for m in self.composite_masks]
        if not bool((~keep[0]).any() or keep[1].any()):
            return self.own(layer)
        k = torch.cat([k[0][~keep[0]], k[1][keep[1]]])[None]
        v = torch.cat([v[0][~keep[0]], v[1][keep[1]]])[None]
        return k, v


def token_mask(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """A (1, 1, H, W) mask nearest-resized to a layer's token grid (same aspect), flattened."""
    h, w = mask.shape[-2:]
    scale = (h * w / tokens) ** 0.5
    grid = (round(h / scale), round(w / scale))
    return F.interpolate(mask.float(), size=grid, mode="nearest")[0, 0].flatten() > 0.5


def _match_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat bank entries (1, n, C) over a batch of `batch` (e.g. the CFG pair)."""
    if x.shape[0] != 1:  # repeat(batch // 2) of a batch-1 call gave no keys: silent zeros
        raise RuntimeError(f"bank entries of batch {x.shape[0]} for a call of batch {batch}")
    return x if batch == 1 else x.repeat(batch, 1, 1)


class MemoryBankProcessor:
    """Self-attention that records into or reads from a `MemoryBank` (SD transformer `attn1`)."""

    def __init__(self, layer: str, bank: MemoryBank) -> None:
        self.layer = layer
        self.bank = bank

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        bank = self.bank
        batch, tokens, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        mode = bank.mode
        if mode is BankMode.RECORD:
            bank.store[(self.layer, bank.step)] = (key.detach(), value.detach())
        elif mode is BankMode.REPLACE:
            key, value = (_match_batch(x, batch) for x in bank.own(self.layer))
        elif mode is BankMode.CONCAT:
            k, v = bank.own(self.layer)
            key = torch.cat([key, _match_batch(k, batch)], dim=1)
            value = torch.cat([value, _match_batch(v, batch)], dim=1)
        elif mode is BankMode.COMPOSITE:
            key, value = (_match_batch(x, batch) for x in bank.composite(self.layer, tokens))
        if bank.log_use and mode is not BankMode.OFF:
            bank.used.append((self.layer, bank.step, mode.value))

        heads = attn.heads
        split = lambda x: x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        query, key, value = split(query), split(key), split(value)
        if bank.probe is not None:
            bank.probe(self.layer, query, key)
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch, tokens, -1).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def bank_layers(unet: torch.nn.Module) -> list[str]:
    """Processor names of the decoder self-attention layers (`up_blocks.*.attn1`)."""
    return [n for n in unet.attn_processors if n.startswith("up_blocks.") and ".attn1." in n]


def kept_processor(processor: object) -> object:
    """IP-Adapter processors (they hold the adapter's weights) stay; others become plain SDPA."""
    if isinstance(processor, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)):
        return processor
    return AttnProcessor2_0()


def install_memory_bank(unet: torch.nn.Module, bank: MemoryBank) -> list[str]:
    """Put memory-bank processors on the decoder self-attention; keep IP-Adapter processors on
    the cross-attention; plain SDPA elsewhere."""
    layers = bank_layers(unet)
    if not layers:
        raise InputError(
            "the UNet has no decoder self-attention layers (up_blocks.*.attn1); "
            "use a Stable Diffusion 1.x-format model"
        )
    modules = dict(unet.named_modules())
    for name in layers:
        attn = modules[name.removesuffix(".processor")]
        if attn.group_norm is not None or attn.spatial_norm is not None or attn.is_cross_attention:
            raise InputError(f"{name} is not a plain SD self-attention layer; use an SD 1.x model")
    unet.set_attn_processor(
        {
            n: MemoryBankProcessor(n, bank) if n in layers else kept_processor(p)
            for n, p in unet.attn_processors.items()
        }
    )
    return layers
