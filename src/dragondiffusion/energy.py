"""Energy functions of DragonDiffusion: pure tensor functions of decoder feature maps.

Each similarity is a cosine over channels; each energy has the form w / (α + β·s) with α = 1 and
β = 4 (upstream §2), so a higher similarity gives a lower energy. "Contrast" terms are linear, w·s.
Feature maps are (B, C, H, W); masks are boolean (B or 1, 1, H, W). Pairs of regions are compared
pixel by pixel on maps that are already aligned (the reference is warped onto the target first).

Everything is computed in float32 whatever the model's dtype: in float16 the cosine's ε (1e-8)
is 0, so the zero vectors that warps leave at the border give 0/0, and region sums overflow.
Regions are selected with `torch.where`, so nothing outside a mask can reach a mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError

ALPHA = 1.0
BETA = 4.0


def cosine_map(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-pixel cosine similarity over channels: (B, C, H, W) × (B, C, H, W) → (B, H, W)."""
    return F.cosine_similarity(f.float(), g.float(), dim=1, eps=1e-8)


def remap(s: torch.Tensor) -> torch.Tensor:
    """A cosine in [−1, 1] mapped to [0, 1]."""
    return (s + 1) / 2


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, H, W) over mask (B or 1, 1, H, W), one value per batch element: (B,)."""
    m = mask[:, 0].bool().expand_as(x)
    count = m.sum(dim=(1, 2))
    if bool((count == 0).any()):
        raise InputError("an energy region is empty; use a larger mask or a longer drag")
    return torch.where(m, x.float(), 0.0).sum(dim=(1, 2)) / count


def masked_pool(f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean feature vector of f (B, C, H, W) over mask (B or 1, 1, H, W): (B, C)."""
    m = mask.bool().expand(f.shape[0], 1, *f.shape[2:])
    count = m.sum(dim=(2, 3))
    if bool((count == 0).any()):
        raise InputError("an energy region is empty; use a larger mask")
    return torch.where(m, f.float(), 0.0).sum(dim=(2, 3)) / count


def local_similarity(
    f: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, remapped: bool = False
) -> torch.Tensor:
    """Mean over `mask` of the pixel-wise cosine of aligned maps f and g: (B,)."""
    s = cosine_map(f, g)
    return masked_mean(remap(s) if remapped else s, mask)


def global_similarity(
    f: torch.Tensor,
    mask_f: torch.Tensor,
    g: torch.Tensor,
    mask_g: torch.Tensor,
    remapped: bool = False,
) -> torch.Tensor:
    """Cosine between the mean-pooled features of f over mask_f and g over mask_g: (B,)."""
    s = F.cosine_similarity(masked_pool(f, mask_f), masked_pool(g, mask_g), dim=1, eps=1e-8)
    return remap(s) if remapped else s


def inverse_energy(weight: float, similarity: torch.Tensor) -> torch.Tensor:
    """E = w / (α + β·s): low when the similarity is high.

    Kept as upstream has it: where s is a raw cosine (move's edit and content terms) the form
    has a pole at s = −α/β = −0.25, a region's *mean* cosine that decoder features of the same
    content do not reach in practice; near it the gradient grows without bound (where it
    overflows, the sampler stops with `SamplingDiverged` instead of writing NaN)."""
    return weight / (ALPHA + BETA * similarity)


def contrast_energy(weight: float, similarity: torch.Tensor) -> torch.Tensor:
    """E = w·s: low when the similarity is low (pushes a region away from its old content)."""
    return weight * similarity
