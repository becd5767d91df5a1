"""One segmenter shared by many threads, as in a web server, and the text-embedding cache under
concurrent use (issue 5): threaded results equal sequential ones, and the cache stays consistent."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import resclip
from resclip.text import TEMPLATES, EmbeddingCache, encode_queries, parse_classes

SMALL: dict[str, Any] = {"short_side": 64, "slide_crop": 64, "slide_stride": 32, "rcs_layers": (2, 3)}
THREADS = 6

# (image size, class lines); some jobs pass their own embeddings, the others use the text encoder
JOBS: list[tuple[tuple[int, int], list[str]]] = [
    ((40, 60), ["sky, clouds", "cat", "dog"]),
    ((64, 48), ["road", "car, truck, bus"]),
    ((33, 90), ["tree", "grass", "sky", "person, man, woman"]),
    ((50, 50), ["cat"]),
    ((90, 30), ["wall", "floor", "ceiling", "window", "door"]),
    ((48, 64), ["sky, clouds", "cat", "dog"]),
]
VOCABULARY = ["sky", "cat", "dog", "tree", "road", "car", "boat", "water", "snow", "wall", "person", "grass"]


def make_segmenter(ckpt: Path, method: str = "naclip", rcs: bool = True, sfr: bool = True, **kw: Any):
    settings = {**SMALL, **kw}
    text_cache = settings.pop("text_cache", False)
    return resclip.create_segmenter(
        method=method,
        rcs=rcs,
        sfr=sfr,
        preset="ade20k",
        pretrained=str(ckpt),
        text_cache=text_cache,
        **settings,
    )


def job_image(index: int) -> np.ndarray:
    h, w = JOBS[index][0]
    rng = np.random.default_rng(100 + index)
    img = np.zeros((h, w, 3))
    img[: h // 2] = rng.integers(0, 256, 3)
    img[h // 2 :] = rng.integers(0, 256, 3)
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)


def job_embeddings(index: int) -> np.ndarray | None:
    if index % 2 == 0:
        return None
    queries = parse_classes(JOBS[index][1]).num_queries
    return np.random.default_rng(200 + index).normal(size=(queries, 32)).astype(np.float32)


def run_together(fn: Callable[[int], Any], indices: list[int], workers: int = THREADS) -> list[Any]:
    """Call ``fn(i)`` for every index from ``workers`` threads released at the same moment."""
    barrier = threading.Barrier(min(workers, len(indices)))

    def call(i: int) -> Any:
        barrier.wait(timeout=60)
        return fn(i)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(call, i) for i in indices]
        return [f.result(timeout=300) for f in futures]


def assert_same(a: resclip.SegResult, b: resclip.SegResult) -> None:
    assert a.class_names == b.class_names
    assert a.mask.dtype == b.mask.dtype
    assert np.array_equal(a.mask, b.mask)
    assert np.array_equal(a.logits, b.logits)
    assert np.array_equal(a.probs, b.probs)


@pytest.mark.parametrize(
    ("method", "rcs", "sfr", "extra"),
    [
        ("naclip", True, True, {}),
        ("clearclip", True, True, {"pamr_steps": 1, "prob_thd": 0.3, "area_thd": 0.1}),
    ],
)
def test_threads_give_the_sequential_results(tiny_ckpt, method, rcs, sfr, extra):
    seg = make_segmenter(tiny_ckpt, method, rcs, sfr, **extra)
    indices = list(range(len(JOBS)))

    def predict(i: int) -> resclip.SegResult:
        return seg.predict(job_image(i), JOBS[i][1], embeddings=job_embeddings(i))

    sequential = [predict(i) for i in indices]
    threaded = run_together(predict, indices)
    for ref, got in zip(sequential, threaded, strict=True):
        assert_same(ref, got)
    same_job = run_together(predict, [0] * THREADS)  # every thread on the same input
    for got in same_job:
        assert_same(sequential[0], got)


def test_lazy_probabilities_are_computed_once(tiny_ckpt):
    seg = make_segmenter(tiny_ckpt, pamr_steps=1)
    res = seg.predict(job_image(2), JOBS[2][1])
    seen = run_together(lambda _: res.probs, list(range(THREADS)))
    assert all(p is seen[0] for p in seen)
    np.testing.assert_allclose(seen[0].sum(axis=0), 1.0, atol=1e-5)


def _class_lists(seed: int, count: int) -> list[list[str]]:
    """Overlapping class lists over a small vocabulary, so that threads miss the same queries at once."""
    rng = np.random.default_rng(seed)
    lists = []
    for _ in range(count):
        words = list(rng.choice(VOCABULARY, size=int(rng.integers(2, 6)), replace=False))
        if rng.random() < 0.5:  # a class with synonyms
            words[0] = f"{words[0]}, {words[-1]}"
            words.pop()
        lists.append(words)
    return lists


def _check_cache_files(directory: Path, fingerprint: str, seg: resclip.Segmenter, queries: set[str]) -> None:
    files = sorted(directory.glob("*.pt"))
    assert len(files) == len(queries)
    assert not list(directory.glob(".tmp-*")), "a temporary file was left behind"
    fresh = EmbeddingCache(directory)  # nothing in memory: every entry is read back from its file
    for query in sorted(queries):
        stored = fresh.get(fingerprint, query, TEMPLATES)
        assert stored is not None and stored.dtype == torch.float32 and stored.shape == (32,)
        computed = encode_queries(seg.model, seg.tokenizer, [query])[0]
        torch.testing.assert_close(stored, computed, atol=1e-6, rtol=0)


def _cache_warnings(recwarn: pytest.WarningsRecorder) -> list[str]:
    return [str(w.message) for w in recwarn if "cache" in str(w.message)]


def test_a_new_cache_given_to_create_segmenter_is_used(tiny_ckpt, tmp_path):
    cache = EmbeddingCache(tmp_path / "text")  # empty, so len(cache) == 0
    seg = make_segmenter(tiny_ckpt, text_cache=cache)
    assert seg.text_cache is cache


@pytest.mark.slow
def test_text_cache_shared_by_threads(tiny_ckpt, tmp_path, recwarn):
    directory = tmp_path / "text"
    cache = EmbeddingCache(directory)
    seg = make_segmenter(tiny_ckpt, text_cache=cache)
    reference = make_segmenter(tiny_ckpt)  # no cache
    lists = _class_lists(0, 12)
    image = job_image(0)

    def predict(i: int) -> resclip.SegResult:
        return seg.predict(image, lists[i])

    threaded = run_together(predict, list(range(len(lists))))
    again = run_together(predict, list(range(len(lists))))  # now every query is a memory hit
    for i, classes in enumerate(lists):
        want = reference.predict(image, classes)
        for got in (threaded[i], again[i]):
            assert np.array_equal(got.mask, want.mask)
            np.testing.assert_allclose(got.logits, want.logits, atol=1e-6, rtol=0)
    queries = {q for classes in lists for q in parse_classes(classes).queries}
    assert len(cache) == len(queries)
    _check_cache_files(directory, seg.fingerprint, seg, queries)
    assert not _cache_warnings(recwarn)


@pytest.mark.slow
def test_two_caches_on_one_directory_with_evictions(tiny_ckpt, tmp_path, recwarn):
    """Two caches (as two processes would) that keep one entry in memory: constant disk traffic."""
    directory = tmp_path / "shared"
    caches = [EmbeddingCache(directory, max_memory_items=1) for _ in range(2)]
    segs = [make_segmenter(tiny_ckpt, text_cache=c) for c in caches]
    reference = make_segmenter(tiny_ckpt)
    lists = _class_lists(1, 12)
    image = job_image(5)

    def predict(i: int) -> resclip.SegResult:
        return segs[i % 2].predict(image, lists[i])

    results = run_together(predict, list(range(len(lists))))
    for classes, got in zip(lists, results, strict=True):
        want = reference.predict(image, classes)
        assert np.array_equal(got.mask, want.mask)
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-6, rtol=0)
    queries = {q for classes in lists for q in parse_classes(classes).queries}
    _check_cache_files(directory, segs[0].fingerprint, segs[0], queries)

    # concurrent reads and rewrites of the same entries
    fresh = EmbeddingCache(directory, max_memory_items=1)
    ordered = sorted(queries)
    values = {q: fresh.get(segs[0].fingerprint, q, TEMPLATES) for q in ordered}

    def touch(i: int) -> bool:
        query = ordered[i % len(ordered)]
        if i % 3 == 0:
            fresh.put(segs[0].fingerprint, query, TEMPLATES, values[query])
        got = caches[i % 2].get(segs[0].fingerprint, query, TEMPLATES)
        return got is not None and torch.equal(got, values[query])

    assert all(run_together(touch, list(range(48))))
    assert not _cache_warnings(recwarn)
