"""`dragondiffusion demo`: every edit on built-in example scenes, with the exact expected results.

The examples are procedural scenes (`scenes`) with fixed held-out seeds, rendered at run time at
the model's native resolution, so each edit's ideal result is known exactly. The demo loads the
model once, runs move, resize, appearance, drag and paste (move and resize share one inversion:
invert once, edit many), and writes into one folder:

    {edit}/input.png, mask.png, [reference.png, reference_mask.png], expected.png, output.png
    contact_sheet.png   rows = edits; columns input | expected | output
    index.html          the sheet, every file, the timings
    demo.json           timings, UNet evaluations and each edit's full record

and prints a per-edit timing table.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from . import __version__, scenes
from .edits import move_kind
from .errors import InputError
from .figures import annotate, contact_sheet, inset
from .geometry import Point, dilate
from .io import atomic_write, folder_problem

if TYPE_CHECKING:
    from .pipeline import DragonPipeline, EditResult

SCENE_UNIT = 128
"""Example geometry (offsets, points) is written in pixels of a 128-pixel scene and scaled."""
SUMMARY = "demo.json"
"""Written first (status "incomplete") and last; a folder holding it is a demo's output, which
a later demo may overwrite."""
CELL = 256
"""Contact-sheet cell side in pixels."""
INPUT_NAMES = ("image", "mask", "reference", "reference_mask")
"""Pipeline arguments that are pictures; each is written as an input file."""
FILE_NAMES = {
    "image": "input.png",
    "mask": "mask.png",
    "reference": "reference.png",
    "reference_mask": "reference_mask.png",
}


@dataclass(frozen=True)
class Example:
    """One demo edit: the pipeline method, its arguments, and the exact expected image.

    arguments: keyword arguments of `DragonPipeline.<edit>` (images as uint8 (H, W, 3) arrays,
        masks as bool (H, W) arrays, points in pixels), without the EditOptions.
    inversion: examples with the same key invert their image once and share the inversion.
    """

    name: str
    title: str
    edit: str
    arguments: dict[str, Any]
    expected: np.ndarray
    inversion: str

    @property
    def kind(self) -> str:
        """The edit whose model defaults it takes: its pipeline method, or "resize" for a move
        with a scale other than 1 (`edit_defaults.WEIGHTS`)."""
        return move_kind(self.arguments.get("scale", 1.0)) if self.edit == "move" else self.edit

    @property
    def arrows(self) -> list[tuple[Point, Point]]:
        """Handle → target arrows to draw on the input."""
        if self.edit == "move" and self.arguments["source"] != self.arguments["target"]:
            return [(self.arguments["source"], self.arguments["target"])]
        return list(self.arguments.get("points", []))


def move_examples(size: int) -> list[Example]:
    """Move the cyan dotted triangle right; enlarge the blue circle in place (one inversion)."""
    k = size / SCENE_UNIT
    scene = scenes.random_scene(25, size, n_objects=2)  # a blue circle, a cyan dotted triangle
    image, masks = scenes.render(scene)
    circle, triangle = (o.shape.centre for o in scene.objects)
    dx = 40 * k
    common = {"image": image, "prompt": scenes.caption(scene)}
    move = Example(
        name="move",
        title=f"move: the cyan dotted triangle {dx:.0f} px to the right",
        edit="move",
        arguments={
            **common,
            "mask": masks[1],
            "source": triangle,
            "target": (triangle[0] + dx, triangle[1]),
        },
        expected=scenes.moved(scene, 1, dx, 0.0)[0],
        inversion="circle+triangle",
    )
    resize = Example(
        name="resize",
        title="resize: the blue circle to 1.4 times its size, in place",
        edit="move",
        arguments={**common, "mask": masks[0], "source": circle, "target": circle, "scale": 1.4},
        expected=scenes.moved(scene, 0, 0.0, 0.0, 1.4)[0],
        inversion="circle+triangle",
    )
    return [move, resize]


def appearance_example(size: int) -> Example:
    """The green heart takes the colour and texture of a red striped square in another image."""
    heart = scenes.random_scene(147, size, n_objects=1)  # a green heart on a white floor
    square = scenes.random_scene(108, size, n_objects=1)  # a red striped square, noisy grey
    (image, (mask,)), (reference, (reference_mask,)) = scenes.render(heart), scenes.render(square)
    style = square.objects[0]
    return Example(
        name="appearance",
        title="appearance: the green heart takes the red stripes of the square",
        edit="appearance",
        arguments={
            "image": image,
            "mask": mask,
            "reference": reference,
            "reference_mask": reference_mask,
            "prompt": scenes.caption(heart),
            "reference_prompt": scenes.caption(square),
        },
        expected=scenes.with_appearance(heart, 0, style.colour, style.texture)[0],
        inversion="heart+square",
    )


def drag_example(size: int) -> Example:
    """The red striped star's upper tip pulled outwards; the editable region hugs the star."""
    k = size / SCENE_UNIT
    star = scenes.random_scene(149, size, n_objects=1)
    handle, target = (88 * k, 38 * k), (93 * k, 24 * k)
    image, (mask,) = scenes.render(star)
    expected, (dragged_mask,), _ = scenes.dragged(star, 0, handle, target)
    return Example(
        name="drag",
        title="drag: the red star's upper tip outwards",
        edit="drag",
        arguments={
            "image": image,
            "mask": dilate(mask | dragged_mask, round(6 * k)),
            "points": [(handle, target)],
            "prompt": scenes.caption(star),
        },
        expected=expected,
        inversion="star",
    )


def paste_example(size: int) -> Example:
    """A cyan striped heart from another scene pasted to the lower right of a yellow star."""
    k = size / SCENE_UNIT
    base = scenes.random_scene(22, size, n_objects=1)  # a yellow shaded star on the left
    other = scenes.random_scene(224, size, n_objects=1)  # a cyan striped heart
    offset = (48 * k, 30 * k)
    reference, (reference_mask,) = scenes.render(other)
    return Example(
        name="paste",
        title="paste: the cyan striped heart from another scene, lower right",
        edit="paste",
        arguments={
            "image": scenes.render(base)[0],
            "reference": reference,
            "reference_mask": reference_mask,
            "offset": offset,
            "prompt": scenes.caption(base),
            "reference_prompt": scenes.caption(other),
        },
        expected=scenes.pasted(base, other, 0, *offset)[0],
        inversion="star+heart",
    )


def examples(size: int = SCENE_UNIT) -> list[Example]:
    """The demo's five edits on scenes of `size` pixels. Seeds are held out of training and
    chosen so that each edit is clear: the edited object has room, stays inside the image and
    touches no other object, before and after."""
    return [*move_examples(size), appearance_example(size), drag_example(size), paste_example(size)]


# ---------------------------------------------------------------------------------------------
# Running.


@dataclass
class DemoEdit:
    """An example after running: the result, its files (relative to the demo folder) and cost.

    seconds: wall time of the edit, including the inversion when this edit ran it.
    inversion_seconds: None when the edit reused another edit's inversion.
    """

    example: Example
    result: EditResult
    seconds: float
    inversion_seconds: float | None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def forward(self) -> int:
        """UNet forward evaluations this edit made (a reused inversion's are not counted)."""
        ev = self.result.record["evaluations"]
        return ev["forward"] - (ev["inversion"] if self.inversion_seconds is None else 0)

    @property
    def backward(self) -> int:
        return self.result.record["evaluations"]["backward"]


def prepare_output(
    out: str | Path, summary: str = SUMMARY, what: str = "demo", own: tuple[str, ...] = ()
) -> Path:
    """The output folder of a `what` whose folders hold `summary`; refuses a file, a folder
    holding files that no such run wrote (`own`: names such a run may leave before `summary`;
    a `summary` this package did not write, see `own_summary`), and a folder that cannot be
    made or written in (`check_folder`): all before the model loads."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {str(path)!r} is a file; give a folder for the {what}'s pictures")
    foreign = path.is_dir() and any(p.name not in own for p in path.iterdir())
    if foreign and not own_summary(path / summary):
        raise InputError(
            f"--out {str(path)!r} already holds files that the {what} did not write; give a new "
            f"or empty folder (the {what} only overwrites its own earlier output)"
        )
    check_folder(path)
    return path


def own_summary(path: Path) -> bool:
    """Whether `path` is a summary this package wrote: a JSON object with the keys every
    summary starts with (a user's own demo.json is not)."""
    try:
        saved = json.loads(path.read_bytes())
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON
        return False
    return isinstance(saved, dict) and {"dragondiffusion", "status"} <= saved.keys()


def check_folder(path: Path) -> None:
    """InputError unless folder `path` can be made or, where it exists, written in."""
    problem = folder_problem(path)
    if problem is not None:
        raise InputError(f"cannot make {str(path)!r} ({problem}); choose another --out")


def make_folder(path: Path) -> Path:
    """Make folder `path` and its missing parents; InputError, not OSError, when it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = err.strerror or str(err)
        raise InputError(f"cannot make {str(path)!r} ({reason}); choose another --out") from None
    return path


def write_png(image: Image.Image | np.ndarray, path: Path) -> Path:
    """Write an RGB image or a bool mask (white = selected) as PNG, atomically."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8) * 255 if image.dtype == bool else image)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def example_steps(pipe: DragonPipeline, example: Example, steps: int | None) -> int:
    """The DDIM steps an example runs with: `steps`, else the model's default for its edit."""
    return pipe.edit_defaults.num_steps(example.kind) if steps is None else steps


def run_example(
    pipe: DragonPipeline,
    example: Example,
    steps: int | None,
    inversions: dict,
    seed: int = 42,
    resolution: int | None = None,
    **options: Any,
) -> DemoEdit:
    """Run one example, inverting its image(s) unless an earlier example already did.

    steps: DDIM steps; None: the model's default for the edit (`EditDefaults.num_steps`).
    resolution: the working resolution of a new inversion (None: the model's native one); an
    inversion already in `inversions` keeps its own, so one dict serves one resolution.
    `inversions` maps (Example.inversion key, steps) to inversions; `options` go to the edit as
    they are (other EditOptions fields, `weights`).
    """
    started = time.perf_counter()
    inversion_seconds = None
    given = example.arguments
    count = example_steps(pipe, example, steps)
    key = (example.inversion, count)
    if key not in inversions:
        inversions[key] = pipe.invert(
            given["image"],
            given.get("prompt", ""),
            count,
            reference=given.get("reference"),
            reference_prompt=given.get("reference_prompt"),
            resolution=resolution,
        )
        inversion_seconds = time.perf_counter() - started
    arguments = {**given, "image": inversions[key]}
    result = getattr(pipe, example.edit)(**arguments, seed=seed, **options)
    return DemoEdit(example, result, time.perf_counter() - started, inversion_seconds)


# ---------------------------------------------------------------------------------------------
# Writing.


def write_files(out: Path, edit: DemoEdit) -> None:
    """Write an edit's inputs, expected result and output into out/<name>/; record the paths."""
    folder = out / edit.example.name
    arguments = edit.example.arguments
    for key in INPUT_NAMES:
        if key in arguments:
            write_png(arguments[key], folder / FILE_NAMES[key])
            edit.files[FILE_NAMES[key].removesuffix(".png")] = (
                f"{edit.example.name}/{FILE_NAMES[key]}"
            )
    write_png(edit.example.expected, folder / "expected.png")
    edit.result.save(folder / "output.png")
    edit.files["expected"] = f"{edit.example.name}/expected.png"
    edit.files["output"] = f"{edit.example.name}/output.png"


def input_picture(example: Example) -> Image.Image:
    """The input as the contact sheet shows it: masks outlined, arrows drawn, and the reference
    image (its mask outlined) inset in the upper right corner for two-image edits."""
    a = example.arguments
    masks = [a["mask"]] if "mask" in a else []
    shown = annotate(Image.fromarray(a["image"]), CELL, masks, example.arrows)
    if "reference" in a:
        reference = annotate(Image.fromarray(a["reference"]), CELL, [a["reference_mask"]])
        shown = inset(shown, reference)
    return shown


def sheet(edits: list[DemoEdit], model: str) -> Image.Image:
    """The contact sheet: one row per edit; columns input | expected | output."""
    rows = [
        [input_picture(e.example), Image.fromarray(e.example.expected), e.result.image]
        for e in edits
    ]
    labels = [
        f"{e.example.title}\n\n{e.seconds:.1f} s, {e.result.record['steps']} steps" for e in edits
    ]
    columns = ["input (mask outlined)", "expected (exact)", "output"]
    label = model if len(model) <= 60 else "…" + model[-59:]
    title = f"dragondiffusion {__version__} demo · model {label}"
    return contact_sheet(rows, labels, columns, CELL, title=title)


def timing_table(edits: list[DemoEdit], load_seconds: float) -> str:
    """Per-edit wall time and UNet evaluations, as aligned plain text."""
    lines = [
        f"{'edit':<12}{'seconds':>9}{'inversion':>11}{'UNet fwd':>10}{'UNet bwd':>10}",
        *(
            f"{e.example.name:<12}{e.seconds:>9.1f}"
            f"{'reused' if e.inversion_seconds is None else f'{e.inversion_seconds:.1f} s':>11}"
            f"{e.forward:>10}{e.backward:>10}"
            for e in edits
        ),
        f"{'total':<12}{sum(e.seconds for e in edits):>9.1f}   (+ {load_seconds:.1f} s model load)",
    ]
    return "\n".join(lines)


def index_page(edits: list[DemoEdit], model: str, table: str) -> str:
    """index.html: the contact sheet, the timing table, then every edit with all its files."""
    esc = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><title>dragondiffusion demo</title>',
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "figure{display:inline-block;margin:0 1em 1em 0;text-align:center}"
        "img.cell{width:192px;image-rendering:pixelated;border:1px solid #ccc}</style>",
        "</head><body>",
        "<h1>dragondiffusion demo</h1>",
        f"<p>Model <code>{esc(model)}</code>; dragondiffusion {esc(__version__)}. Each edit runs "
        "on a procedural scene whose exact expected result is rendered by the scene generator. "
        "Every output PNG carries its full parameter record in its metadata.</p>",
        '<p><a href="contact_sheet.png"><img src="contact_sheet.png" style="max-width:100%" '
        'alt="contact sheet: input, expected and output of every edit"></a></p>',
        f"<h2>Timings</h2><pre>{esc(table)}</pre>",
        "<h2>Edits</h2>",
    ]
    for e in edits:
        parts.append(f'<h3 id="{esc(e.example.name)}">{esc(e.example.title)}</h3><div>')
        for role, path in e.files.items():
            parts.append(
                f'<figure><a href="{esc(path)}"><img class="cell" src="{esc(path)}" '
                f'alt="{esc(role)}"></a><figcaption>{esc(role.replace("_", " "))}</figcaption>'
                "</figure>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def summary(edits: list[DemoEdit], model: str, load_seconds: float, status: str) -> str:
    return json.dumps(
        {
            "dragondiffusion": __version__,
            "status": status,
            "model": model,
            "load_seconds": round(load_seconds, 3),
            "edits": [
                {
                    "name": e.example.name,
                    "title": e.example.title,
                    "seconds": round(e.seconds, 3),
                    "inversion_seconds": None
                    if e.inversion_seconds is None
                    else round(e.inversion_seconds, 3),
                    "unet_forward": e.forward,
                    "unet_backward": e.backward,
                    "files": e.files,
                    "record": e.result.record,
                }
                for e in edits
            ],
        },
        indent=2,
    )


def demo(
    out: str | Path = "dragondiffusion-demo",
    model: str | None = None,
    steps: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    log: Callable[[str], None] = print,
) -> list[DemoEdit]:
    """Run every example with one loaded model and write the demo folder (see the module doc)."""
    from .models import default_model, load

    if steps is not None and steps < 2:
        raise InputError(f"--steps must be at least 2, got {steps}")
    folder = prepare_output(out)
    name = default_model() if model is None else model
    log(f"loading {'the embedded demo model' if model is None else 'model'} {name} …")
    started = time.perf_counter()
    pipe = load(name, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    load_seconds = time.perf_counter() - started
    name = pipe.model_name  # the embedded model by its name, not this install's path
    log(f"loaded in {load_seconds:.1f} s on {pipe.device}; writing to {folder}/")
    write_text(folder / SUMMARY, summary([], name, load_seconds, "incomplete"))
    chosen = examples(pipe.native_resolution)
    edits: list[DemoEdit] = []
    inversions: dict[str, Any] = {}
    for n, example in enumerate(chosen, 1):
        log(f"[{n}/{len(chosen)}] {example.title} ({example_steps(pipe, example, steps)} steps) …")
        edit = run_example(pipe, example, steps, inversions)
        write_files(folder, edit)
        edits.append(edit)
        log(f"      done in {edit.seconds:.1f} s")
    table = timing_table(edits, load_seconds)
    atomic_write(
        folder / "contact_sheet.png", lambda tmp: sheet(edits, name).save(tmp, "PNG", optimize=True)
    )
    write_text(folder / "index.html", index_page(edits, name, table))
    write_text(folder / SUMMARY, summary(edits, name, load_seconds, "complete"))
    log(table)
    log(f"wrote {folder}/contact_sheet.png and {folder}/index.html (open it in a browser)")
    return edits
