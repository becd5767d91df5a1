"""Full-image parity through the public API: slide / whole-image protocols of every preset
recorded in the golden files, per-window logits and label maps, final probabilities and masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import resclip
from parity import assert_parity
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
    stable = np.ones(image.shape[0] * image.shape[1], dtype=bool)
    stable[golden[f"{prefix}__pred_unstable_idx"]] = False
    np.testing.assert_array_equal(res.mask.reshape(-1)[stable], golden[f"{prefix}__pred"].reshape(-1)[stable])


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
