"""The naive baseline of the quality benchmark: cut, paste and inpaint, no model.

- move / resize: the object (its mask grown by 1 px, so that its anti-aliased edge comes along)
  is cut out, moved and scaled about the handle (bilinear), and pasted over the input whose hole
  (the mask grown by 2 px) is filled by OpenCV's Telea inpainting;
- appearance: the object's pixels get the reference object's colours by per-channel histogram
  matching (scikit-image), its shape and place untouched;
- drag: the disk of 1.5 feature cells around the handle is cut and pasted at the target, the
  hole inpainted as for a move;
- paste: the reference object's pixels (its mask) copied at the offset, nothing inpainted.

OpenCV (`opencv-python-headless`, in the `bench` extra) is imported only here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from skimage.exposure import match_histograms

from ..errors import InputError
from ..geometry import Point, dilate

INPAINT_RADIUS = 3
"""Telea's neighbourhood radius in pixels."""


def require_cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise InputError(
            "the naive baseline needs OpenCV for inpainting: pip install "
            "'dragondiffusion[bench]' (opencv-python-headless), or run without the baseline "
            "(--no-baseline)"
        ) from None
    return cv2


def inpaint(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """The uint8 (H, W, 3) image with the (H, W) bool hole filled by Telea's method."""
    cv2 = require_cv2()
    return cv2.inpaint(image, hole.astype(np.uint8) * 255, INPAINT_RADIUS, cv2.INPAINT_TELEA)


def transformed_layer(
    image: np.ndarray, mask: np.ndarray, source: Point, target: Point, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """The masked part of the image moved so that `source` lands on `target` and scaled about
    it (bilinear): (colour (H, W, 3) float, coverage (H, W) in [0, 1]).

    Points are continuous pixel coordinates (pixel (i, j) covers [j, j+1) × [i, i+1)); OpenCV
    puts pixel centres at integers, hence the half-pixel terms.
    """
    cv2 = require_cv2()
    offset = [target[k] - 0.5 + scale * (0.5 - source[k]) for k in (0, 1)]
    matrix = np.array([[scale, 0.0, offset[0]], [0.0, scale, offset[1]]])
    h, w = mask.shape
    flags = cv2.INTER_LINEAR
    colour = cv2.warpAffine(image.astype(np.float32), matrix, (w, h), flags=flags)
    coverage = cv2.warpAffine(mask.astype(np.float32), matrix, (w, h), flags=flags)
    return colour.astype(np.float64), np.clip(coverage, 0.0, 1.0).astype(np.float64)


def composite(below: np.ndarray, colour: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """A layer painted over a uint8 image, rounded back to uint8."""
    out = coverage[..., None] * colour + (1.0 - coverage[..., None]) * below
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def cut_and_paste(
    image: np.ndarray, mask: np.ndarray, source: Point, target: Point, scale: float = 1.0
) -> np.ndarray:
    """Move the masked content (grown by 1 px) from `source` to `target`, scaled about it, over
    the image with the content's old place (grown by 2 px) inpainted."""
    background = inpaint(image, dilate(mask, 2))
    colour, coverage = transformed_layer(image, dilate(mask, 1), source, target, scale)
    return composite(background, colour, coverage)


def recolour(
    image: np.ndarray, mask: np.ndarray, reference: np.ndarray, reference_mask: np.ndarray
) -> np.ndarray:
    """The masked pixels' colours matched, channel by channel, to the reference object's."""
    out = image.copy()
    matched = match_histograms(image[mask][None], reference[reference_mask][None], channel_axis=-1)
    out[mask] = np.clip(np.round(matched[0]), 0, 255).astype(np.uint8)
    return out


def disk(shape: tuple[int, int], centre: Point, radius: float) -> np.ndarray:
    """(H, W) bool: pixels whose centre lies within `radius` of `centre`."""
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    return (xs + 0.5 - centre[0]) ** 2 + (ys + 0.5 - centre[1]) ** 2 <= radius**2


def baseline(edit: str, arguments: dict[str, Any], cell_px: float) -> np.ndarray:
    """The baseline's result for a pipeline call `edit(**arguments)` (images as uint8 arrays,
    masks as bool arrays, as `demo.Example` holds them); `cell_px`: a feature cell in pixels."""
    a = arguments
    image = a["image"]
    if edit == "move":
        return cut_and_paste(image, a["mask"], a["source"], a["target"], a.get("scale", 1.0))
    if edit == "appearance":
        return recolour(image, a["mask"], a["reference"], a["reference_mask"])
    if edit == "drag":
        out = image
        for handle, target in a["points"]:
            out = cut_and_paste(out, disk(image.shape[:2], handle, 1.5 * cell_px), handle, target)
        return out
    if edit == "paste":
        colour, coverage = transformed_layer(
            a["reference"], a["reference_mask"], (0.0, 0.0), a["offset"]
        )
        return composite(image, colour, coverage)
    raise ValueError(f"no baseline for edit {edit!r}")
