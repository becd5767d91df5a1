"""NACLIP: softmax(k k^T s + Ω) with a Gaussian neighbourhood prior Ω, residual dropped."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import gaussian_bias
from .base import BaseAttention, register_method


@dataclass(frozen=True)
class NaclipAttention(BaseAttention):
    """k-k scores plus NACLIP's prior ``Ω`` (a 2-D Gaussian of the patch distance)."""

    gaussian_std: float = 5.0

    def score_bias(self, h: int, w: int, device: torch.device) -> torch.Tensor | None:
        return gaussian_bias(h, w, self.gaussian_std, device)


NACLIP = NaclipAttention("naclip", keep_residual=False, pairs=("kk",),
                         description="NACLIP (k-k attention + Gaussian prior, no residual)", title="NACLIP")
register_method(NACLIP)
