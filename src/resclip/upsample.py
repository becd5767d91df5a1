"""Bilinear upsampling one band of output rows at a time.

``F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)`` materialises the whole
``(C, H, W)`` output; for a 20,000 x 20,000 photo and 150 classes that is 240 GB. These helpers
compute any band of rows of the same result, with PyTorch's own index and weight formulas, so
the full map never has to exist.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _axis(
    in_size: int, out_size: int, start: int, stop: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of output positions ``start..stop-1`` along one axis.

    Matches PyTorch's CPU kernel: ``scale = in / out`` in float32,
    ``src = max(scale * (dst + 0.5) - 0.5, 0)`` evaluated as one fused multiply-add (computed in
    float64, where the product is exact, and rounded once), ``i0 = floor(src)``,
    ``i1 = i0 + (i0 < in - 1)``, ``w1 = src - i0``, ``w0 = 1 - w1``.
    """
    # computed on the CPU (float64 is missing on some accelerators), then moved
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    dst = torch.arange(start, stop, dtype=torch.float32) + 0.5
    src = (scale.double() * dst.double() - 0.5).float().clamp(min=0.0)
    i0 = src.to(torch.int64)
    i1 = i0 + (i0 < in_size - 1).to(torch.int64)
    w1 = torch.clamp(src - i0.to(torch.float32), 0.0, 1.0)
    i0, i1, w1 = i0.to(device), i1.to(device), w1.to(device)
    return i0, i1, 1.0 - w1, w1


def bilinear_rows(
    x: torch.Tensor,
    size: tuple[int, int],
    start: int,
    stop: int,
    height: int | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Rows ``start..stop-1`` of the bilinear (``align_corners=False``) resize of ``x`` to ``size``.

    The band's rows are first blended from the two source rows each needs (with PyTorch's source
    positions), then resized along the width by PyTorch's kernel. The result equals
    ``F.interpolate`` of the whole map up to float rounding (~1 ulp).

    Args:
        x: ``(C, h, w)`` float tensor, or rows ``offset..`` of a ``(C, height, w)`` map (at least
            the rows from :func:`source_rows`).
        size: full output size ``(H, W)``.
        start, stop: output row range, ``0 <= start < stop <= H``.
        height: the full source height when ``x`` holds only some of its rows.
        offset: the source row that ``x[:, 0]`` is.

    Returns:
        ``(C, stop - start, W)`` float tensor (the same values whether ``x`` is whole or a slab).
    """
    h = x.shape[1] if height is None else height
    y0, y1, wy0, wy1 = _axis(h, size[0], start, stop, x.device)
    if offset:
        y0, y1 = y0 - offset, y1 - offset
    rows = wy0.to(x.dtype).view(1, -1, 1) * x[:, y0] + wy1.to(x.dtype).view(1, -1, 1) * x[:, y1]
    return F.interpolate(rows[None], size=(stop - start, size[1]), mode="bilinear", align_corners=False)[0]


def source_rows(height: int, out_height: int, start: int, stop: int) -> tuple[int, int]:
    """The source rows ``(first, last + 1)`` that output rows ``start..stop-1`` of a bilinear
    resize from ``height`` to ``out_height`` rows read."""
    y0, y1, _, _ = _axis(height, out_height, start, stop, torch.device("cpu"))
    return int(y0.min()), int(y1.max()) + 1


def bilinear_rows_exact(x: torch.Tensor, size: tuple[int, int], start: int, stop: int) -> torch.Tensor:
    """Like :func:`bilinear_rows`, rounded exactly as PyTorch's 2-D kernel (bitwise equal when upsampling).

    The kernel blends along the width first, then along the height, each blend as one fused
    multiply-add; float64 emulates the fused rounding. About 10x slower than
    :func:`bilinear_rows`: meant for PAMR's guide image, whose affinities divide by a local
    standard deviation and so amplify 1-ulp differences in flat regions.
    """
    _, h, w = x.shape
    y0, y1, wy0, wy1 = _axis(h, size[0], start, stop, x.device)
    x0, x1, wx0, wx1 = _axis(w, size[1], 0, size[1], x.device)
    top, bottom = x[:, y0], x[:, y1]
    top = _fused_lerp(top[:, :, x0], top[:, :, x1], wx0, wx1)
    bottom = _fused_lerp(bottom[:, :, x0], bottom[:, :, x1], wx0, wx1)
    return _fused_lerp(top, bottom, wy0.view(1, -1, 1), wy1.view(1, -1, 1))


def _fused_lerp(a: torch.Tensor, b: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """``fma(w0, a, w1 * b)`` for float32 inputs (plain arithmetic for other dtypes)."""
    if a.dtype != torch.float32 or a.device.type == "mps":  # MPS has no float64
        return w0.to(a.dtype) * a + w1.to(a.dtype) * b
    return (w0.double() * a.double() + (w1 * b).double()).float()


def row_bands(height: int, width: int, channels: int, budget: int = 1 << 22) -> list[tuple[int, int]]:
    """Split ``height`` rows into bands of at most ``budget`` elements (``channels * rows * width``)."""
    rows = max(1, budget // max(1, channels * width))
    return [(r, min(height, r + rows)) for r in range(0, height, rows)]
