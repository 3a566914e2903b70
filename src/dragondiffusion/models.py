"""Loading an SD-1.x-format bundle: device and dtype choice, clear errors for bad bundles."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .edit_defaults import EditDefaults
from .errors import InputError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
DEVICE_TYPES = ("cpu", "cuda", "mps")
"""The torch device types an edit runs on (others, such as meta, hold no numbers)."""
EMBEDDED_MODEL = Path(__file__).parent / "demo_model"
EMBEDDED_NAME = "dragondiffusion/demo_model"
"""The embedded model's name in records and reports (its folder moves with the install)."""
EMBEDDED_MAX_BYTES = 30_000_000
"""Size budget of the embedded bundle (issue 5)."""


TORCHVISION_ADVICE = "ImageProcessor` requires torchvision"
"""The start of transformers' warning, on loading an SD pipeline without torchvision, that the
CLIP and SigLIP image processors fall back to PIL: see `quiet_torchvision_advice`."""


@contextlib.contextmanager
def quiet_torchvision_advice() -> Iterator[None]:
    """Hide, while the block runs, transformers' advice to install torchvision.

    Loading an SD pipeline makes diffusers look up transformers' CLIP and SigLIP image
    processors; without torchvision, which this package does not use (each torchvision
    release pins one torch release, and its PyPI build need not import beside the torch in
    use), transformers warns once per process and class that they fall back to PIL and to
    install torchvision. The PIL processors do the same work (the IP-Adapter's CLIP
    preprocessing runs on them): the advice would only mislead.
    """
    logger = logging.getLogger("transformers.utils.import_utils")

    def advice_hidden(record: logging.LogRecord) -> bool:
        return TORCHVISION_ADVICE not in record.getMessage()

    logger.addFilter(advice_hidden)
    try:
        yield
    finally:
        logger.removeFilter(advice_hidden)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else the best available: cuda, then mps, then cpu."""
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
        if device.type not in DEVICE_TYPES:
            raise InputError(f"unsupported device {str(device)!r}; use cpu, cuda, cuda:N or mps")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(
                "device cuda was asked for but no CUDA GPU is available; use --device cpu"
            )
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise InputError(
                f"device {device} was asked for but this machine has {torch.cuda.device_count()} "
                f"CUDA GPU(s); use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
        mps = getattr(torch.backends, "mps", None)
        if device.type == "mps" and (mps is None or not mps.is_available()):
            raise InputError("device mps was asked for but MPS is not available; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """The given dtype, else float16 on CUDA and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise InputError(f"dtype {dtype} holds no fractions; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype is not None:
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return torch.float16 if device.type == "cuda" else torch.float32


def default_model() -> str:
    """The embedded demo model shipped in the package."""
    if not (EMBEDDED_MODEL / "model_index.json").is_file():
        raise InputError(
            "this install has no embedded demo model yet; pass --model with a local Stable "
            "Diffusion 1.x folder or a hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)"
        )
    return str(EMBEDDED_MODEL)


def check_bundle(path: Path) -> None:
    """Raise InputError naming what a local folder lacks to be an SD-1.x diffusers bundle."""
    if path.exists() and not path.is_dir():
        raise InputError(f"model {str(path)!r} is a file; give the bundle's folder")
    if not path.is_dir():
        raise InputError(f"model folder {str(path)!r} does not exist")
    if not (path / "model_index.json").is_file():
        raise InputError(
            f"{str(path)!r} is not a diffusers bundle (no model_index.json); save one with "
            "StableDiffusionPipeline.save_pretrained or convert a .safetensors checkpoint with "
            "StableDiffusionPipeline.from_single_file(...).save_pretrained(folder)"
        )
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise InputError(f"model folder {str(path)!r} lacks {', '.join(missing)}")


def load(
    model: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
):
    """Load a DragonPipeline from a local SD-1.x bundle folder or a hub id, ready to edit.

    `model=None` loads the embedded demo model. The device defaults to cuda > mps > cpu and the
    dtype to float16 on CUDA, float32 elsewhere.
    """
    if model is not None and not isinstance(model, str | os.PathLike):
        raise InputError(f"model must be a folder or a hub id, not {model!r}")
    name = default_model() if model is None else os.fspath(model)
    if not name.strip():
        raise InputError("model is empty; give a bundle folder or a hub id, or leave it out")
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(torch_device, dtype)
    local = Path(name).expanduser()
    defaults = EditDefaults()
    if local.exists() or name.startswith((".", "/", "~")):
        check_bundle(local)
        defaults = EditDefaults.read(local)
        name = str(local)
    try:
        with quiet_torchvision_advice():  # importing and loading SD's pipeline looks them up
            from .pipeline import DragonPipeline

            pipe = DragonPipeline.from_pretrained(
                name, dtype=torch_dtype, safety_checker=None, requires_safety_checker=False
            )
    except (OSError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        fix = (
            "Give a local bundle folder; this process is offline (HF_HUB_OFFLINE), so a hub id "
            "loads only from the local cache"
            if offline
            else "Give a local bundle folder, or a hub id with network access (set "
            "HF_HUB_OFFLINE=1 to use only the local cache)"
        )
        raise InputError(f"could not load model {name!r}: {err}. {fix}") from err
    embedded = local.exists() and local.resolve() == EMBEDDED_MODEL.resolve()
    pipe.model_name = EMBEDDED_NAME if embedded else name
    pipe.edit_defaults = defaults
    return pipe.to(torch_device)
