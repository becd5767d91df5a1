"""SCLIP's correlative self-attention: softmax(q q^T s) + softmax(k k^T s), residual kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import scaled_scores
from .base import BaseAttention, register_method


@dataclass(frozen=True)
class SclipAttention(BaseAttention):
    def score_terms(self, q: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
        return [scaled_scores(q, q), scaled_scores(k, k)]


@register_method("sclip")
def sclip_method() -> BaseAttention:
    return SclipAttention(
        "sclip", keep_residual=True, description="SCLIP (q-q + k-k attention, residual kept)"
    )
