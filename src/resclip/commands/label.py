"""`resclip label`: label a whole image collection with one class list into sharded Parquet.

The command parses the options, calls :func:`resclip.labelling.run_label` and prints its summary; the
library owns sources, engines, resuming and the output format (:mod:`resclip.labelling`).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..fileio import atomic_write_text
from ..palettes import PALETTES
from .common import (
    METHOD_ALIAS,
    UserError,
    add_model_arguments,
    add_regions_argument,
    cli_warnings,
    parse_aux_pretrained,
    parse_overrides,
    regions_overrides,
    warn_precision,
)

NAME = "label"
HELP = "label a whole image collection (folder, list, WebDataset tars, Parquet) into sharded Parquet files"

DEFAULTS_NOTE = """\
SOURCE: a folder (recursive) or quoted glob; a .txt file of image paths (one per line); WebDataset
shards ("shards/train-{000000..000099}.tar"); or a .parquet file / folder with an image path or
image bytes column. Ids: relative path, text line, WebDataset key, or the Parquet id/key column.

Output, one Parquet file per shard (OUT/part-00007.parquet), one row per image: id, width,
height, status, error, pixels and share of every class, COCO RLE of every class (mask size
[height, width]), and with --save-masks OUT/masks/<id>.png. The settings, classes and model
fingerprint are in each file's metadata and in OUT/_label.json.

Resuming: a shard is finished once OUT/_done/part-NNNNN.json names its Parquet's sha256; rerun
the same command to skip finished shards and redo an interrupted one. An OUT folder labelled with
another source, classes or settings is refused.

Scale out: `torchrun --nproc-per-node N -m resclip.cli label ...` (each rank takes every N-th
shard), or --engine ray [--address auto] (Ray Data actors, one model each; a local Ray without
--address). The files are byte-identical however they were made.

Unreadable, truncated, empty or too-small images are recorded with status 'failed' and the reason;
the job goes on and the summary lists them. Exit status: 0 the job finished (failures included);
2 bad input or settings.

Needs: pip install 'resclip[label]' (pyarrow, webdataset); --engine ray: pip install 'resclip[ray]'."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``resclip label``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = DEFAULTS_NOTE
    parser.add_argument("source", metavar="SOURCE",
                        help="folder, quoted glob, .txt list of paths, .tar shards (brace pattern) or "
                        ".parquet")
    cls = parser.add_mutually_exclusive_group(required=True)
    cls.add_argument("--classes", help="class names: 'cat; sofa; sky, clouds' (';' between classes, ',' "
                     "between synonyms)")
    cls.add_argument("--class-file", help="UTF-8 text file, one class per line, synonyms separated by ','")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    g = parser.add_argument_group("output and run")
    g.add_argument("--save-masks", action="store_true", help="also write OUT/masks/<id>.png (palette PNG)")
    g.add_argument("--palette", choices=PALETTES, default="classes", help="colours of the mask PNGs "
                   "(default: classes)")
    g.add_argument("--shard-size", type=int, default=1000, metavar="N",
                   help="images per output file (default: 1000; a WebDataset tar is one shard)")
    g.add_argument("--workers", type=int, default=2,
                   help="decoding / writing threads per process (default: 2; 0: all in line)")
    g.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process, or one per rank under torchrun (default); ray: Ray Data actors")
    g.add_argument("--address", default=None, help="Ray cluster address, e.g. auto (default: a local Ray)")
    g.add_argument("--num-actors", type=int, default=None, metavar="N",
                   help="Ray actors (default: one per GPU, else one per CPU)")
    g.add_argument("--id-column", default=None, help="Parquet: the id column (default: id, key or __key__)")
    g.add_argument("--path-column", default=None, help="Parquet: the image path column (default: path...)")
    g.add_argument("--image-column", default=None, help="Parquet: the image bytes column (default: image...)")
    g.add_argument("--summary", default=None, metavar="FILE",
                   help="also write the summary as JSON (counts, failures, seconds, images/s)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    add_regions_argument(parser, key="image id")
    add_model_arguments(parser, default_preset="default")


def run(args: argparse.Namespace) -> int:
    """Label the source; returns 0 when the job finished (failed images are listed), 2 on bad input."""
    from ..classes import load_classes
    from ..clip import resolve_device
    from ..labelling import LabelOptions, MissingExtra, ModelSpec, SourceOptions, run_label

    if args.shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.num_actors is not None and args.num_actors < 1:
        raise UserError(f"--num-actors must be >= 1, got {args.num_actors}")
    if args.address and args.engine != "ray":
        raise UserError("--address is for --engine ray; add --engine ray")
    if args.method == METHOD_ALIAS and (args.rcs is False or args.sfr is False):
        raise UserError("--method resclip is naclip with RCS and SFR; "
                        "use --method naclip with --no-rcs / --no-sfr instead")
    spec = load_classes(args.classes, args.class_file)
    overrides = {**parse_overrides(args.overrides), **regions_overrides(args)}
    warn_precision(resolve_device(args.device).type, args.precision)
    model = ModelSpec(
        method=args.method, rcs=args.rcs, sfr=args.sfr, preset=args.preset, model=args.model,
        pretrained=None if str(args.pretrained).lower() == "none" else args.pretrained,
        device=args.device, precision=args.precision, fidelity=args.fidelity,
        window_batch=args.window_batch, overrides=tuple(sorted(overrides.items())),
        aux_pretrained=tuple(sorted(parse_aux_pretrained(args.aux_pretrained).items())),
    )
    options = LabelOptions(
        save_masks=args.save_masks, palette=args.palette, workers=args.workers, engine=args.engine,
        address=args.address, num_actors=args.num_actors, progress=not args.quiet,
        source=SourceOptions(args.shard_size, args.id_column, args.path_column, args.image_column),
        regions=args.regions,
    )
    try:
        with cli_warnings():
            summary = run_label(args.source, spec, args.out, model, options)
    except MissingExtra as err:
        raise UserError(str(err)) from err
    if summary.rank == 0 and args.summary:
        atomic_write_text(args.summary, json.dumps(summary.to_dict(), indent=1) + "\n")
    if summary.rank == 0 and not args.quiet:
        text = summary.text()
        print(text.splitlines()[0])
        if summary.failures:
            print("\n".join(text.splitlines()[1:]), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m resclip.commands.label ...``: this command alone (e.g. under ``torchrun``)."""
    parser = argparse.ArgumentParser(prog="resclip label", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    from ..cli import run_command

    return run_command(run, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
