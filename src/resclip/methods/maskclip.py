"""MaskCLIP (as implemented in the ClearCLIP repository): identity attention, residual dropped.

The last block's output is ``out_proj(v)``: each token keeps its own value. There are no attention
scores, so SFR (which edits scores) cannot act on it; RCS mixes with the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import BaseAttention, register_method


@dataclass(frozen=True)
class MaskClipAttention(BaseAttention):
    def score_terms(self, q: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
        return []


@register_method("maskclip")
def maskclip_method() -> BaseAttention:
    return MaskClipAttention(
        "maskclip", keep_residual=False, description="MaskCLIP (value path, no residual)"
    )
