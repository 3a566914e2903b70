"""The demo-model training script: tokenizer, architecture budget, data, checkpoints, smoke run."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dragondiffusion import scenes
from dragondiffusion.edit_defaults import EditDefaults
from dragondiffusion.errors import InputError

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_model.py"


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def components(train):
    return train.build_components(train.TrainConfig())


def test_every_caption_word_is_one_known_token(train):
    tokenizer = train.build_tokenizer()
    unknown = tokenizer.unk_token_id
    for seed in range(50):
        text = scenes.caption(scenes.random_scene(seed))
        ids = tokenizer(text).input_ids
        tokens = tokenizer.convert_ids_to_tokens(ids)[1:-1]
        assert unknown not in ids[1:-1]
        assert tokens == [w + "</w>" for w in re.findall(r"[a-z]+|,", text)]
    assert tokenizer("a photo").input_ids[1:-1] == tokenizer.convert_tokens_to_ids(
        ["a</w>", "photo</w>"]
    )
    # Text outside the vocabulary falls back to byte symbols, never to the unknown token.
    ids = tokenizer("zebra 42 ü!").input_ids
    assert unknown not in ids[1:-1]


def test_tokenizer_files_are_deterministic(train, tmp_path):
    train.write_tokenizer_files(tmp_path / "a")
    train.write_tokenizer_files(tmp_path / "b")
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    vocab = json.loads((tmp_path / "a" / "vocab.json").read_text())
    assert max(vocab.values()) == len(vocab) - 1
    assert list(vocab)[-2:] == ["<|startoftext|>", "<|endoftext|>"]


def test_components_have_sd_structure_and_fit_the_budget(train, components):
    unet, vae, text_encoder = components["unet"], components["vae"], components["text_encoder"]
    assert unet.config.sample_size == 16
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + [
        "DownBlock2D"
    ]
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    assert len(vae.config.block_out_channels) == 4 and vae.config.latent_channels == 16
    assert unet.config.in_channels == unet.config.out_channels == 16
    assert text_encoder.config.vocab_size == len(components["tokenizer"])
    scheduler = components["scheduler"].config
    assert (scheduler.beta_start, scheduler.beta_end) == (0.00085, 0.012)
    assert scheduler.steps_offset == 1 and not scheduler.clip_sample
    parameters = sum(train.parameter_count(components[k]) for k in ("unet", "vae", "text_encoder"))
    assert 2 * parameters < 0.97 * train.MAX_BUNDLE_BYTES


def test_vae_maps_128_pixels_to_16_latents(components):
    with torch.no_grad():
        latents = components["vae"].encode(torch.zeros(1, 3, 128, 128)).latent_dist.mode()
    assert latents.shape == (1, 16, 16, 16)


def test_training_batches_depend_only_on_seed_and_step(train):
    config = train.TrainConfig()

    def batch(step):
        rng = train.batch_rng(config, "unet", step)
        return train.training_batch(rng, 3, 0.0, [])

    images, captions = batch(5)
    again, captions_again = batch(5)
    other, _ = batch(6)
    assert torch.equal(images, again) and captions == captions_again
    assert not torch.equal(images, other)
    assert images.shape == (3, 3, 128, 128) and -1.0 <= images.min() <= images.max() <= 1.0


def test_photo_crops_and_caption_dropout(train):
    rng = np.random.default_rng(0)
    photo = train.Image.fromarray(np.full((300, 400, 3), 200, np.uint8))
    crop = train.photo_crop(photo, rng, 128)
    assert crop.shape == (128, 128, 3) and crop.min() >= 0.0 and crop.max() <= 255.0
    ids, empty = torch.ones(2000, 5, dtype=torch.long), torch.zeros(5, dtype=torch.long)
    dropped = train.drop_captions(ids, empty, rng, 0.1)
    rows_dropped = (dropped == 0).all(dim=1)
    assert torch.equal(rows_dropped, (dropped == 0).any(dim=1))  # whole captions, never parts
    assert 0.07 < rows_dropped.float().mean().item() < 0.13
    # Embeddings (a frozen text encoder's) drop the same way: whole captions.
    contexts, empty_context = torch.ones(2000, 5, 4), torch.zeros(5, 4)
    same = train.drop_captions(ids, empty, np.random.default_rng(5), 0.1)
    dropped = train.drop_captions(contexts, empty_context, np.random.default_rng(5), 0.1)
    assert torch.equal((dropped == 0).all(dim=(1, 2)), (same == 0).all(dim=1))
    assert torch.equal((dropped == 0).all(dim=(1, 2)), (dropped == 0).any(dim=(1, 2)))


def test_checkpoint_round_trip(train, tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    ema = [p.detach().clone() * 0.5 for p in module.parameters()]
    path = tmp_path / "checkpoints" / "x.safetensors"
    train.save_checkpoint(path, module, optimizer, ema, {"step": 7, "elapsed_s": 1.5})

    restored = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    restored_optimizer = torch.optim.AdamW(restored.parameters())
    restored_ema = [torch.zeros_like(e) for e in ema]
    meta = train.load_checkpoint(path, restored, restored_optimizer, restored_ema)
    assert meta["step"] == 7 and meta["elapsed_s"] == 1.5
    for a, b in zip(module.parameters(), restored.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-3)
        state, again = optimizer.state[a], restored_optimizer.state[b]
        assert torch.allclose(state["exp_avg"], again["exp_avg"], rtol=1e-2)
        assert torch.allclose(state["exp_avg_sq"], again["exp_avg_sq"], rtol=1e-2)
        assert int(again["step"]) == 1
    assert all(torch.allclose(e, r, atol=1e-3) for e, r in zip(ema, restored_ema, strict=True))
    assert not path.with_suffix(".partial").exists()


def test_a_resume_without_adam_moments_warms_the_learning_rate_up_again(train, tmp_path):
    config = train.TrainConfig()
    torch.manual_seed(0)
    module, x = torch.nn.Linear(4, 3), torch.randn(8, 4)

    def step_loss(step):
        return (module(x) ** 2).mean(), {}

    phase = train.Phase("vae", module, 0.1, step_loss, lambda: {}, False, {})
    path = train.checkpoint_path(tmp_path, "vae")
    unused = torch.optim.AdamW(module.parameters())  # no state: as after compact_checkpoint
    train.save_checkpoint(path, module, unused, None, {"step": 500, "elapsed_s": 1.0})
    start = [p.detach().half().float() for p in module.parameters()]
    train.run_phase(phase, config, tmp_path, train.StopRule(None, 501), resume=True)
    pairs = zip(module.parameters(), start, strict=True)
    moved = max((p.detach() - s).abs().max().item() for p, s in pairs)
    # Adam's first step moves each weight by about its learning rate: here the warm-up's first,
    # lr / warmup_steps, not the full 0.1 that jolted resumed models before.
    assert config.warmup_steps == 100 and 0.5e-3 < moved < 2e-3


def test_learning_rate_warms_up_then_decays_over_the_runs_last_minutes(train):
    rate = train.learning_rate
    assert rate(1.0, 0, 100) == pytest.approx(0.01) and rate(1.0, 99, 100) == 1.0
    assert rate(1.0, 500, 100) == 1.0 and rate(1.0, 500, 100, seconds_left=5.0) == 1.0
    decay = {"warmup_steps": 100, "decay_seconds": 60.0}
    assert rate(2.0, 500, seconds_left=120.0, **decay) == 2.0  # not yet in the last minute
    assert rate(2.0, 500, seconds_left=30.0, **decay) == pytest.approx(1.0)
    assert rate(2.0, 500, seconds_left=1.0, **decay) == pytest.approx(0.2)  # the floor
    assert rate(2.0, 0, seconds_left=30.0, **decay) == pytest.approx(0.01)  # both at once


def test_decay_needs_a_timed_run_and_freezing_a_trained_text_encoder(train, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--phase", "unet", "--out", str(tmp_path), "--decay-minutes", "2"])
    assert "--decay-minutes needs --minutes" in capsys.readouterr().err
    _config, out = tiny_run(train, tmp_path, unet_cache=0)
    train.run("vae", out, train.StopRule(None, 2), resume=False, bundle=None)
    frozen = train.Machine(frozen_text=True)
    with pytest.raises(SystemExit, match="--freeze-text continues a trained UNet"):
        train.run("unet", out, train.StopRule(None, 2), resume=False, bundle=None, machine=frozen)
    bad = train.Machine(decay_minutes=-1.0)
    with pytest.raises(SystemExit, match="--decay-minutes must be above 0"):
        train.run("unet", out, train.StopRule(1.0, 2), resume=False, bundle=None, machine=bad)
    # Without a latent cache, a frozen run encodes each batch's token ids (and drops captions
    # as ids: it used to mix ids and an embedding, and crash).
    train.run("unet", out, train.StopRule(None, 2), resume=False, bundle=None)
    train.run("unet", out, train.StopRule(None, 4), resume=True, bundle=None, machine=frozen)
    assert train.read_metadata(train.checkpoint_path(out, "unet"))["step"] == 4


def test_stop_rule(train):
    assert train.StopRule(minutes=None, max_steps=3).done(3, 0.0, 1.0)
    assert not train.StopRule(minutes=None, max_steps=3).done(2, 0.0, 1.0)
    assert train.StopRule(minutes=1.0, max_steps=None).done(0, 59.5, 1.0)
    assert not train.StopRule(minutes=1.0, max_steps=None).done(0, 30.0, 1.0)


@pytest.mark.slow
def test_smoke_run_writes_a_loadable_bundle(train, tmp_path):
    from diffusers import StableDiffusionPipeline

    train.main(["--smoke", "--out", str(tmp_path / "run"), "--threads", "1"])
    bundle = tmp_path / "run" / "bundle"
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    assert size <= train.MAX_BUNDLE_BYTES
    pipe = StableDiffusionPipeline.from_pretrained(bundle)
    assert pipe.text_encoder.dtype == pipe.unet.dtype == torch.float32
    image = pipe("a red star on a green floor", num_inference_steps=2).images[0]
    assert image.size == (128, 128)
    runs = json.loads((tmp_path / "run" / "run.json").read_text())["runs"]
    assert [r["phase"] for r in runs] == ["vae", "decoder", "unet"]


def tiny_run(train, tmp_path, **settings):
    """(config, run folder) of a run at batch 2 with tiny widths, plus `settings`."""
    import dataclasses

    tiny = dict(
        vae_channels=(8, 8, 8, 8),
        unet_channels=(32, 32, 32, 32),
        text_hidden=32,
        text_layers=1,
        text_heads=2,
        text_intermediate=32,
    )
    config = dataclasses.replace(train.TrainConfig(), **{**train.SMOKE, **tiny, **settings})
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(config.to_json())
    return config, out


def test_decoder_phase_keeps_the_encoder_and_locks_the_vae_phase(train, tmp_path):
    """The decoder phase may run beside the unet phase only if it never touches the encoder."""
    config, out = tiny_run(train, tmp_path)
    stop = lambda: train.StopRule(minutes=None, max_steps=2)  # noqa: E731
    train.run("vae", out, stop(), resume=False, bundle=None)
    vae_weights = train.load_file(str(train.checkpoint_path(out, "vae")))
    train.run("decoder", out, stop(), resume=False, bundle=None)
    decoder_weights = train.load_file(str(train.checkpoint_path(out, "decoder")))
    names = {k for k in decoder_weights if k.startswith("model.")}
    assert names and all(k.startswith(("model.decoder.", "model.post_quant_conv.")) for k in names)
    assert any(not torch.equal(decoder_weights[k], vae_weights[k]) for k in names)
    vae = train.load_frozen_vae(out, train.build_components(config)["vae"])
    for key, value in vae.state_dict().items():
        source = decoder_weights if f"model.{key}" in names else vae_weights
        assert torch.equal(value.half(), source[f"model.{key}"]), key
    with pytest.raises(SystemExit, match=r"move checkpoints/decoder\.safetensors away"):
        train.run("vae", out, stop(), resume=True, bundle=None)


def test_compact_checkpoint_drops_adam_and_still_resumes(train, tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    ema = [p.detach().clone() for p in module.parameters()]
    path = tmp_path / "unet.safetensors"
    train.save_checkpoint(path, module, optimizer, ema, {"step": 9, "elapsed_s": 2.0})
    before = path.stat().st_size
    after = train.compact_checkpoint(path)
    assert after < before
    assert not any(k.startswith("adam_") for k in train.load_file(str(path)))
    restored = torch.nn.Linear(4, 3)
    fresh = torch.optim.AdamW(restored.parameters())
    meta = train.load_checkpoint(path, restored, fresh, [torch.zeros_like(e) for e in ema])
    assert meta["step"] == 9 and meta["elapsed_s"] == 2.0 and not fresh.state
    assert all(
        torch.allclose(a, b, atol=1e-3)
        for a, b in zip(module.parameters(), restored.parameters(), strict=True)
    )


def test_vae_crops_and_the_unet_latent_cache(train, tmp_path):
    """The VAE may train on crops; the unet phase may sample from posteriors encoded once."""

    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    crops = train.random_crops(images, 4, np.random.default_rng(0))
    assert crops.shape == (2, 3, 4, 4)
    for crop, image in zip(crops, images, strict=True):
        top, left = divmod(int(crop[0, 0, 0] - image[0, 0, 0]), 8)
        assert torch.equal(crop, image[:, top : top + 4, left : left + 4])
    assert train.random_crops(images, 8, np.random.default_rng(0)) is images

    config, out = tiny_run(train, tmp_path, latent_channels=8, vae_crop=64, unet_cache=5)
    stop = lambda: train.StopRule(minutes=None, max_steps=2)  # noqa: E731
    train.run("vae", out, stop(), resume=False, bundle=None)
    train.run("unet", out, stop(), resume=False, bundle=None)
    path = out / "cache" / "unet-latents.safetensors"
    vae = train.load_frozen_vae(out, train.build_components(config)["vae"])
    encoder = train.encoder_fingerprint(out)
    tokenizer = train.build_tokenizer()
    cache = train.latent_cache(config, vae, tokenizer, [], out, encoder)  # read from the file
    assert cache.mean.shape == cache.std.shape == (5, 8, 16, 16) and cache.ids.shape == (5, 77)
    assert cache.mean.dtype == torch.float16 and path.exists()
    # The cached posteriors are the frozen encoder's on the cache stream's images.
    rng = train.batch_rng(config, "cache", 0)
    first, captions = train.training_batch(rng, 5, config.unet_photo_share, [])
    with torch.no_grad():
        expected = vae.encode(first).latent_dist.mean
    assert torch.equal(cache.ids, train.tokenize(tokenizer, captions))
    torch.testing.assert_close(cache.mean.float(), expected, atol=2e-3, rtol=2e-3)
    latents, ids = cache.batch(np.random.default_rng(1), 3, torch.Generator().manual_seed(0), 2.0)
    again, _ = cache.batch(np.random.default_rng(1), 3, torch.Generator().manual_seed(0), 2.0)
    assert latents.shape == (3, 8, 16, 16) and torch.equal(latents, again)
    assert all(any(torch.equal(row, known) for known in cache.ids) for row in ids)
    # Worker processes render the same cache, and a cache of another size is rebuilt.
    bigger = train.dataclasses.replace(config, unet_cache=70)
    grey = [train.Image.fromarray(np.full((300, 400, 3), 200, np.uint8))]
    parallel = train.latent_cache(bigger, vae, tokenizer, grey, out, encoder, workers=2)
    assert len(parallel.ids) == 70
    torch.testing.assert_close(parallel.mean[:5], cache.mean, atol=1e-3, rtol=1e-3)
    rng = train.batch_rng(config, "cache", 64)
    _, late = train.training_batch(rng, 6, config.unet_photo_share, grey)
    assert torch.equal(parallel.ids[64:], train.tokenize(tokenizer, late))


def test_vae_can_move_on_under_the_unet_which_must_then_be_rebased(train, tmp_path):
    _config, out = tiny_run(train, tmp_path, unet_cache=4)
    stop = lambda: train.StopRule(minutes=None, max_steps=2)  # noqa: E731
    train.run("vae", out, stop(), resume=False, bundle=None)
    train.run("unet", out, stop(), resume=False, bundle=None)
    unet_path = train.checkpoint_path(out, "unet")
    first = train.read_metadata(unet_path)
    assert first["encoder"] == train.encoder_fingerprint(out)
    # The VAE trains on under the UNet: its encoder (and so the latents) change.
    train.run("vae", out, train.StopRule(minutes=None, max_steps=4), resume=True, bundle=None)
    assert train.encoder_fingerprint(out) != first["encoder"]
    for phase in ("unet", "export"):
        with pytest.raises(SystemExit, match="--rebase"):
            train.run(phase, out, train.StopRule(None, 4), resume=True, bundle=tmp_path / "b")
    with pytest.raises(SystemExit, match="belongs to --phase unet"):
        train.run("vae", out, stop(), resume=True, bundle=None, rebase=True)
    before = train.load_file(str(unet_path))
    train.run("unet", out, train.StopRule(None, 3), resume=True, bundle=None, rebase=True)
    after = train.read_metadata(unet_path)
    assert after["step"] == 3 and after["encoder"] == train.encoder_fingerprint(out)
    assert after["scaling_factor"] != first["scaling_factor"]
    # The UNet carried on from its weights (one more step), not from a fresh start.
    weights = train.load_file(str(unet_path))
    key = next(k for k in weights if k.startswith("model.unet.conv_in"))
    assert (weights[key].float() - before[key].float()).abs().max() < 0.05
    with train.safe_open(out / "cache" / "unet-latents.safetensors", "pt") as handle:
        assert handle.metadata()["encoder"] == after["encoder"]
    # The run's own edit weights travel into the bundle (validated).
    (out / "dragondiffusion.json").write_text('{"weights": {"move": {"guidance_scale": 1}}}')
    train.run("export", out, stop(), resume=False, bundle=tmp_path / "bundle")
    assert (tmp_path / "bundle" / "unet" / "config.json").exists()
    defaults = EditDefaults.read(tmp_path / "bundle")
    assert defaults.weights("move").guidance_scale == 1.0
    (out / "dragondiffusion.json").write_text('{"weights": {"move": {"cfg": 1}}}')
    with pytest.raises(InputError, match="no weight 'cfg'"):
        train.run("export", out, stop(), resume=False, bundle=tmp_path / "bundle")


def test_a_frozen_text_run_trains_the_unet_alone_on_cached_caption_embeddings(train, tmp_path):
    _config, out = tiny_run(train, tmp_path, unet_cache=4)
    train.run("vae", out, train.StopRule(None, 2), resume=False, bundle=None)
    train.run("unet", out, train.StopRule(None, 2), resume=False, bundle=None)
    path = train.checkpoint_path(out, "unet")
    before = train.load_file(str(path))
    frozen = train.Machine(frozen_text=True)
    train.run("unet", out, train.StopRule(None, 4), resume=True, bundle=None, machine=frozen)
    after = train.load_file(str(path))
    assert train.read_metadata(path)["step"] == 4
    text = [k for k in before if k.startswith("model.text_encoder.")]
    unet = [k for k in before if k.startswith("model.unet.")]
    assert text and all(torch.equal(before[k], after[k]) for k in text)
    assert any(not torch.equal(before[k], after[k]) for k in unet)
    assert json.loads((out / "run.json").read_text())["runs"][-1]["machine"]["frozen_text"]
    with pytest.raises(SystemExit, match="--freeze-text belongs to --phase unet"):
        train.run("vae", out, train.StopRule(None, 3), resume=True, bundle=None, machine=frozen)
    # A frozen run's loss is the unfrozen one's: its embeddings come from the text encoder as
    # it is at the first step (the checkpoint's, loaded after the phase is built), not as built.
    config = train.load_config(out, smoke=False)
    losses = []
    for freeze in (False, True):
        parts = train.build_components(config)
        phase = train.unet_phase(config, parts, out, rebase=False, frozen_text=freeze)
        train.load_checkpoint(path, phase.module)
        with torch.no_grad():
            for p in parts["text_encoder"].parameters():
                p.mul_(1.5)
        losses.append(phase.step_loss(7)[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # The cached embeddings are the text encoder's, row for row, and batches hand them out.
    parts = train.build_components(config)
    vae = train.load_frozen_vae(out, parts["vae"])
    cache = train.latent_cache(
        config, vae, parts["tokenizer"], [], out, train.encoder_fingerprint(out)
    )
    model = train.Denoiser(
        parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"]
    )
    full = cache.with_contexts(model, torch.float32, chunk=3)
    with torch.no_grad():
        expected = model.encode(cache.ids, torch.device("cpu"))
    torch.testing.assert_close(full.contexts, expected)
    _, contexts = full.batch(np.random.default_rng(1), 5, torch.Generator().manual_seed(0), 1.0)
    assert contexts.shape == (5, *expected.shape[1:])
    assert all(any(torch.equal(row, known) for known in expected) for row in contexts)


def test_min_snr_weighting_takes_weight_off_clean_timesteps(train):
    scheduler = train.DDIMScheduler(**train.SD15_SCHEDULER)
    steps = torch.tensor([0, 100, 200, 500, 999])
    weights = train.snr_weights(scheduler, steps, 5.0)
    alphas = scheduler.alphas_cumprod[steps]
    snr = alphas / (1 - alphas)
    # Clean timesteps (SNR > γ) get γ / SNR < 1; noisy ones (SNR ≤ γ) keep weight 1.
    assert torch.all(weights[snr > 5] < 1) and torch.all(weights[snr <= 5] == 1)
    assert weights[0] < weights[1] < weights[2] and (snr[:2] > 5).all() and (snr[3:] < 5).all()
    # The weighted loss is the plain MSE where every weight is 1, and smaller on clean steps.
    torch.manual_seed(0)
    unet = torch.nn.Conv2d(4, 4, 1)
    model = train.Denoiser(
        unet=lambda x, t, c: type("Out", (), {"sample": unet(x)}),
        text_encoder=lambda ids: (torch.zeros(len(ids), 2, 3),),
        tokenizer=None,
        scheduler=scheduler,
    )
    latents, context = torch.randn(3, 4, 8, 8), torch.zeros(3, 2, 3)

    def loss(t, gamma):
        generator = torch.Generator().manual_seed(1)
        return train.denoising_loss(model, latents, context, generator, t, min_snr_gamma=gamma)

    noisy, clean = torch.full((3,), 900), torch.full((3,), 10)
    torch.testing.assert_close(loss(noisy, 5.0), loss(noisy, None))
    assert loss(clean, 5.0) < 0.5 * loss(clean, None)


def test_a_machine_changes_one_run_and_run_json_records_it(train, tmp_path):
    config, out = tiny_run(train, tmp_path, unet_cache=4)
    stop = lambda: train.StopRule(minutes=None, max_steps=2)  # noqa: E731
    train.run("vae", out, stop(), resume=False, bundle=None)
    machine = train.Machine(device="cpu", workers=2, batch=3, cache=6)
    train.run("unet", out, stop(), resume=False, bundle=None, machine=machine)
    last = json.loads((out / "run.json").read_text())["runs"][-1]
    assert last["phase"] == "unet" and last["device_name"] == "cpu"
    assert last["machine"] == {
        "device": "cpu",
        "workers": 2,
        "batch": 3,
        "cache": 6,
        "checkpoint_minutes": None,
        "decay_minutes": None,
        "frozen_text": False,
    }
    # config.json keeps the run's own settings; the cache was built at this run's size.
    assert train.TrainConfig.from_json((out / "config.json").read_text()) == config
    with train.safe_open(out / "cache" / "unet-latents.safetensors", "pt") as handle:
        assert len(json.loads(handle.metadata()["captions"])) == 6
    # A phase started afresh (step 0) resets its totals; a resumed one adds to them.
    train.record_run(out, "unet", 2, 5, 10.0)
    train.record_run(out, "unet", 0, 4, 7.0)
    assert json.loads((out / "run.json").read_text())["totals"]["unet"] == {
        "steps": 4,
        "seconds": 7.0,
    }
    assert machine.apply(config, "vae").vae_batch == 3
    often = train.Machine(checkpoint_minutes=0.5).apply(config, "unet")
    assert often.checkpoint_minutes == 0.5 and often.unet_batch == config.unet_batch
    assert machine.apply(config, "unet").unet_batch == 3


def test_training_summary_counts_only_the_runs_behind_each_current_checkpoint(train, tmp_path):
    def run(phase, first, last, seconds, **extra):
        return {
            "phase": phase,
            "steps": [first, last],
            "seconds": seconds,
            "torch": "2+cpu",
        } | extra

    gpu = {"device_name": "GPU X", "machine": {"device": "cuda", "batch": 256}}
    runs = [
        run("vae", 0, 100, 3600.0),
        run("unet", 0, 50, 999.0),  # discarded: the unet phase started afresh later
        run("unet", 0, 40, 1800.0),
        run("unet", 40, 1040, 360.0, **gpu),
        run("unet", 1040, 2040, 360.0, **gpu),
    ]
    (tmp_path / "run.json").write_text(json.dumps({"runs": runs, "totals": {}}))
    (tmp_path / "config.json").write_text(json.dumps({"vae_batch": 16, "unet_batch": 32}))
    rows = [
        line.split(" | ")
        for line in train.training_summary(tmp_path / "run.json").splitlines()
        if line.startswith("| vae |") or line.startswith("| unet |")
    ]
    assert [r[1:7] for r in rows] == [
        ["cpu", "1", "100", "1.00", "16", "1600"],
        ["cpu", "1", "40", "0.50", "32", "1280"],
        ["GPU X", "2", "2000", "0.20", "256", "512000"],
    ]


def test_render_workers_end_even_when_a_stop_rule_handles_sigterm(train):
    # StopRule.install() swallows SIGTERM (it only sets a flag) and forked workers inherited it,
    # so Pool.terminate() could wait forever for them (a CI run hung so). Run in a child process.
    program = f"""
import importlib.util, multiprocessing, os, signal, sys, time
spec = importlib.util.spec_from_file_location("train_demo_model", {str(SCRIPT)!r})
train = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = train
spec.loader.exec_module(train)
train.StopRule(minutes=None, max_steps=None).install()
pool = train.render_pool(2)
assert pool.map(abs, [-1, -2, -3]) == [1, 2, 3]
pool.terminate()  # sends SIGTERM to the workers and joins them
pool.join()

def worker():
    train._worker_signals()  # what render_pool's workers run first
    time.sleep(60)

process = multiprocessing.get_context("fork").Process(target=worker)
process.start()
time.sleep(1)
os.kill(process.pid, signal.SIGTERM)
process.join(timeout=20)
print(process.exitcode, flush=True)
if process.exitcode is None:
    process.kill()
"""
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=100
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "-15"  # ended by the signal, not still waiting
    assert train.render_pool(1) is None  # one worker: render in this process
