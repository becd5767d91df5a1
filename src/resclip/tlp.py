"""Text-aware Laplacian propagation (TLP, PEARL's refinement): a logit refinement on the
full-resolution query logits that any method can use (``Protocol.tlp``).

The logits ``Z`` (``(B, Q, H, W)``, one channel per query) are average-pooled onto a coarse grid
of about ``grid`` cells per side (pooling factor ``s = max(1, round(H / grid))`` per axis), and
the refined logits ``F`` solve, per image, the sparse linear system

    (D_w + tau * L) F = D_w Z,                                                     (TLP-1)

with ``D_w`` the per-cell data weights and ``L`` the weighted 4-neighbour graph Laplacian of the
grid; ``F`` is then bilinearly resized back to ``(H, W)``. With the cell probabilities
``p = softmax_q(Z)`` (the raw cosine logits, no logit scale) and the query affinity ``G``
(:func:`query_affinity`, from the text embeddings):

* data weight ``w_i = max(max_q p_i, c_min)^2 * (1 + u_i)``, the text agreement
  ``u_i = clamp(p_i^T G p_i, 0, 1)``;                                               (TLP-2)
* edge weight between neighbours ``i, j``: ``a_ij = clamp(exp(-k * g_ij / mean(g)) *
  (1 + clamp(p_j^T G p_i, 0, 1)), 0, 1)``, ``g_ij`` the absolute grey-level difference of the
  guide image (mean over all horizontal, resp. vertical, pairs).                   (TLP-3)

The system is symmetric positive definite and solved by a fixed number of conjugate-gradient
steps started from ``Z``.

Release quirk (field :attr:`TLPConfig.coupling`): the release writes the text coupling as
``einsum("cc,bcij->bcij", G, p)``, which reads only the diagonal of ``G``, so its agreement
is ``sum_q G_qq p_q^2`` (and its edge gate ``sum_q G_qq p_q(i) p_q(j)``) — ``"diagonal"``;
the paper's quadratic form ``p_i^T G p_j`` is ``"matrix"``.

TLP couples every query of an image (``G`` is ``Q x Q``, the softmax is over all queries, the
solve is global), so it runs on the whole ``(Q, H, W)`` map: never class group by class group.
Synonyms are separate queries, as in the release (``G`` is over queries, not classes).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

COUPLINGS = ("diagonal", "matrix")


@dataclass(frozen=True)
class TLPConfig:
    """TLP settings (defaults: the PEARL release's constants).

    Attributes:
        grid: target cells per side of the coarse grid (the release: 80; 224 for Cityscapes).
        text_temperature: temperature of the row softmax over text cosine similarities.
        self_weight: added to the affinity's diagonal before the rows are renormalised.
        edge_sharpness: ``k`` in ``exp(-k * g / mean(g))``.
        smoothness: ``tau``, the weight of the Laplacian in (TLP-1).
        cg_steps: conjugate-gradient steps.
        min_confidence: ``c_min``, the floor of the peak probability in the data weight.
        eps: guards the divisions.
        coupling: ``"diagonal"`` (release) or ``"matrix"`` (paper), see the module docstring.
    """

    grid: int = 80
    text_temperature: float = 0.5
    self_weight: float = 10.0
    edge_sharpness: float = 5.0
    smoothness: float = 1.0
    cg_steps: int = 25
    min_confidence: float = 0.05
    eps: float = 1e-6
    coupling: str = "diagonal"

    def __post_init__(self) -> None:
        for name in ("grid", "cg_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
                raise ValueError(f"tlp {name} must be an integer >= 1, got {value!r}")
        for name in ("text_temperature", "edge_sharpness", "smoothness", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0:
                raise ValueError(f"tlp {name} must be a number > 0, got {value!r}")
        if not float(self.self_weight) >= 0 or not 0 <= float(self.min_confidence) <= 1:
            raise ValueError(
                f"tlp self_weight must be >= 0 and min_confidence in [0, 1], got {self.self_weight!r}, "
                f"{self.min_confidence!r}"
            )
        if self.coupling not in COUPLINGS:
            raise ValueError(f"tlp coupling must be one of {COUPLINGS}, got {self.coupling!r}")


def query_affinity(text: torch.Tensor, cfg: TLPConfig) -> torch.Tensor:
    """The row-stochastic query affinity ``G``.

    ``G = rownorm(softmax_row(T T^T / t) + b I)`` with ``T`` the L2-normalised embeddings,
    ``t`` = ``text_temperature``, ``b`` = ``self_weight`` (``rownorm`` divides by the row sum + eps).

    Args:
        text: ``(Q, D)`` query embeddings.

    Returns:
        ``(Q, Q)`` float32.
    """
    t = F.normalize(text.float(), dim=-1)
    g = torch.softmax((t @ t.t()) / max(cfg.text_temperature, cfg.eps), dim=1)
    if cfg.self_weight > 0:
        g = g + cfg.self_weight * torch.eye(g.shape[0], device=g.device, dtype=g.dtype)
        g = g / (g.sum(dim=1, keepdim=True) + cfg.eps)
    return g


def pooling_factors(height: int, width: int, grid: int) -> tuple[int, int]:
    """The average-pooling factors ``(sh, sw)`` that bring ``(height, width)`` to about ``grid``
    cells per side (Python's ``round``, at least 1)."""
    return max(1, round(height / float(grid))), max(1, round(width / float(grid)))


def grey(image: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` luma ``0.299 c0 + 0.587 c1 + 0.114 c2`` of a ``(B, 3, H, W)`` image
    (the normalised RGB channels, as the release); the first channel of any other image."""
    if image.shape[1] == 3:
        return 0.299 * image[:, 0:1] + 0.587 * image[:, 1:2] + 0.114 * image[:, 2:3]
    return image[:, :1]


def _coupled(g: torch.Tensor, p: torch.Tensor, coupling: str) -> torch.Tensor:
    """``G p`` over the query axis of ``(B, Q, h, w)`` ``p``: the whole matrix (``"matrix"``) or its
    diagonal (``"diagonal"``)."""
    if coupling == "diagonal":
        return torch.diagonal(g).view(1, -1, 1, 1) * p
    return torch.einsum("qr,brij->bqij", g, p)


def text_agreement(probs: torch.Tensor, g: torch.Tensor, coupling: str) -> torch.Tensor:
    """``u = clamp(p^T G p, 0, 1)`` per cell (TLP-2).

    Args:
        probs: ``(B, Q, h, w)`` cell probabilities; g: ``(Q, Q)``.

    Returns:
        ``(B, 1, h, w)``.
    """
    return (probs * _coupled(g, probs, coupling)).sum(dim=1, keepdim=True).clamp(0.0, 1.0)


def data_weight(probs: torch.Tensor, g: torch.Tensor, cfg: TLPConfig) -> torch.Tensor:
    """``w = max(max_q p, c_min)^2 (1 + u)`` per cell (TLP-2): ``(B, 1, h, w)``."""
    conf = probs.max(dim=1, keepdim=True).values
    return conf.clamp_min(cfg.min_confidence) ** 2 * (1.0 + text_agreement(probs, g, cfg.coupling))


def edge_weights(
    guide: torch.Tensor, probs: torch.Tensor, g: torch.Tensor, cfg: TLPConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour weights of the grid (TLP-3).

    Args:
        guide: ``(B, 1, h, w)`` grey image on the grid; probs: ``(B, Q, h, w)``; g: ``(Q, Q)``.

    Returns:
        ``a_h`` ``(B, 1, h, w-1)`` between cells ``(r, c)`` and ``(r, c+1)``, and ``a_v``
        ``(B, 1, h-1, w)`` between ``(r, c)`` and ``(r+1, c)``. The mean gradient of each
        direction is taken over the whole batch (as the release).
    """
    gx = (guide[..., :, 1:] - guide[..., :, :-1]).abs()
    gy = (guide[..., 1:, :] - guide[..., :-1, :]).abs()
    w_h = torch.exp(-cfg.edge_sharpness * (gx / (gx.mean() + cfg.eps)))
    w_v = torch.exp(-cfg.edge_sharpness * (gy / (gy.mean() + cfg.eps)))
    gate_h = (probs[..., :, 1:] * _coupled(g, probs[..., :, :-1], cfg.coupling)).sum(dim=1, keepdim=True)
    gate_v = (probs[..., 1:, :] * _coupled(g, probs[..., :-1, :], cfg.coupling)).sum(dim=1, keepdim=True)
    w_h = (w_h * (1.0 + gate_h.clamp(0.0, 1.0))).clamp(0.0, 1.0)
    w_v = (w_v * (1.0 + gate_v.clamp(0.0, 1.0))).clamp(0.0, 1.0)
    return w_h, w_v


def laplacian(x: torch.Tensor, a_h: torch.Tensor, a_v: torch.Tensor) -> torch.Tensor:
    """``L x`` for the 4-neighbour grid graph: ``(L x)_i = sum_j a_ij (x_i - x_j)``.

    Args:
        x: ``(B, Q, h, w)``; a_h ``(B, 1, h, w-1)``, a_v ``(B, 1, h-1, w)`` from :func:`edge_weights`.

    Returns:
        ``(B, Q, h, w)``.
    """
    out = torch.zeros_like(x)
    flow = a_h * (x[..., :, 1:] - x[..., :, :-1])
    out[..., :, 1:] += flow
    out[..., :, :-1] -= flow
    flow = a_v * (x[..., 1:, :] - x[..., :-1, :])
    out[..., 1:, :] += flow
    out[..., :-1, :] -= flow
    return out


def conjugate_gradient(
    apply: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, start: torch.Tensor, steps: int
) -> torch.Tensor:
    """``steps`` conjugate-gradient iterations for ``A x = rhs`` (``A`` SPD, given by ``apply``), one
    independent solve per batch item (inner products over all other dims; 1e-12 guards)."""
    dims = tuple(range(1, rhs.dim()))
    x = start.clone()
    r = rhs - apply(x)
    p = r.clone()
    rs = (r * r).sum(dim=dims, keepdim=True)
    for _ in range(steps):
        ap = apply(p)
        alpha = rs / ((p * ap).sum(dim=dims, keepdim=True) + 1e-12)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum(dim=dims, keepdim=True)
        p = r + (rs_new / (rs + 1e-12)) * p
        rs = rs_new
    return x


@dataclass
class TLPTrace:
    """Intermediates of one :func:`tlp_refine` call (on the coarse grid).

    Attributes:
        logits: ``(B, Q, h, w)`` pooled logits ``Z`` (the CG start).
        probs: ``(B, Q, h, w)`` ``softmax_q(Z)``.
        agreement: ``(B, 1, h, w)`` ``u``.
        weight: ``(B, 1, h, w)`` data weights.
        a_h, a_v: edge weights (see :func:`edge_weights`).
        solution: ``(B, Q, h, w)`` the CG result before resizing.
    """

    logits: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    agreement: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    a_h: torch.Tensor | None = None
    a_v: torch.Tensor | None = None
    solution: torch.Tensor | None = None


def tlp_refine(
    image: torch.Tensor,
    logits: torch.Tensor,
    affinity: torch.Tensor,
    cfg: TLPConfig,
    trace: TLPTrace | None = None,
) -> torch.Tensor:
    """Refine full-resolution query logits with TLP.

    Args:
        image: ``(B, 3, H, W)`` the normalised image at the logits' size.
        logits: ``(B, Q, H, W)`` cosine logits.
        affinity: ``(Q, Q)`` :func:`query_affinity` of the query embeddings.
        cfg: settings.
        trace: an empty :class:`TLPTrace` to fill, or None.

    Returns:
        ``(B, Q, H, W)`` refined logits, in the dtype of ``logits``.

    Raises:
        ValueError: shapes that do not match.
    """
    b, q, h, w = logits.shape
    if image.shape[0] != b or image.shape[-2:] != logits.shape[-2:] or affinity.shape != (q, q):
        raise ValueError(
            f"tlp: image {tuple(image.shape)}, logits {tuple(logits.shape)} and affinity "
            f"{tuple(affinity.shape)} do not match"
        )
    sh, sw = pooling_factors(h, w, cfg.grid)
    img, z = image.float(), logits.float()
    if sh > 1 or sw > 1:
        img = F.avg_pool2d(img, (sh, sw), (sh, sw), ceil_mode=False, count_include_pad=False)
        z = F.avg_pool2d(z, (sh, sw), (sh, sw), ceil_mode=False, count_include_pad=False)
    g = affinity.to(z.device, z.dtype)
    probs = torch.softmax(z, dim=1)
    weight = data_weight(probs, g, cfg)
    a_h, a_v = edge_weights(grey(img), probs, g, cfg)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return weight * x + cfg.smoothness * laplacian(x, a_h, a_v)

    solution = conjugate_gradient(apply, weight * z, z, cfg.cg_steps)
    if trace is not None:
        trace.logits, trace.probs, trace.weight, trace.solution = z, probs, weight, solution
        trace.agreement, trace.a_h, trace.a_v = text_agreement(probs, g, cfg.coupling), a_h, a_v
    if sh > 1 or sw > 1:
        solution = F.interpolate(solution, size=(h, w), mode="bilinear", align_corners=False)
    return solution.to(logits.dtype)
