"""Tests for resclip.text: class parsing, prompt templates, query embeddings (golden parity) and the cache."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

from resclip.clip import LoadedClip, load_clip
from resclip.text import (
    TEMPLATES,
    ClassSpec,
    EmbeddingCache,
    check_embeddings,
    encode_queries,
    parse_classes,
    query_embeddings,
    read_class_file,
    text_fingerprint,
)

DATA = Path(__file__).parent / "data" / "golden"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make accidental downloads fail fast (huggingface_hub reads HF_HUB_OFFLINE when imported)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(DATA / "golden_resclip.npz", allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files if key.startswith("text__")}


@pytest.fixture(scope="module")
def class_lines() -> dict[str, list[str]]:
    manifest = json.loads((DATA / "manifest.json").read_text())
    return {name: entry["lines"] for name, entry in manifest["class_files"].items()}


@pytest.fixture(scope="module")
def clip() -> LoadedClip:
    return load_clip(pretrained=str(DATA / "tiny_clip_b16_fp16.pt"))


@pytest.fixture
def count_prompts(clip: LoadedClip, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Count the prompts that go through ``encode_text``."""
    seen = [0]
    encode_text = cast(Any, clip.model).encode_text

    def counting(tokens: torch.Tensor) -> torch.Tensor:
        seen[0] += tokens.shape[0]
        return encode_text(tokens)

    monkeypatch.setattr(clip.model, "encode_text", counting)
    return lambda: seen[0]


# ------------------------------------------------------------------------------------ golden parity


def test_templates() -> None:
    assert len(TEMPLATES) == 80 and all(t.count("{}") == 1 for t in TEMPLATES)
    assert TEMPLATES[0] == "a bad photo of a {}."


def test_golden_token_ids_and_template_features(clip: LoadedClip, golden: dict[str, np.ndarray]) -> None:
    words = ["sky", "person in shirt", "television monitor", "bed"]
    tokens = torch.stack([clip.tokenizer([t.format(w) for t in TEMPLATES]) for w in words])
    np.testing.assert_array_equal(tokens.numpy(), golden["text__sample__token_ids"])
    with torch.no_grad():
        features = torch.stack([cast(Any, clip.model).encode_text(t) for t in tokens])
    np.testing.assert_allclose(
        features.numpy(), golden["text__sample__template_features_raw"], rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("name", ["voclike", "adelike"])
def test_golden_class_embeddings(
    name: str, clip: LoadedClip, golden: dict[str, np.ndarray], class_lines: dict[str, list[str]]
) -> None:
    spec = parse_classes(class_lines[name])
    np.testing.assert_array_equal(np.array(spec.query_to_class), golden[f"text__{name}__query_idx"])
    if name == "voclike":
        embeddings = encode_queries(clip.model, clip.tokenizer, spec.queries)
    else:  # the same through the cache-aware entry point
        embeddings = query_embeddings(clip.model, clip.tokenizer, spec, fingerprint="golden", cache=None)
    assert embeddings.dtype == torch.float32 and embeddings.shape == (spec.num_queries, 64)
    np.testing.assert_allclose(
        embeddings.numpy(), golden[f"text__{name}__class_embeddings"], rtol=0, atol=1e-5
    )


# ------------------------------------------------------------------------------------------ parsing


def test_parse_synonyms() -> None:
    spec = parse_classes(["sky, wall,tree ", "cat", " person , man"])
    assert spec.names == ("sky", "cat", "person")
    assert spec.queries == ("sky", "wall", "tree", "cat", "person", "man")
    assert spec.query_to_class == (0, 0, 0, 1, 2, 2)
    assert (spec.num_classes, spec.num_queries) == (3, 6)
    assert parse_classes(spec) is spec
    assert parse_classes(np.array(["sky, clouds", "cat"])).queries == ("sky", "clouds", "cat")


def test_parse_single_string() -> None:
    spec = parse_classes("cat; sofa; sky, clouds")
    assert spec.names == ("cat", "sofa", "sky") and spec.query_to_class == (0, 1, 2, 2)
    assert parse_classes("cat\nsofa\nsky, clouds\n").queries == ("cat", "sofa", "sky", "clouds")
    assert parse_classes("cat;dog;").names == ("cat", "dog")


def test_parse_matches_reference_split() -> None:
    lines = ["sky, wall, tree, grass", "aeroplane", "person, person in shirt", "wood "]
    reference = [syn for line in lines for syn in line.split(", ")]
    assert list(parse_classes(lines).queries) == [r.strip() for r in reference]


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ([], "empty"),
        ("", "empty"),
        (["cat", 3], r"classes\[1\] must be a string, got int"),
        (["cat", None], r"classes\[1\] must be a string, got NoneType"),
        (["cat", "  "], r"classes\[1\] is empty"),
        ("cat;;dog", r"classes\[1\] is empty"),
        (["cat,,dog"], r"classes\[0\] = 'cat,,dog' has an empty synonym at position 1"),
        (["dog", "cat, "], r"classes\[1\].*empty synonym at position 1"),
        (42, "must be a list"),
    ],
)
def test_parse_errors(classes: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_classes(classes)  # type: ignore[arg-type]


def test_duplicates_are_kept_with_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"duplicate class lines \['cat'\]"):
        spec = parse_classes(["cat", "dog", "cat"])
    assert spec.names == ("cat", "dog", "cat") and spec.query_to_class == (0, 1, 2)
    with pytest.warns(UserWarning, match=r"synonyms \['person'\] appear in several classes"):
        parse_classes(["person, man", "woman, person"])


def test_class_spec_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="same length"):
        ClassSpec(("a",), ("a", "b"), (0,))
    with pytest.raises(ValueError, match="every class index"):
        ClassSpec(("a", "b"), ("a",), (1,))


def test_read_class_file(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_bytes("\ufeffsky, wall\r\nwood \r\ncafé\n\n".encode())
    lines = read_class_file(path)
    assert lines == ["sky, wall", "wood ", "café"]
    assert parse_classes(lines).queries == ("sky", "wall", "wood", "café")
    assert read_class_file(str(path)) == lines


def test_read_class_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt.*not valid UTF-8"):
        read_class_file(path)
    with pytest.raises(FileNotFoundError):
        read_class_file(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------------------- encoding


def test_encode_queries_shape_norm_and_batching(clip: LoadedClip) -> None:
    templates = ["a photo of a {}.", "{}"]
    full = encode_queries(clip.model, clip.tokenizer, ["cat", "dog", "sky"], templates, batch_size=256)
    small = encode_queries(clip.model, clip.tokenizer, ["cat", "dog", "sky"], templates, batch_size=4)
    assert full.shape == (3, 64) and full.dtype == torch.float32
    torch.testing.assert_close(full.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(small, full, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"contain '\{\}'"):
        encode_queries(clip.model, clip.tokenizer, ["cat"], ["a photo"])
    with pytest.raises(ValueError, match="queries is empty"):
        encode_queries(clip.model, clip.tokenizer, [])


def test_encoding_shows_progress(clip: LoadedClip, capsys: pytest.CaptureFixture[str]) -> None:
    """A bar when asked (or on a terminal), one status line in logs, nothing when turned off."""
    encode_queries(clip.model, clip.tokenizer, ["cat", "dog", "sky"], batch_size=64, progress=True)
    err = capsys.readouterr().err
    assert "encoding 3 class names" in err and "240/240" in err
    encode_queries(clip.model, clip.tokenizer, ["cat", "dog", "sky"], batch_size=64)  # stderr is no terminal
    assert capsys.readouterr().err == "resclip: encoding 3 class names (240 prompts)...\n"
    encode_queries(clip.model, clip.tokenizer, ["cat", "dog", "sky"], batch_size=64, progress=False)
    encode_queries(clip.model, clip.tokenizer, ["cat"], ["{}"], batch_size=64)  # one batch: quick
    assert capsys.readouterr().err == ""


def test_random_weights_keep_class_embeddings_in_memory(
    count_prompts: Callable[[], int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """pretrained=None encodes a class list once per segmenter, and writes nothing to disk."""
    import resclip
    import resclip.factory

    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path))
    seen = [0]
    real = resclip.factory.load_clip

    def counting_load(*args: Any, **kwargs: Any) -> LoadedClip:
        loaded = real(*args, **kwargs)
        encode_text = cast(Any, loaded.model).encode_text

        def counting(tokens: torch.Tensor) -> torch.Tensor:
            seen[0] += tokens.shape[0]
            return encode_text(tokens)

        monkeypatch.setattr(loaded.model, "encode_text", counting)
        return loaded

    monkeypatch.setattr(resclip.factory, "load_clip", counting_load)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        seg = resclip.create_segmenter(model="ViT-B-32", pretrained=None, sfr=False)
    image = np.zeros((32, 48, 3), np.uint8)
    seg.predict(image, ["cat", "dog"])
    assert seen[0] == 160
    seg.predict(image, ["cat", "dog"])
    assert seen[0] == 160  # not encoded again
    assert not any(tmp_path.iterdir())


def test_over_long_query_warns(clip: LoadedClip) -> None:
    long_name = " ".join(["very"] * 80) + " long cat"
    with pytest.warns(UserWarning, match="very very.*truncated"):
        encode_queries(clip.model, clip.tokenizer, ["cat", long_name], ["a photo of a {}."])


def test_text_fingerprint(clip: LoadedClip) -> None:
    other: Any = copy.deepcopy(clip.model)
    assert text_fingerprint(other) == text_fingerprint(clip.model)
    other.visual.proj.data += 1  # the image tower does not matter
    assert text_fingerprint(other) == text_fingerprint(clip.model)
    other.transformer.resblocks[0].mlp.c_fc.weight.data[5, 7] += 0.5
    assert text_fingerprint(other) != text_fingerprint(clip.model)


# -------------------------------------------------------------------------------------------- cache

TWO = ["a photo of a {}.", "a {}"]


def _embed(
    clip: LoadedClip, classes: list[str], cache: EmbeddingCache | None, fingerprint: str = "fp"
) -> torch.Tensor:
    return query_embeddings(
        clip.model,
        clip.tokenizer,
        parse_classes(classes),
        fingerprint=fingerprint,
        cache=cache,
        templates=TWO,
    )


def test_cache_skips_encode_text(clip: LoadedClip, count_prompts: Callable[[], int], tmp_path: Path) -> None:
    first = _embed(clip, ["cat", "sky, clouds"], EmbeddingCache(tmp_path))
    assert count_prompts() == 3 * len(TWO)
    again = _embed(clip, ["cat", "sky, clouds"], EmbeddingCache(tmp_path))  # fresh memory: from disk
    assert count_prompts() == 3 * len(TWO)
    assert torch.equal(first, again)
    _embed(clip, ["cat", "sky, clouds", "dog"], EmbeddingCache(tmp_path))  # only the new query is encoded
    assert count_prompts() == 4 * len(TWO)
    _embed(clip, ["cat"], EmbeddingCache(tmp_path), fingerprint="other model")
    assert count_prompts() == 5 * len(TWO)
    assert not list(tmp_path.glob(".tmp-*"))
    assert len(list(tmp_path.glob("*.pt"))) == 5


def test_cache_memory_only_and_lru(
    clip: LoadedClip, count_prompts: Callable[[], int], tmp_path: Path
) -> None:
    cache = EmbeddingCache(tmp_path / "unused", max_memory_items=2, disk=False)
    _embed(clip, ["cat", "dog", "sky"], cache)
    assert len(cache) == 2 and not (tmp_path / "unused").exists()
    _embed(clip, ["dog", "sky"], cache)  # the two most recent are in memory
    assert count_prompts() == 3 * len(TWO)
    _embed(clip, ["cat"], cache)
    assert count_prompts() == 4 * len(TWO)


def test_corrupt_cache_file_is_recomputed(clip: LoadedClip, tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    expected = _embed(clip, ["cat"], cache)
    path = cache.path(cache.key("fp", "cat", TWO))
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="ignoring unreadable text-embedding cache file"):
        recomputed = _embed(clip, ["cat"], EmbeddingCache(tmp_path))
    torch.testing.assert_close(recomputed, expected, rtol=0, atol=1e-6)
    assert EmbeddingCache(tmp_path).get("fp", "cat", TWO) is not None  # rewritten


def test_cache_is_thread_safe(clip: LoadedClip, tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(_embed(clip, ["cat", "dog, puppy", "sky"], cache))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 4
    for result in results[1:]:
        torch.testing.assert_close(result, results[0], rtol=0, atol=1e-6)


def test_cache_default_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path))
    assert EmbeddingCache().directory == tmp_path / "text"
    monkeypatch.delenv("RESCLIP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert EmbeddingCache().directory == tmp_path / "xdg" / "resclip" / "text"


def test_unwritable_cache_warns_once(clip: LoadedClip, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = EmbeddingCache(blocker / "sub")  # a file where the folder should be
    with pytest.warns(UserWarning, match="caching in memory only"):
        _embed(clip, ["cat", "dog"], cache)
    assert len(cache) == 2


# --------------------------------------------------------------------------------- check_embeddings


def test_check_embeddings() -> None:
    spec = parse_classes(["sky, clouds", "cat"])
    raw = torch.randn(3, 8)
    checked = check_embeddings(raw, spec, 8)
    assert checked.dtype == torch.float32 and checked is not raw
    torch.testing.assert_close(checked.norm(dim=-1), torch.ones(3))
    from_numpy = check_embeddings(raw.double().numpy(), spec, 8)
    torch.testing.assert_close(from_numpy, checked)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (torch.randn(3), r"shape \(num_queries, dim\) = \(3, 8\), got \(3,\)"),
        (torch.randn(3, 9), r"= \(3, 8\), got \(3, 9\)"),
        (torch.randn(2, 8), r"got \(2, 8\) \(one row per class was given"),
        (torch.ones(3, 8, dtype=torch.int64), "floating point"),
        (torch.full((3, 8), float("nan")), "NaN or infinite"),
        (torch.zeros(3, 8), r"rows \[0, 1, 2\] are all zero"),
        ([[0.0] * 8] * 3, "torch.Tensor or numpy array"),
    ],
)
def test_check_embeddings_errors(value: object, message: str) -> None:
    spec = parse_classes(["sky, clouds", "cat"])
    with pytest.raises(ValueError, match=message):
        check_embeddings(value, spec, 8)  # type: ignore[arg-type]
