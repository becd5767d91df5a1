"""SC-CLIP against its release (golden_sc_clip.npz): every stage of single windows, every sliding
window, full-image outputs of each recorded protocol family; composition with RCS / SFR / PAMR,
non-square inputs, presets and the command line."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import resclip
from parity import (
    ADELIKE,
    LOGIT,
    TOK,
    VOCLIKE,
    assert_mask_at_stable_pixels,
    golden_segmenter,
    load_golden,
    load_manifest,
    within,
)
from resclip.cli import main
from resclip.engine import WindowTrace
from resclip.methods import get_method
from resclip.methods.calibration import lof_scores, neighbour_mean, top_quantile
from resclip.preprocess import normalise, window_coords

BENCH = Path(__file__).parent / "data" / "benchmarks"
CLASSES = {"voclike": VOCLIKE, "adelike": ADELIKE}


@pytest.fixture(scope="module")
def sc() -> dict[str, np.ndarray]:
    return load_golden("golden_sc_clip.npz")


@pytest.fixture(scope="module")
def sc_manifest() -> dict:
    return load_manifest("sc_clip_manifest.json")


_seg = functools.partial(golden_segmenter, "sc_clip")


# ---------------------------------------------------------------- single windows, stage by stage
WINDOWS = {"W0": ("b16", "A", None), "W1": ("b16", "B", (112, 112, 336, 336)), "W2": ("b32", "A", None)}


@pytest.mark.parametrize("name", list(WINDOWS))
def test_window_stages(golden, sc, golden_ckpt_b16, golden_ckpt_b32, name):
    kind, img, crop = WINDOWS[name]
    seg = _seg(golden_ckpt_b16 if kind == "b16" else golden_ckpt_b32)
    if crop is None:
        x = normalise(golden[f"img{img}__raw_rgb"])
    else:
        y1, x1, y2, x2 = crop
        x = normalise(golden[f"img{img}__resized_rgb"])[:, :, y1:y2, x1:x2]
    text = torch.from_numpy(golden["classifier__voclike"])
    trace = WindowTrace()
    logits = seg.engine.window_logits(x, text, torch.zeros(text.shape[0], dtype=torch.long), trace)
    st = {k: v[0] for k, v in trace.stages.items()}
    w = logits.shape[-1]

    outliers = torch.nonzero(st["outliers"]).flatten().numpy()
    np.testing.assert_array_equal(outliers, sc[f"{name}__outlier_idx"])
    np.testing.assert_array_equal(np.stack([outliers // w, outliers % w], 1), sc[f"{name}__outlier_rc"])
    within(st["lof_scores"], sc[f"{name}__lof_scores"], TOK, "lof")
    rows = sc.get(f"{name}__row_idx")
    sfx = "_rows" if rows is not None else ""
    tok_rows = slice(None) if rows is None else rows
    blk_rows = slice(None) if rows is None else np.concatenate([[0], rows + 1])
    blocks = {3: trace.blocks[3][0], 8: trace.blocks[8][0], 10: trace.pre_last_block_x[0]}
    for i, value in blocks.items():
        within(value[blk_rows], sc[f"{name}__blk{i}_out{sfx}"], TOK, f"block {i}")
    within(st["multilevel_sum"][blk_rows], sc[f"{name}__multilevel_sum{sfx}"], TOK, "multi-level sum")
    within(st["repaired_last"][outliers], sc[f"{name}__repaired_blk10_at_outliers"], TOK, "repaired 10")
    within(st["repaired_pre"][outliers], sc[f"{name}__repaired_blk8_at_outliers"], TOK, "repaired 8")
    simi = sc[f"{name}__simi_row_idx"]
    within(st["mid_simi"][simi], sc[f"{name}__mid_simi_rows"], TOK, "mid similarity")
    within(st["after_simi"][simi], sc[f"{name}__after_simi_rows"], TOK, "after similarity")
    for key in ("agg1", "attn1", "agg2", "attn2", "agg3", "pre_ln_post"):
        within(st[key][tok_rows], sc[f"{name}__{key}{sfx}"], TOK, key)
    assert trace.tokens is not None and trace.attn is None
    within(trace.tokens[0], sc[f"{name}__tokens"], TOK, "tokens")
    within(logits[0], sc[f"{name}__patch_logits"], LOGIT, "patch logits")
    up = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)[0].flatten(1)
    within(up[:, sc[f"{name}__window_logits_idx"]], sc[f"{name}__window_logits_samples"], LOGIT, "window")


# ---------------------------------------------------------------- sliding windows and full images
# family -> (preset, class file, checkpoint kind, images, key holding the logits)
FAMILIES = {
    "default": ("sc_clip/ade20k", "adelike", "b16", "ABC", "default"),
    "voc21": ("sc_clip/voc21", "voclike", "b16", "ABC", "voc21"),
    "context60": ("sc_clip/context60", "voclike", "b16", "ABC", "voc21"),
    "coco_object": ("sc_clip/coco_object", "voclike", "b16", "ABC", "voc21"),
    "city_scapes": ("sc_clip/cityscapes", "adelike", "b16", "A", "city_scapes"),
    "default_b32": ("sc_clip/ade20k", "adelike", "b32", "A", "default_b32"),
}
RUNS = [(fam, img) for fam, spec in FAMILIES.items() for img in spec[3]]


def _family_seg(fam, golden_ckpts):
    preset, cls, kind, _, logits_fam = FAMILIES[fam]
    return _seg(golden_ckpts[kind], preset), cls, logits_fam



@pytest.mark.parametrize(("fam", "img"), RUNS)
def test_full_image_parity(golden, sc, golden_ckpts, fam, img):
    seg, cls, logits_fam = _family_seg(fam, golden_ckpts)
    prefix, lprefix = f"slide__{fam}__img{img}", f"slide__{logits_fam}__img{img}"
    image = golden[f"img{img}__raw_rgb"]
    res = seg.predict(image, CLASSES[cls], embeddings=golden[f"classifier__{cls}"])
    assert res.mask.shape == image.shape[:2]
    if fam == logits_fam:
        idx = sc[f"{prefix}__slide_logits_idx"]
        within(res.logits.reshape(res.logits.shape[0], -1)[:, idx], sc[f"{prefix}__slide_logits_samples"],
               LOGIT, "slide logits")
        full = res.full.logits_full()
        within(full.reshape(full.shape[0], -1)[:, sc[f"{prefix}__final_idx"]],
               sc[f"{prefix}__final_logits_samples"], LOGIT, "final logits")
    fidx = sc[f"{lprefix}__final_idx"]
    want = sc[f"{prefix}__probs_samples"]
    want = want / want.sum(axis=0, keepdims=True)  # the release does not renormalise
    within(res.probs.reshape(res.probs.shape[0], -1)[:, fidx], want, LOGIT, "probabilities")
    assert_mask_at_stable_pixels(res.mask, sc[f"{prefix}__pred"], sc[f"{prefix}__pred_unstable_idx"])


WINDOW_RUNS = [(fam, img) for fam, img in RUNS if FAMILIES[fam][4] == fam]


@pytest.mark.parametrize(("fam", "img"), WINDOW_RUNS)
def test_every_window(golden, sc, golden_ckpts, fam, img):
    seg, cls, _ = _family_seg(fam, golden_ckpts)
    prefix = f"slide__{fam}__img{img}"
    x = seg.resized_input(golden[f"img{img}__raw_rgb"])
    p = seg.protocol
    boxes = window_coords(x.shape[2], x.shape[3], p.slide_crop, p.slide_stride)
    np.testing.assert_array_equal(np.array(boxes), sc[f"{prefix}__window_coords"])
    spec, text = seg.encode_classes(CLASSES[cls], golden[f"classifier__{cls}"])
    crops = torch.cat([x[:, :, y1:y2, x1:x2] for y1, x1, y2, x2 in boxes])
    trace = WindowTrace()
    logits = seg.engine.window_logits(crops, text, torch.tensor(spec.query_to_class), trace)
    for k in range(len(boxes)):
        within(logits[k], sc[f"{prefix}__win{k}__patch_logits"], LOGIT, f"window {k}")
        got = torch.nonzero(trace.stages["outliers"][k]).flatten().numpy()
        np.testing.assert_array_equal(got, sc[f"{prefix}__win{k}__outlier_idx"])


# ---------------------------------------------------------------- presets and fidelity
def test_presets_are_the_release_configs(sc_manifest):
    cfgs = sc_manifest["dataset_cfgs_sc_clip"]
    base = cfgs["base (all)"]
    names = {"coco_stuff": "coco_stuff164k", "cityscapes": "city_scapes"}
    for ds in resclip.presets.DATASETS:
        want = {**base, **cfgs[names.get(ds, ds)]}
        p = resclip.presets.get_preset(f"sc_clip/{ds}")
        got = p.protocol
        assert (got.short_side, got.slide_crop, got.slide_stride) == (want["resize_short"], 224, 112), ds
        assert (got.logit_scale, got.prob_thd, got.area_thd, got.pamr_steps) == (
            want["logit_scale"], want["prob_thd"], want["area_thd"], want["pamr_steps"]), ds
        assert p.dataset == ds and p.fidelity == "official"
        assert resclip.presets.CLASS_FILES[ds] == want["class_file"].removeprefix("cls_")
    assert "sc_clip/voc21" in resclip.list_presets()


def test_fidelity_switches_the_lof_quirks():
    official = get_method("sc_clip").for_fidelity("official")
    paper = get_method("sc_clip").for_fidelity("paper")
    assert (official.lof_reach, official.lof_distance) == ("own", "squared")  # type: ignore[attr-defined]
    assert (paper.lof_reach, paper.lof_distance) == ("neighbour", "euclidean")  # type: ignore[attr-defined]


def test_lof_variants_and_repair_by_hand():
    torch.manual_seed(0)
    x = torch.randn(1, 12, 5)
    x[0, 4] += 8.0  # a clear outlier
    for distance in ("squared", "euclidean"):
        for reach in ("own", "neighbour"):
            s = lof_scores(x, 4, distance, reach)
            assert int(s[0].argmax()) == 4
    # standard LOF by hand (euclidean, neighbour's k-distance)
    d = torch.cdist(x[0].double(), x[0].double())
    d.fill_diagonal_(float("inf"))
    knn, idx = d.topk(4, largest=False)
    kd = knn[:, -1]
    lrd = 1 / torch.maximum(knn, kd[idx]).mean(1)
    ref = (lrd[idx] / lrd[:, None]).mean(1)
    torch.testing.assert_close(lof_scores(x, 4, "euclidean", "neighbour")[0].double(), ref, atol=1e-5, rtol=0)
    # repair on a 3x4 (non-square) grid: corner outlier with two outlier neighbours
    grid = torch.arange(12.0).view(1, 12, 1)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, [0, 1, 4]] = True
    out = neighbour_mean(grid, mask, (3, 4))
    assert out[0, 0, 0] == 5.0  # only (1, 1) = 5 is valid
    assert out[0, 1, 0] == (2 + 5 + 6) / 3 and out[0, 4, 0] == (5 + 8 + 9) / 3
    alone = torch.ones(1, 4, dtype=torch.bool)
    assert torch.equal(neighbour_mean(grid[:, :4], alone, (2, 2)), grid[:, :4])
    assert not neighbour_mean(grid[:, :4], alone, (2, 2), empty="zero").any()
    assert top_quantile(torch.arange(20.0)[None], 0.05).sum() == 1


# ---------------------------------------------------------------- composition and robustness
SMALL = {"short_side": 96, "slide_crop": 64, "slide_stride": 32, "rcs_layers": (2, 3)}


def test_non_square_inputs_do_not_crash(golden, golden_ckpt_b16):
    """The release raises IndexError on non-square grids; the correct row-major mapping does not."""
    for rgb in (golden["imgB__resized_rgb"], golden["imgB__resized_rgb"].transpose(1, 0, 2).copy()):
        seg = _seg(golden_ckpt_b16, "sc_clip/ade20k", slide_crop=0)
        res = seg.predict(rgb, ADELIKE, embeddings=golden["classifier__adelike"])
        assert res.mask.shape == rgb.shape[:2] and np.isfinite(res.probs).all()


def test_attention_figures_are_refused_with_a_reason(golden, golden_ckpt_b16):
    seg = _seg(golden_ckpt_b16, "sc_clip/ade20k")
    x = normalise(golden["imgA__raw_rgb"])
    with pytest.raises(ValueError, match="replaces the last block with its own stage"):
        seg.engine.last_attention(x)


def test_registry_and_commands_pick_it_up(tiny64, tmp_path, capsys):
    assert "sc_clip" in resclip.list_methods()
    assert main(["list", "methods"]) == 0
    assert "sc_clip" in capsys.readouterr().out
    assert main(["list", "presets"]) == 0
    assert "sc_clip/cityscapes" in capsys.readouterr().out
    img = BENCH / "VOCdevkit/VOC2012/JPEGImages/crop_294.jpg"
    out = tmp_path / "cmp.png"
    code = main(["compare", str(img), "--classes", "background; car; person", "--methods", "sc_clip,naclip",
                 "--pretrained", str(tiny64), "--no-sfr", "--no-rcs", "--out", str(out), "--device", "cpu",
                 "--set", "short_side=64", "--set", "slide_crop=64", "--set", "slide_stride=32"])
    assert code == 0 and out.exists()


# ---------------------------------------------------------------- resclip eval, every benchmark
def _context_root(tmp: Path) -> Path:
    """A one-image PASCAL Context folder (random pixels, labels 0..3)."""
    root = tmp / "VOCdevkit" / "VOC2010"
    from PIL import Image

    for sub in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "JPEGImages/x1.jpg")
    labels = rng.integers(0, 4, (48, 64), dtype=np.uint8)
    Image.fromarray(labels).save(root / "SegmentationClassContext/x1.png")
    (root / "ImageSets/SegmentationContext/val.txt").write_text("x1\n")
    return root


def _cityscapes_root(tmp: Path) -> Path:
    root = tmp / "cityscapes"
    from PIL import Image

    (root / "leftImg8bit/val/town").mkdir(parents=True)
    (root / "gtFine/val/town").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 96, 3), dtype=np.uint8)).save(
        root / "leftImg8bit/val/town/town_0_0_leftImg8bit.png")
    Image.fromarray(rng.integers(0, 19, (48, 96), dtype=np.uint8)).save(
        root / "gtFine/val/town/town_0_0_gtFine_labelTrainIds.png")
    return root


ROOTS = {
    "voc21": BENCH / "VOCdevkit/VOC2012", "voc20": BENCH / "VOCdevkit/VOC2012",
    "ade20k": BENCH / "ADEChallengeData2016", "coco_object": BENCH / "coco_stuff164k",
    "coco_stuff": BENCH / "coco_stuff164k", "context60": None, "context59": None, "cityscapes": None,
}


@pytest.mark.parametrize("dataset", list(ROOTS))
def test_eval_runs_on_every_benchmark(tiny64, tmp_path, monkeypatch, dataset):
    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "cache"))
    root = ROOTS[dataset]
    if root is None:
        root = _cityscapes_root(tmp_path) if dataset == "cityscapes" else _context_root(tmp_path)
    out = tmp_path / "r.json"
    code = main(["eval", "--method", "sc_clip", "--dataset", dataset, "--root", str(root), "--preset",
                 f"sc_clip/{dataset}", "--pretrained", str(tiny64), "--no-rcs", "--no-sfr", "--limit", "1",
                 "--set", "short_side=64", "--device", "cpu", "--no-progress", "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["method"] == "sc_clip" and result["preset"] == f"sc_clip/{dataset}"
    assert result["num_images"] >= 1 and 0.0 <= result["miou"] <= 100.0


def test_attention_command_refuses_it_in_one_line(tiny64, tmp_path, capsys):
    img = BENCH / "VOCdevkit/VOC2012/JPEGImages/crop_294.jpg"
    code = main(["attention", str(img), "--point", "10,10", "--methods", "naclip,sc_clip", "--pretrained",
                 str(tiny64), "--out", str(tmp_path / "a.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("resclip: error: method sc_clip: it replaces the last block")


def test_fidelity_reaches_the_engine(tiny_ckpt):
    seg = resclip.create_segmenter(method="sc_clip", rcs=False, sfr=False, preset="sc_clip/ade20k",
                                   pretrained=str(tiny_ckpt), text_cache=False, fidelity="paper")
    assert seg.engine.method.lof_reach == "neighbour"  # type: ignore[attr-defined]
    assert seg.with_method("sc_clip").engine.method.lof_distance == "euclidean"  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", ["sc_clip", "sfp"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_runs(tiny_ckpt, photo, method, precision):
    kw = {"rcs": True, "sfr": True, "preset": f"{method}/ade20k", "pretrained": str(tiny_ckpt),
          "text_cache": False, **SMALL}
    ref = resclip.create_segmenter(method=method, **kw).predict(photo, ["sky, wall", "cat", "tree"])
    low = resclip.create_segmenter(method=method, precision=precision, **kw).predict(
        photo, ["sky, wall", "cat", "tree"])
    assert np.isfinite(low.probs).all() and np.abs(low.probs - ref.probs).mean() < 0.05
