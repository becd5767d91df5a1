"""Window-level dense inference: base attention + RCS + SFR on a batch of crops."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .attention import identity_attention
from .methods import BaseAttention
from .rcs import RCSConfig, rcs_mix
from .sfr import SFRConfig, patch_mode, pixel_labels, refinement_scores, sfr_mix
from .vit import (
    Tower,
    attend_by_head_groups,
    encode_trunk,
    last_block_output,
    last_block_qkv,
    num_blocks,
    patch_size,
    project_tokens,
)


def patch_logits(
    tokens: torch.Tensor,
    text: torch.Tensor,
    grid: tuple[int, int],
    first: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cosine similarity of every patch token with every query embedding.

    Args:
        tokens: ``(B, T, D)`` projected tokens, CLS first.
        text: ``(Q, D)`` L2-normalised query embeddings.
        grid: ``(h, w)`` with ``h * w = T - 1``.
        first: ``(Q,)`` from :func:`first_identical_row`: each query takes the logits of the first
            query identical to it, or None when all queries differ.

    Returns:
        ``(B, Q, h, w)`` float32 logits.
    """
    feats = F.normalize(tokens[:, 1:].float(), dim=-1)
    logits = feats @ text.float().t()
    if first is not None:  # identical queries (a synonym in several classes) get bit-identical logits
        logits = logits[..., first]
    b = tokens.shape[0]
    return logits.transpose(1, 2).reshape(b, text.shape[0], *grid)


def first_identical_row(text: torch.Tensor) -> torch.Tensor | None:
    """For each row of ``text``, the index of the first row equal to it; None when all rows differ.

    A matrix product may round one output column differently from an identical one (the kernel's
    blocking depends on the shapes), so argmax ties between identical queries would be broken by
    the batch a window is processed with.
    """
    _, inverse = torch.unique(text, dim=0, return_inverse=True)
    q = text.shape[0]
    if int(inverse.max()) + 1 == q:
        return None
    first = torch.full((q,), q, dtype=torch.int64, device=text.device)
    first = first.scatter_reduce(0, inverse, torch.arange(q, device=text.device), reduce="amin")
    return first[inverse]


class DenseEngine:
    """Runs a CLIP visual tower densely with a base attention and optional RCS / SFR.

    Args:
        visual: an open_clip (or OpenAI-layout) ViT visual tower.
        method: the last block's base attention.
        rcs: RCS settings, or None to disable RCS.
        sfr: SFR settings, or None to disable SFR.
        trunk_attention: ``"explicit"`` (bit-level parity with the released code) or ``"fused"``
            (scaled_dot_product_attention in blocks whose attention map RCS does not need).
    """

    def __init__(
        self,
        visual: Tower,
        method: BaseAttention,
        rcs: RCSConfig | None = None,
        sfr: SFRConfig | None = None,
        trunk_attention: str = "explicit",
    ) -> None:
        if trunk_attention not in ("explicit", "fused"):
            raise ValueError(f"trunk_attention must be 'explicit' or 'fused', got {trunk_attention!r}")
        if sfr is not None and not method.score_terms(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)):
            raise ValueError(
                f"SFR edits attention scores, but method {method.name!r} has none (identity attention); "
                "use sfr=False with it"
            )
        self.visual = visual
        self.method = method
        self.rcs = rcs
        self.sfr = sfr
        self.rcs_layers = rcs.zero_based(num_blocks(visual)) if rcs is not None else ()
        self.patch = patch_size(visual)
        self.explicit = trunk_attention == "explicit"

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        grid: tuple[int, int],
        rcs_attn: torch.Tensor | None,
        refine: torch.Tensor | None,
    ) -> torch.Tensor:
        """Last-block attention ``(B, H, T, T)`` float32.

        Args:
            q, k: ``(B, H, T, d)``.
            rcs_attn: ``(B, H, T, T)`` averaged intermediate attention (RCS), or None.
            refine: ``(B, 1, T, T)`` SFR scores, or None.
        """
        terms = self.method.score_terms(q, k)
        bias = self.method.score_bias(grid[0], grid[1], q.device)
        if not terms:
            b, h, t, _ = q.shape
            attn = identity_attention(b, h, t, q.device)
        else:
            attn = torch.softmax(self._mixed_scores(terms[0], bias, refine), dim=-1)
            for scores in terms[1:]:
                attn += torch.softmax(self._mixed_scores(scores, bias, refine), dim=-1)
        if rcs_attn is not None and self.rcs is not None:
            attn = rcs_mix(attn, rcs_attn, self.rcs)
        return attn

    def _mixed_scores(
        self, scores: torch.Tensor, bias: torch.Tensor | None, refine: torch.Tensor | None
    ) -> torch.Tensor:
        # ``scores`` is a fresh term of this call (score_terms), so the bias is added in place
        if refine is None or self.sfr is None:
            return scores if bias is None else scores.add_(bias)
        if bias is not None and not self.sfr.bias_after_mix:
            scores = scores.add_(bias)
        mixed = sfr_mix(scores, refine, self.sfr)
        if bias is not None and self.sfr.bias_after_mix:
            mixed += bias
        return mixed

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        grid: tuple[int, int],
        rcs_attn: torch.Tensor | None,
        refine: torch.Tensor | None,
        keep: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Last-block attention applied to ``v``, formed a group of heads at a time.

        Args:
            q, k, v: ``(B, H, T, d)``; rcs_attn, refine: as in :meth:`attention`.
            keep: also return the whole ``(B, H, T, T)`` attention.

        Returns:
            ``(B, H, T, d)`` attention times values, and the attention if ``keep``.
        """

        def form(hs: slice) -> torch.Tensor:
            rcs = rcs_attn[:, hs] if rcs_attn is not None else None
            return self.attention(q[:, hs], k[:, hs], grid, rcs, refine)

        return attend_by_head_groups(v, form, keep)

    @torch.inference_mode()
    def window_logits(
        self,
        crops: torch.Tensor,
        text: torch.Tensor,
        query_to_class: torch.Tensor,
        aux: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Patch logits of a batch of equally sized windows.

        Args:
            crops: ``(B, 3, Hc, Wc)`` normalised window images.
            text: ``(Q, D)`` query embeddings.
            query_to_class: ``(Q,)`` int64 class of each query (for class-level SFR labels).
            aux: optional dict that receives intermediates (``tokens``, ``pre_last_block_x``,
                ``rcs_attn``, ``sfr_first_pass_patch_logits``, ``sfr_pixel_labels``,
                ``sfr_label_map``, ``sfr_valid_path``, ``sfr_matrix_prenorm``, ``first_pass_attn``,
                ``final_attn``).

        Returns:
            ``(B, Q, h, w)`` float32 cosine logits.
        """
        trunk = encode_trunk(self.visual, crops, self.rcs_layers, self.explicit)
        same_query = first_identical_row(text)
        block = self.visual.transformer.resblocks[-1]
        keep_res = self.method.keep_residual
        q, k, v = last_block_qkv(block, trunk.x)
        refine = None
        keep = aux is not None
        if self.sfr is not None:
            first_av, first_attn = self.attend(q, k, v, trunk.grid, trunk.rcs_attn, None, keep)
            first_tokens = project_tokens(self.visual, last_block_output(block, trunk.x, first_av, keep_res))
            first_logits = patch_logits(first_tokens, text, trunk.grid, same_query)
            labels = pixel_labels(first_logits, crops, self.sfr, query_to_class)
            num_labels = text.shape[0] if self.sfr.label_level == "query" else int(query_to_class.max()) + 1
            label_map = patch_mode(labels, self.patch, num_labels)
            refine = refinement_scores(label_map, self.sfr, aux)[:, None]
            if aux is not None:
                aux.update(
                    sfr_first_pass_patch_logits=first_logits,
                    sfr_pixel_labels=labels,
                    sfr_label_map=label_map,
                    first_pass_attn=first_attn,
                )
        av, attn = self.attend(q, k, v, trunk.grid, trunk.rcs_attn, refine, keep)
        tokens = project_tokens(self.visual, last_block_output(block, trunk.x, av, keep_res))
        if aux is not None:
            aux.update(tokens=tokens, pre_last_block_x=trunk.x, rcs_attn=trunk.rcs_attn, final_attn=attn)
        return patch_logits(tokens, text, trunk.grid, same_query)
