"""Window-level dense inference: base attention + RCS + SFR on a batch of crops."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .attention import identity_attention
from .auxiliary import missing_aux_message
from .methods import BaseAttention, StageContext
from .rcs import RCSConfig, rcs_mix
from .sfr import RefinementTrace, SFRConfig, patch_mode, pixel_labels, refinement_scores, sfr_mix
from .vit import (
    Tower,
    TrunkOutput,
    attend_by_head_groups,
    encode_trunk,
    last_block_output,
    last_block_qkv,
    num_blocks,
    patch_size,
    project_tokens,
)

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

@dataclass
class SFRTrace(RefinementTrace):
    """SFR's first pass of a window batch (plus ``V`` and the unnormalised ``Ŝ``, see
    :class:`~resclip.sfr.RefinementTrace`).

    Attributes:
        patch_logits: ``(B, Q, h, w)`` first-pass cosine logits.
        pixel_labels: ``(B, Hc, Wc)`` int64 per-pixel labels.
        label_map: ``(B, h, w)`` int64 patch labels ``M``.
        attn: ``(B, H, T, T)`` the first pass's last-block attention.
    """

    patch_logits: torch.Tensor | None = None
    pixel_labels: torch.Tensor | None = None
    label_map: torch.Tensor | None = None
    attn: torch.Tensor | None = None


@dataclass
class WindowTrace:
    """Intermediates of one :meth:`DenseEngine.window_logits` call: pass an empty one to have it
    filled (the ``(B, H, T, T)`` attention maps are kept only then).

    Attributes:
        pre_last_block_x: ``(B, T, C)`` residual stream entering the last block.
        rcs_attn: ``(B, H, T, T)`` mean q-k attention of the RCS blocks; None without RCS.
        tokens: ``(B, T, D)`` projected output tokens, CLS first; ``(B, h*w, D)`` patch tokens
            for a method whose last stage drops CLS (SC-CLIP), on ``grid``.
        attn: ``(B, H, T, T)`` the last block's final attention; None for a method with its own
            last stage.
        sfr: SFR's first pass; None without SFR.
        blocks: the trunk block outputs the method asked for (``{0-based index: (B, T, C)}``).
        stages: named intermediates of a method's own last stage (see its module).
        grid: ``(h, w)`` the grid of ``tokens`` and of the logits (a last stage may use its own,
            e.g. ProxyCLIP's DINO grid).
    """

    pre_last_block_x: torch.Tensor | None = None
    rcs_attn: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    attn: torch.Tensor | None = None
    sfr: SFRTrace | None = None
    blocks: dict[int, torch.Tensor] = field(default_factory=dict)
    stages: dict[str, torch.Tensor] = field(default_factory=dict)
    grid: tuple[int, int] | None = None


def patch_logits(
    tokens: torch.Tensor,
    text: torch.Tensor,
    grid: tuple[int, int],
    first: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cosine similarity of every patch token with every query embedding.

    Args:
        tokens: ``(B, T, D)`` projected tokens, CLS first (``h * w = T - 1``), or ``(B, h*w, D)``
            patch tokens only.
        text: ``(Q, D)`` L2-normalised query embeddings.
        grid: ``(h, w)``.
        first: ``(Q,)`` from :func:`first_identical_row`: each query takes the logits of the first
            query identical to it, or None when all queries differ.

    Returns:
        ``(B, Q, h, w)`` float32 logits.
    """
    patches = tokens if tokens.shape[1] == grid[0] * grid[1] else tokens[:, 1:]
    feats = F.normalize(patches.float(), dim=-1)
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
        aux: loaded auxiliary models by kind (:func:`resclip.auxiliary.load_aux`); every kind the method
            requires (:meth:`~resclip.methods.BaseAttention.required_aux`) must be there.

    Raises:
        ValueError: SFR on a method without scores; a required auxiliary model missing; RCS or SFR
            on a last stage whose output grid is not the CLIP grid.
    """

    def __init__(
        self,
        visual: Tower,
        method: BaseAttention,
        rcs: RCSConfig | None = None,
        sfr: SFRConfig | None = None,
        trunk_attention: str = "explicit",
        aux: Mapping[str, Any] | None = None,
    ) -> None:
        if trunk_attention not in ("explicit", "fused"):
            raise ValueError(f"trunk_attention must be 'explicit' or 'fused', got {trunk_attention!r}")
        if sfr is not None and not method.has_scores:
            raise ValueError(
                f"SFR edits attention scores, but method {method.name!r} has none (identity attention); "
                "use sfr=False with it"
            )
        self.aux = dict(aux or {})
        needed = [kind for kind in method.required_aux() if kind not in self.aux]
        if needed:
            raise ValueError(missing_aux_message(method.name, needed[0]))
        self.patch = patch_size(visual)
        if (rcs is not None or sfr is not None) and method.replaces_last_block:
            stride = method.out_patch(self.patch, self.aux)
            if stride != self.patch:
                grid = "a fixed grid" if stride is None else f"a {stride}-pixel grid"
                raise ValueError(
                    f"{method.name} forms its attention on {grid}, RCS and SFR mix the CLIP's "
                    f"{self.patch}-pixel grid: use an auxiliary model with patch {self.patch}, or rcs=False "
                    "and sfr=False (--no-rcs --no-sfr)"
                )
        self.visual = visual
        self.method = method
        self.rcs = rcs
        self.sfr = sfr
        depth = num_blocks(visual)
        self.rcs_layers = rcs.zero_based(depth) if rcs is not None else ()
        self.keep_blocks = method.trunk_blocks(depth)
        self.keep_attn = method.trunk_attentions(depth)
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
        if not self.method.has_scores:
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
        trace: WindowTrace | None = None,
        regions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Patch logits of a batch of equally sized windows.

        Args:
            crops: ``(B, 3, Hc, Wc)`` normalised window images.
            text: ``(Q, D)`` query embeddings.
            query_to_class: ``(Q,)`` int64 class of each query (for class-level SFR labels).
            trace: an empty :class:`WindowTrace` to fill with the intermediates, or None.
            regions: ``(B, Hc, Wc)`` int64 instance-map crops for a method that reads them
                (``uses_regions``), handed to its last stage (both SFR passes), or None.

        Returns:
            ``(B, Q, h, w)`` float32 cosine logits.
        """
        same_query = first_identical_row(text)
        trunk = self._trunk(crops)
        keep = trace is not None
        sfr_trace = SFRTrace() if keep else None
        qkv = self._last_qkv(trunk)  # shared by SFR's first pass and the final pass
        memo: dict[str, Any] = {"regions": regions}  # a last stage's scratch, shared by both passes
        refine = self._refinement(crops, trunk, text, query_to_class, sfr_trace, qkv, memo)
        stages = trace.stages if trace is not None else None
        tokens, attn, grid = self._forward(trunk, refine, keep, stages, qkv, crops, memo)
        if trace is not None:
            trace.pre_last_block_x, trace.rcs_attn, trace.blocks = trunk.x, trunk.rcs_attn, trunk.blocks
            trace.tokens, trace.attn, trace.grid = tokens, attn, grid
            trace.sfr = sfr_trace if self.sfr is not None else None
        return patch_logits(tokens, text, grid, same_query)

    @torch.inference_mode()
    def last_attention(
        self,
        crops: torch.Tensor,
        text: torch.Tensor | None = None,
        query_to_class: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last block's final attention ``(B, H, T, T)`` float32 (what attention figures show).

        Args:
            crops: ``(B, 3, Hc, Wc)`` normalised window images.
            text, query_to_class: as in :meth:`window_logits`; needed only with SFR, whose first
                pass segments the windows.

        Raises:
            ValueError: SFR without ``text`` and ``query_to_class``; a method with its own last
                stage (it has no single last-block attention map).
        """
        if self.method.replaces_last_block:
            raise ValueError(
                f"{self.method.name} replaces the last block with its own stage: it has no single "
                "last-block attention map to show"
            )
        if self.sfr is not None and (text is None or query_to_class is None):
            raise ValueError("SFR refines attention with a first-pass segmentation: pass class embeddings")
        trunk = self._trunk(crops)
        qkv = self._last_qkv(trunk)
        refine = None
        if text is not None and query_to_class is not None:
            refine = self._refinement(crops, trunk, text, query_to_class, None, qkv, {})
        assert qkv is not None  # a standard last block (checked above)
        return self.attention(qkv[0], qkv[1], trunk.grid, trunk.rcs_attn, refine)

    def _trunk(self, crops: torch.Tensor) -> TrunkOutput:
        return encode_trunk(
            self.visual, crops, self.rcs_layers, self.explicit, self.keep_blocks, self.keep_attn
        )

    def _last_qkv(self, trunk: TrunkOutput) -> QKV | None:
        """The standard last block's ``q, k, v`` ``(B, H, T, d)``; None for a method's own last stage."""
        if self.method.replaces_last_block:
            return None
        return last_block_qkv(self.visual.transformer.resblocks[-1], trunk.x)

    def _forward(
        self,
        trunk: TrunkOutput,
        refine: torch.Tensor | None,
        keep: bool,
        stages: dict[str, torch.Tensor] | None,
        qkv: QKV | None,
        crops: torch.Tensor,
        memo: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """The last block, or the method's own last stage, on the trunk's output: projected tokens,
        (standard block, ``keep``) its ``(B, H, T, T)`` attention, and the tokens' grid (a last stage
        may set its own). ``qkv``: :meth:`_last_qkv`; ``crops``, ``memo``: for a last stage."""
        if qkv is None:
            ctx = self._stage_context(trunk, refine, stages, crops, memo)
            tokens = self.method.last_stage(ctx)
            return tokens, None, ctx.out_grid or trunk.grid
        q, k, v = qkv
        av, attn = self.attend(q, k, v, trunk.grid, trunk.rcs_attn, refine, keep)
        return self._tokens(trunk.x, av), attn, trunk.grid

    def _stage_context(
        self,
        trunk: TrunkOutput,
        refine: torch.Tensor | None,
        stages: dict[str, torch.Tensor] | None,
        crops: torch.Tensor,
        memo: dict[str, Any],
    ) -> StageContext:
        """RCS and SFR for a last stage that attends over patch tokens only: the CLS row and column
        are dropped from the averaged RCS attention (rows renormalised) and from SFR's scores."""
        refine_p = refine[:, :, 1:, 1:] if refine is not None else None
        rcs_p = None
        if self.rcs is not None and trunk.rcs_attn is not None:
            block = trunk.rcs_attn[:, :, 1:, 1:]
            rcs_p = block / block.sum(dim=-1, keepdim=True)

        def mix_scores(scores: torch.Tensor, heads: slice) -> torch.Tensor:
            return self._mixed_scores(scores, None, refine_p)

        def mix_attention(attn: torch.Tensor, heads: slice) -> torch.Tensor:
            if rcs_p is None or self.rcs is None:
                return attn
            mix = rcs_p[:, heads]
            if attn.shape[1] != mix.shape[1]:  # one map for every head (ProxyCLIP's): RCS makes one per head
                attn = attn.expand(-1, mix.shape[1], -1, -1)
            return rcs_mix(attn, mix, self.rcs)

        return StageContext(self.visual, trunk, mix_scores, mix_attention, stages, crops=crops,
                            aux=self.aux, memo=memo, explicit=self.explicit, regions=memo.get("regions"))

    def _tokens(self, x: torch.Tensor, av: torch.Tensor) -> torch.Tensor:
        """Finish the last block from its attention-weighted values and project: ``(B, T, D)``."""
        block = self.visual.transformer.resblocks[-1]
        return project_tokens(self.visual, last_block_output(block, x, av, self.method.keep_residual))

    def _refinement(
        self,
        crops: torch.Tensor,
        trunk: TrunkOutput,
        text: torch.Tensor,
        query_to_class: torch.Tensor,
        trace: SFRTrace | None,
        qkv: QKV | None,
        memo: dict[str, Any],
    ) -> torch.Tensor | None:
        """SFR's first pass and its refinement scores ``(B, 1, T, T)``; None without SFR."""
        if self.sfr is None:
            return None
        keep = trace is not None
        first_tokens, first_attn, grid = self._forward(trunk, None, keep, None, qkv, crops, memo)
        first_logits = patch_logits(first_tokens, text, grid, first_identical_row(text))
        labels = pixel_labels(first_logits, crops, self.sfr, query_to_class)
        num_labels = text.shape[0] if self.sfr.label_level == "query" else int(query_to_class.max()) + 1
        label_map = patch_mode(labels, self.patch, num_labels)
        if trace is not None:
            trace.patch_logits, trace.pixel_labels, trace.label_map = first_logits, labels, label_map
            trace.attn = first_attn
        return refinement_scores(label_map, self.sfr, trace)[:, None]
