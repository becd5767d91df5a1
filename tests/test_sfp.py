"""SFP against its release (golden_sfp.npz): every stage of single windows, every sliding window
and the full-image outputs of each recorded run; composition, non-square inputs, presets, CLI."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

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
from resclip.methods.calibration import salient_outliers
from resclip.preprocess import normalise, window_coords

BENCH = Path(__file__).parent / "data" / "benchmarks"


@pytest.fixture(scope="module")
def sfp() -> dict[str, np.ndarray]:
    return load_golden("golden_sfp.npz")



_seg = functools.partial(golden_segmenter, "sfp")


def _flat(rc: np.ndarray, w: int) -> list[int]:
    return sorted(int(r) * w + int(c) for r, c in rc)


# ---------------------------------------------------------------- single windows
WINDOWS = {"W0": ("b16", "raw", "A", None), "W2": ("b32", "raw", "A", None),
           "W3": ("b16", "resized", "C", (112, 336, 336, 560))}


@pytest.mark.parametrize("name", list(WINDOWS))
def test_window_stages(golden, sfp, golden_ckpts, name):
    kind, src, img, crop = WINDOWS[name]
    seg = _seg(golden_ckpts[kind])
    x = normalise(golden[f"img{img}__{src}_rgb"])
    if crop is not None:
        y1, x1, y2, x2 = crop
        x = x[:, :, y1:y2, x1:x2]
    text = torch.from_numpy(golden["classifier__voclike"])
    trace = WindowTrace()
    logits = seg.engine.window_logits(x, text, torch.zeros(text.shape[0], dtype=torch.long), trace)
    st = {k: v[0] for k, v in trace.stages.items()}
    w = logits.shape[-1]
    p = f"{name}__sfp__"
    outliers = torch.nonzero(st["outliers"]).flatten().tolist()
    assert outliers == _flat(sfp[f"{p}outlier_rc"], w)
    within(st["som_cls_to_patch"], sfp[f"{p}som_cls_to_patch"], LOGIT, "SOM cls->patch")
    within(st["som_patch_self"], sfp[f"{p}som_patch_self"], LOGIT, "SOM self")
    if f"{p}hidden_b10" in sfp:
        within(trace.pre_last_block_x[0], sfp[f"{p}hidden_b10"], TOK, "block 10")
        multi = st["multilevel_sum"]
        within(multi[0], sfp[f"{p}patch_state_sum_cls"], TOK, "multi-level CLS")
        within(multi[1:].norm(dim=-1), sfp[f"{p}patch_state_sum_patch_norms"], TOK, "multi-level norms")
        order = sfp[f"{p}outlier_rc"][:, 0] * w + sfp[f"{p}outlier_rc"][:, 1]
        within(st["repaired_last"][order], sfp[f"{p}purified_b10_rows"], TOK, "purified")
        for key in ("pre_sim", "post_sim"):
            within(st[key], sfp[f"{p}{key}"], LOGIT, key)
        for key in ("agg_pre", "branch1_attn", "branch1_out", "branch2_attn", "branch2_out"):
            within(st[key], sfp[f"{p}{key}"], TOK, key)
    within(trace.tokens[0], sfp[f"{p}tokens"], TOK, "tokens")
    within(logits[0], sfp[f"{p}patch_logits"], LOGIT, "patch logits")
    if f"{p}patch_logits_protos" in sfp:
        protos = torch.from_numpy(sfp["classifier__sfp_protos"])
        again = seg.engine.window_logits(x, protos, torch.zeros(protos.shape[0], dtype=torch.long))
        within(again[0], sfp[f"{p}patch_logits_protos"], LOGIT, "patch logits (protos)")


# ---------------------------------------------------------------- sliding windows and full images
# run -> (preset, class lines, classifier, checkpoint, images)
RUNS = {
    "voc21_protos": ("sfp/voc21", VOCLIKE, "sfp_protos", "b16", "AC"),
    "voc21_b32_voclike": ("sfp/voc21", VOCLIKE, "voclike", "b32", "A"),
    "context60_protos": ("sfp/context60", VOCLIKE, "sfp_protos", "b16", "B"),
    "coco_object_protos": ("sfp/coco_object", VOCLIKE, "sfp_protos", "b16", "C"),
    "default_voclike": ("sfp/context59", VOCLIKE, "voclike", "b16", "B"),
    "default_adelike": ("sfp/context59", ADELIKE, "adelike", "b16", "C"),
}
CASES = [(run, img) for run, spec in RUNS.items() for img in spec[4]]


def _classifier(golden, sfp, name):
    return sfp["classifier__sfp_protos"] if name == "sfp_protos" else golden[f"classifier__{name}"]


@pytest.mark.parametrize(("run", "img"), CASES)
def test_full_image_parity(golden, sfp, golden_ckpts, run, img):
    preset, lines, cls, kind, _ = RUNS[run]
    seg = _seg(golden_ckpts[kind], preset)
    prefix = f"slide__{run}__img{img}"
    image = golden[f"img{img}__raw_rgb"]
    res = seg.predict(image, lines, embeddings=_classifier(golden, sfp, cls))
    if f"{prefix}__slide_logits_idx" in sfp:
        idx = sfp[f"{prefix}__slide_logits_idx"]
        within(res.logits.reshape(res.logits.shape[0], -1)[:, idx], sfp[f"{prefix}__slide_logits_samples"],
               LOGIT, "slide logits")
    fidx = sfp[f"{prefix}__final_idx"]
    full = res.full.logits_full()
    within(full.reshape(full.shape[0], -1)[:, fidx], sfp[f"{prefix}__final_logits_samples"], LOGIT, "final")
    want = sfp[f"{prefix}__probs_samples"]
    want = want / want.sum(axis=0, keepdims=True)  # the release does not renormalise
    within(res.probs.reshape(res.probs.shape[0], -1)[:, fidx], want, LOGIT, "probabilities")
    assert_mask_at_stable_pixels(res.mask, sfp[f"{prefix}__pred"], sfp[f"{prefix}__pred_unstable_idx"])


@pytest.mark.parametrize(("run", "img"), CASES)
def test_every_window(golden, sfp, golden_ckpts, run, img):
    preset, lines, cls, kind, _ = RUNS[run]
    seg = _seg(golden_ckpts[kind], preset)
    prefix = f"slide__{run}__img{img}"
    x = seg.resized_input(golden[f"img{img}__raw_rgb"])
    p = seg.protocol
    boxes = window_coords(x.shape[2], x.shape[3], p.slide_crop, p.slide_stride)
    np.testing.assert_array_equal(np.array(boxes), sfp[f"{prefix}__window_coords"])
    spec, text = seg.encode_classes(lines, _classifier(golden, sfp, cls))
    crops = torch.cat([x[:, :, y1:y2, x1:x2] for y1, x1, y2, x2 in boxes])
    trace = WindowTrace()
    logits = seg.engine.window_logits(crops, text, torch.tensor(spec.query_to_class), trace)
    for k in range(len(boxes)):
        within(logits[k], sfp[f"{prefix}__win{k}__patch_logits"], LOGIT, f"window {k}")
        got = torch.nonzero(trace.stages["outliers"][k]).flatten().tolist()
        want = sfp[f"{prefix}__outlier_loc"][k]
        assert got == sorted(int(i) for i in want if i >= 0)


# ---------------------------------------------------------------- presets, detector, composition
def test_presets_are_the_release_configs():
    cfgs = load_manifest("sfp_manifest.json")["dataset_cfgs_sfp"]
    names = {"coco_stuff": "coco_stuff164k", "cityscapes": "city_scapes"}
    for ds in resclip.presets.DATASETS:
        want = cfgs[names.get(ds, ds)]
        p = resclip.presets.get_preset(f"sfp/{ds}")
        got = p.protocol
        assert (got.short_side, got.slide_crop, got.slide_stride, got.pamr_steps) == (
            want["short_side"], 224, 112, 0), ds
        assert (got.logit_scale, got.prob_thd, got.area_thd) == (
            want["logit_scale"], want["prob_thd"], want.get("area_thd")), ds
        path = p.class_file_path()
        if "people" in want["class_file"]:
            assert path is not None and "people" in path.read_text() and "person" not in path.read_text()
        else:
            assert path is None


def test_som_picks_at_most_k_salient_patches_by_cls_attention():
    attn = torch.zeros(1, 1, 6, 6)
    attn[0, 0, 0, 1:] = torch.tensor([0.5, 0.1, 0.4, 0.3, 0.05])
    attn[0, 0, 1:, 1:] = torch.eye(5) * 0.2
    out, c2p, own = salient_outliers(attn, 1.0, 2)
    assert torch.equal(own[0], torch.full((5,), 0.2)) and c2p[0, 0] == 0.5
    assert out[0].tolist() == [True, False, True, False, False]  # 0.3 is salient but third
    out, _, _ = salient_outliers(attn, 1.0, 10)
    assert out[0].tolist() == [True, False, True, True, False]


def test_non_square_inputs_do_not_crash(golden, golden_ckpts):
    """The release raises IndexError on a 21x28 grid; the row-major mapping does not."""
    seg = _seg(golden_ckpts["b16"], "sfp/context59", slide_crop=0)
    res = seg.predict(golden["imgB__resized_rgb"], ADELIKE, embeddings=golden["classifier__adelike"])
    assert res.mask.shape == golden["imgB__resized_rgb"].shape[:2] and np.isfinite(res.probs).all()


@pytest.mark.parametrize("dataset", ["voc21", "ade20k", "coco_object"])
def test_eval_runs(tiny64, tmp_path, monkeypatch, dataset):
    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "cache"))
    root = {"voc21": BENCH / "VOCdevkit/VOC2012", "ade20k": BENCH / "ADEChallengeData2016",
            "coco_object": BENCH / "coco_stuff164k"}[dataset]
    out = tmp_path / "r.json"
    code = main(["eval", "--method", "sfp", "--dataset", dataset, "--root", str(root),
                 "--preset", f"sfp/{dataset}", "--pretrained", str(tiny64), "--no-rcs", "--no-sfr",
                 "--limit", "1", "--set", "short_side=64", "--device", "cpu", "--no-progress",
                 "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["method"] == "sfp" and result["preset"] == f"sfp/{dataset}"
    assert result["class_file"].endswith("sfp_voc21.txt" if dataset == "voc21" else f"{dataset}.txt")
