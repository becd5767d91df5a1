"""CLIPer (Sun et al., ICCV 2025, "CLIPer: Hierarchically Improving Spatial Representation of CLIP
for Open-Vocabulary Semantic Segmentation"): early-layer fusion, without the optional
diffusion-based fine-grained compensation.

Early-layer fusion replaces the last block's attention by one built from the attention maps of all
earlier blocks, and runs the last block's value path (no residual, no MLP) on the features of every
layer:

* ``S = sum_{l < L-1} softmax(q_l k_l^T / sqrt(d))``, ``(B, H, T, T)``, every block but the last;
* the fused attention ``A = fuse(S)`` (:func:`fuse_attention`): ``S`` is divided by its column sums,
  then by its row sums, symmetrised ``(S + S^T) / 2``, centred by subtracting each column's mean,
  clipped at 0 and row-normalised;
* layer feature ``f_l`` is ``ln_1`` of block ``l``'s input for ``l < L-1`` and the raw input of the
  last block for ``l = L-1``; its tokens are ``proj(ln_post(out_proj(A v(ln_1^{last}(f_l)))))``.

The per-layer segmentation maps, their combination and the background handling are the protocol's
(:mod:`resclip.cliper_protocol`). In the engine, whose last stage returns one set of tokens, the
stage returns the tokens of ``select_layer`` (the layer whose map the release thresholds and
propagates); the layer mean needs the embedding layer, which the engine's trunk does not expose.

Release quirks (field: official / paper):

* ``normalise_rounds`` ``"cumulative"`` / ``"single"``: the release normalises the summed map in
  place while it loops over the layer features, so feature ``k`` (0-based) sees ``k + 1`` rounds of
  column-then-row normalisation and the returned map (used for propagation) ``L`` rounds; the paper
  fuses one map for all.
* ``pos_embed_fp16`` ``True`` / ``False``: the release rounds the (bilinearly resized) positional
  embedding to float16 before adding it, even on an fp32 model (used by the protocol's own trunk).
* ``threshold_in_place`` ``True`` / ``False``: the release zeroes the small values of the selected
  layer's map in place, so the thresholded map also enters the mean over layers.

RCS mixes the fused attention's patch-to-patch block; SFR mixes ``log`` of that block and re-normalises
over its support (identity without SFR, and bit-identical with ``lambda = 0``), the block keeps its row
mass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..attention import layer_norm
from ..vit import last_block_output, num_blocks, project_tokens
from .base import BaseAttention, StageContext, register_method

NORMALISE_ROUNDS = ("cumulative", "single")


def normalise_round(s: torch.Tensor) -> torch.Tensor:
    """One round on ``(B, H, T, T)``: divide by the column sums, then by the row sums (new tensor)."""
    s = s / s.sum(dim=-2, keepdim=True)
    return s / s.sum(dim=-1, keepdim=True)


def symmetric_attention(s: torch.Tensor) -> torch.Tensor:
    """From a normalised ``(B, H, T, T)`` map: ``W = relu(M - mean_i M[i, :])`` row-normalised, where
    ``M = (s + s^T) / 2`` (the mean is over each column)."""
    m = (s + s.transpose(-2, -1)) / 2
    m = m - m.mean(dim=-2, keepdim=True)
    m = torch.clamp(m, 0)
    return m / m.sum(dim=-1, keepdim=True)


def fuse_attention(attn_sum: torch.Tensor, rounds: int = 1) -> torch.Tensor:
    """The fused attention ``(B, H, T, T)`` from the summed early-layer maps after ``rounds`` rounds
    of :func:`normalise_round`."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    s = attn_sum
    for _ in range(rounds):
        s = normalise_round(s)
    return symmetric_attention(s)


def fused_attentions(
    attn_sum: torch.Tensor, layers: Sequence[int], depth: int, mode: str
) -> dict[int, torch.Tensor]:
    """Fused attention for each 0-based layer feature in ``layers`` and for ``depth - 1`` (the map the
    release returns): ``{k: (B, H, T, T)}``. ``mode`` is ``normalise_rounds``."""
    if mode not in NORMALISE_ROUNDS:
        raise ValueError(f"normalise_rounds must be one of {NORMALISE_ROUNDS}, got {mode!r}")
    wanted = sorted({*layers, depth - 1})
    if mode == "single":
        one = fuse_attention(attn_sum, 1)
        return dict.fromkeys(wanted, one)
    out = {}
    s = attn_sum
    for k in range(wanted[-1] + 1):
        s = normalise_round(s)
        if k in wanted:
            out[k] = symmetric_attention(s)
    return out


@dataclass(frozen=True)
class CLIPer(BaseAttention):
    """CLIPer's early-layer fusion as a last stage.

    Attributes:
        select_layer: the layer (negative: from the end, ``-1`` = the last block's input) whose map
            the protocol thresholds and propagates, and whose tokens the engine's stage returns.
        normalise_rounds, pos_embed_fp16, threshold_in_place: release quirks (module docstring).

    ``pairs`` (``"qk"``) is never formed: it only tells the engine that the stage has scores for SFR
    to mix (``log P`` of the fused attention, :func:`mix_patch_block`).
    """

    select_layer: int = -1
    normalise_rounds: str = "cumulative"  # official "cumulative", paper "single"
    pos_embed_fp16: bool = True  # official True, paper False
    threshold_in_place: bool = True  # official True, paper False

    replaces_last_block = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.normalise_rounds not in NORMALISE_ROUNDS:
            raise ValueError(
                f"cliper: normalise_rounds must be one of {NORMALISE_ROUNDS}, got {self.normalise_rounds!r}")

    def layer_index(self, depth: int) -> int:
        """0-based index of ``select_layer`` among the ``depth`` layer features."""
        k = self.select_layer + depth if self.select_layer < 0 else self.select_layer
        if not 0 <= k < depth:
            raise ValueError(f"cliper: select_layer {self.select_layer} is outside a {depth}-block tower")
        return k

    def trunk_attentions(self, num_blocks: int) -> tuple[int, ...]:
        return tuple(range(num_blocks - 1))

    def trunk_blocks(self, num_blocks: int) -> tuple[int, ...]:
        k = self.layer_index(num_blocks)
        return (k - 1,) if 0 < k < num_blocks - 1 else ()

    def for_fidelity(self, fidelity: str) -> BaseAttention:
        if fidelity == "paper":
            return replace(self, normalise_rounds="single", pos_embed_fp16=False, threshold_in_place=False)
        return replace(self, normalise_rounds="cumulative", pos_embed_fp16=True, threshold_in_place=True)

    def rounds(self, k: int) -> int:
        """Normalisation rounds of the fused attention that layer feature ``k`` (0-based) uses."""
        return k + 1 if self.normalise_rounds == "cumulative" else 1

    def attend(
        self, ctx: StageContext | None, visual: object, feature: torch.Tensor, attn: torch.Tensor
    ) -> torch.Tensor:
        """Last-block value path on one layer feature: ``out_proj(A v)`` ``(B, T, C)``, no residual.

        Args:
            ctx: the engine's stage context (RCS / SFR mixing), or None (the protocol's path).
            visual: the CLIP visual tower.
            feature: ``(B, T, C)`` layer feature (``ln_1`` of the last block is applied here).
            attn: ``(B, H, T, T)`` fused attention.
        """
        block = visual.transformer.resblocks[-1]  # type: ignore[attr-defined]
        v = last_block_values(block, feature)
        if ctx is not None:
            attn = mix_patch_block(ctx, attn)
        return last_block_output(block, feature, torch.matmul(attn.to(v.dtype), v), keep_residual=False)

    def last_stage(self, ctx: StageContext) -> torch.Tensor:
        trunk = ctx.trunk
        depth = num_blocks(ctx.visual)
        k = self.layer_index(depth)
        if k == 0:
            raise ValueError(
                "cliper: select_layer 0 (the embedding layer) is not available in the engine's trunk")
        attn_sum = trunk.attn[0].clone()
        for i in range(1, depth - 1):
            attn_sum += trunk.attn[i]
        if k == depth - 1:
            feature = trunk.x
        else:
            feature = layer_norm(trunk.blocks[k - 1], ctx.visual.transformer.resblocks[k].ln_1)
        fused = fuse_attention(attn_sum, self.rounds(k))
        out = self.attend(ctx, ctx.visual, feature, fused)
        if ctx.trace is not None:
            ctx.trace.update(attn_sum=attn_sum, fused_attn=fused, layer_feature=feature, attn_out=out)
        return project_tokens(ctx.visual, out)


def last_block_values(block: object, x: torch.Tensor) -> torch.Tensor:
    """The last block's values ``(B, H, T, d)`` for input ``x`` ``(B, T, C)`` (``ln_1``, then the value third
    of the fused input projection only: the fused attention needs no q or k)."""
    attn_mod = block.attn  # type: ignore[attr-defined]
    c = x.shape[-1]
    bias = attn_mod.in_proj_bias[2 * c:] if attn_mod.in_proj_bias is not None else None
    z = layer_norm(x, block.ln_1)  # type: ignore[attr-defined]
    b, t, _ = x.shape
    v = F.linear(z, attn_mod.in_proj_weight[2 * c:], bias)
    return v.view(b, t, attn_mod.num_heads, c // attn_mod.num_heads).transpose(1, 2)


def mix_patch_block(ctx: StageContext, attn: torch.Tensor) -> torch.Tensor:
    """Apply the context's SFR / RCS to the patch-to-patch block ``P`` of ``attn`` ``(B, H, T, T)``.

    SFR mixes the scores ``S = log P`` into ``S'`` and the block becomes ``softmax(S')`` over the
    support of ``P``, rescaled to each row's old mass. It is formed as ``P exp(S' - S - max)``, so that
    ``S' = S`` (SFR with ``lambda = 0, tau = 1``) returns ``P`` bit for bit. RCS mixes the result.
    Without either, ``attn`` itself is returned.
    """
    heads = slice(None)
    block = attn[:, :, 1:, 1:]
    logs = torch.log(block.clamp_min(torch.finfo(block.dtype).tiny))
    mixed = ctx.mix_scores(logs, heads)
    new = block
    if mixed is not logs:
        d = (mixed - logs).masked_fill(block == 0, float("-inf"))
        top = d.amax(dim=-1, keepdim=True)
        w = block * torch.exp(d - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
        mass, total = block.sum(dim=-1, keepdim=True), w.sum(dim=-1, keepdim=True)
        new = w * torch.where(total > 0, mass / total, torch.zeros_like(total))
    rcs = ctx.mix_attention(new, heads)
    if rcs is block:
        return attn
    out = attn.clone()
    out[:, :, 1:, 1:] = rcs
    return out


register_method(
    CLIPer(
        "cliper",
        keep_residual=False,
        pairs=("qk",),
        description="CLIPer: early-layer attention fusion over every layer's features (no diffusion)",
        title="CLIPer",
    )
)
