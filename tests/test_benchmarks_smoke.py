"""Smoke test of benchmarks/: smallest settings, a tiny random model, real child processes."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
# Tiny random model (4 blocks: RCS on blocks 1-2), short side 224 instead of 336 for speed, one thread.
TINY = ["--rcs-layers", "1,2", "--set", "short_side=224", "--threads", "1"]


def _run(script: str, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and x > 0


def _module(name: str) -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_synthetic_image_deterministic_and_banded() -> None:
    synthetic_image = _module("bench_predict").synthetic_image
    a = synthetic_image(150, 70, seed=3)
    b = synthetic_image(150, 70, seed=3, out=np.zeros((150, 70, 3), np.uint8))
    assert a.dtype == np.uint8 and a.shape == (150, 70, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, synthetic_image(150, 70, seed=4))
    assert a.std() > 10  # not flat


def test_plan_parsing_and_contention() -> None:
    bp = _module("bench_predict")
    plans = bp.parse_models("ViT-B-16, ViT-L-14@voc21/naclip+sclip")
    assert [p.name for p in plans] == ["ViT-B-16", "ViT-L-14"]
    assert plans[0].workloads is None and plans[1].workloads == ("voc21",)
    assert plans[1].methods == ("naclip", "sclip")
    assert bp.parse_env_assignments("MALLOC_A=1 MALLOC_B='2 3'") == {"MALLOC_A": "1", "MALLOC_B": "2 3"}
    assert bp.parse_overrides(["short_side=224", "rcs_layers=(1,2)"]) == {
        "short_side": 224,
        "rcs_layers": [1, 2],
    }
    res = {"stall": 0.1, "pair_with_base": {"resclip": {"stall": 0.6}, "base": {"stall": None}}}
    assert bp.contention(res) == 0.6
    assert bp.contention({}) is None
    fit = _module("bench_memory").linear_fit([1.0, 2.0, 3.0], [3.0, 5.0, 7.0])
    assert fit is not None and abs(fit[0] - 1.0) < 1e-9 and abs(fit[1] - 2.0) < 1e-9


@pytest.mark.slow
def test_bench_predict_smoke(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "predict.json"
    args = [
        "--models",
        "infer",
        "--pretrained",
        str(tiny_ckpt),
        *TINY,
        "--methods",
        "naclip",
        "--variants",
        "base,rcs+sfr",
        "--workloads",
        "voc21,context60",
        "--repeat",
        "1",
        "--warmup",
        "0",
        "--throughput",
        "1",
        "--malloc-env",
        "MALLOC_TRIM_THRESHOLD_=268435456",
        "--output",
        str(out),
    ]
    proc = _run("bench_predict.py", args)
    report = json.loads(out.read_text())
    assert "| model | workload |" in proc.stdout
    for key in (
        "machine",
        "packages",
        "allocator",
        "date",
        "command",
        "text_encoder",
        "child_runtime",
        "load",
    ):
        assert key in report, key
    assert report["machine"]["cpu_model"]
    assert report["allocator"]["malloc_env_applied"] == {"MALLOC_TRIM_THRESHOLD_": "268435456"}
    assert report["child_runtime"]["env"]["MALLOC_TRIM_THRESHOLD_"] == "268435456"
    assert report["child_runtime"]["torch_num_threads"] == 1
    rows = report["results"]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert r["min_s"] <= r["median_s"] <= r["max_s"] and r["min_s"] > 0
        assert r["mask_shape"] == [375, 500]
        mem = r["memory"]
        assert mem["peak_rss_mib"] >= mem["rss_after_model_mib"] > 0
        assert "predict_peak_over_model_mib" in mem
    ratios = report["ratios"]
    assert len(ratios["resclip_over_baseline"]) == 2
    for e in ratios["resclip_over_baseline"]:
        assert _positive(e["ratio_interleaved"]) and _positive(e["ratio_separate_runs"])
    (batched,) = ratios["batched_over_one_at_a_time"]
    assert batched["workload"] == "context60" and batched["windows"] > 1
    assert _positive(batched["ratio"]) and batched["identical_masks"]
    assert len(ratios["sfr_share"]) == 2
    for e in ratios["sfr_share"]:
        assert 0 < e["share_profiled"] < 1
        assert e["sfr_parts_s"]["pamr_s"] > 0 and e["sfr_parts_s"]["path_check_s"] > 0
    tp = report["throughput"]
    assert tp["status"] == "ok" and _positive(tp["images_per_s"]) and _positive(tp["total_s"])


@pytest.mark.slow
def test_bench_memory_smoke(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    args = [
        "--sizes",
        "200x260",
        "--model",
        "infer",
        "--pretrained",
        str(tiny_ckpt),
        *TINY,
        "--no-sfr",
        "--output",
        str(out),
    ]
    _run("bench_memory.py", args)
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["status"] == "ok"
    assert row["num_classes"] == 150
    assert row["mask"]["shape"] == [200, 260] and row["mask"]["dtype"] == "uint8"
    assert row["mask"]["max_label"] < 150
    assert _positive(row["predict_s"]) and _positive(row["memory"]["peak_rss_mib"])
    assert row["memory"]["peak_rss_mib"] >= row["memory"]["rss_before_predict_mib"]
    assert report["machine"]["cpu_model"] and report["command"]


@pytest.mark.parametrize("bad", [["--workloads", "nope"], ["--variants", "x"]])
def test_bench_predict_rejects_unknown_names(bad: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_predict.py"), *bad], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0 and "unknown" in proc.stderr


def test_bench_aux_parses_its_options() -> None:
    """benchmarks/bench_aux.py (second-model methods, real-size random weights: minutes) imports the
    shared bench_predict helpers and parses its options."""
    proc = subprocess.run([sys.executable, str(BENCH / "bench_aux.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--methods" in proc.stdout and "--keep-checkpoints" in proc.stdout
