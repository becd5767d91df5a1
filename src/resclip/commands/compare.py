"""`resclip compare`: the masks of several methods side by side, one row per image (the paper's Fig. 5
view), with an optional ground-truth column.

Method names: a base attention (``clip``, ``maskclip``, ``sclip``, ``clearclip``, ``naclip``) alone,
with modules (``sclip+rcs``, ``clearclip+rcs+sfr``), or ``resclip`` (= ``naclip+rcs+sfr``). The CLIP
model is loaded once; each method only builds a new last-block engine over the same weights.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from PIL import Image

from ..classes import load_classes
from ..fileio import atomic_write
from ..palettes import PALETTES, class_palette
from ..viz import FIGURE_SUFFIXES
from .common import UserError, add_model_arguments, cli_warnings, parse_overrides, segmenter_from_args
from .segment import check_output, segment_array

if TYPE_CHECKING:  # torch-importing modules load when used, so --help answers at once
    from ..figures import Variant
    from ..segmenter import Segmenter

NAME = "compare"
HELP = "segment images with several methods and save the masks side by side (paper Fig. 5)"

DEFAULT_METHODS = "clip,maskclip,sclip,clearclip,naclip,resclip"


def shared_segmenter(args: argparse.Namespace, variants: Iterable[Variant]) -> Segmenter:
    """Load the CLIP once, with the RCS / SFR settings any of ``variants`` needs (the methods' own
    ``--set <method>_<field>`` settings are applied per variant, :func:`variant_fields`)."""
    from ..factory import method_field_owner
    from ..methods import get_method

    chosen = list(variants)
    ran = {get_method(v.method).name for v in chosen}
    for key in parse_overrides(args.overrides):
        owner = method_field_owner(key)
        if owner is not None and owner[0] not in ran:
            raise UserError(f"--set {key} is a field of {owner[0]}, which --methods does not run "
                            f"({', '.join(sorted(ran))}); add it to --methods or drop the setting")
    args = argparse.Namespace(**vars(args))
    args.method, args.rcs, args.sfr = "naclip", any(v.rcs for v in chosen), any(v.sfr for v in chosen)
    args.overrides = [item for item in args.overrides
                      if method_field_owner(item.partition("=")[0].strip().replace("-", "_")) is None]
    return segmenter_from_args(args)


def variant_fields(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The ``--set <method>_<field>`` settings of one variant's method."""
    from ..factory import fields_for

    return fields_for(parse_overrides(args.overrides), method)


def hide_options(parser: argparse.ArgumentParser, dests: Sequence[str]) -> None:
    """Hide options from ``--help`` (the model options this command replaces with ``--methods``)."""
    for action in parser._actions:
        if action.dest in dests:
            action.help = argparse.SUPPRESS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``resclip compare``."""
    parser.add_argument("images", metavar="IMAGE", nargs="+",
                        help="one or more images, one figure row each (converted to RGB, EXIF "
                        "orientation applied)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--classes", help="class names: 'cat; sofa; sky, clouds'")
    src.add_argument("--class-file", help="UTF-8 text file, one class per line")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated methods, e.g. sclip+rcs+sfr; resclip = naclip+rcs+sfr "
                        f"(default: {DEFAULT_METHODS})")
    parser.add_argument("--truth", action="append", default=[], metavar="PNG",
                        help="ground-truth mask (class indices, 255 = ignore) of the images in order, "
                        "shown as a column after the image; give it once per image")
    parser.add_argument("--labels", choices=("paper", "names"), default="paper",
                        help="column titles: the papers' spellings (SCLIP + RCS, ResCLIP) or the "
                        "--methods names (default: paper)")
    parser.add_argument("--out", required=True, help=f"figure file ({', '.join(FIGURE_SUFFIXES)})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing figure")
    parser.add_argument("--height", type=int, default=320, help="panel height in pixels (default: 320)")
    parser.add_argument("--palette", choices=PALETTES, default="classes",
                        help="mask colours (default: classes, black only for a class named background)")
    add_model_arguments(parser, default_preset="default")
    hide_options(parser, ("method", "rcs", "sfr"))


def check_figure_path(out: str, overwrite: bool, suffixes: Sequence[str]) -> Path:
    """The output path, checked for a supported extension and for an existing file."""
    path = Path(out).expanduser()
    if path.suffix.lower() not in suffixes:
        raise UserError(f"--out {out!r}: use one of the extensions {', '.join(suffixes)}")
    check_output(path, overwrite)
    return path


def read_truth(path: str, size: tuple[int, int]) -> np.ndarray:
    """A ground-truth PNG as ``(H, W)`` int64 class indices, checked against the image size ``(W, H)``."""
    try:
        with Image.open(path) as img:
            if img.size != size:
                raise UserError(f"--truth {path!r} is {img.size[0]}x{img.size[1]}, its image "
                                f"{size[0]}x{size[1]}; give the masks in the order of the images")
            if img.mode not in ("P", "L", "I", "I;16"):
                raise UserError(f"--truth {path!r}: expected a palette or grayscale PNG of class "
                                f"indices, got mode {img.mode}")
            return np.asarray(img).astype(np.int64)
    except OSError as err:
        raise UserError(f"--truth {path!r}: cannot read it ({err})") from None


def run(args: argparse.Namespace) -> int:
    """Segment the images with every method and save the figure."""
    from ..figures import CompareRow, compare_figure, parse_variants, picture_bytes
    from ..preprocess import load_image

    if args.height < 16:
        raise UserError("--height must be >= 16")
    if args.truth and len(args.truth) != len(args.images):
        raise UserError(f"{len(args.truth)} --truth masks for {len(args.images)} images; give one per image")
    variants = parse_variants(args.methods)
    spec = load_classes(args.classes, args.class_file)
    out = check_figure_path(args.out, args.overwrite, FIGURE_SUFFIXES)
    with cli_warnings():
        images = [load_image(path) for path in args.images]
        truths = [read_truth(t, (rgb.shape[1], rgb.shape[0]))
                  for t, rgb in zip(args.truth, images, strict=False)]  # none, or one per image
        base = shared_segmenter(args, variants)
        spec, emb = base.encode_classes(cast(Any, spec))
        rows = []
        for i, rgb in enumerate(images):
            masks = []
            for variant in variants:
                seg = base.with_method(variant.method, rcs=variant.rcs, sfr=variant.sfr,
                                       fields=variant_fields(args, variant.method))
                title = variant.title if args.labels == "paper" else variant.label
                masks.append((title, segment_array(seg, rgb, spec, emb)))
            rows.append(CompareRow(rgb, masks, truths[i] if truths else None))
    figure = compare_figure(rows, spec.names, class_palette(spec.names, args.palette), args.height)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, picture_bytes(figure, out.suffix))
    print(f"wrote {out}")
    return 0
