"""mIoU exactly as MMSegmentation's ``IoUMetric`` computes it.

One ``C x C`` confusion matrix (rows: ground truth, columns: prediction) is accumulated over the whole
dataset from the pixels whose ground truth is not 255; then ``IoU_c = I_c / U_c`` (0/0 -> NaN),
``mIoU = nanmean(IoU) * 100``, ``aAcc = sum(I) / sum(GT)``, ``Acc_c = I_c / GT_c``, ``mAcc = nanmean(Acc)``.
Counts are exact int64 (mmseg sums float32 histograms; identical at its 2-decimal rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = 255

ArrayLike = np.ndarray | torch.Tensor


def _as_tensor(x: ArrayLike, device: torch.device | None = None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    return t.to(device) if device is not None else t


def sparse_confusion(
    pred: ArrayLike, gt: ArrayLike, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> tuple[np.ndarray, np.ndarray]:
    """Confusion counts of one image in sparse form.

    Args:
        pred: ``(H, W)`` predicted class indices in ``[0, C)`` (numpy or torch, any integer dtype);
            ``ignore_index`` = no class predicted (a method that can leave a pixel unassigned, such
            as CLIPer's background on a dataset without one): a miss for the true class.
        gt: ``(H, W)`` ground truth in ``[0, C)``, ``ignore_index`` for pixels that do not count.
        num_classes: ``C``.
        ignore_index: ground-truth value to skip.

    Returns:
        ``(K,)`` int64 flat indices ``gt * C + pred`` (sorted, unique; ``C * C + gt`` for an
        unassigned pixel) and ``(K,)`` int64 pixel counts.

    Raises:
        ValueError: shapes differ, or values outside the class range.
    """
    p, g = _as_tensor(pred), _as_tensor(gt)
    g = g.to(p.device)
    if tuple(p.shape) != tuple(g.shape):
        raise ValueError(f"prediction {tuple(p.shape)} and ground truth {tuple(g.shape)} differ in shape")
    g = g.long()
    valid = g != ignore_index
    g, p = g[valid], p[valid].long()
    unassigned = p == ignore_index
    if g.numel():
        if int(g.min()) < 0 or int(g.max()) >= num_classes:
            raise ValueError(f"ground truth has values outside 0..{num_classes - 1} and {ignore_index}")
        if bool(((p < 0) | ((p >= num_classes) & ~unassigned)).any()):
            raise ValueError(
                f"prediction has values outside 0..{num_classes - 1} (and {ignore_index} = none)")
    flat = torch.where(unassigned, num_classes * num_classes + g, g * num_classes + p)
    counts = torch.bincount(flat, minlength=num_classes * num_classes)
    nz = torch.nonzero(counts).flatten()
    return nz.cpu().numpy().astype(np.int64), counts[nz].cpu().numpy().astype(np.int64)


def confusion_matrix(
    pred: ArrayLike, gt: ArrayLike, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """``(C, C)`` int64 confusion matrix of one image (rows: ground truth, columns: prediction).

    Example:
        >>> import numpy as np
        >>> confusion_matrix(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [0, 255]]), 2).tolist()
        [[1, 1], [0, 1]]
    """
    idx, counts = sparse_confusion(pred, gt, num_classes, ignore_index)
    return densify(idx, counts, num_classes)


def densify(idx: np.ndarray, counts: np.ndarray, num_classes: int) -> np.ndarray:
    """Sparse ``(K,)`` flat indices and counts -> ``(C, C)`` int64 matrix (unassigned pixels,
    ``idx >= C * C``, are left out: see :func:`unassigned_counts`)."""
    out = np.zeros(num_classes * num_classes, dtype=np.int64)
    inside = idx < num_classes * num_classes
    np.add.at(out, idx[inside], counts[inside])
    return out.reshape(num_classes, num_classes)


def unassigned_counts(idx: np.ndarray, counts: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C,)`` int64 pixels of each true class that got no class (flat indices ``C * C + gt``)."""
    out = np.zeros(num_classes, dtype=np.int64)
    outside = idx >= num_classes * num_classes
    np.add.at(out, idx[outside] - num_classes * num_classes, counts[outside])
    return out


@dataclass(frozen=True)
class SegMetrics:
    """Scores derived from a confusion matrix (fractions in [0, 1]; NaN = class absent).

    Attributes:
        iou: ``(C,)`` per-class IoU; NaN where the class is absent from prediction and ground truth.
        acc: ``(C,)`` per-class accuracy (recall); NaN where the class is absent from the ground truth.
        miou: mean of the non-NaN IoUs (NaN if all are NaN).
        aacc: pixel accuracy over all counted pixels.
        macc: mean of the non-NaN accuracies.
        num_pixels: counted (non-ignored) pixels.
    """

    iou: np.ndarray
    acc: np.ndarray
    miou: float
    aacc: float
    macc: float
    num_pixels: int


def _nanmean(x: np.ndarray) -> float:
    finite = x[~np.isnan(x)]
    return float(finite.mean()) if finite.size else math.nan


def compute_metrics(matrix: np.ndarray, unassigned: np.ndarray | None = None) -> SegMetrics:
    """IoU, accuracy and their means from a ``(C, C)`` confusion matrix (rows: ground truth) and
    the ``(C,)`` pixels of each true class that got no class (misses: in its union, no prediction's).

    Example:
        >>> import numpy as np
        >>> m = compute_metrics(np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]]))
        >>> [round(float(v), 4) for v in m.iou[:2]], bool(np.isnan(m.iou[2])), round(m.miou, 4)
        ([0.75, 0.6667], True, 0.7083)
    """
    cm = np.asarray(matrix, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    inter = np.diag(cm).astype(np.float64)
    area_gt = cm.sum(axis=1).astype(np.float64)
    if unassigned is not None:
        area_gt += np.asarray(unassigned, dtype=np.float64)
    area_pred = cm.sum(axis=0).astype(np.float64)
    union = area_gt + area_pred - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
        acc = inter / area_gt
    total = float(area_gt.sum())
    return SegMetrics(
        iou=iou,
        acc=acc,
        miou=_nanmean(iou),
        aacc=float(inter.sum() / total) if total else math.nan,
        macc=_nanmean(acc),
        num_pixels=int(total),
    )


class ConfusionMatrix:
    """Accumulates a dataset-level confusion matrix; mergeable by summation (multi-process).

    Example:
        >>> import numpy as np
        >>> cm = ConfusionMatrix(2)
        >>> cm.update(np.array([[0, 1]]), np.array([[0, 1]]))
        >>> round(cm.compute().miou, 2)
        1.0
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.unassigned = np.zeros(num_classes, dtype=np.int64)  # true-class pixels given no class

    def update(self, pred: ArrayLike, gt: ArrayLike) -> None:
        """Add one image: ``(H, W)`` prediction and ground truth."""
        idx, counts = sparse_confusion(pred, gt, self.num_classes, self.ignore_index)
        self.add_sparse(idx, counts)

    def add_sparse(self, idx: np.ndarray, counts: np.ndarray) -> None:
        """Add counts given as flat ``gt * C + pred`` indices (``C * C + gt``: unassigned)."""
        c = self.num_classes
        self.matrix += densify(idx, counts, c)
        self.unassigned += unassigned_counts(idx, counts, c)

    def stacked(self) -> np.ndarray:
        """``(C, C + 1)``: the matrix with the unassigned counts as a last column (one array to sum
        across processes)."""
        return np.concatenate([self.matrix, self.unassigned[:, None]], axis=1)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another accumulator's counts (same number of classes) into this one; returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class counts into {self.num_classes} classes")
        self.matrix += other.matrix
        self.unassigned += other.unassigned
        return self

    def compute(self) -> SegMetrics:
        """Metrics of everything added so far."""
        return compute_metrics(self.matrix, self.unassigned)


def percent(x: float, decimals: int = 2) -> float | None:
    """Fraction -> percent rounded as mmseg reports it; NaN -> None (JSON null)."""
    return None if math.isnan(x) else round(float(x) * 100.0, decimals)


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x * 100:.2f}"


def per_class_rows(metrics: SegMetrics, class_names: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(name, IoU %, Acc %)`` strings per class."""
    if len(class_names) != len(metrics.iou):
        raise ValueError(f"{len(class_names)} class names for {len(metrics.iou)} classes")
    return [(n, _fmt(i), _fmt(a)) for n, i, a in zip(class_names, metrics.iou, metrics.acc, strict=True)]


def format_table(metrics: SegMetrics, class_names: Sequence[str]) -> str:
    """Per-class table and the summary line, as plain text (mmseg's layout)."""
    rows = per_class_rows(metrics, class_names)
    width = max([5, *(len(r[0]) for r in rows)])
    lines = [f"{'Class':<{width}}  {'IoU':>6}  {'Acc':>6}", "-" * (width + 16)]
    lines += [f"{n:<{width}}  {i:>6}  {a:>6}" for n, i, a in rows]
    summary = f"aAcc {_fmt(metrics.aacc)}  mIoU {_fmt(metrics.miou)}  mAcc {_fmt(metrics.macc)}"
    lines += ["-" * (width + 16), summary]
    return "\n".join(lines)


def markdown_table(metrics: SegMetrics, class_names: Sequence[str]) -> str:
    """Summary and per-class table in Markdown."""
    lines = [
        "| mIoU | aAcc | mAcc |",
        "|---:|---:|---:|",
        f"| {_fmt(metrics.miou)} | {_fmt(metrics.aacc)} | {_fmt(metrics.macc)} |",
        "",
        "| class | IoU | Acc |",
        "|---|---:|---:|",
    ]
    lines += [f"| {n} | {i} | {a} |" for n, i, a in per_class_rows(metrics, class_names)]
    return "\n".join(lines) + "\n"
