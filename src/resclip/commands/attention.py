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
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ..classes import ClassSpec, load_classes
from ..fileio import atomic_write
from ..methods import get_method
from ..preprocess import load_image, normalise, resize_image
from ..segmenter import Segmenter
from ..vit import block_attentions, num_blocks, patch_size
from .common import UserError, add_model_arguments, cli_warnings
from .compare import Variant, hide_options, parse_variants, shared_segmenter
from .segment import check_output

NAME = "attention"
HELP = "show the attention of one image patch across layers and methods (paper Fig. 1 / Fig. 3)"

DEFAULT_METHODS = "clip,sclip,clearclip,naclip,resclip"
FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
VIZ_HINT = "the attention figure needs matplotlib: pip install 'resclip[viz]'"


@dataclass
class AttentionMaps:
    """Attention rows of one source patch.

    Attributes:
        image: ``(h*P, w*P, 3)`` uint8, the resized image cropped to whole patches (panel background).
        point: the source point ``(x, y)`` in ``image`` pixels.
        patch: the source patch ``(row, col)`` in the ``h x w`` grid.
        layers: ``(title, (h, w) float32 map)`` per requested block.
        methods: ``(title, (h, w) float32 map)`` per requested method (last block).
    """

    image: np.ndarray
    point: tuple[float, float]
    patch: tuple[int, int]
    layers: list[tuple[str, np.ndarray]]
    methods: list[tuple[str, np.ndarray]]


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


def _row(attn: torch.Tensor, token: int, grid: tuple[int, int]) -> np.ndarray:
    """Head-averaged attention of ``token`` to every patch: ``(h, w)`` float32."""
    return attn[0, :, token, 1:].float().mean(0).reshape(grid).cpu().numpy()


def source_patch(
    size: tuple[int, int], resized: tuple[int, int], point: tuple[float, float], patch: int
) -> tuple[tuple[int, int], tuple[float, float]]:
    """The patch ``(row, col)`` under ``point`` (pixels of an image of ``size`` = ``(H, W)``) once the
    image is resized to ``resized``, and the point in resized pixels.

    Raises:
        ValueError: the point lies outside the image.
    """
    (height, width), (h1, w1) = size, resized
    px, py = point
    if not (0 <= px < width and 0 <= py < height):
        raise ValueError(f"--point {px:g},{py:g} lies outside the {width}x{height} image")
    sx, sy = px * w1 / width, py * h1 / height
    grid = (h1 // patch, w1 // patch)
    return (min(int(sy) // patch, grid[0] - 1), min(int(sx) // patch, grid[1] - 1)), (sx, sy)


@torch.inference_mode()
def attention_maps(
    base: Segmenter,
    rgb: np.ndarray,
    point: tuple[float, float],
    layers: Sequence[int],
    variants: Sequence[Variant],
    classes: tuple[ClassSpec, torch.Tensor] | None = None,
    short_side: int = 336,
) -> AttentionMaps:
    """Attention rows of the patch under ``point`` (original-image pixels).

    Args:
        base: a segmenter whose CLIP is shared and whose RCS / SFR settings are used.
        rgb: ``(H, W, 3)`` uint8 image.
        layers: 1-based blocks whose plain q-k attention is shown.
        variants: last-block methods; those with SFR need ``classes``.
        classes: the parsed classes and their ``(Q, D)`` query embeddings (for SFR).
        short_side: the image is resized to this short side and processed as one window.

    Raises:
        ValueError: a point outside the image, an image too thin for one patch, SFR without classes.
    """
    visual = base.engine.visual
    patch = patch_size(visual)
    resized = resize_image(rgb, short_side, base.protocol.long_side)
    (row, col), (sx, sy) = source_patch(rgb.shape[:2], resized.shape[:2], point, patch)
    grid = (resized.shape[0] // patch, resized.shape[1] // patch)
    if min(grid) < 1:
        height, width = rgb.shape[:2]
        raise ValueError(f"image is {width}x{height} pixels: too thin for one {patch}-pixel patch")
    shown = resized[: grid[0] * patch, : grid[1] * patch]
    x = normalise(shown).to(base.device)
    token = 1 + row * grid[1] + col
    blocks = block_attentions(visual, x, layers)
    layer_maps = [(f"layer {n} (q-k)", _row(attn, token, grid)) for n, attn in blocks.items()]
    text = q2c = None
    if classes is not None:
        text = classes[1]
        q2c = torch.tensor(classes[0].query_to_class, dtype=torch.int64, device=base.device)
    method_maps = []
    for variant in variants:
        if variant.sfr and classes is None:
            raise ValueError(f"{variant.label} uses SFR, which needs class names")
        attn = base.with_method(variant.method, rcs=variant.rcs, sfr=variant.sfr).engine.last_attention(
            x, text, q2c)
        method_maps.append((variant.label, _row(attn, token, grid)))
    shown_point = (min(sx, shown.shape[1] - 0.5), min(sy, shown.shape[0] - 0.5))
    return AttentionMaps(shown, shown_point, (row, col), layer_maps, method_maps)


def attention_figure(maps: AttentionMaps, title: str = "", alpha: float = 0.6, panel: float = 2.6) -> Any:
    """A matplotlib ``Figure``: the image and the layer maps on top, the method maps below.

    Raises:
        RuntimeError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise RuntimeError(VIZ_HINT) from err
    top: list[tuple[str, np.ndarray | None]] = [("image", None), *maps.layers]
    rows: list[list[tuple[str, np.ndarray | None]]] = [top, list(maps.methods)] if maps.methods else [top]
    ncols = max(len(r) for r in rows)
    h, w = maps.image.shape[:2]
    size = (panel * ncols, panel * len(rows) * h / w + (0.5 if title else 0.2))
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, items in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_axis_off()
            if c >= len(items):
                continue
            name, heat = items[c]
            ax.imshow(maps.image)
            if heat is not None:
                ax.imshow(heat, cmap="jet", alpha=alpha, extent=(0, w, h, 0), interpolation="bilinear")
            ax.plot(*maps.point, marker="o", markersize=9, markerfacecolor="none", markeredgewidth=2,
                    markeredgecolor="white")
            ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def figure_bytes(fig: Any, suffix: str) -> bytes:
    """Encode a matplotlib figure; PDF / SVG without creation dates, so reruns give the same bytes."""
    fmt = suffix.lower().lstrip(".")
    fmt = "jpeg" if fmt == "jpg" else fmt
    meta: dict[str, Any] | None = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(fmt)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=150, metadata=meta)
    return buf.getvalue()


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
    add_model_arguments(parser, default_preset="default")
    hide_options(parser, ("method", "rcs", "sfr"))


def run(args: argparse.Namespace) -> int:
    """Compute the maps and save the figure."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(VIZ_HINT) from None
    point = parse_point(args.point)
    if args.size < 1:
        raise UserError(f"--size must be >= 1, got {args.size}")
    variants = parse_variants(args.methods) if args.methods.strip() else []
    for v in variants:
        if get_method(v.method).replaces_last_block:
            raise UserError(f"--methods {v.method}: it replaces the last block with its own stage, so it has "
                            "no single last-block attention map to show")
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
    fig = attention_figure(maps, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, figure_bytes(fig, out.suffix))
    print(f"wrote {out}")
    return 0
