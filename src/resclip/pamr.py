"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020).

Each step replaces every pixel's mask vector by an affinity-weighted sum of its 8 neighbours at
each dilation (:func:`pamr_step`, the plain form). Affinities come from the image: for neighbour
``n`` of pixel ``p``, ``-|x_p - x_n| / (1e-8 + 0.1 * std)`` (std over the 3x3 neighbourhood of
every dilation, centre included), averaged over image channels and softmaxed over the
neighbours. Borders are replicated.

Below the plain form, the speed tricks: on CPU a step is one sparse matrix product
(:func:`_propagate_sparse`), which sums the same products in the same order up to float
rounding (the tests hold it to 1e-6 of the plain form); other devices run the plain form a few
channels at a time.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
CHANNEL_GROUP = 16  # channels refined together by the sparse form (callers may group alike)


def _shift(padded: torch.Tensor, pad: int, dy: int, dx: int, h: int, w: int) -> torch.Tensor:
    return padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]


# ----------------------------------------------------------------------------- the algorithm


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """Neighbour affinities of an image.

    Args:
        image: ``(B, K, H, W)`` float image (normalised pixels).
        dilations: neighbour distances in pixels.

    Returns:
        ``(B, 8 * len(dilations), H, W)`` weights summing to 1 over dim 1.
    """
    _, _, h, w = image.shape
    window: list[torch.Tensor] = []
    neighbours: list[torch.Tensor] = []
    for d in dilations:
        padded = F.pad(image, [d] * 4, mode="replicate")
        window.extend(_shift(padded, d, dy * d, dx * d, h, w) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
        neighbours.extend(_shift(padded, d, dy * d, dx * d, h, w) for dy, dx in _NEIGHBOURS)
    scale = 1e-8 + 0.1 * _stacked_std(window)
    aff = torch.stack([(image - v).abs().div(scale).mean(dim=1) for v in neighbours], dim=1)
    return (-aff).softmax(dim=1)


def _stacked_std(views: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(views).std(dim=0)`` (unbiased). Trick: two passes over the views instead of
    materialising the ``9 * len(dilations)``-deep stack (memory)."""
    mean = functools.reduce(torch.add, views) / len(views)
    sq = functools.reduce(torch.add, ((v - mean).square() for v in views))
    return (sq / (len(views) - 1)).sqrt()


def pamr_step(aff: torch.Tensor, mask: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """One PAMR step in plain form: ``out_p = sum_n aff[n, p] * mask[p + offset_n]``.

    Args:
        aff: ``(8 * len(dilations), H, W)`` affinities of one image (:func:`pamr_affinity`).
        mask: ``(C, H, W)`` float32 scores.
        dilations: neighbour distances, in the order ``aff`` was built with.

    Returns:
        ``(C, H, W)`` float32, a new tensor.
    """
    h, w = mask.shape[-2:]
    pad = max(dilations)
    # one replicate pad serves every dilation: the clamped coordinates are the same
    padded = F.pad(mask[None], [pad] * 4, mode="replicate")[0]
    out = torch.zeros_like(mask)
    offsets = [(dy * d, dx * d) for d in dilations for dy, dx in _NEIGHBOURS]
    for n, (oy, ox) in enumerate(offsets):
        out += _shift(padded, pad, oy, ox, h, w) * aff[n]
    return out


def pamr_propagate(
    aff: torch.Tensor,
    mask: torch.Tensor,
    steps: int,
    dilations: Sequence[int] = (8, 16),
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``steps`` PAMR iterations of one image with precomputed affinities.

    Args:
        aff: ``(8 * len(dilations), H, W)`` from :func:`pamr_affinity` (one image).
        mask: ``(C, H, W)`` float32 scores.
        out: ``(C, H, W)`` float32 to write into (any strides; may be ``mask``); None allocates
            one (channels-last storage on CPU).

    Returns:
        ``out``.
    """
    if out is None:
        out = _new_output(mask)
    if steps <= 0:
        return out.copy_(mask)
    propagate = _propagate_sparse if mask.device.type == "cpu" else _propagate_shifted
    propagate(aff, mask, steps, tuple(int(d) for d in dilations), out)
    return out


def pamr(
    image: torch.Tensor,
    mask: torch.Tensor,
    steps: int,
    dilations: Sequence[int] = (8, 16),
) -> torch.Tensor:
    """Refine ``mask`` with ``steps`` PAMR iterations guided by ``image``.

    Images are refined one at a time (their working set then stays in cache), in float32.

    Args:
        image: ``(B, K, H, W)`` float guide image.
        mask: ``(B, C, H, W)`` float scores at the image's size.
        steps: number of iterations (0 returns ``mask`` itself).
        dilations: neighbour distances (the baselines use (8, 16)).

    Returns:
        ``(B, C, H, W)`` refined scores in the dtype of ``mask`` (stored channels-last on CPU).
    """
    if image.shape[-2:] != mask.shape[-2:]:
        raise ValueError(
            f"PAMR image {tuple(image.shape[-2:])} and mask {tuple(mask.shape[-2:])} sizes differ"
        )
    if steps <= 0:
        return mask
    out = _new_output(mask)
    for i in range(mask.shape[0]):
        aff = pamr_affinity(image[i : i + 1].float(), dilations)[0]
        pamr_propagate(aff, mask[i].float(), steps, dilations, out=out[i])
    return out.to(mask.dtype)


# ----------------------------------------------------------------------------- speed tricks


def _propagate_shifted(
    aff: torch.Tensor, mask: torch.Tensor, steps: int, dilations: tuple[int, ...], out: torch.Tensor
) -> None:
    """``steps`` plain PAMR steps (:func:`pamr_step`) of one image, written to ``out`` (may be
    ``mask``). Trick: 4 channels at a time keep the padded copy and the sums small."""
    for start in range(0, mask.shape[0], 4):
        part = mask[start : start + 4]
        for _ in range(steps):
            part = pamr_step(aff, part, dilations)
        out[start : start + 4] = part


_CSR_LOCK = threading.Lock()


def _csr_matrix(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """An ``(n, n)`` sparse CSR matrix. torch says once per process that sparse CSR is "beta"; the
    one product used here is stable, so that notice is silenced here, under a lock (warning
    filters are process-wide state), rather than by a filter installed at import."""
    with _CSR_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, (n, n), check_invariants=False)


@functools.lru_cache(maxsize=8)
def _neighbour_index(h: int, w: int, dilations: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR row pointers and column indices of the PAMR neighbour matrix of an ``h x w`` grid.

    Row ``y * w + x`` lists its neighbours in :data:`_NEIGHBOURS` order per dilation, with
    coordinates clamped to the grid (replicate borders).
    """
    k = 8 * len(dilations)
    dtype = torch.int32 if h * w * k < 2**31 else torch.int64
    ys = torch.arange(h).view(h, 1)
    xs = torch.arange(w).view(1, w)
    cols = [
        ((ys + dy * d).clamp(0, h - 1) * w + (xs + dx * d).clamp(0, w - 1)).expand(h, w)
        for d in dilations
        for dy, dx in _NEIGHBOURS
    ]
    col = torch.stack(cols, dim=-1).reshape(-1).to(dtype)
    crow = torch.arange(0, h * w * k + 1, k, dtype=dtype)
    return crow, col


def _propagate_sparse(
    aff: torch.Tensor, mask: torch.Tensor, steps: int, dilations: tuple[int, ...], out: torch.Tensor
) -> None:
    """``steps`` PAMR steps of one image as sparse matrix products (CPU), written to ``out``.

    Trick: a step is linear and the same for every channel, so it is one sparse ``(HW, HW)``
    matrix (``8 * len(dilations)`` entries per row) times the ``(HW, C)`` mask: one fused pass per
    step instead of ``8 * len(dilations)`` shifted copies. Channels are refined ``CHANNEL_GROUP``
    at a time (two ``(HW, group)`` buffers; groups of 16 are also faster on CPU than all at once).

    Args:
        aff: ``(N, H, W)`` affinities of one image; mask: ``(C, H, W)`` float32.
        out: ``(C, H, W)`` float32, any strides (channels-last storage is the cheapest to fill);
            may be ``mask`` itself.
    """
    c, h, w = mask.shape
    crow, col = _neighbour_index(h, w, dilations)
    matrix = _csr_matrix(crow, col, aff.permute(1, 2, 0).reshape(-1), h * w)
    g = min(CHANNEL_GROUP, c)
    buffers = torch.empty(2, h * w * g, dtype=torch.float32, device=mask.device)
    for start in range(0, c, g):
        n = min(g, c - start)
        x, y = (buf[: h * w * n].view(h * w, n) for buf in buffers)
        x.view(h, w, n).copy_(mask[start : start + n].permute(1, 2, 0))
        for _ in range(steps):
            # addmm into a reused buffer is ~3x faster than ``matrix @ x`` here (same arithmetic)
            torch.addmm(y, matrix, x, beta=0, out=y)
            x, y = y, x
        out[start : start + n] = x.view(h, w, n).permute(2, 0, 1)


def _new_output(mask: torch.Tensor) -> torch.Tensor:
    """Empty float32 ``(..., C, H, W)`` like ``mask``, stored channels-last on CPU (what the sparse
    form fills without a transpose)."""
    if mask.device.type != "cpu":
        return torch.empty(mask.shape, device=mask.device)
    *lead, c, h, w = mask.shape
    n = len(lead)
    return torch.empty(*lead, h, w, c).permute(*range(n), n + 2, n, n + 1)
