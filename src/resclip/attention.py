"""Pure attention helpers over tensors.

Shapes use ``B`` windows, ``H`` heads, ``T = 1 + h*w`` tokens (CLS first, then patches in
raster order), ``d`` the head width and ``C = H*d`` the model width.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, norm: Any) -> torch.Tensor:
    """LayerNorm computed in fp32 and cast back, as CLIP's own LayerNorm does.

    Args:
        x: ``(..., C)`` activations of any float dtype.
        norm: a ``torch.nn.LayerNorm`` (its weight, bias and eps are read).
    """
    weight = norm.weight.float() if norm.weight is not None else None
    bias = norm.bias.float() if norm.bias is not None else None
    out = F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps)
    return out.to(x.dtype)


def project_qkv(
    z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused input projection into per-head q, k, v.

    Args:
        z: ``(B, T, C)`` normalised tokens.
        weight: ``(3C, C)`` fused ``in_proj_weight``; bias ``(3C,)``.
        heads: number of heads ``H``.

    Returns:
        q, k, v, each ``(B, H, T, d)``.
    """
    b, t, c = z.shape
    qkv = F.linear(z, weight, bias).view(b, t, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, T, d)`` -> ``(B, T, H*d)``."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def scaled_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pre-softmax scores ``(a * d^-1/2) @ b^T`` in fp32.

    Args:
        a, b: ``(B, H, T, d)``.

    Returns:
        ``(B, H, T, T)`` float32 scores.
    """
    scale = a.shape[-1] ** -0.5
    return torch.matmul(a.float() * scale, b.float().transpose(-1, -2))


@functools.lru_cache(maxsize=16)
def _gaussian_bias_cpu(h: int, w: int, std: float) -> torch.Tensor:
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64).repeat(h)
    dist2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    omega = torch.exp(-dist2 / (2.0 * std * std)).float()
    out = torch.zeros(h * w + 1, h * w + 1)
    out[1:, 1:] = omega
    return out


def gaussian_bias(h: int, w: int, std: float, device: torch.device) -> torch.Tensor:
    """NACLIP's neighbourhood prior: an unnormalised 2-D Gaussian of the patch distance.

    ``Ω[p, q] = exp(-|p - q|² / (2 std²))`` for patches p, q (peak 1 on the diagonal); the
    CLS row and column are zero. Cached per grid and device.

    Returns:
        ``(T, T)`` float32 with ``T = 1 + h*w``.
    """
    return _gaussian_bias_on(h, w, float(std), torch.device(device))


@functools.lru_cache(maxsize=16)
def _gaussian_bias_on(h: int, w: int, std: float, device: torch.device) -> torch.Tensor:
    return _gaussian_bias_cpu(h, w, std).to(device)  # one copy per device, none on CPU


def identity_attention(b: int, heads: int, t: int, device: torch.device) -> torch.Tensor:
    """Every token attends only to itself: ``(B, H, T, T)`` identity (MaskCLIP)."""
    eye = torch.eye(t, device=device)
    return eye.expand(b, heads, t, t)


def interpolate_pos_embed(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Resize a ViT positional embedding to an ``h x w`` patch grid.

    Bicubic over the square native grid with ``scale_factor = ((h+0.1)/n, (w+0.1)/n)`` (not
    ``size=``), as the reference implementations do; the factor decides the sampling grid.

    Args:
        pos: ``(1 + n*n, C)`` positional embedding, CLS first.

    Returns:
        ``(1 + h*w, C)`` in the dtype of ``pos``.
    """
    n_native = pos.shape[0] - 1
    side = round(math.sqrt(n_native))
    if side * side != n_native:
        raise ValueError(f"positional embedding with {n_native} patch rows is not a square grid")
    if h * w == n_native and h == w:
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    grid = patch_pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid,
        scale_factor=((h + 0.1) / side, (w + 0.1) / side),
        mode="bicubic",
        align_corners=False,
        recompute_scale_factor=False,
    )
    if grid.shape[-2:] != (h, w):  # pragma: no cover - guarded by the +0.1
        raise RuntimeError(f"positional embedding resized to {tuple(grid.shape[-2:])}, wanted {(h, w)}")
    patch_pos = grid.permute(0, 2, 3, 1).reshape(h * w, -1).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)
