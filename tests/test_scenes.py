"""Procedural scenes: determinism, coverage, and exactness of every ground-truth edit."""

import dataclasses
import re

import numpy as np
import pytest

from dragondiffusion import scenes as S


def _dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """Binary dilation with a 3×3 square, `steps` times."""
    out = mask.copy()
    for _ in range(steps):
        padded = np.pad(out, 1)
        h, w = mask.shape
        out = np.zeros_like(mask)
        for dy in range(3):
            for dx in range(3):
                out |= padded[dy : dy + h, dx : dx + w]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """Binary erosion with a 3×3 square; pixels beyond the image count as outside."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    out = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            out &= padded[dy : dy + h, dx : dx + w]
    return out


def _shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """`mask` moved by whole pixels, with what leaves the image dropped."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)] = mask[
        max(0, -dy) : h + min(0, -dy), max(0, -dx) : w + min(0, -dx)
    ]
    return out


def _flat(scene: S.Scene, shadows: bool = False) -> S.Scene:
    """The scene with flat textures only (and shadows as given), for exact colour checks."""
    objects = tuple(dataclasses.replace(o, texture="flat") for o in scene.objects)
    background = dataclasses.replace(scene.background, shadows=shadows)
    return dataclasses.replace(scene, objects=objects, background=background)


def _single(kind: str, centre=(64.0, 64.0), size=20.0, rotation=0.0, **background) -> S.Scene:
    spec = dict(
        kind="floor",
        colour="green",
        second_colour="white",
        angle=0.0,
        horizon=0.3,
        seed=1,
        shadows=False,
    )
    spec.update(background)
    obj = S.SceneObject(S.Shape(kind, centre, size, rotation), "red", "flat")
    return S.Scene(128, S.Background(**spec), (obj,))


def test_same_seed_same_scene_and_image():
    a, b = S.random_scene(7), S.random_scene(7)
    assert a == b
    image_a, masks_a = S.render(a)
    image_b, masks_b = S.render(b)
    assert np.array_equal(image_a, image_b)
    assert all(np.array_equal(m, n) for m, n in zip(masks_a, masks_b, strict=True))
    assert S.random_scene(8) != a
    assert not np.array_equal(S.render(S.random_scene(8))[0], image_a)


def test_render_output_types_and_sizes():
    for size in (64, 128):
        scene = S.random_scene(3, size=size, n_objects=3)
        image, masks = S.render(scene)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert len(masks) == 3
        assert all(m.shape == (size, size) and m.dtype == bool and m.any() for m in masks)


def test_many_seeds_cover_classes_colours_textures_and_backgrounds():
    scenes = [S.random_scene(seed) for seed in range(300)]
    objects = [o for s in scenes for o in s.objects]
    assert {o.shape.kind for o in objects} == set(S.SHAPE_CLASSES)
    assert {o.colour for o in objects} == set(S.OBJECT_COLOURS)
    assert len(S.OBJECT_COLOURS) >= 8 and len(S.SHAPE_CLASSES) >= 6
    assert {o.texture for o in objects} == set(S.TEXTURES)
    assert {s.background.kind for s in scenes} == set(S.BACKGROUND_KINDS)
    assert {s.background.shadows for s in scenes} == {True, False}
    assert {len(s.objects) for s in scenes} == {1, 2, 3, 4}
    for s in scenes:
        kinds = [o.shape.kind for o in s.objects]
        colours = [o.colour for o in s.objects]
        assert len(set(kinds)) == len(kinds) and len(set(colours)) == len(colours)
        assert s.background.colour not in colours


def test_n_objects_is_respected_and_checked():
    assert len(S.random_scene(0, n_objects=0).objects) == 0
    assert len(S.random_scene(0, n_objects=4).objects) == 4
    with pytest.raises(ValueError, match="n_objects"):
        S.random_scene(0, n_objects=9)


@pytest.mark.parametrize("kind", S.SHAPE_CLASSES)
def test_shape_fits_unit_disk_and_is_not_tiny(kind):
    t = np.linspace(-1.2, 1.2, 481)
    u, v = np.meshgrid(t, t)
    inside = S.inside_shape(kind, u, v)
    assert np.hypot(u[inside], v[inside]).max() <= 1.0
    area = inside.mean() * 2.4**2
    assert area > 0.3 * np.pi * 0.25


def test_masks_are_disjoint_and_match_pixels():
    for seed in range(12):
        scene = _flat(S.random_scene(seed))
        image, masks = S.render(scene)
        total = np.sum(masks, axis=0)
        assert total.max() <= 1
        # Sharp tips (star, triangle, crescent) can cover part of a pixel up to two pixels
        # beyond the last pixel centre they contain, so edges of objects in front are kept off.
        in_front = np.zeros_like(total, dtype=bool)
        for index in reversed(range(len(masks))):
            interior = _erode(masks[index]) & ~_dilate(in_front, 2)
            assert interior.sum() > 0.3 * masks[index].sum()
            assert np.all(image[interior] == S.OBJECT_COLOURS[scene.objects[index].colour])
            in_front |= S.object_mask(scene, index)
        outside = ~_dilate(total > 0, 2)
        background = np.round(S.background_image(scene.background, scene.size)).astype(np.uint8)
        assert np.array_equal(image[outside], background[outside])


def test_visible_mask_is_whole_shape_minus_later_objects():
    scene = S.random_scene(0, n_objects=4)
    _, masks = S.render(scene)
    whole = [S.object_mask(scene, i) for i in range(4)]
    for i in range(4):
        later = np.any(whole[i + 1 :], axis=0) if i < 3 else np.zeros_like(whole[i])
        assert np.array_equal(masks[i], whole[i] & ~later)


def test_moved_mask_is_exactly_shifted():
    for seed in range(10):
        scene = S.random_scene(seed)
        for index in range(len(scene.objects)):
            dx, dy = (7, -5) if seed % 2 else (-11, 9)
            before = S.object_mask(scene, index)
            after = S.object_mask(S.move_object(scene, index, dx, dy), index)
            assert np.array_equal(after, _shift(before, dx, dy))


def test_moved_reveals_the_background_where_the_object_was():
    for seed in range(10):
        scene = _flat(S.random_scene(seed), shadows=False)
        index = len(scene.objects) - 1
        image, masks = S.moved(scene, index, dx=25, dy=-18)
        expected, _ = S.render(S.without(scene, index))
        old = S.object_mask(scene, index)
        new = S.object_mask(S.move_object(scene, index, 25, -18), index)
        revealed = old & ~_dilate(new, 2)
        assert np.array_equal(image[revealed], expected[revealed])
        assert not masks[index][revealed].any()


def test_moved_keeps_occlusion_order():
    back = S.SceneObject(S.Shape("square", (40.0, 64.0), 20.0, 0.0), "blue", "flat")
    front = S.SceneObject(S.Shape("circle", (90.0, 64.0), 20.0, 0.0), "red", "flat")
    scene = dataclasses.replace(_single("circle"), objects=(back, front))
    image, masks = S.moved(scene, 0, dx=40, dy=0)
    assert np.array_equal(masks[1], S.object_mask(scene, 1))
    overlap = S.object_mask(S.move_object(scene, 0, 40, 0), 0) & masks[1]
    assert overlap.any() and not masks[0][overlap].any()
    assert np.all(image[_erode(masks[1])] == S.OBJECT_COLOURS["red"])


def test_moved_with_scale_maps_centre_and_scales_area():
    scene = _single("heart", centre=(50.3, 60.7), size=15.0, rotation=20.0)
    mask = S.object_mask(scene, 0)
    big = S.object_mask(S.move_object(scene, 0, 20, 10, scale=1.5), 0)
    assert big.sum() / mask.sum() == pytest.approx(1.5**2, rel=0.03)

    def centroid(m):
        ys, xs = np.nonzero(m)
        return np.array([xs.mean() + 0.5, ys.mean() + 0.5])

    centre = np.array(scene.objects[0].shape.centre)
    expected = centre + [20, 10] + 1.5 * (centroid(mask) - centre)
    assert np.allclose(centroid(big), expected, atol=0.3)


def test_identity_edits_reproduce_the_render():
    scene = S.random_scene(11)
    image, _ = S.render(scene)
    assert np.array_equal(S.moved(scene, 0, 0, 0)[0], image)
    obj = scene.objects[0]
    assert np.array_equal(S.with_appearance(scene, 0, obj.colour, obj.texture)[0], image)


def test_with_appearance_changes_only_the_object():
    scene = _flat(S.random_scene(4, n_objects=3), shadows=True)
    image, masks = S.render(scene)
    colour = next(c for c in S.OBJECT_COLOURS if c not in {o.colour for o in scene.objects})
    new_image, new_masks = S.with_appearance(scene, 1, colour, "flat")
    assert all(np.array_equal(m, n) for m, n in zip(masks, new_masks, strict=True))
    assert np.all(new_image[_erode(masks[1])] == S.OBJECT_COLOURS[colour])
    # Whole shape, not the visible mask: the anti-aliased edges of objects in front blend with
    # the hidden parts of this one.
    outside = ~_dilate(S.object_mask(scene, 1), 2)
    assert np.array_equal(new_image[outside], image[outside])
    striped, _ = S.with_appearance(scene, 1, colour, "striped")
    assert len(np.unique(striped[_erode(masks[1])], axis=0)) >= 2


def test_pasted_object_lands_shifted_on_top():
    scene, other = S.random_scene(21), S.random_scene(22)
    _, masks = S.render(scene)
    _, new_masks = S.pasted(scene, other, 0, dx=6, dy=-4)
    assert len(new_masks) == len(masks) + 1
    expected = _shift(S.object_mask(other, 0), 6, -4)
    assert np.array_equal(new_masks[-1], expected)
    for before, after in zip(masks, new_masks[:-1], strict=True):
        assert np.array_equal(after, before & ~expected)
    flat_other = _flat(other)
    flat_image, _ = S.pasted(scene, flat_other, 0, dx=6, dy=-4)
    colour = S.OBJECT_COLOURS[other.objects[0].colour]
    assert np.all(flat_image[_erode(expected)] == colour)


def test_pasted_rejects_scenes_of_another_size():
    with pytest.raises(ValueError, match="size"):
        S.pasted(S.random_scene(1), S.random_scene(2, size=64), 0, 0, 0)


def test_drag_moves_handle_to_target_and_correspondences_land_inside():
    scene = _single("star", size=24.0, rotation=10.0)
    shape = scene.objects[0].shape
    handle = (shape.centre[0] + 4.0, shape.centre[1] - 20.0)
    target = (handle[0] + 7.0, handle[1] - 8.0)
    _, masks, pairs = S.dragged(scene, 0, handle, target)
    assert np.allclose(pairs.target[0], target)
    assert np.allclose(pairs.source[0], handle)
    old = S.object_mask(scene, 0)
    assert len(pairs.source) == old.sum() + 1
    assert np.array_equal(masks[0], S.object_mask(S.drag_object(scene, 0, handle, target), 0))
    # Points well inside the shape must land inside the deformed shape, at their nearest pixel.
    deep = _erode(_erode(old))
    src = pairs.source[1:]
    keep = deep[src[:, 1].astype(int), src[:, 0].astype(int)]
    dst = pairs.target[1:][keep]
    assert masks[0][dst[:, 1].astype(int), dst[:, 0].astype(int)].all()
    # The warp is local: far from the handle the shape is unchanged.
    ys, xs = np.mgrid[0:128, 0:128]
    far = np.hypot(xs + 0.5 - handle[0], ys + 0.5 - handle[1]) > 4 * 0.6 * shape.size
    assert np.array_equal(masks[0][far], old[far])
    assert not np.array_equal(masks[0], old)


def test_drag_deforms_texture_with_the_shape():
    obj = S.SceneObject(S.Shape("circle", (64.0, 64.0), 24.0, 0.0), "blue", "shaded")
    scene = dataclasses.replace(_single("circle"), objects=(obj,))
    image, _ = S.render(scene)
    warped, masks, pairs = S.dragged(scene, 0, (64.0, 50.0), (70.0, 44.0))
    deep = _erode(_erode(S.object_mask(scene, 0)))
    src = pairs.source[1:].astype(int)
    dst = pairs.target[1:].astype(int)
    keep = deep[src[:, 1], src[:, 0]] & _erode(masks[0])[dst[:, 1], dst[:, 0]]
    moved_far = np.hypot(*(pairs.target[1:] - pairs.source[1:]).T) > 3.0
    assert (keep & moved_far).sum() > 20
    before = image[src[keep, 1], src[keep, 0]].astype(int)
    after = warped[dst[keep, 1], dst[keep, 0]].astype(int)
    assert np.abs(after - before).max() <= 12


def test_drag_too_long_for_radius_is_refused():
    scene = _single("circle")
    with pytest.raises(ValueError, match="radius"):
        S.dragged(scene, 0, (64.0, 50.0), (64.0, 10.0), radius=10.0)


def test_shadows_darken_the_background_below_right():
    scene = _single("square", shadows=True)
    image, masks = S.render(scene)
    bare, _ = S.render(S.without(scene, 0))
    ring = _dilate(masks[0], 3) & ~_dilate(masks[0])
    below_right = ring.copy()
    below_right[:64, :] = False
    below_right[:, :64] = False
    darker = image[below_right].astype(int).sum(-1) < bare[below_right].astype(int).sum(-1)
    assert darker.mean() > 0.9


def test_caption_names_every_object_and_the_background():
    scene = _single("star", colour="green")
    star = dataclasses.replace(scene.objects[0], texture="striped")
    ring = S.SceneObject(S.Shape("ring", (30.0, 90.0), 12.0, 0.0), "blue", "flat")
    scene = dataclasses.replace(scene, objects=(star, ring))
    assert S.caption(scene) == "a red striped star and a blue ring on a green floor"
    vocabulary = set(S.vocabulary())
    for seed in range(200):
        scene = S.random_scene(seed)
        text = S.caption(scene)
        words = re.findall(r"[a-z]+", text)
        assert set(words) <= vocabulary
        for obj in scene.objects:
            assert obj.shape.kind in words and obj.colour in words
        assert sum(w in S.SHAPE_CLASSES for w in words) == len(scene.objects)
        assert scene.background.colour in words
    assert S.caption(S.random_scene(0, n_objects=0)).split()[-1] in {
        "floor",
        "gradient",
        "background",
    }


def test_caption_uses_an_before_vowels():
    obj = S.SceneObject(S.Shape("heart", (64.0, 64.0), 20.0, 0.0), "orange", "dotted")
    scene = dataclasses.replace(_single("circle"), objects=(obj,))
    assert S.caption(scene).startswith("an orange dotted heart on ")


def test_edits_check_their_arguments():
    scene = S.random_scene(2, n_objects=2)
    with pytest.raises(IndexError):
        S.moved(scene, 5, 1, 1)
    with pytest.raises(ValueError, match="colour"):
        S.with_appearance(scene, 0, "mauve", "flat")
    with pytest.raises(ValueError, match="texture"):
        S.with_appearance(scene, 0, "red", "plaid")
    with pytest.raises(ValueError, match="scale"):
        S.moved(scene, 0, 0, 0, scale=0.0)
