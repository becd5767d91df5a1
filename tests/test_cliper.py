"""CLIPer against its release (golden_cliper.npz): every stage of single windows, every sliding
window, full-image outputs of each recorded config family (its own protocol,
:mod:`resclip.cliper_protocol`); the engine's last stage, composition with RCS / SFR / PAMR,
non-square inputs and the command line."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import resclip
from parity import (
    LOGIT,
    TOK,
    assert_mask_at_stable_pixels,
    golden_segmenter,
    load_golden,
    load_manifest,
    within,
)
from resclip import cliper_protocol as cp
from resclip.cli import main
from resclip.engine import DenseEngine, WindowTrace
from resclip.methods import get_method
from resclip.methods.cliper import CLIPer, fuse_attention, fused_attentions
from resclip.preprocess import normalise

BENCH = Path(__file__).parent / "data" / "benchmarks"


@pytest.fixture(scope="module")
def cl() -> dict[str, np.ndarray]:
    return load_golden("golden_cliper.npz")


@pytest.fixture(scope="module")
def cl_manifest() -> dict:
    return load_manifest("cliper_manifest.json")


@pytest.fixture(scope="module")
def visuals(golden_models) -> dict[str, torch.nn.Module]:
    return {k: m.visual for k, m in golden_models.items()}


def _method(select_layer: int = -1) -> CLIPer:
    m = get_method("cliper").for_fidelity("official")
    assert isinstance(m, CLIPer)
    return m if select_layer == -1 else replace(m, select_layer=select_layer)


def _text(cl, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(cl[f"text__{name}__fg"]), torch.from_numpy(cl[f"text__{name}__bg"])


def _protocol(f: dict) -> cp.CLIPerProtocol:
    return cp.CLIPerProtocol(
        short_side=f["size"], slide_crop=f["sliding_crop_size"], logit_scale=float(f["logit_scale"]),
        attention_thr=f["attention_thr"], score_thr=f["score_threshold"], bkg_thr=f["bkg_thre"],
        normalise=f["is_normalize"])


# ---------------------------------------------------------------- single windows, stage by stage
WINDOWS = {"W0": ("b16", "A", 224), "W1": ("b16", "B", 336), "W2": ("b32", "A", 224)}


@pytest.mark.parametrize("name", list(WINDOWS))
def test_window_stages(golden, cl, visuals, name):
    kind, img, short = WINDOWS[name]
    vis = visuals[kind]
    x = cp.to_input(cp.resize_image(golden[f"img{img}__raw_rgb"], short, 32 if kind == "b32" else 16))
    with torch.inference_mode():
        out = cp.encode_layers(vis, _method(), x, trace=True)
    tr = out.trace
    assert tr is not None
    rows = cl[f"{name}__row_idx"]
    depth = out.tokens.shape[0]
    within(tr["attn_sum"][0][:, rows], cl[f"{name}__attn_sum_rows"], TOK, "summed attention")
    for k in (0, 1, depth - 2, depth - 1):
        within(tr[f"fused_k{k}"][0][:, rows], cl[f"{name}__fused_attn_k{k}_rows"], LOGIT, f"fused {k}")
    within(tr["ln1_feats"][:, 0, rows], cl[f"{name}__ln1_feats_rows"], TOK, "layer features")
    within(tr["attn_out"][:, 0, rows], cl[f"{name}__attn_out_rows"], TOK, "last-block outputs")
    within(out.tokens[:, 0, rows], cl[f"{name}__tokens_rows"], TOK, "tokens")
    patch_rows = rows[rows > 0] - 1
    within(out.attn[0].mean(0)[1:, 1:][patch_rows], cl[f"{name}__final_attn_mean_rows"], LOGIT, "propagation")
    text = cp.query_embeddings(*_text(cl, "voclike"))
    logits = cp.layer_logits(out.tokens[:, 0], text, 100.0, out.grid)
    idx = cl[f"{name}__logit_idx"]
    within(logits.flatten(2)[:, :, idx], cl[f"{name}__layer_logits"], LOGIT, "layer logits")
    maps = cp.segment_maps(vis, _method(), x, *_text(cl, "voclike"), cp.CLIPerProtocol(attention_thr=0.1))
    within(maps.seg.flatten(1)[:, idx], cl[f"{name}__seg"], LOGIT, "seg")


# ---------------------------------------------------------------- full images, every config family
def _full_keys() -> list[str]:
    man = load_manifest("cliper_manifest.json")
    return sorted(man["runs"])


def _run_full(golden, cl, cl_manifest, visuals, key):
    cfg = cl_manifest["runs"][key]
    vis = visuals["b32" if "_b32__" in key else "b16"]
    res = cp.predict(vis, _method(cfg["select_layer"]), golden[f"img{cfg['image']}__raw_rgb"],
                     *_text(cl, cfg["cls"]), _protocol(cfg))
    return res, cfg


@pytest.mark.parametrize("key", _full_keys())
def test_full_image_parity(golden, cl, cl_manifest, visuals, key):
    res, cfg = _run_full(golden, cl, cl_manifest, visuals, key)
    within(res.patch.seg.flatten(1)[:, cl[f"{key}__seg_idx"]], cl[f"{key}__seg_samples"], LOGIT, "seg")
    within(res.patch.score, cl[f"{key}__final_score"], LOGIT, "scores")
    pix = cl[f"{key}__pix_idx"]
    within(res.maps.flatten(1)[:, pix], cl[f"{key}__pred_mask_samples"], LOGIT, "image maps")
    within(res.cam.flatten(1)[:, pix], cl[f"{key}__cam_samples"], LOGIT, "cam")
    want = cl[f"{key}__labels"]
    assert res.labels.shape == want.shape == tuple(cfg["ori_shape"])
    assert_mask_at_stable_pixels(res.labels, want, cl[f"{key}__unstable_idx"])
    if f"{key}__window_coords" in cl:  # every sliding window
        boxes = np.stack([w["box"].numpy() for w in res.patch.windows])
        np.testing.assert_array_equal(boxes, cl[f"{key}__window_coords"])
        for i, w in enumerate(res.patch.windows):
            idx = cl[f"{key}__win{i}__logit_idx"]
            within(w["logits"][-1].flatten(1)[:, idx], cl[f"{key}__win{i}__last_logits"], LOGIT, f"win {i}")
            within(w["logits"].mean(0).flatten(1)[:, idx], cl[f"{key}__win{i}__layer_mean_logits"], LOGIT,
                   f"window {i} layer mean")
            within(w["attn"][cl[f"{key}__win{i}__attn_rows_idx"]], cl[f"{key}__win{i}__attn_rows"], LOGIT,
                   f"window {i} attention")


def test_every_family_is_recorded(cl_manifest):
    fams = {k.split("__")[1] for k in _full_keys()}
    assert {"voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff", "ade20k", "cityscapes",
            "l14_voc21", "context59_b32"} <= fams
    assert set(cl_manifest["families"]) >= {"voc21", "ade20k", "cityscapes"}
    assert cl_manifest["upstream"]["commit"] == "c05fa41a4966d0a43af513546b17c346ccd42559"


def test_resize_matches_the_release(golden, cl_manifest):
    import hashlib

    facts = cl_manifest["facts"]
    for k in "BC":
        for s in (336, 560):
            rs = cp.resize_image(golden[f"img{k}__raw_rgb"], s, 16)
            assert hashlib.sha256(np.ascontiguousarray(rs).tobytes()).hexdigest() == facts[
                f"img{k} CLIPer resize short {s}: sha256 of uint8 RGB"]
        assert list(cp.resized_shape(*golden[f"img{k}__raw_rgb"].shape[:2], 336, 16)) == facts[
            f"img{k} CLIPer resize short 336 (patch 16)"]


# ---------------------------------------------------------------- the maths, fidelity
def test_fused_attention_by_hand():
    torch.manual_seed(0)
    s = torch.rand(1, 2, 6, 6) + 0.1
    a = s.double()
    a = a / a.sum(-2, keepdim=True)
    a = a / a.sum(-1, keepdim=True)
    m = (a + a.transpose(-1, -2)) / 2
    m = (m - m.mean(-2, keepdim=True)).clamp_min(0)
    want = m / m.sum(-1, keepdim=True)
    torch.testing.assert_close(fuse_attention(s).double(), want, atol=1e-6, rtol=0)
    got = fused_attentions(s, range(4), 4, "cumulative")
    for k in range(4):
        torch.testing.assert_close(got[k], fuse_attention(s, k + 1))
    single = fused_attentions(s, range(4), 4, "single")
    assert all(torch.equal(single[k], single[0]) for k in range(4))
    assert not torch.equal(got[3], single[3])
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        fuse_attention(s, 0)


def test_fidelity_switches_the_release_quirks(golden, cl, visuals):
    official = get_method("cliper").for_fidelity("official")
    paper = get_method("cliper").for_fidelity("paper")
    assert isinstance(official, CLIPer) and isinstance(paper, CLIPer)
    assert (official.normalise_rounds, official.pos_embed_fp16, official.threshold_in_place) == (
        "cumulative", True, True)
    assert (paper.normalise_rounds, paper.pos_embed_fp16, paper.threshold_in_place) == (
        "single", False, False)
    x = cp.to_input(golden["imgA__raw_rgb"])
    prot = cp.CLIPerProtocol(attention_thr=0.1)
    fg, bg = _text(cl, "voclike")
    base = cp.segment_maps(visuals["b16"], official, x, fg, bg, prot).seg
    for field, value in (("normalise_rounds", "single"), ("threshold_in_place", False)):
        other = cp.segment_maps(visuals["b16"], replace(official, **{field: value}), x, fg, bg, prot).seg
        assert float((other - base).abs().max()) > 1e-4, field


def test_fp16_positional_embedding_rounding():
    pos = torch.randn(1 + 4, 8)
    up = cp.positional_embedding(pos, 3, 3, fp16=False)
    assert up.shape == (10, 8) and up.dtype == pos.dtype
    torch.testing.assert_close(cp.positional_embedding(pos, 3, 3, fp16=True), up.half().float())
    torch.testing.assert_close(cp.positional_embedding(pos, 2, 2, fp16=False), pos)


def test_labels_from_maps_by_hand():
    maps = torch.tensor([[[0.9, 0.2], [0.5, 0.0]], [[0.1, 0.8], [0.6, 0.05]]])
    score = torch.tensor([0.9, 0.2])
    cam, labels = cp.labels_from_maps(maps, score, cp.CLIPerProtocol(score_thr=0.3, bkg_thr=0.3))
    assert labels.tolist() == [[1, 0], [1, 0]]  # class 2 dropped (score 0.2), small values -> background
    assert cam.shape == (2, 2, 2) and float(cam[1].abs().max()) == 0.0
    no_bkg = cp.CLIPerProtocol(score_thr=0.0, bkg_thr=0)
    cam0, labels0 = cp.labels_from_maps(maps, torch.tensor([0.9, 0.8]), no_bkg)
    assert cam0.shape == (3, 2, 2) and labels0.tolist() == [[1, 2], [2, 0]]
    bg, classes = cp.split_class_lines(["sky, wall  tree", "cat", "person, man"])
    assert bg == ["sky", "wall", "tree"] and classes == ["cat", "person, man"]


# ---------------------------------------------------------------- the engine's last stage
@pytest.mark.parametrize("select_layer", [-1, -2])
def test_engine_stage_matches_the_release_layer(golden, cl, visuals, select_layer):
    """On the tower's native grid (no positional resizing) the engine's stage returns the release's
    tokens of ``select_layer``."""
    engine = DenseEngine(visuals["b16"], _method(select_layer))
    x = cp.to_input(golden["imgA__raw_rgb"])  # the release's pixel normalisation
    text = torch.from_numpy(golden["classifier__voclike"])
    trace = WindowTrace()
    engine.window_logits(x, text, torch.zeros(text.shape[0], dtype=torch.long), trace)
    rows = cl["W0__row_idx"]
    assert trace.tokens is not None and trace.attn is None
    within(trace.tokens[0][rows], cl["W0__tokens_rows"][select_layer], TOK, "stage tokens")
    k = 12 + select_layer
    within(trace.stages["fused_attn"][0][:, rows], cl[f"W0__fused_attn_k{k}_rows"], LOGIT, "stage attention")


SMALL = {"short_side": 96, "slide_crop": 64, "slide_stride": 32, "rcs_layers": (2, 3)}


def test_bad_settings_are_refused_in_one_line(tiny_ckpt, golden, visuals):
    with pytest.raises(ValueError, match=r"^cliper: select_layer 0 \(the embedding layer\)"):
        DenseEngine(visuals["b16"], _method(0)).window_logits(
            normalise(golden["imgA__raw_rgb"]), torch.randn(3, 64), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^cliper: select_layer -13 is outside a 12-block tower"):
        _method(-13).trunk_blocks(12)
    with pytest.raises(ValueError, match="normalise_rounds must be one of"):
        replace(_method(), normalise_rounds="twice")
    with pytest.raises(ValueError, match=r"^cliper: slide_crop 40 must be a multiple of the patch size 16"):
        cp.slide_logits(visuals["b16"], _method(), torch.zeros(1, 3, 64, 64), torch.randn(3, 64), 40, 16, 1.0)
    with pytest.raises(ValueError, match="slide_stride"):
        cp.CLIPerProtocol(slide_crop=224, slide_stride=300)
    with pytest.raises(ValueError, match="logit_scale must be a number"):
        cp.CLIPerProtocol(logit_scale="big")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^expected an \(H, W, 3\) uint8 RGB image"):
        cp.resize_image(np.zeros((4, 4), np.uint8), 336, 16)
    with pytest.raises(ValueError, match="background line"):
        cp.split_class_lines(["sky"])
    seg = resclip.create_segmenter(method="cliper", rcs=False, sfr=False, preset="default",
                                   pretrained=str(tiny_ckpt), text_cache=False)
    with pytest.raises(ValueError, match="replaces the last block with its own stage"):
        seg.engine.last_attention(torch.zeros(1, 3, 64, 64))


def test_non_square_inputs(golden, cl, visuals, golden_ckpt_b16):
    fg, bg = _text(cl, "adelike")
    for rgb in (golden["imgB__raw_rgb"], golden["imgC__raw_rgb"].transpose(1, 0, 2).copy()):
        res = cp.predict(visuals["b16"], _method(), rgb, fg, bg, cp.CLIPerProtocol(slide_crop=224))
        assert res.labels.shape == rgb.shape[:2] and torch.isfinite(res.cam).all()
        with pytest.warns(UserWarning, match="custom ViT"):
            seg = resclip.create_segmenter(method="cliper", rcs=True, sfr=True, preset="default",
                                           pretrained=str(golden_ckpt_b16), text_cache=False)
        out = seg.predict(rgb, ["wall", "sky"], embeddings=golden["classifier__adelike"][[0, 2]])
        assert out.mask.shape == rgb.shape[:2] and np.isfinite(out.probs).all()


def test_registry_and_commands_pick_it_up(tiny64, tmp_path, monkeypatch):
    assert "cliper" in resclip.list_methods()
    assert get_method("cliper").description.startswith("CLIPer:") and get_method("cliper").title == "CLIPer"
    # the command line's method names are a snapshot (`python -m resclip.commands.list_cmd` regenerates
    # it); until it lists cliper, add it here
    from resclip.commands import common

    if "cliper" not in common.METHOD_NAMES:
        monkeypatch.setattr(common, "METHOD_NAMES", (*common.METHOD_NAMES, "cliper"))
    img = BENCH / "VOCdevkit/VOC2012/JPEGImages/crop_294.jpg"
    out = tmp_path / "seg"
    code = main(["segment", str(img), "--classes", "background; car; person", "--method", "cliper",
                 "--pretrained", str(tiny64), "--out", str(out), "--device", "cpu", "--set", "short_side=64",
                 "--set", "rcs_layers=1,2"])
    assert code == 0 and any(out.iterdir())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_runs(tiny_ckpt, photo, precision):
    kw = {"rcs": True, "sfr": True, "preset": "default", "pretrained": str(tiny_ckpt), "text_cache": False,
          **SMALL}
    ref = resclip.create_segmenter(method="cliper", **kw).predict(photo, ["sky, wall", "cat", "tree"])
    low = resclip.create_segmenter(method="cliper", precision=precision, **kw).predict(
        photo, ["sky, wall", "cat", "tree"])
    assert np.isfinite(low.probs).all() and np.abs(low.probs - ref.probs).mean() < 0.05


# ---------------------------------------------------------------- the pipeline behind Segmenter / eval
# one recorded run per family through resclip.create_segmenter(preset="cliper/<family>")
FAMILY_RUNS = [k for k in _full_keys() if k.endswith("__imgC") and "_b32" not in k]
FAMILY_RUNS.append("full__cityscapes__imgA")  # the one cityscapes run (short side 560)


@pytest.mark.parametrize("key", FAMILY_RUNS)
def test_presets_run_the_release_pipeline(golden, cl, cl_manifest, golden_ckpt_b16, monkeypatch, key):
    """The release's recorded runs through ``create_segmenter(preset="cliper/<family>")``; the ViT-L/14
    VOC21 config (second-to-last layer, its thresholds, recorded on the tiny model) through
    ``cliper_l14/voc21``."""
    cfg = cl_manifest["runs"][key]
    family = cfg["family"]
    preset = f"cliper_l14/{family.removeprefix('l14_')}" if family.startswith("l14_") else f"cliper/{family}"
    seg = golden_segmenter("cliper", golden_ckpt_b16, preset=preset)
    assert seg.engine.method.select_layer == cfg["select_layer"]
    proto = seg.protocol.cliper
    want_proto = replace(_protocol(cfg), background=proto.background, background_words=proto.background_words,
                         templates=proto.templates, slide_stride=112)
    assert proto == want_proto  # the preset holds the release's config for the family
    fg, bg = _text(cl, cfg["cls"])
    names = [f"c{i}" for i in range(fg.shape[0])]
    if proto.background:  # class 0's synonyms are the background words
        lines = [", ".join(f"bg{i}" for i in range(bg.shape[0])), *names]
        emb = torch.cat([bg, fg])
    else:
        monkeypatch.setattr(seg, "background_embeddings", lambda words: bg)
        lines, emb = names, fg
    out = seg.predict(golden[f"img{cfg['image']}__raw_rgb"], lines, embeddings=emb)
    want = cl[f"{key}__labels"].astype(np.int64)
    if not proto.background:  # release label 0 = left to the background: no class here
        want = np.where(want == 0, 255, want - 1)
    assert_mask_at_stable_pixels(out.mask.astype(np.int64), want, cl[f"{key}__unstable_idx"])
    assert out.probs.shape == (len(lines), *want.shape) and np.isfinite(out.probs).all()
    conf = out.confidence()
    assert conf.shape == want.shape and (conf[out.mask != 255] > 0).all()


def test_synonyms_take_the_max_of_their_maps(golden, cl, visuals):
    fg, bg = _text(cl, "voclike")
    rgb = golden["imgA__raw_rgb"]
    proto = cp.CLIPerProtocol(attention_thr=0.2, score_thr=0.0, bkg_thr=0.001)
    one = cp.predict(visuals["b16"], _method(), rgb, fg[:3], bg, proto)
    # class 1 gets a second query: its map is the max of both rows after the softmax
    two = cp.predict(visuals["b16"], _method(), rgb, torch.cat([fg[:3], fg[3:4]]), bg, proto,
                     fg_to_class=torch.tensor([0, 1, 2, 1]))
    assert two.patch.seg.shape == one.patch.seg.shape
    assert not torch.equal(two.patch.seg, one.patch.seg)


def test_pipeline_presets_refuse_what_does_not_apply(golden_ckpt_b16, golden):
    with pytest.raises(ValueError, match=r"^preset .cliper/voc21. runs CLIPer.s own all-layer pipeline, "
                                         r"where RCS and SFR have no last block"):
        golden_segmenter("cliper", golden_ckpt_b16, preset="cliper/voc21", rcs=True)
    with pytest.raises(ValueError, match=r"^preset 'cliper/ade20k' runs CLIPer's own all-layer pipeline, "
                                         r"which needs method='cliper'"):
        golden_segmenter("naclip", golden_ckpt_b16, preset="cliper/ade20k")
    with pytest.raises(ValueError, match="has its own refinement"):
        replace(resclip.get_preset("cliper/voc21").protocol, pamr_steps=10)
    seg = golden_segmenter("cliper", golden_ckpt_b16, preset="cliper/voc21")
    with pytest.raises(ValueError, match="needs at least one more class"), pytest.warns(UserWarning):
        seg.predict(golden["imgA__raw_rgb"], ["sky, wall"], embeddings=torch.randn(2, 64))
    with pytest.raises(ValueError, match="templates must be one of openai, cliper"):
        cp.CLIPerProtocol(templates="mine")
    assert seg.templates == cp.CLIPER_TEMPLATES and len(seg.templates) == 15


@pytest.mark.slow
def test_eval_with_the_release_pipeline_counts_unassigned_pixels(golden_ckpt_b16, tmp_path, capsys):
    """`resclip eval --preset cliper/ade20k`: pixels CLIPer leaves to its background word get no
    class and count as misses of their true class (as the release scores them)."""
    import json

    out = tmp_path / "r.json"
    code = main(["eval", "--dataset", "ade20k", "--root", str(BENCH / "ADEChallengeData2016"),
                 "--method", "cliper", "--preset", "cliper/ade20k", "--no-rcs", "--no-sfr",
                 "--pretrained", str(golden_ckpt_b16), "--device", "cpu", "--limit", "2",
                 "--output", str(out), "--state-dir", str(tmp_path / "state")])
    assert code == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    cm = np.array(res["confusion_matrix"])
    missed = np.array(res.get("unassigned_pixels", [0] * len(cm)))
    assert cm.shape == (150, 150) and missed.shape == (150,) and missed.sum() > 0
    assert "preset cliper/ade20k" in capsys.readouterr().out
