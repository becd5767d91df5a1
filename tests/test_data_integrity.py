"""Integrity of the vendored test data in tests/data (no ../shared needed).

The data is built by tools/build_test_data.py; see tests/data/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = DATA / "golden"
BENCHMARKS = DATA / "benchmarks"
PROBS_KEY = "W0__naclip_resclip__sfr_first_pass_probs"


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return json.loads((GOLDEN / "manifest.json").read_text(encoding="utf-8"))


def _load_state(name: str) -> dict[str, torch.Tensor]:
    state = torch.load(GOLDEN / name, map_location="cpu", weights_only=True)
    assert isinstance(state, dict)
    return state


def test_b16_checkpoint_loads() -> None:
    state = _load_state("tiny_clip_b16_fp16.pt")
    assert state["visual.conv1.weight"].shape == (128, 3, 16, 16)
    assert state["visual.positional_embedding"].shape == (197, 128)
    floats = [v for v in state.values() if v.is_floating_point()]
    assert floats
    assert all(v.dtype == torch.float16 for v in floats)
    assert all(bool(torch.isfinite(v).all()) for v in floats)


def test_b32_delta_checkpoint_loads() -> None:
    delta = _load_state("tiny_clip_b32_delta_fp16.pt")
    assert delta["visual.conv1.weight"].shape == (128, 3, 32, 32)
    assert delta["visual.positional_embedding"].shape == (50, 128)
    assert set(delta) <= set(_load_state("tiny_clip_b16_fp16.pt"))


@pytest.mark.parametrize("name", ["open_clip_tiny-clip-b16.json", "open_clip_tiny-clip-b32.json"])
def test_open_clip_configs(name: str) -> None:
    cfg = json.loads((GOLDEN / name).read_text(encoding="utf-8"))
    assert cfg["embed_dim"] == 64
    assert cfg["vision_cfg"]["patch_size"] == int(name[-7:-5])


def _manifests() -> dict[str, dict[str, Any]]:
    """Each golden npz's entry, from manifest.json (released ResCLIP and baselines) or a method's
    own ``<method>_manifest.json`` (methods added later, each from its own release)."""
    entries: dict[str, dict[str, Any]] = {}
    for path in sorted(GOLDEN.glob("*manifest.json")):
        for name, entry in json.loads(path.read_text(encoding="utf-8"))["files"].items():
            assert name not in entries, f"{name} is listed by two manifests"
            entries[name] = entry
    return entries


def test_manifest_lists_every_npz() -> None:
    on_disk = sorted(p.name for p in GOLDEN.glob("*.npz"))
    assert on_disk == sorted(_manifests())
    assert {"golden_baselines.npz", "golden_resclip.npz", "golden_sc_clip.npz"} <= set(on_disk)


@pytest.mark.parametrize("name", sorted(p.name for p in GOLDEN.glob("*.npz")))
def test_npz_matches_manifest(name: str) -> None:
    listed = _manifests()[name]["arrays"]
    with np.load(GOLDEN / name, allow_pickle=False) as z:
        assert set(z.files) == set(listed)
        for key, meta in listed.items():
            arr = z[key]
            assert list(arr.shape) == meta["shape"], key
            assert str(arr.dtype) == meta["dtype"], key


def test_probs_subset(manifest: dict[str, Any]) -> None:
    with np.load(GOLDEN / "golden_resclip.npz", allow_pickle=False) as z:
        assert PROBS_KEY not in z.files
        idx = z[f"{PROBS_KEY}_idx"]
        samples = z[f"{PROBS_KEY}_samples"]
    expected = np.sort(np.random.default_rng(0).choice(224 * 224, 4096, replace=False))
    np.testing.assert_array_equal(idx, expected)
    assert samples.shape == (18, 4096)
    # softmax over the 18 queries: every sampled pixel sums to 1
    np.testing.assert_allclose(samples.sum(axis=0), 1.0, atol=1e-5)


def test_benchmark_fixtures_present() -> None:
    assert (BENCHMARKS / "README.md").is_file()
    voc = BENCHMARKS / "VOCdevkit" / "VOC2012"
    ids = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert ids
    for i in ids:
        assert (voc / "JPEGImages" / f"{i}.jpg").is_file()
        assert (voc / "SegmentationClass" / f"{i}.png").is_file()
    ade = sorted((BENCHMARKS / "ADEChallengeData2016" / "images" / "validation").glob("*.jpg"))
    coco = sorted((BENCHMARKS / "coco_stuff164k" / "images" / "val2017").glob("*.jpg"))
    assert ade
    assert coco
    for p in ade:
        assert (p.parents[2] / "annotations" / "validation" / f"{p.stem}.png").is_file()
    for p in coco:
        ann = p.parents[2] / "annotations" / "val2017"
        assert (ann / f"{p.stem}_labelTrainIds.png").is_file()
        assert (ann / f"{p.stem}_instanceTrainIds.png").is_file()
