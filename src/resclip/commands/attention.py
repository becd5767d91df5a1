"""`resclip attention`: where one image patch attends, across layers and methods (the paper's
Fig. 1 and Fig. 3 views), saved as one matplotlib figure (optional extra ``resclip[viz]``).

The image is resized to ``--size`` pixels on its short side and processed whole (one window). The
source patch is the one under ``--point X,Y`` (pixels of the original, EXIF-rotated image). Each
panel shows that patch's attention row over the other patches, averaged over heads and scaled to
its own range:

* top row, one panel per ``--layers`` entry: the block's plain q-k attention ``softmax(q k^T/√d)``
  (Fig. 1: localised in intermediate blocks, nearly uniform in the last);
* bottom row, one panel per ``--methods`` entry: the last block's attention of that method
  (Fig. 3), e.g. ``clip``, ``sclip``, ``clearclip``, ``naclip``, ``resclip`` (= naclip+rcs+sfr),
  ``sclip+rcs``. SFR refines attention with a first-pass segmentation, so it needs ``--classes``;
  without them methods with SFR are shown with RCS only (the panel title says so).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from ..classes import load_classes
from ..fileio import atomic_write
from .common import UserError, add_model_arguments, cli_warnings
from .compare import hide_options, shared_segmenter
from .segment import check_output

NAME = "attention"
HELP = "show the attention of one image patch across layers and methods (paper Fig. 1 / Fig. 3)"

DEFAULT_METHODS = "clip,sclip,clearclip,naclip,resclip"
FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")  # what matplotlib writes


def parse_point(text: str) -> tuple[float, float]:
    """``"X,Y"`` -> ``(x, y)`` floats."""
    parts = text.replace(" ", "").split(",")
    try:
        x, y = (float(p) for p in parts)
    except ValueError:
        raise UserError(f"--point expects X,Y in image pixels (e.g. --point 120,80), got {text!r}") from None
    return x, y


def parse_layers(text: str | None, total: int) -> list[int]:
    """``"1,6,9,12"`` -> sorted 1-based block numbers; None -> ``1, L/2, 3L/4, L``."""
    if text is None:
        return sorted({1, max(1, total // 2), max(1, 3 * total // 4), total})
    try:
        layers = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"--layers expects block numbers such as 1,6,9,12, got {text!r}") from None
    bad = [n for n in layers if not 1 <= n <= total]
    if not layers or bad:
        raise UserError(f"--layers {text!r}: block numbers must lie in 1..{total} "
                        f"(this model has {total} blocks)")
    return sorted(set(layers))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``resclip attention``."""
    parser.add_argument("image", metavar="IMAGE",
                        help="the image (converted to RGB, EXIF orientation applied)")
    parser.add_argument("--point", required=True,
                        help="source patch: X,Y in pixels of the image, e.g. 240,180")
    parser.add_argument("--layers", default=None,
                        help="1-based blocks for the top row (default: 1, L/2, 3L/4, L; 1,6,9,12 for ViT-B)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"last-block methods for the bottom row (default: {DEFAULT_METHODS}); "
                        "'' for none")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--classes", help="class names for SFR's first-pass segmentation: 'cat; sofa; sky'")
    src.add_argument("--class-file", help="UTF-8 text file, one class per line")
    parser.add_argument("--size", type=int, default=336,
                        help="short side the image is resized to (default: 336)")
    parser.add_argument("--out", required=True, help=f"figure file ({', '.join(FIGURE_SUFFIXES)})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing figure")
    parser.add_argument("--no-colorbar", dest="colorbar", action="store_false",
                        help="leave out the colour bar (low to high attention within each panel)")
    add_model_arguments(parser, default_preset="default")
    hide_options(parser, ("method", "rcs", "sfr"))


def run(args: argparse.Namespace) -> int:
    """Compute the maps and save the figure."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from ..figures import VIZ_HINT

        raise UserError(VIZ_HINT) from None
    from ..figures import (
        attention_figure,
        attention_maps,
        check_attention_variants,
        figure_bytes,
        parse_variants,
    )
    from ..preprocess import load_image
    from ..vit import num_blocks

    point = parse_point(args.point)
    if args.size < 1:
        raise UserError(f"--size must be >= 1, got {args.size}")
    variants = parse_variants(args.methods) if args.methods.strip() else []
    check_attention_variants(variants)
    out = Path(args.out).expanduser()
    if out.suffix.lower() not in FIGURE_SUFFIXES:
        raise UserError(f"--out {args.out!r}: use one of the extensions {', '.join(FIGURE_SUFFIXES)}")
    check_output(out, args.overwrite)
    spec = None
    if args.classes is not None or args.class_file is not None:
        spec = load_classes(args.classes, args.class_file)
    elif any(v.sfr for v in variants):
        print("resclip: note: no --classes given; methods with SFR are shown with RCS only", file=sys.stderr)
        variants = [replace(v, label=f"{v.label} (no SFR)", sfr=False) if v.sfr else v for v in variants]
    with cli_warnings():
        rgb = load_image(args.image)
        base = shared_segmenter(args, variants)
        layers = parse_layers(args.layers, num_blocks(base.engine.visual))
        classes = None
        if spec is not None:
            classes = base.encode_classes(cast(Any, spec))
        maps = attention_maps(base, rgb, point, layers, variants, classes, args.size)
    title = f"attention of the patch at ({point[0]:g}, {point[1]:g})"
    fig = attention_figure(maps, title, colorbar=args.colorbar)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, figure_bytes(fig, out.suffix))
    print(f"wrote {out}")
    return 0
