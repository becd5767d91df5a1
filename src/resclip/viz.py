"""Pictures of masks with Pillow and numpy only: palette PNGs, colour overlays, legends and
side-by-side panels.

Colours come from :mod:`resclip.palettes`; class ``i`` always gets palette entry ``i``, so the
colours of a palette PNG, its overlay and its legend agree. Text uses Pillow's built-in font, so
the pictures are the same on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .palettes import get_palette

Color = tuple[int, int, int]
PaletteLike = str | np.ndarray
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

_BACKGROUND: Color = (255, 255, 255)
_TEXT: Color = (20, 20, 20)


# figure files: Pillow writes the rasters, PDF and SVG wrap them (resclip.figures)
FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".pdf", ".svg")


def _palette(palette: PaletteLike, n: int) -> np.ndarray:
    if isinstance(palette, str):
        return get_palette(palette, n)
    table = np.asarray(palette, dtype=np.uint8)
    if table.ndim != 2 or table.shape[1] != 3 or len(table) < n:
        raise ValueError(f"palette must be an (N, 3) uint8 array with N >= {n}, got shape {table.shape}")
    return table


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask must be an (H, W) integer array, got {mask.dtype} {mask.shape}")
    if mask.size and mask.min() < 0:
        raise ValueError("mask holds negative class indices")
    return mask


def rgb(colour: Sequence[int] | np.ndarray) -> Color:
    """A palette row as a plain ``(r, g, b)`` tuple of ints."""
    return int(colour[0]), int(colour[1]), int(colour[2])


def colorize(mask: np.ndarray, palette: PaletteLike = "voc") -> np.ndarray:
    """``(H, W)`` class indices -> ``(H, W, 3)`` uint8 colours."""
    mask = _check_mask(mask)
    table = _palette(palette, int(mask.max()) + 1 if mask.size else 1)
    return table[mask]


def mask_image(mask: np.ndarray, num_classes: int, palette: PaletteLike = "voc") -> Image.Image:
    """The mask as a PNG-ready image whose pixel values are the class indices.

    Up to 256 classes: a palette image (mode ``"P"``) carrying the palette's colours, the format
    VOC / MMSegmentation tools read. More classes: a 16-bit grayscale image (mode ``"I;16"``),
    since a palette holds at most 256 entries.
    """
    mask = _check_mask(mask)
    if mask.size and int(mask.max()) >= num_classes:
        raise ValueError(f"mask holds class {int(mask.max())} but only {num_classes} classes were given")
    h, w = mask.shape
    if num_classes > 256:
        if num_classes > 65536:
            raise ValueError(f"at most 65536 classes fit a 16-bit PNG, got {num_classes}")
        return Image.frombytes("I;16", (w, h), mask.astype("<u2").tobytes())
    img = Image.frombytes("P", (w, h), mask.astype(np.uint8).tobytes())
    img.putpalette(_palette(palette, 256)[:256].flatten().tolist())
    return img


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5,
            palette: PaletteLike = "voc") -> np.ndarray:
    """Blend class colours over an image: ``(1 - alpha) * image + alpha * colour``.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` class indices of the same size.
        alpha: colour weight in [0, 1].

    Returns:
        ``(H, W, 3)`` uint8.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = np.asarray(image)
    mask = _check_mask(mask)
    if image.shape[:2] != mask.shape or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image {image.shape} and mask {mask.shape} sizes differ "
                         "(need (H, W, 3) and (H, W))")
    colours = colorize(mask, palette).astype(np.float32)
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def pixel_counts(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C,)`` int64 number of pixels of each class."""
    mask = _check_mask(mask)
    return np.bincount(mask.ravel(), minlength=num_classes)[:num_classes].astype(np.int64)


def font(size: int) -> Font:
    """Pillow's built-in font at ``size`` pixels (a bitmap font on builds without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def font_size_for(height: int, width: int) -> int:
    """A legible text size for a picture of this size (12 to 40 pixels)."""
    return int(np.clip(round(min(height, width) / 28), 12, 40))


def _text_width(draw: ImageDraw.ImageDraw, text: str, fnt: Font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=fnt)
    return int(right - left)


def legend(entries: Sequence[tuple[str, Color]], font_size: int = 16, max_height: int | None = None,
           title: str | None = None) -> Image.Image:
    """A legend: one row per entry, a colour swatch (with a grey border) then the label.

    Args:
        entries: ``(label, (r, g, b))`` in display order.
        font_size: text height in pixels; swatches and spacing scale with it.
        max_height: wrap into more columns when the rows would be taller than this.
        title: optional first line.

    Returns:
        An RGB image on a white background.
    """
    fnt = font(font_size)
    row = int(font_size * 1.5)
    pad = max(4, font_size // 2)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_h = row if title else 0
    per_col = max(1, len(entries))
    if max_height is not None:
        per_col = max(1, min(per_col, (max_height - 2 * pad - title_h) // row))
    columns = [list(entries[i : i + per_col]) for i in range(0, len(entries), per_col)] or [[]]
    widths = [max([_text_width(probe, label, fnt) for label, _ in col] or [0]) + row + pad for col in columns]
    width = max(sum(widths) + pad, (_text_width(probe, title, fnt) + 2 * pad) if title else 0, 2 * pad)
    height = 2 * pad + title_h + row * max(len(col) for col in columns)
    img = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((pad, pad), title, fill=_TEXT, font=fnt)
    x = pad
    for col, col_w in zip(columns, widths, strict=True):
        for i, (label, colour) in enumerate(col):
            y = pad + title_h + i * row
            box = (x, y + (row - font_size) // 2, x + font_size, y + (row - font_size) // 2 + font_size)
            draw.rectangle(box, fill=tuple(int(c) for c in colour), outline=(128, 128, 128))
            draw.text((x + font_size + pad, y + (row - font_size) // 2), label, fill=_TEXT, font=fnt)
        x += col_w
    return img


def beside(image: Image.Image, side: Image.Image) -> Image.Image:
    """``image`` at the top-left of a white canvas with ``side`` to its right (tops aligned)."""
    canvas = Image.new("RGB", (image.width + side.width, max(image.height, side.height)), _BACKGROUND)
    canvas.paste(image.convert("RGB"), (0, 0))
    canvas.paste(side.convert("RGB"), (image.width, 0))
    return canvas


def present_entries(mask: np.ndarray, names: Sequence[str], palette: PaletteLike = "voc",
                    with_share: bool = False) -> list[tuple[str, Color]]:
    """Legend entries of the classes present in ``mask``, in class order.

    With ``with_share`` each label ends with the class's share of the pixels, e.g. ``"cat (42.0%)"``.
    """
    counts = pixel_counts(mask, len(names))
    table = _palette(palette, len(names))
    total = max(int(counts.sum()), 1)
    out = []
    for index in np.flatnonzero(counts).tolist():
        label = names[index] + (f" ({100.0 * counts[index] / total:.1f}%)" if with_share else "")
        out.append((label, rgb(table[index])))
    return out


def overlay_with_legend(image: np.ndarray, mask: np.ndarray, names: Sequence[str], alpha: float = 0.5,
                        palette: PaletteLike = "voc") -> Image.Image:
    """The overlay at the image's own size (top-left) and, to its right, a legend of the classes
    present with their pixel shares."""
    blended = Image.fromarray(overlay(image, mask, alpha, palette))
    size = font_size_for(blended.height, max(blended.width, blended.height))
    key = legend(present_entries(mask, names, palette, with_share=True), size,
                 max_height=max(blended.height, 8 * size))
    return beside(blended, key)


def fit_height(picture: np.ndarray | Image.Image, height: int, nearest: bool = False) -> Image.Image:
    """Scale a picture to ``height`` pixels, keeping its aspect ratio (nearest-neighbour for masks,
    bilinear with antialiasing for photos)."""
    if isinstance(picture, Image.Image):
        img = picture
    else:
        img = Image.fromarray(np.asarray(picture, dtype=np.uint8))
    w = max(1, round(img.width * height / img.height))
    if img.size == (w, height):
        return img.convert("RGB")
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return img.convert("RGB").resize((w, height), method)


def panels(items: Sequence[tuple[str, Image.Image]], columns: int | None = None,
           side: Image.Image | None = None) -> Image.Image:
    """Pictures in a grid, each with its title centred above it.

    Args:
        items: ``(title, picture)``, best of equal heights (see :func:`fit_height`).
        columns: panels per row (default: all in one row).
        side: an optional picture (e.g. a shared legend) placed to the right of the grid.
    """
    if not items:
        raise ValueError("no panels to draw")
    height = max(img.height for _, img in items)
    fnt_size = max(12, height // 18)
    fnt = font(fnt_size)
    title_h = int(fnt_size * 1.6)
    pad = max(4, fnt_size // 2)
    ncol = columns or len(items)
    rows = [items[i : i + ncol] for i in range(0, len(items), ncol)]
    cell_w = max(img.width for _, img in items)
    grid_w = pad + min(ncol, len(items)) * (cell_w + pad)
    grid_h = pad + len(rows) * (title_h + height + pad)
    canvas = Image.new("RGB", (grid_w, grid_h), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, (title, img) in enumerate(row):
            x = pad + c * (cell_w + pad)
            y = pad + r * (title_h + height + pad)
            tw = _text_width(draw, title, fnt)
            draw.text((x + (img.width - tw) // 2, y), title, fill=_TEXT, font=fnt)
            canvas.paste(img.convert("RGB"), (x, y + title_h))
    return beside(canvas, side) if side is not None else canvas
