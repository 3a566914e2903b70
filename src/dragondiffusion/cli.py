"""Command-line interface: `dragondiffusion move …`, `… info`, `… demo`, `… bench quality`."""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from pathlib import Path

from . import __version__
from .composite import margin_given
from .errors import InputError

STEPS_HELP = "DDIM steps (default: the model's own for each edit, else 50)"
POINT_OPTIONS = ("--from", "--to", "--drag", "--offset")
"""The options whose values are points or pairs, which may start with a minus (--offset -10,0):
`joined_values` keeps argparse from taking such a value for an option."""


def point(text: str) -> tuple[float, float]:
    """Parse 'X,Y' into a pair of floats."""
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y (e.g. 120,80), got {text!r}") from None
    return x, y


def pair(text: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Parse 'X1,Y1:X2,Y2' into a (handle, target) pair of points."""
    try:
        handle, target = text.split(":")
        return point(handle), point(target)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"expected X1,Y1:X2,Y2 (handle:target, e.g. 40,60:70,60), got {text!r}"
        ) from None


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="SD 1.x diffusers folder or hub id (default: embedded model)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--dtype", help="float32, float16 or bfloat16 (default: fp16 on CUDA)")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: one per core; fewer when other work shares them)",
    )


def add_edit_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--prompt", default="", help="text describing the image (default: empty)")
    p.add_argument("--steps", type=int, help=STEPS_HELP)
    p.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    p.add_argument(
        "--mode",
        default="diffeditor",
        choices=["diffeditor", "dragon"],
        help="sampler: DiffEditor (default, as upstream's demo) or the DragonDiffusion paper's",
    )
    p.add_argument(
        "--sde-strength", type=float, default=0.4, help="DiffEditor η inside the edit (0.4)"
    )
    p.add_argument(
        "--sde-strength-outside", type=float, default=0.0, help="DiffEditor η outside it (0)"
    )
    p.add_argument("--resolution", type=int, help="working size as √area (default: model's)")
    p.add_argument(
        "--output-size",
        default="input",
        choices=["input", "working"],
        help="write the result at the input's size (default) or at the working size",
    )
    p.add_argument(
        "--keep-background",
        action=argparse.BooleanOptionalAction,
        help="keep the input's own pixels beyond a margin around the edited region (the "
        "default); --no-keep-background: the model's whole re-synthesised image",
    )
    p.add_argument(
        "--background-margin",
        type=int,
        metavar="PX",
        help="output pixels around the edited region that stay the "
        "edit's, the outer half a feathered seam (default: one feature cell, 4 working px); "
        "widen it when the mask is tighter than the object",
    )
    p.add_argument(
        "--ip-adapter",
        help="IP-Adapter checkpoint (.safetensors/.bin) for DiffEditor's image prompt (optional)",
    )
    p.add_argument(
        "--image-encoder", help="CLIP image-encoder folder (default: image_encoder beside it)"
    )
    p.add_argument("--ip-scale", type=float, help="image-prompt weight at its steps (default 0.1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="output PNG (parameters stored in its metadata)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dragondiffusion",
        description="Drag-style editing of real images with a diffusion model (DragonDiffusion).",
    )
    parser.add_argument("--version", action="version", version=f"dragondiffusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    move = sub.add_parser("move", help="move and/or resize an object")
    move.add_argument("--image", required=True, help="input image")
    move.add_argument("--mask", required=True, help="object mask (white = object), image-sized")
    move.add_argument("--from", dest="source", type=point, required=True, help="handle X,Y")
    move.add_argument("--to", dest="target", type=point, required=True, help="target X,Y")
    move.add_argument("--scale", type=float, default=1.0, help="resize factor (default 1)")
    move.add_argument(
        "--reference-region", help="mask of what the vacated area should look like (optional)"
    )
    add_edit_options(move)

    app = sub.add_parser("appearance", help="give an object the appearance of another")
    app.add_argument("--image", required=True, help="base image")
    app.add_argument("--mask", required=True, help="mask of the object to restyle")
    app.add_argument("--ref-image", required=True, help="image with the reference object")
    app.add_argument("--ref-mask", required=True, help="mask of the reference object")
    app.add_argument("--ref-prompt", help="prompt of the reference image (default: --prompt)")
    add_edit_options(app)

    drag = sub.add_parser("drag", help="drag content from handle points to target points")
    drag.add_argument("--image", required=True, help="input image")
    drag.add_argument(
        "--mask",
        required=True,
        help="editable region (white), image-sized; it must cover every handle and target",
    )
    drag.add_argument(
        "--drag",
        dest="pairs",
        type=pair,
        action="append",
        required=True,
        help="X1,Y1:X2,Y2 handle→target pair; repeat for more pairs",
    )
    add_edit_options(drag)

    paste = sub.add_parser("paste", help="paste an object from a reference image")
    paste.add_argument("--image", required=True, help="background image")
    paste.add_argument("--ref-image", required=True, help="image with the object to paste")
    paste.add_argument("--ref-mask", required=True, help="mask of the object to paste")
    paste.add_argument(
        "--offset", type=point, default=(0.0, 0.0), help="DX,DY shift from its reference place"
    )
    paste.add_argument("--scale", type=float, default=1.0, help="resize factor (default 1)")
    paste.add_argument("--ref-prompt", help="prompt of the reference image (default: --prompt)")
    add_edit_options(paste)

    info = sub.add_parser("info", help="print versions, device and model facts")
    add_model_options(info)

    demo = sub.add_parser(
        "demo", help="run every edit on example scenes; write pictures and an HTML page"
    )
    add_model_options(demo)
    demo.add_argument(
        "--out", default="dragondiffusion-demo", help="output folder (default dragondiffusion-demo)"
    )
    demo.add_argument("--steps", type=int, help=STEPS_HELP)
    add_bench_parser(sub)
    return parser


def add_bench_parser(sub) -> None:
    """`bench quality` (the speed harness will be the group's next member)."""
    from .bench import ABLATIONS, EDITS

    bench = sub.add_parser("bench", help="benchmarks")
    group = bench.add_subparsers(dest="benchmark", required=True)
    quality = group.add_parser(
        "quality",
        help="every edit against the exact expected result of held-out scenes, with a naive "
        "baseline, the unedited input and ablations; writes a table and a contact sheet",
    )
    add_model_options(quality)
    quality.add_argument("--n", type=int, default=50, help="scenes per edit (default 50)")
    quality.add_argument("--edits", default=",".join(EDITS), help="edits (default: all)")
    quality.add_argument(
        "--mode", default="diffeditor,dragon", help="sampler modes, one row each (default both)"
    )
    quality.add_argument("--steps", type=int, help=STEPS_HELP)
    quality.add_argument("--seed", type=int, default=0, help="scenes and sampler seed (0)")
    quality.add_argument(
        "--resolution",
        type=int,
        help="working resolution of the edits, px as √area (default: the model's native); "
        "the scenes and the metrics stay at the native resolution",
    )
    quality.add_argument(
        "--ablations",
        default=",".join(ABLATIONS),
        help="ablations, in the first mode, or none (default: all)",
    )
    quality.add_argument(
        "--fewer-steps",
        type=int,
        help="steps of the fewer-steps ablation (default: 40 %% of each edit's steps)",
    )
    quality.add_argument("--no-baseline", action="store_true", help="skip the naive baseline")
    quality.add_argument(
        "--no-keep-background",
        action="store_true",
        help="every method row on the model's whole re-synthesised image (to see or tune what "
        "the sampler does to the background); its own docs section",
    )
    quality.add_argument(
        "--set",
        dest="sweep",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="try these values of an edit weight (e.g. energy_scale=4000,8000): one row of the "
        "method in the first mode per combination; repeatable",
    )
    quality.add_argument(
        "--out", default="quality-bench", help="output folder (default quality-bench)"
    )
    quality.add_argument(
        "--docs",
        default="docs/benchmarks.md",
        help="markdown file that gets the table's section (default docs/benchmarks.md)",
    )
    quality.add_argument("--no-docs", action="store_true", help="write no markdown section")
    quality.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes that run scenes side by side (default 1), each with its own copy of the "
        "model and --threads torch threads (if not given: one per core, shared out); "
        "--workers 2 --threads 1 ran 1.4x faster than one process on a 2-core CPU",
    )
    quality.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished run in --out (same options and model): keep its finished "
        "scenes, run the rest",
    )


def check_output(out: str, inputs: list[str | None]) -> Path:
    """The output path, refusing to overwrite any input the user gave or a folder, and one
    that cannot be written (checked before the model loads, not after the edit ran)."""
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise InputError(f"--out {out!r} must end in .png (the parameters live in PNG metadata)")
    if path.is_dir():
        raise InputError(f"--out {out!r} is a folder; choose another --out, a PNG file's path")
    for given in inputs:
        if given and Path(given).exists() and path.exists() and path.samefile(given):
            raise InputError(f"--out {out!r} is one of the inputs; choose another output path")
    check_writable(path, out)
    return path


def check_writable(path: Path, out: str) -> None:
    """Raise InputError unless a file may be made at `path` (`io.folder_problem`; the missing
    folders above it are made on writing)."""
    from .io import folder_problem

    problem = folder_problem(path.parent)
    if problem is not None:
        raise InputError(f"--out {out!r}: {problem}; choose another --out")


def margin_of(args: argparse.Namespace) -> int:
    """--background-margin, which only means something with a kept background."""
    if args.keep_background is False:
        raise InputError(
            "--background-margin is the margin of a kept background; leave out "
            "--no-keep-background or the margin"
        )
    return margin_given(args.background_margin, "--background-margin")


def edit_options(args: argparse.Namespace) -> dict:
    """The EditOptions fields from the common command-line options."""
    return {
        "num_inference_steps": args.steps,
        "mode": args.mode,
        "seed": args.seed,
        "resolution": args.resolution,
        "output_size": args.output_size,
        "sde_strength": args.sde_strength,
        "sde_strength_outside": args.sde_strength_outside,
        **({} if args.keep_background is None else {"keep_background": args.keep_background}),
        **({} if args.background_margin is None else {"background_margin": margin_of(args)}),
        **({} if args.ip_scale is None else {"ip_scale": args.ip_scale}),
    }


MASK_NAMES = {"move": "object mask", "appearance": "object mask", "drag": "editable region"}
"""What each edit's --mask is, in its errors (the pipeline's names)."""


def read_inputs(args: argparse.Namespace) -> None:
    """Read the images and masks the paths in `args` name, in their place: a bad file is an
    error before the model loads, not after."""
    from .io import load_image, load_mask

    args.image = load_image(args.image)
    if getattr(args, "ref_image", None) is not None:
        args.ref_image = load_image(args.ref_image, "reference image")
    masks = (
        ("mask", MASK_NAMES.get(args.command, "mask"), args.image),
        ("ref_mask", "reference mask", getattr(args, "ref_image", None)),
        ("reference_region", "reference region", args.image),
    )
    for name, what, image in masks:
        if getattr(args, name, None) is not None and image is not None:
            setattr(args, name, load_mask(getattr(args, name), image.size, what))


def run_edit(args: argparse.Namespace) -> None:
    """Load the model, run the subcommand's edit, write the PNG with its record."""
    from .models import load

    inputs = [getattr(args, n, None) for n in ("image", "mask", "ref_image", "ref_mask")]
    out = check_output(args.out, [*inputs, getattr(args, "reference_region", None)])
    for option, value in (("--image-encoder", args.image_encoder), ("--ip-scale", args.ip_scale)):
        if value is not None and not args.ip_adapter:
            raise InputError(f"{option} is for the image prompt; give --ip-adapter as well")
    common = {"prompt": args.prompt, **edit_options(args)}  # its own checks before the load
    read_inputs(args)
    pipe = load(args.model, args.device, args.dtype)
    pipe.set_progress_bar_config(disable=args.quiet)
    if args.ip_adapter:
        pipe.load_image_prompt(args.ip_adapter, image_encoder=args.image_encoder)
    if args.command == "move":
        result = pipe.move(
            args.image,
            args.mask,
            args.source,
            args.target,
            scale=args.scale,
            reference_region=args.reference_region,
            **common,
        )
    elif args.command == "appearance":
        result = pipe.appearance(
            args.image, args.mask, args.ref_image, args.ref_mask,
            reference_prompt=args.ref_prompt, **common,
        )  # fmt: skip
    elif args.command == "drag":
        result = pipe.drag(args.image, args.mask, args.pairs, **common)
    else:
        result = pipe.paste(
            args.image, args.ref_image, args.ref_mask, offset=args.offset, scale=args.scale,
            reference_prompt=args.ref_prompt, **common,
        )  # fmt: skip
    result.save(out)
    ev = result.record["evaluations"]
    print(
        f"wrote {out} ({result.image.width}×{result.image.height}) in "
        f"{result.record['seconds']:.1f} s; UNet evaluations: {ev['forward']} forward, "
        f"{ev['backward']} backward"
    )


def run_demo(args: argparse.Namespace) -> None:
    from .demo import demo

    demo(args.out, args.model, args.steps, args.device, args.dtype)


def weight_values(text: str) -> tuple[str, tuple[float, ...]]:
    """`NAME=V1,V2,...` of `bench quality --set` → (NAME, (V1, V2, ...))."""
    name, sep, values = text.partition("=")
    try:
        numbers = tuple(float(v) for v in values.split(","))
    except ValueError:
        numbers = ()
    if not sep or not name.strip() or not numbers:
        raise InputError(f"--set {text!r}: write NAME=V1,V2,... e.g. energy_scale=4000,8000")
    return name.strip(), numbers


def run_bench(args: argparse.Namespace) -> None:
    try:
        from .bench import quality
    except ImportError as err:
        raise InputError(
            f"the quality benchmark needs {err.name}: pip install 'dragondiffusion[bench]'"
        ) from None
    settings = quality.Settings(
        model=args.model,
        n=args.n,
        edits=quality.choices(args.edits, quality.EDITS, "--edits"),
        modes=quality.choices(args.mode, quality.MODES, "--mode"),
        steps=args.steps,
        seed=args.seed,
        ablations=quality.choices(args.ablations, quality.ABLATIONS, "--ablations", empty=True),
        fewer_steps=args.fewer_steps,
        baseline=not args.no_baseline,
        keep_background=not args.no_keep_background,
        device=args.device,
        dtype=args.dtype,
        sweep=tuple(weight_values(text) for text in args.sweep),
        resolution=args.resolution,
    )
    docs = None if args.no_docs else args.docs
    quality.quality(
        settings, args.out, docs, resume=args.resume, workers=args.workers, threads=args.threads
    )


def run_info(args: argparse.Namespace) -> None:
    import diffusers
    import torch
    import transformers

    from .models import load, pick_device, pick_dtype

    device = pick_device(args.device)
    print(f"dragondiffusion {__version__}")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    )
    print(
        f"cuda available: {torch.cuda.is_available()}; device: {device}; "
        f"dtype: {str(pick_dtype(device, args.dtype)).removeprefix('torch.')}"
    )
    pipe = load(args.model, device, args.dtype)
    params = {
        n: sum(p.numel() for p in getattr(pipe, n).parameters())
        for n in ("unet", "vae", "text_encoder")
    }
    print(f"model: {pipe.model_name}")
    print("parameters: " + ", ".join(f"{n} {v / 1e6:.2f} M" for n, v in params.items()))
    print(f"native resolution: {pipe.native_resolution} px; sides multiple of {pipe.size_multiple}")
    own = "".join(
        f"; {edit}: up_blocks{list(f.blocks)}" for edit, f in pipe.feature_overrides.items()
    )
    print(
        f"feature blocks: up_blocks{list(pipe.features.blocks)}{own}; "
        f"memory-bank layers: {len(pipe.bank_layers)}"
    )
    from .bench import EDITS

    steps = ", ".join(f"{e} {pipe.edit_defaults.num_steps(e)}" for e in EDITS)
    print(f"default steps: {steps} ({pipe.edit_defaults.source})")


def set_threads(threads: int | None) -> None:
    """Use `threads` CPU threads in torch (None: torch's default, one per core). Busy cores
    oversubscribed by torch's threads slow it many times over."""
    if threads is None:
        return
    if threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    cores = os.cpu_count() or 1
    if threads > 4 * cores:
        raise InputError(
            f"--threads {threads} is far above this machine's {cores} CPU cores (each thread "
            f"beyond a core slows torch down); give at most {cores}"
        )
    import torch

    torch.set_num_threads(threads)


def joined_values(argv: list[str]) -> list[str]:
    """`argv` with each value of a point option that starts with a minus and a digit joined to
    it (--offset -10,0 → --offset=-10,0): argparse reads only plain numbers as negative."""
    joined: list[str] = []
    for token in argv:
        if joined and joined[-1] in POINT_OPTIONS and re.match(r"-\.?\d", token):
            joined[-1] = f"{joined[-1]}={token}"
        else:
            joined.append(token)
    return joined


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(joined_values(argv))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        set_threads(getattr(args, "threads", None))
        commands = {"info": run_info, "demo": run_demo, "bench": run_bench}
        commands.get(args.command, run_edit)(args)
    except InputError as err:
        print(f"dragondiffusion: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a message, not a traceback from wherever it landed
        kept = " (finished scenes are kept: run it again with --resume)"
        print(
            f"dragondiffusion: interrupted{kept if args.command == 'bench' else ''}",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
