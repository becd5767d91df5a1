"""NACLIP: softmax(k k^T s + Ω) with a Gaussian neighbourhood prior Ω, residual dropped."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import gaussian_bias, scaled_scores
from .base import BaseAttention, register_method


@dataclass(frozen=True)
class NaclipAttention(BaseAttention):
    gaussian_std: float = 5.0

    def score_terms(self, q: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
        return [scaled_scores(k, k)]

    def score_bias(self, h: int, w: int, device: torch.device) -> torch.Tensor | None:
        return gaussian_bias(h, w, self.gaussian_std, device)


@register_method("naclip")
def naclip_method() -> BaseAttention:
    return NaclipAttention(
        "naclip", keep_residual=False, description="NACLIP (k-k attention + Gaussian prior, no residual)"
    )
