"""Paper-style figures: several methods' masks side by side (the paper's Fig. 5) and where one image
patch attends across layers and methods (Fig. 1 / Fig. 3).

Methods are named as on the command line: a registered method alone (``"sclip"``), with modules
(``"sclip+rcs"``, ``"clearclip+rcs+sfr"``), or ``"resclip"`` (= ``naclip+rcs+sfr``); panel titles use
the papers' spellings (``"SCLIP + RCS"``, ``"ResCLIP"``).

Figures are written as PNG / JPEG / WebP (Pillow), PDF (Pillow for the mask grid, matplotlib for the
attention figure) or SVG; every format is byte-reproducible (no creation dates).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from . import viz
from .classes import ClassSpec
from .methods import get_method, list_methods
from .preprocess import normalise, resize_image
from .vit import block_attentions, patch_size

if TYPE_CHECKING:
    from .segmenter import Segmenter

MODULES = ("rcs", "sfr")
MODULE_TITLES = {"rcs": "RCS", "sfr": "SFR"}
FIGURE_SUFFIXES = viz.FIGURE_SUFFIXES
VIZ_HINT = "the attention figure needs matplotlib: pip install 'resclip[viz]'"


@dataclass(frozen=True)
class Variant:
    """A registered method with or without RCS / SFR.

    Attributes:
        label: the name as given, normalised (``"sclip+rcs"``, ``"resclip"``).
        method: the registered method.
        rcs: RCS on.
        sfr: SFR on.
    """

    label: str
    method: str
    rcs: bool
    sfr: bool

    @property
    def title(self) -> str:
        """The papers' spelling: ``"SCLIP + RCS"``, ``"ResCLIP"`` for ``naclip+rcs+sfr``."""
        if self.method == "naclip" and self.rcs and self.sfr:
            return "ResCLIP"
        mods = [MODULE_TITLES[m] for m, on in (("rcs", self.rcs), ("sfr", self.sfr)) if on]
        return " + ".join([get_method(self.method).title, *mods])


def parse_variant(text: str) -> Variant:
    """``"resclip"``, ``"naclip"``, ``"sclip+rcs"``, ``"clearclip+rcs+sfr"`` -> :class:`Variant`.

    Raises:
        ValueError: unknown method or module, one line.
    """
    name = text.strip().lower().replace(" ", "")
    if name == "resclip":
        return Variant("resclip", "naclip", True, True)
    base, *mods = name.split("+")
    if base not in list_methods():
        raise ValueError(f"unknown method {text.strip()!r}; valid: resclip, {', '.join(list_methods())}, "
                         "optionally with +rcs and/or +sfr (e.g. sclip+rcs+sfr)")
    bad = [m for m in mods if m not in MODULES]
    if bad or len(set(mods)) != len(mods):
        raise ValueError(f"method {text.strip()!r}: modules must be +rcs and/or +sfr, each at most once")
    return Variant(name, base, "rcs" in mods, "sfr" in mods)


def parse_variants(text: str) -> list[Variant]:
    """A comma-separated list of method names (see :func:`parse_variant`), without repeats.

    Raises:
        ValueError: an empty list, a repeat, an unknown name, SFR on a method without scores.
    """
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("the method list is empty; e.g. clip,sclip,naclip,resclip")
    variants = [parse_variant(item) for item in items]
    labels = [v.label for v in variants]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"the method list names {', '.join(dup)} more than once")
    for v in variants:
        if v.sfr and not get_method(v.method).has_scores:
            raise ValueError(f"method {v.label!r}: {v.method} has no attention scores for SFR to edit; "
                             "drop +sfr")
    return variants


# ---------------------------------------------------------------------------------------- mask grid
@dataclass(frozen=True)
class CompareRow:
    """One image of a comparison figure.

    Attributes:
        image: ``(H, W, 3)`` uint8.
        masks: ``(title, (H, W) class-index mask)`` per method, in column order.
        truth: the ground truth ``(H, W)`` class indices (``ignore`` values drawn in black), or None.
    """

    image: np.ndarray
    masks: Sequence[tuple[str, np.ndarray]]
    truth: np.ndarray | None = None


def compare_figure(rows: Sequence[CompareRow], names: Sequence[str], palette: viz.PaletteLike = "voc",
                   height: int = 320, ignore: int = 255) -> Image.Image:
    """A grid with one row per image: the image, its ground truth (when given) and each method's
    colour mask, column titles on the first row, and one legend of every class shown.

    Raises:
        ValueError: no rows, or rows with different method columns.
    """
    if not rows:
        raise ValueError("no images to compare")
    titles = [t for t, _ in rows[0].masks]
    if any([t for t, _ in r.masks] != titles for r in rows):
        raise ValueError("every image of a comparison needs the same methods")
    with_truth = any(r.truth is not None for r in rows)
    present = np.zeros(len(names), dtype=bool)
    items: list[tuple[str, Image.Image]] = []
    for r, row in enumerate(rows):
        first = r == 0
        items.append(("image" if first else "", viz.fit_height(row.image, height)))
        if with_truth:
            truth = row.truth if row.truth is not None else np.full(row.image.shape[:2], ignore, np.int64)
            labelled = np.where(truth == ignore, 0, truth)
            colour = viz.colorize(np.clip(labelled, 0, len(names) - 1), palette)
            colour[truth == ignore] = 0
            valid = truth[(truth != ignore) & (truth >= 0) & (truth < len(names))]
            present[np.unique(valid)] = True
            items.append(("ground truth" if first else "", viz.fit_height(colour, height, nearest=True)))
        for title, mask in row.masks:
            items.append((title if first else "", viz.fit_height(viz.colorize(mask, palette), height,
                                                                 nearest=True)))
            present |= viz.pixel_counts(mask, len(names)) > 0
    table = viz.colorize(np.arange(len(names)).reshape(1, -1), palette)[0]
    entries = [(names[i], viz.rgb(table[i])) for i in np.flatnonzero(present).tolist()]
    grid = viz.panels(items, columns=len(items) // len(rows))
    key = viz.legend(entries, font_size=max(12, height // 18), max_height=grid.height)
    return viz.beside(grid, key)


def picture_bytes(img: Image.Image, suffix: str) -> bytes:
    """A Pillow picture encoded for a file extension: PNG / JPEG / WebP, PDF (one page) or SVG (the
    picture embedded as PNG). No timestamps, so the same figure gives the same bytes.

    Raises:
        ValueError: an extension outside :data:`FIGURE_SUFFIXES`.
    """
    fmt = suffix.lower()
    rgb = img.convert("RGB")
    buf = io.BytesIO()
    if fmt == ".svg":
        rgb.save(buf, format="PNG")
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        w, h = rgb.size
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">'
                f'<image width="{w}" height="{h}" href="data:image/png;base64,{data}"/></svg>\n').encode()
    formats = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".pdf": "PDF"}
    if fmt not in formats:
        raise ValueError(f"cannot write {suffix!r} figures; use one of {', '.join(FIGURE_SUFFIXES)}")
    options: dict[str, Any] = {"quality": 95} if formats[fmt] in ("JPEG", "WEBP") else {}
    if formats[fmt] == "PDF":  # fixed dates: reruns give the same bytes
        options = {"resolution": 150.0, "creationDate": None, "modDate": None}
    rgb.save(buf, format=formats[fmt], **options)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- attention
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


def check_attention_variants(variants: Sequence[Variant]) -> None:
    """Refuse methods without one last-block attention map (those that replace the last block).

    Raises:
        ValueError: one line naming the method.
    """
    for v in variants:
        if get_method(v.method).replaces_last_block:
            raise ValueError(f"method {v.method}: it replaces the last block with its own stage, so it has "
                             "no single last-block attention map to show")


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
        ValueError: a point outside the image, an image too thin for one patch, SFR without classes,
            a method that replaces the last block.
    """
    check_attention_variants(variants)
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
        method_maps.append((variant.title, _row(attn, token, grid)))
    shown_point = (min(sx, shown.shape[1] - 0.5), min(sy, shown.shape[0] - 0.5))
    return AttentionMaps(shown, shown_point, (row, col), layer_maps, method_maps)


def attention_figure(maps: AttentionMaps, title: str = "", alpha: float = 0.6, panel: float = 2.6,
                     colorbar: bool = True) -> Any:
    """A matplotlib ``Figure``: the image and the layer maps on top, the method maps below.

    Each map is scaled to its own range (as in the paper's figures), so the colour bar reads from
    "least attended" to "most attended" within a panel rather than in absolute weights.

    Raises:
        RuntimeError: matplotlib is not installed.
    """
    try:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
    except ImportError as err:
        raise RuntimeError(VIZ_HINT) from err
    top: list[tuple[str, np.ndarray | None]] = [("image", None), *maps.layers]
    rows: list[list[tuple[str, np.ndarray | None]]] = [top, list(maps.methods)] if maps.methods else [top]
    ncols = max(len(r) for r in rows)
    h, w = maps.image.shape[:2]
    size = (panel * ncols + (0.6 if colorbar else 0), panel * len(rows) * h / w + (0.5 if title else 0.2))
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
    if colorbar:
        bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap="jet"), ax=axes, shrink=0.8,
                           ticks=[0.0, 1.0])
        bar.ax.set_yticklabels(["low", "high"], fontsize=8)
        bar.set_label("attention (per panel)", fontsize=8)
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
