import importlib.util
import json
import shutil

import pytest
import torch

import dragondiffusion
from dragondiffusion.errors import InputError
from dragondiffusion.models import pick_device, pick_dtype


def test_device_and_dtype_defaults():
    assert pick_device("cpu").type == "cpu"
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cuda")) == torch.float16
    assert pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(InputError, match="unknown dtype"):
        pick_dtype(torch.device("cpu"), "int3")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            pick_device("cuda")


def test_missing_folder_and_components(tmp_path, tiny_bundle):
    with pytest.raises(InputError, match="does not exist"):
        dragondiffusion.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no model_index\.json"):
        dragondiffusion.load(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    shutil.rmtree(broken / "vae")
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(InputError, match="lacks vae, tokenizer"):
        dragondiffusion.load(broken)


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(InputError, match="could not load model"):
        dragondiffusion.load("nobody/not-a-model")


def test_v_prediction_model_is_refused(tmp_path, tiny_bundle):
    vpred = tmp_path / "vpred"
    shutil.copytree(tiny_bundle, vpred)
    cfg_path = vpred / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="epsilon"):
        dragondiffusion.load(vpred)


def test_non_sd_unet_is_refused(tmp_path, tiny_bundle):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_bundle, plain)
    cfg_path = plain / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["down_block_types"] = ["DownBlock2D"] * 4
    cfg["up_block_types"] = ["UpBlock2D"] * 4
    cfg_path.write_text(json.dumps(cfg))
    (plain / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_config(cfg).save_pretrained(plain / "unet")
    with pytest.raises(InputError, match="decoder self-attention"):
        dragondiffusion.load(plain)


def test_loaded_pipeline_is_configured_like_sd15(pipe):
    cfg = pipe.scheduler.config
    assert cfg.timestep_spacing == "leading" and cfg.steps_offset == 1
    assert pipe.native_resolution == 128 and pipe.size_multiple == 64
    assert pipe.working_size((160, 96)) == (192, 128)
    assert pipe.working_size((160, 96), resolution=256) == (320, 192)
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_unavailable_mps_is_a_clear_error():
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(InputError, match="MPS is not available"):
        pick_device("mps")


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None, reason="torchvision installed: no fallback"
)
def test_loading_prints_no_advice_to_install_torchvision(tiny_bundle):
    """Without torchvision (as here: the package does not use it), transformers warns, on the
    first pipeline load of a process, that its image processors fall back to PIL and to install
    torchvision (measured: both lines gone with `quiet_torchvision_advice`, two without)."""
    import subprocess
    import sys

    code = f"from dragondiffusion.models import load; load({str(tiny_bundle)!r}, 'cpu')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torchvision" not in done.stderr + done.stdout
