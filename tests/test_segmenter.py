"""Full-image parity through the public API: slide / whole-image protocols of every preset
recorded in the golden files, per-window logits and label maps, final probabilities and masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import resclip
from parity import assert_mask_at_stable_pixels, assert_parity
from resclip.engine import WindowTrace
from resclip.preprocess import resize_image, window_coords

CLASS_LINES = {
    "voclike": [
        "sky, wall, tree, grass",
        "aeroplane",
        "bicycle",
        "bird",
        "ship",
        "bottle",
        "bus",
        "car",
        "cat",
        "chair",
        "person, person in shirt, person in jeans",
        "television monitor, screen",
    ],
    "adelike": ["wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed"],
}

# (golden prefix, method, rcs+sfr, preset, class file, overrides)
RESCLIP_RUNS = [
    (
        f"slide__{ds}__naclip_resclip__img{img}",
        "naclip",
        True,
        ds,
        "adelike" if ds == "ade20k" else "voclike",
        {},
    )
    for ds in ("voc21", "context60", "ade20k")
    for img in "ABC"
] + [
    ("slide__ade20k__sclip_resclip__imgC", "sclip", True, "ade20k", "adelike", {}),
    ("slide__ade20k__clearclip_resclip__imgC", "clearclip", True, "ade20k", "adelike", {}),
]
BASELINE_RUNS = [
    ("naclip__slide__ade20k_pamr__imgC", "naclip", False, "naclip/ade20k", "adelike", {}),
    ("naclip__slide__ade20k_pamr__imgB", "naclip", False, "naclip/ade20k", "adelike", {}),
    ("naclip__slide__ade20k_nopamr__imgC", "naclip", False, "naclip/ade20k", "adelike", {"pamr_steps": 0}),
    ("naclip__slide__voc21_pamr__imgC", "naclip", False, "naclip/voc21", "voclike", {}),
    ("sclip__slide__voc21__imgB", "sclip", False, "sclip/voc21", "voclike", {}),
    ("sclip__slide__voc21__imgC", "sclip", False, "sclip/voc21", "voclike", {}),
    ("sclip__slide__ade20k__imgC", "sclip", False, "sclip/ade20k", "adelike", {}),
    ("clearclip__slide__voc21__imgB", "clearclip", False, "clearclip/voc21", "voclike", {}),
    ("clearclip__slide__voc21__imgC", "clearclip", False, "clearclip/voc21", "voclike", {}),
    ("clearclip__slide__ade20k__imgC", "clearclip", False, "clearclip/ade20k", "adelike", {}),
]


def _segmenter(ckpt, method, modules, preset, overrides):
    return resclip.create_segmenter(
        method=method,
        rcs=modules,
        sfr=modules,
        preset=preset,
        pretrained=str(ckpt),
        text_cache=False,
        **overrides,
    )


@pytest.mark.parametrize(
    ("prefix", "method", "modules", "preset", "cls", "overrides"), RESCLIP_RUNS + BASELINE_RUNS
)
def test_full_image_parity(golden, golden_ckpt_b16, prefix, method, modules, preset, cls, overrides):
    seg = _segmenter(golden_ckpt_b16, method, modules, preset, overrides)
    image = golden[f"img{prefix.split('__img')[1]}__raw_rgb"]
    emb = golden[f"classifier__{cls}"]
    res = seg.predict(image, CLASS_LINES[cls], embeddings=emb)

    assert res.mask.shape == image.shape[:2]
    assert res.probs.shape == (len(CLASS_LINES[cls]), *image.shape[:2])
    assert res.class_names[0] == CLASS_LINES[cls][0].split(", ")[0]
    if f"{prefix}__slide_logits_samples" in golden:
        idx = golden[f"{prefix}__slide_logits_idx"]
        assert_parity(
            res.logits.reshape(res.logits.shape[0], -1)[:, idx],
            golden[f"{prefix}__slide_logits_samples"], atol=1e-5)
    fidx = golden[f"{prefix}__final_idx"]
    want = golden[f"{prefix}__probs_samples"]
    want = want / want.sum(axis=0, keepdims=True)  # SCLIP/ClearCLIP store them un-renormalised
    got = res.probs.reshape(res.probs.shape[0], -1)[:, fidx]
    assert_parity(got, want, atol=1e-5)

    full = res.full.logits_full()
    assert_parity(
        full.reshape(full.shape[0], -1)[:, fidx],
        golden[f"{prefix}__final_logits_samples"], atol=1e-5)
    assert_mask_at_stable_pixels(res.mask, golden[f"{prefix}__pred"], golden[f"{prefix}__pred_unstable_idx"])


@pytest.mark.parametrize(
    ("prefix", "method", "modules", "preset", "cls", "overrides"),
    RESCLIP_RUNS + BASELINE_RUNS,
)
def test_every_window(golden, golden_ckpt_b16, prefix, method, modules, preset, cls, overrides):
    """Per-window logits and SFR label maps in processing order."""
    seg = _segmenter(golden_ckpt_b16, method, modules, preset, overrides)
    image = golden[f"img{prefix.split('__img')[1]}__raw_rgb"]
    x = seg.resized_input(image)
    p = seg.protocol
    boxes = window_coords(x.shape[2], x.shape[3], p.slide_crop, p.slide_stride)
    keys = sorted(k for k in golden if k.startswith(f"{prefix}__win") and k.endswith("__patch_logits"))
    assert len(keys) == len(boxes)
    spec, text = seg.encode_classes(CLASS_LINES[cls], golden[f"classifier__{cls}"])
    q2c = torch.tensor(spec.query_to_class)
    crops = torch.cat([x[:, :, y1:y2, x1:x2] for y1, x1, y2, x2 in boxes])
    trace = WindowTrace()
    logits = seg.engine.window_logits(crops, text, q2c, trace)
    for k in range(len(boxes)):
        assert_parity(
            logits[k].numpy(), golden[f"{prefix}__win{k}__patch_logits"], atol=1e-5)
        if modules:
            assert trace.sfr is not None
            np.testing.assert_array_equal(
                trace.sfr.label_map[k].numpy(), golden[f"{prefix}__win{k}__sfr_label_map"]
            )


@pytest.mark.parametrize("img", "ABC")
def test_resize_matches_benchmark_pipeline(golden, img):
    np.testing.assert_array_equal(
        resize_image(golden[f"img{img}__raw_rgb"], 336), golden[f"img{img}__resized_rgb"]
    )


@pytest.mark.parametrize("repo", ["naclip", "sclip", "clearclip"])
def test_each_repository_builds_the_same_text_classifier(golden, golden_ckpt_b16, repo):
    """The three baseline repositories' own text classifiers equal ours (templates, tokenizer, encoder)."""
    seg = resclip.create_segmenter(pretrained=str(golden_ckpt_b16), text_cache=False)
    _, emb = seg.encode_classes(CLASS_LINES["voclike"])
    assert_parity(
        emb.numpy(), golden[f"{repo}__text__voclike__class_embeddings"], atol=1e-5)


def test_release_text_tower_keeps_cached_classes_and_names_the_fix(tiny64):
    """After the release, cached class lists still work; a new one raises an error naming the fix."""
    from resclip.text import EmbeddingCache

    seg = resclip.create_segmenter(
        "naclip", rcs=False, sfr=False, pretrained=str(tiny64), text_cache=EmbeddingCache(disk=False)
    )
    image = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    before = seg.predict(image, ["sky", "cat, kitten"]).mask
    seg.release_text_tower()
    assert seg.text_tower_released and seg.model is None
    np.testing.assert_array_equal(seg.predict(image, ["sky", "cat, kitten"]).mask, before)
    with pytest.raises(ValueError, match=r"text tower was released.*'dog'.*pass embeddings="):
        seg.predict(image, ["sky", "dog"])
    emb = torch.nn.functional.normalize(torch.randn(2, seg.embed_dim), dim=-1)
    assert seg.predict(image, ["sky", "dog"], embeddings=emb).mask.shape == (64, 80)


# ------------------------------------------------------------------ batch API and result helpers
def test_predict_batch_takes_every_image_form_and_encodes_once(tiny_ckpt, monkeypatch):
    import io

    import torch
    from PIL import Image

    import resclip

    seg = resclip.create_segmenter(pretrained=str(tiny_ckpt), sfr=False, rcs_layers=(1, 2), text_cache=False)
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((60, 80, 1), 255, np.uint8)], axis=2)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    calls = []
    real = seg.encode_classes
    monkeypatch.setattr(seg, "encode_classes", lambda *a, **k: calls.append(a) or real(*a, **k))
    images = [rgb, Image.open(buf), torch.from_numpy(rgb).permute(2, 0, 1), torch.from_numpy(rgb), rgba,
              rgb.transpose(2, 0, 1)]
    results = seg.predict_batch(images, ["cat", "dog", "sky, clouds"])
    alone = seg.predict(rgb, ["cat", "dog", "sky, clouds"])
    for res in results:  # the same image in every form: the same result
        np.testing.assert_array_equal(res.mask, results[0].mask)
        np.testing.assert_array_equal(res.logits, results[0].logits)
    np.testing.assert_array_equal(results[0].mask, alone.mask)
    np.testing.assert_allclose(results[0].logits, alone.logits, atol=1e-6, rtol=0)
    assert len(calls) == 2  # once for the batch, once for `alone`
    with pytest.raises(ValueError, match=r"images\[1\]: image array must be uint8"):
        seg.predict_batch([rgb, rgb.astype(np.float32)], ["cat", "dog"])


def test_result_helpers(tiny_ckpt, tmp_path):
    import json

    from PIL import Image

    import resclip
    from resclip.palettes import class_palette
    from resclip.results import rle_decode

    seg = resclip.create_segmenter(pretrained=str(tiny_ckpt), sfr=False, rcs_layers=(1, 2), text_cache=False)
    rgb = np.random.default_rng(4).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    res = seg.predict(rgb, ["cat", "dog", "background"])
    masks = res.class_masks()
    assert masks.shape == (3, 50, 70) and masks.sum() == 50 * 70
    for i, rle in enumerate(res.rle()):
        np.testing.assert_array_equal(rle_decode(rle), res.mask == i)
    conf = res.confidence()
    np.testing.assert_array_equal(conf, res.probs.max(axis=0))
    unknown = res.with_unknown(float(np.median(conf)))
    assert set(np.unique(unknown)) <= {0, 1, 2, 3} and (unknown == 3).any()
    plain = np.asarray(res.overlay(legend=False))
    assert plain.shape == (50, 70, 3)
    colours = class_palette(res.class_names)
    assert colours[2].tolist() == [0, 0, 0]  # 'background' is the black class
    assert res.overlay().width > 70  # legend to the right
    paths = res.save(tmp_path / "out", "photo", rle=True)
    assert [p.name for p in paths] == ["photo_mask.png", "photo_overlay.png", "photo.json"]
    np.testing.assert_array_equal(np.asarray(Image.open(paths[0])), res.mask)
    record = json.loads(paths[2].read_text())
    assert record["settings"]["method"] == "naclip" and record["classes"][2]["color"] == [0, 0, 0]
    assert record["classes"][0]["rle"] == res.rle()[0]
    more = res.save(tmp_path / "more", "photo", unknown=float(np.median(conf)), save_probs=True)
    assert [p.name for p in more] == ["photo_mask.png", "photo_overlay.png", "photo.json", "photo_probs.npz"]
    np.testing.assert_array_equal(np.asarray(Image.open(more[0])), unknown)
    assert [c["name"] for c in json.loads(more[2].read_text())["classes"]][-1] == "unknown"


def test_predict_batch_shares_window_batches_across_images(tiny_ckpt, monkeypatch):
    """Equally sized windows of several images go through the network together; each image's
    result equals its own predict()."""
    import resclip

    seg = resclip.create_segmenter(pretrained=str(tiny_ckpt), sfr=True, rcs_layers=(1, 2), text_cache=False,
                                   slide_crop=64, slide_stride=32, short_side=64, window_batch=4)
    rng = np.random.default_rng(5)
    shapes = [(64, 100, 3), (90, 64, 3), (40, 30, 3)]  # the last is smaller than one window
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in shapes]
    sizes = []
    real = seg.engine.window_logits
    monkeypatch.setattr(seg.engine, "window_logits",
                        lambda x, *a, **kw: sizes.append(tuple(x.shape)) or real(x, *a, **kw))
    results = seg.predict_batch(images, ["cat", "dog", "sky"])
    batched = list(sizes)
    assert max(s[0] for s in batched) == 4 and any(s[0] == 4 for s in batched)
    sizes.clear()
    alone = [seg.predict(img, ["cat", "dog", "sky"]) for img in images]
    assert sum(s[0] for s in sizes) == sum(s[0] for s in batched)  # the same windows, fewer calls
    assert len(batched) < len(sizes)
    for res, one in zip(results, alone, strict=True):
        np.testing.assert_allclose(res.logits, one.logits, atol=1e-5, rtol=0)
        assert (res.mask == one.mask).mean() > 0.999
