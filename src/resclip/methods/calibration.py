"""Building blocks of the self-calibrating methods (SC-CLIP, and SFP which reuses them).

Each function works on a batch of windows, ``(B, N, C)`` patch tokens on an ``(h, w)`` grid in
row-major order, and does one thing: score anomalous tokens (LOF), repair them from their
neighbours, build thresholded cosine-similarity matrices, aggregate tokens with them, and turn
a similarity matrix into an attention prior.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_sq_distances(x: torch.Tensor) -> torch.Tensor:
    """``(B, N, N)`` float64 squared Euclidean distances between the rows of ``x`` ``(B, N, C)``.

    Formed in float64 from the Gram matrix: as exact as fp32 differences, without an
    ``(N, N, C)`` temporary.
    """
    z = x.double()
    sq = (z * z).sum(-1)
    d = sq[:, :, None] + sq[:, None, :] - 2.0 * (z @ z.transpose(1, 2))
    return d.clamp_min_(0.0)


def lof_scores(x: torch.Tensor, k: int, distance: str = "squared", reach: str = "own") -> torch.Tensor:
    """Local outlier factor of every token, ``(B, N)`` float32 (higher = more anomalous).

    Args:
        x: ``(B, N, C)`` tokens.
        k: neighbours (clamped to ``N - 1``).
        distance: ``"squared"`` Euclidean (SC-CLIP's release) or ``"euclidean"`` (standard LOF).
        reach: ``"own"``: reach-distance ``max(d(p, o), k-dist(p))`` with the point's own k-distance
            (SC-CLIP's release); ``"neighbour"``: ``max(d(p, o), k-dist(o))`` (standard LOF).
    """
    b, n, _ = x.shape
    k = min(k, n - 1)
    if k < 1:
        return torch.ones(b, n, device=x.device)
    d = pairwise_sq_distances(x)
    if distance == "euclidean":
        d = d.sqrt()
    elif distance != "squared":
        raise ValueError(f"LOF distance must be 'squared' or 'euclidean', got {distance!r}")
    d.diagonal(dim1=1, dim2=2).fill_(float("inf"))  # a point is not its own neighbour
    knn, idx = torch.topk(d, k, dim=-1, largest=False)  # ascending
    kdist = knn[..., -1]  # (B, N)
    if reach == "own":
        reach_d = torch.maximum(knn, kdist[..., None])
    elif reach == "neighbour":
        reach_d = torch.maximum(knn, torch.gather(kdist, 1, idx.flatten(1)).view(b, n, k))
    else:
        raise ValueError(f"LOF reach must be 'own' or 'neighbour', got {reach!r}")
    lrd = k / reach_d.mean(-1)  # (B, N)
    ratio = torch.gather(lrd, 1, idx.flatten(1)).view(b, n, k) / lrd[..., None]
    return ratio.mean(-1).float()


def top_quantile(scores: torch.Tensor, contamination: float) -> torch.Tensor:
    """``(B, N)`` bool: scores strictly above their window's ``1 - contamination`` quantile (linear)."""
    thd = torch.quantile(scores, 1.0 - contamination, dim=-1, keepdim=True)
    return scores > thd


def neighbour_mean(
    x: torch.Tensor, outliers: torch.Tensor, grid: tuple[int, int], empty: str = "keep"
) -> torch.Tensor:
    """Replace each outlier token by the mean of its non-outlier 8-neighbours on the grid.

    Args:
        x: ``(B, N, C)`` tokens, ``N = h * w`` row-major.
        outliers: ``(B, N)`` bool.
        grid: ``(h, w)``; any aspect ratio.
        empty: an outlier without a valid neighbour is kept (``"keep"``, SC-CLIP) or zeroed (``"zero"``, SFP).

    Returns:
        ``(B, N, C)``: a new tensor; non-outliers unchanged.
    """
    if empty not in ("keep", "zero"):
        raise ValueError(f"empty must be 'keep' or 'zero', got {empty!r}")
    b, n, c = x.shape
    h, w = grid
    valid = (~outliers).to(x.dtype).view(b, h, w, 1)
    padded = F.pad((x.view(b, h, w, c) * valid).permute(0, 3, 1, 2), (1, 1, 1, 1))
    count = F.pad(valid.permute(0, 3, 1, 2), (1, 1, 1, 1))
    total = torch.zeros(b, c, h, w, dtype=x.dtype, device=x.device)
    num = torch.zeros(b, 1, h, w, dtype=x.dtype, device=x.device)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy == 1 and dx == 1:
                continue
            total += padded[:, :, dy : dy + h, dx : dx + w]
            num += count[:, :, dy : dy + h, dx : dx + w]
    mean = (total / num.clamp_min(1)).permute(0, 2, 3, 1).reshape(b, n, c)
    has = (num > 0).view(b, n, 1)
    fill = mean if empty == "keep" else torch.where(has, mean, torch.zeros_like(mean))
    replace = outliers[..., None] & (has | (empty == "zero"))
    return torch.where(replace, fill, x)


def cosine_similarity(x: torch.Tensor) -> torch.Tensor:
    """``(B, N, N)`` float32 cosine similarity of the rows of ``x`` ``(B, N, C)``; a zero row (SFP
    zeroes an outlier without valid neighbours) is similar to nothing instead of NaN."""
    f = x.float()
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return f @ f.transpose(1, 2)


def threshold(sim: torch.Tensor, beta: float) -> torch.Tensor:
    """``sim`` with entries below ``beta`` set to 0."""
    return torch.where(sim < beta, torch.zeros_like(sim), sim)


def aggregate(affinity: torch.Tensor, y: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(A / (rowsum(A) + eps)) @ y``: each token becomes the affinity-weighted mean of ``y``."""
    a = affinity / (affinity.sum(-1, keepdim=True) + eps)
    return a.to(y.dtype) @ y


def similarity_prior(sim: torch.Tensor, temperature: float) -> torch.Tensor:
    """Pre-softmax scores ``temperature * (S - mean(S))`` (mean over all N² entries), negatives -> -inf.

    The diagonal is never masked: it is >= 0 anyway for any non-zero token (``S_ii = 1 >= mean``),
    and this keeps a zero token's row finite.
    """
    m = (sim - sim.mean(dim=(-2, -1), keepdim=True)) * temperature
    off_diag = ~torch.eye(m.shape[-1], dtype=torch.bool, device=m.device)
    return m.masked_fill((m < 0) & off_diag, float("-inf"))


def salient_outliers(
    attn: torch.Tensor, cls_scale: float, topk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SFP's SOM detector on one block's attention ``(B, H, T, T)`` (CLS first).

    Head-averaged; a patch is salient when the CLS token attends to it (scaled by ``cls_scale``)
    more than it attends to itself; the ``topk`` salient patches with the highest CLS attention
    are the outliers.

    Returns:
        ``(B, N)`` bool outliers, the ``(B, N)`` scaled CLS-to-patch attention and the ``(B, N)``
        patch self-attention.
    """
    mean = attn.mean(1)
    c2p = mean[:, 0, 1:] * cls_scale
    own = torch.diagonal(mean[:, 1:, 1:], dim1=1, dim2=2)
    ranked = c2p.masked_fill(~(c2p > own), float("-inf"))
    values, idx = ranked.topk(min(topk, ranked.shape[1]), dim=-1)
    outliers = torch.zeros_like(c2p, dtype=torch.bool)
    outliers.scatter_(1, idx, values > float("-inf"))
    return outliers, c2p, own
