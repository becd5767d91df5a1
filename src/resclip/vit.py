"""Dense forward over the parameters of a CLIP ViT visual tower.

Only the stable parameter names shared by OpenAI checkpoints and open_clip are read
(``conv1, class_embedding, positional_embedding, ln_pre, transformer.resblocks[i].{ln_1,
attn.in_proj_*, attn.out_proj, ln_2, mlp, ls_1?, ls_2?}, ln_post, proj``), so open_clip's own
attention modules are never called. Blocks 1..L-1 use fused attention, except the blocks whose
q-k attention RCS needs: there the attention is formed explicitly and averaged on the fly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .attention import interpolate_pos_embed, layer_norm, merge_heads, project_qkv, scaled_scores

# A ViT visual tower or one of its blocks, read by attribute name (duck-typed: open_clip's modules and
# any module with the same parameter names work).
Tower = Any
Block = Any


@dataclass
class TrunkOutput:
    """Output of blocks 1..L-1.

    Attributes:
        x: ``(B, T, C)`` residual stream entering the last block.
        grid: patch grid ``(h, w)``.
        rcs_attn: ``(B, H, T, T)`` float32 mean q-k attention of the requested blocks, or None.
        blocks: ``{i: (B, T, C)}`` outputs of the 0-based blocks a method asked to keep
            (:meth:`~resclip.methods.BaseAttention.trunk_blocks`); empty otherwise.
        attn: ``{i: (B, H, T, T)}`` float32 q-k attention maps of the blocks a method asked for
            (:meth:`~resclip.methods.BaseAttention.trunk_attentions`); empty otherwise.
    """

    x: torch.Tensor
    grid: tuple[int, int]
    rcs_attn: torch.Tensor | None
    blocks: dict[int, torch.Tensor] = field(default_factory=dict)
    attn: dict[int, torch.Tensor] = field(default_factory=dict)


def num_blocks(visual: Tower) -> int:
    """Number of transformer blocks of a visual tower."""
    return len(visual.transformer.resblocks)


def patch_size(visual: Tower) -> int:
    """Patch size (stride of the patch embedding)."""
    return int(visual.conv1.weight.shape[-1])


def embed_patches(visual: Tower, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch embedding, CLS token, positional embedding and ``ln_pre``.

    Args:
        images: ``(B, 3, H, W)`` normalised images; trailing pixels that do not fill a patch are
            dropped by the strided convolution.

    Returns:
        ``(B, T, C)`` tokens and the grid ``(h, w)``.
    """
    weight = visual.conv1.weight
    x = F.conv2d(images.to(weight.dtype), weight, stride=patch_size(visual))
    b, c, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, c).expand(b, 1, c)
    x = torch.cat([cls, x], dim=1)
    x = x + interpolate_pos_embed(visual.positional_embedding, h, w).to(x.dtype)
    return layer_norm(x, visual.ln_pre), (h, w)


def _mlp_residual(block: Block, x: torch.Tensor) -> torch.Tensor:
    ls_2 = getattr(block, "ls_2", None)
    y = block.mlp(layer_norm(x, block.ln_2))
    return x + (ls_2(y) if ls_2 is not None else y)


def _attn_out(block: Block, attn_out: torch.Tensor) -> torch.Tensor:
    """``out_proj`` of merged heads; ``attn_out`` is ``(B, H, T, d)``."""
    proj = block.attn.out_proj
    return F.linear(merge_heads(attn_out), proj.weight, proj.bias)


def head_chunks(b: int, h: int, t: int, budget: int = 1 << 22) -> list[slice]:
    """Split ``h`` heads into near-equal groups whose ``(b, heads, t, t)`` maps hold at most
    ``budget`` elements (at least one head per group), so that only one group's attention maps
    are alive at a time.
    """
    per = max(1, budget // max(1, b * t * t))
    groups = -(-h // per)
    size = -(-h // groups)
    return [slice(start, min(h, start + size)) for start in range(0, h, size)]


def attend_by_head_groups(
    v: torch.Tensor, form: Callable[[slice], torch.Tensor], keep: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply an explicit attention to ``v`` a group of heads at a time (see :func:`head_chunks`).

    Args:
        v: ``(B, H, T, d)`` values.
        form: ``form(heads)`` returns the ``(B, h, T, T)`` float32 attention of the heads in the
            slice ``heads``.
        keep: also return the whole ``(B, H, T, T)`` attention.

    Returns:
        ``(B, H, T, d)`` attention times values, and the attention if ``keep``.
    """
    b, h, t, _ = v.shape
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    kept = torch.empty(b, h, t, t, device=v.device) if keep else None
    for hs in head_chunks(b, h, t):
        attn = form(hs)
        out[:, hs] = torch.matmul(attn.to(v.dtype), v[:, hs])
        if kept is not None:
            kept[:, hs] = attn
    return out, kept


def run_block(
    block: Block,
    x: torch.Tensor,
    keep_attn: bool = False,
    *,
    explicit: bool = False,
    attn_sum: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One unchanged pre-LN transformer block.

    Args:
        x: ``(B, T, C)``.
        keep_attn: form the attention explicitly and return it.
        explicit: form the attention explicitly (``softmax(q k^T s) @ v``) without returning it.
        attn_sum: ``(B, H, T, T)`` float32 to which this block's attention is added in place.

    An explicit attention is formed a group of heads at a time (see :func:`head_chunks`); otherwise
    the block uses fused attention.

    Returns:
        ``(B, T, C)`` output and, if ``keep_attn``, the ``(B, H, T, T)`` float32 attention.
    """
    attn_mod = block.attn
    q, k, v = project_qkv(
        layer_norm(x, block.ln_1), attn_mod.in_proj_weight, attn_mod.in_proj_bias, attn_mod.num_heads
    )
    kept = None
    if keep_attn or explicit or attn_sum is not None:

        def form(hs: slice) -> torch.Tensor:
            attn = torch.softmax(scaled_scores(q[:, hs], k[:, hs]), dim=-1)
            if attn_sum is not None:
                attn_sum[:, hs] += attn
            return attn

        out, kept = attend_by_head_groups(v, form, keep_attn)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    y = _attn_out(block, out)
    ls_1 = getattr(block, "ls_1", None)
    x = x + (ls_1(y) if ls_1 is not None else y)
    return _mlp_residual(block, x), kept


def block_attentions(visual: Tower, images: torch.Tensor, blocks: Sequence[int]) -> dict[int, torch.Tensor]:
    """The plain q-k attention ``softmax(q k^T / sqrt(d))`` of unchanged blocks (what RCS averages).

    Args:
        images: ``(B, 3, H, W)`` normalised images.
        blocks: 1-based block numbers.

    Returns:
        ``{block: (B, H, T, T) float32}`` for each requested block.
    """
    x, _ = embed_patches(visual, images)
    maps = {}
    for number, block in enumerate(visual.transformer.resblocks[: max(blocks)], start=1):
        x, attn = run_block(block, x, keep_attn=number in blocks)
        if attn is not None:
            maps[number] = attn
    return maps


def encode_trunk(
    visual: Tower,
    images: torch.Tensor,
    rcs_layers: tuple[int, ...] = (),
    explicit: bool = True,
    keep_blocks: tuple[int, ...] = (),
    keep_attn: tuple[int, ...] = (),
) -> TrunkOutput:
    """Run blocks 1..L-1 (0-based ``0..L-2``), averaging the attention of ``rcs_layers``.

    Args:
        images: ``(B, 3, H, W)`` normalised images.
        rcs_layers: 0-based indices of blocks whose q-k attention is averaged (each < L-1).
        explicit: form every block's attention explicitly (``softmax(q k^T s) @ v``, the released
            ResCLIP code's arithmetic, parity to ~1e-7); False uses fused attention where RCS does
            not need the map (faster, ~1e-5 token differences).
        keep_blocks: 0-based indices (each < L-1) of blocks whose outputs are kept in
            ``TrunkOutput.blocks``.
        keep_attn: 0-based indices (each < L-1) of blocks whose attention maps are kept in
            ``TrunkOutput.attn`` (formed explicitly).
    """
    x, grid = embed_patches(visual, images)
    kept: dict[int, torch.Tensor] = {}
    maps: dict[int, torch.Tensor] = {}
    blocks = visual.transformer.resblocks
    total: torch.Tensor | None = None
    for i in range(len(blocks) - 1):
        if i in rcs_layers and total is None:
            b, t = x.shape[:2]
            total = torch.zeros(b, blocks[i].attn.num_heads, t, t, device=x.device)
        x, attn = run_block(blocks[i], x, i in keep_attn, explicit=explicit,
                            attn_sum=total if i in rcs_layers else None)
        if attn is not None:
            maps[i] = attn
        if i in keep_blocks:
            kept[i] = x
    mean = total / len(rcs_layers) if total is not None else None
    return TrunkOutput(x=x, grid=grid, rcs_attn=mean, blocks=kept, attn=maps)


def last_block_output(
    block: Block, x: torch.Tensor, attn_v: torch.Tensor, keep_residual: bool
) -> torch.Tensor:
    """Finish the last block from its attention-weighted values.

    Args:
        x: ``(B, T, C)`` block input; attn_v: ``(B, H, T, d)`` attention times values.
        keep_residual: add ``x`` and run the MLP branch (else ``out_proj(A v)`` alone).
    """
    y = _attn_out(block, attn_v)
    if not keep_residual:
        return y
    return _mlp_residual(block, x + y)


def last_block_qkv(block: Block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``(B, H, T, d)`` of the last block for input ``x`` ``(B, T, C)``."""
    attn_mod = block.attn
    return project_qkv(
        layer_norm(x, block.ln_1), attn_mod.in_proj_weight, attn_mod.in_proj_bias, attn_mod.num_heads
    )


def project_tokens(visual: Tower, y: torch.Tensor) -> torch.Tensor:
    """``ln_post`` on all tokens, then the output projection: ``(B, T, C)`` -> ``(B, T, D)``."""
    y = layer_norm(y, visual.ln_post)
    return y @ visual.proj.to(y.dtype)
