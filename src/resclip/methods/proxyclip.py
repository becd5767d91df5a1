"""ProxyCLIP (Lan et al., ECCV 2024, "ProxyCLIP: Proxy Attention Improves CLIP for Open-Vocabulary
Segmentation"): the last CLIP block attends with a vision foundation model's patch correspondence.

For a window of ``Hc x Wc`` pixels (the release pads windows to multiples of 56 first:
``Protocol.window_multiple``), with CLIP's patch grid ``h x w`` and the VFM's grid ``h' x w'``
(``M = h' w'`` tokens):

* the VFM (DINO ViT-B/8 by default, ``StageContext.aux["dino"]``) sees the window re-normalised
  with ImageNet statistics; its last block's patch tokens after the final LayerNorm are
  ``x`` ``(M, C')`` (:func:`resclip.auxiliary.dino_tokens`); with ``vfm="sam"`` the window, resized to
  1024 x 1024, goes through SAM's image encoder (:func:`resclip.auxiliary.sam_tokens`, ``64 x 64`` grid);
* proxy scores ``S = gamma * (x̂ x̂^T - beta * mean(x̂ x̂^T))`` with ``x̂`` the L2-normalised tokens
  and the mean over all ``M x M`` entries of the window; entries below 0 are masked (``-inf``);
  the proxy attention ``A = softmax(S)`` over keys is the same for every head;
* CLIP's last block: ``v`` from ``ln_1`` of its input, the patch part of every head resized
  bilinearly from ``h x w`` to ``h' x w'``; tokens ``proj(ln_post(out_proj(A v)))`` (no residual,
  no MLP, no CLS), on the VFM grid (``StageContext.out_grid``).

Release vs paper: the two agree, so there is no fidelity switch (the paper's normalisation is over
one image's similarity matrix; the release takes the mean over its batch, which is one window).
Two release behaviours are not reproduced. A window whose mean similarity times ``beta`` exceeds 1
has every score below 0 (the diagonal is 1): the release's softmax then gives NaN for the whole
window, and its mask says class 0 wherever that window reaches; here each token of such a row
attends to itself (identical wherever the release is finite). On a non-square window the release
reshapes the VFM tokens into an ``(Hc/p) x (Hc/p)`` grid, mixing tokens and channels (it happens
only when a padded window is not square: images thinner than the crop); here the grid is
``(Hc // p, Wc // p)`` for any window.

With RCS and SFR: both act on the CLIP grid, so they compose only when the VFM's patch equals
CLIP's (e.g. DINO ViT-B/16 with CLIP ViT-B/16; the engine refuses other pairs). SFR mixes the
masked proxy scores (``-inf`` stays ``-inf``: SFR reweights within the proxy's support), RCS the
proxy attention of each head.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..attention import layer_norm, merge_heads
from ..auxiliary import aux_patch_size, dino_tokens, imagenet_input, mae_tokens, sam_tokens
from ..vit import project_tokens
from .base import BaseAttention, StageContext, register_method

VFMS = ("dino", "sam", "mae")


def proxy_scores(tokens: torch.Tensor, beta: float, gamma: float, per_window: bool = True) -> torch.Tensor:
    """Normalised, masked proxy scores.

    Args:
        tokens: ``(B, M, C')`` VFM patch tokens.
        per_window: the mean of each window over its ``M x M`` entries (ProxyCLIP); False: one mean
            over all ``B M M`` entries (Trident, whose ``B`` windows are the sub-images of one image).

    Returns:
        ``(B, M, M)`` float32 ``gamma * (cos - beta * mean(cos))``, negative entries ``-inf``; a row
        without any entry >= 0 keeps 0 on its diagonal (see the module docstring).
    """
    x = F.normalize(tokens.float(), dim=-1)
    sim = torch.bmm(x, x.transpose(1, 2))
    mean = sim.mean(dim=(1, 2), keepdim=True) if per_window else torch.mean(sim)
    scores = (sim - mean * beta) * gamma
    dead = scores.amax(dim=-1) < 0  # (B, M): the release's softmax would give NaN there
    scores = scores.masked_fill_(scores < 0.0, float("-inf"))
    if bool(dead.any()):
        b, m = torch.nonzero(dead, as_tuple=True)
        scores[b, m, m] = 0.0
    return scores


def resize_values(values: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """The patch values on another grid.

    Args:
        values: ``(B, h*w, C)`` patch values of the last block, heads merged (``C = H*d``).
        grid: ``(h, w)``; size: ``(h', w')``.

    Returns:
        ``(B, h'*w', C)``: bilinear (``align_corners=False``) per channel, so resizing the merged
        channels equals resizing each head's (the release's form); the same tensor when the grids
        are equal.
    """
    if tuple(size) == tuple(grid):
        return values
    b, _, c = values.shape
    planes = values.transpose(1, 2).reshape(b, c, *grid)
    planes = F.interpolate(planes, size=size, mode="bilinear", align_corners=False)
    return planes.flatten(2).transpose(1, 2)


def attend_shared(attn: torch.Tensor, values: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention applied to the merged values: ``(B, M, H*d)``.

    Args:
        attn: ``(B, 1, M, M)`` one map for every head, or ``(B, H, M, M)`` one per head (RCS).
        values: ``(B, M, H*d)`` merged heads.
    """
    if attn.shape[1] == 1:
        # one map for all heads: one (M, M) @ (M, H*d) product, never the (B, H, M, M) expansion
        return torch.bmm(attn[:, 0].to(values.dtype), values)
    b, m, c = values.shape
    per_head = values.view(b, m, heads, c // heads).transpose(1, 2)
    return merge_heads(torch.matmul(attn.to(values.dtype), per_head))


@dataclass(frozen=True)
class ProxyCLIP(BaseAttention):
    """ProxyCLIP's proxy-attention last stage (the release's defaults).

    Attributes:
        beta: shift of the similarity mean in the normalisation.
        gamma: scale of the normalised similarities.
        vfm: the auxiliary model kind whose correspondence is the proxy: ``"dino"`` (the release's
            default, DINO ViT-B/8; a DINOv2 file is the release's ``dinov2`` proxy,
            ``dinov2_vitb14_reg``), ``"sam"`` (SAM ViT-B's image encoder on the window resized to
            1024 x 1024, a 64 x 64 grid) or ``"mae"`` (an MAE ViT-B/16 encoder on the window resized
            to ``mae_input`` squared).
        mae_input: the side MAE sees; None (default): the protocol's ``slide_crop``, as the release
            builds MAE at its crop and resizes every window to it (whole-image inference: each image
            at its own size).
    """

    beta: float = 1.2
    gamma: float = 3.0
    vfm: str = "dino"
    mae_input: int | None = None

    replaces_last_block = True
    aux_models: ClassVar[tuple[str, ...]] = ("dino",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vfm not in VFMS:
            raise ValueError(f"proxyclip vfm must be one of {VFMS}, got {self.vfm!r}")
        if self.mae_input is not None and (not isinstance(self.mae_input, int) or self.mae_input < 1):
            raise ValueError(f"proxyclip mae_input must be a positive integer or None, got "
                             f"{self.mae_input!r}")

    @property
    def has_scores(self) -> bool:
        """The proxy scores are pre-softmax scores (SFR can mix them)."""
        return True

    def required_aux(self) -> tuple[str, ...]:
        return (self.vfm,)

    def for_protocol(self, protocol: Any) -> BaseAttention:
        if self.mae_input is None and protocol.slide_crop > 0:
            return replace(self, mae_input=int(protocol.slide_crop))
        return self

    def out_patch(self, clip_patch: int, aux: Mapping[str, Any]) -> int | None:
        if self.vfm in ("sam", "mae"):
            return None  # SAM's 64 x 64 grid / MAE's mae_input grid, whatever the window
        model = aux.get(self.vfm)
        return aux_patch_size(model) if model is not None else clip_patch

    def vfm_scores(self, ctx: StageContext) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(B, M, M)`` proxy scores of the windows and the VFM grid, computed once per engine call
        (kept in ``ctx.memo`` for SFR's second pass)."""
        key = f"proxyclip|{self.vfm}|{self.beta}|{self.gamma}|{self.mae_input}"
        if key not in ctx.memo:
            if ctx.crops is None:
                raise ValueError("proxyclip needs the window images (StageContext.crops)")
            images = imagenet_input(ctx.crops)
            model = ctx.aux[self.vfm]
            if self.vfm == "sam":
                tokens, grid = sam_tokens(model, images)
            elif self.vfm == "mae":
                tokens, grid = mae_tokens(model, images, self.mae_input)
            else:
                tokens, grid = dino_tokens(model, images, ctx.explicit)
            if ctx.trace is not None:
                ctx.trace["vfm_tokens"] = tokens
            ctx.memo[key] = (proxy_scores(tokens, self.beta, self.gamma), grid)
        scores, grid = ctx.memo[key]
        return scores, grid

    def last_stage(self, ctx: StageContext) -> torch.Tensor:
        scores, grid = self.vfm_scores(ctx)
        heads = slice(None)
        attn = torch.softmax(ctx.mix_scores(scores[:, None], heads), dim=-1)  # (B, 1, M, M)
        attn = ctx.mix_attention(attn, heads)
        block = ctx.visual.transformer.resblocks[-1]
        x = ctx.trunk.x
        mod = block.attn
        qkv = F.linear(layer_norm(x, block.ln_1), mod.in_proj_weight, mod.in_proj_bias)
        values = resize_values(qkv[:, 1:, 2 * x.shape[-1]:], ctx.trunk.grid, grid)  # v of the patches
        out = attend_shared(attn, values, mod.num_heads)
        y = F.linear(out, mod.out_proj.weight, mod.out_proj.bias)
        ctx.out_grid = grid
        if ctx.trace is not None:
            ctx.trace.update(proxy_scores=scores, proxy_attn=attn, values=values, attn_out=y)
        return project_tokens(ctx.visual, y)


register_method(
    ProxyCLIP(
        "proxyclip",
        keep_residual=False,
        description="ProxyCLIP: the last block attends with DINO's patch correspondence "
        "(needs --aux-pretrained dino=...)",
        title="ProxyCLIP",
    )
)
register_method(
    ProxyCLIP(
        "proxyclip_sam",
        keep_residual=False,
        vfm="sam",
        description="ProxyCLIP with SAM's image-encoder correspondence as the proxy "
        "(needs --aux-pretrained sam=...)",
        title="ProxyCLIP (SAM)",
    )
)
register_method(
    ProxyCLIP(
        "proxyclip_mae",
        keep_residual=False,
        vfm="mae",
        description="ProxyCLIP with an MAE encoder's correspondence as the proxy "
        "(needs --aux-pretrained mae=...)",
        title="ProxyCLIP (MAE)",
    )
)
