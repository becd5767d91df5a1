"""PEARL against its release (golden_pearl.npz): every stage of single windows (centring weights,
cross-covariance, rotation, attention, tokens, logits), every sliding window, full-image outputs of
each recorded config family (TLP input, coarse grid, output, probabilities, masks); composition
with RCS / SFR / PAMR, fidelity, non-square input, presets and the command line."""

from __future__ import annotations

import functools
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
from resclip.methods import get_method
from resclip.methods.pearl import PEARL, centring_weights, cross_covariance, polar_exact, polar_newton_schulz
from resclip.preprocess import normalise, window_coords
from resclip.tlp import TLPConfig, TLPTrace, query_affinity, tlp_refine
from resclip.upsample import bilinear_rows
from resclip.vit import last_block_qkv

BENCH = Path(__file__).parent / "data" / "benchmarks"
CLASSES = {"voclike": VOCLIKE, "adelike": ADELIKE}


@pytest.fixture(scope="module")
def pe() -> dict[str, np.ndarray]:
    return load_golden("golden_pearl.npz")


@pytest.fixture(scope="module")
def pe_manifest() -> dict:
    return load_manifest("pearl_manifest.json")



_seg = functools.partial(golden_segmenter, "pearl")


# ---------------------------------------------------------------- single windows, stage by stage
WINDOWS = {"W0": ("b16", "A", None), "W1": ("b16", "B", (112, 112, 336, 336)), "W2": ("b32", "A", None)}


def _window_input(golden, img, crop):
    if crop is None:
        return normalise(golden[f"img{img}__raw_rgb"])
    y1, x1, y2, x2 = crop
    return normalise(golden[f"img{img}__resized_rgb"])[:, :, y1:y2, x1:x2]


@pytest.mark.parametrize("name", list(WINDOWS))
def test_window_stages(golden, pe, golden_ckpts, name):
    kind, img, crop = WINDOWS[name]
    seg = _seg(golden_ckpts[kind])
    x = _window_input(golden, img, crop)
    text = torch.from_numpy(golden["classifier__voclike"])
    trace = WindowTrace()
    logits = seg.engine.window_logits(x, text, torch.zeros(text.shape[0], dtype=torch.long), trace)
    rows = pe[f"{name}__row_idx"]
    q, k, _ = last_block_qkv(seg.engine.visual.transformer.resblocks[-1], trace.pre_last_block_x)
    q, k = q[0].float(), k[0].float()
    within(q[:, rows], pe[f"{name}__q_rows"], TOK, "q")
    within(k[:, rows], pe[f"{name}__k_rows"], TOK, "k")
    within(centring_weights(q)[..., 0], pe[f"{name}__pa_weights"], LOGIT, "centring weights")
    _, m = cross_covariance(q, k)
    within(m, pe[f"{name}__cross_cov"], TOK, "cross-covariance")
    method = seg.engine.method
    assert isinstance(method, PEARL) and method.rotation == "newton_schulz"
    within(method.rotation_matrix(m), pe[f"{name}__rotation"], TOK, "rotation")
    assert trace.attn is not None and trace.tokens is not None
    within(trace.attn[0][:, rows], pe[f"{name}__attn_rows"], LOGIT, "attention")
    v_rows = torch.matmul(trace.attn[0][:, rows], last_block_qkv(
        seg.engine.visual.transformer.resblocks[-1], trace.pre_last_block_x)[2][0].float())
    within(v_rows, pe[f"{name}__attn_v_rows"], TOK, "attention @ v")
    within(trace.tokens[0], pe[f"{name}__tokens"], TOK, "tokens")
    within(logits[0], pe[f"{name}__patch_logits"], LOGIT, "patch logits")


def test_alpha_kk_window(golden, pe, golden_ckpts):
    """W3: the release with alpha_kk = 0.3 (ADE20K, Cityscapes) on W0's input."""
    seg = _seg(golden_ckpts["b16"], "pearl/ade20k")
    assert seg.engine.method.alpha_kk == 0.3  # type: ignore[attr-defined]
    x = normalise(golden["imgA__raw_rgb"])
    text = torch.from_numpy(golden["classifier__voclike"])
    trace = WindowTrace()
    logits = seg.engine.window_logits(x, text, torch.zeros(text.shape[0], dtype=torch.long), trace)
    assert trace.attn is not None
    within(trace.attn[0][:, pe["W0__row_idx"]], pe["W3__attn_rows"], LOGIT, "attention")
    within(logits[0], pe["W3__patch_logits"], LOGIT, "patch logits")


def test_rotation_solvers():
    torch.manual_seed(0)
    m = torch.randn(3, 8, 8)
    r = polar_exact(m)
    torch.testing.assert_close(r.transpose(-1, -2) @ r, torch.eye(8).expand(3, 8, 8), atol=1e-5, rtol=0)
    # the polar factor maximises trace(R^T M) over orthogonal R, and Newton-Schulz tends to it
    torch.testing.assert_close(polar_newton_schulz(m.double(), steps=60), r.double(), atol=2e-3,
                               rtol=0)
    well = torch.linalg.qr(torch.randn(8, 8))[0] * 2.0  # a well-conditioned M: 5 steps suffice
    torch.testing.assert_close(polar_newton_schulz(well[None], steps=5), polar_exact(well[None]), atol=1e-3,
                               rtol=0)


# ---------------------------------------------------------------- full images
# family -> (preset, classifier, checkpoint, images, overrides)
FAMILIES = {
    "voc21": ("pearl/voc21", "voclike", "b16", "ABC", {}),
    "voc20": ("pearl/voc20", "voclike", "b16", "B", {}),
    "context60": ("pearl/context60", "voclike", "b16", "AC", {}),
    "default": ("pearl/context59", "adelike", "b16", "BC", {}),
    "ade20k": ("pearl/ade20k", "adelike", "b16", "C", {}),
    "city_scapes": ("pearl/cityscapes", "adelike", "b16", "A", {}),
    "default_b32": ("pearl/context59", "adelike", "b32", "C", {}),
    "tlp_off": ("pearl/context59", "voclike", "b16", "C", {"tlp": None}),
}
RUNS = [(fam, img) for fam, spec in FAMILIES.items() for img in spec[3]]


@pytest.mark.parametrize(("fam", "img"), RUNS)
def test_full_image_parity(golden, pe, golden_ckpts, fam, img):
    preset, cls, kind, _, kw = FAMILIES[fam]
    seg = _seg(golden_ckpts[kind], preset, **kw)
    p = f"full__{fam}__img{img}"
    image = golden[f"img{img}__raw_rgb"]
    res = seg.predict(image, CLASSES[cls], embeddings=golden[f"classifier__{cls}"])
    assert res.mask.shape == image.shape[:2]
    idx = pe[f"{p}__final_idx"]
    q = res.logits.shape[0]
    if f"{p}__tlp_in_samples" in pe:
        before = bilinear_rows(torch.from_numpy(res.logits), image.shape[:2], 0, image.shape[0],
                               res.logits.shape[1])
        within(before.reshape(q, -1)[:, idx], pe[f"{p}__tlp_in_samples"], LOGIT, "TLP input")
    full = res.full.logits_full().reshape(q, -1)
    within(full[:, idx], pe[f"{p}__final_logits_samples"], LOGIT, "final logits")
    probs = res.probs.reshape(res.probs.shape[0], -1)
    within(probs[:, idx], pe[f"{p}__probs_samples"], LOGIT, "probabilities")
    assert_mask_at_stable_pixels(res.mask, pe[f"{p}__pred"], pe[f"{p}__pred_unstable_idx"])


TLP_RUNS = [(fam, img) for fam, img in RUNS if fam != "tlp_off"]


@pytest.mark.parametrize(("fam", "img"), TLP_RUNS)
def test_tlp_stages(golden, pe, golden_ckpts, fam, img):
    """TLP's coarse-grid pieces from the recorded TLP input (guide image and logits)."""
    preset, cls, kind, _, _ = FAMILIES[fam]
    p = f"full__{fam}__img{img}"
    seg = _seg(golden_ckpts[kind], preset)
    image = golden[f"img{img}__raw_rgb"]
    spec, text = seg.encode_classes(CLASSES[cls], golden[f"classifier__{cls}"])
    x = seg.resized_input(image)
    logits = seg.image_logits(x, text, torch.tensor(spec.query_to_class))
    size = image.shape[:2]
    full = bilinear_rows(logits, size, 0, size[0], logits.shape[1])
    guide = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    idx = pe[f"{p}__final_idx"]
    within(guide.reshape(3, -1)[:, idx], pe[f"{p}__tlp_image_samples"], LOGIT, "guide")
    cfg = seg.protocol.tlp
    assert cfg is not None
    trace = TLPTrace()
    out = tlp_refine(guide, full[None], query_affinity(text, cfg), cfg, trace)
    gi = pe[f"{p}__grid_idx"]
    assert trace.logits is not None and trace.agreement is not None and trace.weight is not None
    assert trace.a_h is not None and trace.a_v is not None and trace.solution is not None
    q = trace.logits.shape[1]
    within(trace.logits[0].reshape(q, -1)[:, gi], pe[f"{p}__grid_logits_samples"], LOGIT, "pooled logits")
    within(trace.agreement[0, 0].reshape(-1)[gi], pe[f"{p}__agree_samples"], LOGIT, "agreement")
    within(trace.weight[0, 0].reshape(-1)[gi], pe[f"{p}__confidence_samples"], LOGIT, "data weight")
    ones = torch.ones_like(trace.a_h[..., :1])
    a_h = torch.cat([ones, trace.a_h], dim=-1)  # the release pads the first column with ones
    a_v = torch.cat([torch.ones_like(trace.a_v[..., :1, :]), trace.a_v], dim=-2)
    within(a_h[0, 0].reshape(-1)[gi], pe[f"{p}__w_h_samples"], LOGIT, "horizontal edges")
    within(a_v[0, 0].reshape(-1)[gi], pe[f"{p}__w_v_samples"], LOGIT, "vertical edges")
    within(trace.solution[0].reshape(q, -1)[:, gi], pe[f"{p}__cg_out_samples"], LOGIT, "CG solution")
    within(out[0].reshape(q, -1)[:, idx], pe[f"{p}__final_logits_samples"], LOGIT, "TLP output")


WINDOW_RUNS = [("context60", "A"), ("default_b32", "C")]


@pytest.mark.parametrize(("fam", "img"), WINDOW_RUNS)
def test_every_window(golden, pe, golden_ckpts, fam, img):
    preset, cls, kind, _, _ = FAMILIES[fam]
    seg = _seg(golden_ckpts[kind], preset)
    p = f"full__{fam}__img{img}"
    x = seg.resized_input(golden[f"img{img}__raw_rgb"])
    pr = seg.protocol
    boxes = window_coords(x.shape[2], x.shape[3], pr.slide_crop, pr.slide_stride)
    np.testing.assert_array_equal(np.array(boxes), pe[f"{p}__window_coords"])
    spec, text = seg.encode_classes(CLASSES[cls], golden[f"classifier__{cls}"])
    crops = torch.cat([x[:, :, y1:y2, x1:x2] for y1, x1, y2, x2 in boxes])
    logits = seg.engine.window_logits(crops, text, torch.tensor(spec.query_to_class))
    for k in range(len(boxes)):
        within(logits[k], pe[f"{p}__win{k}__patch_logits"], LOGIT, f"window {k}")


# ---------------------------------------------------------------- presets and fidelity
def test_presets_are_the_release_configs(pe_manifest):
    cfgs = pe_manifest["dataset_cfgs_pearl"]
    base = cfgs["all"]
    names = {"coco_stuff": "coco_stuff164k", "cityscapes": "city_scapes"}
    for ds in resclip.presets.DATASETS:
        want = {**base, **cfgs[names.get(ds, ds)]}
        preset = resclip.presets.get_preset(f"pearl/{ds}")
        got = preset.protocol
        assert (got.short_side, got.slide_crop, got.slide_stride) == (
            want["resize_short"], want["slide_crop"], want["slide_stride"]), ds
        assert (got.logit_scale, got.prob_thd, got.area_thd, got.pamr_steps) == (
            want["logit_scale"], want["prob_thd"], None, 0), ds
        assert got.tlp == TLPConfig(grid=want["grid"]), ds
        assert preset.method_settings("pearl") == {"alpha_kk": want["alpha_kk"]}, ds
        assert preset.method_settings("naclip") == {} and preset.class_file is None
        assert preset.dataset == ds and preset.fidelity == "official" and preset.trunk_attention == "fused"


def test_fidelity_switches_rotation_and_coupling(tiny_ckpt):
    assert get_method("pearl").for_fidelity("official").rotation == "newton_schulz"  # type: ignore[attr-defined]
    assert get_method("pearl").for_fidelity("paper").rotation == "exact"  # type: ignore[attr-defined]
    seg = resclip.create_segmenter(method="pearl", rcs=False, sfr=False, preset="pearl/ade20k",
                                   pretrained=str(tiny_ckpt), text_cache=False, fidelity="paper")
    assert seg.engine.method.rotation == "exact"  # type: ignore[attr-defined]
    assert seg.engine.method.alpha_kk == 0.3  # type: ignore[attr-defined]
    assert seg.protocol.tlp is not None and seg.protocol.tlp.coupling == "matrix"
    variant = seg.with_method("pearl")
    assert variant.engine.method.alpha_kk == 0.3  # type: ignore[attr-defined]
    back = resclip.presets.to_fidelity(resclip.presets.to_fidelity(
        resclip.presets.get_preset("pearl/voc21"), "paper"), "official")
    assert back.protocol.tlp is not None and back.protocol.tlp.coupling == "diagonal"


def test_paper_fidelity_runs_and_differs(golden, golden_ckpts):
    image = golden["imgC__raw_rgb"]
    emb = golden["classifier__voclike"]
    b16 = golden_ckpts["b16"]
    official = _seg(b16, "pearl/context60").predict(image, VOCLIKE, embeddings=emb)
    paper = _seg(b16, "pearl/context60", fidelity="paper").predict(image, VOCLIKE, embeddings=emb)
    assert np.isfinite(paper.probs).all() and np.abs(paper.logits - official.logits).max() > 1e-4


# ---------------------------------------------------------------- composition and robustness
SMALL = {"short_side": 96, "slide_crop": 64, "slide_stride": 32, "rcs_layers": (2, 3)}
CLASSES_SMALL = ["sky, wall", "cat", "person, man", "tree"]


def _small(ckpt, rcs=False, sfr=False, **kw):
    return resclip.create_segmenter(method="pearl", rcs=rcs, sfr=sfr, preset="pearl/ade20k",
                                    pretrained=str(ckpt), text_cache=False, **{**SMALL, **kw})


def test_tlp_changes_the_output_and_can_be_turned_off(tiny_ckpt, photo):
    on = _small(tiny_ckpt).predict(photo, CLASSES_SMALL)
    off = _small(tiny_ckpt, tlp=None).predict(photo, CLASSES_SMALL)
    np.testing.assert_array_equal(on.logits, off.logits)
    assert np.abs(on.full.logits_full() - off.full.logits_full()).max() > 1e-4


def test_non_square_inputs(golden, golden_ckpt_b16):
    for rgb in (golden["imgB__resized_rgb"], golden["imgB__resized_rgb"].transpose(1, 0, 2).copy()):
        for crop in (0, 224):
            seg = _seg(golden_ckpt_b16, "pearl/ade20k", slide_crop=crop)
            res = seg.predict(rgb, ADELIKE, embeddings=golden["classifier__adelike"])
            assert res.mask.shape == rgb.shape[:2] and np.isfinite(res.probs).all()


def test_attention_figure_is_available(golden, golden_ckpt_b16):
    """PEARL uses the standard last block: its attention map is the one the windows used."""
    seg = _seg(golden_ckpt_b16, "pearl/ade20k")
    x = normalise(golden["imgA__raw_rgb"])
    attn = seg.engine.last_attention(x)
    assert attn.shape == (1, 2, 197, 197)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 2, 197), atol=1e-5, rtol=0)


def test_registry_and_commands_pick_it_up(tiny64, tmp_path, capsys):
    assert "pearl" in resclip.list_methods()
    assert main(["list", "methods"]) == 0
    assert "pearl" in capsys.readouterr().out
    assert main(["list", "presets"]) == 0
    assert "pearl/cityscapes" in capsys.readouterr().out
    img = BENCH / "VOCdevkit/VOC2012/JPEGImages/crop_294.jpg"
    out = tmp_path / "seg"
    code = main(["segment", str(img), "--classes", "background; car; person", "--method", "pearl",
                 "--preset", "pearl/voc21", "--pretrained", str(tiny64), "--no-sfr", "--no-rcs",
                 "--out", str(out), "--device", "cpu", "--set", "short_side=64"])
    assert code == 0 and any(out.iterdir())
