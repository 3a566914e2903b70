"""The quality benchmark's table, markdown section, contact sheet and JSON summary."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .. import __version__
from ..demo import CELL, input_picture
from ..figures import contact_sheet

if TYPE_CHECKING:
    from .quality import QualityRun

COLUMNS: tuple[tuple[str, str], ...] = (
    ("found", "found"),
    ("size", "size"),
    ("place_px", "place px"),
    ("place_cells", "place cells"),
    ("object_psnr", "obj PSNR"),
    ("object_ssim", "obj SSIM"),
    ("histogram", "hist"),
    ("background_psnr", "bg PSNR"),
    ("background_ssim", "bg SSIM"),
    ("vacated_psnr", "vac PSNR"),
    ("ghost", "ghost"),
    ("image_psnr", "img PSNR"),
    ("image_ssim", "img SSIM"),
)
"""(metric key, table heading), in table order; `quality`'s module doc says what each is."""


def working_text(resolution: int | None) -> str:
    """ ", the edits working at R px" for a run at another working resolution, else ""."""
    return "" if resolution is None else f", the edits working at {resolution} px"


def formatted(key: str, value: float) -> str:
    """A metric as the table shows it: dB to 0.1, shares in %, pixels/cells to 0.01."""
    if math.isnan(value):
        return "–"
    if key.endswith("psnr"):
        return "∞" if math.isinf(value) else f"{value:.1f}"
    if key in ("found", "ghost"):
        return f"{100 * value:.0f}%"
    return f"{value:.2f}" if key.startswith("place") or key == "size" else f"{value:.3f}"


def brief(metrics: dict[str, float]) -> str:
    """A few metrics of one output, for the progress lines."""
    return (
        f"place {formatted('place_cells', metrics['place_cells'])} cells, "
        f"bg {formatted('background_psnr', metrics['background_psnr'])} dB, "
        f"img {formatted('image_psnr', metrics['image_psnr'])} dB"
    )


def summarise(run: QualityRun) -> list[dict[str, Any]]:
    """The table's rows: per variant (in run order) and edit, n and the mean of every metric
    over the scenes, NaN values left out (an infinite PSNR makes its mean infinite)."""
    rows = []
    for variant in run.settings.variants():
        for edit in run.settings.edits:
            picked = [r for r in run.results if r["variant"] == variant.name and r["edit"] == edit]
            if not picked:
                continue
            row: dict[str, Any] = {"variant": variant.label, "edit": edit, "n": len(picked)}
            for key, _ in COLUMNS:
                values = np.array([r[key] for r in picked], dtype=np.float64)
                kept = values[~np.isnan(values)]
                row[key] = float(kept.mean()) if len(kept) else math.nan
            rows.append(row)
    return rows


def table(run: QualityRun) -> str:
    """The markdown table of `summarise`."""
    head = ["variant", "edit", "n", *(title for _, title in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summarise(run):
        cells = [row["variant"], row["edit"], str(row["n"])]
        cells += [formatted(key, row[key]) for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(run: QualityRun) -> str:
    """The docs/benchmarks.md section: the command, what ran, the table, what the columns are."""
    s = run.settings
    return "\n".join(
        [
            f"`{s.command()}`",
            "",
            f"Model `{run.model}`; {s.n} held-out scene(s) per edit at the model's native "
            f"resolution{working_text(s.resolution)}; {run.steps_text()}; seed {s.seed}; "
            f"device {run.device}; "
            f"dragondiffusion {__version__}; {run.date}; {run.seconds / 60:.1f} minutes. "
            f"A feature cell is {run.cell_px:g} px"
            f"{'' if s.resolution is None else ' (at the native resolution)'}.",
            "",
            table(run),
            "",
            "Means over the scenes. identity: the input unedited; exact: the expected image "
            "itself (the measurements' own noise); baseline: cut-paste of the object and "
            "OpenCV Telea inpainting of the hole. "
            "found: object segmented (by its expected colours, at least "
            "a quarter of its pixels); place: object centroid error (drag: dragged-point error, "
            "by patch matching), in pixels and feature cells; obj: the expected object's pixels "
            "(PSNR, SSIM, colour-histogram total-variation distance); bg: pixels more than a "
            "cell away from anything the edit may change; vac: the vacated area against the "
            "true background, and the share of it still in the object's colour (ghost); img: "
            f"the whole image. Ablations run in {s.modes[0]} mode. "
            + (
                "The method's rows keep the input's own pixels beyond a feature cell of the "
                "edit's region (`keep_background`, the default: bg ∞ where every pixel is the "
                "input's own); the − kept background row shows the model's whole "
                "re-synthesised image. "
                if s.keep_background
                else "Every row of the method shows the model's whole re-synthesised image "
                "(`--no-keep-background`). "
            )
            + "Definitions: `src/dragondiffusion/bench/quality.py`.",
        ]
    )


def sheet(run: QualityRun) -> Image.Image:
    """Contact sheet: the first case of each edit; input | expected | baseline (unless the run
    has none) | each mode."""
    modes = run.settings.modes
    naive = ["baseline"] if run.settings.baseline else []
    rows = []
    for case, outputs in run.examples:
        row = [input_picture(case.example), Image.fromarray(case.expected)]
        row += [Image.fromarray(outputs[n]) if n in outputs else None for n in naive]
        row += [Image.fromarray(outputs[m]) for m in modes]
        rows.append(row)
    labels = [case.example.title for case, _ in run.examples]
    columns = ["input (mask outlined)", "expected (exact)", *naive, *modes]
    title = (
        f"dragondiffusion {__version__} quality benchmark · {run.steps_text()} · "
        f"seed {run.settings.seed}"
    )
    return contact_sheet(rows, labels, columns, CELL, title=title)


def summary(run: QualityRun, status: str) -> str:
    """quality.json: settings, the table's rows and every output's metrics (NaN and Infinity
    written as Python's json module writes them)."""
    return json.dumps(
        {
            "dragondiffusion": __version__,
            "status": status,
            "command": run.settings.command(),
            "settings": asdict(run.settings),
            "model": run.model,
            "device": run.device,
            "cell_px": run.cell_px,
            "date": run.date,
            "fingerprint": run.fingerprint,
            "steps": run.steps,
            "seconds": round(run.seconds, 3),
            "workers": run.workers,
            "threads": run.threads,
            "table": summarise(run),
            "results": run.results,
        },
        indent=2,
    )


def model_label(model: str | None) -> str:
    """How docs/benchmarks.md names a model: its folder's name, or the embedded model."""
    return "embedded demo model" if model is None else Path(model).name or model
