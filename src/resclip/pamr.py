"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020).

Each step replaces every pixel's mask vector by an affinity-weighted average of its 8
neighbours at each dilation. Affinities come from the image: for neighbour ``n`` of pixel ``p``,
``-|x_p - x_n| / (1e-8 + 0.1 * std)`` (std over the 3x3 neighbourhood of every dilation, centre
included), averaged over image channels and softmaxed over the neighbours. Borders are
replicated. The mask is processed one neighbour at a time, so memory stays at a few copies of it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _shift(padded: torch.Tensor, pad: int, dy: int, dx: int, h: int, w: int) -> torch.Tensor:
    return padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """Neighbour affinities of an image.

    Args:
        image: ``(B, K, H, W)`` float image (normalised pixels).
        dilations: neighbour distances in pixels.

    Returns:
        ``(B, 8 * len(dilations), H, W)`` weights summing to 1 over dim 1.
    """
    _, _, h, w = image.shape
    diffs: list[torch.Tensor] = []
    stds: list[torch.Tensor] = []
    for d in dilations:
        padded = F.pad(image, [d] * 4, mode="replicate")
        window = [_shift(padded, d, dy * d, dx * d, h, w) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        stds.extend(window)
        diffs.extend((image - _shift(padded, d, dy * d, dx * d, h, w)).abs() for dy, dx in _NEIGHBOURS)
    std = torch.stack(stds, dim=2).std(dim=2, keepdim=True)  # (B, K, 1, H, W)
    aff = -torch.stack(diffs, dim=2) / (1e-8 + 0.1 * std)
    return aff.mean(dim=1).softmax(dim=1)


def pamr(
    image: torch.Tensor,
    mask: torch.Tensor,
    steps: int,
    dilations: Sequence[int] = (8, 16),
    channel_chunk: int = 4,
) -> torch.Tensor:
    """Refine ``mask`` with ``steps`` PAMR iterations guided by ``image``.

    Images and channels are independent, so they are refined a few channels of one image at a
    time: all iterations of a chunk then stay in cache (several times faster on CPU than sweeping
    every channel per iteration); the arithmetic of each element is unchanged.

    Args:
        image: ``(B, K, H, W)`` float guide image.
        mask: ``(B, C, H, W)`` float scores at the image's size.
        steps: number of iterations (0 returns ``mask``).
        dilations: neighbour distances (the baselines use (8, 16)).
        channel_chunk: channels refined together.

    Returns:
        ``(B, C, H, W)`` refined scores in the dtype of ``mask``.
    """
    if steps <= 0:
        return mask
    if image.shape[-2:] != mask.shape[-2:]:
        raise ValueError(
            f"PAMR image {tuple(image.shape[-2:])} and mask {tuple(mask.shape[-2:])} sizes differ"
        )
    aff = pamr_affinity(image.float(), dilations)
    h, w = mask.shape[-2:]
    pad = max(dilations)
    offsets = [(pad + dy * d, pad + dx * d) for d in dilations for dy, dx in _NEIGHBOURS]
    step = max(1, channel_chunk)
    out = torch.empty(mask.shape, dtype=torch.float32, device=mask.device)
    for b, start in itertools.product(range(mask.shape[0]), range(0, mask.shape[1], step)):
        part = mask[b : b + 1, start : start + step].float()
        term = torch.empty_like(part)
        for _ in range(steps):
            # one replicate pad serves every dilation: the clamped coordinates are the same
            padded = F.pad(part, [pad] * 4, mode="replicate")
            acc = torch.zeros_like(part)
            for n, (oy, ox) in enumerate(offsets):
                torch.mul(padded[..., oy : oy + h, ox : ox + w], aff[b : b + 1, n : n + 1], out=term)
                acc += term
            part = acc
        out[b : b + 1, start : start + step] = part
    return out.to(mask.dtype)
