"""Vanilla CLIP: softmax(q k^T / sqrt(d)) with residual and MLP kept."""

from .base import BaseAttention, register_method

CLIP = BaseAttention("clip", keep_residual=True, pairs=("qk",),
                     description="vanilla CLIP (q-k attention, residual kept)", title="CLIP")
register_method(CLIP)
