"""SCLIP's correlative self-attention: softmax(q q^T s) + softmax(k k^T s), residual kept."""

from .base import BaseAttention, register_method

SCLIP = BaseAttention("sclip", keep_residual=True, pairs=("qq", "kk"),
                      description="SCLIP (q-q + k-k attention, residual kept)", title="SCLIP")
register_method(SCLIP)
