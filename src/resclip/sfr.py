"""SFR: semantic feedback refinement (paper Sec. 3.2.2, Eq. 7-12).

A first pass gives a segmentation; its patch label map ``M`` turns into a refinement score
``Ŝ`` (same label, decayed with distance when no valid path joins the two patches, smoothed
along keys with a 1-D Gaussian), which is mixed into the base method's pre-softmax scores in a
second pass. Every place where the released code differs from the printed equations is one
named field of :class:`SFRConfig`.

Reading order: the settings; the equations in plain form (:func:`refinement_scores_reference`,
one row ``S^i`` at a time, and :func:`sfr_mix`, Eq. 12); the first pass that yields ``M``; then
the form the engine runs, :func:`refinement_scores`, which builds every row at once and which
the tests compare with the plain form.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .pamr import CHANNEL_GROUP, pamr_affinity, pamr_propagate
from .protocol import class_max
from .sfr_paths import valid_path_connected, valid_path_line


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


# ----------------------------------------------------------------------------- the equations


def refinement_scores_reference(labels: torch.Tensor, cfg: SFRConfig) -> torch.Tensor:
    """Eq. 7-11 as printed (plus the released normalisation), one query patch ``i`` at a time.

    Plain Python over patch pairs in float64: slow, for reading and for the tests, which hold
    :func:`refinement_scores` to it (valid paths exactly; scores to 1e-6, the float32 rounding
    of the fast form's exponentials and kernel sums).

    Args:
        labels: ``(B, h, w)`` int64 patch labels ``M``.
        cfg: SFR settings (path, decay, smoothing, normalisation).

    Returns:
        ``(B, T, T)`` float64 ``Ŝ`` with zero CLS row and column.
    """
    b, h, w = labels.shape
    n, mx = h * w, max(h, w) - 1
    out = torch.zeros(b, n + 1, n + 1, dtype=torch.float64)
    for bi in range(b):
        m = labels[bi].flatten().tolist()  # M in raster order: patch i sits at (i // w, i % w)
        for i in range(n):
            s = [float(m[j] == m[i]) for j in range(n)]  # Eq. 7: S^i_j = 1[M_i == M_j]
            if cfg.distance_decay:
                v = valid_paths_reference(labels[bi], i, cfg)  # V_j = 1: a valid path joins i and j
                for j in range(n):
                    d = max(abs(i // w - j // w), abs(i % w - j % w))  # Eq. 10: Chebyshev distance
                    decay = math.exp(-d / mx) if mx > 0 else 1.0  # Eq. 9: D = exp(-d / max d)
                    s[j] *= v[j] + (1 - v[j]) * decay  # Eq. 8 and 11: S^i ⊙ h(V, D)
            s = _smooth_reference(s, cfg.smoothing_std)  # Eq. 11: φ, a 1-D Gaussian along keys j
            if cfg.normalise:  # released: ReLU (a no-op on these scores), then rows sum to one
                total = sum(max(x, 0.0) for x in s) + 1e-8
                s = [max(x, 0.0) / total for x in s]
            out[bi, 1 + i, 1:] = torch.tensor(s, dtype=torch.float64)
        if cfg.normalise:  # released: divide by the window's largest score
            out[bi] /= max(out[bi].max().item(), 1e-12)
    return out


def valid_paths_reference(grid: torch.Tensor, i: int, cfg: SFRConfig) -> list[float]:
    """``V`` of query patch ``i`` against every key patch ``j`` of an ``(h, w)`` label grid.

    ``path="connected"`` (paper): j lies in i's connected same-label region. ``path="line"``
    (released): the first ``d(i, j) + 1`` of ``Mx + 1`` evenly spaced points on the segment
    i -> j, each rounded half to even in float32, all carry i's label.
    """
    h, w = grid.shape
    m = grid.tolist()
    ri, ci = divmod(i, w)
    if cfg.path == "connected":
        steps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy or dx)]
        steps = [(dy, dx) for dy, dx in steps if cfg.connectivity == 8 or not (dy and dx)]
        region, todo = {(ri, ci)}, [(ri, ci)]
        while todo:  # flood fill from i over neighbours with i's label
            r, c = todo.pop()
            for nb in ((r + dy, c + dx) for dy, dx in steps):
                if 0 <= nb[0] < h and 0 <= nb[1] < w and nb not in region and m[nb[0]][nb[1]] == m[ri][ci]:
                    region.add(nb)
                    todo.append(nb)
        return [float(divmod(j, w) in region) for j in range(h * w)]
    t = torch.linspace(0, 1, max(h, w), dtype=torch.float32)
    out = []
    for j in range(h * w):
        rj, cj = divmod(j, w)
        tk = t[: max(abs(ri - rj), abs(ci - cj)) + 1]
        rows = torch.round(ri * (1 - tk) + rj * tk).long().tolist()
        cols = torch.round(ci * (1 - tk) + cj * tk).long().tolist()
        out.append(float(all(m[r][c] == m[ri][ci] for r, c in zip(rows, cols, strict=True))))
    return out


def _smooth_reference(row: list[float], std: float) -> list[float]:
    """φ: ``row`` convolved with a normalised Gaussian of ``K = min(N, int(6 std + 1))`` taps, made
    odd, zero beyond both ends (the released kernel)."""
    n = len(row)
    size = min(n, int(6 * std + 1))
    size += 1 - size % 2
    taps = [math.exp(-((t - size // 2) ** 2) / (2 * std * std)) for t in range(size)]
    taps = [g / sum(taps) for g in taps]
    shifts = [t - size // 2 for t in range(size)]
    return [sum(g * row[j + o] for g, o in zip(taps, shifts, strict=True) if 0 <= j + o < n)
            for j in range(n)]


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


# ----------------------------------------------------------------------------- the first pass: M


def pixel_labels(
    logits: torch.Tensor, crops: torch.Tensor, cfg: SFRConfig, query_to_class: torch.Tensor
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
    b, q = logits.shape[:2]
    size = crops.shape[-2:]
    out = torch.empty((b, *size), dtype=torch.int64, device=logits.device)
    scores = torch.empty(*size, q, device=logits.device)  # one window's refined logits, queries last
    for i in range(b):  # one window at a time: its maps stay in cache
        _refined_logits(logits[i : i + 1], crops[i : i + 1], cfg, out=scores)
        _labels_by_bands(scores, cfg, query_to_class, out=out[i])
    return out


def _refined_logits(logits: torch.Tensor, crop: torch.Tensor, cfg: SFRConfig, out: torch.Tensor) -> None:
    """One window's ``(1, Q, h, w)`` logits upsampled to the crop and PAMR-refined into ``out``
    ``(Hc, Wc, Q)``.

    Trick: ``CHANNEL_GROUP`` queries at a time keep the maps in cache, and queries-last storage is
    what PAMR's sparse form writes without a transpose and what the softmax over queries reads.
    """
    steps, dil = cfg.first_pass_pamr_steps, cfg.first_pass_pamr_dilations
    aff = pamr_affinity(crop.float(), dil)[0] if steps > 0 else None
    for start in range(0, logits.shape[1], CHANNEL_GROUP):
        part = logits[:, start : start + CHANNEL_GROUP].float()
        up = F.interpolate(part, size=out.shape[:2], mode="bilinear", align_corners=False)[0]
        target = out[:, :, start : start + CHANNEL_GROUP].permute(2, 0, 1)
        if aff is None:
            target.copy_(up)
        else:
            pamr_propagate(aff, up, steps, dil, out=target)


def _labels_by_bands(
    scores: torch.Tensor, cfg: SFRConfig, query_to_class: torch.Tensor, out: torch.Tensor
) -> None:
    """Softmax over queries, class maxima (class level), arg-max and the confidence threshold of
    ``(Hc, Wc, Q)`` refined logits into ``out`` ``(Hc, Wc)``.

    Trick: a band of rows at a time bounds the probability buffer to about 2^20 elements.
    """
    rows, cols, q = scores.shape
    band = max(1, (1 << 20) // max(1, cols * q))
    for r0 in range(0, rows, band):
        probs = torch.softmax(cfg.first_pass_logit_scale * scores[r0 : r0 + band], dim=-1)
        if cfg.label_level == "class":
            probs = class_max(probs, query_to_class, dim=-1)
        conf, labels = probs.max(dim=-1)
        out[r0 : r0 + band] = labels.masked_fill(conf < cfg.confidence_thd, 0)


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


# ----------------------------------------------------------------------------- the fast form


@dataclass
class RefinementTrace:
    """Intermediates of :func:`refinement_scores`, filled when one is passed to it.

    Attributes:
        valid_path: ``(B, N, N)`` bool ``V`` (row = query patch i); None without ``distance_decay``.
        prenorm: ``(B, T, T)`` ``Ŝ`` before the released global-max normalisation.
    """

    valid_path: torch.Tensor | None = None
    prenorm: torch.Tensor | None = None


def refinement_scores(
    labels: torch.Tensor, cfg: SFRConfig, trace: RefinementTrace | None = None
) -> torch.Tensor:
    """``Ŝ`` of every query patch at once: :func:`refinement_scores_reference` in tensor form.

    Args:
        labels: ``(B, h, w)`` int64 patch labels ``M``.
        cfg: SFR settings.
        trace: receives ``V`` and the scores before normalisation, if given.

    Returns:
        ``(B, T, T)`` float32 with zero CLS row and column.
    """
    b, h, w = labels.shape
    n = h * w
    flat = labels.reshape(b, n)
    s = (flat[:, :, None] == flat[:, None, :]).float()  # Eq. 7
    if cfg.distance_decay:
        line = cfg.path == "line"
        valid = valid_path_line(labels) if line else valid_path_connected(labels, cfg.connectivity)
        if trace is not None:
            trace.valid_path = valid
        v = valid.float()
        s = s * (v + (1 - v) * _chebyshev_decay(h, w, labels.device))  # Eq. 8-10
    s = smooth_rows(s, cfg.smoothing_std)  # Eq. 11
    if cfg.normalise:
        s = torch.relu(s)
        s = s / (s.sum(dim=-1, keepdim=True) + 1e-8)
    full = torch.zeros(b, n + 1, n + 1, device=labels.device)
    full[:, 1:, 1:] = s
    if trace is not None:
        trace.prenorm = full
    if cfg.normalise:
        full = full / full.flatten(1).amax(dim=1).clamp_min(1e-12).view(b, 1, 1)
    return full


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
    """φ of Eq. 11 on ``(B, N, N)`` float32 scores: each row convolved with a normalised 1-D
    Gaussian along the flattened key axis, zero padding at both ends."""
    b, n, _ = scores.shape
    kernel = _gaussian_kernel(n, float(std), scores.device)
    out = F.conv1d(scores.reshape(b * n, 1, n), kernel, padding=kernel.shape[-1] // 2)
    return out.view(b, n, n)
