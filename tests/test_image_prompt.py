"""DiffEditor's optional image prompt (IP-Adapter) on a tiny random encoder and adapter."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from safetensors.torch import save_file

import dragondiffusion
from dragondiffusion import pipeline as pipeline_module
from dragondiffusion import sampler as sampler_module
from dragondiffusion.attention import MemoryBankProcessor, bank_layers, install_memory_bank
from dragondiffusion.cli import main
from dragondiffusion.errors import InputError
from dragondiffusion.features import FeatureExtractor
from dragondiffusion.io import read_record
from dragondiffusion.sampler import GuidanceSchedule, Sampler
from dragondiffusion.testing import write_tiny_image_prompt

SOURCE, TARGET = (35, 45), (80, 48)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, pipe):
    """A tiny IP-Adapter-Plus checkpoint for the tiny UNet, with `image_encoder/` beside it."""
    return write_tiny_image_prompt(tmp_path_factory.mktemp("ip"), pipe.unet, plus=True)


def fresh_pipe(tiny_bundle):
    p = dragondiffusion.load(tiny_bundle, device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def ip_pipe(tiny_bundle, adapter):
    p = fresh_pipe(tiny_bundle)
    p.load_image_prompt(adapter)
    return p


def processor_kinds(unet) -> dict[str, set[str]]:
    """Processor class names of decoder attn1, other attn1 and attn2 layers."""
    kinds: dict[str, set[str]] = {"bank": set(), "attn1": set(), "attn2": set()}
    decoder = set(bank_layers(unet))
    for name, proc in unet.attn_processors.items():
        key = "bank" if name in decoder else "attn2" if ".attn2." in name else "attn1"
        kinds[key].add(type(proc).__name__)
    return kinds


def ip_scales(unet) -> set[float]:
    return {
        s
        for p in unet.attn_processors.values()
        if isinstance(p, IPAdapterAttnProcessor2_0)
        for s in p.scale
    }


def move(p, image, scene, **options):
    return p.move(image, scene[1], SOURCE, TARGET, **options)


def test_loading_keeps_the_memory_bank_beside_the_ip_processors(ip_pipe, scene):
    expected = {
        "bank": {MemoryBankProcessor.__name__},
        "attn1": {AttnProcessor2_0.__name__},
        "attn2": {IPAdapterAttnProcessor2_0.__name__},
    }
    assert processor_kinds(ip_pipe.unet) == expected
    assert ip_scales(ip_pipe.unet) == {0.0}, "loaded, but off until an edit's schedule says so"
    before = {n: p for n, p in ip_pipe.unet.attn_processors.items() if ".attn2." in n}
    install_memory_bank(ip_pipe.unet, ip_pipe.memory_bank)  # re-installing drops neither
    assert processor_kinds(ip_pipe.unet) == expected
    after = ip_pipe.unet.attn_processors
    assert all(after[n] is p for n, p in before.items()), "the adapter's weights stay"
    inv = ip_pipe.invert(scene[0], "a red square", num_inference_steps=3)
    assert sorted(inv.memory) == sorted((n, i) for n in ip_pipe.bank_layers for i in range(3))
    # plain text-to-image still runs: the hook gives the UNet the zeros-image embedding
    out = ip_pipe("a red square", num_inference_steps=2, output_type="np").images
    assert np.isfinite(out).all()


@pytest.fixture
def scale_log(ip_pipe, monkeypatch):
    """(phase, sampler step, IP scale) of every call of one cross-attention layer."""
    log, state = [], {"phase": "other", "step": None}

    def tagged(phase, fn):
        def run(*args, **kwargs):
            outer, state["phase"] = state["phase"], phase
            try:
                return fn(*args, **kwargs)
            finally:
                state["phase"] = outer

        return run

    def numbered(step):
        def run(self, i, *args, **kwargs):
            state["step"] = i
            return step(self, i, *args, **kwargs)

        return run

    monkeypatch.setattr(Sampler, "step", numbered(Sampler.step))
    monkeypatch.setattr(
        pipeline_module, "ddim_invert", tagged("inversion", pipeline_module.ddim_invert)
    )
    monkeypatch.setattr(FeatureExtractor, "__call__", tagged("features", FeatureExtractor.__call__))
    monkeypatch.setattr(Sampler, "rollback", tagged("rollback", Sampler.rollback))
    monkeypatch.setattr(sampler_module, "cfg_noise", tagged("cfg", sampler_module.cfg_noise))
    name = next(n for n in ip_pipe.unet.attn_processors if ".attn2." in n)
    attn = ip_pipe.unet.get_submodule(name.removesuffix(".processor"))
    handle = attn.register_forward_pre_hook(
        lambda m, _: log.append((state["phase"], state["step"], m.processor.scale[0]))
    )
    yield log
    handle.remove()


@pytest.mark.parametrize(("mode", "steps"), [("diffeditor", 10), ("dragon", 6)])
def test_image_prompt_is_on_exactly_at_the_schedule_steps(ip_pipe, scene, scale_log, mode, steps):
    """Scale 0.1 only in the sampler's CFG passes at the schedule's image-prompt steps (2, 3 of
    10 in diffeditor mode, none in dragon mode); 0 in inversion, feature passes and rollback."""
    move(ip_pipe, scene[0], scene, num_inference_steps=steps, mode=mode)
    schedule = GuidanceSchedule.for_mode(mode, steps)
    assert schedule.image_prompt == (frozenset({2, 3}) if mode == "diffeditor" else frozenset())
    on = {(phase, step, scale) for phase, step, scale in scale_log if scale != 0}
    assert on == {("cfg", i, 0.1) for i in schedule.image_prompt}
    cfg_steps = {step for phase, step, scale in scale_log if phase == "cfg" and scale == 0}
    assert cfg_steps == set(range(steps)) - schedule.image_prompt
    phases = {phase for phase, _, _ in scale_log}
    assert {"inversion", "features", "cfg"} <= phases
    if mode == "diffeditor":
        assert "rollback" in phases, "time travel ran, with the image prompt off"
    assert ip_scales(ip_pipe.unet) == {0.0}, "off again after the edit"


def test_image_tokens_never_reach_the_text_cross_attention(ip_pipe, scene, monkeypatch):
    """Upstream appended the base image's tokens to the text context for appearance and paste
    (§7.3 #5). Here every text K/V projection sees exactly the 77 text tokens, the image tokens
    go only to the IP projections, and they encode the reference image."""
    img, mask = scene
    ref, ref_mask = np.ascontiguousarray(img[::-1]), np.ascontiguousarray(mask[::-1])
    text_tokens, image_tokens, prompts = [], [], []
    encode = ip_pipe.encode_image_prompt
    monkeypatch.setattr(ip_pipe, "encode_image_prompt", lambda im: prompts.append(im) or encode(im))
    handles = []
    for name, proc in ip_pipe.unet.attn_processors.items():
        if ".attn2." in name:
            attn = ip_pipe.unet.get_submodule(name.removesuffix(".processor"))
            for linear, log in ((attn.to_k, text_tokens), (proc.to_k_ip[0], image_tokens)):
                hook = linear.register_forward_pre_hook(lambda _, x, log=log: log.append(x[0]))
                handles.append(hook)
    try:
        result = ip_pipe.appearance(img, mask, ref, ref_mask, num_inference_steps=10)
    finally:
        for h in handles:
            h.remove()
    assert {x.shape[1] for x in text_tokens} == {77}
    assert image_tokens and {x.shape[-2] for x in image_tokens} == {4}, "4 resampler queries"
    assert result.record["image_prompt"]["image"] == "reference"
    assert len(prompts) == 1 and np.array_equal(np.asarray(prompts[0]), ref)


def test_image_prompt_changes_the_edit_and_is_recorded(ip_pipe, pipe, scene, adapter):
    inv = ip_pipe.invert(scene[0], "a red square", num_inference_steps=10)
    with_prompt = move(ip_pipe, inv, scene)
    at_zero = move(ip_pipe, inv, scene, ip_scale=0.0)
    without = move(pipe, inv, scene)
    assert (with_prompt.latent - without.latent).abs().mean() > 1e-4
    assert torch.allclose(at_zero.latent, without.latent, atol=1e-6), "scale 0 = no adapter"
    assert with_prompt.record["image_prompt"] == {
        "adapter": str(adapter),
        "image_encoder": str(adapter.parent / "image_encoder"),
        "scale": 0.1,
        "steps": [2, 3],
        "image": "input",
    }
    assert without.record["image_prompt"] is None
    # diffusers leaves an adapter's projections trainable; the pipeline freezes them again.
    assert not any(p.requires_grad for p in ip_pipe.unet.parameters())
    assert not with_prompt.latent.requires_grad


def test_unconditional_embedding_encodes_an_all_zeros_image(ip_pipe):
    embeds = ip_pipe.encode_image_prompt(PIL.Image.new("RGB", (50, 30), "white"))
    assert embeds.shape == (2, 1, 17, 32)  # [uncond; cond], 1 image, 16 patches + CLS, width 32
    zeros = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        hidden = ip_pipe.image_encoder(zeros, output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(embeds[0, 0], hidden[0])
    assert not torch.allclose(embeds[1], embeds[0])


def test_plain_ip_adapter_layout_loads_and_acts(tiny_bundle, tmp_path, scene):
    p = fresh_pipe(tiny_bundle)
    p.load_image_prompt(write_tiny_image_prompt(tmp_path, p.unet, plus=False))
    assert {tuple(proc.num_tokens) for proc in p.unet.attn_processors.values()
            if isinstance(proc, IPAdapterAttnProcessor2_0)} == {(4,)}  # fmt: skip
    inv = p.invert(scene[0], num_inference_steps=6)
    a, b = move(p, inv, scene), move(p, inv, scene, ip_scale=0.0)
    assert not torch.allclose(a.latent, b.latent)


def test_bad_adapters_are_clear_input_errors_and_leave_the_pipeline_working(
    tiny_bundle, tmp_path, adapter, scene
):
    p = fresh_pipe(tiny_bundle)
    encoder = adapter.parent / "image_encoder"
    with pytest.raises(InputError, match="does not exist"):
        p.load_image_prompt(tmp_path / "missing.safetensors", image_encoder=encoder)
    with pytest.raises(InputError, match=r"not a CLIPVisionModelWithProjection folder"):
        p.load_image_prompt(adapter, image_encoder=tmp_path)
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "ip.safetensors").write_bytes(adapter.read_bytes())
    with pytest.raises(InputError, match="no image encoder"):
        p.load_image_prompt(tmp_path / "alone")
    (tmp_path / "garbage.safetensors").write_text("not a checkpoint")
    with pytest.raises(InputError, match="could not load IP-Adapter"):
        p.load_image_prompt(tmp_path / "garbage.safetensors", image_encoder=encoder)
    save_file({"image_proj.proj.weight": torch.zeros(128, 16)}, tmp_path / "no_ip.safetensors")
    with pytest.raises(InputError, match="could not load IP-Adapter"):
        p.load_image_prompt(tmp_path / "no_ip.safetensors", image_encoder=encoder)
    with pytest.raises(InputError, match=r"holds 2 \.safetensors/\.bin files"):
        p.load_image_prompt(tmp_path, image_encoder=encoder)
    assert p.image_prompt is None and p.image_encoder is None
    assert processor_kinds(p.unet) == {
        "bank": {MemoryBankProcessor.__name__},
        "attn1": {AttnProcessor2_0.__name__},
        "attn2": {AttnProcessor2_0.__name__},
    }
    inv = p.invert(scene[0], num_inference_steps=2)
    assert len(inv.memory) == 2 * len(p.bank_layers)


def test_cli_image_prompt_options(tiny_bundle, adapter, tmp_path, scene, capsys):
    img, mask = scene
    PIL.Image.fromarray(img).save(tmp_path / "in.png")
    PIL.Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    args = [
        "move", "--model", str(tiny_bundle), "--image", str(tmp_path / "in.png"),
        "--mask", str(tmp_path / "mask.png"), "--from", "35,45", "--to", "80,48",
        "--steps", "6", "--device", "cpu", "--quiet", "--out", str(tmp_path / "out.png"),
    ]  # fmt: skip
    assert main([*args, "--ip-adapter", str(adapter), "--ip-scale", "0.2"]) == 0
    record = read_record(tmp_path / "out.png")["image_prompt"]
    assert record["adapter"] == str(adapter) and record["scale"] == 0.2
    assert record["steps"] == [1] and record["image"] == "input"  # step 10 of 50 → 1 of 6
    assert main([*args, "--image-encoder", str(adapter.parent / "image_encoder")]) == 2
    assert "--image-encoder is for the image prompt" in capsys.readouterr().err
    assert main([*args, "--ip-scale", "0.3"]) == 2
    assert "--ip-scale is for the image prompt" in capsys.readouterr().err
    assert main([*args, "--ip-adapter", str(tmp_path / "none.bin")]) == 2
    assert "does not exist" in capsys.readouterr().err
