"""Trident's image-level pipeline and its SAM refinement (pure functions).

Trident (:mod:`resclip.methods.trident`) splices before it segments: the sub-images' CLIP features
are averaged into one feature map of the whole image, which SAM's attention then aggregates. Steps
for one image (``p`` CLIP's patch, ``c`` / ``s`` the sub-image size and stride in pixels):

1. **Inputs.** CLIP and DINO see the benchmark-resized image ``(1, 3, H1, W1)`` (keep-ratio rescale,
   CLIP-normalised); unless both sides are multiples of ``p`` it is resized bilinearly so that its long
   side is the next multiple of ``p`` and its short side follows, each side rounded up to a multiple of
   ``p`` and to at least ``c`` (:func:`processed_size`). SAM sees the original image with each side
   rounded up to a multiple of 16 (OpenCV bilinear, :func:`sam_source`), resized to a long side of
   1024 (PIL bilinear) and padded (:func:`encode_sam`); its valid token grid is ``(hs, ws)``.
2. **Sub-images** (:func:`sub_image_features`): the sliding windows of the processed image in one
   batch; DINO's tokens give the proxy attention of :class:`~resclip.methods.trident.Trident`, and
   CLIP's last block yields ``out_proj(A v)`` on DINO's grid for each sub-image.
3. **Splice** (:func:`splice`): each sub-image's map is placed at its patch box of the image's grid;
   overlaps are averaged (before ``ln_post``).
4. **Global aggregation**: the spliced map is resized bilinearly to SAM's grid ``(hs, ws)`` and
   multiplied by SAM's affinity ``W`` (:func:`~resclip.methods.trident.sam_affinity`), then
   ``ln_post`` and the projection give one token per SAM patch. Cityscapes (``split_halves``): the
   image's left and right halves are SAM-encoded separately and aggregated separately.
5. **Logits**: cosine with the query embeddings on SAM's grid, resized bilinearly to the original
   image; probabilities ``softmax(logit_scale * logits)`` with the max over synonyms; the mask is the
   argmax, 0 below ``prob_thd``.
6. **SAM refinement** (:func:`sam_refine`, optional, usable on any method's output): every
   8-connected region of each class in the half-resolution mask prompts SAM with its box, its
   highest-probability point and the class's (scaled, thresholded) probability map; prompts SAM
   scores above ``iou_thresh`` re-draw the class as ``max_k sigmoid(mask_k) * prob_c`` over the union
   of their masks; the mask is the argmax of these scores where any is positive, else the input mask.

Release facts reproduced (see also :class:`SAMRefineConfig`): the DINO input is re-normalised from the
CLIP-normalised sub-images (:func:`resclip.auxiliary.imagenet_input`); SAM's attention rows are cut to the
valid tokens but not renormalised; failed prompts (IoU below the threshold) put the coarse
probabilities back into the returned scores but never change the mask. The release reads images with
OpenCV; resclip decodes them with PIL (identical for PNG; JPEG decoders may differ by a grey level).
The release crashes when a processed side is below the sub-image size (possible only when both sides
are multiples of ``p``); here the sub-image is then that side long.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .auxiliary import dino_tokens, imagenet_input
from .methods.trident import Trident, affinity_thresholds
from .preprocess import window_coords
from .vit import encode_trunk, patch_size, project_tokens

__all__ = [
    "TRIDENT_DATASETS",
    "RefineTrace",
    "SAMRefineConfig",
    "SamImage",
    "SubImages",
    "TridentDataset",
    "TridentOutput",
    "TridentProtocol",
    "aggregate",
    "encode_sam",
    "image_logits",
    "predict",
    "preprocess_shape",
    "processed_size",
    "sam_refine",
    "sam_source",
    "splice",
    "sub_image_features",
]


# ---------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class SAMRefineConfig:
    """Trident's SAM refinement of a coarse segmentation (the release's defaults and base config).

    Attributes:
        coarse_thresh: classes whose highest (half-resolution) probability is below it are not
            refined, and pixels whose top probability is below it belong to no region; 0 = every
            class, every pixel.
        minimal_area: regions smaller than this many half-resolution pixels are not prompted.
        mask_coeff: the mask prompt is ``mask_coeff * prob`` where ``prob > coarse_thresh``, else 0.
        iou_thresh: prompts whose SAM IoU prediction is not above it are dropped ("failed").
        down_ratio: the regions are found at ``1 / down_ratio`` resolution.
        mask_prompt_batched: pass the mask prompt as ``(1, 1, 256, 256)`` (SAM's documented form);
            the release passes ``(1, 256, 256)``, so SAM's mask down-scaler normalises over the first
            spatial axis instead of its channels (official False, paper True).
    """

    coarse_thresh: float = 0.2
    minimal_area: int = 225
    mask_coeff: float = 0.005
    iou_thresh: float = 0.8
    down_ratio: int = 2
    mask_prompt_batched: bool = False

    def __post_init__(self) -> None:
        for name in ("coarse_thresh", "mask_coeff", "iou_thresh"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"sam refinement: {name} must be a number, got {value!r}")
        if not 0.0 <= self.coarse_thresh < 1.0:
            raise ValueError(f"sam refinement: coarse_thresh must be in [0, 1), got {self.coarse_thresh}")
        for name, low in (("minimal_area", 0), ("down_ratio", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"sam refinement: {name} must be an integer >= {low}, got {value!r}")

    def for_fidelity(self, fidelity: str) -> SAMRefineConfig:
        """These settings with the release's (``"official"``) or the paper's mask-prompt layout."""
        from dataclasses import replace

        return replace(self, mask_prompt_batched=fidelity == "paper")


@dataclass(frozen=True)
class TridentProtocol:
    """Trident's whole-image pipeline settings beyond the window protocol's sizes and thresholds.

    Attributes:
        split_halves: encode the image's left and right halves with SAM separately and aggregate each
            half on its own (the release's Cityscapes setting).
        sam_stride: SAM's input is the original image with each side rounded up to a multiple of this.
    """

    split_halves: bool = False
    sam_stride: int = 16


@dataclass(frozen=True)
class TridentDataset:
    """One benchmark's settings in the release (``configs/cfg_<dataset>.py`` over ``base_config.py``,
    run with ``--sam_refine``)."""

    short_side: int
    prob_thd: float = 0.0
    coarse_thresh: float = 0.2
    slide_stride: int = 224
    cos_fac: float = 1.2
    refine_neg_cos: bool = True
    split_halves: bool = False


#: the eight benchmarks of the release (slide_crop 336, logit_scale 40, sam_iou_thresh 0.8, SAM ViT-B)
TRIDENT_DATASETS: dict[str, TridentDataset] = {
    "voc21": TridentDataset(448, prob_thd=0.2, coarse_thresh=0.2),
    "context60": TridentDataset(576, prob_thd=0.15, coarse_thresh=0.15),
    "coco_object": TridentDataset(448, prob_thd=0.25, coarse_thresh=0.25),
    "voc20": TridentDataset(336, coarse_thresh=0.2, slide_stride=112, cos_fac=0.0),
    "context59": TridentDataset(576, coarse_thresh=0.15),
    "coco_stuff": TridentDataset(448, coarse_thresh=0.05),
    "cityscapes": TridentDataset(688, coarse_thresh=0.10, cos_fac=3.0, refine_neg_cos=False,
                                  split_halves=True),
    "ade20k": TridentDataset(576, coarse_thresh=0.05, refine_neg_cos=False),
}


# ------------------------------------------------------------------------------------------- sizes
def processed_size(h: int, w: int, patch: int, crop: int) -> tuple[int, int]:
    """The size CLIP and DINO work at, from the resized image's ``(h, w)``.

    Unchanged when both sides are multiples of ``patch``; otherwise the long side becomes the next
    multiple of ``patch``, the short side ``int(short * long' / long)``, each side is rounded up to a
    multiple of ``patch``, then to at least ``crop``.
    """
    if h % patch == 0 and w % patch == 0:
        return h, w
    longer = max(h, w)
    target = -(-longer // patch) * patch
    nh, nw = int(h * target / longer), int(w * target / longer)
    nh, nw = -(-nh // patch) * patch, -(-nw // patch) * patch
    return max(nh, crop), max(nw, crop)


def preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """SAM's resize of an ``(h, w)`` frame to a long side of ``long_side``: ``(h', w')`` rounded half up."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def sam_source(rgb: np.ndarray, stride: int = 16) -> np.ndarray:
    """The image SAM encodes: each side rounded up to a multiple of ``stride`` (OpenCV bilinear)."""
    h, w = rgb.shape[:2]
    nh, nw = -(-h // stride) * stride, -(-w // stride) * stride
    if (nh, nw) == (h, w):
        return rgb
    return cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)


# -------------------------------------------------------------------------------------------- SAM
@dataclass
class SamImage:
    """One image encoded by SAM.

    Attributes:
        embedding: ``(1, C, 64, 64)`` SAM's image embedding (prompts decode against it).
        input_size: ``(h, w)`` of the resized image inside SAM's padded square.
        original_size: ``(H, W)`` of the encoded image.
        grid: ``(hs, ws)`` SAM's valid token grid (``input_size // patch``).
        affinity: ``(hs*ws, hs*ws)`` Trident's affinity ``W`` of the tokens, or None.
    """

    embedding: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    grid: tuple[int, int]
    affinity: torch.Tensor | None = None


def _sam_model(sam: Any) -> Any:
    """Meta's ``Sam`` module inside a loader's wrapper (``.model``), or ``sam`` itself."""
    return sam if hasattr(sam, "image_encoder") else sam.model


def _sam_input(model: Any, rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(1, 3, S, S)`` SAM input (PIL bilinear to long side ``S``, pixel mean / std, zero padding)."""
    from PIL import Image

    size = int(model.image_encoder.img_size)
    h, w = preprocess_shape(rgb.shape[0], rgb.shape[1], size)
    resized = np.array(Image.fromarray(np.ascontiguousarray(rgb)).resize((w, h), Image.Resampling.BILINEAR))
    device = model.pixel_mean.device
    x = torch.as_tensor(resized, device=device).permute(2, 0, 1).contiguous()[None]
    x = (x - model.pixel_mean) / model.pixel_std
    x = F.pad(x, (0, size - w, 0, size - h))
    return x, (h, w)


def _rel_pos_terms(attn_mod: Any, q: torch.Tensor,
                   grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's decomposed relative-position terms ``(BH, h*w, h)`` and ``(BH, h*w, w)`` of queries ``q``
    ``(BH, h*w, d)`` on a square-attention grid (keys = queries)."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    h, w = grid
    rh = get_rel_pos(h, h, attn_mod.rel_pos_h)
    rw = get_rel_pos(w, w, attn_mod.rel_pos_w)
    r_q = q.reshape(q.shape[0], h, w, q.shape[-1])
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    return rel_h.reshape(q.shape[0], h * w, h), rel_w.reshape(q.shape[0], h * w, w)


def _last_block(block: Any, x: torch.Tensor, valid: tuple[int, int] | None, method: Trident | None,
                trace: dict[str, Any] | None,
                rows_per_step: int = 512) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SAM's last (global) encoder block, its attention formed ``rows_per_step`` query rows at a time,
    with Trident's affinity of the ``valid`` grid fused in (no ``(heads, N, N)`` map is kept).

    Speed/memory: only a block of attention rows is alive at a time; the affinity's thresholds only
    need the values, so each row block of ``W`` is finished as soon as its attention rows exist. The
    plain form is :func:`resclip.methods.trident.sam_affinity` on the whole maps (tested equal).

    Args:
        block: the last ``Block`` of SAM's ``ImageEncoderViT`` (global attention).
        x: ``(1, H, W, C)`` its input.
        valid: the valid token grid ``(hs, ws)`` (top-left of the padded grid), or None: no affinity.
        method: the Trident fields of the affinity.
        trace: filled with ``attn`` ``(heads, n, n)`` and ``values`` ``(heads, n, d)`` on the valid
            tokens when given (the plain maps, for tests).

    Returns:
        The block output ``(1, H, W, C)`` and the ``(n, n)`` affinity (None without ``valid``).
    """
    if getattr(block, "window_size", 0) > 0:
        raise ValueError("trident reads the global attention of SAM's last encoder block, but this SAM's "
                         "last block uses windowed attention; use a SAM ViT checkpoint (vit_b, vit_l, vit_h)")
    mod = block.attn
    shortcut = x
    y = block.norm1(x)
    b, h, w, _ = y.shape
    heads = mod.num_heads
    qkv = mod.qkv(y).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * heads, h * w, -1).unbind(0)
    rel = _rel_pos_terms(mod, q, (h, w)) if mod.use_rel_pos else None
    keep: torch.Tensor | None = None
    if valid is not None:
        hs, ws = valid
        keep = (torch.arange(hs, device=x.device)[:, None] * w + torch.arange(ws, device=x.device)).flatten()
        vals = F.normalize(v[:, keep].float(), dim=-1)  # (heads, n, d)
        n = keep.numel()
        weights = torch.empty(n, n, dtype=torch.float32, device=x.device)
        if trace is not None:
            trace["values"] = v[:, keep].float()
            trace["attn"] = torch.empty(heads, n, n, device=x.device)
        row_of = torch.full((h * w,), -1, dtype=torch.int64, device=x.device)
        row_of[keep] = torch.arange(n, device=x.device)
    out = torch.empty_like(v)
    for start in range(0, h * w, rows_per_step):
        rows = slice(start, min(start + rows_per_step, h * w))
        attn = (q[:, rows] * mod.scale) @ k.transpose(-2, -1)
        if rel is not None:
            r = attn.shape[1]
            attn = (attn.view(b * heads, r, h, w) + rel[0][:, rows, :, None] + rel[1][:, rows, None, :]).view(
                b * heads, r, h * w)
        attn = attn.softmax(dim=-1)
        out[:, rows] = attn @ v
        if keep is not None and method is not None:
            local = row_of[rows]
            sel = torch.nonzero(local >= 0).flatten()
            if sel.numel():
                dst = local[sel]
                a = attn[:, sel][:, :, keep].float()  # (heads, R, n)
                cos = torch.matmul(vals[:, dst], vals.transpose(-1, -2))
                t = affinity_thresholds(cos, method.cos_fac, method.refine_neg_cos, method.neg_fallback,
                                        method.max_thresh)
                kept = torch.where(cos > t[0], a, torch.zeros_like(cos)).mean(dim=0)
                weights[dst] = kept / kept.sum(dim=-1, keepdim=True)
                if trace is not None:
                    trace["attn"][:, dst] = a
    o = out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    x = shortcut + mod.proj(o)
    x = x + block.mlp(block.norm2(x))
    return x, (weights if keep is not None and method is not None else None)


@torch.inference_mode()
def encode_sam(sam: Any, rgb: np.ndarray, method: Trident | None = None,
               trace: dict[str, Any] | None = None) -> SamImage:
    """SAM's image embedding of ``rgb`` and, with ``method``, Trident's affinity of its tokens.

    Args:
        sam: a SAM (Meta ``segment_anything`` ``Sam``, or a loader's wrapper holding one as ``.model``).
        rgb: ``(H, W, 3)`` uint8 RGB, the image as SAM should see it (:func:`sam_source`).
        method: the Trident fields of the affinity; None: the embedding only.
        trace: filled with the last block's ``attn`` / ``values`` on the valid tokens when given.
    """
    model = _sam_model(sam)
    enc = model.image_encoder
    x, input_size = _sam_input(model, rgb)
    x = x.to(enc.patch_embed.proj.weight.dtype)
    patch = int(enc.patch_embed.proj.kernel_size[0])
    grid = (input_size[0] // patch, input_size[1] // patch)
    x = enc.patch_embed(x)
    if enc.pos_embed is not None:
        x = x + enc.pos_embed
    for blk in enc.blocks[:-1]:
        x = blk(x)
    x, weights = _last_block(enc.blocks[-1], x, grid if method is not None else None, method, trace)
    embedding = enc.neck(x.permute(0, 3, 1, 2))
    return SamImage(embedding=embedding, input_size=input_size, original_size=(rgb.shape[0], rgb.shape[1]),
                    grid=grid, affinity=weights)


# ------------------------------------------------------------------------------ splice and aggregate
@dataclass
class SubImages:
    """The sub-images of one image after CLIP's last block (before ``ln_post``).

    Attributes:
        outputs: ``(N, M, C)`` ``out_proj(A v)`` of each sub-image on DINO's grid.
        boxes: ``(N, 4)`` int64 ``(y1, x1, y2, x2)`` of each sub-image in CLIP patches.
        vfm_grid: DINO's grid ``(h', w')`` of a sub-image; clip_grid: CLIP's ``(h, w)``.
    """

    outputs: torch.Tensor
    boxes: torch.Tensor
    vfm_grid: tuple[int, int]
    clip_grid: tuple[int, int]


def sub_image_features(visual: Any, dino: Any, method: Trident, image: torch.Tensor, crop: int, stride: int,
                       trace: dict[str, Any] | None = None, explicit: bool = True) -> SubImages:
    """Every sub-image of a processed image through DINO and CLIP's proxy-attention last block.

    Args:
        visual: CLIP's visual tower; dino: a DINO ViT (:func:`resclip.dino.load_dino`, ``pos_embed="hub"``).
        image: ``(1, 3, H, W)`` CLIP-normalised, sides multiples of CLIP's patch.
        crop, stride: the sub-image size and stride in pixels.
        explicit: CLIP's trunk with explicit attention (the release's arithmetic) or fused (faster,
            ~1e-5 token differences), see :func:`resclip.vit.encode_trunk`.
    """
    p = patch_size(visual)
    _, _, hi, wi = image.shape
    boxes = window_coords(hi, wi, crop, stride)
    crops = torch.cat([image[:, :, y1:y2, x1:x2] for y1, x1, y2, x2 in boxes])
    tokens, vfm_grid = dino_tokens(dino, imagenet_input(crops))
    trunk = encode_trunk(visual, crops.to(visual.conv1.weight.dtype), explicit=explicit)
    y, attn = method.sub_image_outputs(visual, trunk.x, trunk.grid, tokens, vfm_grid)
    if trace is not None:
        trace.update(crops=crops, dino_tokens=tokens, proxy_attn=attn[:, 0], proxy_out=y)
    box = torch.tensor(boxes, dtype=torch.int64) // p
    return SubImages(outputs=y, boxes=box, vfm_grid=vfm_grid, clip_grid=trunk.grid)


def splice(sub: SubImages, grid: tuple[int, int]) -> torch.Tensor:
    """Average the sub-images' maps over the image's CLIP grid ``(h, w)`` (scaled by DINO's finer grid).

    Returns:
        ``(C, h*r, w*r)`` with ``r = round(h' / h_crop)`` (1 for DINO and CLIP with equal patches); each
        sub-image's ``(C, h', w')`` map (resized bilinearly to ``r`` times its CLIP grid when ``h'`` is not
        a multiple) lands on its box; overlaps are averaged, in the sub-images' order.
    """
    n, _, c = sub.outputs.shape
    hv, wv = sub.vfm_grid
    hc, wc = sub.clip_grid
    maps = sub.outputs.transpose(1, 2).reshape(n, c, hv, wv)
    if wv % wc:
        r = round(hv / hc)
        maps = F.interpolate(maps, size=(hc * r, wc * r), mode="bilinear", align_corners=False)
    else:
        r = wv // wc
    total = maps.new_zeros(c, grid[0] * r, grid[1] * r)
    count = maps.new_zeros(1, grid[0] * r, grid[1] * r)
    for i in range(n):
        y1, x1, y2, x2 = (int(v) * r for v in sub.boxes[i])
        total[:, y1:y2, x1:x2] += maps[i]
        count[:, y1:y2, x1:x2] += 1
    return total / count


def aggregate(spliced: torch.Tensor, sams: list[SamImage]) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM's global aggregation of the spliced map: ``(n, C)`` features on SAM's grid and that grid.

    With two SAM images (split halves) the spliced map's columns are split at ``w // 2``; each half is
    aggregated with its own affinity and the halves are joined along the width.
    """
    parts = [spliced] if len(sams) == 1 else [spliced[..., : spliced.shape[-1] // 2],
                                               spliced[..., spliced.shape[-1] // 2:]]
    outs = []
    for part, sam in zip(parts, sams, strict=True):
        if sam.affinity is None:
            raise ValueError("aggregate needs SAM images encoded with the Trident method (affinity)")
        hs, ws = sam.grid
        v = F.interpolate(part[None], size=(hs, ws), mode="bilinear", align_corners=False)[0]
        outs.append((sam.affinity @ v.flatten(1).transpose(0, 1).float()).view(hs, ws, -1))
    hs = sams[0].grid[0]
    joined = torch.cat(outs, dim=1)
    return joined.reshape(-1, joined.shape[-1]), (hs, joined.shape[1])


# ---------------------------------------------------------------------------------------- pipeline
@torch.inference_mode()
def image_logits(visual: Any, dino: Any, sam: Any, method: Trident, image: torch.Tensor, rgb: np.ndarray,
                 text: torch.Tensor, crop: int, stride: int, protocol: TridentProtocol | None = None,
                 trace: dict[str, Any] | None = None, explicit: bool = True,
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[SamImage, ...]]:
    """Trident's query logits of one image at its original size.

    Args:
        visual, dino, sam: CLIP's visual tower, a DINO ViT and a SAM.
        method: the Trident fields.
        image: ``(1, 3, H1, W1)`` the benchmark-resized, CLIP-normalised image.
        rgb: ``(H0, W0, 3)`` uint8 the original image (SAM's input).
        text: ``(Q, D)`` L2-normalised query embeddings.
        crop, stride: the sub-image size and stride in pixels.
        protocol: :class:`TridentProtocol` (default: one SAM pass).
        trace: a dict filled with the intermediates (``processed``, ``crops``, ``dino_tokens``,
            ``proxy_attn``, ``proxy_out``, ``spliced``, ``sam_attn`` / ``sam_values`` / ``sam_weights``
            lists, ``features``, ``tokens``, ``patch_logits``).
        explicit: see :func:`sub_image_features`.

    Returns:
        ``(Q, H0, W0)`` float32 logits, ``(Q, hs, ws)`` the logits on SAM's grid, and the SAM images
        (one; with split halves the two halves and, last, the whole image for the refinement).
    """
    proto = protocol or TridentProtocol()
    p = patch_size(visual)
    h2, w2 = processed_size(image.shape[-2], image.shape[-1], p, crop)
    x = image if (h2, w2) == tuple(image.shape[-2:]) else F.interpolate(
        image, (h2, w2), mode="bilinear", align_corners=False)
    sub = sub_image_features(visual, dino, method, x, crop, stride, trace, explicit)
    spliced = splice(sub, (h2 // p, w2 // p))
    source = sam_source(rgb, proto.sam_stride)
    sources = [source] if not proto.split_halves else [source[:, : source.shape[1] // 2],
                                                       source[:, source.shape[1] // 2:]]
    sams = []
    for part in sources:
        sam_trace: dict[str, Any] | None = {} if trace is not None else None
        sams.append(encode_sam(sam, part, method, sam_trace))
        if trace is not None and sam_trace is not None:
            trace.setdefault("sam_attn", []).append(sam_trace["attn"])
            trace.setdefault("sam_values", []).append(sam_trace["values"])
            trace.setdefault("sam_weights", []).append(sams[-1].affinity)
    feats, grid = aggregate(spliced, sams)
    tokens = project_tokens(visual, feats[None].to(visual.proj.dtype))[0].float()
    logits = F.normalize(tokens, dim=-1) @ text.float().t()
    patch_logits = logits.t().reshape(text.shape[0], *grid)
    out = F.interpolate(patch_logits[None], size=rgb.shape[:2], mode="bilinear", align_corners=False)[0]
    if trace is not None:
        trace.update(processed=x, spliced=spliced, features=feats, tokens=tokens, patch_logits=patch_logits)
    if proto.split_halves:
        sams.append(encode_sam(sam, source))
    return out, patch_logits, tuple(sams)


# ------------------------------------------------------------------------------------ SAM refinement
@dataclass
class RefineTrace:
    """What :func:`sam_refine` did (filled when passed).

    Attributes:
        down_probs: ``(C, h, w)`` the half-resolution probabilities; down_labels: ``(h, w)`` labels
            (``C`` = below ``coarse_thresh``).
        regions: ``(h, w)`` int64 region index + 1 (0 = none), in prompt order.
        region_class, points ``(K, 2)`` (x, y), boxes ``(K, 4)`` (x1, y1, x2, y2 inclusive): per region.
        iou: ``(K,)`` SAM's IoU predictions; low_res: ``(K, 256, 256)`` mask logits; mask_inputs:
            ``{class: (256, 256)}`` the mask prompts.
        kept: ``(K,)`` bool.
    """

    down_probs: torch.Tensor | None = None
    down_labels: torch.Tensor | None = None
    regions: torch.Tensor | None = None
    region_class: list[int] = field(default_factory=list)
    points: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    iou: torch.Tensor | None = None
    low_res: torch.Tensor | None = None
    mask_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    kept: torch.Tensor | None = None


def _regions(mask: np.ndarray, minimal_area: int) -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
    """8-connected regions of a boolean ``(h, w)`` mask with at least ``minimal_area`` pixels, in the
    raster order of their first pixel: ``(region mask, (x1, y1, x2, y2) inclusive)`` each."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return []
    ids, first = np.unique(labels.ravel(), return_index=True)
    order = [int(i) for i in ids[np.argsort(first)] if i != 0]
    out = []
    for i in order:
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < minimal_area:
            continue
        out.append((labels == i, (x, y, x + w - 1, y + h - 1)))
    return out


def _peak(prob: torch.Tensor, region: torch.Tensor, box: tuple[int, int, int, int]) -> tuple[int, int]:
    """``(x, y)`` of the first (raster order) maximum of ``prob * region`` over the whole map.

    Speed: searched inside the region's box, which holds the same first maximum whenever the maximum
    is positive (outside the box the product is 0); otherwise the whole map's first pixel, (0, 0).
    """
    x1, y1, x2, y2 = box
    sub = prob[y1:y2 + 1, x1:x2 + 1] * region[y1:y2 + 1, x1:x2 + 1]
    if not bool(sub.max() > 0):
        return 0, 0
    idx = int(torch.argmax(sub))
    return x1 + idx % sub.shape[1], y1 + idx // sub.shape[1]


def _scale_coords(coords: torch.Tensor, size: tuple[int, int], long_side: int) -> torch.Tensor:
    """``(..., 2)`` (x, y) from a ``size`` frame to SAM's resized frame (as ``ResizeLongestSide``)."""
    nh, nw = preprocess_shape(size[0], size[1], long_side)
    out = coords.to(torch.float).clone()
    out[..., 0] = out[..., 0] * (nw / size[1])
    out[..., 1] = out[..., 1] * (nh / size[0])
    return out


def _upscale(model: Any, low: torch.Tensor, image: SamImage, size: tuple[int, int]) -> torch.Tensor:
    """SAM's mask logits ``(K, 1, 256, 256)`` at ``size``: SAM's own upscaling to the encoded image, then
    (if that differs) bilinear to ``size``."""
    s = int(model.image_encoder.img_size)
    out = F.interpolate(low, (s, s), mode="bilinear", align_corners=False)
    out = out[..., : image.input_size[0], : image.input_size[1]]
    out = F.interpolate(out, image.original_size, mode="bilinear", align_corners=False)
    if tuple(out.shape[-2:]) != tuple(size):
        out = F.interpolate(out, size, mode="bilinear", align_corners=False)
    return out


@torch.inference_mode()
def sam_refine(labels: torch.Tensor, probs: torch.Tensor, sam: Any, image: SamImage, config: SAMRefineConfig,
               trace: RefineTrace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Trident's SAM refinement of any method's segmentation.

    Args:
        labels: ``(H, W)`` int64 the coarse mask (after the method's thresholds).
        probs: ``(C, H, W)`` float32 its class probabilities (softmax over queries, max over synonyms,
            not renormalised); ``C < 2048``.
        sam: a SAM (see :func:`encode_sam`); image: the image's SAM encoding (:func:`encode_sam` of
            :func:`sam_source` of the ``(H, W)`` image).
        config: the refinement settings.
        trace: a :class:`RefineTrace` to fill, or None.

    Returns:
        The refined ``(H, W)`` int64 mask and ``(C, H, W)`` float32 scores (``max_k sigmoid(mask_k) *
        prob_c`` over the kept prompts of class ``c`` inside their union, the coarse probability inside
        failed regions, 0 elsewhere); the inputs unchanged when no prompt is kept.

    Raises:
        ValueError: shapes that do not match.
    """
    if labels.dim() != 2 or probs.dim() != 3 or tuple(probs.shape[1:]) != tuple(labels.shape):
        raise ValueError(f"sam_refine needs labels (H, W) and probs (C, H, W) of the same size, got "
                         f"{tuple(labels.shape)} and {tuple(probs.shape)}")
    model = _sam_model(sam)
    num = probs.shape[0]
    h, w = labels.shape
    r = config.down_ratio
    dh, dw = h // r, w // r
    probs = probs.float()
    down = F.interpolate(labels[None, None].float(), (dh, dw), mode="nearest")[0, 0].long()
    pd = F.interpolate(probs[None], (dh, dw), mode="bilinear", align_corners=False)[0]
    coarse = config.coarse_thresh
    if coarse > 0:
        down[pd.max(dim=0).values < coarse] = num
    if trace is not None:
        trace.down_probs, trace.down_labels = pd, down
    down_np = down.cpu().numpy()
    region_map = np.zeros((dh, dw), np.int64)
    size256 = preprocess_shape(h, w, 256)
    long_side = int(model.image_encoder.img_size)
    masks, sig, classes, failed = [], [], [], []
    all_pts, all_box, all_iou, all_low, all_keep = [], [], [], [], []
    for c in range(num):
        if coarse > 0 and float(pd[c].max()) < coarse:
            continue
        regions = _regions(down_np == c, config.minimal_area)
        if not regions:
            continue
        pts = []
        for region, box in regions:
            reg = torch.from_numpy(region).to(pd.device)
            pts.append(_peak(pd[c], reg, box))
            if trace is not None:
                trace.region_class.append(c)
                region_map[region] = len(trace.region_class)
        boxes = torch.tensor([b for _, b in regions], dtype=torch.int64, device=pd.device)
        points = torch.tensor(pts, dtype=torch.int64, device=pd.device)
        m = F.interpolate(pd[c][None, None], size256, mode="bilinear", align_corners=False)[0]
        m = F.pad(m, (0, 256 - size256[1], 0, 256 - size256[0]))
        m = torch.where(m > coarse, config.mask_coeff * m, torch.zeros_like(m)).float()
        prompt = m[None] if config.mask_prompt_batched else m
        coords = _scale_coords(points, (dh, dw), long_side)[:, None]
        box_in = _scale_coords(boxes.reshape(-1, 2, 2), (dh, dw), long_side).reshape(-1, 4)
        ones = torch.ones(coords.shape[0], 1, device=coords.device)
        sparse, dense = model.prompt_encoder(points=(coords, ones), boxes=box_in, masks=prompt)
        low, iou = model.mask_decoder(image_embeddings=image.embedding.float(),
                                      image_pe=model.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False)
        keep = iou[:, 0] > config.iou_thresh
        if trace is not None:
            trace.mask_inputs[c] = m[0]
            all_pts.append(points)
            all_box.append(boxes)
            all_iou.append(iou[:, 0])
            all_low.append(low[:, 0])
            all_keep.append(keep)
        for i in torch.nonzero(~keep).flatten().tolist():
            failed.append(regions[i][0])
        if bool(keep.any()):
            logits = _upscale(model, low[keep], image, (h, w))
            masks.append(logits[:, 0] > model.mask_threshold)
            sig.append(logits[:, 0].sigmoid())
            classes.append(c)
    if trace is not None:
        trace.regions = torch.from_numpy(region_map)
        if all_pts:
            trace.points, trace.boxes = torch.cat(all_pts), torch.cat(all_box)
            trace.iou, trace.low_res, trace.kept = torch.cat(all_iou), torch.cat(all_low), torch.cat(all_keep)
    if not classes:
        return labels, probs
    scores = torch.zeros(num, h, w, device=probs.device)
    for c, mk, sg in zip(classes, masks, sig, strict=True):
        scores[c] = (sg * probs[c]).max(dim=0).values * mk.any(dim=0)
    refined = torch.where(scores.sum(dim=0) == 0, labels, scores.argmax(dim=0))
    if failed:
        area = torch.from_numpy(np.any(np.stack(failed), axis=0)).to(probs.device)
        area = F.interpolate(area[None, None].float(), (h, w), mode="nearest")[0] != 0
        back = area * probs
        scores = torch.where(back > scores, back, scores)
        # the release then restores the coarse label where max(back) > max(scores): never, after the max
    return refined, scores


# ------------------------------------------------------------------------------------------- predict
@dataclass
class TridentOutput:
    """One image through Trident's pipeline.

    Attributes:
        logits: ``(Q, H0, W0)`` query logits; patch_logits: ``(Q, hs, ws)`` on SAM's grid.
        probs: ``(C, H0, W0)`` class probabilities (max over synonyms, not renormalised).
        coarse: ``(H0, W0)`` int64 mask before the refinement.
        labels: ``(H0, W0)`` int64 final mask; scores: ``(C, H0, W0)`` the refinement's scores (``probs``
            without refinement or when no prompt was kept).
    """

    logits: torch.Tensor
    patch_logits: torch.Tensor
    probs: torch.Tensor
    coarse: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor


def predict(visual: Any, dino: Any, sam: Any, method: Trident, image: torch.Tensor, rgb: np.ndarray,
            text: torch.Tensor, query_to_class: torch.Tensor, *, crop: int = 336, stride: int = 224,
            logit_scale: float = 40.0, prob_thd: float = 0.0, protocol: TridentProtocol | None = None,
            refine: SAMRefineConfig | None = None, trace: dict[str, Any] | None = None,
            explicit: bool = True) -> TridentOutput:
    """Trident on one image: logits, probabilities, coarse mask and (with ``refine``) SAM refinement.

    Args: as :func:`image_logits` (``explicit`` too); ``query_to_class`` ``(Q,)`` int64;
    ``logit_scale``, ``prob_thd``: the softmax temperature and background threshold; ``refine``: the
    SAM refinement or None. ``trace`` also receives ``refine`` (a :class:`RefineTrace`).
    """
    from .protocol import class_probabilities, threshold_argmax  # protocol.py imports this module

    logits, patch, sams = image_logits(visual, dino, sam, method, image, rgb, text, crop, stride, protocol,
                                       trace, explicit)
    probs = class_probabilities(logits, query_to_class.to(logits.device), logit_scale)
    coarse = threshold_argmax(probs, prob_thd)
    labels, scores = coarse, probs
    if refine is not None:
        rt = RefineTrace() if trace is not None else None
        labels, scores = sam_refine(coarse, probs, sam, sams[-1], refine, rt)
        if trace is not None:
            trace["refine"] = rt
    return TridentOutput(logits=logits, patch_logits=patch, probs=probs, coarse=coarse, labels=labels,
                         scores=scores)
