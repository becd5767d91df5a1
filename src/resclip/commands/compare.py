"""`resclip compare`: the masks of several methods side by side (the paper's Fig. 5 view).

Method names: a base attention (``clip``, ``maskclip``, ``sclip``, ``clearclip``, ``naclip``) alone,
with modules (``sclip+rcs``, ``clearclip+rcs+sfr``), or ``resclip`` (= ``naclip+rcs+sfr``). The CLIP
model is loaded once; each method only builds a new last-block engine over the same weights.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image

from .. import viz
from ..classes import load_classes
from ..fileio import atomic_write
from ..methods import get_method, list_methods
from ..palettes import PALETTES
from ..preprocess import load_image
from ..segmenter import Segmenter
from .common import UserError, add_model_arguments, cli_warnings, segmenter_from_args
from .segment import check_output, image_bytes, segment_array

NAME = "compare"
HELP = "segment one image with several methods and save the masks side by side (paper Fig. 5)"

DEFAULT_METHODS = "clip,maskclip,sclip,clearclip,naclip,resclip"
MODULES = ("rcs", "sfr")


@dataclass(frozen=True)
class Variant:
    """A base attention with or without RCS / SFR, and its display label."""

    label: str
    method: str
    rcs: bool
    sfr: bool


def parse_variant(text: str) -> Variant:
    """``"resclip"``, ``"naclip"``, ``"sclip+rcs"``, ``"clearclip+rcs+sfr"`` -> :class:`Variant`.

    Raises:
        UserError: unknown method or module.
    """
    name = text.strip().lower().replace(" ", "")
    if name == "resclip":
        return Variant("resclip", "naclip", True, True)
    base, *mods = name.split("+")
    if base not in list_methods():
        raise UserError(f"unknown method {text.strip()!r}; valid: resclip, {', '.join(list_methods())}, "
                        "optionally with +rcs and/or +sfr (e.g. sclip+rcs+sfr)")
    bad = [m for m in mods if m not in MODULES]
    if bad or len(set(mods)) != len(mods):
        raise UserError(f"method {text.strip()!r}: modules must be +rcs and/or +sfr, each at most once")
    return Variant(name, base, "rcs" in mods, "sfr" in mods)


def parse_variants(text: str) -> list[Variant]:
    """A comma-separated list of method names (see :func:`parse_variant`), without repeats."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise UserError("--methods is empty; e.g. --methods clip,sclip,naclip,resclip")
    variants = [parse_variant(item) for item in items]
    labels = [v.label for v in variants]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise UserError(f"--methods lists {', '.join(dup)} more than once")
    for v in variants:
        if v.sfr and not get_method(v.method).has_scores:
            raise UserError(f"method {v.label!r}: {v.method} has no attention scores for SFR to edit; "
                            "drop +sfr")
    return variants


def shared_segmenter(args: argparse.Namespace, variants: Iterable[Variant]) -> Segmenter:
    """Load the CLIP once, with the RCS / SFR settings any of ``variants`` needs."""
    chosen = list(variants)
    args = argparse.Namespace(**vars(args))
    args.method, args.rcs, args.sfr = "naclip", any(v.rcs for v in chosen), any(v.sfr for v in chosen)
    return segmenter_from_args(args)


def hide_options(parser: argparse.ArgumentParser, dests: Sequence[str]) -> None:
    """Hide options from ``--help`` (the model options this command replaces with ``--methods``)."""
    for action in parser._actions:
        if action.dest in dests:
            action.help = argparse.SUPPRESS


def compare_figure(image: np.ndarray, masks: Sequence[tuple[str, np.ndarray]], names: Sequence[str],
                   palette: str = "voc", height: int = 320, columns: int | None = None) -> Image.Image:
    """The image and each method's colour mask in a row, with one legend of every class shown."""
    items = [("image", viz.fit_height(image, height))]
    present = np.zeros(len(names), dtype=bool)
    for title, mask in masks:
        items.append((title, viz.fit_height(viz.colorize(mask, palette), height, nearest=True)))
        present |= viz.pixel_counts(mask, len(names)) > 0
    table = viz.colorize(np.arange(len(names)).reshape(1, -1), palette)[0]
    entries = [(names[i], viz.rgb(table[i])) for i in np.flatnonzero(present).tolist()]
    grid = viz.panels(items, columns=columns)
    key = viz.legend(entries, font_size=max(12, height // 18), max_height=grid.height)
    return viz.beside(grid, key)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``resclip compare``."""
    parser.add_argument("image", metavar="IMAGE",
                        help="the image (converted to RGB, EXIF orientation applied)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--classes", help="class names: 'cat; sofa; sky, clouds'")
    src.add_argument("--class-file", help="UTF-8 text file, one class per line")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated methods, e.g. sclip+rcs+sfr; resclip = naclip+rcs+sfr "
                        f"(default: {DEFAULT_METHODS})")
    parser.add_argument("--out", required=True, help="figure file (.png, .jpg, .webp)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing figure")
    parser.add_argument("--height", type=int, default=320, help="panel height in pixels (default: 320)")
    parser.add_argument("--columns", type=int, default=None, help="panels per row (default: one row)")
    parser.add_argument("--palette", choices=PALETTES, default="voc", help="mask colours (default: voc)")
    add_model_arguments(parser, default_preset="default")
    hide_options(parser, ("method", "rcs", "sfr"))


def check_figure_path(out: str, overwrite: bool, suffixes: Sequence[str]) -> Path:
    """The output path, checked for a supported extension and for an existing file."""
    path = Path(out).expanduser()
    if path.suffix.lower() not in suffixes:
        raise UserError(f"--out {out!r}: use one of the extensions {', '.join(suffixes)}")
    check_output(path, overwrite)
    return path


def run(args: argparse.Namespace) -> int:
    """Segment the image with every method and save the figure."""
    if args.height < 16 or (args.columns is not None and args.columns < 1):
        raise UserError("--height must be >= 16 and --columns >= 1")
    variants = parse_variants(args.methods)
    spec = load_classes(args.classes, args.class_file)
    out = check_figure_path(args.out, args.overwrite, (".png", ".jpg", ".jpeg", ".webp"))
    with cli_warnings():
        rgb = load_image(args.image)
        base = shared_segmenter(args, variants)
        spec, emb = base.encode_classes(cast(Any, spec))
        masks = []
        for variant in variants:
            seg = base.with_method(variant.method, rcs=variant.rcs, sfr=variant.sfr)
            masks.append((variant.label, segment_array(seg, rgb, spec, emb)))
    figure = compare_figure(rgb, masks, spec.names, args.palette, args.height, args.columns)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, image_bytes(figure, out.suffix))
    print(f"wrote {out}")
    return 0
