"""CLIPer's own evaluation protocol (pure functions; :mod:`resclip.protocol` has no equivalent yet).

What differs from the mmseg-style protocol of the other methods:

* resizing: the short side to ``short_side`` (bicubic, PIL), each side then rounded to the nearest
  multiple of the patch size; the positional embedding is resized bilinearly (``size=``);
* per image, every layer feature gives a map: ``P_l = softmax_Q(s * cos(tokens_l, [fg; bg; mean fg]))``,
  keeping the ``C`` foreground rows (``Q = C + N_bg + 1``), ``s = logit_scale``;
* optional sliding windows: per-window layer logits are averaged per patch and propagated with the
  windows' head-mean fused attention, stitched into one ``(N, N)`` map (:func:`slide_logits`); then
  ``P_l = (softmax(slide) + P_l) / 2``;
* the selected layer's map is zeroed below ``attention_thr * max`` and propagated with the fused
  attention ``A`` (patch block, head mean): ``seg = P_sel A + mean_l P_l``, ``(C, h, w)``;
* ``score_c = max seg_c``; the maps are resized bilinearly to the image, scaled to peak ``score_c``,
  and :func:`labels_from_maps` applies ``score_thr`` (classes), ``bkg_thr`` (pixels; 0 = background)
  and the optional min-max normalisation.

Shapes: ``C`` foreground classes, ``Q`` queries, ``L`` layers, ``h x w`` the patch grid, ``N = h w``,
``T = N + 1`` tokens.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .attention import layer_norm
from .methods.cliper import CLIPer, fuse_attention, normalise_round, symmetric_attention
from .vit import num_blocks, patch_size, project_tokens, run_block

# ToTensor + Normalize of the OpenAI preprocessing (values in [0, 1])
MEAN01 = (0.48145466, 0.4578275, 0.40821073)
STD01 = (0.26862954, 0.26130258, 0.27577711)


#: the release's ``template/car_template.txt`` (most B/16 configs use it instead of the 80 ImageNet ones)
CLIPER_TEMPLATES: tuple[str, ...] = (
    "a clean origami {}.", "a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene",
    "There is the {} in the scene", "a photo of a {} in the scene", "a photo of a small {}.",
    "a photo of a medium {}.", "a photo of a large {}.", "This is a photo of a small {}.",
    "This is a photo of a medium {}.", "This is a photo of a large {}.",
    "There is a small {} in the scene.", "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)
TEMPLATE_SETS = ("openai", "cliper")


@dataclass(frozen=True)
class CLIPerProtocol:
    """CLIPer's per-dataset inference settings (its ``scripts/config`` files).

    Attributes:
        short_side: resize the short side to this, then round each side to a patch multiple.
        slide_crop: sliding-window size (pixels, a multiple of the patch size; the release fails
            otherwise); 0 = no sliding pass.
        slide_stride: sliding-window stride (pixels).
        logit_scale: temperature of the softmax over queries.
        attention_thr: the selected layer's map is zeroed below this share of its maximum.
        score_thr: classes whose score ``max seg_c`` is not above it are dropped.
        bkg_thr: pixels whose (normalised) map value is below it for every kept class become
            background (0); 0 selects the release's other rule (background = ``(1 - max)^2``).
        normalise: min-max normalise each class map before ``bkg_thr``.
        background: with :class:`resclip.Segmenter`: class 0 of the class list is CLIPer's
            background, its synonyms are the background words, and label ``c`` is class ``c``
            (the release's VOC / Context-60 / COCO-Object files); False: every class is a
            foreground class, the background words are ``background_words`` and a pixel left to
            the background gets no class (255; a miss for its true class, as the release counts it).
        background_words: the background queries when ``background`` is False.
        templates: prompt templates of the text queries: ``"openai"`` (the 80 ImageNet ones) or
            ``"cliper"`` (the release's 15 ``car_template.txt`` phrases, :data:`CLIPER_TEMPLATES`).
    """

    short_side: int = 336
    slide_crop: int = 0
    slide_stride: int = 112
    logit_scale: float = 100.0
    attention_thr: float = 0.2
    score_thr: float = 0.3
    bkg_thr: float = 0.3
    normalise: bool = False
    background: bool = True
    background_words: tuple[str, ...] = ("background",)
    templates: str = "openai"

    def __post_init__(self) -> None:
        if self.templates not in TEMPLATE_SETS:
            raise ValueError(f"templates must be one of {', '.join(TEMPLATE_SETS)}, got {self.templates!r}")
        if not self.background and not self.background_words:
            raise ValueError("background=False needs at least one background word (background_words)")
        for name in ("short_side", "slide_crop", "slide_stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.short_side < 1 or (self.slide_crop > 0 and not 0 < self.slide_stride <= self.slide_crop):
            raise ValueError("short_side must be >= 1 and 0 < slide_stride <= slide_crop when sliding")
        for name in ("logit_scale", "attention_thr", "score_thr", "bkg_thr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")


@dataclass
class CLIPerLayers:
    """One forward pass.

    Attributes:
        tokens: ``(L, B, T, D)`` projected tokens of every layer feature (CLS first).
        attn: ``(B, H, T, T)`` the fused attention the release returns (propagation).
        grid: ``(h, w)``.
        trace: named intermediates when requested (``attn_sum``, ``fused_k{k}``, ``ln1_feats``,
            ``attn_out``).
    """

    tokens: torch.Tensor
    attn: torch.Tensor
    grid: tuple[int, int]
    trace: dict[str, Any] | None = None


def resized_shape(h: int, w: int, short_side: int, patch: int) -> tuple[int, int]:
    """``(H', W')``: short side scaled to ``short_side``, each side rounded to a patch multiple."""
    ratio = short_side / min(w, h)
    return int(h * ratio / patch + 0.5) * patch, int(w * ratio / patch + 0.5) * patch


def resize_image(rgb: np.ndarray, short_side: int, patch: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> resized uint8 (PIL bicubic, :func:`resized_shape`)."""
    from PIL import Image

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    h, w = resized_shape(rgb.shape[0], rgb.shape[1], short_side, patch)
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BICUBIC))


def to_input(rgb: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(1, 3, H, W)`` float32: ``(x / 255 - mean) / std``."""
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(MEAN01).view(3, 1, 1)
    std = torch.tensor(STD01).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def positional_embedding(pos: torch.Tensor, h: int, w: int, fp16: bool) -> torch.Tensor:
    """``(1 + n*n, C)`` -> ``(1 + h*w, C)``: the patch grid resized bilinearly to ``(h, w)``
    (``align_corners=False``), optionally rounded to float16 (release), in ``pos``'s dtype."""
    first, grid = pos[:1], pos[1:]
    side = round(grid.shape[0] ** 0.5)
    if side * side != grid.shape[0]:
        raise ValueError(f"positional embedding with {grid.shape[0]} patch rows is not a square grid")
    c = grid.shape[1]
    g = grid.permute(1, 0).reshape(1, c, side, side)
    g = F.interpolate(g, size=(h, w), mode="bilinear")
    out = torch.cat([first, g.reshape(c, -1).permute(1, 0)], 0)
    return out.half().to(pos.dtype) if fp16 else out


def encode_layers(
    visual: Any, method: CLIPer, images: torch.Tensor, trace: bool = False
) -> CLIPerLayers:
    """All layer features through the fused last block (the early-layer fusion, Sec. 3 of the paper).

    Args:
        visual: a CLIP ViT visual tower.
        method: the CLIPer method (its fidelity fields).
        images: ``(B, 3, H, W)`` normalised images (sides multiples of the patch size).
        trace: keep the intermediates.
    """
    weight = visual.conv1.weight
    p = patch_size(visual)
    x = F.conv2d(images.to(weight.dtype), weight, stride=p)
    b, c, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    zeros = torch.zeros(b, 1, c, dtype=x.dtype, device=x.device)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, c) + zeros
    x = torch.cat([cls, x], dim=1)
    x = x + positional_embedding(visual.positional_embedding, h, w, method.pos_embed_fp16).to(x.dtype)
    x = layer_norm(x, visual.ln_pre)
    blocks = visual.transformer.resblocks
    depth = num_blocks(visual)
    feats = []
    total = torch.zeros(b, blocks[0].attn.num_heads, x.shape[1], x.shape[1], device=x.device)
    for i in range(depth - 1):
        feats.append(layer_norm(x, blocks[i].ln_1))
        x, _ = run_block(blocks[i], x, explicit=True, attn_sum=total)
    feats.append(x)
    # one fused map alive at a time (the cumulative rounds are applied as the layers are visited)
    tr: dict[str, Any] | None = {"attn_sum": total.clone()} if trace else None
    single = fuse_attention(total) if method.normalise_rounds == "single" else None
    s, fused, outs = total, total, []
    for k, f in enumerate(feats):
        if single is None:
            s = normalise_round(s)
            fused = symmetric_attention(s)
        else:
            fused = single
        outs.append(method.attend(None, visual, f, fused))
        if tr is not None:
            tr[f"fused_k{k}"] = fused
    tokens = project_tokens(visual, torch.stack(outs))
    if tr is not None:
        tr["ln1_feats"] = torch.stack([layer_norm(f, blocks[-1].ln_1) for f in feats])
        tr["attn_out"] = torch.stack(outs)
    return CLIPerLayers(tokens=tokens, attn=fused, grid=(h, w), trace=tr)


def query_embeddings(fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """``(Q, D)`` queries ``[fg; bg; mean(fg)]`` (not normalised), ``Q = C + N_bg + 1``."""
    if fg.ndim != 2 or bg.ndim != 2 or fg.shape[1] != bg.shape[1] or fg.shape[0] < 1:
        raise ValueError(
            f"fg and bg must be (C, D) and (N_bg, D) with C >= 1, got {tuple(fg.shape)}, {tuple(bg.shape)}")
    return torch.cat([fg, bg, fg.mean(0, True)], dim=0)


def layer_logits(
    tokens: torch.Tensor, text: torch.Tensor, scale: float, grid: tuple[int, int]
) -> torch.Tensor:
    """``(L, Q, h, w)`` scaled cosine logits of the patch tokens of ``tokens`` ``(L, T, D)``."""
    x = tokens[:, 1:].float()
    x = x / x.norm(dim=-1, keepdim=True)
    t = text.float() / text.float().norm(dim=-1, keepdim=True)
    logits = (scale * x) @ t.t()
    return logits.transpose(-1, -2).reshape(tokens.shape[0], text.shape[0], *grid)


def slide_logits(
    visual: Any, method: CLIPer, image: torch.Tensor, text: torch.Tensor, crop: int, stride: int, scale: float
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Sliding-window layer logits propagated with the stitched window attention.

    Window logits are averaged per patch; the windows' head-mean patch attention maps are placed at
    their patches in one ``(N, N)`` map, divided by ``count + 1e-5`` and row-normalised ``Ā``; the
    result is ``logits Ā`` (columns: ``out[:, j] = sum_i logits[:, i] Ā[i, j]``).

    Args:
        image: ``(1, 3, H, W)``; crop: pixels, a multiple of the patch size; stride: pixels (a window
            is placed at the patch holding its first pixel, as in the release).

    Returns:
        ``(L, Q, h, w)`` and, per window, ``{"box", "logits" (L, Q, hc, wc), "attn" (Nc, Nc)}``.
    """
    p = patch_size(visual)
    if crop % p:
        raise ValueError(f"cliper: slide_crop {crop} must be a multiple of the patch size {p}")
    _, _, hi, wi = image.shape
    h, w = hi // p, wi // p
    depth = num_blocks(visual)
    preds = torch.zeros(depth, text.shape[0], h, w, device=image.device)
    count = torch.zeros(1, h, w, device=image.device)
    attns = torch.zeros(h, w, h, w, device=image.device)
    attn_count = torch.zeros(h, w, h, w, device=image.device)
    windows = []
    for r in range(max(hi - crop + stride - 1, 0) // stride + 1):
        for c in range(max(wi - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(r * stride + crop, hi), min(c * stride + crop, wi)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out = encode_layers(visual, method, image[:, :, y1:y2, x1:x2])
            ch, cw = out.grid
            lg = layer_logits(out.tokens[:, 0], text, scale, out.grid)
            am = out.attn[0].mean(0)[1:, 1:]
            py, px = y1 // p, x1 // p
            attns[py:py + ch, px:px + cw, py:py + ch, px:px + cw] += am.reshape(ch, cw, ch, cw)
            attn_count[py:py + ch, px:px + cw, py:py + ch, px:px + cw] += 1
            preds[..., py:py + ch, px:px + cw] += lg
            count[..., py:py + ch, px:px + cw] += 1
            windows.append({"box": torch.tensor([y1, x1, y2, x2]), "logits": lg, "attn": am})
    preds /= count
    attns /= attn_count + 1e-5
    a = attns.flatten(0, 1).flatten(-2, -1)
    a /= a.sum(dim=-1, keepdim=True)
    return (preds.flatten(-2, -1) @ a).unflatten(-1, (h, w)), windows


@dataclass
class CLIPerMaps:
    """Patch-level output of :func:`segment_maps` (before resizing to the image).

    Attributes:
        seg: ``(C, h, w)`` ``P_sel A + mean_l P_l``.
        score: ``(C,)`` ``max seg_c``.
        layers: the whole-image pass.
        windows: the sliding pass's windows (empty without one).
    """

    seg: torch.Tensor
    score: torch.Tensor
    layers: CLIPerLayers
    windows: list[dict[str, torch.Tensor]]


@torch.inference_mode()
def segment_maps(
    visual: Any,
    method: CLIPer,
    image: torch.Tensor,
    fg: torch.Tensor,
    bg: torch.Tensor,
    protocol: CLIPerProtocol,
    fg_to_class: torch.Tensor | None = None,
) -> CLIPerMaps:
    """CLIPer's class maps on one resized, normalised ``(1, 3, H, W)`` image.

    ``fg`` ``(Q_fg, D)``: foreground query embeddings; ``bg`` ``(N_bg, D)``: background word
    embeddings; ``fg_to_class`` ``(Q_fg,)`` int64: the class of each foreground query when a class
    has synonyms (its map is the max of their probabilities, taken right after the softmax; the
    release has one query per class), None = one query per class.
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"cliper: expected one (1, 3, H, W) image, got {tuple(image.shape)}")
    text = query_embeddings(fg, bg).to(image.device)
    n_fg = fg.shape[0]
    layers = encode_layers(visual, method, image)
    seg = layer_logits(layers.tokens[:, 0], text, protocol.logit_scale, layers.grid).softmax(-3)[:, :n_fg]
    windows: list[dict[str, torch.Tensor]] = []
    if protocol.slide_crop > 0:
        sl, windows = slide_logits(visual, method, image, text, protocol.slide_crop, protocol.slide_stride,
                                   protocol.logit_scale)
        seg = sl.softmax(-3)[:, :n_fg] * 0.5 + seg * 0.5
    if fg_to_class is not None:
        from .protocol import class_max  # protocol.py imports this module

        seg = class_max(seg, fg_to_class.to(seg.device), dim=1)
    sel = seg[method.layer_index(seg.shape[0])]
    if not method.threshold_in_place:
        sel = sel.clone()
    sel[sel < sel.amax((-1, -2), keepdim=True) * protocol.attention_thr] = 0
    h, w = layers.grid
    prop = (sel.flatten(-2, -1) @ layers.attn[0].mean(0)[1:, 1:]).unflatten(-1, (h, w))
    out = prop + seg.mean(0)
    return CLIPerMaps(seg=out, score=out.amax(dim=(-1, -2)), layers=layers, windows=windows)


def image_maps(seg: torch.Tensor, score: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(C, H0, W0)``: ``seg`` resized bilinearly to ``size``, each map scaled to peak ``score_c``."""
    pm = F.interpolate(seg[None], size=size, mode="bilinear")[0]
    return pm / (pm.amax((-1, -2), keepdim=True) + 1e-5) * score[..., None, None]


def labels_from_maps(
    maps: torch.Tensor, score: torch.Tensor, protocol: CLIPerProtocol
) -> tuple[torch.Tensor, torch.Tensor]:
    """Background handling: ``(cam, labels)``.

    Classes with ``score_c <= score_thr`` are dropped. With ``bkg_thr > 0``: (optionally min-max
    normalised) values below ``bkg_thr`` become 0, the label is ``1 + argmax_c`` and 0 where every
    kept value is 0; ``cam`` is ``(C, H, W)``. With ``bkg_thr = 0``: background competes with
    ``(1 - max_c)^2``; ``cam`` is ``(C + 1, H, W)``. ``labels`` ``(H, W)`` int64.
    """
    c, h, w = maps.shape
    keep = (score > protocol.score_thr)[:, None]
    cam = maps.reshape(c, -1).clone()
    if protocol.normalise:
        cam -= cam.amin(dim=-1, keepdim=True)
        cam /= cam.amax(dim=-1, keepdim=True) + 1e-6
    if protocol.bkg_thr > 0:
        cam[cam < protocol.bkg_thr] = 0
        valid = keep * cam
        value, labels = valid.max(dim=0)
        labels = labels + 1
        labels[value == 0] = 0
        return valid.reshape(c, h, w), labels.reshape(h, w)
    valid = keep * cam
    valid = torch.cat([torch.pow(1 - valid.amax(dim=0, keepdim=True), 2), valid], dim=0)
    return valid.reshape(c + 1, h, w), valid.argmax(dim=0).reshape(h, w)


@dataclass
class CLIPerResult:
    """:func:`predict`'s output: ``labels`` ``(H0, W0)`` (0 = background, ``c + 1`` = class ``c``),
    ``cam`` and ``maps`` ``(C, H0, W0)``, and the patch-level :class:`CLIPerMaps`."""

    labels: np.ndarray
    cam: torch.Tensor
    maps: torch.Tensor
    patch: CLIPerMaps


def predict(
    visual: Any, method: CLIPer, rgb: np.ndarray, fg: torch.Tensor, bg: torch.Tensor,
    protocol: CLIPerProtocol,
    fg_to_class: torch.Tensor | None = None,
) -> CLIPerResult:
    """CLIPer's whole protocol on one ``(H0, W0, 3)`` uint8 RGB image (``fg_to_class``: see
    :func:`segment_maps`)."""
    x = to_input(resize_image(rgb, protocol.short_side, patch_size(visual)))
    param = next(iter(visual.parameters()), None)
    if param is not None:
        x = x.to(param.device)
    out = segment_maps(visual, method, x, fg, bg, protocol, fg_to_class)
    maps = image_maps(out.seg, out.score, rgb.shape[:2])
    cam, labels = labels_from_maps(maps, out.score, protocol)
    return CLIPerResult(labels=labels.cpu().numpy(), cam=cam, maps=maps, patch=out)


def split_class_lines(lines: list[str]) -> tuple[list[str], list[str]]:
    """The release's class files: line 0 holds background words (split at commas / whitespace), each
    further line is one foreground class name. Returns ``(background_words, classes)``."""
    import re

    if len(lines) < 2:
        raise ValueError("a CLIPer class list needs a background line and at least one class")
    return [w for w in re.split(r"[\s,]+", lines[0]) if w], list(lines[1:])
