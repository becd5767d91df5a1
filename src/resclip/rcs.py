"""RCS: residual cross-correlation self-attention (paper Sec. 3.2.1, Eq. 5-6).

The q-k attention maps of intermediate blocks are averaged (per head, CLS included) and mixed
into the last block's post-softmax attention: ``A = tau * ((1 - lam) * A_s + lam * A_c)``.
The released code multiplies by an unreported ``tau = 2``; the paper's equation has ``tau = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RCSConfig:
    """Hyper-parameters of RCS.

    Attributes:
        lam: weight of the averaged intermediate attention (``lambda_rcs``), in [0, 1].
        tau: overall multiplier of the mixed attention (released code: 2.0; paper: 1.0).
        layers: 1-based indices of the blocks whose q-k attention is averaged (released: 6..9).
            They must precede the last block.
    """

    lam: float = 0.5
    tau: float = 1.0
    layers: tuple[int, ...] = (6, 7, 8, 9)

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"RCS lam must be in [0, 1], got {self.lam}")
        if not self.tau > 0:
            raise ValueError(f"RCS tau must be > 0, got {self.tau}")
        if not self.layers or any(int(i) != i or i < 1 for i in self.layers):
            raise ValueError(
                f"RCS layers must be 1-based block indices (e.g. (6, 7, 8, 9)), got {self.layers}"
            )
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"RCS layers contain duplicates: {self.layers}")
        object.__setattr__(self, "layers", tuple(sorted(int(i) for i in self.layers)))

    def zero_based(self, num_blocks: int) -> tuple[int, ...]:
        """0-based block indices, checked against a ViT of ``num_blocks`` blocks."""
        if max(self.layers) >= num_blocks:
            raise ValueError(
                f"RCS layers {self.layers} must lie in 1..{num_blocks - 1} for a ViT with "
                f"{num_blocks} blocks (the last block is the one RCS modifies)"
            )
        return tuple(i - 1 for i in self.layers)


def rcs_mix(attn: torch.Tensor, attn_c: torch.Tensor, cfg: RCSConfig) -> torch.Tensor:
    """Mix the base attention with the averaged intermediate attention.

    Args:
        attn: ``(B, H, T, T)`` post-softmax attention of the base method.
        attn_c: ``(B, H, T, T)`` mean q-k attention of the RCS layers.

    Returns:
        ``(B, H, T, T)`` ``tau * ((1 - lam) * attn + lam * attn_c)``.
    """
    # one output buffer and one temporary; the same three roundings as the expression above
    out = torch.mul(attn, 1.0 - cfg.lam)
    out += torch.mul(attn_c, cfg.lam)
    return out.mul_(cfg.tau)
