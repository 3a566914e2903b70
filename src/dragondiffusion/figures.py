"""Pictures for people: labelled grids of images, mask outlines and arrows (Pillow only).

The demo's contact sheet and the model report's figures are built from these.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .geometry import Point

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
OUTLINE = (255, 255, 255)
ARROW = (255, 40, 200)
GAP = 8
"""Pixels between cells and around the sheet."""


def font(size: int = 14) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at `size` pixels (a bitmap font where FreeType is missing)."""
    return ImageFont.load_default(size=size)


def fit(image: Image.Image, cell: int, height: int | None = None) -> Image.Image:
    """The image scaled to fit a cell × height box (default: a square), keeping its aspect ratio.

    Integer enlargements use nearest-neighbour, so small images stay crisp pixel for pixel.
    """
    k = min(cell / image.width, (cell if height is None else height) / image.height)
    size = (max(1, round(image.width * k)), max(1, round(image.height * k)))
    crisp = k >= 1 and k == int(k)
    resample = Image.Resampling.NEAREST if crisp else Image.Resampling.LANCZOS
    return image.convert("RGB").resize(size, resample)


def outline(image: Image.Image, mask: np.ndarray, colour=OUTLINE) -> Image.Image:
    """A copy of the image with the border of the (H, W) bool mask drawn over it, 1 px wide."""
    m = Image.fromarray(mask.astype(np.uint8) * 255)
    edge = np.asarray(m.filter(ImageFilter.MaxFilter(3))) > np.asarray(m)
    out = np.array(image.convert("RGB"))
    out[edge] = colour
    return Image.fromarray(out)


def draw_arrow(draw: ImageDraw.ImageDraw, start: Point, end: Point, colour=ARROW, width: int = 2):
    """An arrow from `start` to `end` (pixels) with a head of about 4 line widths."""
    draw.line([start, end], fill=colour, width=width)
    angle = math.atan2(end[1] - start[1], end[0] - start[0])
    head = 4 * width + 2
    for turn in (2.6, -2.6):
        tip = (end[0] + head * math.cos(angle + turn), end[1] + head * math.sin(angle + turn))
        draw.line([end, tip], fill=colour, width=width)


def annotate(
    image: Image.Image,
    cell: int,
    masks: Sequence[np.ndarray] = (),
    arrows: Sequence[tuple[Point, Point]] = (),
) -> Image.Image:
    """The image fitted to a cell with mask outlines and arrows (given in image pixels) on it."""
    for mask in masks:
        image = outline(image, mask)
    k = cell / max(image.size)
    shown = fit(image, cell)
    draw = ImageDraw.Draw(shown)
    for start, end in arrows:
        draw_arrow(draw, (start[0] * k, start[1] * k), (end[0] * k, end[1] * k))
    return shown


def inset(image: Image.Image, small: Image.Image, share: float = 0.4) -> Image.Image:
    """A copy of `image` with `small`, scaled to `share` of its width, framed in its upper right."""
    side = round(image.width * share)
    thumb = small.convert("RGB").resize(
        (side, round(small.height * side / small.width)), Image.Resampling.LANCZOS
    )
    out = image.convert("RGB").copy()
    x, y = out.width - thumb.width - 3, 3
    ImageDraw.Draw(out).rectangle(
        [x - 2, y - 2, x + thumb.width + 1, y + thumb.height + 1], BACKGROUND
    )
    out.paste(thumb, (x, y))
    return out


def _text_block(text: str, width: int, face) -> list[str]:
    """Lines of `text` wrapped to about `width` pixels in `face`."""
    sample = max(1.0, face.getlength("abcdefghijklmnopqrstuvwxyz") / 26)
    lines: list[str] = []
    for paragraph in text.split("\n"):
        lines += textwrap.wrap(paragraph, max(4, int(width / sample))) or [""]
    return lines


def _line_height(face) -> int:
    return round(getattr(face, "size", 11) * 1.3)


def header_height(titled: bool = False) -> int:
    """Pixels above the first row of a contact sheet: margin, optional title, column labels."""
    title = round(font(18).size * 1.6) if titled else 0
    return GAP + title + _line_height(font(14)) + GAP


def contact_sheet(
    rows: Sequence[Sequence[Image.Image | None]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    cell: int = 256,
    label_width: int = 200,
    title: str | None = None,
    cell_height: int | None = None,
) -> Image.Image:
    """A white sheet: a header of column labels, then one row per entry of `rows`.

    Each row starts with its (wrapped) label and holds one image per column, fitted to a
    cell × cell_height box (default square) and centred; None leaves a cell empty. The sheet is
    header_height(title is not None) + len(rows)·(cell_height + GAP) pixels high.
    """
    high = cell if cell_height is None else cell_height
    if len(rows) != len(row_labels):
        raise ValueError(f"{len(rows)} rows but {len(row_labels)} row labels")
    columns = len(column_labels)
    face = font(14)
    line, top = _line_height(face), header_height(title is not None)
    width = GAP + label_width + GAP + columns * (cell + GAP)
    sheet = Image.new("RGB", (width, top + len(rows) * (high + GAP)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((GAP, GAP), title, fill=TEXT, font=font(18))
    x0 = GAP + label_width + GAP
    for c, label in enumerate(column_labels):
        draw.text((x0 + c * (cell + GAP), top - line - GAP), label, fill=TEXT, font=face)
    for r, (images, label) in enumerate(zip(rows, row_labels, strict=True)):
        if len(images) != columns:
            raise ValueError(f"row {r} has {len(images)} images for {columns} columns")
        y = top + r * (high + GAP)
        for n, text in enumerate(_text_block(label, label_width, face)):
            draw.text((GAP, y + n * line), text, fill=TEXT, font=face)
        for c, image in enumerate(images):
            if image is None:
                continue
            shown = fit(image, cell, high)
            x = x0 + c * (cell + GAP) + (cell - shown.width) // 2
            sheet.paste(shown, (x, y + (high - shown.height) // 2))
    return sheet
