"""ClearCLIP: softmax(q q^T s), residual and MLP dropped."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import scaled_scores
from .base import BaseAttention, register_method


@dataclass(frozen=True)
class ClearClipAttention(BaseAttention):
    def score_terms(self, q: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
        return [scaled_scores(q, q)]


@register_method("clearclip")
def clearclip_method() -> BaseAttention:
    return ClearClipAttention(
        "clearclip", keep_residual=False, description="ClearCLIP (q-q attention, no residual)"
    )
