"""SC-CLIP (Bai et al., "Self-Calibrated CLIP for Training-Free Open-Vocabulary Segmentation").

Stages: the trunk keeps the outputs of a few blocks; the last block is replaced by a stage that
finds anomalous tokens of the penultimate block's output (LOF), repairs them from their
neighbours, aggregates tokens with thresholded mid-level similarities, runs the last block's
projections with a k-k + similarity-prior attention, and fuses a multi-level pass. Block
numbers are the release's ViT-B ones (0-based, 12 blocks); deeper or shallower towers keep the
early indices and count the late ones from the end (our choice; the release has ViT-B only).

Release quirks (field: official / paper): ``lof_reach`` ``"own"`` (reach-distance with the point's
own k-distance) / ``"neighbour"`` (standard LOF); ``lof_distance`` ``"squared"`` / ``"euclidean"``.
The release maps a flat outlier index to ``(idx // h, idx % h)``, which is right on square grids
only (it raises on others); we use ``(idx // w, idx % w)`` for every grid, identical on square ones.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..vit import last_block_output, last_block_qkv, num_blocks, project_tokens
from .base import BaseAttention, StageContext, register_method
from .calibration import (
    aggregate,
    cosine_similarity,
    lof_scores,
    neighbour_mean,
    similarity_prior,
    threshold,
    top_quantile,
)


@dataclass(frozen=True)
class SCBlocks:
    """0-based block indices SC-CLIP reads, for a tower of some depth."""

    anomaly: int  # penultimate block: LOF and the main path's tokens
    pre_adjust: int  # repaired, its similarity steers the first aggregation and the prior
    post_adjust: int  # its similarity aggregates both paths' outputs
    multi: tuple[int, ...]  # summed for the multi-level pass

    @classmethod
    def for_depth(cls, depth: int) -> SCBlocks:
        if depth < 3:
            raise ValueError(f"sc_clip needs a ViT with at least 3 blocks, got {depth}")
        last = depth - 2
        post = min(3, last - 1) if last > 0 else 0
        return cls(anomaly=last, pre_adjust=max(0, depth - 4), post_adjust=post,
                   multi=tuple(range(post, last)) or (post,))


@dataclass(frozen=True)
class SCCLIP(BaseAttention):
    """SC-CLIP's last stage; the constants are the release's (``method_constants``)."""

    beta: float = 0.4  # similarity threshold
    res_cls: float = 0.3  # weight of the CLS token added to every patch
    lof_neighbours: int = 30
    contamination: float = 0.05
    prior_temperature: float = 3.0
    lof_reach: str = "own"  # official "own", paper "neighbour"
    lof_distance: str = "squared"  # official "squared", paper "euclidean"

    replaces_last_block = True

    def trunk_blocks(self, num_blocks: int) -> tuple[int, ...]:
        ix = SCBlocks.for_depth(num_blocks)
        return tuple(sorted({ix.pre_adjust, ix.post_adjust, *ix.multi}))

    def for_fidelity(self, fidelity: str) -> BaseAttention:
        if fidelity == "paper":
            return replace(self, lof_reach="neighbour", lof_distance="euclidean")
        return replace(self, lof_reach="own", lof_distance="squared")

    def attend(
        self, ctx: StageContext, y: torch.Tensor, prior: torch.Tensor
    ) -> torch.Tensor:
        """Last-block projections on ``ln_1(y)``: ``out_proj(W v)`` with
        ``W = (softmax(prior) + softmax(k k^T / sqrt(d))) / 2``; ``y`` is ``(B, N, C)``."""
        block = ctx.visual.transformer.resblocks[-1]
        q, k, v = last_block_qkv(block, y)
        heads = slice(None)
        scores = ctx.mix_scores(self.score_terms(q, k)[0], heads)
        attn = torch.softmax(scores, dim=-1) + prior
        attn = ctx.mix_attention(attn * 0.5, heads)
        return last_block_output(block, y, torch.matmul(attn.to(v.dtype), v), keep_residual=False)

    def last_stage(self, ctx: StageContext) -> torch.Tensor:
        trunk = ctx.trunk
        ix = SCBlocks.for_depth(num_blocks(ctx.visual))
        f_last = trunk.x
        feats = f_last[:, 1:]
        scores = lof_scores(feats, self.lof_neighbours, self.lof_distance, self.lof_reach)
        outliers = top_quantile(scores, self.contamination)
        fixed = neighbour_mean(feats, outliers, trunk.grid)
        fixed_pre = neighbour_mean(trunk.blocks[ix.pre_adjust][:, 1:], outliers, trunk.grid)
        sim_pre = cosine_similarity(fixed_pre)
        sim_post = threshold(cosine_similarity(trunk.blocks[ix.post_adjust][:, 1:]), self.beta)
        prior = torch.softmax(similarity_prior(sim_pre, self.prior_temperature), dim=-1)[:, None]

        agg1 = aggregate(threshold(sim_pre, self.beta), fixed)
        attn1 = self.attend(ctx, agg1, prior)
        agg2 = aggregate(sim_post, attn1 + self.res_cls * f_last[:, :1])

        multi = trunk.blocks[ix.multi[0]]
        for i in ix.multi[1:]:
            multi = multi + trunk.blocks[i]
        attn2 = self.attend(ctx, multi[:, 1:], prior)
        agg3 = aggregate(sim_post, attn2 + self.res_cls * multi[:, :1])
        pre_ln_post = agg2 + agg3
        if ctx.trace is not None:
            ctx.trace.update(
                lof_scores=scores, outliers=outliers, repaired_last=fixed, repaired_pre=fixed_pre,
                mid_simi=sim_pre, after_simi=sim_post, agg1=agg1, attn1=attn1, agg2=agg2, attn2=attn2,
                agg3=agg3, multilevel_sum=multi, pre_ln_post=pre_ln_post,
            )
        return project_tokens(ctx.visual, pre_ln_post)


register_method(
    SCCLIP(
        "sc_clip",
        keep_residual=False,
        pairs=("kk",),
        description="SC-CLIP: LOF-repaired tokens, similarity-prior k-k attention, multi-level fusion",
        title="SC-CLIP",
    )
)
