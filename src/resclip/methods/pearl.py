"""PEARL (Pei et al., CVPR 2026, "PEARL: Geometry Aligns Semantics for Training-Free
Open-Vocabulary Semantic Segmentation"): Procrustes-aligned last-block attention; its second
step, text-aware Laplacian propagation, is the protocol's logit refinement (:mod:`resclip.tlp`,
``Protocol.tlp``), usable with any method.

The last block keeps no residual and no MLP (``out_proj(A v)``, projected like every token) and
forms one score term per head from ``q, k`` (``(T, d)`` per head, ``T = 1 + h*w``, CLS first):

* centring weights ``w_t = ||q_t|| / sum_s ||q_s||`` with the CLS weight set to 0 (+1e-6 in the
  sum); weighted means ``mu_q = sum_t w_t q_t``, ``mu_k`` likewise; ``Q_c = Q - mu_q``,
  ``K_c = K - mu_k``;
* the orthogonal Procrustes problem ``min_R ||K_c R - Q_c||_F`` over rotations, solved by the
  polar factor of ``M = K_c^T Q_c``: ``R* = U V^T`` for ``M = U S V^T``;             (PA-1)
* scores ``S = q (K R)^T / sqrt(d) + alpha * K_c K_c^T / sqrt(d)`` (the uncentred keys are
  rotated), softmaxed over keys.                                                    (PA-2)

RCS and SFR act on this term as on any method's (SFR mixes ``S``, RCS the softmaxed map).

Release vs paper (field: official / paper): ``rotation`` ``"newton_schulz"`` / ``"exact"``. The
release computes ``R = M (A / ||A||_F + eps I)^(-1/2) / sqrt(||A||_F)``, ``A = M^T M``, with 5
coupled Newton–Schulz steps for the inverse square root; five steps from a Frobenius-normalised
start do not converge when ``A`` is ill-conditioned, so its ``R`` is not orthogonal (on the test
model ``max |R^T R - I|`` is about 0.9). ``"exact"`` is the paper's ``R* = U V^T`` (an SVD).
``alpha`` is 0.08, 0.3 for ADE20K and Cityscapes (per-dataset, set by the ``pearl/<dataset>``
presets' ``method_options``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .base import BaseAttention, register_method

ROTATIONS = ("newton_schulz", "exact")


def centring_weights(q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(..., T, 1)`` weights ``||q_t|| / (sum_s ||q_s|| + eps)`` with the CLS token's (t = 0) set to 0.

    Args:
        q: ``(..., T, d)`` float32 queries.
    """
    w = q.norm(dim=-1, keepdim=True)
    w[..., 0:1, :] = 0.0
    return w / (w.sum(dim=-2, keepdim=True) + eps)


def cross_covariance(
    q: torch.Tensor, k: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred keys ``K_c`` ``(..., T, d)`` and ``M = K_c^T Q_c`` ``(..., d, d)`` (PA-1), with the
    weighted means of :func:`centring_weights`."""
    w = centring_weights(q, eps)
    q_c = q - (w * q).sum(dim=-2, keepdim=True)
    k_c = k - (w * k).sum(dim=-2, keepdim=True)
    return k_c, torch.matmul(k_c.transpose(-1, -2), q_c)


def polar_newton_schulz(m: torch.Tensor, steps: int = 5, eps: float = 1e-6) -> torch.Tensor:
    """The release's approximate polar factor ``M A^(-1/2)``, ``A = M^T M``.

    ``A`` is scaled to ``Â = A / ||A||_F + eps I``; the coupled Newton–Schulz iteration
    ``T = (3I - Z Y) / 2, Y <- Y T, Z <- T Z`` from ``Y = Â, Z = I`` drives ``Z`` towards
    ``Â^(-1/2)``; then ``R = M Z / sqrt(||A||_F)``. Not orthogonal unless it has converged.

    Args:
        m: ``(..., d, d)`` float32.
    """
    d = m.shape[-1]
    eye = torch.eye(d, device=m.device, dtype=m.dtype).expand_as(m)
    a = torch.matmul(m.transpose(-1, -2), m)
    norm = a.flatten(-2).norm(dim=-1).clamp_min(eps)[..., None, None]
    y = a / norm + eps * eye
    z = eye.clone()
    for _ in range(steps):
        t = 0.5 * (3.0 * eye - torch.matmul(z, y))
        y = torch.matmul(y, t)
        z = torch.matmul(t, z)
    return torch.matmul(m, z / torch.sqrt(norm))


def polar_exact(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``U V^T`` of ``M = U S V^T`` (PA-1), by an SVD: ``(..., d, d)``."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return torch.matmul(u, vh)


@dataclass(frozen=True)
class PEARL(BaseAttention):
    """PEARL's Procrustes-aligned attention (the release's constants).

    Attributes:
        alpha_kk: weight of the centred key-key term in (PA-2).
        use_kk: add that term at all.
        rotation: ``"newton_schulz"`` (release) or ``"exact"`` (paper), see the module docstring.
        polar_steps: Newton–Schulz steps.
        eps: guard of the centring weights and of the normalisation.
    """

    alpha_kk: float = 0.08
    use_kk: bool = True
    rotation: str = "newton_schulz"  # official "newton_schulz", paper "exact"
    polar_steps: int = 5
    eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rotation not in ROTATIONS:
            raise ValueError(f"pearl rotation must be one of {ROTATIONS}, got {self.rotation!r}")

    def for_fidelity(self, fidelity: str) -> BaseAttention:
        return replace(self, rotation="exact" if fidelity == "paper" else "newton_schulz")

    def rotation_matrix(self, m: torch.Tensor) -> torch.Tensor:
        """``R`` from ``M`` ``(..., d, d)`` with this method's solver."""
        if self.rotation == "exact":
            return polar_exact(m)
        return polar_newton_schulz(m, self.polar_steps, self.eps)

    def score_terms(self, q: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
        """The one PA score term (PA-2): ``(B, H, T, T)`` float32 from ``q, k`` ``(B, H, T, d)``."""
        q32, k32 = q.float(), k.float()
        scale = q.shape[-1] ** -0.5
        k_c, m = cross_covariance(q32, k32, self.eps)
        aligned = torch.matmul(k32, self.rotation_matrix(m))
        scores = torch.matmul(q32 * scale, aligned.transpose(-1, -2))
        if self.use_kk:
            scores = scores + self.alpha_kk * (torch.matmul(k_c, k_c.transpose(-1, -2)) * scale)
        return [scores]


register_method(
    PEARL(
        "pearl",
        keep_residual=False,
        pairs=("qk",),
        description="PEARL: Procrustes-aligned q-k attention + centred k-k term (TLP in its presets)",
        title="PEARL",
    )
)
