"""CorrCLIP (Zhang, Liu, Tang, ICCV 2025, "CorrCLIP: Reconstructing Patch Correlations in CLIP for
Open-Vocabulary Semantic Segmentation"): the last CLIP block attends with correlations rebuilt from
class-agnostic region masks (scope) and DINO features (value), two extra feature branches are added,
and the segmentation map is corrected with the masks (:func:`resclip.corrclip.vote`).

Per window of ``Hc x Wc`` pixels, with CLIP's grid ``h x w`` (``T = 1 + h w`` tokens) and DINO's grid
``G = h' x w'`` (``N = h' w'``, DINO ViT-B/8 in the release), and the window's part of the image's
instance map (``regions``, :func:`resclip.corrclip.window_regions`; its smallest label = unsegmented):

* DINO features ``F`` ``(N, C')``: ``normalize(q + k)`` of the last DINO block's projections
  (:func:`dino_qk_features`), on the window re-normalised with ImageNet statistics;
  ``S = F F^T`` (value reconstruction);
* regions on the DINO grid (nearest); if there are more than two labels, regions are merged
  (:func:`merge_regions`): the mean DINO feature of each region (all but the first), L2-normalised,
  cosine distances ``max(sim) - sim``, DBSCAN (eps 0.2, min_samples 1) -> one label per cluster;
* scope (:func:`scope_mask`): ``i`` attends ``j`` when they share a (merged) region other than the
  first, or when one of them is in the first (unsegmented) region and ``S_ij > mean(S)``;
  ``A = softmax(tau * S)`` over the allowed keys (tau 4);
* main branch ``out_proj(A v)`` with ``v`` from ``ln_1`` of the last block's input (patches, resized
  bilinearly from ``h x w`` to ``G``); spatial branch the same on the mean output of the blocks
  ``L-2-n .. L-3`` (``n`` 5 / 12 / 28 for 12 / 24 / 32 blocks, else ``L-4``); semantic branch: one
  mask class token (MCT) per region of the merged map on the CLIP grid, started from CLS after
  ``ln_pre``, run through every block while attending only CLS and its region's patches
  (:func:`mask_class_tokens`); each DINO cell takes its region's MCT;
* tokens ``proj(ln_post(main) + alpha ln_post(spatial) + beta ln_post(semantic))`` on the DINO grid
  (``StageContext.out_grid``), alpha 1, beta 0.5.

The image-level parts (SAM 2 masks, resizing and cropping them to windows, the final vote) are in
:mod:`resclip.corrclip`; the window's regions reach the stage as ``StageContext.regions``
``(B, Hc, Wc)``. The padding of windows to a multiple of 56 and the vote are protocol settings
(``Protocol.window_multiple``, ``Protocol.region_vote``, on in the ``corrclip/<dataset>`` presets).

Release facts kept as fields (official value = the release's): ``unsegmented_scope`` ``"either"`` (a
pair with one unsegmented end may attend above the mean similarity; the release comments that
``"both"``, both ends unsegmented, was slightly worse), the smallest label of a window counts as
unsegmented even when it is a real mask; the one release-vs-paper difference
is the mask generator's ``points_per_side``, official 8 (the release's on-line SAM 2) / paper 32 (the
pre-generated masks its README says reproduce the paper), :class:`resclip.corrclip.MaskGeneratorConfig`.
DINO's attention is formed explicitly as in the hub code (:func:`dino_qk_features`): a fused kernel
rounds differently (~1e-7) and flips ``S > mean(S)`` at near-tie entries.

With RCS and SFR: both act on the CLIP grid, so they compose only when DINO's patch equals CLIP's
(the engine refuses other pairs); SFR mixes the masked scores ``tau * S`` (``-inf`` stays), RCS the
attention ``A``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..attention import interpolate_pos_embed, layer_norm, scaled_scores
from ..auxiliary import aux_patch_size, imagenet_input, missing_aux_message
from ..corrclip import MaskGeneratorConfig, generate_instance_map, resize_instance_map, sam2_mask_generator
from ..vit import embed_patches, encode_trunk, num_blocks
from .base import BaseAttention, StageContext, register_method
from .proxyclip import attend_shared, resize_values

CLUSTER_OFFSET = 10000  # merged regions get labels CLUSTER_OFFSET + cluster (the release's)
UNSEGMENTED_SCOPES = ("either", "both")
MASK_SOURCES = ("sam2", "given")


def _explicit_block(block: Any, x: torch.Tensor) -> torch.Tensor:
    """A timm ViT block with its attention formed explicitly, ``softmax(q k^T d^-1/2) v``, as the hub
    DINO code computes it (timm's fused kernel rounds differently, ~1e-7, which flips the
    comparisons of ``S`` with its mean at a few entries); layer scales and drop paths as the block's."""
    attn = block.attn
    b, t, c = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(block.norm1(x)).reshape(b, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    q = q_norm(q) if q_norm is not None else q
    k = k_norm(k) if k_norm is not None else k
    weights = torch.softmax((q @ k.transpose(-2, -1)) * attn.scale, dim=-1)
    y = (weights @ v).transpose(1, 2).reshape(b, t, c)
    norm = getattr(attn, "norm", None)
    y = attn.proj(norm(y) if norm is not None else y)
    x = x + block.drop_path1(block.ls1(y))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def dino_qk_features(model: Any, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """``normalize(q + k)`` of a DINO ViT's last block, patch tokens only.

    The positional embedding is resized like facebookresearch's hub code
    (:func:`resclip.attention.interpolate_pos_embed`); blocks ``0 .. L-2`` run whole, then the last
    block's ``norm1`` and fused ``qkv`` projection; ``q`` and ``k`` are all heads concatenated.

    Args:
        model: a DINO ViT from :func:`resclip.dino.load_dino` (class token, no register tokens).
        images: ``(B, 3, H, W)`` ImageNet-normalised images.

    Returns:
        ``(B, h*w, C')`` float32 L2-normalised features and the grid ``(h, w)``.
    """
    if getattr(model, "reg_token", None) is not None:
        raise ValueError("DINO backbones with register tokens are not supported; use e.g. dino_vitb8")
    proj = model.patch_embed.proj
    x = F.conv2d(images.to(proj.weight.dtype), proj.weight, proj.bias, stride=proj.stride)
    b, width, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    pos = interpolate_pos_embed(model.pos_embed[0], h, w).to(x.dtype)
    x = torch.cat([model.cls_token.to(x.dtype).expand(b, -1, -1), x], dim=1) + pos
    for block in model.blocks[:-1]:
        x = _explicit_block(block, x)
    last = model.blocks[-1]
    qkv = last.attn.qkv(last.norm1(x))
    feats = qkv[:, 1:, :width] + qkv[:, 1:, width : 2 * width]
    return F.normalize(feats.float(), dim=-1), (h, w)


def dbscan_labels(dist: torch.Tensor, eps: float, min_samples: int) -> torch.Tensor:
    """DBSCAN cluster labels of points with precomputed distances (scikit-learn's semantics).

    Point ``j`` is a neighbour of ``i`` when ``dist[i, j] <= eps`` (compared in ``dist``'s dtype);
    ``i`` is a core point with at least ``min_samples`` neighbours (itself included when
    ``dist[i, i] <= eps``). Clusters are numbered in the order of their first core point; each is
    everything reachable from it through the neighbourhoods of core points (read row-wise, so an
    asymmetric matrix is followed as given); points no cluster reaches are noise, ``-1``.

    Args:
        dist: ``(n, n)`` distances.

    Returns:
        ``(n,)`` int64 labels.
    """
    n = dist.shape[0]
    near = (dist <= torch.tensor(eps, dtype=dist.dtype, device=dist.device)).cpu()
    core = (near.sum(dim=1) >= min_samples).tolist()
    rows = [torch.nonzero(near[i]).flatten().tolist() for i in range(n)]
    labels = [-1] * n
    cluster = 0
    for seed in range(n):
        if labels[seed] != -1 or not core[seed]:
            continue
        labels[seed] = cluster
        stack = [seed]
        while stack:
            i = stack.pop()
            if not core[i]:
                continue
            for j in rows[i]:
                if labels[j] == -1:
                    labels[j] = cluster
                    stack.append(j)
        cluster += 1
    return torch.tensor(labels, dtype=torch.int64, device=dist.device)


def merge_regions(labels: torch.Tensor, feats: torch.Tensor, eps: float = 0.2, min_samples: int = 1,
                  offset: int = CLUSTER_OFFSET) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Merge the regions of one window whose mean DINO features are close.

    Only when ``labels`` holds more than two values. Regions ``r_0 < r_1 < ...`` (sorted labels;
    ``r_0`` is the unsegmented one and is left alone); ``f_i`` = L2-normalised mean of ``feats`` over
    ``r_i`` (i >= 1); distances ``max(f f^T) - f f^T`` (the maximum over the whole matrix); DBSCAN
    (:func:`dbscan_labels`); every region in cluster ``c`` is relabelled ``offset + c``.

    Args:
        labels: ``(h', w')`` int64 region labels on the feature grid.
        feats: ``(h'*w', C')`` L2-normalised features.

    Returns:
        The merged ``(h', w')`` labels (a new tensor) and ``{"dist": (n, n), "clusters": (n,)}`` for
        the ``n`` regions after the first (empty when nothing was merged).
    """
    values = torch.unique(labels)
    if values.numel() <= 2:
        return labels.clone(), {}
    flat = labels.reshape(-1)
    masks = [flat == v for v in values]
    means = torch.stack([feats[m].mean(dim=0) for m in masks])
    unit = F.normalize(means, dim=1)[1:]
    sim = unit @ unit.t()
    dist = sim.max() - sim
    clusters = dbscan_labels(dist, eps, min_samples)
    out = flat.clone()
    for i, c in enumerate(clusters.tolist(), start=1):
        if c != -1:
            out[masks[i]] = offset + c
    return out.view(labels.shape), {"dist": dist, "clusters": clusters}


def scope_mask(labels: torch.Tensor, sim: torch.Tensor, unsegmented: str = "either") -> torch.Tensor:
    """Which pairs may attend (scope reconstruction).

    Args:
        labels: ``(N,)`` merged region labels; the smallest one is the unsegmented region.
        sim: ``(N, N)`` DINO similarities.
        unsegmented: ``"either"`` (release): a pair with at least one end unsegmented is allowed when
            ``sim > mean(sim)``; ``"both"``: only pairs with both ends unsegmented.

    Returns:
        ``(N, N)`` bool: same region (not the unsegmented one), or the rule above.
    """
    if unsegmented not in UNSEGMENTED_SCOPES:
        raise ValueError(f"unsegmented must be one of {UNSEGMENTED_SCOPES}, got {unsegmented!r}")
    first = labels == labels.min()
    same = (labels[:, None] == labels[None, :]) & ~first[:, None]
    pair = (first[:, None] | first[None, :]) if unsegmented == "either" else (first[:, None] & first[None, :])
    return same | (pair & (sim > sim.mean()))


def _mct_block(block: Any, mct: torch.Tensor, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """One CLIP block for the mask class tokens: ``(K, C)`` -> ``(K, C)``.

    Queries from the tokens ``mct``, keys and values from the block's input ``x`` ``(T, C)`` (the
    unchanged sequence), ``allowed`` ``(K, T)`` the keys each token may attend; then the block's
    residual and MLP. Only the projections each side needs are formed (``q`` of the K tokens, ``k, v``
    of the T tokens).
    """
    mod = block.attn
    heads, width = mod.num_heads, x.shape[-1]
    weight, bias = mod.in_proj_weight, mod.in_proj_bias
    q = F.linear(layer_norm(mct, block.ln_1), weight[:width], bias[:width] if bias is not None else None)
    kv = F.linear(layer_norm(x, block.ln_1), weight[width:], bias[width:] if bias is not None else None)
    d = width // heads
    q = q.view(-1, heads, d).transpose(0, 1)  # (H, K, d)
    k = kv[:, :width].reshape(-1, heads, d).transpose(0, 1)  # (H, T, d)
    v = kv[:, width:].reshape(-1, heads, d).transpose(0, 1)
    scores = scaled_scores(q, k).masked_fill_(~allowed, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)  # (H, K, d)
    y = F.linear(out.transpose(0, 1).reshape(-1, width), mod.out_proj.weight, mod.out_proj.bias)
    ls_1, ls_2 = getattr(block, "ls_1", None), getattr(block, "ls_2", None)
    h = mct + (ls_1(y) if ls_1 is not None else y)
    z = block.mlp(layer_norm(h, block.ln_2))
    return h + (ls_2(z) if ls_2 is not None else z)


def mask_class_tokens(visual: Any, inputs: list[torch.Tensor], regions: torch.Tensor) -> torch.Tensor:
    """The semantic branch's mask class tokens of one window after every block.

    Args:
        visual: the CLIP visual tower.
        inputs: the ``(T, C)`` input of each block ``0 .. L-1`` (CLS first); CLS of ``inputs[0]``
            (after ``ln_pre``) starts every token.
        regions: ``(K, h*w)`` bool, one row per region (each token attends CLS and its region).

    Returns:
        ``(K, C)`` tokens after the last block (residual and MLP included).
    """
    allowed = F.pad(regions, (1, 0), value=True)  # CLS + the region's patches
    mct = inputs[0][:1].expand(regions.shape[0], -1)
    for block, x in zip(visual.transformer.resblocks, inputs, strict=True):
        mct = _mct_block(block, mct, x, allowed)
    return mct


def spatial_blocks(depth: int) -> tuple[int, ...]:
    """0-based blocks averaged by the spatial branch: ``L-2-n .. L-3`` (n = 5 / 12 / 28 for 12 / 24 /
    32 blocks, else ``L - 4``).

    Raises:
        ValueError: a tower with fewer than 5 blocks (no block to average).
    """
    if depth < 5:
        raise ValueError(f"corrclip needs a ViT with at least 5 blocks, got {depth}")
    n = {12: 5, 24: 12, 32: 28}.get(depth, depth - 4)
    return tuple(range(depth - 2 - n, depth - 2))


@dataclass(frozen=True)
class CorrCLIP(BaseAttention):
    """CorrCLIP's last stage (the release's constants).

    Attributes:
        tau: temperature of the rebuilt correlations (``softmax(tau * S)``).
        alpha: weight of the spatial branch.
        beta: weight of the semantic branch.
        merge_eps: DBSCAN radius of the region merging (on ``max(sim) - sim``).
        merge_min_samples: DBSCAN ``min_samples``.
        unsegmented_scope: ``"either"`` (release) / ``"both"``, see :func:`scope_mask`.
        masks: where the instance maps come from: ``"sam2"`` (SAM 2's automatic mask generator, the
            ``sam`` auxiliary model) or ``"given"`` (passed with each image, e.g. pre-generated ones).
        points_per_side, pred_iou_thresh, stability_score_thresh, multimask_output, paint_order: SAM 2's
            generator (:class:`resclip.corrclip.MaskGeneratorConfig`; ``points_per_side`` official 8 /
            paper 32).
    """

    tau: float = 4.0
    alpha: float = 1.0
    beta: float = 0.5
    merge_eps: float = 0.2
    merge_min_samples: int = 1
    unsegmented_scope: str = "either"
    masks: str = "sam2"
    points_per_side: int = 8  # official 8, paper 32
    pred_iou_thresh: float = 0.4
    stability_score_thresh: float = 0.4
    multimask_output: bool = False
    paint_order: str = "area_ascending"

    replaces_last_block = True
    uses_regions = True
    aux_models: ClassVar[tuple[str, ...]] = ("dino", "sam")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.unsegmented_scope not in UNSEGMENTED_SCOPES:
            raise ValueError(f"corrclip unsegmented_scope must be one of {UNSEGMENTED_SCOPES}, "
                             f"got {self.unsegmented_scope!r}")
        if self.masks not in MASK_SOURCES:
            raise ValueError(f"corrclip masks must be one of {MASK_SOURCES}, got {self.masks!r}")
        if not self.tau > 0:
            raise ValueError(f"corrclip tau must be > 0, got {self.tau}")
        _ = self.generator  # validates the generator settings (one-line ValueError)

    @property
    def generator(self) -> MaskGeneratorConfig:
        """SAM 2's generator settings of this method."""
        return MaskGeneratorConfig(self.points_per_side, self.pred_iou_thresh, self.stability_score_thresh,
                                   self.multimask_output, self.paint_order)

    @property
    def has_scores(self) -> bool:
        """The rebuilt correlations are pre-softmax scores (SFR can mix them)."""
        return True

    def required_aux(self) -> tuple[str, ...]:
        return ("dino", "sam") if self.masks == "sam2" else ("dino",)

    def out_patch(self, clip_patch: int, aux: Mapping[str, Any]) -> int | None:
        model = aux.get("dino")
        return aux_patch_size(model) if model is not None else clip_patch

    def for_fidelity(self, fidelity: str) -> BaseAttention:
        return replace(self, points_per_side=self.generator.for_fidelity(fidelity).points_per_side)

    def trunk_blocks(self, num_blocks: int) -> tuple[int, ...]:
        # every block's input feeds the mask class tokens; the spatial branch reads a subset
        return tuple(range(num_blocks - 2))

    # ------------------------------------------------------------------ image level
    def image_regions(self, rgb: Any, aux: Mapping[str, Any]) -> torch.Tensor:
        """The ``(H, W)`` int64 instance map of an image at its original size: SAM 2's automatic
        mask generator (:attr:`generator` settings) on ``aux["sam"]``, painted by
        :func:`resclip.corrclip.generate_instance_map`.

        Raises:
            ValueError: ``masks="given"`` (the caller supplies the maps) or no ``sam`` model.
        """
        if self.masks != "sam2":
            raise ValueError("corrclip with masks='given' reads each image's instance map from the caller; "
                             "pass it with the image (or use masks='sam2')")
        sam = aux.get("sam")
        if sam is None:
            raise ValueError(missing_aux_message(self.name, "sam"))
        generator = sam2_mask_generator(sam, self.generator)
        return generate_instance_map(generator, rgb, self.generator.paint_order)

    # ------------------------------------------------------------------ the stage
    def window_tokens(self, visual: Any, crops: torch.Tensor, dino: Any, regions: torch.Tensor,
                      trace: dict[str, torch.Tensor] | None = None,
                      explicit: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
        """The stage on windows given explicitly, outside an engine (no RCS / SFR).

        Args:
            visual: the CLIP visual tower; crops: ``(B, 3, Hc, Wc)`` CLIP-normalised windows (padded
                already); dino: the DINO ViT; regions: ``(B, Hc, Wc)`` the windows' region labels.
            trace: a dict to fill with intermediates (see :meth:`last_stage`), or None.
            explicit: the trunk's attention form (:func:`resclip.vit.encode_trunk`).

        Returns:
            ``(B, h'*w', D)`` projected tokens and the DINO grid ``(h', w')``.
        """
        keep = self.trunk_blocks(num_blocks(visual))
        trunk = encode_trunk(visual, crops, explicit=explicit, keep_blocks=keep)

        def same(t: torch.Tensor, heads: slice) -> torch.Tensor:
            return t

        ctx = StageContext(visual, trunk, same, same, trace, crops=crops, aux={"dino": dino}, regions=regions)
        tokens = self.last_stage(ctx)
        assert ctx.out_grid is not None
        return tokens, ctx.out_grid

    def window_attention(self, feats: torch.Tensor, regions: torch.Tensor, grid: tuple[int, int],
                         clip_grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Rebuilt correlations of one window.

        Args:
            feats: ``(N, C')`` :func:`dino_qk_features` of the window.
            regions: ``(Hc, Wc)`` the window's region labels.
            grid: DINO grid ``(h', w')``; clip_grid: CLIP grid ``(h, w)``.

        Returns:
            ``scores`` ``(N, N)`` (``tau * S``, ``-inf`` outside the scope), ``labels`` ``(h', w')``
            merged regions, ``clip_labels`` ``(h, w)`` merged regions on the CLIP grid, and, when
            regions were merged, ``dist`` / ``clusters`` (:func:`merge_regions`).
        """
        labels = resize_instance_map(regions, grid)
        merged, info = merge_regions(labels, feats, self.merge_eps, self.merge_min_samples)
        sim = feats @ feats.t()
        allowed = scope_mask(merged.reshape(-1), sim, self.unsegmented_scope)
        scores = sim.masked_fill(~allowed, float("-inf")) * self.tau
        return {"scores": scores, "labels": merged, "clip_labels": resize_instance_map(merged, clip_grid),
                **info}

    def last_stage(self, ctx: StageContext) -> torch.Tensor:
        regions = ctx.regions
        if ctx.crops is None or regions is None:
            raise ValueError("corrclip needs the windows and their region masks (StageContext.crops / "
                             "regions): run it through a Segmenter, which makes the masks with SAM 2 or "
                             "takes given ones")
        visual, trunk = ctx.visual, ctx.trunk
        depth = num_blocks(visual)
        key = "corrclip|dino_qk"
        if key not in ctx.memo:
            ctx.memo[key] = dino_qk_features(ctx.aux["dino"], imagenet_input(ctx.crops))
        feats, grid = ctx.memo[key]
        b = feats.shape[0]
        if regions.shape[0] != b or tuple(regions.shape[-2:]) != tuple(ctx.crops.shape[-2:]):
            raise ValueError(f"region masks {tuple(regions.shape)} do not match the windows "
                             f"{tuple(ctx.crops.shape)}: one (Hc, Wc) label map per window")
        x0, _ = embed_patches(visual, ctx.crops)
        inputs = [x0, *(trunk.blocks[i] for i in range(depth - 2)), trunk.x]
        spatial = torch.stack([trunk.blocks[i] for i in spatial_blocks(depth)]).mean(0)
        scores, semantic, merged = [], [], []
        for i in range(b):
            win = self.window_attention(feats[i], regions[i], grid, trunk.grid)
            clip_labels = win["clip_labels"].reshape(-1)
            values, index = torch.unique(clip_labels, return_inverse=True)
            onehot = index[None, :] == torch.arange(values.numel(), device=index.device)[:, None]
            mct = mask_class_tokens(visual, [x[i] for x in inputs], onehot)
            cell = resize_instance_map(index.view(trunk.grid), grid).reshape(-1)
            semantic.append(mct[cell])
            scores.append(win["scores"])
            merged.append(win["labels"])
        heads = slice(None)
        attn = torch.softmax(ctx.mix_scores(torch.stack(scores)[:, None], heads), dim=-1)
        attn = ctx.mix_attention(attn, heads)  # (B, 1, N, N)
        block = visual.transformer.resblocks[-1]
        mod = block.attn
        width = trunk.x.shape[-1]
        streams = []
        for x in (trunk.x, spatial):
            v = F.linear(layer_norm(x, block.ln_1), mod.in_proj_weight[2 * width :],
                         mod.in_proj_bias[2 * width :])
            out = attend_shared(attn, resize_values(v[:, 1:], trunk.grid, grid), mod.num_heads)
            streams.append(F.linear(out, mod.out_proj.weight, mod.out_proj.bias))
        streams.append(torch.stack(semantic))
        main, spat, sem = (layer_norm(s, visual.ln_post) for s in streams)
        y = main + spat * self.alpha + sem * self.beta
        ctx.out_grid = grid
        if ctx.trace is not None:
            ctx.trace.update(dino_features=feats, attn=attn, regions=torch.stack(merged),
                             pre_ln_post=torch.stack(streams, dim=1))
        return y @ visual.proj.to(y.dtype)


register_method(
    CorrCLIP(
        "corrclip",
        keep_residual=False,
        description="CorrCLIP: SAM 2 regions bound DINO-valued correlations; mask-token branches "
        "(dino, sam)",
        title="CorrCLIP",
    )
)
