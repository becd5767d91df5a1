"""Inference protocol: resizing, windows, and turning logits into masks."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .cliper_protocol import CLIPerProtocol
from .tlp import TLPConfig
from .trident import SAMRefineConfig, TridentProtocol


def class_max(probs: torch.Tensor, query_to_class: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Max over each class's synonyms.

    Args:
        probs: ``(B, Q, ...)`` per-query probabilities (queries along ``dim``).
        query_to_class: ``(Q,)`` int64 class index of each query.
        dim: the query axis.

    Returns:
        ``probs`` with the ``Q`` queries along ``dim`` replaced by the ``C`` per-class maxima.
    """
    num_classes = int(query_to_class.max()) + 1
    if num_classes == probs.shape[dim]:
        return probs
    dim = dim % probs.dim()
    view = [1] * probs.dim()
    view[dim] = -1
    index = query_to_class.to(probs.device).view(view).expand_as(probs)
    shape = list(probs.shape)
    shape[dim] = num_classes
    out = torch.full(shape, float("-inf"), dtype=probs.dtype, device=probs.device)
    return out.scatter_reduce(dim, index, probs, reduce="amax", include_self=True)


@dataclass(frozen=True)
class Protocol:
    """How an image becomes a mask (everything outside the network).

    Attributes:
        short_side: resize so the short side is this (benchmarks: 336; Cityscapes 560).
        long_side: cap of the long side after resizing.
        slide_crop: sliding-window size in pixels; 0 = whole image in one pass.
        slide_stride: sliding-window stride.
        logit_scale: temperature of the softmax over queries.
        prob_thd: pixels whose top class probability is below it become class 0 (background).
        area_thd: SCLIP's small-region filter: non-background classes whose predicted area is at
            most this share of the non-background area are removed; None = off.
        pamr_steps: PAMR iterations on the final logits (0 = off; NACLIP's own protocol: 10).
        pamr_dilations: PAMR neighbour distances.
        tlp: text-aware Laplacian propagation on the full-resolution query logits (after PAMR,
            before the softmax), see :mod:`resclip.tlp`; None = off (PEARL's protocol turns it on).
            It works with any method; it needs the whole ``(Q, H, W)`` map at once.
        window_multiple: zero-pad every window (centred, in normalised pixel space) to a multiple of
            this many pixels before the network; its logits are upsampled to the padded size and
            the padding cut off (ProxyCLIP's and CorrCLIP's releases: 56); 0 = no padding.
        cliper: CLIPer's own pipeline (:mod:`resclip.cliper_protocol`: its resizing, whole-image
            and stitched sliding passes, background words and thresholds) instead of the window
            protocol above, whose fields it then leaves unused; None = the window protocol. It
            needs the ``cliper`` method, without RCS, SFR, PAMR or TLP (presets ``cliper/<dataset>``).
        trident: Trident's splice-then-segment pipeline (:mod:`resclip.trident`: sub-images of
            ``slide_crop`` / ``slide_stride`` through CLIP + DINO, spliced, aggregated by SAM's
            attention over the whole image) instead of the window protocol; it reads ``short_side``,
            ``long_side``, ``slide_crop``, ``slide_stride``, ``logit_scale`` and ``prob_thd``, and needs
            the ``trident`` method without RCS, SFR, PAMR, TLP or the area filter (``trident/<dataset>``).
        sam_refine: Trident's SAM refinement of the final mask and class probabilities, after any
            method and protocol (PAMR and TLP included): the coarse regions become box + point
            prompts for SAM (:func:`resclip.trident.sam_refine`); needs an auxiliary SAM
            (``aux_pretrained={"sam": PATH}``). None = off.
        region_vote: CorrCLIP's map correction after any method (and after ``sam_refine``): every
            region of the image's instance map takes its most frequent class
            (:func:`resclip.corrclip.vote`); the regions come with the image (``predict(...,
            regions=)``) or from SAM 2's automatic masks (an auxiliary ``sam``). The
            probabilities are left as they were.
    """

    short_side: int = 336
    long_side: int = 2048
    slide_crop: int = 224
    slide_stride: int = 112
    logit_scale: float = 40.0
    prob_thd: float = 0.0
    area_thd: float | None = None
    pamr_steps: int = 0
    pamr_dilations: tuple[int, ...] = (8, 16)
    tlp: TLPConfig | None = None
    window_multiple: int = 0
    cliper: CLIPerProtocol | None = None
    trident: TridentProtocol | None = None
    sam_refine: SAMRefineConfig | None = None
    region_vote: bool = False

    def __post_init__(self) -> None:
        integers = ("short_side", "long_side", "slide_crop", "slide_stride", "pamr_steps", "window_multiple")
        for name in integers:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an integer, got {value!r}")
        for name in ("logit_scale", "prob_thd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if self.short_side < 1 or self.long_side < 1:
            raise ValueError(
                f"short_side and long_side must be >= 1, got {self.short_side}, {self.long_side}"
            )
        if self.slide_crop < 0:
            raise ValueError(f"slide_crop must be >= 0 (0 = whole image), got {self.slide_crop}")
        if self.slide_crop > 0 and not self.slide_stride > 0:
            raise ValueError(f"slide_stride must be > 0, got {self.slide_stride}")
        if self.slide_crop > 0 and self.slide_stride > self.slide_crop:
            raise ValueError(
                f"slide_stride={self.slide_stride} must not exceed slide_crop={self.slide_crop}: the windows "
                "would leave pixels that no window covers"
            )
        if not self.logit_scale > 0:
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale}")
        if not 0.0 <= self.prob_thd <= 1.0:
            raise ValueError(f"prob_thd must be in [0, 1], got {self.prob_thd}")
        if self.area_thd is not None and not 0.0 <= self.area_thd <= 1.0:
            raise ValueError(f"area_thd must be None or in [0, 1], got {self.area_thd}")
        if self.pamr_steps < 0:
            raise ValueError(f"pamr_steps must be >= 0, got {self.pamr_steps}")
        if self.region_vote and (self.cliper is not None or self.trident is not None):
            pipeline = "CLIPer's" if self.cliper is not None else "Trident's"
            raise ValueError(f"region_vote votes on a window method's mask; {pipeline} own pipeline does not "
                             "apply it: use region_vote=False, or a window preset (e.g. preset='default')")
        if self.window_multiple < 0:
            raise ValueError(f"window_multiple must be >= 0 (0 = no padding), got {self.window_multiple}")
        if self.tlp is not None and not isinstance(self.tlp, TLPConfig):
            raise TypeError(f"tlp must be a resclip.tlp.TLPConfig or None, got {self.tlp!r}")
        if self.cliper is not None:
            if not isinstance(self.cliper, CLIPerProtocol):
                raise TypeError(
                    f"cliper must be a resclip.cliper_protocol.CLIPerProtocol or None, got {self.cliper!r}")
            if self.pamr_steps or self.tlp is not None or self.sam_refine is not None:
                raise ValueError("the cliper pipeline has its own refinement: use pamr_steps=0, tlp=None and "
                                 "sam_refine=None with it")
        if self.trident is not None:
            if not isinstance(self.trident, TridentProtocol):
                raise TypeError(
                    f"trident must be a resclip.trident.TridentProtocol or None, got {self.trident!r}")
            if self.pamr_steps or self.tlp is not None or self.area_thd is not None:
                raise ValueError("the trident pipeline refines with SAM only: use pamr_steps=0, tlp=None and "
                                 "area_thd=None with it")
            if self.cliper is not None:
                raise ValueError("choose one image pipeline: cliper or trident, not both")
        if self.sam_refine is not None and not isinstance(self.sam_refine, SAMRefineConfig):
            raise TypeError(
                f"sam_refine must be a resclip.trident.SAMRefineConfig or None, got {self.sam_refine!r}")


QUERY_BLOCK = 64  # above this many queries, sums over queries run in this fixed order (see query_sum)


def ensure_finite(tensor: torch.Tensor, stage: str, cause: str | None = None) -> torch.Tensor:
    """Raise when ``tensor`` holds NaN or infinite values, naming the stage; return it otherwise.

    One ``isfinite().all()``: negligible next to the computation that produced the tensor.

    Raises:
        ValueError: ``non-finite values in <stage> (NaN/inf): <cause>``.
    """
    if not bool(torch.isfinite(tensor).all()):
        why = cause or (
            "the checkpoint's weights are probably broken (e.g. scaled out of range); check the file "
            "given as pretrained="
        )
        raise ValueError(f"non-finite values in {stage} (NaN/inf): {why}")
    return tensor


def block_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 as a pairwise tree of element-wise additions.

    The order of the additions depends only on ``x.shape[0]`` (never on the other sizes, the
    memory layout or the thread count, unlike ``Tensor.sum``), so a block gives the same bits
    wherever it comes from.
    """
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        pairs = x[:half] + x[half : 2 * half]
        x = torch.cat([pairs, x[2 * half :]]) if x.shape[0] % 2 else pairs
    return x[0]


def query_sum(x: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of ``(n, ...)`` query terms over dim 0 in blocks of :data:`QUERY_BLOCK`.

    Each block is summed by :func:`block_sum`, and the block sums are added in order to
    ``total`` (a running sum of the preceding blocks, updated in place), so queries processed in
    groups whose sizes are multiples of the block give the same bits as all queries at once.
    """
    for start in range(0, x.shape[0], QUERY_BLOCK):
        part = block_sum(x[start : start + QUERY_BLOCK])
        total = part.clone() if total is None else total.add_(part)
    assert total is not None
    return total


def class_probabilities(
    logits: torch.Tensor, query_to_class: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """Softmax over queries, then the max over each class's synonyms.

    Up to :data:`QUERY_BLOCK` queries this is ``torch.softmax``; above, the softmax's sum runs in
    the fixed order of :func:`query_sum`, so that classes processed in groups reproduce it
    exactly (the two differ by float rounding only).

    Args:
        logits: ``(Q, ...)`` cosine logits.
        query_to_class: ``(Q,)`` int64.

    Returns:
        ``(C, ...)`` class probabilities (not renormalised).
    """
    scaled = logit_scale * logits.float()
    if scaled.shape[0] <= QUERY_BLOCK:
        probs = torch.softmax(scaled, dim=0)
    else:
        terms = torch.exp(scaled - scaled.max(dim=0).values)
        probs = terms.div_(query_sum(terms))
    return class_max(probs[None], query_to_class)[0]


def area_keep(area: torch.Tensor, area_thd: float) -> torch.Tensor:
    """SCLIP's area filter as ``(C,)`` 1/0 weights.

    Args:
        area: ``(C,)`` pixel counts of each class in the first argmax map (class 0 = background).
        area_thd: a foreground class is kept when its area exceeds this share of all
            foreground pixels; background is always kept.
    """
    fg = area[1:].float()
    keep = torch.ones(area.shape[0], device=area.device)
    keep[1:] = (fg > area_thd * fg.sum()).float()
    return keep


def threshold_argmax(class_probs: torch.Tensor, prob_thd: float) -> torch.Tensor:
    """Argmax over classes (dim 0); pixels whose top probability is below ``prob_thd`` get 0."""
    top, mask = class_probs.max(dim=0)
    return mask.masked_fill(top < prob_thd, 0)


def labels_from_logits(
    logits: torch.Tensor, query_to_class: torch.Tensor, logit_scale: float, prob_thd: float
) -> torch.Tensor:
    """Mask straight from query logits, without materialising probabilities.

    The class with the highest (synonym-max) probability is the class of the highest-scoring
    query, and that probability is ``1 / sum_q exp(s * (l_q - l_max))``; so this equals
    ``threshold_argmax(class_probabilities(...))`` without the ``(C, ...)`` tensors.

    Args:
        logits: ``(Q, H, W)`` query logits; query_to_class ``(Q,)`` int64.

    Returns:
        ``(H, W)`` int64 class indices.
    """
    top, query = logits.max(dim=0)
    labels = query_to_class[query]
    if prob_thd > 0:
        terms = torch.exp(logit_scale * (logits - top))
        denom = terms.sum(dim=0) if logits.shape[0] <= QUERY_BLOCK else query_sum(terms)
        labels = labels.masked_fill(denom.reciprocal() < prob_thd, 0)
    return labels


def predict_mask(
    class_probs: torch.Tensor, prob_thd: float, area_thd: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax over classes with the background threshold (and SCLIP's area filter), whole map.

    Args:
        class_probs: ``(C, H, W)`` class probabilities.
        prob_thd: pixels whose top probability is below it get class 0.
        area_thd: see :class:`Protocol`.

    Returns:
        ``(H, W)`` int64 mask and the ``(C, H, W)`` probabilities after the area filter.
    """
    if area_thd is not None:
        area = torch.bincount(class_probs.argmax(dim=0).flatten(), minlength=class_probs.shape[0])
        class_probs = class_probs * area_keep(area, area_thd).view(-1, 1, 1)
    return threshold_argmax(class_probs, prob_thd), class_probs


def renormalise(class_probs: torch.Tensor) -> torch.Tensor:
    """Divide class probabilities by their sum over classes (dim 0).

    Above :data:`QUERY_BLOCK` classes the sum runs in :func:`query_sum`'s fixed order, which does
    not depend on the band's shape.
    """
    if class_probs.shape[0] <= QUERY_BLOCK:
        return class_probs / class_probs.sum(dim=0, keepdim=True).clamp_min(1e-12)
    return class_probs / query_sum(class_probs).clamp_min(1e-12)
