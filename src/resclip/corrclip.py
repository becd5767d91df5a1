"""Image-level parts of CorrCLIP (:mod:`resclip.methods.corrclip`): class-agnostic region masks and
the map correction (mask voting), as pure functions.

An *instance map* is an ``(H, W)`` integer label map of an image: pixels with the same label form
one region, and the smallest label present stands for "unsegmented" (0 where a mask generator left
pixels uncovered). CorrCLIP makes it once per image at the original size, with SAM 2's automatic
mask generator (:func:`generate_instance_map`) or from masks the user has (e.g. pre-generated ones):

1. :func:`instance_map` paints the generator's binary masks with labels ``1, 2, ...`` in order of
   increasing area (the release's order: a larger mask painted later overwrites a smaller one);
2. :func:`resize_instance_map` brings it to the resized image (nearest neighbour), and
   :func:`window_regions` cuts each sliding window's part of it, padded like the window
   (:func:`window_padding`, label :data:`PAD_LABEL` in the padding);
3. after the argmax, :func:`vote` gives every pixel of a region the most frequent label of that
   region (the map correction). It reads only the labels and the instance map, so it applies to the
   output of any method.

Release facts kept here (field of :class:`MaskGeneratorConfig` / argument: official value): the
generator settings (8 points per side, thresholds 0.4, one mask per point; the paper's pre-generated
masks use 32 points per side), painting by ascending area, the minimum label never voted (even when
it is a real mask, i.e. when nothing is unsegmented).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import preprocess

__all__ = [
    "PAD_LABEL",
    "PAINT_ORDERS",
    "RELEASE_REGION_FOLDERS",
    "MaskGeneratorConfig",
    "generate_instance_map",
    "instance_map",
    "resize_instance_map",
    "sam2_mask_generator",
    "vote",
    "window_padding",
    "window_regions",
]

#: label of the padding around a window (the release pads its mask crops with 10000)
PAD_LABEL = 10000
PAINT_ORDERS = ("area_ascending", "area_descending")
#: the sub-folder of the release's pre-generated masks (``region_masks.zip``) per benchmark, as its
#: ``configs/cfg_<dataset>.py`` name them (``instance_mask_path='data/region_masks/<folder>'``)
RELEASE_REGION_FOLDERS = {"voc21": "voc", "voc20": "voc", "context60": "context", "context59": "context",
                          "coco_object": "coco", "coco_stuff": "coco", "cityscapes": "city", "ade20k": "ade"}


@dataclass(frozen=True)
class MaskGeneratorConfig:
    """SAM 2's automatic mask generator as CorrCLIP runs it.

    Attributes:
        points_per_side: the point grid (official 8: the release's on-line generator; paper 32: the
            pre-generated masks its README says reproduce the paper, "SAM2_32").
        pred_iou_thresh: minimum predicted IoU of a kept mask.
        stability_score_thresh: minimum stability score of a kept mask.
        multimask_output: one mask per point (False) or SAM's three.
        paint_order: ``"area_ascending"`` (release: larger masks overwrite smaller ones) or
            ``"area_descending"`` (smaller masks stay on top).
    """

    points_per_side: int = 8  # official 8, paper 32
    pred_iou_thresh: float = 0.4
    stability_score_thresh: float = 0.4
    multimask_output: bool = False
    paint_order: str = "area_ascending"

    def __post_init__(self) -> None:
        if self.points_per_side < 1:
            raise ValueError(f"points_per_side must be >= 1, got {self.points_per_side}")
        if self.paint_order not in PAINT_ORDERS:
            raise ValueError(f"paint_order must be one of {PAINT_ORDERS}, got {self.paint_order!r}")

    def for_fidelity(self, fidelity: str) -> MaskGeneratorConfig:
        """The release's on-line setting (``"official"``) or the paper's 32 points per side."""
        return replace(self, points_per_side=32 if fidelity == "paper" else 8)

    def generator_options(self) -> dict[str, Any]:
        """Keywords of ``sam2.automatic_mask_generator.SAM2AutomaticMaskGenerator`` (others default)."""
        return {"points_per_side": self.points_per_side, "pred_iou_thresh": self.pred_iou_thresh,
                "stability_score_thresh": self.stability_score_thresh,
                "multimask_output": self.multimask_output}


def instance_map(masks: Sequence[Any], size: tuple[int, int], areas: Sequence[int] | None = None,
                 order: str = "area_ascending") -> torch.Tensor:
    """Paint binary masks into one label map.

    The masks are sorted by area (stable: equal areas keep their order), labelled ``1, 2, ...`` in
    that order and painted in that order, so a pixel covered by several masks takes the label of
    the last one painted. Pixels no mask covers are 0.

    Args:
        masks: ``(H, W)`` boolean arrays or tensors.
        size: ``(H, W)``.
        areas: the area of each mask (SAM's ``"area"``); default the pixel counts.
        order: ``"area_ascending"`` (the release) or ``"area_descending"``.

    Returns:
        ``(H, W)`` int64 labels (0 = no mask).

    Raises:
        ValueError: a mask of another size, an unknown order.
    """
    if order not in PAINT_ORDERS:
        raise ValueError(f"order must be one of {PAINT_ORDERS}, got {order!r}")
    out = torch.zeros(size, dtype=torch.int64)
    planes = [torch.as_tensor(np.asarray(m)).bool() for m in masks]
    for i, plane in enumerate(planes):
        if tuple(plane.shape) != tuple(size):
            raise ValueError(f"mask {i} is {tuple(plane.shape)}, the image is {tuple(size)}")
    keys = [int(a) for a in areas] if areas is not None else [int(p.sum()) for p in planes]
    if len(keys) != len(planes):
        raise ValueError(f"{len(planes)} masks but {len(keys)} areas")
    ranked = sorted(range(len(planes)), key=lambda i: keys[i], reverse=order == "area_descending")
    for label, i in enumerate(ranked, start=1):
        out[planes[i]] = label
    return out


def generate_instance_map(generator: Any, rgb: np.ndarray, order: str = "area_ascending") -> torch.Tensor:
    """Run an automatic mask generator on an image and paint its masks (:func:`instance_map`).

    Args:
        generator: an object with ``generate(rgb) -> list[dict]`` whose dicts hold a boolean
            ``"segmentation"`` and an ``"area"`` (SAM / SAM 2's ``AutomaticMaskGenerator``).
        rgb: ``(H, W, 3)`` uint8 RGB image at its original size.

    Returns:
        ``(H, W)`` int64 instance map (all 0 when the generator finds nothing).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    annotations: Sequence[Mapping[str, Any]] = generator.generate(rgb)
    return instance_map([a["segmentation"] for a in annotations], rgb.shape[:2],
                        [a["area"] for a in annotations], order)


def sam2_mask_generator(sam: Any, config: MaskGeneratorConfig | None = None) -> Any:
    """SAM 2's automatic mask generator with CorrCLIP's settings.

    Args:
        sam: the ``sam`` auxiliary model: a wrapper with ``mask_generator(**options)``
            (:func:`resclip.sam.load_sam`) or a ``sam2`` ``SAM2Base`` model.
        config: generator settings (default :class:`MaskGeneratorConfig`, the release's).

    Raises:
        ImportError: the ``sam2`` package is missing (``pip install 'resclip[sam]'``).
    """
    options = (config or MaskGeneratorConfig()).generator_options()
    if getattr(sam, "kind", "sam2") != "sam2":
        raise ValueError("CorrCLIP's region masks come from SAM 2's automatic mask generator, but the sam "
                         "model is a SAM (v1) checkpoint: pass a SAM 2 / 2.1 checkpoint (e.g. "
                         "sam2.1_hiera_large.pt) as --aux-pretrained sam=PATH")
    maker = getattr(sam, "mask_generator", None)
    if callable(maker):
        return maker(**options)
    try:
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    except ModuleNotFoundError:
        raise ImportError("CorrCLIP's region masks need SAM 2: pip install 'resclip[sam]'") from None
    return SAM2AutomaticMaskGenerator(sam, **options)


def resize_instance_map(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of an ``(H, W)`` label map to ``size`` (``F.interpolate``'s
    ``"nearest"``: source index ``floor(i * H / h)``), as int64."""
    if labels.dim() != 2:
        raise ValueError(f"expected an (H, W) label map, got shape {tuple(labels.shape)}")
    if tuple(labels.shape) == tuple(size):
        return labels.long()
    out = F.interpolate(labels[None, None].float(), size=tuple(size), mode="nearest")
    return out[0, 0].long()


def window_padding(h: int, w: int, multiple: int) -> tuple[int, int, int, int]:
    """Centred padding ``(left, right, top, bottom)`` that makes an ``h x w`` window a multiple of
    ``multiple`` on both sides (the smaller half on the left / top); zeros when it already is."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    return preprocess.window_padding(h, w, multiple)


def window_regions(labels: torch.Tensor, box: tuple[int, int, int, int],
                   pad: tuple[int, int, int, int] = (0, 0, 0, 0), fill: int = PAD_LABEL) -> torch.Tensor:
    """One window's part of the (resized) instance map, padded like the window.

    Args:
        labels: ``(H1, W1)`` instance map of the resized image.
        box: ``(y1, x1, y2, x2)``; pad: ``(left, right, top, bottom)`` (:func:`window_padding`).
        fill: label of the padding.

    Returns:
        ``(y2 - y1 + top + bottom, x2 - x1 + left + right)`` int64.
    """
    y1, x1, y2, x2 = box
    crop = labels[y1:y2, x1:x2].long()
    if any(pad):
        crop = F.pad(crop, pad, value=fill)
    return crop


def vote(labels: torch.Tensor, regions: torch.Tensor, skip_min: bool = True) -> torch.Tensor:
    """Map correction: every pixel of a region gets the region's most frequent label.

    Ties go to the smallest label (``torch.mode`` on CPU). The region with the smallest label (the
    unsegmented pixels) keeps its labels when ``skip_min`` (the release skips it even when it is a
    real mask).

    Args:
        labels: ``(H, W)`` int class labels (any method's mask, after thresholds).
        regions: ``(H, W)`` int instance map of the same size.

    Returns:
        ``(H, W)`` int64 corrected labels (a new tensor).

    Raises:
        ValueError: different sizes, or negative class labels.
    """
    if labels.shape != regions.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and instance map {tuple(regions.shape)} differ in "
                         "size; resize the instance map to the mask (nearest neighbour) first")
    flat = labels.reshape(-1).long()
    if flat.numel() == 0:
        return flat.view(labels.shape).clone()
    if int(flat.min()) < 0:
        raise ValueError("class labels must be >= 0 to vote")
    values, inverse = torch.unique(regions.reshape(-1), return_inverse=True)
    num_labels = int(flat.max()) + 1
    counts = torch.zeros(values.numel() * num_labels, dtype=torch.int64, device=flat.device)
    counts.index_add_(0, inverse * num_labels + flat, torch.ones_like(flat))
    winner = counts.view(values.numel(), num_labels).argmax(dim=1)  # first maximum: the smallest label
    out = winner[inverse]
    if skip_min:
        out = torch.where(inverse == 0, flat, out)
    return out.view(labels.shape)
