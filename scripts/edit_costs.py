"""Cost of every edit in both sampler modes: UNet evaluations and wall time, as a table.

    python scripts/edit_costs.py [--model M] [--steps 50] [--out docs/benchmarks.md]

Without --model it builds the tiny random test bundle (`dragondiffusion.testing`), whose costs
count the same evaluations as a real model (the counts depend only on the schedule). Times are
wall seconds on this machine, one run each, so compare them only within one table: the `ratio`
column is each edit's time over the plain 50-step DDIM reconstruction measured in the same run.
The table is printed and written between markers in --out.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import dragondiffusion
from dragondiffusion.bench import EDITS
from dragondiffusion.bench.quality import require_known
from dragondiffusion.bench.sections import check_sections, write_section
from dragondiffusion.cli import set_threads
from dragondiffusion.errors import InputError
from dragondiffusion.models import pick_device
from dragondiffusion.sampler import MODES
from dragondiffusion.testing import build_tiny_bundle

COUNTS = ("inversion", "denoise", "features", "backward", "rollback", "forward")


def example(size: tuple[int, int] = (160, 96)) -> tuple[np.ndarray, np.ndarray]:
    """A landscape test picture with a red square, and its mask."""
    w, h = size
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 1] = np.linspace(60, 160, w, dtype=np.uint8)[None, :]
    img[30:60, 20:50] = [230, 20, 20]
    mask = np.zeros((h, w), bool)
    mask[30:60, 20:50] = True
    return img, mask


def run_edit(pipe, edit: str, mode: str, steps: int):
    img, mask = example()
    ref, ref_mask = np.ascontiguousarray(img[::-1]), np.ascontiguousarray(mask[::-1])
    kw = {"num_inference_steps": steps, "mode": mode}
    if edit == "move":
        return pipe.move(img, mask, (35, 45), (100, 45), **kw)
    if edit == "resize":
        return pipe.move(img, mask, (35, 45), (35, 45), scale=1.3, **kw)
    if edit == "appearance":
        return pipe.appearance(img, mask, ref, ref_mask, **kw)
    if edit == "drag":
        editable = np.zeros_like(mask)
        editable[10:80, 10:90] = True
        return pipe.drag(img, editable, [((35, 45), (60, 45))], **kw)
    if edit == "paste":
        return pipe.paste(img, ref, ref_mask, offset=(60, 0), **kw)
    raise ValueError(edit)


def reference_seconds(pipe, steps: int) -> float:
    """Wall time of inverting the example and sampling it back with plain DDIM (no guidance)."""
    img, _ = example()
    started = time.perf_counter()
    inv = pipe.invert(img, "", steps)
    pipe(
        prompt="",
        latents=inv.latents[-1],
        width=inv.working_size[0],
        height=inv.working_size[1],
        num_inference_steps=steps,
        guidance_scale=1.0,
        output_type="latent",
    )
    return time.perf_counter() - started


def table(pipe, steps: int, edits: list[str], modes: list[str]) -> str:
    base = reference_seconds(pipe, steps)
    head = ["edit", "mode", *COUNTS, "seconds", "ratio"]
    rows = [head, ["---"] * len(head)]
    for edit in edits:
        for mode in modes:
            started = time.perf_counter()
            result = run_edit(pipe, edit, mode, steps)
            seconds = time.perf_counter() - started
            counts = result.record["evaluations"]
            rows.append(
                [
                    edit,
                    mode,
                    *(str(counts[k]) for k in COUNTS),
                    f"{seconds:.1f}",
                    f"{seconds / base:.1f}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    note = (
        f"Reference: invert + plain DDIM back, {steps} steps: {base:.1f} s. Evaluations are UNet "
        "samples (a CFG pair counts 2); `features` passes stop after the second-to-last decoder "
        "block; `backward` counts autograd.grad calls (diffeditor: E_edit and "
        "E_content separately; dragon: their sum, one)."
    )
    return "\n".join([*lines, "", note])


def check_args(args: argparse.Namespace) -> tuple[list[str], list[str], str]:
    """The edits and modes asked for, and the docs section's label; InputError for a bad
    option (before the model is built or loaded, not after the table)."""
    if args.steps < 2:
        raise InputError(f"--steps must be at least 2, got {args.steps}")
    edits = list(require_known(split(args.edits), EDITS, "--edits"))
    modes = list(require_known(split(args.modes), MODES, "--modes"))
    pick_device(args.device)  # before the tiny bundle is built
    label = "tiny random test bundle" if args.model is None else Path(args.model).name
    check_sections(args.out, f"edit-costs:{label}")
    return edits, modes, label


def split(text: str) -> list[str]:
    """The names of a comma-separated list."""
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="SD 1.x bundle (default: the tiny random test bundle)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--edits", default=",".join(EDITS))
    parser.add_argument("--modes", default="dragon,diffeditor")
    parser.add_argument("--device")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args(argv)
    try:
        costs(args, *check_args(args))
    except InputError as err:
        print(f"edit_costs: error: {err}", file=sys.stderr)
        return 2
    return 0


def costs(args: argparse.Namespace, edits: list[str], modes: list[str], label: str) -> None:
    """Measure the table, print it and write its section into --out."""
    set_threads(args.threads)  # before the tiny bundle is built: a bad count fails first
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_tiny_bundle(Path(tmp) / "tiny")
        pipe = dragondiffusion.load(model, device=args.device)
        pipe.set_progress_bar_config(disable=True)
        body = table(pipe, args.steps, edits, modes)
    cpu = platform.processor() or platform.machine()
    where = (
        f"{args.steps} steps, "
        f"device {pipe.device}, {args.threads} thread(s), {cpu}, "
        f"torch {torch.__version__}"
    )
    print(body)
    command = "python scripts/edit_costs.py" + (" --model MODEL" if args.model else "")
    write_section(
        args.out,
        f"edit-costs:{label}",
        f"Edit costs: {label}",
        f"`{command}` — {where}.\n\n{body}",
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
