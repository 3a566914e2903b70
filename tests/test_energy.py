import math

import pytest
import torch

from dragondiffusion.energy import (
    contrast_energy,
    cosine_map,
    global_similarity,
    inverse_energy,
    local_similarity,
    masked_mean,
    remap,
)
from dragondiffusion.errors import InputError


def maps():
    # 2 channels on a 1×3 grid: pixel 0 identical, pixel 1 orthogonal, pixel 2 opposite.
    f = torch.tensor([[[[1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0]]]])
    g = torch.tensor([[[[2.0, 0.0, -3.0]], [[0.0, 5.0, 0.0]]]])
    return f, g


def test_cosine_map_hand_values():
    f, g = maps()
    assert cosine_map(f, g).tolist() == [[[1.0, 0.0, -1.0]]]


def test_local_similarity_raw_and_remapped():
    f, g = maps()
    everywhere = torch.ones(1, 1, 1, 3, dtype=torch.bool)
    first_two = torch.tensor([[[[True, True, False]]]])
    assert local_similarity(f, g, everywhere).item() == pytest.approx(0.0)
    assert local_similarity(f, g, first_two).item() == pytest.approx(0.5)
    # remapped: (1+1)/2 = 1, (0+1)/2 = 0.5 → mean 0.75
    assert local_similarity(f, g, first_two, remapped=True).item() == pytest.approx(0.75)


def test_global_similarity_pools_then_compares():
    f, g = maps()
    m0 = torch.tensor([[[[True, False, False]]]])
    m1 = torch.tensor([[[[False, True, True]]]])
    # mean f over pixel 0 = (1, 0); mean g over pixels 1-2 = (-1.5, 2.5): cos = -1.5/√8.5
    expected = -1.5 / math.sqrt(8.5)
    assert global_similarity(f, m0, g, m1).item() == pytest.approx(expected, abs=1e-6)
    assert global_similarity(f, m0, g, m1, remapped=True).item() == pytest.approx(
        (expected + 1) / 2, abs=1e-6
    )


def test_energy_forms():
    s = torch.tensor([0.0, 0.5, 1.0])
    assert inverse_energy(4.0, s).tolist() == pytest.approx([4.0, 4 / 3, 0.8])
    assert contrast_energy(0.2, s).tolist() == pytest.approx([0.0, 0.1, 0.2])
    assert remap(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0.0, 0.5, 1.0]


def test_empty_region_is_a_clear_error_not_nan():
    f, g = maps()
    empty = torch.zeros(1, 1, 1, 3, dtype=torch.bool)
    with pytest.raises(InputError, match="empty"):
        local_similarity(f, g, empty)
    with pytest.raises(InputError, match="empty"):
        global_similarity(f, empty, g, empty)
    with pytest.raises(InputError):
        masked_mean(torch.ones(1, 1, 3), empty)


def test_energy_gradient_points_toward_higher_similarity():
    torch.manual_seed(0)
    g = torch.randn(1, 8, 4, 4)
    f = torch.randn(1, 8, 4, 4, requires_grad=True)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    e = inverse_energy(1.0, local_similarity(f, g, mask))
    (grad,) = torch.autograd.grad(e.sum(), f)
    with torch.no_grad():
        stepped = inverse_energy(1.0, local_similarity(f - 0.1 * grad, g, mask))
    assert stepped.item() < e.item()


def test_half_precision_zero_vectors_and_large_regions_stay_finite():
    """fp16 features (the CUDA default): a warp leaves zero vectors at the border, whose cosine
    is 0/0 with fp16's ε = 0, and region sums overflow fp16 (upstream NaN, #7.3 of the reading).
    """
    f, g = maps()
    f, g = f.half(), g.half()
    g[..., 2] = 0  # a zero vector where the warp found no source
    everywhere = torch.ones(1, 1, 1, 3, dtype=torch.bool)
    s = local_similarity(f, g, everywhere)
    assert s.dtype == torch.float32 and torch.isfinite(s).all()
    assert s.item() == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    big = torch.full((1, 8, 192, 192), 8.0, dtype=torch.float16)  # Σ = 294912 > fp16 max
    region = torch.ones(1, 1, 192, 192, dtype=torch.bool)
    assert global_similarity(big, region, big, region).item() == pytest.approx(1.0)
