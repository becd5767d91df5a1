"""Colour palettes for class-index masks.

* ``"classes"`` (the default of every command and the demo): the VOC colours, with black kept for a
  class the user names ``background``, ``ignore`` or ``unknown`` (any synonym, any case) and every other class
  taking the next VOC colour in order. A list that starts with ``background`` (VOC's own order)
  therefore gets exactly the VOC palette, and a list without one never paints a class black, which
  would darken the photo under it (see :func:`class_palette`).
* ``"voc"``: the PASCAL VOC bit-pattern palette (index 0 black, 1 dark red, 2 dark green, ...), the
  palette VOC and MMSegmentation users expect in a palette PNG; it has 256 entries.
* ``"distinct"``: colours picked greedily to be far apart in CIELAB (no near-black, near-white or
  grey shades), better when many classes are shown side by side; any number of entries.

Both are deterministic: the same index always gets the same colour.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

PALETTES = ("classes", "voc", "distinct")
# classes painted black by the "classes" palette (segment --unknown adds a class named "unknown")
BLACK_NAMES = frozenset({"background", "ignore", "unknown"})


def voc_palette(n: int = 256) -> np.ndarray:
    """The VOC bit-pattern palette: ``(n, 3)`` uint8, ``n <= 256``.

    The bits of index ``i`` are spread over the colour channels, three at a time, from the most
    significant bit of each channel down (the ``labelcolormap`` of the VOC devkit).
    """
    if not 0 <= n <= 256:
        raise ValueError(f"the VOC palette has 256 colours, asked for {n}")
    out = np.zeros((n, 3), dtype=np.uint8)
    for index in range(n):
        code, rgb = index, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((code >> channel) & 1) << (7 - bit)
            code >>= 3
        out[index] = rgb
    return out


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """``(N, 3)`` sRGB in [0, 1] -> ``(N, 3)`` CIELAB (D65)."""
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


@functools.lru_cache(maxsize=1)
def _distinct_table() -> np.ndarray:
    levels = np.linspace(0, 255, 14).round()
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    lab = _srgb_to_lab(grid / 255.0)
    chroma = np.hypot(lab[:, 1], lab[:, 2])
    keep = (lab[:, 0] > 30) & (lab[:, 0] < 92) & (chroma > 25)
    grid, lab = grid[keep], lab[keep]
    chosen = [int(np.argmax(np.hypot(lab[:, 1], lab[:, 2])))]  # start from the most saturated colour
    dist = np.linalg.norm(lab - lab[chosen[0]], axis=1)
    for _ in range(255):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(lab - lab[nxt], axis=1))
    return grid[chosen].astype(np.uint8)


def distinct_palette(n: int = 256) -> np.ndarray:
    """``(n, 3)`` uint8 colours, each as far as possible (CIELAB) from those before it.

    The first 256 are computed once; beyond that the table repeats.
    """
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    table = _distinct_table()
    return table[np.arange(n) % len(table)].copy()


def get_palette(name: str = "voc", n: int = 256) -> np.ndarray:
    """A palette by name (``"voc"`` or ``"distinct"``): ``(n, 3)`` uint8.

    For ``"voc"`` and ``n > 256`` the distinct palette fills the entries past 255.

    Raises:
        ValueError: unknown name.
    """
    if name == "classes":
        raise ValueError("the 'classes' palette depends on the class names: use class_palette(names)")
    if name == "voc":
        if n <= 256:
            return voc_palette(n)
        return np.concatenate([voc_palette(256), distinct_palette(n)[256:]])
    if name == "distinct":
        return distinct_palette(n)
    raise ValueError(f"unknown palette {name!r}; valid: {', '.join(PALETTES)}")


def class_palette(names: Sequence[str], name: str = "classes") -> np.ndarray:
    """Colours for the classes ``names`` under the palette ``name``: ``(max(C, 256), 3)`` uint8, row
    ``i`` the colour of class ``i`` (rows past ``C`` continue the palette, so a palette PNG can hold
    it whole).

    ``"classes"``: black for a class whose name (any comma-separated synonym, any case) is
    ``background``, ``ignore`` or ``unknown``; the others get VOC colours 1, 2, 3... in their
    order. ``"voc"`` and ``"distinct"``: the fixed palettes (class ``i`` gets entry ``i``).

    Raises:
        ValueError: unknown palette name.
    """
    n = max(len(names), 256)
    if name != "classes":
        return get_palette(name, n)
    black = [any(s.strip().lower() in BLACK_NAMES for s in str(c).split(",")) for c in names]
    table = get_palette("voc", n + 1)
    out = np.empty((n, 3), dtype=np.uint8)
    nxt = 1
    for i in range(n):
        if i < len(names) and black[i]:
            out[i] = 0
        else:
            out[i] = table[nxt]
            nxt += 1
    return out
