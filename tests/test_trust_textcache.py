"""The text-embedding cache and the weight digests never hand out stale or damaged values (issue 10, §2)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import resclip
import resclip.digest as digest
from resclip.text import TEMPLATES, EmbeddingCache, encode_queries, text_fingerprint

FAST = {"short_side": 64, "rcs_layers": (2, 3), "sfr": False}
LONG = " ".join(["extraordinarily"] * 90)


@pytest.fixture(autouse=True)
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "cache"
    monkeypatch.setenv("RESCLIP_CACHE", str(root))
    digest._memo.clear()
    yield root
    digest._memo.clear()


def _seg(ckpt: Path, cache: EmbeddingCache | bool = True) -> resclip.Segmenter:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "matches no known open_clip architecture"
        return resclip.create_segmenter(preset="voc21", pretrained=str(ckpt), text_cache=cache, **FAST)


def _fresh(seg: resclip.Segmenter, queries: list[str]) -> torch.Tensor:
    assert seg.model is not None
    return encode_queries(seg.model, seg.tokenizer, queries)


def _token_id(seg: resclip.Segmenter, word: str) -> int:
    ids = seg.tokenizer([word])[0]
    return int(ids[1])  # after the start token


def test_swapped_token_rows_do_not_share_cache_entries(tiny64: Path, tmp_path: Path) -> None:
    a = _seg(tiny64, EmbeddingCache(tmp_path / "text"))
    cat, dog = _token_id(a, "cat"), _token_id(a, "dog")
    state = torch.load(tiny64, weights_only=True)
    rows = state["token_embedding.weight"]
    rows[[cat, dog]] = rows[[dog, cat]]
    swapped = tmp_path / "swapped.pt"
    torch.save(state, swapped)
    b = _seg(swapped, EmbeddingCache(tmp_path / "text"))  # same folder: a stale entry would be found
    assert a.fingerprint != b.fingerprint
    assert text_fingerprint(a.model) != text_fingerprint(b.model)  # type: ignore[arg-type]
    _, emb_a = a.encode_classes(["cat", "dog", "sky"])
    _, emb_b = b.encode_classes(["cat", "dog", "sky"])
    assert torch.equal(emb_b, _fresh(b, ["cat", "dog", "sky"]))
    assert not torch.equal(emb_a[0], emb_b[0])
    assert a.visual_digest == b.visual_digest  # only the text tower differs


@pytest.mark.parametrize("damage", ["short", "nan", "values", "fingerprint"])
def test_bad_entries_are_warned_about_recomputed_and_repaired(
    tiny64: Path, tmp_path: Path, damage: str
) -> None:
    directory = tmp_path / "text"
    seg = _seg(tiny64, EmbeddingCache(directory))
    _, good = seg.encode_classes(["cat", "dog"])
    cache = EmbeddingCache(directory)
    path = cache.path(cache.key(seg.fingerprint, "cat", TEMPLATES))
    if damage == "short":  # a well-formed entry (valid checksum) of the wrong length
        cache.put(seg.fingerprint, "cat", TEMPLATES, good[0, :-1])
        reason = "length 31, the model's is 32"
    elif damage == "nan":
        cache.put(seg.fingerprint, "cat", TEMPLATES, torch.full((32,), float("nan")))
        reason = "NaN"
    elif damage == "values":  # same shape and dtype, other values: only the checksum tells
        entry = torch.load(path, weights_only=True)
        entry["embedding"] = torch.roll(entry["embedding"], 1)
        torch.save(entry, path)
        reason = "checksum mismatch"
    else:
        entry = torch.load(path, weights_only=True)
        entry["fingerprint"] = "another model"
        torch.save(entry, path)
        reason = "another model"
    again = _seg(tiny64, EmbeddingCache(directory))
    with pytest.warns(UserWarning, match=f"ignoring unreadable text-embedding cache file.*{reason}"):
        _, emb = again.encode_classes(["cat", "dog"])
    assert emb.shape == (2, 32) and torch.equal(emb, good)
    repaired = EmbeddingCache(directory).get(seg.fingerprint, "cat", TEMPLATES, dim=32)
    assert repaired is not None and torch.equal(repaired, good[0].cpu())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: no warning the next time
        _seg(tiny64, EmbeddingCache(directory)).encode_classes(["cat", "dog"])


def test_wrong_length_entries_without_a_text_tower_give_a_clear_error(tiny64: Path, tmp_path: Path) -> None:
    directory = tmp_path / "text"
    seg = _seg(tiny64, EmbeddingCache(directory))
    _, good = seg.encode_classes(["cat", "dog"])
    EmbeddingCache(directory).put(seg.fingerprint, "cat", TEMPLATES, good[0, :-1])
    released = _seg(tiny64, EmbeddingCache(directory))
    released.release_text_tower()
    with pytest.raises(ValueError, match=r"different lengths \[31, 32\].*cannot be recomputed"):
        released.encode_classes(["cat", "dog"])


def test_truncation_warning_also_for_cached_names(tiny64: Path, tmp_path: Path) -> None:
    directory = tmp_path / "text"
    seg = _seg(tiny64, EmbeddingCache(directory))
    message = r"queries \['extra.*longer than the text encoder's context of 77 tokens"
    with pytest.warns(UserWarning, match=message):
        seg.encode_classes(["sky", LONG])  # computed
    with pytest.warns(UserWarning, match=message):
        seg.encode_classes(["sky", LONG])  # from memory
    reader = _seg(tiny64, EmbeddingCache(directory))
    reader.release_text_tower()
    with pytest.warns(UserWarning, match=message):
        reader.encode_classes(["sky", LONG])  # from the file, without a text tower
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="only one class")  # a one-class list: not this test's
        reader.encode_classes(["sky"])


def test_weight_digests_are_remembered_per_file(
    tiny64: Path, tmp_path: Path, monkeypatch, cache_root
) -> None:
    ckpt = tmp_path / "model.pt"
    torch.save(torch.load(tiny64, weights_only=True), ckpt)
    calls = {"n": 0}
    real = digest.tower_digests

    def counting(model: torch.nn.Module) -> tuple[str, str]:
        calls["n"] += 1
        return real(model)

    monkeypatch.setattr(digest, "tower_digests", counting)
    first = _seg(ckpt, False)
    assert calls["n"] == 1 and (cache_root / "digests.json").is_file()
    assert first.visual_digest == digest.module_digest(first.engine.visual)  # what state_key falls back to
    assert (first.visual_digest, first.fingerprint.rsplit("|", 1)[1]) == real(first.model)  # type: ignore[arg-type]
    _seg(ckpt, False)
    digest._memo.clear()  # a new process: read from digests.json
    second = _seg(ckpt, False)
    assert calls["n"] == 1 and second.fingerprint == first.fingerprint
    # replaced in place with other visual weights, same size and modification time
    stat = os.stat(ckpt)
    state = torch.load(ckpt, weights_only=True)
    state["visual.proj"] += 1
    torch.save(state, ckpt)
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(ckpt).st_size == stat.st_size and os.stat(ckpt).st_mtime_ns == stat.st_mtime_ns
    third = _seg(ckpt, False)
    assert calls["n"] == 2
    assert third.visual_digest != first.visual_digest and third.fingerprint == first.fingerprint


def test_random_weights_are_digested(tiny_arch: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        segs = [resclip.create_segmenter(model=tiny_arch, pretrained=None, **FAST) for _ in range(2)]
    assert len({s.visual_digest for s in segs}) == 2 and len({s.fingerprint for s in segs}) == 2
    assert all(len(s.visual_digest) == 64 for s in segs)
