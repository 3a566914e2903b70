"""Measure the demo model and write docs/demo-model.md with its figures under docs/images/.

    python scripts/evaluate_demo_model.py [--model FOLDER] [--out docs] [--threads 2]
        [--photo-resolution N]  (default: the photo's own area)

Default model: the embedded one (src/dragondiffusion/demo_model). Held-out data: procedural
scenes with seeds below the training script's TRAIN_SEED_FLOOR and the scikit-image photos it
keeps out of training (needs scikit-image: pip install -e ".[bench]"); on the `coffee` photo
the cup and saucer are also moved at the photo's own size. What is measured is described in
`dragondiffusion.model_report`. About 15 minutes on 2 CPU cores (2.5 of them the photo move at
576×384).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo_model import HELD_OUT_PHOTOS, TRAIN_SEED_FLOOR, load_photos, training_summary

from dragondiffusion import load
from dragondiffusion.cli import check_writable, set_threads
from dragondiffusion.errors import InputError
from dragondiffusion.model_report import PHOTO_MOVE_RESOLUTION, measure, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="SD 1.x diffusers folder (default: the embedded model)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="docs folder (docs)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--scenes", type=int, default=16, help="held-out scenes for the VAE")
    parser.add_argument(
        "--inversion-scenes", type=int, default=4, help="of those, how many to invert (4)"
    )
    parser.add_argument(
        "--photo-resolution",
        type=int,
        default=PHOTO_MOVE_RESOLUTION,
        help="working resolution of the held-out photo move, area ≈ N² (default: the "
        "photo's own area: 576×384 for the 600×400 coffee photo; 288 gives 384×256)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--run",
        type=Path,
        default=Path("training/demo-model"),
        help="training run folder whose run.json is summarised (training/demo-model; "
        "skipped when it has none)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        check_args(args)
        set_threads(args.threads)
        pipe = load(args.model, args.device)
        pipe.set_progress_bar_config(disable=True)
        photos = dict(zip(HELD_OUT_PHOTOS, load_photos(HELD_OUT_PHOTOS), strict=True))
        report = measure(
            pipe,
            photos,
            scene_seeds=range(args.scenes),
            inversion_scenes=args.inversion_scenes,
            correspondence_seeds=range(args.scenes),
            steps=args.steps,
            photo_resolution=args.photo_resolution,
        )
        run_json = args.run / "run.json"
        appendix = training_summary(run_json) if run_json.is_file() else ""
        path = write_report(report, args.out, appendix)
    except InputError as err:
        print(f"evaluate_demo_model: error: {err}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"wrote {path} in {report.seconds / 60:.1f} minutes")
    return 0


def check_args(args: argparse.Namespace) -> None:
    """InputError for a bad option, before the model loads (not after the measurement)."""
    if args.photo_resolution is not None and args.photo_resolution <= 0:
        raise InputError("--photo-resolution must be a positive number of pixels, e.g. 288")
    if not 1 <= args.scenes <= TRAIN_SEED_FLOOR:
        raise InputError(
            f"--scenes must be 1 to {TRAIN_SEED_FLOOR} (training seeds start there), got "
            f"{args.scenes}"
        )
    if not 0 <= args.inversion_scenes <= args.scenes:
        raise InputError(
            f"--inversion-scenes must be 0 to --scenes ({args.scenes}): the inverted scenes are "
            f"some of those, got {args.inversion_scenes}"
        )
    if args.steps < 2:
        raise InputError(f"--steps must be at least 2, got {args.steps}")
    check_writable(args.out / "demo-model.md", str(args.out))


if __name__ == "__main__":
    sys.exit(main())
