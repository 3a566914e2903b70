"""Reading user images and masks, and writing results atomically with their parameters."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.PngImagePlugin

from .errors import InputError

RECORD_KEY = "dragondiffusion"


def load_image(image: str | os.PathLike | PIL.Image.Image | np.ndarray, what: str = "image"):
    """An RGB PIL image from a path, a PIL image or an (H, W[, 3]) uint8 array."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"{what} file {str(path)!r} does not exist; check the path")
        try:
            with PIL.Image.open(path) as im:
                image = im.convert("RGB")
        except PIL.UnidentifiedImageError:
            raise InputError(f"{what} file {str(path)!r} is not an image Pillow can read") from None
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise InputError(
                f"{what} array must be uint8 (H, W) or (H, W, 3); got {image.dtype} {image.shape}"
            )
        image = PIL.Image.fromarray(image)
    if not isinstance(image, PIL.Image.Image):
        raise InputError(f"{what} must be a path, a PIL image or a uint8 array, not {type(image)}")
    if image.width < 8 or image.height < 8:
        raise InputError(f"{what} is {image.width}×{image.height}; give an image of at least 8×8")
    return image.convert("RGB")


def load_mask(mask, size: tuple[int, int], what: str = "mask") -> np.ndarray:
    """A boolean (H, W) array from a path, PIL image or array; white/non-zero/True = selected.

    `size` is the (width, height) of the image the mask belongs to; sizes must match.
    """
    if isinstance(mask, np.ndarray) and mask.dtype == bool:
        arr = mask
    else:
        if isinstance(mask, (str, os.PathLike)):
            path = Path(mask)
            if not path.is_file():
                raise InputError(f"{what} file {str(path)!r} does not exist; check the path")
            with PIL.Image.open(path) as im:
                im.load()
                mask = im
        if isinstance(mask, PIL.Image.Image):
            if "A" in mask.getbands() and mask.mode != "L":
                alpha = np.asarray(mask.getchannel("A"))
                rgb = np.asarray(mask.convert("L"))
                # A transparent PNG drawn over nothing marks the mask by opacity.
                arr = alpha > 127 if rgb.max() == rgb.min() else rgb > 127
            else:
                arr = np.asarray(mask.convert("L")) > 127
        elif isinstance(mask, np.ndarray):
            if mask.ndim == 3:
                mask = mask.max(axis=2)
            arr = mask > (127 if mask.dtype == np.uint8 else 0.5)
        else:
            raise InputError(f"{what} must be a path, a PIL image or an array, not {type(mask)}")
    if arr.ndim != 2 or (arr.shape[1], arr.shape[0]) != tuple(size):
        raise InputError(
            f"{what} is {arr.shape[1] if arr.ndim == 2 else '?'}×{arr.shape[0]} but the image is "
            f"{size[0]}×{size[1]}; draw the mask on the same image"
        )
    if not arr.any():
        raise InputError(f"{what} is empty (no white pixels); draw the region to use")
    return arr


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are owner-only (0600); this one gets a new file's usual permissions.
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_png(image: PIL.Image.Image, path: str | os.PathLike, record: dict) -> Path:
    """Write `image` as PNG with `record` as JSON in a text chunk, atomically."""
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text(RECORD_KEY, json.dumps(record, sort_keys=True))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_record(path: str | os.PathLike) -> dict:
    """The parameter record stored in a PNG written by `save_png`."""
    with PIL.Image.open(path) as im:
        text = im.text.get(RECORD_KEY) if hasattr(im, "text") else None
    if text is None:
        raise InputError(f"{path} carries no dragondiffusion record")
    return json.loads(text)
