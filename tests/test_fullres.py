"""Many classes with bounded memory (issue 10, section 5): queries processed in groups.

The grouped path (``Segmenter.logits_budget`` exceeded) must give the same bits as the ungrouped
one, and its peak memory must not grow with the class count like the ``(Q, h1, w1)`` logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import resclip
from resclip.fullres import WindowLogits, query_groups
from resclip.protocol import QUERY_BLOCK, block_sum, class_probabilities, query_sum

SMALL: dict[str, Any] = {"short_side": 64, "slide_crop": 64, "slide_stride": 32, "rcs_layers": (2, 3)}
QUERIES = 197  # three groups of 64 queries, the last one 69


def make(ckpt: Path, sfr: bool = False, **kw: Any) -> resclip.Segmenter:
    return resclip.create_segmenter(pretrained=str(ckpt), sfr=sfr, text_cache=False, **{**SMALL, **kw})


def image(h: int = 90, w: int = 70, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3))
    img[:, : w // 2] = (200, 40, 40)
    img[:, w // 2 :] = (30, 90, 220)
    return np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)


def embeddings(q: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(q, 32)).astype(np.float32)


CASES: dict[str, dict[str, Any]] = {
    "plain-sfr": {"sfr": True},
    "prob-thd": {"prob_thd": 0.02},
    "area-thd": {"area_thd": 0.05, "prob_thd": 0.01},
    "pamr": {"pamr_steps": 2, "pamr_dilations": (1, 2), "prob_thd": 0.01},
    "padded-windows": {"window_multiple": 56},  # 64-pixel windows padded to 112
}


@pytest.mark.parametrize("case", list(CASES))
def test_grouped_queries_give_identical_results(tiny_ckpt, case):
    seg = make(tiny_ckpt, **CASES[case])
    classes = [f"class {i}" for i in range(QUERIES)]
    emb = embeddings(QUERIES)
    seg.band_budget = 64 * 70 * 40  # groups of 64 queries, several bands
    whole = seg.predict(image(), classes, embeddings=emb)
    seg.logits_budget = 0
    grouped = seg.predict(image(), classes, embeddings=emb)
    assert whole.full.source is None and isinstance(grouped.full.source, WindowLogits)
    assert grouped.full.groups == [(0, 64), (64, 128), (128, 197)]
    assert len(grouped.full.bands) > 1 and len(grouped.full.class_bands) > 1
    assert len(np.unique(whole.mask)) > 1
    assert np.array_equal(grouped.mask, whole.mask)
    assert np.array_equal(grouped.logits, whole.logits)  # rebuilt from the windows on access
    assert torch.equal(grouped.full.keep(), whole.full.keep())
    assert np.array_equal(grouped.full.logits_full(), whole.full.logits_full())
    if "pamr_steps" in CASES[case]:
        # PAMR's rounding follows the band's shape; the class bands here are thinner than PAMR's
        np.testing.assert_allclose(grouped.probs, whole.probs, atol=1e-6, rtol=0)
    else:
        assert np.array_equal(grouped.probs, whole.probs)


def test_window_logits_rows_equal_image_logits(tiny_ckpt):
    seg = make(tiny_ckpt, slide_stride=24)  # overlapping windows whose edges fall between patches
    x = seg.resized_input(image(77, 101))
    spec, text = seg.encode_classes([f"c{i}" for i in range(70)], embeddings(70))
    q2c = torch.tensor(spec.query_to_class)
    whole = seg.image_logits(x, text, q2c)
    source = seg.window_logits(x, text, q2c)
    assert torch.equal(source.full(), whole)
    h1 = whole.shape[1]
    for q0, q1, a, b in [(0, 64, 0, 1), (64, 70, 5, 9), (0, 40, 17, h1), (0, 70, h1 - 1, h1)]:
        assert torch.equal(source.rows(q0, q1, a, b), whole[q0:q1, a:b]), (q0, q1, a, b)


def test_query_sum_is_the_same_in_groups():
    terms = torch.rand(300, 7, 13)
    total = query_sum(terms)
    running = None
    for q0, q1 in query_groups(300, 128):
        running = query_sum(terms[q0:q1], running)
    assert running is not None and torch.equal(running, total)
    assert torch.equal(query_sum(terms[:, 2:5]), total[2:5])  # independent of the band's shape
    assert torch.equal(block_sum(terms[:5]), (terms[0] + terms[2]) + (terms[1] + terms[3]) + terms[4])
    np.testing.assert_allclose(total.numpy(), terms.sum(dim=0).numpy(), rtol=1e-5)
    # up to one block of queries the softmax is torch's own
    logits = torch.randn(QUERY_BLOCK, 3, 4)
    probs = class_probabilities(logits, torch.arange(QUERY_BLOCK), 40.0)
    assert torch.equal(probs, torch.softmax(40 * logits, 0))


def test_query_groups():
    assert query_groups(197, 64) == [(0, 64), (64, 128), (128, 197)]
    assert query_groups(129, 64) == [(0, 64), (64, 129)]  # a 1-query group would take another kernel
    assert query_groups(50, 64) == [(0, 50)]


MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np, torch
    import resclip
    torch.set_num_threads(1)
    ckpt, n = sys.argv[1], int(sys.argv[2])
    seg = resclip.create_segmenter(pretrained=ckpt, sfr=False, rcs_layers=(2, 3), text_cache=False)
    emb = np.random.default_rng(0).normal(size=(n, 32)).astype(np.float32)
    img = np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = seg.predict(img, [f"class {i}" for i in range(n)], embeddings=emb)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mb": (peak - base) / 1024, "classes": int(res.mask.max()) + 1}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's")
def test_many_classes_memory_is_bounded(tiny_ckpt):
    # 3,000 classes at 240 x 320 (resized 336 x 448, 224-pixel windows): the ungrouped path
    # holds (Q, 336, 448) averaged logits and (8, Q, 224, 224) upsampled windows, over 5 GB
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tiny_ckpt), "3000"],
        capture_output=True, text=True, timeout=900, env=env, check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["classes"] > 1
    assert result["growth_mb"] < 700, result


def test_padded_windows_by_hand(tiny_ckpt):
    """``window_multiple``: each window is zero-padded (centred) to the multiple, its logits are
    upsampled to the padded size and the padding cut off, as ProxyCLIP's release does."""
    import torch.nn.functional as F

    from resclip.preprocess import window_coords, window_padding

    seg = make(tiny_ckpt, window_multiple=40, slide_stride=24)
    x = seg.resized_input(image(77, 101))
    spec, text = seg.encode_classes([f"c{i}" for i in range(5)], embeddings(5))
    q2c = torch.tensor(spec.query_to_class)
    got = seg.image_logits(x, text, q2c)
    h1, w1 = x.shape[-2:]
    acc, count = torch.zeros(5, h1, w1), torch.zeros(1, h1, w1)
    for y1, x1, y2, x2 in window_coords(h1, w1, 64, 24):
        assert window_padding(y2 - y1, x2 - x1, 40) == (8, 8, 8, 8)
        crop = F.pad(x[:, :, y1:y2, x1:x2], (8, 8, 8, 8))
        up = F.interpolate(seg.engine.window_logits(crop, text, q2c), size=(80, 80), mode="bilinear",
                           align_corners=False)
        acc[:, y1:y2, x1:x2] += up[0, :, 8:72, 8:72]
        count[:, y1:y2, x1:x2] += 1
    torch.testing.assert_close(got, acc / count, rtol=0, atol=1e-6)
    unpadded = make(tiny_ckpt, slide_stride=24).image_logits(x, text, q2c)
    assert (got - unpadded).abs().max() > 1e-3  # the padding really reaches the network
    with pytest.raises(ValueError, match=r"window_multiple must be >= 0 \(0 = no padding\), got -1"):
        make(tiny_ckpt, window_multiple=-1)
