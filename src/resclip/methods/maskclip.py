"""MaskCLIP (as implemented in the ClearCLIP repository): identity attention, residual dropped.

The last block's output is ``out_proj(v)``: each token keeps its own value. There are no attention
scores (``has_scores`` is False), so SFR (which edits scores) cannot act on it; RCS mixes with the
identity.
"""

from .base import BaseAttention, register_method

MASKCLIP = BaseAttention("maskclip", keep_residual=False, pairs=(),
                         description="MaskCLIP (value path, no residual)", title="MaskCLIP")
register_method(MASKCLIP)
