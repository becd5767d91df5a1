"""Vanilla CLIP: softmax(q k^T / sqrt(d)) with residual and MLP kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import scaled_scores
from .base import BaseAttention, register_method


@dataclass(frozen=True)
class ClipAttention(BaseAttention):
    def score_terms(self, q: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
        return [scaled_scores(q, k)]


@register_method("clip")
def clip_method() -> BaseAttention:
    return ClipAttention(
        "clip", keep_residual=True, description="vanilla CLIP (q-k attention, residual kept)"
    )
