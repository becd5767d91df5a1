"""SFP (Jin et al., ICCV 2025, "Feature Purification Matters"): SC-CLIP's family with another
outlier detector and two different last-block attentions.

Differences from :mod:`~resclip.methods.sc_clip`: outliers are the patches the CLS token attends
to more than to themselves in the penultimate block (SOM: head-averaged attention, CLS row
scaled by ``res_cls * res_scale`` = 1.5, at most 10 by descending CLS attention); an outlier
without a valid neighbour becomes zero; the main pass attends with
``(softmax(q q^T s) + softmax(k k^T s) + softmax(S')) / 3``, ``S'`` the similarity prior of the
*thresholded* mid-level similarity; the multi-level pass is value-only (``softmax(S') v``).
The release scales the CLS row of every block's returned attention in place; only the
penultimate block's map is read afterwards, so scaling it inside SOM is the same computation.
RCS and SFR act on the main pass's q-q / k-k attention (the value-only pass has no q or k).
The release maps flat indices to ``(idx // h, idx % h)`` (square grids only); we use
``(idx // w, idx % w)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..vit import last_block_output, last_block_qkv, num_blocks, project_tokens
from .base import BaseAttention, StageContext, register_method
from .calibration import (
    aggregate,
    cosine_similarity,
    neighbour_mean,
    salient_outliers,
    similarity_prior,
    threshold,
)
from .sc_clip import SCBlocks


@dataclass(frozen=True)
class SFP(BaseAttention):
    """SFP's last stage; the constants are the release's (``method_constants``)."""

    beta: float = 0.4
    res_cls: float = 0.3
    cls_scale: float = 1.5  # res_cls * res_scale
    som_topk: int = 10
    prior_temperature: float = 3.0

    replaces_last_block = True

    def trunk_blocks(self, num_blocks: int) -> tuple[int, ...]:
        ix = SCBlocks.for_depth(num_blocks)
        return tuple(sorted({ix.pre_adjust, ix.post_adjust, *ix.multi}))

    def trunk_attentions(self, num_blocks: int) -> tuple[int, ...]:
        return (SCBlocks.for_depth(num_blocks).anomaly,)

    def attend(self, ctx: StageContext, y: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """Main pass: ``out_proj(W v)``, ``W = (softmax(qq) + softmax(kk) + prior) / 3`` on ``ln_1(y)``."""
        block = ctx.visual.transformer.resblocks[-1]
        q, k, v = last_block_qkv(block, y)
        heads = slice(None)
        qq, kk = self.score_terms(q, k)
        attn = torch.softmax(ctx.mix_scores(qq, heads), dim=-1)
        attn = attn + torch.softmax(ctx.mix_scores(kk, heads), dim=-1)
        attn = ctx.mix_attention((attn + prior) / 3, heads)
        return last_block_output(block, y, torch.matmul(attn.to(v.dtype), v), keep_residual=False)

    def attend_values(self, ctx: StageContext, y: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """Value-only pass: ``out_proj(prior v)`` on ``ln_1(y)``."""
        block = ctx.visual.transformer.resblocks[-1]
        _, _, v = last_block_qkv(block, y)
        return last_block_output(block, y, torch.matmul(prior.to(v.dtype), v), keep_residual=False)

    def last_stage(self, ctx: StageContext) -> torch.Tensor:
        trunk = ctx.trunk
        ix = SCBlocks.for_depth(num_blocks(ctx.visual))
        f_last = trunk.x
        outliers, c2p, own = salient_outliers(trunk.attn[ix.anomaly], self.cls_scale, self.som_topk)
        fixed = neighbour_mean(f_last[:, 1:], outliers, trunk.grid, empty="zero")
        fixed_pre = neighbour_mean(trunk.blocks[ix.pre_adjust][:, 1:], outliers, trunk.grid, empty="zero")
        pre_sim = threshold(cosine_similarity(fixed_pre), self.beta)
        post_sim = threshold(cosine_similarity(trunk.blocks[ix.post_adjust][:, 1:]), self.beta)
        prior = torch.softmax(similarity_prior(pre_sim, self.prior_temperature), dim=-1)[:, None]

        agg_pre = aggregate(pre_sim, fixed)
        b1_attn = self.attend(ctx, agg_pre, prior)
        b1_out = aggregate(post_sim, b1_attn + self.res_cls * f_last[:, :1])
        multi = torch.stack([trunk.blocks[i] for i in ix.multi]).sum(0)
        b2_attn = self.attend_values(ctx, multi[:, 1:], prior)
        b2_out = aggregate(post_sim, b2_attn + self.res_cls * multi[:, :1])
        if ctx.trace is not None:
            ctx.trace.update(
                outliers=outliers, som_cls_to_patch=c2p, som_patch_self=own, repaired_last=fixed,
                pre_sim=pre_sim, post_sim=post_sim, agg_pre=agg_pre, branch1_attn=b1_attn,
                branch1_out=b1_out, branch2_attn=b2_attn, branch2_out=b2_out, multilevel_sum=multi,
            )
        return project_tokens(ctx.visual, b1_out + b2_out)


register_method(
    SFP(
        "sfp",
        keep_residual=False,
        pairs=("qq", "kk"),
        description="SFP: attention-salient tokens repaired, q-q + k-k + similarity-prior attention",
        title="SFP",
    )
)
