"""Inference protocol: resizing, windows, and turning logits into masks."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .sfr import class_max


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

    def __post_init__(self) -> None:
        for name in ("short_side", "long_side", "slide_crop", "slide_stride", "pamr_steps"):
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


def class_probabilities(
    logits: torch.Tensor, query_to_class: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """Softmax over queries, then the max over each class's synonyms.

    Args:
        logits: ``(Q, ...)`` cosine logits.
        query_to_class: ``(Q,)`` int64.

    Returns:
        ``(C, ...)`` class probabilities (not renormalised).
    """
    probs = torch.softmax(logit_scale * logits.float(), dim=0)
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
        denom = torch.exp(logit_scale * (logits - top)).sum(dim=0)
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
    """Divide class probabilities by their sum over classes (dim 0)."""
    return class_probs / class_probs.sum(dim=0, keepdim=True).clamp_min(1e-12)
