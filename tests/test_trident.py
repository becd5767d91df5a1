"""Trident against its release (golden_trident.npz, trident_manifest.json): every stage of the
splice-then-segment pipeline (processed input, DINO tokens, proxy attention, sub-image outputs, splice,
SAM attention / values / affinity, tokens, logits, probabilities, masks) and of the SAM refinement
(regions, prompts, SAM's IoU and mask logits, scores, masks) for each release config family; the
refinement composed with another method (NACLIP + RCS + SFR); the fused SAM block against the plain
form; the engine's per-window stage; settings and errors."""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import resclip
from parity import (
    LOGIT,
    TOK,
    VOCLIKE,
    assert_mask_at_stable_pixels,
    golden_segmenter,
    load_golden,
    load_manifest,
    within,
)
from resclip import trident as TR
from resclip.methods.proxyclip import proxy_scores
from resclip.methods.trident import Trident, image_proxy_scores, sam_affinity
from resclip.preprocess import normalise, resize_image, window_coords
from resclip.protocol import class_probabilities, threshold_argmax

segment_anything = pytest.importorskip("segment_anything")

GOLDEN_AUX = Path(__file__).parent / "data" / "golden" / "aux"
SAM_LOGIT = 1e-4  # SAM's mask logits reach tens: 1e-4 absolute is ~1e-6 relative
Q2C = {"voclike": torch.tensor([0, 0, 0, 0, *range(1, 15)]), "adelike": torch.arange(8)}
SLOW_RUNS = {"context59__imgA", "voc21__imgC", "context60__imgB", "coco_object__imgC", "voc20__imgB",
             "coco_stuff__imgC", "city_scapes__imgC", "ade20k__imgB"}


@pytest.fixture(scope="module")
def tg() -> dict[str, np.ndarray]:
    return load_golden("golden_trident.npz")


@pytest.fixture(scope="module")
def tman() -> dict:
    return load_manifest("trident_manifest.json")


def _build_sam(path: Path) -> Any:
    """The tiny SAM of tests/data/golden/aux (Meta's segment_anything modules)."""
    m = segment_anything.modeling
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(depth=2, embed_dim=32, img_size=1024, mlp_ratio=4,
                                        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2,
                                        patch_size=16, qkv_bias=True, use_rel_pos=True,
                                        global_attn_indexes=(1,),
                                        window_size=14, out_chans=32),
        prompt_encoder=m.PromptEncoder(embed_dim=32, image_embedding_size=(64, 64),
                                       input_image_size=(1024, 1024),
                                       mask_in_chans=16),
        mask_decoder=m.MaskDecoder(num_multimask_outputs=3, transformer=m.TwoWayTransformer(
            depth=2, embedding_dim=32, mlp_dim=64, num_heads=8), transformer_dim=32, iou_head_depth=3,
            iou_head_hidden_dim=32),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()
    state = torch.load(path, weights_only=True)
    sam.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return sam


@pytest.fixture(scope="module")
def models(golden_ckpts) -> dict[str, Any]:
    from resclip.clip import load_clip
    from resclip.dino import load_dino

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the golden checkpoint is a custom ViT
        visual = load_clip(None, str(golden_ckpts["b16"])).model.visual
    dino = load_dino(GOLDEN_AUX / "dino_vitb16_tiny_fp16.pth", pos_embed="hub")
    return {"visual": visual, "dino": dino, "sam": _build_sam(GOLDEN_AUX / "sam_vit_tiny_fp16.pth")}


@pytest.fixture(scope="module")
def sam_images(models, golden) -> dict[str, TR.SamImage]:
    """SAM's encoding of the golden images (what the refinement prompts against)."""
    return {img: TR.encode_sam(models["sam"], TR.sam_source(golden[f"img{img}__raw_rgb"])) for img in "AC"}


def _method(cfg: dict) -> Trident:
    return Trident("trident", keep_residual=False, cos_fac=cfg.get("cos_fac", 1.2),
                   refine_neg_cos=cfg.get("refine_neg_cos", True))


@pytest.fixture(scope="module")
def pipeline(models, golden):
    """Logits and intermediates of a run's (image, resize, stride, cos_fac, refine_neg_cos, halves), cached:
    runs that differ only in their thresholds share them."""
    cache: dict[tuple, tuple[dict, torch.Tensor, tuple]] = {}

    def run(info: dict) -> tuple[dict, torch.Tensor, tuple]:
        cfg = info["config"]
        key = (info["image"], info["resize_short"], cfg.get("slide_stride", 224), cfg.get("cos_fac", 1.2),
               cfg.get("refine_neg_cos", True), cfg.get("dataset_type") == "CityscapesDataset",
               info["classifier"])
        if key not in cache:
            rgb = golden[f"img{info['image']}__raw_rgb"]
            text = torch.from_numpy(golden[f"classifier__{info['classifier']}"])
            trace: dict = {}
            logits, _, sams = TR.image_logits(models["visual"], models["dino"], models["sam"], _method(cfg),
                                              normalise(resize_image(rgb, key[1])), rgb, text, 336, key[2],
                                              TR.TridentProtocol(split_halves=key[5]), trace)
            cache.clear()  # one entry: the runs of an image come one after the other
            cache[key] = (trace, logits, sams)
        return cache[key]

    return run


def _runs() -> list[Any]:
    """The recorded runs, those sharing logits next to each other (the pipeline fixture keeps one)."""
    names = [n for n in load_manifest("trident_manifest.json")["runs"] if not n.startswith("compose")]
    follows = {"coarse0__imgA": "voc21__imgA", "coco_object__imgC": "voc21__imgC"}
    order = [n for n in names if n not in follows]
    for name, after in follows.items():
        order.insert(order.index(after) + 1, name)
    return [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_RUNS else []) for n in order]


# ---------------------------------------------------------------- the release's runs, stage by stage
@pytest.mark.parametrize("name", _runs())
def test_release_run(models, pipeline, tg, tman, name):
    info = tman["runs"][name]
    cfg = info["config"]
    p = name + "__"
    trace, logits, sams = pipeline(info)
    if p + "boxes" in tg:
        x = trace["processed"]
        assert list(x.shape[-2:]) == info["processed"]
        within(x[0].flatten(1)[:, tg[p + "proc_idx"]], tg[p + "proc_samples"], TOK, "processed input")
        p16 = 16
        boxes = [(y1 * p16, x1 * p16, y2 * p16, x2 * p16) for y1, x1, y2, x2 in tg[p + "boxes"].tolist()]
        assert boxes == window_coords(x.shape[-2], x.shape[-1], 336, cfg.get("slide_stride", 224))
        crops = trace["crops"]
        from resclip.auxiliary import imagenet_input

        dino_in = imagenet_input(crops).flatten(2)[:, :, tg[p + "crop_idx"]]
        within(dino_in, tg[p + "dino_in_samples"], TOK, "DINO input")
        rows = tg[p + "tok_idx"]
        within(trace["dino_tokens"][:, rows], tg[p + "dino_tokens"], TOK, "DINO tokens")
        within(trace["proxy_attn"][:, rows], tg[p + "proxy_attn_rows"], LOGIT, "proxy attention")
        within(trace["proxy_out"][:, rows], tg[p + "proxy_out"], TOK, "sub-image outputs")
        assert list(trace["spliced"].shape[-2:]) == info["splice_grid"]
        within(trace["spliced"].flatten(1)[:, tg[p + "splice_idx"]], tg[p + "spliced"], TOK, "splice")
        for j, sam in enumerate(sams[: len(trace["sam_attn"])]):
            q = p + f"sam{j}__"
            assert list(sam.grid) == info[f"sam{j}"]["valid"]
            assert list(sam.input_size) == info[f"sam{j}"]["input_size"]
            assert list(sam.original_size) == info[f"sam{j}"]["original_size"]
            ri, ci = tg[q + "row_idx"], tg[q + "col_idx"]
            within(trace["sam_attn"][j][:, ri][:, :, ci], tg[q + "attn_rows"], LOGIT, "SAM attention")
            within(trace["sam_values"][j][:, ri], tg[q + "v_rows"], TOK, "SAM values")
            within(trace["sam_weights"][j][ri][:, ci], tg[q + "weights_rows"], LOGIT, "SAM affinity")
            emb = sam.embedding[0].flatten(1)[:, tg[q + "emb_idx"]]
            within(emb, tg[q + "embedding"], TOK, "SAM embedding")
        ki = tg[p + "token_idx"]
        within(trace["features"][ki], tg[p + "guidance_out"], TOK, "aggregated features")
        within(trace["tokens"][ki], tg[p + "tokens"], TOK, "tokens")
    src = info.get("same_logits_as", name) + "__"
    fi = tg[src + "final_idx"]
    within(logits.flatten(1)[:, fi], tg[src + "logits"], LOGIT, "logits")
    # post-processing and the refinement (the run's thresholds)
    probs = class_probabilities(logits, Q2C[info["classifier"]], 40.0)
    within(probs.flatten(1)[:, fi], tg[p + "probs"], LOGIT, "probabilities")
    coarse = threshold_argmax(probs, cfg.get("prob_thd", 0.0))
    assert_mask_at_stable_pixels(coarse.numpy(), tg[p + "pred"], tg[p + "pred_unstable_idx"])
    rt = TR.RefineTrace()
    labels, scores = TR.sam_refine(coarse, probs, models["sam"], sams[-1],
                                   TR.SAMRefineConfig(coarse_thresh=cfg.get("coarse_thresh", 0.2)), rt)
    _check_refinement(tg, p, rt, labels, scores, fi)
    assert info["changed_pixels"] > 0 and int((labels != coarse).sum()) > 0


def _check_refinement(tg, p, rt, labels, scores, fi) -> None:
    down = rt.down_probs.flatten(1)[:, tg[p + "down_idx"]]
    within(down, tg[p + "down_probs"], LOGIT, "half-resolution probabilities")
    np.testing.assert_array_equal(rt.down_labels.flatten()[tg[p + "down_idx"]].numpy(), tg[p + "down_labels"])
    np.testing.assert_array_equal(rt.regions.numpy(), tg[p + "regions"])
    np.testing.assert_array_equal(np.array(rt.region_class), tg[p + "region_class"])
    np.testing.assert_array_equal(rt.points.numpy(), tg[p + "region_points"])
    np.testing.assert_array_equal(rt.boxes.numpy(), tg[p + "region_boxes"])
    within(rt.iou, tg[p + "prompt_iou"], LOGIT, "SAM IoU predictions")
    low = rt.low_res.flatten(1)[:, tg[p + "lowres_idx"]]
    within(low, tg[p + "prompt_lowres"], SAM_LOGIT, "SAM mask logits")
    masks = np.stack([rt.mask_inputs[c].flatten()[tg[p + "lowres_idx"]].numpy()
                      for c in sorted(rt.mask_inputs)])
    within(masks, tg[p + "prompt_mask_input"], LOGIT, "mask prompts")
    within(scores.flatten(1)[:, fi], tg[p + "refined_logits"], LOGIT, "refined scores")
    assert_mask_at_stable_pixels(labels.numpy(), tg[p + "mask"], tg[p + "mask_unstable_idx"])


# ---------------------------------------------------------------- the refinement on another method
@pytest.mark.parametrize("img", ["A", pytest.param("C", marks=pytest.mark.slow)])
def test_refinement_composes_with_naclip_rcs_sfr(models, golden, golden_ckpts, tg, sam_images, img):
    """NACLIP + RCS + SFR (preset voc21) + Trident's SAM refinement = the release's sam_refinement on
    that output."""
    seg = golden_segmenter("naclip", golden_ckpts["b16"], preset="voc21", rcs=True, sfr=True)
    rgb = golden[f"img{img}__raw_rgb"]
    res = seg.predict(rgb, VOCLIKE, embeddings=golden["classifier__voclike"])
    probs = res.full.class_prob_rows(0, rgb.shape[0]).float()
    mask = torch.from_numpy(res.mask.astype(np.int64))
    p = f"compose__naclip_rcs_sfr__img{img}__"
    fi = tg[p + "final_idx"]
    within(probs.flatten(1)[:, fi], tg[p + "probs"], LOGIT, "NACLIP probabilities")
    np.testing.assert_array_equal(mask.numpy(), tg[p + "pred"])
    rt = TR.RefineTrace()
    cfg = TR.SAMRefineConfig(coarse_thresh=0.2)
    labels, scores = TR.sam_refine(mask, probs, models["sam"], sam_images[img], cfg, rt)
    _check_refinement(tg, p, rt, labels, scores, fi)
    assert int((labels != mask).sum()) > 1000


# ---------------------------------------------------------------- SAM's encoder and the affinity
def test_fused_last_block_equals_plain_form(models):
    """The row-blocked last SAM block (with the affinity fused in) = SAM's own block + sam_affinity."""
    sam = models["sam"]
    enc = sam.image_encoder
    rgb = np.random.default_rng(0).integers(0, 256, (40, 160, 3), dtype=np.uint8)  # 16 x 64 SAM tokens
    method = Trident("trident", keep_residual=False, cos_fac=0.8, refine_neg_cos=False, neg_fallback=0.2)
    trace: dict = {}
    out = TR.encode_sam(sam, rgb, method, trace)
    assert out.grid == (16, 64) and out.input_size == (256, 1024) and out.original_size == (40, 160)
    x, _ = TR._sam_input(sam, rgb)
    with torch.inference_mode():
        y = enc.blocks[0](enc.pos_embed + enc.patch_embed(x))
        # a row block that does not divide the 64 x 64 grid (encode_sam used 512 rows)
        got, weights = TR._last_block(enc.blocks[1], y, out.grid, method, None, rows_per_step=1500)
        torch.testing.assert_close(got, enc.blocks[1](y), rtol=0, atol=2e-6)
        torch.testing.assert_close(enc.neck(got.permute(0, 3, 1, 2)), out.embedding, rtol=0, atol=1e-5)
    torch.testing.assert_close(weights, out.affinity, rtol=0, atol=1e-6)
    want = sam_affinity(trace["values"], trace["attn"], 0.8, False, 0.2, 0.9)
    torch.testing.assert_close(out.affinity, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.affinity.sum(-1), torch.ones(16 * 64), rtol=0, atol=1e-5)
    assert bool((out.affinity.diagonal() > 0).all())
    assert TR.encode_sam(sam, rgb).affinity is None


def test_affinity_thresholds():
    torch.manual_seed(0)
    v = torch.randn(3, 20, 8)
    attn = torch.softmax(torch.randn(3, 20, 20), dim=-1)
    w = sam_affinity(v, attn, 1.2)
    assert torch.allclose(w.sum(-1), torch.ones(20)) and bool((w.diagonal() > 0).all())
    # cos_fac 0: every token with a positive cosine; cap 0.9 keeps near-duplicates
    cos = torch.nn.functional.normalize(v, dim=-1) @ torch.nn.functional.normalize(v, dim=-1).transpose(1, 2)
    keep = ((cos > 0) * attn).mean(0)
    torch.testing.assert_close(sam_affinity(v, attn, 0.0), keep / keep.sum(-1, keepdim=True))
    big = sam_affinity(v, attn, 100.0)  # positive thresholds capped at 0.9, negative ones kept
    t = (100.0 * cos.mean(0).mean(-1, keepdim=True)).clamp(max=0.9)
    assert bool((t == 0.9).any()) and bool((t < 0).any())
    capped = ((cos > t) * attn).mean(0)
    torch.testing.assert_close(big, capped / capped.sum(-1, keepdim=True))
    fallback = sam_affinity(v, attn, 100.0, refine_neg_cos=False, neg_fallback=0.5)
    t = torch.where(t < 0, 0.5, t)
    kept = ((cos > t) * attn).mean(0)
    torch.testing.assert_close(fallback, kept / kept.sum(-1, keepdim=True))


def test_windowed_last_block_is_refused(models):
    block = models["sam"].image_encoder.blocks[0]  # a windowed block
    with pytest.raises(ValueError, match="windowed attention"):
        TR._last_block(block, torch.zeros(1, 64, 64, 32), (4, 4), None, None)


# ---------------------------------------------------------------- proxy attention, splice, sizes
def test_image_proxy_scores():
    torch.manual_seed(1)
    tokens = torch.randn(3, 16, 8)
    one = image_proxy_scores(tokens[:1], 1.2, 3.0)
    torch.testing.assert_close(one, proxy_scores(tokens[:1], 1.2, 3.0))  # one sub-image: ProxyCLIP's
    all3 = image_proxy_scores(tokens, 1.2, 3.0)
    x = torch.nn.functional.normalize(tokens, dim=-1)
    sim = x @ x.transpose(1, 2)
    want = (sim - sim.mean() * 1.2) * 3.0
    finite = torch.isfinite(all3)
    torch.testing.assert_close(all3[finite], want[finite])
    assert bool((want[~finite] < 0).all()) and not torch.equal(all3, proxy_scores(tokens, 1.2, 3.0))
    window = Trident("t", keep_residual=False, proxy_mean="window")
    assert torch.equal(window.proxy_scores(tokens), proxy_scores(tokens, 1.2, 3.0))


def test_splice_averages_overlaps():
    maps = torch.arange(2 * 4 * 2 * 3, dtype=torch.float32).view(2, 4, 2, 3)  # (N, C, h', w')
    boxes = torch.tensor([[0, 0, 2, 3], [0, 1, 2, 4]])
    sub = TR.SubImages(outputs=maps.flatten(2).transpose(1, 2), boxes=boxes,
                       vfm_grid=(2, 3), clip_grid=(2, 3))
    out = TR.splice(sub, (2, 4))
    torch.testing.assert_close(out[:, :, 0], maps[0, :, :, 0])
    torch.testing.assert_close(out[:, :, 1:3], (maps[0, :, :, 1:] + maps[1, :, :, :2]) / 2)
    torch.testing.assert_close(out[:, :, 3], maps[1, :, :, 2])
    finer = maps.repeat_interleave(2, -1).repeat_interleave(2, -2)
    fine = TR.SubImages(outputs=finer.flatten(2).transpose(1, 2),
                        boxes=sub.boxes, vfm_grid=(4, 6), clip_grid=(2, 3))  # a VFM with half CLIP's patch
    assert TR.splice(fine, (2, 4)).shape == (4, 4, 8)


@pytest.mark.parametrize(("size", "want"), [((448, 597), (464, 608)), ((448, 448), (448, 448)),
                                            ((300, 500), (336, 512)), ((200, 250), (336, 336)),
                                            ((320, 160), (320, 160))])
def test_processed_size(size, want):
    assert TR.processed_size(*size, 16, 336) == want


def test_sam_geometry():
    assert TR.preprocess_shape(304, 512, 1024) == (608, 1024)
    assert TR.preprocess_shape(300, 500, 256) == (154, 256)
    rgb = np.zeros((300, 500, 3), np.uint8)
    assert TR.sam_source(rgb).shape == (304, 512, 3)
    assert TR.sam_source(rgb[:288, :496]).shape == (288, 496, 3)


# ---------------------------------------------------------------- the refinement's settings and errors
def test_refinement_keeps_the_input_without_a_confident_prompt(models, sam_images):
    image = sam_images["A"]
    probs = torch.softmax(torch.randn(4, 224, 224, generator=torch.Generator().manual_seed(0)) * 0.1
                          + torch.linspace(0, 3, 224)[None, None].expand(4, 224, 224) * torch.tensor(
                              [1.0, -1.0, 0.0, 0.5]).view(4, 1, 1), dim=0)
    labels = probs.argmax(0)
    cfg = TR.SAMRefineConfig(coarse_thresh=0.2, iou_thresh=1e9)
    rt = TR.RefineTrace()
    out_labels, out_scores = TR.sam_refine(labels, probs, models["sam"], image, cfg, rt)
    assert out_labels is labels and out_scores is probs and rt.kept is not None and not bool(rt.kept.any())
    refined, scores = TR.sam_refine(labels, probs, models["sam"], image, TR.SAMRefineConfig(iou_thresh=-1e9))
    assert scores.shape == probs.shape and bool((scores >= 0).all()) and int((refined != labels).sum()) > 0
    # the paper's (batched) mask prompt gives other SAM outputs
    paper = TR.SAMRefineConfig(iou_thresh=-1e9).for_fidelity("paper")
    assert paper.mask_prompt_batched and not TR.SAMRefineConfig().for_fidelity("official").mask_prompt_batched
    other, _ = TR.sam_refine(labels, probs, models["sam"], image, paper)
    assert other.shape == labels.shape


@pytest.mark.parametrize(("kw", "match"), [({"coarse_thresh": 1.5}, "coarse_thresh must be in"),
                                           ({"down_ratio": 0}, "down_ratio must be an integer >= 1"),
                                           ({"minimal_area": -1}, "minimal_area must be an integer >= 0"),
                                           ({"iou_thresh": "high"}, "iou_thresh must be a number")])
def test_refine_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        TR.SAMRefineConfig(**kw)


def test_refine_shape_error(models):
    image = TR.SamImage(embedding=torch.zeros(1, 32, 64, 64), input_size=(64, 64), original_size=(4, 4),
                        grid=(4, 4))
    with pytest.raises(ValueError, match="same size"):
        TR.sam_refine(torch.zeros(4, 5, dtype=torch.long), torch.zeros(2, 4, 4), models["sam"], image,
                      TR.SAMRefineConfig())


def test_method_settings():
    with pytest.raises(ValueError, match="proxy_mean must be one of"):
        Trident("t", keep_residual=False, proxy_mean="batch")
    with pytest.raises(ValueError, match="max_thresh"):
        Trident("t", keep_residual=False, max_thresh=0.0)
    image = TR.SamImage(embedding=torch.zeros(1), input_size=(1, 1), original_size=(1, 1), grid=(1, 1))
    with pytest.raises(ValueError, match="affinity"):
        TR.aggregate(torch.zeros(4, 2, 2), [image])
    assert set(TR.TRIDENT_DATASETS) == {"voc21", "context60", "coco_object", "voc20", "context59",
                                        "coco_stuff", "cityscapes", "ade20k"}
    assert TR.TRIDENT_DATASETS["cityscapes"].split_halves and TR.TRIDENT_DATASETS["voc20"].cos_fac == 0.0


def test_registered_and_engine_stage(models):
    """The engine's per-window stage is the sub-image part of the whole-image pipeline."""
    from resclip.engine import DenseEngine, WindowTrace
    from resclip.methods import get_method

    method = get_method("trident")
    assert isinstance(method, Trident) and method.required_aux() == ("dino", "sam")
    with pytest.raises(ValueError, match="needs a dino model"):
        DenseEngine(models["visual"], method)
    eng = DenseEngine(models["visual"], method, aux={"dino": models["dino"], "sam": models["sam"]})
    rng = np.random.default_rng(2)
    crops = torch.cat([normalise(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)])
    text = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    text = torch.nn.functional.normalize(text, dim=-1)
    trace = WindowTrace()
    logits = eng.window_logits(crops, text, torch.arange(3), trace)
    assert logits.shape == (2, 3, 4, 4)
    image = torch.cat([crops[:1], crops[1:]], dim=-1)  # the two windows side by side
    got = TR.sub_image_features(models["visual"], models["dino"], method, image, 64, 64)
    assert got.outputs.shape == (2, 16, 128) and got.boxes.tolist() == [[0, 0, 4, 4], [0, 4, 4, 8]]
    torch.testing.assert_close(trace.stages["attn_out"], got.outputs, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- through create_segmenter / presets
AUX = {"dino": str(GOLDEN_AUX / "dino_vitb16_tiny_fp16.pth"),
       "sam": str(GOLDEN_AUX / "sam_vit_tiny_fp16.pth")}


def test_preset_runs_the_release_pipeline(golden, golden_ckpts, tg):
    """`create_segmenter("trident", preset="trident/voc21", aux_pretrained=...)` gives the release's
    refined mask (run voc21__imgA: short side 448, prob_thd 0.2, coarse_thresh 0.2)."""
    seg = golden_segmenter("trident", golden_ckpts["b16"], preset="trident/voc21", aux_pretrained=AUX)
    assert seg.protocol.trident is not None and seg.protocol.sam_refine is not None
    assert seg.protocol.sam_refine.coarse_thresh == 0.2 and seg.protocol.short_side == 448
    # the release merges every extra query into class 0 (Q2C["voclike"]): four background words, 14 classes
    lines = ["q0, q1, q2, q3", *(f"q{i}" for i in range(4, 18))]
    res = seg.predict(golden["imgA__raw_rgb"], lines, embeddings=golden["classifier__voclike"])
    assert_mask_at_stable_pixels(res.mask, tg["voc21__imgA__mask"], tg["voc21__imgA__mask_unstable_idx"])
    assert res.probs.shape == (15, *golden["imgA__raw_rgb"].shape[:2])
    np.testing.assert_allclose(res.probs.sum(0), 1.0, atol=1e-5)


def test_pipeline_preset_refuses_modules_and_other_methods(golden_ckpts):
    with pytest.raises(ValueError, match=r"^preset 'trident/voc21' runs Trident's whole-image pipeline, "):
        golden_segmenter("trident", golden_ckpts["b16"], preset="trident/voc21", rcs=True, aux_pretrained=AUX)
    with pytest.raises(ValueError, match=r"needs method='trident'"):
        golden_segmenter("naclip", golden_ckpts["b16"], preset="trident/ade20k", aux_pretrained=AUX)
    p = resclip.get_preset("trident/cityscapes")
    assert p.protocol.trident is not None and p.protocol.trident.split_halves and p.protocol.short_side == 688
    assert p.method_settings("trident") == {"cos_fac": 3.0, "refine_neg_cos": False}
    assert resclip.get_preset("trident/voc21").class_file == "proxyclip_voc21.txt"
    paper = resclip.get_preset("trident/voc21")
    from resclip.presets import to_fidelity

    refine = to_fidelity(paper, "paper").protocol.sam_refine
    assert refine is not None and refine.mask_prompt_batched
