"""`resclip eval`: score a method on a benchmark (dataset-level mIoU, resumable, multi-GPU via torchrun).

Exit codes: 0 ok; 2 bad input (including data without any labelled pixel, whose mIoU is undefined) or an
output that cannot be written; 130 interrupted (progress is saved for the rerun). Never 0 with an mIoU
that is not a number.
"""

from __future__ import annotations

import argparse
import math
import sys
import uuid
from pathlib import Path

from ..datasets import get_dataset_spec, list_datasets, list_samples
from ..evaluate import close_distributed, evaluate, init_distributed, write_results
from ..fileio import atomic_write
from ..metrics import format_table
from ..presets import get_preset
from .common import UserError, add_model_arguments, segmenter_from_args

NAME = "eval"
HELP = "evaluate on a benchmark (mIoU as the papers compute it)"
DATASET_DEFAULT = "<dataset>"


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--limit, --workers, --state-dir, --fresh, --save-every, --no-progress (shared with reproduce/sweep)."""
    g = parser.add_argument_group("run")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N images")
    g.add_argument("--workers", type=int, default=2, help="image-decoding worker processes (default: 2)")
    g.add_argument(
        "--state-dir",
        default=None,
        help="where progress is kept for resuming (default: "
        "<output folder>/.resclip-state, or ~/.cache/resclip/eval without --output)",
    )
    g.add_argument("--fresh", action="store_true", help="ignore and replace saved progress")
    g.add_argument("--save-every", type=int, default=50, metavar="N", help="save progress every N images")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help=f"benchmark: {', '.join(list_datasets())}")
    parser.add_argument(
        "--root",
        required=True,
        help="the dataset's MMSegmentation folder (VOCdevkit/VOC2012, "
        "VOCdevkit/VOC2010, coco_stuff164k, cityscapes, ADEChallengeData2016)",
    )
    parser.add_argument(
        "--class-file", default=None, help="class names (default: the benchmark's shipped file)"
    )
    parser.add_argument(
        "--output", default=None, help="results JSON (a .md and a .csv summary go next to it)"
    )
    parser.add_argument(
        "--save-predictions",
        default=None,
        metavar="DIR",
        help="write one <image stem>.png per image with the ground truth's values and size",
    )
    add_model_arguments(parser, default_preset=DATASET_DEFAULT)
    add_data_arguments(parser)


def check_run_args(args: argparse.Namespace) -> None:
    """Reject bad --limit / --workers / --save-every values."""
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.save_every < 1:
        raise UserError(f"--save-every must be >= 1, got {args.save_every}")


def state_dir_for(args: argparse.Namespace, output: str | None) -> str | None:
    """--state-dir, else ``<output folder>/.resclip-state``, else None (the cache folder)."""
    if args.state_dir:
        return str(args.state_dir)
    if output:
        from pathlib import Path

        return str(Path(output).expanduser().resolve().parent / ".resclip-state")
    return None


def check_writable(folder: str | Path, what: str) -> None:
    """Fail before any work if ``folder`` (created if needed) cannot take a new file.

    Raises:
        UserError: naming the folder and the reason.
    """
    probe = Path(folder).expanduser() / f".resclip-probe-{uuid.uuid4().hex[:8]}"
    try:
        atomic_write(probe, b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write the {what} in {str(probe.parent)!r}: {err}") from err


def run(args: argparse.Namespace) -> int:
    spec = get_dataset_spec(args.dataset)
    check_run_args(args)
    if args.preset == DATASET_DEFAULT:
        args.preset = spec.default_preset
    preset = get_preset(args.preset)
    list_samples(spec, args.root, args.limit)  # fail on missing data before loading a model
    if args.output:  # fail on unwritable outputs before any work
        check_writable(Path(args.output).expanduser().parent, "results")
    if args.save_predictions:
        check_writable(args.save_predictions, "predictions")
    if preset.dataset is not None and preset.dataset != spec.name:
        print(
            f"resclip: warning: preset {preset.name!r} holds the settings of {preset.dataset}, "
            f"not {spec.name}",
            file=sys.stderr,
        )
    info, args.device = init_distributed(args.device)
    try:
        seg = segmenter_from_args(args)
        result = evaluate(
            seg,
            spec.name,
            args.root,
            limit=args.limit,
            class_file=args.class_file,
            workers=args.workers,
            save_predictions=args.save_predictions,
            state_dir=state_dir_for(args, args.output),
            resume=not args.fresh,
            release_text_tower=True,
            save_every=args.save_every,
            progress=args.progress,
        )
        if not math.isfinite(result.miou):  # evaluate() rejects this case; never report it as success
            print(f"resclip: error: the mIoU of {spec.name} is not a number ({result.miou})", file=sys.stderr)
            return 1
        if info.rank == 0:
            print(format_table(result.metrics, result.class_names))
            print(
                f"{spec.title}: mIoU {result.miou:.2f} on {result.num_images} images "
                f"({seg.config.method}, RCS {'on' if args.rcs else 'off'}, "
                f"SFR {'on' if args.sfr else 'off'}, "
                f"preset {seg.config.preset}, {seg.config.model})"
            )
            if args.output:
                paths = write_results(result, args.output)
                print("wrote " + ", ".join(str(p) for p in paths))
            if args.save_predictions:
                print(f"predictions in {args.save_predictions}")
    finally:
        close_distributed(info)
    return 0
