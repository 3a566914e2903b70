import pytest
import torch

from dragondiffusion.errors import InputError
from dragondiffusion.features import FeatureExtractor, energy_grid, feature_blocks, upsample


def test_feature_blocks_by_resolution(pipe):
    assert feature_blocks(pipe.unet) == (1, 2)


def test_features_match_a_full_forward_and_stop_early(pipe):
    torch.manual_seed(0)
    z = torch.randn(1, 4, 16, 16)
    text, _ = pipe.encode_text("a blue ring")
    full, deeper_calls = {}, []
    hooks = [
        pipe.unet.up_blocks[i].register_forward_hook(
            lambda m, a, out, i=i: full.__setitem__(i, out)
        )
        for i in (1, 2)
    ]
    with torch.no_grad():
        pipe.unet(z, 400, encoder_hidden_states=text)
    for h in hooks:
        h.remove()
    spy = pipe.unet.up_blocks[3].register_forward_hook(lambda *a: deeper_calls.append(1))
    spy_out = pipe.unet.conv_out.register_forward_hook(lambda *a: deeper_calls.append(2))
    try:
        with torch.no_grad():
            feats = FeatureExtractor(pipe.unet)(z, 400, text)
    finally:
        spy.remove()
        spy_out.remove()
    assert deeper_calls == [], "blocks after the last feature block must not run"
    assert [f.shape for f in feats] == [(1, 32, 8, 8), (1, 16, 16, 16)]
    assert torch.equal(feats[0], full[1]) and torch.equal(feats[1], full[2])
    up = upsample(feats, energy_grid((16, 16)))
    assert [f.shape[-2:] for f in up] == [(32, 32), (32, 32)]


def test_features_carry_gradients_to_the_latent(pipe):
    z = torch.randn(1, 4, 16, 16, requires_grad=True)
    text, _ = pipe.encode_text("")
    with torch.enable_grad():
        feats = pipe.features(z, 300, text)
        (g,) = torch.autograd.grad(sum(f.square().mean() for f in feats), z)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_one_unet_serves_denoising_features_and_bank(pipe):
    """Upstream kept a second full UNet copy as the feature "estimator"; here there is one."""
    from diffusers import UNet2DConditionModel

    assert pipe.features.unet is pipe.unet
    unets = [m for m in pipe.components.values() if isinstance(m, UNet2DConditionModel)]
    assert unets == [pipe.unet]
    unet_params = {p.data_ptr() for p in pipe.unet.parameters()}
    other = [
        p
        for name, m in pipe.components.items()
        if isinstance(m, torch.nn.Module) and name != "unet"
        for p in m.parameters()
    ]
    assert not any(p.data_ptr() in unet_params for p in other)


def test_chosen_blocks_stop_after_the_last_one_and_bad_choices_are_refused(pipe):
    z = torch.randn(1, 4, 16, 16)
    text, _ = pipe.encode_text("a blue ring")
    (fine,) = FeatureExtractor(pipe.unet, (2,))(z, 400, text)
    both = FeatureExtractor(pipe.unet)(z, 400, text)
    assert torch.equal(fine, both[1])
    assert FeatureExtractor(pipe.unet, (2, 1)).blocks == (1, 2)
    for bad in [(), (4,), (-1,), (1, 1), (True,), (1.0,)]:
        with pytest.raises(InputError, match="distinct indices of the UNet's 4 decoder blocks"):
            FeatureExtractor(pipe.unet, bad)
