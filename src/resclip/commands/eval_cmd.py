"""`resclip eval`: score a method on a benchmark (dataset-level mIoU, resumable, multi-GPU via torchrun).

Exit codes: 0 ok; 2 bad input (including data without any labelled pixel, whose mIoU is undefined) or an
output that cannot be written; 130 interrupted (progress is saved for the rerun). Never 0 with an mIoU
that is not a number.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..dataset_specs import get_dataset_spec, list_datasets, root_names
from .common import (
    add_data_arguments,
    add_model_arguments,
    add_regions_argument,
    check_regions,
    check_run_args,
    check_writable,
    evaluation_options,
    regions_overrides,
    segmenter_from_args,
)

if TYPE_CHECKING:  # torch-importing modules load in run(), so --help answers at once
    from ..eval import EvalResult
    from ..segmenter import Segmenter

NAME = "eval"
HELP = "evaluate on a benchmark (mIoU as the papers compute it)"
DATASET_DEFAULT = "<dataset>"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help=f"benchmark: {', '.join(list_datasets())}")
    parser.add_argument(
        "--root",
        required=True,
        help=f"the dataset's MMSegmentation folder ({', '.join(root_names())})",
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
    add_regions_argument(parser)
    add_model_arguments(parser, default_preset=DATASET_DEFAULT)
    add_data_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..datasets import list_samples
    from ..eval import distributed, evaluate
    from ..presets import get_preset

    spec = get_dataset_spec(args.dataset)
    check_run_args(args)
    if args.preset == DATASET_DEFAULT:
        args.preset = spec.default_preset
    preset = get_preset(args.preset)
    if args.class_file is None and preset.dataset == spec.name:
        found = preset.class_file_path()  # a repository's own class names for this benchmark
        args.class_file = str(found) if found is not None else None
    samples = list_samples(spec, args.root, args.limit)  # fail on missing data before loading a model
    check_regions(args, [s.stem for s in samples])
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
    with distributed(args.device) as (info, args.device):
        seg = segmenter_from_args(args, regions_overrides(args))
        result = evaluate(seg, spec.name, args.root, **evaluation_options(args, args.output))
        if not math.isfinite(result.miou):  # evaluate() rejects this case; never report it as success
            print(f"resclip: error: the mIoU of {spec.name} is not a number ({result.miou})", file=sys.stderr)
            return 1
        if info.rank == 0:
            _report(result, seg, args)
    return 0


def _report(result: EvalResult, seg: Segmenter, args: argparse.Namespace) -> None:
    from ..eval import write_results
    from ..metrics import format_table

    print(format_table(result.metrics, result.class_names))
    c = seg.config
    print(
        f"{result.dataset.title}: mIoU {result.miou:.2f} on {result.num_images} images "
        f"({c.method}, RCS {'on' if args.rcs else 'off'}, SFR {'on' if args.sfr else 'off'}, "
        f"preset {c.preset}, {c.model})"
    )
    if args.output:
        paths = write_results(result, args.output)
        print("wrote " + ", ".join(str(p) for p in paths))
    if args.save_predictions:
        print(f"predictions in {args.save_predictions}")
