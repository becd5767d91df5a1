"""The evaluation loop with a tiny random model: exact matrix, resume, state keys, saved predictions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import resclip
import resclip.eval.loop as ev
from resclip.datasets import get_dataset_spec, list_samples, load_pair, read_label
from resclip.eval import ProgressStore, benchmark_class_lines, default_state_dir, evaluate, write_results
from resclip.metrics import ConfusionMatrix

BENCH = Path(__file__).parent / "data" / "benchmarks"
VOC = BENCH / "VOCdevkit" / "VOC2012"
ADE = BENCH / "ADEChallengeData2016"
FAST = {"short_side": 64, "rcs_layers": (2, 3)}


pytestmark = pytest.mark.usefixtures("text_cache")


def _shrink(src: Path, dst: Path, size: tuple[int, int], label: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as img:
        img.resize(size, Image.Resampling.NEAREST if label else Image.Resampling.BILINEAR).save(dst)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The VOC and ADE20K fixtures shrunk to ~100 px (same layouts, palette and values), for speed."""
    base = tmp_path_factory.mktemp("small")
    voc, ade = base / "VOCdevkit" / "VOC2012", base / "ADEChallengeData2016"
    ids = (VOC / "ImageSets/Segmentation/val.txt").read_text().split()[:5]
    for i in ids:
        _shrink(VOC / "JPEGImages" / f"{i}.jpg", voc / "JPEGImages" / f"{i}.jpg", (96, 80), False)
        ann = f"SegmentationClass/{i}.png"
        _shrink(VOC / ann, voc / ann, (96, 80), True)
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    for img in sorted((ADE / "images/validation").glob("*.jpg")):
        _shrink(img, ade / "images/validation" / img.name, (90, 70), False)
        ann = f"annotations/validation/{img.stem}.png"
        _shrink(ADE / ann, ade / ann, (90, 70), True)
    return {"voc": voc, "ade": ade}


def _seg(ckpt: Path, preset: str = "voc21", **kw: object) -> resclip.Segmenter:
    """Tiny segmenter; SFR off unless asked (its PAMR first pass dominates CPU time)."""
    return resclip.create_segmenter(preset=preset, pretrained=str(ckpt), **{"sfr": False, **FAST, **kw})


def test_matrix_is_the_sum_over_images(tiny64: Path, tmp_path: Path):
    seg = _seg(tiny64, sfr=True)
    res = evaluate(
        seg, "voc21", VOC, limit=2, workers=2, state_dir=tmp_path, progress=False, release_text_tower=True
    )
    assert seg.text_tower_released  # the reference below gets the classes from the text cache
    spec = get_dataset_spec("voc21")
    lines, _ = benchmark_class_lines(spec)
    ref = ConfusionMatrix(21)
    for s in list_samples(spec, VOC, limit=2):
        rgb, gt = load_pair(s, spec)
        ref.update(seg.predict(rgb, lines).mask, gt)
    np.testing.assert_array_equal(res.confusion, ref.matrix)
    assert res.num_images == 2 and res.reused_images == 0 and res.confusion.sum() == res.metrics.num_pixels
    assert res.class_names[0] == "background" and res.class_names[4] == "ship" and len(res.class_names) == 21
    data = res.to_dict()
    assert data["miou"] == round(res.miou, 2) and data["protocol"] == seg.config.to_dict()


def test_resume_after_interrupt_gives_identical_result(tiny64: Path, small, tmp_path: Path, monkeypatch):
    seg = _seg(tiny64, preset="ade20k")
    full = evaluate(seg, "ade20k", small["ade"], workers=0, state_dir=tmp_path / "a", progress=False)
    calls = {"n": 0}
    real = ev.segment_mask

    def flaky(*args: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(ev, "segment_mask", flaky)
    with pytest.raises(KeyboardInterrupt):
        evaluate(
            seg, "ade20k", small["ade"], workers=0, state_dir=tmp_path / "b", progress=False, save_every=100
        )
    assert len(list((tmp_path / "b").glob("*.part-*.npz"))) == 1  # saved on the way out
    monkeypatch.setattr(ev, "segment_mask", real)
    resumed = evaluate(seg, "ade20k", small["ade"], workers=0, state_dir=tmp_path / "b", progress=False)
    assert resumed.reused_images == 2 and resumed.num_images == 3
    np.testing.assert_array_equal(resumed.confusion, full.confusion)
    assert [p.name for p in (tmp_path / "b").iterdir()] == [f"{resumed.state_key}.npz"]  # consolidated
    again = evaluate(seg, "ade20k", small["ade"], workers=0, state_dir=tmp_path / "b", progress=False)
    assert again.reused_images == 3 and np.array_equal(again.confusion, full.confusion)


def test_limit_then_larger_reuses_done_images(tiny64: Path, small, tmp_path: Path):
    seg = _seg(tiny64)
    evaluate(seg, "voc21", small["voc"], limit=2, workers=0, state_dir=tmp_path, progress=False)
    more = evaluate(seg, "voc21", small["voc"], limit=4, workers=0, state_dir=tmp_path, progress=False)
    direct = evaluate(
        seg, "voc21", small["voc"], limit=4, workers=0, state_dir=tmp_path / "o", progress=False
    )
    assert more.reused_images == 2 and np.array_equal(more.confusion, direct.confusion)
    fewer = evaluate(seg, "voc21", small["voc"], limit=3, workers=0, state_dir=tmp_path, progress=False)
    assert fewer.reused_images == 3 and fewer.num_images == 3


def test_different_protocol_does_not_reuse_state(tiny64: Path, small, tmp_path: Path, capsys):
    def run(seg: resclip.Segmenter, **kw: object) -> resclip.eval.EvalResult:
        return evaluate(
            seg, "voc21", small["voc"], limit=2, workers=0, state_dir=tmp_path, progress=False, **kw
        )

    a = run(_seg(tiny64))
    capsys.readouterr()
    b, c = run(_seg(tiny64, lambda_rcs=0.5)), run(_seg(tiny64, rcs=False))
    assert "starting fresh: 1 saved run(s) there have other settings" in capsys.readouterr().err
    assert len({a.state_key, b.state_key, c.state_key}) == 3 and b.reused_images == c.reused_images == 0
    fresh = run(_seg(tiny64), resume=False)
    assert fresh.reused_images == 0 and np.array_equal(fresh.confusion, a.confusion)


def test_progress_store_merges_parts(tmp_path: Path):
    store = ProgressStore(tmp_path, "k", {})
    one = {"a": (np.array([0, 5]), np.array([3, 4])), "b": (np.array([1]), np.array([7]))}
    store.save_part(one)
    other = ProgressStore(tmp_path, "k", {})
    other.save_part({"c": (np.zeros(0, np.int64), np.zeros(0, np.int64))})
    entries, files = ProgressStore(tmp_path, "k", {}).load()
    assert sorted(entries) == ["a", "b", "c"] and len(files) == 2
    assert entries["a"][1].tolist() == [3, 4]
    store.consolidate()
    assert [p.name for p in tmp_path.iterdir()] == ["k.npz"]
    (tmp_path / "k.part-broken.npz").write_bytes(b"not a zip")
    (tmp_path / "k.part-truncated.npz").write_bytes((tmp_path / "k.npz").read_bytes()[:40])
    with pytest.warns(UserWarning, match="unreadable evaluation state"):
        entries, _ = store.load()
    assert sorted(entries) == ["a", "b", "c"]


@pytest.mark.parametrize(("name", "where", "mode"), [("voc20", "real", "P"), ("ade20k", "small", "L")])
def test_saved_predictions_reproduce_the_metric(
    tiny64: Path, small, tmp_path: Path, name: str, where: str, mode: str
):
    root = VOC if where == "real" else small["ade"]
    seg = _seg(tiny64, preset=name)
    out = tmp_path / "pred"

    def run() -> resclip.eval.EvalResult:
        return evaluate(
            seg,
            name,
            root,
            limit=2,
            workers=0,
            state_dir=tmp_path / "s",
            save_predictions=out,
            progress=False,
        )

    res = run()
    spec = get_dataset_spec(name)
    recomputed = ConfusionMatrix(spec.num_classes)
    samples = list_samples(spec, root, limit=2)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s.stem}.png" for s in samples)
    for s in samples:
        with Image.open(out / f"{s.stem}.png") as img, Image.open(s.label) as gt_img:
            assert img.mode == mode and img.size == gt_img.size
            pred = np.asarray(img).astype(np.int64) - (1 if spec.reduce_zero_label else 0)
        recomputed.update(pred, read_label(s.label, spec))
    np.testing.assert_array_equal(recomputed.matrix, res.confusion)
    (out / f"{samples[1].stem}.png").unlink()  # a missing prediction is recomputed on resume
    again = run()
    assert again.reused_images == 1 and (out / f"{samples[1].stem}.png").is_file()
    np.testing.assert_array_equal(again.confusion, res.confusion)


def test_write_results_is_complete_and_atomic(tiny64: Path, small, tmp_path: Path):
    seg = _seg(tiny64)
    res = evaluate(seg, "voc21", small["voc"], limit=1, workers=0, state_dir=tmp_path, progress=False)
    paths = write_results(res, tmp_path / "out" / "r.json")
    assert [p.name for p in paths] == ["r.json", "r.md", "r.csv"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    csv = (tmp_path / "out" / "r.csv").read_text().splitlines()
    assert csv[0] == "class,iou,acc" and csv[1].startswith("background,") and len(csv) == 1 + 21 + 3
    assert "| background |" in (tmp_path / "out" / "r.md").read_text()


def test_class_file_must_match_class_count(tiny64: Path, tmp_path: Path):
    bad = tmp_path / "names.txt"
    bad.write_text("cat\ndog\n")
    with pytest.raises(ValueError, match="has 2 lines but voc21 has 21 classes"):
        evaluate(_seg(tiny64), "voc21", VOC, limit=1, class_file=bad, state_dir=tmp_path, progress=False)


def test_default_state_dir(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path))
    assert default_state_dir() == tmp_path / "eval"
    monkeypatch.delenv("RESCLIP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_state_dir() == tmp_path / "x" / "resclip" / "eval"
    assert os.fspath(default_state_dir()).endswith("eval")
