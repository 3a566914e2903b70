"""Command-line interface: `dragondiffusion move …`, `dragondiffusion info`."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

from . import __version__
from .errors import InputError


def point(text: str) -> tuple[float, float]:
    """Parse 'X,Y' into a pair of floats."""
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y (e.g. 120,80), got {text!r}") from None
    return x, y


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="SD 1.x diffusers folder or hub id (default: embedded model)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--dtype", help="float32, float16 or bfloat16 (default: fp16 on CUDA)")


def add_edit_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--prompt", default="", help="text describing the image (default: empty)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    p.add_argument("--mode", default="dragon", choices=["dragon"], help="sampler schedule")
    p.add_argument("--resolution", type=int, help="working size as √area (default: model's)")
    p.add_argument(
        "--output-size",
        default="input",
        choices=["input", "working"],
        help="write the result at the input's size (default) or at the working size",
    )
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

    info = sub.add_parser("info", help="print versions, device and model facts")
    add_model_options(info)
    return parser


def check_output(out: str, inputs: list[str | None]) -> Path:
    """The output path, refusing to overwrite any input the user gave."""
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise InputError(f"--out {out!r} must end in .png (the parameters live in PNG metadata)")
    for given in inputs:
        if given and Path(given).exists() and path.exists() and path.samefile(given):
            raise InputError(f"--out {out!r} is one of the inputs; choose another output path")
    return path


def run_move(args: argparse.Namespace) -> None:
    from .models import load

    out = check_output(args.out, [args.image, args.mask, args.reference_region])
    pipe = load(args.model, args.device, args.dtype)
    pipe.set_progress_bar_config(disable=args.quiet)
    result = pipe.move(
        args.image,
        args.mask,
        args.source,
        args.target,
        scale=args.scale,
        prompt=args.prompt,
        reference_region=args.reference_region,
        num_inference_steps=args.steps,
        mode=args.mode,
        seed=args.seed,
        resolution=args.resolution,
        output_size=args.output_size,
    )
    result.save(out)
    ev = result.record["evaluations"]
    print(
        f"wrote {out} ({result.image.width}×{result.image.height}) in "
        f"{result.record['seconds']:.1f} s; UNet evaluations: {ev['forward']} forward, "
        f"{ev['backward']} backward"
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
    print(
        f"feature blocks: up_blocks{list(pipe.features.blocks)}; "
        f"memory-bank layers: {len(pipe.bank_layers)}"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        {"move": run_move, "info": run_info}[args.command](args)
    except InputError as err:
        print(f"dragondiffusion: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
