"""Procedural scenes with exact ground truth for every edit.

A scene is data: a background spec and a back-to-front tuple of objects (shape class, colour,
texture, centre, size, rotation, and any local drags applied to the shape). `render` turns it
into an RGB image and per-object masks. Each edit (move/resize, new appearance, paste, point
drag) is a pure function from scene to scene followed by `render`, so its expected result is
exact: the background revealed behind a moved object is whatever the background spec puts there.

Coordinates are pixels, x to the right and y down. Pixel (row i, column j) covers
[j, j+1) × [i, i+1), so its centre is (j + 0.5, i + 0.5). A mask pixel is True when its centre
lies inside the shape; image edges and textures are anti-aliased by supersampling.

Needs only numpy and Pillow, so the quality benchmark and the training script can use it
without a model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

SHAPE_CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "ring",
    "cross",
    "heart",
    "crescent",
)
"""Shape classes; each fits inside the unit disk of its own frame."""

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (255, 127, 14),
    "yellow": (240, 205, 30),
    "green": (40, 160, 50),
    "blue": (30, 80, 210),
    "purple": (130, 55, 185),
    "pink": (245, 120, 190),
    "cyan": (30, 200, 215),
    "white": (248, 248, 248),
    "black": (25, 25, 25),
}
"""Object colour names and their base sRGB values."""

TEXTURES: tuple[str, ...] = ("flat", "striped", "dotted", "shaded")
"""Surface patterns, defined in the object's own frame so they move, scale and warp with it."""

BACKGROUND_KINDS: tuple[str, ...] = ("gradient", "noise", "floor")

BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "grey": (140, 140, 140),
    "beige": (214, 196, 160),
    "brown": (125, 92, 66),
    "green": (105, 145, 95),
    "blue": (115, 145, 190),
    "white": (228, 228, 222),
}
"""Muted background colours, so that objects stand out."""

SUPERSAMPLE = 4
"""Samples per pixel along each axis for anti-aliasing."""

MAX_DRAG_RATIO = 1.2
"""Largest drag distance as a multiple of the warp radius that keeps the warp invertible.

The warp p -> p + d·exp(-|p - h|² / 2r²) is one-to-one while |d| < r·sqrt(e) ≈ 1.65 r; at 1.2 r
its inverse, found by fixed-point iteration, contracts by a factor ≤ 0.73 per iteration.
"""

_SHADOW_OFFSET = (0.12, 0.18)
"""Drop-shadow offset (x, y) in units of the object's size: light from the upper left."""
_SHADOW_BLUR = 0.2
"""Drop-shadow Gaussian blur sigma in units of the object's size."""
_SHADOW_STRENGTH = 0.45
"""Fraction of background light a fully shadowed pixel loses."""
_INVERSE_ITERATIONS = 100


@dataclass(frozen=True)
class Drag:
    """A local smooth deformation in a shape's own frame (units of the shape's size).

    A point q moves to q + offset·exp(-|q - handle|² / (2·radius²)): the handle moves by
    exactly `offset`, points further than about 2·radius barely move.
    """

    handle: tuple[float, float]
    offset: tuple[float, float]
    radius: float


@dataclass(frozen=True)
class Shape:
    """Geometry of one object.

    kind: one of SHAPE_CLASSES.
    centre: (x, y) in pixels; the origin of the shape's frame and the handle point for moves.
    size: radius in pixels of the disk the undeformed shape fits in.
    rotation: degrees; positive turns the shape clockwise on screen.
    drags: deformations applied in order, in the shape's frame.
    """

    kind: str
    centre: tuple[float, float]
    size: float
    rotation: float
    drags: tuple[Drag, ...] = ()


@dataclass(frozen=True)
class SceneObject:
    """A shape with a colour (a key of OBJECT_COLOURS) and a texture (one of TEXTURES)."""

    shape: Shape
    colour: str
    texture: str


@dataclass(frozen=True)
class Background:
    """What is behind the objects.

    kind: "gradient" (linear blend from `colour` to `second_colour` along `angle`), "noise"
        (smooth blotches of the two colours plus fine grain, drawn from `seed`) or "floor"
        (a floor of `colour` below the horizon and a wall of `second_colour` above it).
    colour, second_colour: keys of BACKGROUND_COLOURS; captions name `colour`.
    angle: gradient direction in degrees (0: left to right, 90: top to bottom).
    horizon: height of the floor/wall line as a fraction of the image height from the top.
    seed: seeds the noise texture.
    shadows: whether every object casts a soft drop shadow on the background.
    """

    kind: str
    colour: str
    second_colour: str
    angle: float
    horizon: float
    seed: int
    shadows: bool


@dataclass(frozen=True)
class Scene:
    """A square image of `size` pixels: a background and objects painted back to front."""

    size: int
    background: Background
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class PointPairs:
    """Exact correspondences of a drag: `source[k]` (x, y) before moves to `target[k]` after.

    Both are float arrays of shape (N, 2) in pixels.
    """

    source: np.ndarray
    target: np.ndarray


# ---------------------------------------------------------------------------------------------
# Shape classes: inside tests in the shape's own frame, u to the right and v down.


def _polygon(vertices: list[tuple[float, float]]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Even-odd inside test for a simple polygon given by its vertices."""
    vx = np.array([p[0] for p in vertices])
    vy = np.array([p[1] for p in vertices])

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        result = np.zeros(np.shape(u), dtype=bool)
        for x1, y1, x2, y2 in zip(vx, vy, np.roll(vx, -1), np.roll(vy, -1), strict=True):
            if y1 == y2:
                continue
            crosses = (y1 > v) != (y2 > v)
            result ^= crosses & (u < (x2 - x1) * (v - y1) / (y2 - y1) + x1)
        return result

    return inside


def _regular_star(points: int, outer: float, inner: float) -> list[tuple[float, float]]:
    """Vertices of a star with its first tip pointing up; inner == outer gives a polygon."""
    vertices = []
    for k in range(2 * points):
        radius = outer if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / points
        vertices.append((radius * math.cos(angle), radius * math.sin(angle)))
    return vertices


def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 0.9**2


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55**2)


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # The classic heart curve (x² + y² - 1)³ = x²y³ spans y in [-1, 1.24]; shifting by 0.25 and
    # scaling by 1.3 centres it in the unit disk with a small margin.
    x = 1.3 * u
    y = 0.25 - 1.3 * v
    return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0


def _crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u * u + v * v <= 0.95**2) & ((u - 0.45) ** 2 + (v + 0.25) ** 2 > 0.8**2)


_INSIDE: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _circle,
    "square": _polygon([(-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)]),
    "triangle": _polygon(_regular_star(3, 1.0, 0.5)),
    "star": _polygon(_regular_star(5, 1.0, 0.45)),
    "ring": _ring,
    "cross": _cross,
    "heart": _heart,
    "crescent": _crescent,
}


def inside_shape(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v) of a shape's own frame (units of its size) lie in shape `kind`."""
    return _INSIDE[kind](u, v)


# ---------------------------------------------------------------------------------------------
# Geometry: image pixels <-> the shape's own frame.


def _drag_weight(drag: Drag, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Fraction of a drag's offset that point (u, v) moves by."""
    d2 = (u - drag.handle[0]) ** 2 + (v - drag.handle[1]) ** 2
    return np.exp(-d2 / (2.0 * drag.radius**2))


def _warp_inverse(drags: tuple[Drag, ...], u: np.ndarray, v: np.ndarray) -> tuple:
    """Undeformed frame points that the drags carry to (u, v)."""
    for drag in reversed(drags):
        pu, pv = u, v
        for _ in range(_INVERSE_ITERATIONS):
            w = _drag_weight(drag, pu, pv)
            pu, pv = u - drag.offset[0] * w, v - drag.offset[1] * w
        u, v = pu, pv
    return u, v


def _to_frame(shape: Shape, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image points (x, y) in the shape's (deformed) frame, in units of its size."""
    c, s = math.cos(math.radians(shape.rotation)), math.sin(math.radians(shape.rotation))
    dx, dy = x - shape.centre[0], y - shape.centre[1]
    return (c * dx + s * dy) / shape.size, (-s * dx + c * dy) / shape.size


def _undeformed(shape: Shape, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Undeformed frame coordinates of image points: where shape and texture are evaluated."""
    u, v = _to_frame(shape, x, y)
    return _warp_inverse(shape.drags, u, v)


def _extent(shape: Shape) -> float:
    """Radius in pixels around the centre that contains the (deformed) shape."""
    return shape.size * (1.0 + sum(math.hypot(*d.offset) for d in shape.drags))


def _box(shape: Shape, size: int) -> tuple[int, int, int, int]:
    """Pixel box (y0, y1, x0, x1), clipped to the image, that contains the shape."""
    r = _extent(shape) + 1.0
    cx, cy = shape.centre
    x0, x1 = max(0, math.floor(cx - r)), min(size, math.ceil(cx + r))
    y0, y1 = max(0, math.floor(cy - r)), min(size, math.ceil(cy + r))
    return y0, max(y0, y1), x0, max(x0, x1)


def _grid(box: tuple[int, int, int, int], samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample positions (x, y) with `samples`² evenly spaced points per pixel of the box."""
    y0, y1, x0, x1 = box
    xs = x0 + (np.arange((x1 - x0) * samples) + 0.5) / samples
    ys = y0 + (np.arange((y1 - y0) * samples) + 0.5) / samples
    return np.meshgrid(xs, ys)


def _pool(a: np.ndarray, samples: int) -> np.ndarray:
    """Mean over each block of samples × samples, for arrays (H·s, W·s) or (H·s, W·s, C)."""
    h, w = a.shape[0] // samples, a.shape[1] // samples
    return a.reshape(h, samples, w, samples, *a.shape[2:]).mean(axis=(1, 3))


# ---------------------------------------------------------------------------------------------
# Appearance.


def _accent(rgb: np.ndarray) -> np.ndarray:
    """Second tone of a pattern: darker for light colours, lighter for dark ones."""
    luminance = rgb @ np.array([0.299, 0.587, 0.114])
    return rgb * 0.45 if luminance > 110 else rgb + (255.0 - rgb) * 0.6


def _texture(colour: str, texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """RGB (..., 3) float of a surface at undeformed frame points (u, v)."""
    base = np.array(OBJECT_COLOURS[colour], dtype=np.float64)
    if texture == "flat":
        return np.broadcast_to(base, (*u.shape, 3))
    if texture == "shaded":
        # A matte sphere lit from the upper left, with a small highlight.
        light = np.clip(1.0 - np.hypot(u + 0.4, v + 0.45) / 1.7, 0.0, 1.0)[..., None]
        return np.clip(base * (0.4 + 0.8 * light) + 90.0 * light**6, 0.0, 255.0)
    if texture == "striped":
        angle = math.radians(35.0)
        accent = np.floor((u * math.cos(angle) + v * math.sin(angle)) / 0.35) % 2 == 1
    else:
        spacing = 0.5
        du, dv = u / spacing - np.round(u / spacing), v / spacing - np.round(v / spacing)
        accent = du * du + dv * dv <= 0.3**2
    return np.where(accent[..., None], _accent(base), base)


# ---------------------------------------------------------------------------------------------
# Rendering.


@dataclass(frozen=True)
class _Layer:
    """One object rasterised in its pixel box (y0, y1, x0, x1).

    coverage: (h, w) fraction of each pixel covered; premultiplied: (h, w, 3) colour times
    coverage; mask: (h, w) whether each pixel centre is inside.
    """

    box: tuple[int, int, int, int]
    coverage: np.ndarray
    premultiplied: np.ndarray
    mask: np.ndarray


def _rasterise(obj: SceneObject, size: int) -> _Layer:
    shape = obj.shape
    box = _box(shape, size)
    u, v = _undeformed(shape, *_grid(box, SUPERSAMPLE))
    inside = inside_shape(shape.kind, u, v)
    colour = _texture(obj.colour, obj.texture, u, v) * inside[..., None]
    centre_u, centre_v = _undeformed(shape, *_grid(box, 1))
    return _Layer(
        box=box,
        coverage=_pool(inside.astype(np.float64), SUPERSAMPLE),
        premultiplied=_pool(colour, SUPERSAMPLE),
        mask=inside_shape(shape.kind, centre_u, centre_v),
    )


def _gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array with zero padding."""
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets**2) / (2.0 * sigma**2))
    kernel /= kernel.sum()
    h, w = a.shape
    padded = np.pad(a, radius)
    rows = sum(k * padded[:, i : i + w] for i, k in enumerate(kernel))
    return sum(k * rows[i : i + h, :] for i, k in enumerate(kernel))


def _shadow(layer: _Layer, shape: Shape, size: int) -> np.ndarray:
    """(size, size) shadow density in [0, 1] cast by one object (its part inside the image)."""
    canvas = np.zeros((size, size))
    ox = round(_SHADOW_OFFSET[0] * shape.size)
    oy = round(_SHADOW_OFFSET[1] * shape.size)
    y0, y1, x0, x1 = layer.box
    ty0, ty1 = min(size, y0 + oy), min(size, y1 + oy)
    tx0, tx1 = min(size, x0 + ox), min(size, x1 + ox)
    canvas[ty0:ty1, tx0:tx1] = layer.coverage[: ty1 - ty0, : tx1 - tx0]
    return _gaussian_blur(canvas, _SHADOW_BLUR * shape.size)


def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) grids of pixel centres divided by the image size, in [0, 1]."""
    t = (np.arange(size) + 0.5) / size
    return np.meshgrid(t, t)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) smooth random field in [0, 1]: a cells × cells grid upsampled bicubically."""
    coarse = Image.fromarray(rng.random((cells, cells)).astype(np.float32))
    field = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    return (field - field.min()) / max(field.max() - field.min(), 1e-9)


def background_image(background: Background, size: int) -> np.ndarray:
    """(size, size, 3) float RGB in [0, 255] of a background without objects or shadows."""
    first = np.array(BACKGROUND_COLOURS[background.colour], dtype=np.float64)
    second = np.array(BACKGROUND_COLOURS[background.second_colour], dtype=np.float64)
    x, y = _pixel_centres(size)
    if background.kind == "gradient":
        c, s = math.cos(math.radians(background.angle)), math.sin(math.radians(background.angle))
        t = c * (x - 0.5) + s * (y - 0.5)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
        return first + (second - first) * t[..., None]
    if background.kind == "noise":
        rng = np.random.default_rng(background.seed)
        t = _smooth_noise(rng, size, cells=5)[..., None]
        grain = rng.normal(0.0, 4.0, (size, size, 1))
        return np.clip(first + (second - first) * t + grain, 0.0, 255.0)
    horizon = background.horizon
    # Floor brightens towards the viewer and the wall darkens towards the top, a cheap depth cue;
    # the horizon is anti-aliased by the fraction of each pixel row below it.
    floor_share = np.clip((y - horizon) * size + 0.5, 0.0, 1.0)[..., None]
    floor = first * (0.8 + 0.25 * np.clip((y - horizon) / (1.0 - horizon), 0.0, 1.0))[..., None]
    wall = second * (0.85 + 0.15 * np.clip(y / horizon, 0.0, 1.0))[..., None]
    return floor_share * floor + (1.0 - floor_share) * wall


def _visible(masks: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Masks with the parts hidden by objects painted later removed."""
    covered = np.zeros((size, size), dtype=bool)
    visible = []
    for mask in reversed(masks):
        visible.append(mask & ~covered)
        covered |= mask
    return visible[::-1]


def _full_mask(layer: _Layer, size: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    y0, y1, x0, x1 = layer.box
    mask[y0:y1, x0:x1] = layer.mask
    return mask


def render(scene: Scene) -> tuple[np.ndarray, list[np.ndarray]]:
    """Image (size, size, 3) uint8 RGB and one visible-region bool mask (size, size) per object.

    A mask is True where the object's shape covers the pixel centre and no object painted later
    (a higher index) covers it; shadows are not part of any mask.
    """
    size = scene.size
    canvas = background_image(scene.background, size)
    layers = [_rasterise(obj, size) for obj in scene.objects]
    if scene.background.shadows:
        for layer, obj in zip(layers, scene.objects, strict=True):
            canvas *= 1.0 - _SHADOW_STRENGTH * _shadow(layer, obj.shape, size)[..., None]
    for layer in layers:
        y0, y1, x0, x1 = layer.box
        below = canvas[y0:y1, x0:x1]
        canvas[y0:y1, x0:x1] = layer.premultiplied + (1.0 - layer.coverage[..., None]) * below
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return image, _visible([_full_mask(layer, size) for layer in layers], size)


def object_mask(scene: Scene, index: int) -> np.ndarray:
    """(size, size) bool mask of object `index`'s whole shape, including parts hidden by others."""
    return _full_mask(_rasterise(scene.objects[index], scene.size), scene.size)


# ---------------------------------------------------------------------------------------------
# Captions.


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(obj: SceneObject) -> str:
    words = [obj.colour] + ([] if obj.texture == "flat" else [obj.texture]) + [obj.shape.kind]
    return " ".join([_article(words[0]), *words])


def _background_phrase(background: Background) -> str:
    if background.kind == "gradient":
        words = [background.colour, "and", background.second_colour, "gradient"]
    elif background.kind == "noise":
        words = ["noisy", background.colour, "background"]
    else:
        words = [background.colour, "floor"]
    return " ".join([_article(words[0]), *words])


def caption(scene: Scene) -> str:
    """Text naming every object (back to front) and the background.

    E.g. "a red striped star and a blue ring on a green floor".
    """
    phrases = [_object_phrase(obj) for obj in scene.objects]
    if not phrases:
        return _background_phrase(scene.background)
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{listed} on {_background_phrase(scene.background)}"


def vocabulary() -> list[str]:
    """Every word that `caption` can produce, sorted."""
    words = {"a", "an", "and", "on", "gradient", "noisy", "background", "floor"}
    words |= set(OBJECT_COLOURS) | set(BACKGROUND_COLOURS) | set(SHAPE_CLASSES)
    words |= {t for t in TEXTURES if t != "flat"}
    return sorted(words)


# ---------------------------------------------------------------------------------------------
# Random scenes.


def _random_background(rng: np.random.Generator) -> Background:
    colour, second = (str(c) for c in rng.choice(list(BACKGROUND_COLOURS), 2, replace=False))
    return Background(
        kind=str(rng.choice(BACKGROUND_KINDS)),
        colour=colour,
        second_colour=second,
        angle=float(rng.uniform(0.0, 360.0)),
        horizon=float(rng.uniform(0.3, 0.55)),
        seed=int(rng.integers(2**31)),
        shadows=bool(rng.random() < 0.5),
    )


def _place(
    rng: np.random.Generator, radius: float, size: int, top: float, others: list[Shape]
) -> tuple[float, float]:
    """A centre keeping a disk of `radius` in the image, below `top`, and apart from `others`.

    Bounding disks may overlap by a quarter of their radii, so that some objects partly occlude
    others; after 100 failed tries the last candidate is kept.
    """
    x = y = 0.0
    for _ in range(100):
        x = float(rng.uniform(radius, size - radius))
        y = float(rng.uniform(max(radius, min(top, size - radius)), size - radius))
        if all(
            math.hypot(x - o.centre[0], y - o.centre[1]) >= 0.75 * (radius + o.size) for o in others
        ):
            break
    return x, y


def random_scene(seed: int, size: int = 128, n_objects: int | None = None) -> Scene:
    """A random scene, the same for the same (seed, size, n_objects).

    n_objects: 1 to 4 at random when None; at most len(SHAPE_CLASSES), since classes and
    colours are distinct within a scene so that a caption names each object unambiguously.
    """
    limit = min(len(SHAPE_CLASSES), len(OBJECT_COLOURS) - 2)
    if n_objects is not None and not 0 <= n_objects <= limit:
        raise ValueError(f"n_objects must be between 0 and {limit}, got {n_objects}")
    rng = np.random.default_rng(seed)
    background = _random_background(rng)
    count = int(rng.integers(1, 5)) if n_objects is None else n_objects
    kinds = rng.choice(SHAPE_CLASSES, count, replace=False)
    palette = [c for c in OBJECT_COLOURS if c not in (background.colour, background.second_colour)]
    colours = rng.choice(palette, count, replace=False)
    top = background.horizon * size if background.kind == "floor" else 0.0
    objects: list[SceneObject] = []
    for kind, colour in zip(kinds, colours, strict=True):
        radius = float(rng.uniform(0.09, 0.2) * size)
        centre = _place(rng, radius, size, top, [o.shape for o in objects])
        shape = Shape(str(kind), centre, radius, float(rng.uniform(-30.0, 30.0)))
        objects.append(SceneObject(shape, str(colour), str(rng.choice(TEXTURES))))
    return Scene(size, background, tuple(objects))


# ---------------------------------------------------------------------------------------------
# Edits: scene -> scene, and their exact expected images.


def _check_index(scene: Scene, index: int) -> None:
    if not 0 <= index < len(scene.objects):
        raise IndexError(f"object index {index} out of range for {len(scene.objects)} objects")


def _replace_object(scene: Scene, index: int, obj: SceneObject) -> Scene:
    objects = list(scene.objects)
    objects[index] = obj
    return dataclasses.replace(scene, objects=tuple(objects))


def _transformed(shape: Shape, dx: float, dy: float, scale: float) -> Shape:
    """The shape with its centre moved by (dx, dy) and its size times `scale` about the centre."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    centre = (shape.centre[0] + dx, shape.centre[1] + dy)
    return dataclasses.replace(shape, centre=centre, size=shape.size * scale)


def without(scene: Scene, index: int) -> Scene:
    """The scene with object `index` removed: what a perfect edit reveals behind it."""
    _check_index(scene, index)
    objects = scene.objects[:index] + scene.objects[index + 1 :]
    return dataclasses.replace(scene, objects=objects)


def move_object(scene: Scene, index: int, dx: float, dy: float, scale: float = 1.0) -> Scene:
    """Object `index` with its centre moved by (dx, dy) pixels and scaled about its centre.

    Its texture, drags and shadow move with it; the painting order is unchanged.
    """
    _check_index(scene, index)
    obj = scene.objects[index]
    moved_obj = dataclasses.replace(obj, shape=_transformed(obj.shape, dx, dy, scale))
    return _replace_object(scene, index, moved_obj)


def moved(
    scene: Scene, index: int, dx: float, dy: float, scale: float = 1.0
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Expected image and masks after moving (and resizing) object `index`; see move_object."""
    return render(move_object(scene, index, dx, dy, scale))


def restyle_object(scene: Scene, index: int, colour: str, texture: str) -> Scene:
    """Object `index` with the given colour and texture; its shape is unchanged."""
    _check_index(scene, index)
    if colour not in OBJECT_COLOURS:
        raise ValueError(f"unknown colour {colour!r}; choose one of {sorted(OBJECT_COLOURS)}")
    if texture not in TEXTURES:
        raise ValueError(f"unknown texture {texture!r}; choose one of {list(TEXTURES)}")
    obj = dataclasses.replace(scene.objects[index], colour=colour, texture=texture)
    return _replace_object(scene, index, obj)


def with_appearance(
    scene: Scene, index: int, colour: str, texture: str
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Expected image and masks after giving object `index` a new colour and texture."""
    return render(restyle_object(scene, index, colour, texture))


def paste_object(
    scene: Scene, other: Scene, other_index: int, dx: float, dy: float, scale: float = 1.0
) -> Scene:
    """The scene with `other`'s object `other_index` added on top of everything.

    The pasted object's centre lands at its centre in `other` plus (dx, dy); it is scaled about
    that centre. It becomes the last object.
    """
    _check_index(other, other_index)
    if other.size != scene.size:
        raise ValueError(f"scenes differ in size ({other.size} vs {scene.size}); render both alike")
    obj = other.objects[other_index]
    pasted_obj = dataclasses.replace(obj, shape=_transformed(obj.shape, dx, dy, scale))
    return dataclasses.replace(scene, objects=(*scene.objects, pasted_obj))


def pasted(
    scene: Scene, other: Scene, other_index: int, dx: float, dy: float, scale: float = 1.0
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Expected image and masks after pasting an object of `other`; see paste_object."""
    return render(paste_object(scene, other, other_index, dx, dy, scale))


def drag_displacement(
    points: np.ndarray,
    handle_xy: tuple[float, float],
    target_xy: tuple[float, float],
    radius: float,
) -> np.ndarray:
    """Where image points (N, 2) go under a drag of `handle_xy` to `target_xy`.

    The displacement is (target - handle)·exp(-|p - handle|² / (2·radius²)): the handle lands
    exactly on the target and points a few radii away stay put.
    """
    handle = np.asarray(handle_xy, dtype=np.float64)
    offset = np.asarray(target_xy, dtype=np.float64) - handle
    d2 = ((points - handle) ** 2).sum(axis=-1, keepdims=True)
    return points + offset * np.exp(-d2 / (2.0 * radius**2))


def _drag_radius(shape: Shape, radius: float | None) -> float:
    """The warp radius in pixels: `radius`, or 0.6 × the shape's size when None."""
    return 0.6 * shape.size if radius is None else radius


def drag_object(
    scene: Scene,
    index: int,
    handle_xy: tuple[float, float],
    target_xy: tuple[float, float],
    radius: float | None = None,
) -> Scene:
    """Object `index` deformed by a smooth local warp that carries `handle_xy` to `target_xy`.

    The warp is `drag_displacement`; texture and shading deform with the shape.
    radius: pixels; the warp's reach (default 0.6 × the object's size). The drag distance may
    be at most MAX_DRAG_RATIO × radius, which keeps the warp one-to-one.
    """
    _check_index(scene, index)
    obj = scene.objects[index]
    shape = obj.shape
    radius = _drag_radius(shape, radius)
    distance = math.hypot(target_xy[0] - handle_xy[0], target_xy[1] - handle_xy[1])
    if radius <= 0 or distance > MAX_DRAG_RATIO * radius:
        raise ValueError(
            f"drag of {distance:.1f} px needs a warp radius of at least "
            f"{distance / MAX_DRAG_RATIO:.1f} px, got {radius:.1f}; pass a larger radius"
        )
    # The shape's frame is a similarity of the image, so the image-space warp is the same
    # Gaussian warp in the frame, with lengths divided by the size.
    hu, hv = _to_frame(shape, np.float64(handle_xy[0]), np.float64(handle_xy[1]))
    tu, tv = _to_frame(shape, np.float64(target_xy[0]), np.float64(target_xy[1]))
    drag = Drag((float(hu), float(hv)), (float(tu - hu), float(tv - hv)), radius / shape.size)
    new_shape = dataclasses.replace(shape, drags=(*shape.drags, drag))
    return _replace_object(scene, index, dataclasses.replace(obj, shape=new_shape))


def dragged(
    scene: Scene,
    index: int,
    handle_xy: tuple[float, float],
    target_xy: tuple[float, float],
    radius: float | None = None,
) -> tuple[np.ndarray, list[np.ndarray], PointPairs]:
    """Expected image, masks and point correspondences after a drag; see drag_object.

    The correspondences start with the handle (which lands on the target), followed by every
    pixel centre of the object's whole shape before the drag.
    """
    _check_index(scene, index)
    radius = _drag_radius(scene.objects[index].shape, radius)
    image, masks = render(drag_object(scene, index, handle_xy, target_xy, radius))
    ys, xs = np.nonzero(object_mask(scene, index))
    source = np.concatenate([[handle_xy], np.stack([xs + 0.5, ys + 0.5], axis=1)]).astype(float)
    target = drag_displacement(source, handle_xy, target_xy, radius)
    return image, masks, PointPairs(source, target)
