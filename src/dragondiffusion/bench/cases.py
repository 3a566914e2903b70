"""Held-out edit cases with exact ground truth, drawn from a seed.

Each case is a random procedural scene (seed below HELD_OUT_SEEDS: never seen in training), one
edit set up so that its result is clean and exactly known, and the masks the measurements need.
Set-up rules, for every edit: the edited object is wholly visible and inside the image before
and after the edit, at least `margin` pixels from the border and from every other object, so
that the expected image shows it whole and its colour can be segmented.

- move: a shift of 15–35 % of the image side in a random direction;
- resize: in place (about the object's centre), by a factor in [0.7, 0.9] ∪ [1.1, 1.4];
- appearance: the colour and texture of the one object of another scene, a colour that no
  object and no background of this scene is named after;
- drag: a handle on the object's outline among its 10 % of outline points farthest from its
  centre, dragged outwards (± 30°) by 0.7–1.1 × the warp radius (0.6 × the object's size); the
  editable region is the object before and after, grown by 6 px of a 128-px scene;
- paste: the one object of another scene, at a random free place of a scene of one or two
  objects, unscaled (the pipeline scales about the mask's box centre, the scenes about the
  shape's centre, which would differ).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import scenes
from ..demo import SCENE_UNIT, Example
from ..geometry import dilate
from . import EDITS
from .metrics import erode

HELD_OUT_SEEDS = 2**32
"""Scene seeds stay below this: scripts/train_demo_model.py trains on seeds ≥ its
TRAIN_SEED_FLOOR (2**32), so every benchmark scene is held out."""
TRIES = 20
"""Placements tried per scene before drawing another scene."""
MAX_DRAWS_PER_CASE = 200


@dataclass(frozen=True)
class Case:
    """One edit of a held-out scene and what it must give.

    example: the pipeline call and the exact expected image (`example.expected`).
    seeds: the scene's seed, then the reference scene's for appearance and paste.
    expected_mask: (H, W) bool, the edited object in the expected image.
    source_mask: (H, W) bool, the object in the input; empty for paste (it comes from another
        image).
    edited: (H, W) bool, what the edit may change: the object's old and new places, every pixel
        whose expected value differs from the input (moved shadows), and for drag the editable
        region.
    points: drag only: the handle and where it must land (`scenes.dragged`'s correspondence;
        the warp is a pure translation at the handle, so its patch keeps its look).
    """

    example: Example
    seeds: tuple[int, ...]
    expected_mask: np.ndarray
    source_mask: np.ndarray
    edited: np.ndarray
    points: scenes.PointPairs | None = None

    @property
    def edit(self) -> str:
        return self.example.name.rsplit("-", 1)[0]

    @property
    def image(self) -> np.ndarray:
        return self.example.arguments["image"]

    @property
    def expected(self) -> np.ndarray:
        return self.example.expected

    def vacated(self, margin: int) -> np.ndarray:
        """The object's old place, less its new place grown by `margin` pixels."""
        return self.source_mask & ~dilate(self.expected_mask, margin)


def margin_for(size: int) -> int:
    """Pixels kept free around an edited object: 2 in a 128-pixel scene, scaled."""
    return max(2, round(2 * size / SCENE_UNIT))


def _draw_scene(
    rng: np.random.Generator, size: int, n_objects: int | None = None
) -> tuple[int, scenes.Scene]:
    seed = int(rng.integers(HELD_OUT_SEEDS))
    return seed, scenes.random_scene(seed, size, n_objects)


def _fits(scene: scenes.Scene, index: int, margin: int) -> bool:
    """Whether object `index` lies wholly inside the image and `margin` pixels or more away from
    its border and from every other object.

    The object is rasterised alone on a canvas padded by the image's size on every side, so a
    part pushed out of the image is seen, not clipped away.
    """
    size = scene.size
    alone = dataclasses.replace(scene, size=3 * size, objects=(scene.objects[index],))
    ys, xs = np.nonzero(scenes.object_mask(scenes.move_object(alone, 0, size, size), 0))
    lo, hi = size + margin, 2 * size - margin
    if len(xs) == 0 or min(xs.min(), ys.min()) < lo or max(xs.max(), ys.max()) >= hi:
        return False
    mask = scenes.object_mask(scene, index)
    others = [scenes.object_mask(scene, i) for i in range(len(scene.objects)) if i != index]
    return not any((mask & dilate(m, margin)).any() for m in others)


def _pick_object(
    rng: np.random.Generator, scene: scenes.Scene, masks: list[np.ndarray], margin: int
) -> int | None:
    """A random object that is wholly visible, fits (see `_fits`) and is not tiny; else None."""
    if not scene.objects:
        return None
    index = int(rng.integers(len(scene.objects)))
    full = scenes.object_mask(scene, index)
    big_enough = full.sum() >= 64 * (scene.size / SCENE_UNIT) ** 2
    if big_enough and np.array_equal(full, masks[index]) and _fits(scene, index, margin):
        return index
    return None


def _describe(obj: scenes.SceneObject) -> str:
    texture = "" if obj.texture == "flat" else f"{obj.texture} "
    return f"the {obj.colour} {texture}{obj.shape.kind}"


def _taken_colours(scene: scenes.Scene) -> set[str]:
    """Colour names a new object of the scene may not have (as `random_scene` rules them out)."""
    background = scene.background
    return {o.colour for o in scene.objects} | {background.colour, background.second_colour}


def _changed(image: np.ndarray, expected: np.ndarray) -> np.ndarray:
    return (image != expected).any(axis=2)


def _scene_with_object(
    rng: np.random.Generator, size: int, margin: int
) -> tuple[int, scenes.Scene, np.ndarray, list[np.ndarray], int | None]:
    """A drawn scene, its rendering and masks, and an object fit to edit (None when none is)."""
    seed, scene = _draw_scene(rng, size)
    image, masks = scenes.render(scene)
    return seed, scene, image, masks, _pick_object(rng, scene, masks, margin)


def _move(rng: np.random.Generator, size: int, name: str, resize: bool) -> Case | None:
    margin = margin_for(size)
    seed, scene, image, masks, index = _scene_with_object(rng, size, margin)
    if index is None:
        return None
    obj = scene.objects[index]
    for _ in range(TRIES):
        dx = dy = 0.0
        scale = 1.0
        if resize:
            scale = float(rng.uniform(0.7, 1.4))
            if abs(scale - 1.0) < 0.1:
                continue
        else:
            angle = rng.uniform(0.0, 2.0 * math.pi)
            distance = rng.uniform(0.15, 0.35) * size
            dx, dy = float(distance * math.cos(angle)), float(distance * math.sin(angle))
        edited = scenes.move_object(scene, index, dx, dy, scale)
        if _fits(edited, index, margin):
            break
    else:
        return None
    expected, new_masks = scenes.render(edited)
    cx, cy = obj.shape.centre
    title = (
        f"resize {_describe(obj)} to {scale:.2f} times its size"
        if resize
        else f"move {_describe(obj)} by ({dx:+.0f}, {dy:+.0f}) px"
    )
    example = Example(
        name=name,
        title=title,
        edit="move",
        arguments={
            "image": image,
            "mask": masks[index],
            "source": (cx, cy),
            "target": (cx + dx, cy + dy),
            "scale": scale,
            "prompt": scenes.caption(scene),
        },
        expected=expected,
        inversion=name,
    )
    return Case(
        example,
        (seed,),
        new_masks[index],
        masks[index],
        masks[index] | new_masks[index] | _changed(image, expected),
    )


def _appearance(rng: np.random.Generator, size: int, name: str) -> Case | None:
    margin = margin_for(size)
    seed, scene, image, masks, index = _scene_with_object(rng, size, margin)
    reference_seed, other = _draw_scene(rng, size, n_objects=1)
    style = other.objects[0]
    if index is None or style.colour in _taken_colours(scene):
        return None
    reference, (reference_mask,) = scenes.render(other)
    expected, new_masks = scenes.with_appearance(scene, index, style.colour, style.texture)
    example = Example(
        name=name,
        title=f"{_describe(scene.objects[index])} takes the look of {_describe(style)}",
        edit="appearance",
        arguments={
            "image": image,
            "mask": masks[index],
            "reference": reference,
            "reference_mask": reference_mask,
            "prompt": scenes.caption(scene),
            "reference_prompt": scenes.caption(other),
        },
        expected=expected,
        inversion=name,
    )
    edited = masks[index] | new_masks[index] | _changed(image, expected)
    return Case(example, (seed, reference_seed), new_masks[index], masks[index], edited)


def _drag(rng: np.random.Generator, size: int, name: str) -> Case | None:
    margin = margin_for(size)
    seed, scene, image, masks, index = _scene_with_object(rng, size, margin)
    if index is None:
        return None
    shape = scene.objects[index].shape
    full = masks[index]
    outline = full & ~erode(full, 1)
    ys, xs = np.nonzero(outline)
    cx, cy = shape.centre
    reach = np.hypot(xs + 0.5 - cx, ys + 0.5 - cy)
    far = np.flatnonzero(reach >= np.quantile(reach, 0.9))
    pick = int(rng.choice(far))
    handle = (float(xs[pick] + 0.5), float(ys[pick] + 0.5))
    radius = 0.6 * shape.size  # scenes.drag_object's default warp radius
    outwards = math.atan2(handle[1] - cy, handle[0] - cx)
    for _ in range(TRIES):
        angle = outwards + rng.uniform(-math.pi / 6, math.pi / 6)
        distance = rng.uniform(0.7, 1.1) * radius
        target = (handle[0] + distance * math.cos(angle), handle[1] + distance * math.sin(angle))
        if distance < size / 20 or not all(0 <= t < size for t in target):
            continue
        edited = scenes.drag_object(scene, index, handle, target)
        if _fits(edited, index, margin):
            break
    else:
        return None
    expected, new_masks, pairs = scenes.dragged(scene, index, handle, target)
    editable = dilate(full | new_masks[index], round(6 * size / SCENE_UNIT))
    example = Example(
        name=name,
        title=f"drag {_describe(scene.objects[index])} at ({handle[0]:.0f}, {handle[1]:.0f}) "
        f"by ({target[0] - handle[0]:+.0f}, {target[1] - handle[1]:+.0f}) px",
        edit="drag",
        arguments={
            "image": image,
            "mask": editable,
            "points": [(handle, target)],
            "prompt": scenes.caption(scene),
        },
        expected=expected,
        inversion=name,
    )
    edited_area = editable | _changed(image, expected)
    handle_pair = scenes.PointPairs(pairs.source[:1], pairs.target[:1])
    return Case(example, (seed,), new_masks[index], full, edited_area, handle_pair)


def _paste(rng: np.random.Generator, size: int, name: str) -> Case | None:
    margin = margin_for(size)
    seed, base = _draw_scene(rng, size, n_objects=int(rng.integers(1, 3)))
    reference_seed, other = _draw_scene(rng, size, n_objects=1)
    obj = other.objects[0]
    if obj.colour in _taken_colours(base):
        return None
    r = obj.shape.size
    last = len(base.objects)
    for _ in range(TRIES):
        x, y = rng.uniform(r + margin, size - r - margin, 2)
        dx, dy = float(x - obj.shape.centre[0]), float(y - obj.shape.centre[1])
        edited = scenes.paste_object(base, other, 0, dx, dy)
        if _fits(edited, last, margin):
            break
    else:
        return None
    image = scenes.render(base)[0]
    reference, (reference_mask,) = scenes.render(other)
    expected, new_masks = scenes.render(edited)
    example = Example(
        name=name,
        title=f"paste {_describe(obj)} from another scene, moved ({dx:+.0f}, {dy:+.0f}) px",
        edit="paste",
        arguments={
            "image": image,
            "reference": reference,
            "reference_mask": reference_mask,
            "offset": (dx, dy),
            "prompt": scenes.caption(base),
            "reference_prompt": scenes.caption(other),
        },
        expected=expected,
        inversion=name,
    )
    nothing = np.zeros_like(reference_mask)
    edited_area = new_masks[last] | _changed(image, expected)
    return Case(example, (seed, reference_seed), new_masks[last], nothing, edited_area)


BUILDERS: dict[str, Callable[[np.random.Generator, int, str], Case | None]] = {
    "move": lambda rng, size, name: _move(rng, size, name, resize=False),
    "resize": lambda rng, size, name: _move(rng, size, name, resize=True),
    "appearance": _appearance,
    "drag": _drag,
    "paste": _paste,
}


def draw_cases(edit: str, n: int, seed: int, size: int) -> list[Case]:
    """`n` cases of `edit` on scenes of `size` pixels, the same for the same arguments.

    Each edit has its own random stream (seeded by `seed` and the edit), so adding edits or
    scenes to a run does not change the cases of the others. Draws that do not fit the rules
    (see the module doc) are skipped.
    """
    if edit not in BUILDERS:
        raise ValueError(f"unknown edit {edit!r}; choose from {', '.join(EDITS)}")
    rng = np.random.default_rng([seed, EDITS.index(edit)])
    cases: list[Case] = []
    for _ in range(MAX_DRAWS_PER_CASE * n):
        if len(cases) == n:
            break
        case = BUILDERS[edit](rng, size, f"{edit}-{len(cases) + 1}")
        if case is not None:
            cases.append(case)
    if len(cases) < n:
        raise RuntimeError(f"found only {len(cases)} of {n} {edit} cases at {size} px")
    return cases
