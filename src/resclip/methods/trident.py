"""Trident (Shi, Dong and Xu, ICCV 2025, "Harnessing Vision Foundation Models for High-Performance,
Training-Free Open Vocabulary Segmentation"): splice-then-segment with CLIP, DINO and SAM.

The whole method works on an image, not on independent windows, so its pipeline lives in
:mod:`resclip.trident` (the sub-images, the splice, SAM's global aggregation, the SAM refinement);
this module holds the method's fields and its two attention-like maps:

* **proxy attention of the sub-images** (ProxyCLIP's, :mod:`resclip.methods.proxyclip`): for the
  ``B`` sub-images of an image, with DINO's L2-normalised patch tokens ``x̂`` ``(B, M, C')``,
  ``S_b = x̂_b x̂_b^T`` and ``A_b = softmax(gamma * (S_b - beta * mean(S)))`` over keys, entries
  below 0 masked; ``mean(S)`` is over the ``B x M x M`` entries of all sub-images at once
  (:func:`image_proxy_scores`; ProxyCLIP's mean is per sub-image);
* **SAM's global affinity**: from the last (global) block of SAM's image encoder, its post-softmax
  attention ``P_h`` and values ``v_h`` of head ``h`` on the ``n = hs * ws`` tokens of the image
  (padding excluded, rows not renormalised), with ``c_h = v̂_h v̂_h^T`` (cosine of the values):
  ``t_m = cos_fac * mean_h mean_j c_h[m, j]`` (if ``refine_neg_cos`` is off, ``t_m < 0`` becomes
  ``neg_fallback``; then ``t_m`` is capped at ``max_thresh``), ``R = mean_h [c_h > t] P_h`` and
  ``W = R / R 1`` (rows sum to 1; the diagonal always survives) (:func:`sam_affinity`).

Inside :class:`resclip.engine.DenseEngine` (a window protocol), the last stage is the sub-image
part alone: the proxy attention over the engine's batch of windows, ``proj(ln_post(out_proj(A v)))``
on DINO's grid, without the splice or SAM (those need the whole image: preset ``trident/<dataset>``).

Release vs paper (field: official / paper): the paper's method section could not be consulted here,
so only the release's evident slips get a paper value: ``mask_prompt_batched`` (in
:class:`resclip.trident.SAMRefineConfig`) ``False`` / ``True``. Release-only choices kept as fields
with the release's values: ``proxy_mean`` ``"image"`` (``"window"``: ProxyCLIP's per-sub-image mean),
``neg_fallback`` 0.6 and ``max_thresh`` 0.9.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..attention import layer_norm
from ..auxiliary import aux_patch_size, dino_tokens, imagenet_input
from ..vit import project_tokens
from .base import BaseAttention, StageContext, register_method
from .proxyclip import attend_shared, proxy_scores, resize_values

PROXY_MEANS = ("image", "window")


def image_proxy_scores(tokens: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Proxy scores with one similarity mean over all the sub-images of an image.

    Args:
        tokens: ``(B, M, C')`` VFM patch tokens of the ``B`` sub-images.

    Returns:
        ``(B, M, M)`` float32 ``gamma * (cos - beta * mean(cos))``, the mean over all ``B M M``
        entries, negative entries ``-inf``; a row without an entry >= 0 keeps 0 on its diagonal (as
        :func:`resclip.methods.proxyclip.proxy_scores`; the release gives NaN there).
    """
    return proxy_scores(tokens, beta, gamma, per_window=False)


def affinity_thresholds(cos: torch.Tensor, cos_fac: float, refine_neg_cos: bool, neg_fallback: float,
                        max_thresh: float) -> torch.Tensor:
    """Per-row thresholds ``t`` of SAM's value cosines.

    Args:
        cos: ``(H, R, n)`` cosine similarities of ``R`` query rows with the ``n`` tokens, per head.

    Returns:
        ``(1, R, 1)`` float32: ``cos_fac`` times the mean over heads, then over keys; negative ones
        replaced by ``neg_fallback`` unless ``refine_neg_cos``; capped at ``max_thresh``.
    """
    t = cos_fac * cos.mean(dim=0, keepdim=True).mean(dim=-1, keepdim=True)
    if not refine_neg_cos:
        t = torch.where(t < 0.0, neg_fallback, t)
    return torch.where(t > max_thresh, max_thresh, t)


def sam_affinity(values: torch.Tensor, attn: torch.Tensor, cos_fac: float, refine_neg_cos: bool = True,
                 neg_fallback: float = 0.6, max_thresh: float = 0.9) -> torch.Tensor:
    """SAM's global affinity ``W`` (the plain form; :func:`resclip.trident.encode_sam` fuses it into the
    encoder's last block, row block by row block).

    Args:
        values: ``(H, n, d)`` the last block's values on the image's tokens.
        attn: ``(H, n, n)`` its post-softmax attention restricted to those tokens (not renormalised).

    Returns:
        ``(n, n)`` float32, rows summing to 1 (see the module docstring).
    """
    v = F.normalize(values.float(), dim=-1)
    cos = torch.matmul(v, v.transpose(-1, -2))
    t = affinity_thresholds(cos, cos_fac, refine_neg_cos, neg_fallback, max_thresh)
    kept = torch.where(cos > t, attn.float(), torch.zeros_like(cos)).mean(dim=0)
    return kept / kept.sum(dim=-1, keepdim=True)


@dataclass(frozen=True)
class Trident(BaseAttention):
    """Trident's method fields (the release's constructor defaults and base config).

    Attributes:
        beta, gamma: proxy-attention normalisation (ProxyCLIP's).
        proxy_mean: ``"image"`` (the similarity mean over all sub-images of an image, release) or
            ``"window"`` (per sub-image, ProxyCLIP).
        cos_fac: factor of the mean value cosine in SAM's per-row threshold (0: keep every token
            with a positive cosine).
        refine_neg_cos: keep negative thresholds (False: replace them by ``neg_fallback``).
        neg_fallback: the threshold that replaces a negative one when ``refine_neg_cos`` is off.
        max_thresh: cap of the threshold.
    """

    beta: float = 1.2
    gamma: float = 3.0
    proxy_mean: str = "image"
    cos_fac: float = 1.2
    refine_neg_cos: bool = True
    neg_fallback: float = 0.6
    max_thresh: float = 0.9

    replaces_last_block = True
    aux_models: ClassVar[tuple[str, ...]] = ("dino", "sam")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.proxy_mean not in PROXY_MEANS:
            raise ValueError(f"trident proxy_mean must be one of {PROXY_MEANS}, got {self.proxy_mean!r}")
        if not 0.0 < self.max_thresh <= 1.0:
            raise ValueError(f"trident max_thresh must be in (0, 1], got {self.max_thresh}")

    @property
    def has_scores(self) -> bool:
        """The proxy scores are pre-softmax scores (SFR can mix them in the window pipeline)."""
        return True

    def proxy_scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, M, M)`` proxy scores of the ``B`` sub-images' VFM tokens ``(B, M, C')``."""
        if self.proxy_mean == "image":
            return image_proxy_scores(tokens, self.beta, self.gamma)
        return proxy_scores(tokens, self.beta, self.gamma)

    def affinity(self, values: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """:func:`sam_affinity` with this method's fields: ``(n, n)``."""
        return sam_affinity(values, attn, self.cos_fac, self.refine_neg_cos, self.neg_fallback,
                            self.max_thresh)

    def out_patch(self, clip_patch: int, aux: Mapping[str, Any]) -> int | None:
        model = aux.get("dino")
        return aux_patch_size(model) if model is not None else clip_patch

    def sub_image_outputs(self, visual: object, trunk_x: torch.Tensor, grid: tuple[int, int],
                          vfm: torch.Tensor, vfm_grid: tuple[int, int],
                          mix: StageContext | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The last CLIP block of every sub-image with the proxy attention, before ``ln_post``.

        Args:
            visual: CLIP's visual tower.
            trunk_x: ``(B, T, C)`` input of the last block (CLS first).
            grid: CLIP's patch grid ``(h, w)``.
            vfm: ``(B, M, C')`` DINO tokens; vfm_grid: their grid ``(h', w')``.
            mix: the engine's stage context (SFR / RCS mixing), or None.

        Returns:
            ``(B, M, C)`` ``out_proj(A v)`` on the VFM grid and the ``(B, 1, M, M)`` attention.
        """
        scores = self.proxy_scores(vfm)
        heads = slice(None)
        if mix is not None:
            attn = torch.softmax(mix.mix_scores(scores[:, None], heads), dim=-1)
            attn = mix.mix_attention(attn, heads)
        else:
            attn = torch.softmax(scores[:, None], dim=-1)
        block = visual.transformer.resblocks[-1]  # type: ignore[attr-defined]
        mod = block.attn
        c = trunk_x.shape[-1]
        qkv = F.linear(layer_norm(trunk_x, block.ln_1), mod.in_proj_weight, mod.in_proj_bias)
        values = resize_values(qkv[:, 1:, 2 * c:], grid, vfm_grid)
        out = attend_shared(attn, values, mod.num_heads)
        return F.linear(out, mod.out_proj.weight, mod.out_proj.bias), attn

    def last_stage(self, ctx: StageContext) -> torch.Tensor:
        """The sub-image part of Trident over the engine's batch of windows: ``(B, M, D)`` tokens on
        DINO's grid (``ctx.out_grid``); no splice, no SAM (see the module docstring)."""
        if ctx.crops is None:
            raise ValueError("trident needs the window images (StageContext.crops)")
        key = "trident|dino"
        if key not in ctx.memo:
            ctx.memo[key] = dino_tokens(ctx.aux["dino"], imagenet_input(ctx.crops))
        tokens, vfm_grid = ctx.memo[key]
        y, attn = self.sub_image_outputs(ctx.visual, ctx.trunk.x, ctx.trunk.grid, tokens, vfm_grid, ctx)
        ctx.out_grid = vfm_grid
        if ctx.trace is not None:
            ctx.trace.update(vfm_tokens=tokens, proxy_attn=attn, attn_out=y)
        return project_tokens(ctx.visual, y)


register_method(
    Trident(
        "trident",
        keep_residual=False,
        description="Trident: sub-images with DINO proxy attention, spliced, aggregated by SAM (dino, sam)",
        title="Trident",
    )
)
