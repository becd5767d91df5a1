"""mIoU against hand-computed confusion matrices and an mmseg-style histogram reference."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resclip.datasets import get_dataset_spec, list_samples, read_label
from resclip.metrics import (
    ConfusionMatrix,
    compute_metrics,
    confusion_matrix,
    densify,
    format_table,
    markdown_table,
    percent,
    sparse_confusion,
    unassigned_counts,
)

BENCH = Path(__file__).parent / "data" / "benchmarks"


def test_hand_computed_confusion_and_scores():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 1]])
    cm = confusion_matrix(pred, gt, 4)
    # rows = ground truth, columns = prediction; the two 255 pixels do not count
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    m = compute_metrics(cm)
    # IoU: c0 = 1/(2+2-1), c1 = 2/(2+3-2), c2 = 1/(2+1-1), c3 absent from both -> NaN
    np.testing.assert_allclose(m.iou[:3], [1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(m.iou[3]) and math.isnan(m.acc[3])
    assert m.miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    np.testing.assert_allclose(m.acc[:3], [1 / 2, 1, 1 / 2])
    assert m.aacc == pytest.approx(4 / 6) and m.macc == pytest.approx(2 / 3) and m.num_pixels == 6
    assert percent(m.miou) == 50.0 and percent(float("nan")) is None


def test_class_predicted_but_absent_from_gt_counts_as_zero():
    gt = np.array([0, 0, 0, 0])
    pred = np.array([0, 0, 0, 1])
    m = compute_metrics(confusion_matrix(pred, gt, 3))
    assert m.iou[1] == 0.0 and math.isnan(m.iou[2])  # 1: union > 0 -> 0; 2: absent from both -> NaN
    assert m.miou == pytest.approx((3 / 4 + 0) / 2)
    assert math.isnan(m.acc[1])  # accuracy is per GT class: absent from GT -> NaN


def test_ground_truth_as_prediction_gives_100_on_real_labels():
    for name, root in (
        ("voc21", BENCH / "VOCdevkit/VOC2012"),
        ("ade20k", BENCH / "ADEChallengeData2016"),
        ("coco_stuff", BENCH / "coco_stuff164k"),
    ):
        spec = get_dataset_spec(name)
        acc = ConfusionMatrix(spec.num_classes)
        present: set[int] = set()
        for s in list_samples(spec, root):
            gt = read_label(s.label, spec)
            pred = np.where(gt == 255, 0, gt)  # any value at ignored pixels
            acc.update(pred, gt)
            present |= set(np.unique(gt).tolist()) - {255}
        m = acc.compute()
        assert m.miou == 1.0 and m.aacc == 1.0 and m.macc == 1.0, name
        assert set(np.flatnonzero(~np.isnan(m.iou)).tolist()) == present  # absent classes are NaN, excluded


def test_all_ignore_gives_nan():
    m = compute_metrics(confusion_matrix(np.zeros((2, 2)), np.full((2, 2), 255), 3))
    assert math.isnan(m.miou) and math.isnan(m.aacc) and m.num_pixels == 0


def _mmseg_reference(preds: list[np.ndarray], gts: list[np.ndarray], c: int) -> np.ndarray:
    """mmseg IoUMetric: per image, histograms of intersection / pred / label over valid pixels; sum; I/U."""
    tot = np.zeros((3, c))
    for p, g in zip(preds, gts, strict=True):
        keep = g != 255
        p, g = p[keep], g[keep]
        inter = p[p == g]
        tot[0] += np.histogram(inter, bins=c, range=(0, c - 1))[0]
        tot[1] += np.histogram(p, bins=c, range=(0, c - 1))[0]
        tot[2] += np.histogram(g, bins=c, range=(0, c - 1))[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return tot[0] / (tot[1] + tot[2] - tot[0])


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 9), st.integers(0, 2**31 - 1))
def test_matches_mmseg_histogram_reference(c: int, seed: int):
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    acc = ConfusionMatrix(c)
    for _ in range(3):
        shape = tuple(rng.integers(1, 12, size=2))
        g = rng.integers(0, c, size=shape)
        g[rng.random(shape) < 0.2] = 255
        p = rng.integers(0, max(1, c - 1), size=shape)  # the last class is never predicted
        preds.append(p)
        gts.append(g)
        acc.update(p, g)
    np.testing.assert_allclose(acc.compute().iou, _mmseg_reference(preds, gts, c), equal_nan=True)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_ignore_pixels_never_count(seed: int):
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 5, size=(6, 7))
    g[rng.random(g.shape) < 0.4] = 255
    p = rng.integers(0, 5, size=g.shape)
    other = np.where(g == 255, rng.integers(0, 5, size=g.shape), p)
    np.testing.assert_array_equal(confusion_matrix(p, g, 5), confusion_matrix(other, g, 5))


def test_merge_of_shards_equals_whole():
    rng = np.random.default_rng(0)
    data = [(rng.integers(0, 4, (5, 5)), rng.integers(0, 4, (5, 5))) for _ in range(6)]
    whole, a, b = ConfusionMatrix(4), ConfusionMatrix(4), ConfusionMatrix(4)
    for i, (p, g) in enumerate(data):
        whole.update(p, g)
        (a if i % 2 else b).update(p, g)
    np.testing.assert_array_equal(a.merge(b).matrix, whole.matrix)
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(ConfusionMatrix(3))


def test_sparse_form_and_torch_input():
    p = torch.tensor([[0, 1], [1, 1]])
    g = torch.tensor([[0, 1], [0, 255]], dtype=torch.uint8)
    idx, counts = sparse_confusion(p, g, 2)
    assert idx.tolist() == [0, 1, 3] and counts.tolist() == [1, 1, 1] and idx.dtype == np.int64


def test_bad_inputs():
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 2)
    with pytest.raises(ValueError, match=r"ground truth has values outside 0\.\.1"):
        confusion_matrix(np.zeros((1, 2)), np.array([[0, 7]]), 2)
    with pytest.raises(ValueError, match=r"prediction has values outside 0\.\.1"):
        confusion_matrix(np.array([[0, 2]]), np.zeros((1, 2)), 2)
    with pytest.raises(ValueError, match="square"):
        compute_metrics(np.zeros((2, 3)))


def test_tables_show_names_and_nan():
    m = compute_metrics(np.array([[2, 0], [0, 0]]))
    text = format_table(m, ["background", "cat"])
    assert "background" in text and "100.00" in text and "nan" in text and "mIoU 100.00" in text
    md = markdown_table(m, ["background", "cat"])
    assert "| cat | nan | nan |" in md and "| 100.00 | 100.00 | 100.00 |" in md


def test_docstring_examples():
    import doctest

    import resclip.metrics

    assert doctest.testmod(resclip.metrics).failed == 0


def test_unassigned_predictions_are_misses_of_their_true_class():
    gt = np.array([[0, 0, 1, 1], [1, 1, 255, 0]])
    pred = np.array([[0, 255, 1, 255], [1, 0, 255, 255]])
    idx, counts = sparse_confusion(pred, gt, 2)
    # (gt 0, pred 0), (gt 1, pred 0), (gt 1, pred 1), then unassigned (4 + gt): class 0 twice, class 1 once
    assert idx.tolist() == [0, 2, 3, 4, 5] and counts.tolist() == [1, 1, 2, 2, 1]
    cm = ConfusionMatrix(2)
    cm.update(pred, gt)
    assert cm.matrix.tolist() == [[1, 0], [1, 2]] and cm.unassigned.tolist() == [2, 1]
    assert cm.stacked().tolist() == [[1, 0, 2], [1, 2, 1]]
    m = cm.compute()
    # class 0: I = 1, gt = 3 (two unassigned), pred = 2 -> 1 / 4; class 1: I = 2, gt 4, pred 2 -> 2 / 4
    assert m.iou.tolist() == [0.25, 0.5] and m.num_pixels == 7
    assert densify(idx, counts, 2).tolist() == [[1, 0], [1, 2]]
    assert unassigned_counts(idx, counts, 2).tolist() == [2, 1]
    with pytest.raises(ValueError, match=r"prediction has values outside 0\.\.1 \(and 255 = none\)"):
        sparse_confusion(np.array([[3]]), np.array([[0]]), 2)
