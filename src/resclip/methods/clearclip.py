"""ClearCLIP: softmax(q q^T s), residual and MLP dropped."""

from .base import BaseAttention, register_method

CLEARCLIP = BaseAttention("clearclip", keep_residual=False, pairs=("qq",),
                          description="ClearCLIP (q-q attention, no residual)", title="ClearCLIP")
register_method(CLEARCLIP)
