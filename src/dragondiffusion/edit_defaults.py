"""A model's own edit weights: defaults tuned for one model, shipped inside its bundle.

The edits' weights default to upstream's demo values, which were tuned on Stable Diffusion 1.5.
A much smaller model (the embedded demo model) may need others, e.g. no classifier-free guidance
and a stronger energy. Such a bundle carries them in `dragondiffusion.json` at its root:

    {"weights": {"move": {"guidance_scale": 1.0, "energy_scale": 2000.0}, ...}}

Each entry replaces the named fields of that edit's weights dataclass; weights passed to an edit
still win. An optional `"feature_blocks": {"move": [2]}` names, per edit, the decoder blocks
(indices of `unet.up_blocks`) whose features the energies compare, instead of DragonDiffusion's
two. An optional `"steps": {"drag": 20}` sets an edit's default number of DDIM steps (50 where
unnamed); steps given to an edit still win. A resize (a move with a scale other than 1) has its
own entries, `"resize"`, and takes move's where it has none (`FOLLOWS`; weights field by field,
so a move's `feature_timestep` holds for resizes too unless `"resize": {"feature_timestep": 0}`
keeps them at each step's own level). Bundles without the file (SD 1.5 and every other model)
keep upstream's values.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .edits import AppearanceWeights, DragWeights, MoveWeights, PasteWeights
from .errors import InputError
from .features import whole_numbers
from .sampler import whole_substeps

DEFAULTS_FILE = "dragondiffusion.json"
WEIGHTS: dict[str, type] = {
    "move": MoveWeights,
    "resize": MoveWeights,
    "appearance": AppearanceWeights,
    "drag": DragWeights,
    "paste": PasteWeights,
}
"""The weights dataclass of each edit a bundle may tune (resize: `DragonPipeline.move` with a
scale other than 1)."""
FOLLOWS = {"resize": "move"}
"""An edit → the edit whose entries (weights, feature blocks, steps) it takes where it names
none of its own: a resize is tuned as a move unless the bundle says otherwise."""
UPPER_BOUNDS = {"blend_background": 1.0, "vacated_noise": 1.0, "match_statistics": 1.0}
"""Weights with a largest value (shares); every weight is finite and ≥ 0."""
DEFAULT_STEPS = 50
"""DDIM steps of an edit whose model names none (upstream's demo)."""
SECTIONS = ("weights", "feature_blocks", "steps")
"""The entries a `dragondiffusion.json` may have (each optional)."""


def weight_problem(name: str, value: object) -> str | None:
    """What is wrong with `value` for weight `name`, or None: a number (not bool), finite, ≥ 0,
    within its bound."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return "must be a number"
    try:
        value = float(value)
    except OverflowError:  # a JSON integer beyond float's range
        return "must be finite and ≥ 0"
    if not math.isfinite(value) or value < 0:
        return "must be finite and ≥ 0"
    if value > UPPER_BOUNDS.get(name, math.inf):
        return f"must lie in [0, {UPPER_BOUNDS[name]:g}]"
    if name == "feature_substeps" and not whole_substeps(value):
        return "must be a whole number of DDIM steps ≥ 1"
    return None


def checked_weights(edit: str, weights: object) -> Any:
    """Weights given to `edit`: an instance of its dataclass (`WEIGHTS`) whose every field
    passes `weight_problem` (as Python floats, for the record), else InputError naming the
    field."""
    kind = WEIGHTS[edit]
    if not isinstance(weights, kind):
        raise InputError(
            f"the weights of a {edit} must be a {kind.__name__}, not {type(weights).__name__}"
        )
    values = {}
    for item in fields(weights):
        value = getattr(weights, item.name)
        problem = weight_problem(item.name, value)
        if problem is not None:
            raise InputError(f"{kind.__name__}.{item.name} {problem}, got {value!r}")
        values[item.name] = float(value)
    return replace(weights, **values)


def level_problem(t: float, most: int) -> str | None:
    """What is wrong with a `feature_timestep` of `t` on a model of `most` training timesteps,
    or None: no step lies beyond them, so such a value would silently act as 0 (each step reads
    at its own level), whatever the user meant by it."""
    if t > most:
        return (
            f"feature_timestep is {t:g}, beyond the model's {most} training timesteps; "
            f"give 0 (each step's own level) to {most}"
        )
    return None


def parse_blocks(value: object, source: str) -> dict[str, tuple[int, ...]]:
    """The file's "feature_blocks": edit → a non-empty list of whole numbers ({} if absent;
    whether the UNet has those blocks is checked when the model is loaded)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(
            f"{source}: feature_blocks must map edits to decoder block indices, "
            f'e.g. {{"move": [2]}}'
        )
    blocks: dict[str, tuple[int, ...]] = {}
    for edit, indices in value.items():
        if edit not in WEIGHTS:
            raise InputError(
                f"{source}: feature_blocks: unknown edit {edit!r}; use {', '.join(WEIGHTS)}"
            )
        if not isinstance(indices, list) or not whole_numbers(indices):
            raise InputError(
                f"{source}: feature_blocks of {edit} must be a non-empty list of decoder block "
                f"indices such as [2], not {indices!r}"
            )
        blocks[edit] = tuple(indices)
    return blocks


def parse_steps(value: object, source: str) -> dict[str, int]:
    """The file's "steps": edit → a whole number ≥ 2 of DDIM steps ({} if absent)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f'{source}: steps must map edits to step counts, e.g. {{"drag": 20}}')
    steps: dict[str, int] = {}
    for edit, count in value.items():
        if edit not in WEIGHTS:
            raise InputError(f"{source}: steps: unknown edit {edit!r}; use {', '.join(WEIGHTS)}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 2:
            raise InputError(
                f"{source}: steps of {edit} must be a whole number of at least 2, not {count!r}"
            )
        steps[edit] = count
    return steps


@dataclass(frozen=True)
class EditDefaults:
    """Per-edit overrides of the weights' default values, and where they came from."""

    overrides: dict[str, dict[str, float]] = field(default_factory=dict)
    source: str = "upstream"
    """'upstream' (no overrides) or the path of the file they were read from."""
    feature_blocks: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """edit → decoder blocks of its energies' features; edits not named use DragonDiffusion's
    two (1/16 and 1/8 of the image), a resize not named move's (`FOLLOWS`; the whole entry)."""
    steps: dict[str, int] = field(default_factory=dict)
    """edit → its default number of DDIM steps; edits not named take DEFAULT_STEPS, a resize
    not named move's."""

    def weights(self, edit: str) -> Any:
        """The default weights of `edit` (a key of WEIGHTS) for this model: its entry on top of
        the entry of the edit it follows (`FOLLOWS`), if any."""
        followed = self.overrides.get(FOLLOWS.get(edit, edit), {})
        return replace(WEIGHTS[edit](), **{**followed, **self.overrides.get(edit, {})})

    def num_steps(self, edit: str) -> int:
        """The default number of DDIM steps of `edit` for this model."""
        return self.steps.get(edit, self.steps.get(FOLLOWS.get(edit, edit), DEFAULT_STEPS))

    def blocks(self, edit: str) -> tuple[int, ...] | None:
        """The decoder blocks of `edit`'s energies for this model; None: DragonDiffusion's two."""
        return self.feature_blocks.get(edit, self.feature_blocks.get(FOLLOWS.get(edit, edit)))

    @classmethod
    def parse(cls, data: object, source: str) -> EditDefaults:
        """Validate a decoded `dragondiffusion.json`; InputError naming the bad entry."""
        if (
            not isinstance(data, dict)
            or not data
            or set(data) - set(SECTIONS)
            or not isinstance(data.get("weights", {}), dict)
        ):
            raise InputError(
                f'{source}: expected {{"weights": {{edit: {{field: number}}}}, '
                f'"feature_blocks": {{edit: [block index, ...]}}, "steps": {{edit: count}}}} '
                "(each optional)"
            )
        overrides: dict[str, dict[str, float]] = {}
        for edit, values in data.get("weights", {}).items():
            if edit not in WEIGHTS:
                raise InputError(f"{source}: unknown edit {edit!r}; use {', '.join(WEIGHTS)}")
            known = {f.name for f in fields(WEIGHTS[edit])}
            if not isinstance(values, dict):
                raise InputError(f"{source}: weights of {edit!r} must be an object of numbers")
            for name, value in values.items():
                if name not in known:
                    raise InputError(
                        f"{source}: {edit} has no weight {name!r}; use {', '.join(sorted(known))}"
                    )
                problem = weight_problem(name, value)
                if problem:
                    raise InputError(f"{source}: {edit}.{name} {problem}, not {value!r}")
            overrides[edit] = {name: float(value) for name, value in values.items()}
        blocks = parse_blocks(data.get("feature_blocks"), source)
        return cls(overrides, source, blocks, parse_steps(data.get("steps"), source))

    @classmethod
    def read(cls, folder: Path) -> EditDefaults:
        """The bundle's defaults: its DEFAULTS_FILE if there is one, else upstream's."""
        path = Path(folder) / DEFAULTS_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{path}: not valid JSON ({err}); fix or delete the file") from None
        return cls.parse(data, str(path))

    def write(self, folder: Path) -> Path:
        """Write the overrides as `folder`/DEFAULTS_FILE and return its path."""
        path = Path(folder) / DEFAULTS_FILE
        data: dict[str, Any] = {"weights": self.overrides}
        if self.feature_blocks:
            data["feature_blocks"] = {e: list(b) for e, b in self.feature_blocks.items()}
        if self.steps:
            data["steps"] = dict(self.steps)
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return path
