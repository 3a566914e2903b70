"""Reading user images and masks, and writing results atomically with their parameters."""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import PIL.PngImagePlugin

from .errors import InputError

RECORD_KEY = "dragondiffusion"


def open_image(path: Path, what: str) -> PIL.Image.Image:
    """The image in the file at `path`, read in full; InputError for a file that is missing, not
    an image, damaged or too large to decode safely."""
    if not path.is_file():
        raise InputError(f"{what} file {str(path)!r} does not exist; check the path")
    name = repr(str(path))
    try:
        with PIL.Image.open(path) as im:
            im.load()
            return im
    except PIL.Image.DecompressionBombError as err:
        raise InputError(
            f"{what} file {name} is too large: {bomb_size(err)}; downscale it"
        ) from None
    except PIL.UnidentifiedImageError:
        raise InputError(
            f"{what} file {name} is not an image Pillow can read; give a PNG or JPEG"
        ) from None
    except PermissionError:
        raise InputError(f"{what} file {name} may not be read; check its permissions") from None
    except (OSError, SyntaxError, EOFError):
        raise InputError(f"{what} file {name} is truncated or damaged; re-save it") from None


def bomb_size(err: PIL.Image.DecompressionBombError) -> str:
    """The "N pixels, at most M" of Pillow's refusal to decode a huge image."""
    limit = 2 * (PIL.Image.MAX_IMAGE_PIXELS or 0)  # Pillow refuses twice its warning size
    found = re.search(r"\((\d+) pixels\)", str(err))
    pixels = f"{int(found[1]):,} pixels" if found else "too many pixels"
    return f"{pixels}, at most {limit:,}"


def read_upright(path: Path, what: str) -> PIL.Image.Image:
    """The image file at `path` as viewers show it: turned by its EXIF orientation (a phone
    photo's). Only files: an image or array the caller made is taken as it is, like the masks
    and points the caller made on it."""
    return PIL.ImageOps.exif_transpose(open_image(path, what))


def high_bit(image: PIL.Image.Image) -> bool:
    """Whether `image` is greyscale of more than 8 bits (Pillow modes I;16*, I, F)."""
    return image.mode.startswith("I;16") or image.mode in ("I", "F")


def eight_bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """A greyscale image of more than 8 bits as 8-bit ("L") by value, where Pillow's own
    conversion clips it white: 16-bit levels /257 (mode I only when they exceed 255: it also
    holds 8-bit data); floats ×255 when they lie in [0, 1], else as they are; clipped to
    [0, 255]. Other images as they are."""
    if not high_bit(image):
        return image
    levels = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        finite = levels[np.isfinite(levels)]
        in_unit = finite.size > 0 and finite.min() >= 0 and finite.max() <= 1
        levels = np.nan_to_num(levels * 255 if in_unit else levels)
    elif image.mode != "I" or levels.max() > 255:
        levels = levels / 257
    return PIL.Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8))


def load_image(image: str | os.PathLike | PIL.Image.Image | np.ndarray, what: str = "image"):
    """An RGB PIL image from a path, a PIL image or an (H, W[, 1|3|4]) uint8 array.

    Files are turned upright by their EXIF orientation, as viewers show them (and as masks are
    drawn on them); 16-bit greyscale is scaled to 8 bits (`eight_bit`); alpha is dropped.
    """
    if isinstance(image, (str, os.PathLike)):
        image = read_upright(Path(image), what)
    elif isinstance(image, np.ndarray):
        image = PIL.Image.fromarray(image_array(image, what))
    if not isinstance(image, PIL.Image.Image):
        raise InputError(f"{what} must be a path, a PIL image or a uint8 array, not {type(image)}")
    image = eight_bit(image)
    if image.width < 8 or image.height < 8:
        raise InputError(f"{what} is {image.width}×{image.height}; give an image of at least 8×8")
    return image.convert("RGB")


def image_array(image: np.ndarray, what: str) -> np.ndarray:
    """A uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image array as Pillow takes it: (H, W),
    (H, W, 3) or (H, W, 4) (RGBA)."""
    channels = image.shape[2] if image.ndim == 3 else None
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or channels not in (None, 1, 3, 4):
        raise InputError(
            f"{what} array must be uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got "
            f"{image.dtype} {image.shape}"
        )
    return image[..., 0] if channels == 1 else image


def load_mask(mask, size: tuple[int, int], what: str = "mask") -> np.ndarray:
    """A boolean (H, W) array from a path, PIL image or array; white/non-zero/True = selected.

    `size` is the (width, height) of the image the mask belongs to; sizes must match. Files are
    turned upright by their EXIF orientation, as `load_image` turns the image. A mask whose
    values are exactly 0 and 1 (as segmentation tools save them, 8 or 16 bits) selects its 1s;
    any other selects its white (>127; 16-bit: above half its range).
    """
    if isinstance(mask, (str, os.PathLike)):
        mask = read_upright(Path(mask), what)
    if isinstance(mask, PIL.Image.Image):
        levels = image_levels(mask)
    elif isinstance(mask, np.ndarray):
        levels = array_levels(mask)
    else:
        raise InputError(f"{what} must be a path, a PIL image or an array, not {type(mask)}")
    if levels.ndim != 2 or (levels.shape[1], levels.shape[0]) != tuple(size):
        shown = (
            f"{levels.shape[1]}×{levels.shape[0]}"
            if levels.ndim == 2
            else f"an array of shape {levels.shape}"
        )
        raise InputError(
            f"{what} is {shown} but the image is {size[0]}×{size[1]}; draw the mask on the same "
            "image"
        )
    return selected(levels, what)


def image_levels(mask: PIL.Image.Image) -> np.ndarray:
    """A mask image's uint8 levels: its greyscale, or its opacity when only that varies; a
    greyscale of more than 8 bits holding only 0 and 1: those, as booleans."""
    if high_bit(mask):
        raw = np.asarray(mask)
        if raw.min() == 0 and raw.max() == 1:
            return raw == 1
        mask = eight_bit(mask)
    if "A" in mask.getbands() and mask.mode != "L":
        alpha = np.asarray(mask.getchannel("A"))
        grey = np.asarray(mask.convert("L"))
        # A transparent PNG drawn over nothing marks the mask by opacity.
        return alpha if grey.max() == grey.min() else grey
    return np.asarray(mask.convert("L"))


def array_levels(mask: np.ndarray) -> np.ndarray:
    """A mask array's uint8 levels (any channel counts), or, for other dtypes, its values > 0.5."""
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    return mask if mask.dtype in (np.uint8, bool) else mask > 0.5


def selected(levels: np.ndarray, what: str) -> np.ndarray:
    """The selected pixels of (H, W) mask levels: True, 1 of a 0/1 mask, else white (>127)."""
    if levels.dtype == bool:
        chosen = levels
    elif levels.max() == 1 and levels.min() == 0:
        chosen = levels == 1
    else:
        chosen = levels > 127
    if chosen.any():
        return chosen
    brightest = int(levels.max())
    if brightest == 0:
        raise InputError(f"{what} is empty (no white pixels); draw the region to use")
    raise InputError(
        f"{what} has no white pixels (its brightest is {brightest} of 255): white (>127) marks "
        "the region, black the rest; draw the region in white"
    )


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it onto `path`.

    The folder is made if need be; InputError when it, the temporary file or the rename cannot
    be made there. What write() raises goes through as it is; the temporary file never stays.
    """
    path = Path(path)
    tmp = temporary_beside(path)
    try:
        write(tmp)
        try:
            sync(tmp)
            os.replace(tmp, path)
        except OSError as err:
            raise unwritable(path, err) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def temporary_beside(path: Path) -> str:
    """A new empty file beside `path`, its folder made if need be, for `atomic_write`."""
    # Not mkstemp: its files are owner-only (0600); this one gets a new file's usual permissions.
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as err:
        raise unwritable(path, err) from None
    return tmp


def folder_problem(folder: Path) -> str | None:
    """Why no file can be made in `folder` (made first where missing): its nearest existing
    ancestor is not a folder, or not one this process may make files in (tried with a
    temporary file: os.access lets root "write" in /proc); None where one can."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{str(folder)!r} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError:
        return f"cannot write in {str(folder)!r}"


def unwritable(path: Path, err: OSError) -> InputError:
    """The error for a `path` that cannot be written, with the system's reason."""
    return InputError(f"cannot write {str(path)!r} ({err.strerror or err}); choose another path")


def sync(path: str) -> None:
    """Make the file at `path` reach the disk, so a crash cannot leave an empty one renamed
    (where the file system cannot, as some network ones, the file is left as written)."""
    fd = os.open(path, os.O_RDWR)  # Windows syncs writable handles only
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def save_png(image: PIL.Image.Image, path: str | os.PathLike, record: dict) -> Path:
    """Write `image` as PNG with `record` as JSON in a text chunk, atomically; `path` must end
    in .png (the record lives in PNG metadata: another name would hold PNG bytes)."""
    if not isinstance(path, str | os.PathLike) or Path(path).suffix.lower() != ".png":
        raise InputError(
            f"output path {path!r} must end in .png (the parameters live in PNG metadata)"
        )
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text(RECORD_KEY, json.dumps(record, sort_keys=True))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_record(path: str | os.PathLike) -> dict:
    """The parameter record stored in a PNG written by `save_png`."""
    image = open_image(Path(path), "result")
    text = image.text.get(RECORD_KEY) if hasattr(image, "text") else None
    if text is None:
        raise InputError(f"{path} carries no dragondiffusion record")
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        raise InputError(f"{path}: its dragondiffusion record is damaged (not a JSON object)")
    return record
