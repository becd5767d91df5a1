"""SFR: semantic feedback refinement (paper Sec. 3.2.2, Eq. 7-12).

A first pass gives a segmentation; its patch label map ``M`` turns into a refinement score
``Ŝ`` (same label, decayed with distance when no valid path joins the two patches, smoothed
along keys with a 1-D Gaussian), which is mixed into the base method's pre-softmax scores in a
second pass. Every place where the released code differs from the printed equations is one
named field of :class:`SFRConfig`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .pamr import CHANNEL_GROUP, pamr_affinity, pamr_propagate


@dataclass(frozen=True)
class SFRConfig:
    """Hyper-parameters and fidelity switches of SFR.

    Attributes:
        lam: weight of the refinement score (``lambda_sfr``), in [0, 1].
        tau: multiplier of the mixed scores (released: 1.8-2.2 per dataset; paper: 1.0).
        confidence_thd: pixels whose top probability is below it get label 0 (the released
            ``temp_thd`` "AdaThr"; paper: 0, i.e. off).
        first_pass_logit_scale: softmax temperature of the first-pass probabilities.
        first_pass_pamr_steps: PAMR iterations on the first-pass logits (released: 10; paper: 0).
        first_pass_pamr_dilations: PAMR neighbour distances.
        label_level: ``"query"`` (every synonym its own label, released) or ``"class"``
            (synonyms merged, paper).
        path: ``"line"`` (released: straight-line check over the first d/Mx of the segment) or
            ``"connected"`` (same-label connected region, paper's "valid path").
        connectivity: 4 or 8, for ``path="connected"``.
        distance_decay: apply ``h(V, D)`` (released ``delete_same_entity``); off keeps S as is.
        smoothing_std: std of the 1-D Gaussian along keys (the released code reuses NACLIP's 5).
        normalise: row-normalise, then divide by the window's global max (released); off = Eq. 11.
        fp16_scores: round ``lam * Ŝ`` through fp16 as the released code does even in fp32.
        bias_after_mix: add the method's score bias (NACLIP's Ω) after the mix (released) rather
            than treating it as part of the base score ``S_s`` (paper).
    """

    lam: float = 0.7
    tau: float = 1.0
    confidence_thd: float = 0.0
    first_pass_logit_scale: float = 40.0
    first_pass_pamr_steps: int = 0
    first_pass_pamr_dilations: tuple[int, ...] = (8, 16)
    label_level: Literal["query", "class"] = "class"
    path: Literal["line", "connected"] = "connected"
    connectivity: int = 8
    distance_decay: bool = True
    smoothing_std: float = 5.0
    normalise: bool = False
    fp16_scores: bool = False
    bias_after_mix: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"SFR lam must be in [0, 1], got {self.lam}")
        if not self.tau > 0:
            raise ValueError(f"SFR tau must be > 0, got {self.tau}")
        if not 0.0 <= self.confidence_thd <= 1.0:
            raise ValueError(f"SFR confidence_thd must be in [0, 1], got {self.confidence_thd}")
        if self.label_level not in ("query", "class"):
            raise ValueError(f"SFR label_level must be 'query' or 'class', got {self.label_level!r}")
        if self.path not in ("line", "connected"):
            raise ValueError(f"SFR path must be 'line' or 'connected', got {self.path!r}")
        if self.connectivity not in (4, 8):
            raise ValueError(f"SFR connectivity must be 4 or 8, got {self.connectivity}")
        if self.first_pass_pamr_steps < 0:
            raise ValueError(f"SFR first_pass_pamr_steps must be >= 0, got {self.first_pass_pamr_steps}")
        if not self.smoothing_std > 0:
            raise ValueError(f"SFR smoothing_std must be > 0, got {self.smoothing_std}")


# ----------------------------------------------------------------------------- label maps


def pixel_labels(
    logits: torch.Tensor,
    crops: torch.Tensor,
    cfg: SFRConfig,
    query_to_class: torch.Tensor,
) -> torch.Tensor:
    """Per-pixel labels of the first pass.

    Args:
        logits: ``(B, Q, h, w)`` first-pass cosine logits.
        crops: ``(B, 3, Hc, Wc)`` the normalised window images (guide for PAMR).
        cfg: SFR settings (PAMR, temperature, label level, confidence threshold).
        query_to_class: ``(Q,)`` int64 class of each query.

    Returns:
        ``(B, Hc, Wc)`` int64 labels (query or class indices); low-confidence pixels are 0.
    """
    size = crops.shape[-2:]
    steps, dil = cfg.first_pass_pamr_steps, cfg.first_pass_pamr_dilations
    b, q = logits.shape[:2]
    out = torch.empty((b, *size), dtype=torch.int64, device=logits.device)
    scores = torch.empty(*size, q, device=logits.device)  # one window's refined logits, queries last
    group = CHANNEL_GROUP
    band = max(1, (1 << 20) // max(1, size[1] * q))
    for i in range(b):  # one window at a time, a few queries at a time: the maps stay in cache
        aff = pamr_affinity(crops[i : i + 1].float(), dil)[0] if steps > 0 else None
        for start in range(0, q, group):
            part = logits[i : i + 1, start : start + group].float()
            up = F.interpolate(part, size=size, mode="bilinear", align_corners=False)[0]
            target = scores[:, :, start : start + group].permute(2, 0, 1)
            if aff is None:
                target.copy_(up)
            else:
                pamr_propagate(aff, up, steps, dil, out=target)
        for r0 in range(0, size[0], band):  # softmax over queries, a band of rows at a time
            probs = torch.softmax(cfg.first_pass_logit_scale * scores[r0 : r0 + band], dim=-1)
            if cfg.label_level == "class":
                probs = class_max(probs, query_to_class, dim=-1)
            conf, labels = probs.max(dim=-1)
            out[i, r0 : r0 + band] = labels.masked_fill(conf < cfg.confidence_thd, 0)
    return out


def class_max(probs: torch.Tensor, query_to_class: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Max over each class's synonyms.

    Args:
        probs: ``(B, Q, ...)`` per-query probabilities (queries along ``dim``).
        query_to_class: ``(Q,)`` int64 class index of each query.
        dim: the query axis.

    Returns:
        ``probs`` with the ``Q`` queries along ``dim`` replaced by the ``C`` per-class maxima.
    """
    num_classes = int(query_to_class.max()) + 1
    if num_classes == probs.shape[dim]:
        return probs
    dim = dim % probs.dim()
    view = [1] * probs.dim()
    view[dim] = -1
    index = query_to_class.to(probs.device).view(view).expand_as(probs)
    shape = list(probs.shape)
    shape[dim] = num_classes
    out = torch.full(shape, float("-inf"), dtype=probs.dtype, device=probs.device)
    return out.scatter_reduce(dim, index, probs, reduce="amax", include_self=True)


def patch_mode(labels: torch.Tensor, patch: int, num_labels: int) -> torch.Tensor:
    """Most frequent label in each non-overlapping ``patch x patch`` block (smallest on ties).

    Rows and columns that do not fill a block are dropped, as the patch convolution drops them.

    Args:
        labels: ``(B, Hc, Wc)`` int64 in ``[0, num_labels)``.

    Returns:
        ``(B, Hc // patch, Wc // patch)`` int64.
    """
    b, hc, wc = labels.shape
    h, w = hc // patch, wc // patch
    blocks = labels[:, : h * patch, : w * patch].reshape(b, h, patch, w, patch).permute(0, 1, 3, 2, 4)
    blocks = blocks.reshape(b, h * w, patch * patch)
    counts = torch.zeros(b, h * w, num_labels, dtype=torch.int32, device=labels.device)
    counts.scatter_add_(2, blocks, torch.ones_like(blocks, dtype=torch.int32))
    return counts.argmax(dim=2).view(b, h, w)


# ----------------------------------------------------------------------------- valid paths


@functools.lru_cache(maxsize=16)
def _line_axis(n: int, mx: int) -> torch.Tensor:
    """``(n, n, mx+1)`` int64: ``round(a * (1 - t_k) + b * t_k)`` for grid coordinates ``a, b < n``.

    ``t = linspace(0, 1, mx + 1)`` in float32, half-to-even rounding (the released sampling).
    """
    t = torch.linspace(0, 1, mx + 1, dtype=torch.float32)
    a = torch.arange(n, dtype=torch.float32)
    return torch.round(a[:, None, None] * (1 - t) + a[None, :, None] * t).long()


def _line_rows(h: int, w: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the ``(N, N, Mx+1)`` table of patch indices along each segment i -> j.

    Sample k of pair (i, j) is the patch at ``round(p_i * (1 - t_k) + p_j * t_k)`` (per axis),
    for ``k <= d(i, j)`` (Chebyshev distance); later samples repeat ``i`` so that they never fail
    the check. Rows and columns are sampled independently, so only two small per-axis tables
    are cached and the ``N^2 (Mx+1)`` table is built a block of rows at a time.

    Returns:
        ``(stop - start, N, Mx+1)`` int64.
    """
    mx = max(h, w) - 1
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    qi = torch.arange(start, stop)
    pr = _line_axis(h, mx)[rows[qi]][:, rows]  # (c, N, K)
    pc = _line_axis(w, mx)[cols[qi]][:, cols]
    steps = torch.maximum((rows[qi, None] - rows).abs(), (cols[qi, None] - cols).abs())
    beyond = torch.arange(mx + 1) > steps[:, :, None]
    return torch.where(beyond, qi[:, None, None], pr * w + pc)


def _rows_per_block(n: int, k: int) -> int:
    return max(1, (1 << 19) // max(1, n * k))  # int64 blocks of at most 4 MiB


@functools.lru_cache(maxsize=4)
def _line_table_on(h: int, w: int, device: torch.device) -> torch.Tensor:
    return _line_table(h, w).to(device)  # one copy per device, none on CPU


@functools.lru_cache(maxsize=4)
def _line_table(h: int, w: int) -> torch.Tensor:
    """The whole ``(N, N, Mx+1)`` sample table of :func:`_line_rows`, in int16 (int32 from
    32768 patches), built a block of rows at a time. A few grid sizes are kept: sliding windows
    and most benchmark images share a handful of sizes.
    """
    n, k = h * w, max(h, w)
    table = torch.empty(n, n, k, dtype=torch.int16 if n < 2**15 else torch.int32)
    step = _rows_per_block(n, k)
    for start in range(0, n, step):
        table[start : start + step] = _line_rows(h, w, start, min(n, start + step))
    return table


def valid_path_line(labels: torch.Tensor) -> torch.Tensor:
    """Released path check: every sampled point of the segment i -> j has i's label.

    Args:
        labels: ``(B, h, w)`` int64 patch labels.

    Returns:
        ``(B, N, N)`` bool, row = query patch i, column = key patch j.
    """
    b, h, w = labels.shape
    n, k = h * w, max(h, w)
    table = _line_table_on(h, w, labels.device)
    flat = labels.reshape(b, n)
    out = torch.empty(b, n, n, dtype=torch.bool, device=labels.device)
    same = flat[:, :, None] == flat[:, None, :]  # (B, N, N): same[., i, m] = M(m) == M(i)
    step = _rows_per_block(n, k)
    for start in range(0, n, step):
        stop = min(n, start + step)
        idx = table[start:stop].reshape(stop - start, -1).long()
        for bi in range(b):
            ok = same[bi, start:stop].gather(1, idx).view(stop - start, n, k)
            out[bi, start:stop] = ok.all(dim=-1)
    return out


def connected_components(labels: torch.Tensor, connectivity: int = 8) -> torch.Tensor:
    """Label connected same-label regions of a patch grid.

    Args:
        labels: ``(B, h, w)`` int64.
        connectivity: 4 or 8.

    Returns:
        ``(B, h, w)`` int64 component ids (the smallest flat index in each region).
    """
    b, h, w = labels.shape
    big = h * w
    comp = torch.arange(h * w, device=labels.device).view(1, h, w).expand(b, h, w).clone()
    offsets = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    if connectivity == 8:
        offsets += [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    pad_lab = F.pad(labels, (1, 1, 1, 1), value=-1)
    while True:
        pad_comp = F.pad(comp, (1, 1, 1, 1), value=big)
        new = comp
        for dy, dx in offsets:
            nb_lab = pad_lab[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
            nb_comp = pad_comp[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
            new = torch.where(nb_lab == labels, torch.minimum(new, nb_comp), new)
        if torch.equal(new, comp):
            return comp
        comp = new


def valid_path_connected(labels: torch.Tensor, connectivity: int = 8) -> torch.Tensor:
    """Paper's reading of the valid path: i and j lie in one connected same-label region.

    Returns:
        ``(B, N, N)`` bool.
    """
    comp = connected_components(labels, connectivity).flatten(1)
    return comp[:, :, None] == comp[:, None, :]


# ----------------------------------------------------------------------------- scores


@functools.lru_cache(maxsize=8)
def _chebyshev_decay(h: int, w: int, device: torch.device) -> torch.Tensor:
    """``exp(-d / Mx)`` for the Chebyshev distance d of every patch pair, built on ``device``."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    d = torch.maximum((rows[:, None] - rows[None]).abs(), (cols[:, None] - cols[None]).abs()).float()
    mx = max(h, w) - 1
    return torch.exp(-d / mx) if mx > 0 else torch.ones_like(d)


@functools.lru_cache(maxsize=8)
def _gaussian_kernel(n: int, std: float, device: torch.device) -> torch.Tensor:
    size = min(n, int(6 * std + 1))
    if size % 2 == 0:
        size += 1
    x = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    g = torch.exp(-(x**2) / (2 * std * std))
    return (g / g.sum()).view(1, 1, -1)


def smooth_rows(scores: torch.Tensor, std: float) -> torch.Tensor:
    """Convolve each row with a normalised 1-D Gaussian along the flattened key axis.

    Args:
        scores: ``(B, N, N)`` float32.

    Returns:
        ``(B, N, N)``; zero padding at both ends of each row.
    """
    b, n, _ = scores.shape
    kernel = _gaussian_kernel(n, float(std), scores.device)
    out = F.conv1d(scores.reshape(b * n, 1, n), kernel, padding=kernel.shape[-1] // 2)
    return out.view(b, n, n)


def refinement_scores(labels: torch.Tensor, cfg: SFRConfig, aux: dict | None = None) -> torch.Tensor:
    """Build the SFR score ``Ŝ`` from a patch label map.

    Args:
        labels: ``(B, h, w)`` int64 patch labels ``M``.
        cfg: SFR settings.
        aux: optional dict receiving ``sfr_valid_path`` ``(B, N, N)`` and ``sfr_matrix_prenorm``
            ``(B, T, T)`` (before the global max normalisation).

    Returns:
        ``(B, T, T)`` float32 with zero CLS row and column.
    """
    b, h, w = labels.shape
    n = h * w
    flat = labels.reshape(b, n)
    s = (flat[:, :, None] == flat[:, None, :]).float()
    if cfg.distance_decay:
        if cfg.path == "line":
            valid = valid_path_line(labels)
        else:
            valid = valid_path_connected(labels, cfg.connectivity)
        if aux is not None:
            aux["sfr_valid_path"] = valid
        v = valid.float()
        decay = _chebyshev_decay(h, w, labels.device)
        s = s * (v + (1 - v) * decay)
    s = smooth_rows(s, cfg.smoothing_std)
    if cfg.normalise:
        s = torch.relu(s)
        s = s / (s.sum(dim=-1, keepdim=True) + 1e-8)
    full = torch.zeros(b, n + 1, n + 1, device=labels.device)
    full[:, 1:, 1:] = s
    if aux is not None:
        aux["sfr_matrix_prenorm"] = full
    if cfg.normalise:
        full = full / full.flatten(1).amax(dim=1).clamp_min(1e-12).view(b, 1, 1)
    return full


def sfr_mix(scores: torch.Tensor, refine: torch.Tensor, cfg: SFRConfig) -> torch.Tensor:
    """Eq. 12 with the released multiplier: ``tau * ((1 - lam) * S + lam * Ŝ)``.

    Args:
        scores: ``(B, H, T, T)`` float32 base scores.
        refine: ``(B, 1, T, T)`` float32 refinement scores.

    Returns:
        ``(B, H, T, T)`` float32.
    """
    # The released code casts Ŝ to fp16 and multiplies by lam there, even on an fp32 model.
    weighted = (cfg.lam * refine.half()).float() if cfg.fp16_scores else cfg.lam * refine
    out = torch.mul(scores, 1.0 - cfg.lam)  # one (B, H, T, T) buffer, updated in place
    out += weighted
    return out.mul_(cfg.tau)
