"""ProxyCLIP against its release (golden_proxyclip.npz): every stage of single windows (DINO tokens,
proxy scores and attention, resized values, tokens, logits), every sliding window of the recorded runs
(56-pixel padding included), whole images of each config family (logits, probabilities, masks);
composition with RCS / SFR, the auxiliary-model errors and sharing, and the command line."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import resclip
from parity import (
    ADELIKE,
    GOLDEN,
    LOGIT,
    TOK,
    VOCLIKE,
    assert_mask_at_stable_pixels,
    load_golden,
    load_manifest,
    within,
)
from resclip import presets
from resclip.auxiliary import imagenet_input, sam_tokens
from resclip.classes import parse_classes, read_class_file
from resclip.cli import main
from resclip.digest import module_digest
from resclip.engine import DenseEngine, WindowTrace
from resclip.factory import configured_method
from resclip.fullres import upsample_window
from resclip.methods import get_method
from resclip.methods.proxyclip import ProxyCLIP, attend_shared, proxy_scores, resize_values
from resclip.preprocess import normalise, resize_image, window_coords, window_padding
from resclip.segmenter import pad_windows

AUX = GOLDEN / "aux"
DINO = {"b8": AUX / "dino_vitb8_tiny_fp16.pth", "b16": AUX / "dino_vitb16_tiny_fp16.pth"}
SAM = AUX / "sam_vit_tiny_fp16.pth"
BENCH = Path(__file__).parent / "data" / "benchmarks"
CLASSES = {"voclike": VOCLIKE, "adelike": ADELIKE}


@pytest.fixture(scope="module")
def px() -> dict[str, np.ndarray]:
    return load_golden("golden_proxyclip.npz")


@pytest.fixture(scope="module")
def px_manifest() -> dict:
    return load_manifest("proxyclip_manifest.json")


@functools.lru_cache(maxsize=8)
def _cached(ckpt: str, vfm: str, preset: str, **kw: object) -> resclip.Segmenter:
    """ProxyCLIP with DINO ``vfm`` ("b8", "b16") or, for "sam", ``proxyclip_sam`` with the tiny SAM, under a
    ``proxyclip/<dataset>`` preset, with the hub DINO's explicit attention (its tokens bit for bit)."""
    method, aux = ("proxyclip_sam", {"sam": SAM}) if vfm == "sam" else ("proxyclip", {"dino": DINO[vfm]})
    with pytest.warns(UserWarning, match="custom ViT"):
        return resclip.create_segmenter(method, rcs=False, sfr=False, preset=preset, pretrained=ckpt,
                                        text_cache=False, aux_pretrained=aux, trunk_attention="explicit",
                                        **kw)


def _seg(ckpt: Path, dino: str = "b8", preset: str = "proxyclip/context59",
         **kw: object) -> resclip.Segmenter:
    return _cached(str(ckpt), dino, preset, **kw)


# ---------------------------------------------------------------- single windows, stage by stage
# name -> (clip, dino, image, short side (0 = raw image), crop box, method fields)
WINDOWS = {
    "W0": ("b16", "b8", "A", 0, None, {}),
    "W1": ("b16", "b8", "B", 336, (0, 112, 336, 448), {}),
    "W2": ("b32", "b8", "A", 0, None, {}),
    "W3": ("b16", "b16", "B", 336, (0, 112, 336, 448), {}),
    "W4": ("b16", "b8", "B", 336, (0, 112, 336, 448), {"beta": 1.0, "gamma": 5.0}),
    "W5": ("b16", "b8", "C", 448, (0, 0, 336, 336), {}),  # every score negative: NaN in the release
    "W6": ("b16", "sam", "B", 336, (0, 112, 336, 448), {}),  # SAM's encoder on the window resized to 1024
}


def _window(golden: dict, img: str, short: int, box: tuple[int, int, int, int] | None) -> torch.Tensor:
    rgb = golden[f"img{img}__raw_rgb"]
    x = normalise(resize_image(rgb, short, 2048) if short else rgb)
    if box is None:
        return x
    y1, x1, y2, x2 = box
    return x[:, :, y1:y2, x1:x2]


def _rows_with_inf(got: torch.Tensor, want: np.ndarray, what: str) -> None:
    """Masked scores: the same -inf entries, the finite ones within the logit tolerance."""
    masked = np.isneginf(want)
    np.testing.assert_array_equal(torch.isneginf(got).numpy(), masked, err_msg=what)
    within(got.numpy()[~masked], want[~masked], LOGIT, what)


@pytest.mark.parametrize("name", list(WINDOWS))
def test_window_stages(golden, px, golden_ckpts, name):
    clip, dino, img, short, box, fields = WINDOWS[name]
    seg = _seg(golden_ckpts[clip], dino)
    engine = seg.engine
    if fields:
        method = get_method("proxyclip")
        engine = DenseEngine(engine.visual, dataclasses.replace(method, **fields), aux=engine.aux,
                             trunk_attention="explicit")
    x = _window(golden, img, short, box)
    text = torch.from_numpy(golden["classifier__voclike"])
    trace = WindowTrace()
    logits = engine.window_logits(x, text, torch.zeros(text.shape[0], dtype=torch.long), trace)
    rows = px[f"{name}__row_idx"]
    st = trace.stages
    vfm_in = imagenet_input(x)
    if dino == "sam":
        vfm_in = torch.nn.functional.interpolate(vfm_in, size=(1024, 1024), mode="bilinear",
                                                 align_corners=False)
    sampled = vfm_in[0].reshape(3, -1)[:, _samples(vfm_in[0, 0].numel(), 256)]
    within(sampled, px[f"{name}__dino_input_samples"], LOGIT, "DINO input")
    within(st["vfm_tokens"][0][rows], px[f"{name}__dino_tokens_rows"], TOK, "DINO tokens")
    within(st["values"][0][rows], px[f"{name}__values_rows"], TOK, "resized values")
    if name == "W5":  # the release's scores are all -inf (NaN after its softmax): each token keeps itself
        assert np.isneginf(px[f"{name}__proxy_scores_rows"]).all()
        assert np.isnan(px[f"{name}__patch_logits"]).all()
        eye = torch.eye(st["proxy_attn"].shape[-1])[rows]
        assert torch.equal(st["proxy_attn"][0, 0][rows], eye) and torch.isfinite(logits).all()
        torch.testing.assert_close(st["attn_out"][0], torch.nn.functional.linear(
            st["values"][0], engine.visual.transformer.resblocks[-1].attn.out_proj.weight,
            engine.visual.transformer.resblocks[-1].attn.out_proj.bias), atol=1e-6, rtol=0)
        return
    _check_attention_onwards(trace, logits, x, px, name)


def _check_attention_onwards(trace: WindowTrace, logits: torch.Tensor, x: torch.Tensor, ref: dict,
                             name: str) -> None:
    """A window's proxy scores, attention, out_proj output, tokens, patch and window logits against
    the release's recorded ``<name>__*`` arrays."""
    rows, st = ref[f"{name}__row_idx"], trace.stages
    _rows_with_inf(st["proxy_scores"][0][rows], ref[f"{name}__proxy_scores_rows"], "proxy scores")
    within(st["proxy_attn"][0, 0][rows], ref[f"{name}__proxy_attn_rows"], LOGIT, "proxy attention")
    within(st["attn_out"][0][rows], ref[f"{name}__attn_out_rows"], TOK, "out_proj(A v)")
    assert trace.tokens is not None and trace.grid == tuple(ref[f"{name}__patch_logits"].shape[1:])
    within(trace.tokens[0][rows], ref[f"{name}__tokens_rows"], TOK, "tokens")
    within(logits[0], ref[f"{name}__patch_logits"], LOGIT, "patch logits")
    up = upsample_window(logits, (x.shape[-2], x.shape[-1]))
    sampled = up[0].reshape(up.shape[1], -1)[:, ref[f"{name}__pixel_idx"]]
    within(sampled, ref[f"{name}__window_logits_samples"], LOGIT, "window logits")


def _samples(n: int, k: int) -> np.ndarray:
    return np.sort(np.random.default_rng(0).choice(n, min(n, k), replace=False))


def test_text_side_matches_the_release(golden_ckpt_b16, px):
    """Our query embeddings (80 ImageNet templates) equal the release's own on the tiny text tower
    (three of the voclike queries: rows 4-6)."""
    seg = _seg(golden_ckpt_b16)
    _, emb = seg.encode_classes(VOCLIKE[1:4])
    within(emb, px["text__voclike__release_query_features"][4:7], LOGIT, "query features")


# ---------------------------------------------------------------- whole images
# family -> (clip, vfm, classes, preset and overrides, images)
FAMILIES = {
    "voc21": ("b16", "b8", "voclike", {"preset": "proxyclip/voc21"}, "AC"),
    "context60": ("b16", "b8", "voclike", {"preset": "proxyclip/context60"}, "B"),
    "coco_object": ("b16", "b8", "voclike", {"preset": "proxyclip/coco_object"}, "A"),
    "default": ("b16", "b8", "adelike", {"preset": "proxyclip/context59"}, "BC"),
    "ade20k": ("b16", "b8", "adelike", {"preset": "proxyclip/ade20k"}, "C"),
    "city_scapes": ("b16", "b8", "adelike", {"preset": "proxyclip/cityscapes"}, "A"),
    "default_b32": ("b32", "b8", "adelike", {"preset": "proxyclip/voc20"}, "B"),
    "voc21_dino16": ("b16", "b16", "voclike", {"preset": "proxyclip/voc21"}, "A"),
    "pad300": ("b16", "b8", "voclike", {"preset": "proxyclip/coco_stuff", "short_side": 300}, "C"),
    "pad200": ("b16", "b8", "adelike", {"preset": "proxyclip/context59", "short_side": 200}, "A"),
    "default_sam": ("b16", "sam", "adelike", {"preset": "proxyclip/context59"}, "B"),
}
# pad300 / pad200: windows smaller than the 336 crop, zero-padded to multiples of 56
RUNS = [(fam, img) for fam, spec in FAMILIES.items() for img in spec[4]]


@pytest.mark.parametrize(("fam", "img"), RUNS)
def test_full_image_parity(golden, px, golden_ckpts, fam, img):
    clip, dino, cls, kw, _ = FAMILIES[fam]
    seg = _seg(golden_ckpts[clip], dino, **kw)
    p = f"full__{fam}__img{img}"
    image = golden[f"img{img}__raw_rgb"]
    resized = resize_image(image, seg.protocol.short_side, seg.protocol.long_side)
    assert hashlib.sha256(resized.tobytes()).digest() == px[f"{p}__resized_sha256"].tobytes()
    res = seg.predict(image, CLASSES[cls], embeddings=golden[f"classifier__{cls}"])
    avg, full, mask = torch.from_numpy(res.logits), res.full, res.mask
    q = avg.shape[0]
    _finite_parity(avg.reshape(q, -1)[:, px[f"{p}__resized_idx"]], px[f"{p}__avg_logits_samples"],
                   "window-averaged logits")
    idx = px[f"{p}__final_idx"]
    _finite_parity(full.logits_full().reshape(q, -1)[:, idx], px[f"{p}__logits_samples"], "logits")
    probs = full.class_prob_rows(0, image.shape[0])
    _finite_parity(probs.reshape(probs.shape[0], -1)[:, idx], px[f"{p}__probs_samples"], "probabilities")
    # pixels under a window whose scores are all negative are NaN in the release (its mask says 0 there)
    assert len(px[f"{p}__nan_idx"]) == 0 or fam in ("ade20k", "city_scapes")
    unstable = np.union1d(px[f"{p}__pred_unstable_idx"], px[f"{p}__nan_idx"])
    assert_mask_at_stable_pixels(mask, px[f"{p}__pred"], unstable)


def _finite_parity(got: torch.Tensor | np.ndarray, want: np.ndarray, what: str) -> None:
    """Ours within the logit tolerance where the release is finite; ours finite everywhere."""
    arr = np.asarray(got)
    assert np.isfinite(arr).all(), what
    finite = np.isfinite(want)
    within(arr[finite], want[finite], LOGIT, what)


WINDOW_RUNS = [("voc21", "C"), ("default_b32", "B"), ("voc21_dino16", "A"), ("pad300", "C"), ("pad200", "A"),
               ("default_sam", "B")]


@pytest.mark.parametrize(("fam", "img"), WINDOW_RUNS)
def test_every_window(golden, px, golden_ckpts, fam, img):
    clip, dino, cls, kw, _ = FAMILIES[fam]
    seg = _seg(golden_ckpts[clip], dino, **kw)
    p = f"full__{fam}__img{img}"
    x = seg.resized_input(golden[f"img{img}__raw_rgb"])
    pr = seg.protocol
    boxes = window_coords(x.shape[2], x.shape[3], pr.slide_crop, pr.slide_stride)
    assert len(boxes) == int(px[f"{p}__n_windows"])
    pads = [window_padding(y2 - y1, x2 - x1, pr.window_multiple) for y1, x1, y2, x2 in boxes]
    np.testing.assert_array_equal(np.array(pads), px[f"{p}__window_pads"])
    spec, text = seg.encode_classes(CLASSES[cls], golden[f"classifier__{cls}"])
    crops = torch.cat([pad_windows(x[:, :, y1:y2, x1:x2], pad)
                       for (y1, x1, y2, x2), pad in zip(boxes, pads, strict=True)])
    logits = seg.engine.window_logits(crops, text, torch.tensor(spec.query_to_class))  # one batch
    for k in range(len(boxes)):
        within(logits[k], px[f"{p}__win{k}__patch_logits"], LOGIT, f"window {k}")


# ---------------------------------------------------------------- the pieces against their plain forms
def test_shared_attention_equals_the_per_head_product():
    torch.manual_seed(0)
    attn = torch.softmax(torch.randn(2, 1, 30, 30), dim=-1)
    values = torch.randn(2, 30, 12)
    per_head = values.view(2, 30, 3, 4).transpose(1, 2)
    plain = torch.matmul(attn.expand(2, 3, 30, 30), per_head).transpose(1, 2).reshape(2, 30, 12)
    torch.testing.assert_close(attend_shared(attn, values, 3), plain, atol=1e-6, rtol=0)
    rcs = torch.softmax(torch.randn(2, 3, 30, 30), dim=-1)
    plain = torch.matmul(rcs, per_head).transpose(1, 2).reshape(2, 30, 12)
    torch.testing.assert_close(attend_shared(rcs, values, 3), plain, atol=1e-6, rtol=0)


def test_values_resize_per_channel_equals_per_head():
    torch.manual_seed(1)
    v = torch.randn(2, 3, 1 + 4 * 6, 5)  # (B, H, T, d), CLS first
    merged = v[:, :, 1:].transpose(1, 2).reshape(2, 24, 15)
    heads = torch.nn.functional.interpolate(v[:, :, 1:].reshape(6, 4, 6, 5).permute(0, 3, 1, 2), size=(8, 12),
                                            mode="bilinear", align_corners=False)
    plain = heads.permute(0, 2, 3, 1).reshape(2, 3, 96, 5).transpose(1, 2).reshape(2, 96, 15)
    torch.testing.assert_close(resize_values(merged, (4, 6), (8, 12)), plain, atol=1e-6, rtol=0)
    assert resize_values(merged, (4, 6), (4, 6)) is merged


def test_proxy_scores_normalise_per_window_and_mask():
    torch.manual_seed(2)
    tokens = torch.randn(3, 20, 8)
    scores = proxy_scores(tokens, 1.2, 3.0)
    for b in range(3):  # per window: the same as the window alone (the release's batch of one)
        alone = proxy_scores(tokens[b:b + 1], 1.2, 3.0)
        assert torch.equal(torch.isneginf(scores[b]), torch.isneginf(alone[0]))
        x = torch.nn.functional.normalize(tokens[b], dim=-1)
        sim = x @ x.t()
        want = (sim - sim.mean() * 1.2) * 3.0
        keep = want >= 0
        torch.testing.assert_close(scores[b][keep], want[keep], atol=1e-6, rtol=0)
        assert torch.isneginf(scores[b][~keep]).all()


def test_a_uniform_window_attends_to_itself_instead_of_nan():
    """Every similarity of a uniform window is 1 < beta * mean: the release's softmax gives NaN there."""
    tokens = torch.ones(1, 6, 4)
    scores = proxy_scores(tokens, 1.2, 3.0)
    attn = torch.softmax(scores, dim=-1)
    torch.testing.assert_close(attn[0], torch.eye(6))


def test_window_padding_is_the_releases():
    """compute_padsize(H, W, 56): centred, the odd pixel right / below."""
    assert window_padding(300, 336, 56) == (0, 0, 18, 18)
    assert window_padding(200, 201, 56) == (11, 12, 12, 12)
    assert window_padding(336, 224, 56) == (0, 0, 0, 0)


# ---------------------------------------------------------------- composition, errors, sharing
SMALL = {"short_side": 96, "slide_crop": 64, "slide_stride": 32, "rcs_layers": (2, 3)}
SMALL_CLASSES = ["sky, wall", "cat", "person, man", "tree"]
SMALL_TEXT = torch.nn.functional.normalize(torch.randn(6, 32, generator=torch.Generator().manual_seed(0)),
                                         dim=-1)


def _predict(seg: resclip.Segmenter, photo: np.ndarray) -> resclip.SegResult:
    return seg.predict(photo, SMALL_CLASSES, embeddings=SMALL_TEXT)


def _small(ckpt: Path, dino: str, rcs: bool = False, sfr: bool = False, **kw: object) -> resclip.Segmenter:
    return resclip.create_segmenter("proxyclip", rcs=rcs, sfr=sfr, preset="default", pretrained=str(ckpt),
                                    text_cache=False, aux_pretrained={"dino": DINO[dino]}, **{**SMALL, **kw})


def test_rcs_and_sfr_compose_when_the_grids_coincide(tiny_ckpt, photo):
    """DINO ViT-B/16 with the B/16 CLIP: both grids are the CLIP's (RCS / SFR alone: the contract tests)."""
    base = _predict(_small(tiny_ckpt, "b16"), photo)
    res = _predict(_small(tiny_ckpt, "b16", rcs=True, sfr=True, sfr_first_pass_pamr_steps=0), photo)
    assert np.isfinite(res.probs).all() and np.abs(res.logits - base.logits).max() > 1e-4


def test_rcs_and_sfr_are_refused_on_another_grid(tiny_ckpt):
    for rcs, sfr in ((True, False), (False, True)):
        msg = (r"^proxyclip forms its attention on a 8-pixel grid, RCS and SFR mix the CLIP's 16-pixel grid: "
               r"use an auxiliary model with patch 16, or rcs=False and sfr=False \(--no-rcs --no-sfr\)$")
        with pytest.raises(ValueError, match=msg):
            _small(tiny_ckpt, "b8", rcs=rcs, sfr=sfr)


def test_protocol_refinements_compose(tiny_ckpt, photo):
    base = _predict(_small(tiny_ckpt, "b8"), photo)
    for kw in ({"pamr_steps": 10}, {"tlp": True}):
        res = _predict(_small(tiny_ckpt, "b8", **kw), photo)
        assert np.isfinite(res.probs).all()
        assert np.abs(res.full.logits_full() - base.full.logits_full()).max() > 1e-4


def test_missing_aux_model_is_one_line(tiny_ckpt):
    msg = (r"^method 'proxyclip' needs a dino model: pass aux_pretrained=\{'dino': PATH\} to "
           r"create_segmenter \(command line: --aux-pretrained dino=PATH\)$")
    plain = {"rcs": False, "sfr": False, "pretrained": str(tiny_ckpt), "text_cache": False}
    with pytest.raises(ValueError, match=msg):
        resclip.create_segmenter("proxyclip", **plain)
    base = resclip.create_segmenter("naclip", **plain)
    with pytest.raises(ValueError, match=msg):
        base.with_method("proxyclip")


def test_one_dino_is_shared(tiny_ckpt):
    a = _small(tiny_ckpt, "b8")
    b = _small(tiny_ckpt, "b8", short_side=128)
    assert a.engine.aux["dino"] is b.engine.aux["dino"]
    base = resclip.create_segmenter("naclip", rcs=False, sfr=False, pretrained=str(tiny_ckpt),
                                    text_cache=False, aux_pretrained={"dino": DINO["b8"]})
    variant = base.with_method("proxyclip")
    assert variant.engine.aux["dino"] is a.engine.aux["dino"] and variant.visual_digest == a.visual_digest
    # the image side's digest (saved progress, labelling records) covers the DINO weights
    assert a.visual_digest != module_digest(a.engine.visual)


def test_registry_and_stage_contract():
    method = get_method("proxyclip")
    assert isinstance(method, ProxyCLIP) and method.replaces_last_block and method.has_scores
    assert (method.beta, method.gamma, method.vfm) == (1.2, 3.0, "dino")
    assert method.required_aux() == ("dino",) and method.for_fidelity("paper") is method
    with pytest.raises(ValueError, match=r"vfm must be one of \('dino', 'sam', 'mae'\), got 'dinov3'"):
        ProxyCLIP("x", keep_residual=False, vfm="dinov3")
    with pytest.raises(ValueError, match="mae_input must be a positive integer or None, got 0"):
        ProxyCLIP("x", keep_residual=False, mae_input=0)
    mae = get_method("proxyclip_mae")
    assert mae.vfm == "mae" and mae.required_aux() == ("mae",) and mae.out_patch(16, {}) is None
    sam = get_method("proxyclip_sam")
    assert isinstance(sam, ProxyCLIP) and sam.vfm == "sam" and sam.required_aux() == ("sam",)
    assert sam.out_patch(16, {}) is None  # SAM's fixed 64 x 64 grid: RCS / SFR refused
    with pytest.raises(ValueError, match=r"SAM \(v1\) image encoder \(sam_vit_b\); this is a sam2"):
        sam_tokens(types.SimpleNamespace(kind="sam2"), torch.zeros(1, 3, 16, 16))


def test_sam_variant_refuses_rcs_and_sfr(tiny_ckpt):
    with pytest.raises(ValueError, match=r"^proxyclip_sam forms its attention on a fixed grid, RCS and SFR"):
        resclip.create_segmenter("proxyclip_sam", rcs=True, sfr=False, pretrained=str(tiny_ckpt),
                                 text_cache=False, aux_pretrained={"sam": SAM})


def test_segment_command_end_to_end(tiny64, tmp_path, capsys):
    img = BENCH / "VOCdevkit/VOC2012/JPEGImages/crop_294.jpg"
    out = tmp_path / "seg"
    argv = [str(img), "--classes", "background; car; person", "--method", "proxyclip",
            "--pretrained", str(tiny64), "--no-rcs", "--no-sfr", "--out", str(out), "--device", "cpu",
            "--set", "short_side=64"]
    assert main(["segment", *argv, "--aux-pretrained", f"dino={DINO['b8']}"]) == 0
    assert (out / "crop_294_mask.png").exists()
    capsys.readouterr()
    assert main(["segment", *argv]) == 2
    assert "--aux-pretrained dino=PATH" in capsys.readouterr().err
    assert main(["segment", *argv, "--aux-pretrained", "dino"]) == 2
    assert "expects KIND=SOURCE" in capsys.readouterr().err
    assert main(["segment", *argv, "--aux-pretrained", "clip=x.pt"]) == 2
    assert "unknown kind 'clip'; known kinds: dino, sam" in capsys.readouterr().err


# ---------------------------------------------------------------- the recorded release facts
def test_manifest_records_the_release(px_manifest):
    assert px_manifest["upstream"]["commit"].startswith("e7b767f")
    assert px_manifest["method_constants"]["beta"] == 1.2 and px_manifest["method_constants"]["gamma"] == 3.0
    method = get_method("proxyclip")
    assert (method.beta, method.gamma) == (1.2, 3.0)  # type: ignore[attr-defined]


@pytest.mark.filterwarnings("ignore:synonyms .* appear in several classes")  # COCO-Object's 'bed'
def test_class_files_are_the_releases(px_manifest):
    """Each proxyclip/<dataset> preset's class file (its own or the dataset's) reads as the release's
    configs/cls_<dataset>.txt, synonym for synonym (its "wood " in Context-60 has a trailing space, which
    the tokenizer's whitespace clean-up drops)."""
    for ds in presets.DATASETS:
        preset = presets.get_preset(f"proxyclip/{ds}")
        path = preset.class_file_path() or Path(resclip.__file__).parent / "data" / "class_names" / (
            presets.CLASS_FILES[ds])
        spec = parse_classes(read_class_file(path))
        lines = [[q for q, c in zip(spec.queries, spec.query_to_class, strict=True) if c == i]
                 for i in range(spec.num_classes)]
        release = px_manifest["class_files"]["city_scapes" if ds == "cityscapes" else ds]
        assert lines == [[name.strip() for name in line] for line in release], ds


def test_presets_are_the_release_configs(px_manifest):
    cfgs = px_manifest["dataset_cfgs_proxyclip"]
    names = {"coco_stuff": "coco_stuff164k", "cityscapes": "city_scapes"}
    for ds in presets.DATASETS:
        want = {**cfgs["all"], **cfgs[names.get(ds, ds)]}
        preset = presets.get_preset(f"proxyclip/{ds}")
        got = preset.protocol
        assert (got.short_side, got.long_side, got.slide_crop, got.slide_stride) == (
            want["resize_short"], want["resize_long"], want["slide_crop"], want["slide_stride"]), ds
        assert (got.logit_scale, got.prob_thd, got.area_thd, got.pamr_steps, got.tlp) == (
            want["logit_scale"], want["prob_thd"], None, 0, None), ds
        assert got.window_multiple == want["pad_multiple"], ds
        assert preset.dataset == ds and preset.fidelity == "official" and preset.method_options == ()
        # the MAE proxy sees the release's crop (its MAE is built at img_size=slide_crop)
        mae = configured_method("proxyclip_mae", "official", preset.name, protocol=preset.protocol)
        assert mae.mae_input == want["slide_crop"], ds
        own = ds in ("voc21", "voc20", "coco_object")  # the release's person / tvmonitor / background lines
        assert preset.class_file == (f"proxyclip_{presets.CLASS_FILES[ds]}" if own else None), ds


# ---------------------------------------------------------------- the release's other proxies: DINOv2 and MAE
# (golden_proxyclip_vfm.npz: the release with vfm_model='dinov2' (dinov2_vitb14_reg) and 'mae')
V2REG = AUX / "dinov2_reg_tiny_fp16.pth"
MAE = AUX / "mae_tiny_fp16.pth"


@pytest.fixture(scope="module")
def pv() -> dict[str, np.ndarray]:
    return load_golden("golden_proxyclip_vfm.npz")


@functools.lru_cache(maxsize=8)
def _vfm_seg(ckpt: str, vfm: str, preset: str, **kw: object) -> resclip.Segmenter:
    """ProxyCLIP with the tiny DINOv2-with-registers (a ``dino`` file: the release's ``dinov2``) or,
    for "mae", ``proxyclip_mae`` with the tiny MAE checkpoint."""
    method, aux = (("proxyclip_mae", {"mae": str(MAE)}) if vfm == "mae"
                   else ("proxyclip", {"dino": str(V2REG)}))
    with pytest.warns(UserWarning, match="custom ViT"):
        return resclip.create_segmenter(method, rcs=False, sfr=False, preset=preset, pretrained=ckpt,
                                        text_cache=False, aux_pretrained=aux, trunk_attention="explicit",
                                        **kw)


# name -> (vfm, image, short side (0 = raw image), crop box, preset (its mae_input: the release's crop))
VFM_WINDOWS = {
    "W7": ("v2reg", "B", 336, (0, 112, 336, 448), "proxyclip/context59"),  # DINOv2 24 x 24, positions resized
    "W8": ("v2reg", "A", 0, None, "proxyclip/context59"),  # DINOv2 16 x 16, native positions
    "W9": ("mae", "B", 336, (0, 112, 336, 448), "proxyclip/context59"),  # MAE 21 x 21, positions 14 -> 21
    "W10": ("mae", "A", 0, None, "proxyclip/context59"),  # a 224 window resized to 336 for MAE
    "W11": ("mae", "B", 336, (0, 112, 336, 448), "proxyclip/cityscapes"),  # MAE at 224: the window shrunk
}


@pytest.mark.parametrize("name", list(VFM_WINDOWS))
def test_vfm_window_stages(golden, pv, golden_ckpt_b16, name):
    vfm, img, short, box, preset = VFM_WINDOWS[name]
    seg = _vfm_seg(str(golden_ckpt_b16), vfm, preset)
    x = _window(golden, img, short, box)
    text = torch.from_numpy(golden["classifier__voclike"])
    trace = WindowTrace()
    logits = seg.engine.window_logits(x, text, torch.zeros(text.shape[0], dtype=torch.long), trace)
    rows, st = pv[f"{name}__row_idx"], trace.stages
    vfm_in = imagenet_input(x)
    if vfm == "mae":
        side = seg.engine.method.mae_input
        assert side == (224 if preset.endswith("cityscapes") else 336)
        vfm_in = torch.nn.functional.interpolate(vfm_in, size=(side, side), mode="bilinear",
                                                 align_corners=False)
    sampled = vfm_in[0].reshape(3, -1)[:, _samples(vfm_in[0, 0].numel(), 256)]
    within(sampled, pv[f"{name}__dino_input_samples"], LOGIT, "VFM input")
    within(st["vfm_tokens"][0][rows], pv[f"{name}__dino_tokens_rows"], TOK, "VFM tokens")
    within(st["values"][0][rows], pv[f"{name}__values_rows"], TOK, "resized values")
    _check_attention_onwards(trace, logits, x, pv, name)


# family -> (vfm, classes, preset and overrides, image)
VFM_FAMILIES = {
    "voc21_dinov2": ("v2reg", "voclike", {"preset": "proxyclip/voc21"}, "C"),
    "default_dinov2": ("v2reg", "adelike", {"preset": "proxyclip/context59"}, "B"),
    "voc21_mae": ("mae", "voclike", {"preset": "proxyclip/voc21"}, "B"),
    "city_scapes_mae": ("mae", "adelike", {"preset": "proxyclip/cityscapes"}, "A"),
    "pad200_dinov2": ("v2reg", "adelike", {"preset": "proxyclip/context59", "short_side": 200}, "A"),
    "pad200_mae": ("mae", "adelike", {"preset": "proxyclip/context59", "short_side": 200}, "A"),
}


@pytest.mark.parametrize("fam", list(VFM_FAMILIES))
def test_vfm_full_image_parity(golden, pv, golden_ckpt_b16, fam):
    vfm, cls, kw, img = VFM_FAMILIES[fam]
    seg = _vfm_seg(str(golden_ckpt_b16), vfm, **kw)  # type: ignore[arg-type]
    p = f"full__{fam}__img{img}"
    image = golden[f"img{img}__raw_rgb"]
    resized = resize_image(image, seg.protocol.short_side, seg.protocol.long_side)
    assert hashlib.sha256(resized.tobytes()).digest() == pv[f"{p}__resized_sha256"].tobytes()
    res = seg.predict(image, CLASSES[cls], embeddings=golden[f"classifier__{cls}"])
    avg, full = torch.from_numpy(res.logits), res.full
    q = avg.shape[0]
    within(avg.reshape(q, -1)[:, pv[f"{p}__resized_idx"]], pv[f"{p}__avg_logits_samples"], LOGIT,
           "window-averaged logits")
    idx = pv[f"{p}__final_idx"]
    within(full.logits_full().reshape(q, -1)[:, idx], pv[f"{p}__logits_samples"], LOGIT, "logits")
    probs = full.class_prob_rows(0, image.shape[0])
    within(probs.reshape(probs.shape[0], -1)[:, idx], pv[f"{p}__probs_samples"], LOGIT, "probabilities")
    assert len(pv[f"{p}__nan_idx"]) == 0
    assert_mask_at_stable_pixels(res.mask, pv[f"{p}__pred"], pv[f"{p}__pred_unstable_idx"])


def test_mae_loader_and_errors(tmp_path):
    """MAE's pre-training file: the decoder and its mask token are dropped, the rest loads strictly; a
    pickle carrying code, a missing file and a file of another model are one line each."""
    from resclip.dino import load_mae

    net = load_mae(MAE)
    assert net.aux_family == "mae" and net.dino_info["patch"] == 16 and net.dino_info["image"] == 224
    state = torch.load(MAE, weights_only=True)
    assert any(k.startswith("decoder_") for k in state["model"]) and "mask_token" in state["model"]
    with pytest.raises(FileNotFoundError, match="MAE checkpoint not found"):
        load_mae(tmp_path / "none.pth")
    torch.save({"model": {"visual.conv1.weight": torch.zeros(2, 2)}}, tmp_path / "clip.pth")
    with pytest.raises(ValueError, match="is not an MAE ViT encoder checkpoint"):
        load_mae(tmp_path / "clip.pth")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="could run code"):
        load_mae(tmp_path / "pickled.pth")
    broken = {"model": {k: v for k, v in state["model"].items() if k != "norm.weight"}}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing \['norm.weight'\]"):
        load_mae(tmp_path / "broken.pth")


def test_mae_input_follows_the_crop(golden_ckpt_b16):
    """MAE sees the protocol's crop: the preset's, a ``slide_crop`` override, or each image at its own
    size without windows; ``proxyclip_mae_mae_input`` fixes it."""
    cases = [({"preset": "proxyclip/voc21"}, 336), ({"preset": "proxyclip/cityscapes"}, 224),
             ({"preset": "proxyclip/voc21", "slide_crop": 448}, 448), ({"preset": "default"}, 224),
             ({"preset": "proxyclip/voc21", "slide_crop": 0}, None),
             ({"preset": "proxyclip/voc21", "proxyclip_mae_mae_input": 280}, 280)]
    for kw, side in cases:
        seg = _vfm_seg(str(golden_ckpt_b16), "mae", **kw)  # type: ignore[arg-type]
        assert seg.engine.method.mae_input == side, kw
    whole = _vfm_seg(str(golden_ckpt_b16), "mae", preset="proxyclip/voc21", slide_crop=0)
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    trace = WindowTrace()
    x = normalise(resize_image(image, 64, 2048))
    whole.engine.window_logits(x, torch.randn(2, 64), torch.zeros(2, dtype=torch.long), trace)
    assert trace.grid == (x.shape[-2] // 16, x.shape[-1] // 16)  # MAE at the image's own size
