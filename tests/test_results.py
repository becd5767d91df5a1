"""Result formats: COCO RLE (checked against strings written by pycocotools 2.0.11), class masks,
the unknown label and compressed probabilities."""

from __future__ import annotations

import io

import numpy as np
import pytest

from resclip.results import class_masks, probs_bytes, rle_area, rle_decode, rle_encode, with_unknown

# pycocotools.mask.encode(np.asfortranarray(m.astype(np.uint8))) for the masks built below
BOX = {"size": [6, 7], "counts": "5172L000005"}
RANDOM_BITS = [144, 156, 8, 18, 64, 240, 197, 176, 85, 3, 25, 241, 224]
RANDOM = {"size": [9, 11], "counts": "021O0010O023NM42OOMO311OL00080K0O2NO3OM0012O00N001"}


def _box() -> np.ndarray:
    m = np.zeros((6, 7), bool)
    m[1:4, 2:6] = True
    m[5, 0] = True
    return m


def _random() -> np.ndarray:
    return np.unpackbits(np.array(RANDOM_BITS, np.uint8))[: 9 * 11].reshape(9, 11).astype(bool)


@pytest.mark.parametrize(("mask", "rle"), [(_box(), BOX), (_random(), RANDOM)])
def test_rle_matches_pycocotools(mask, rle):
    assert rle_encode(mask) == rle
    np.testing.assert_array_equal(rle_decode(rle), mask)
    assert rle_area(rle) == int(mask.sum())


@pytest.mark.parametrize("shape", [(1, 1), (4, 9), (33, 17)])
@pytest.mark.parametrize("fill", ["zeros", "ones", "random", "first"])
def test_rle_round_trip(shape, fill):
    rng = np.random.default_rng(sum(shape))
    mask = {"zeros": np.zeros(shape, bool), "ones": np.ones(shape, bool),
            "random": rng.random(shape) > 0.5, "first": np.eye(*shape, dtype=bool)}[fill]
    rle = rle_encode(mask)
    np.testing.assert_array_equal(rle_decode(rle), mask)
    assert rle_area(rle) == int(mask.sum())
    counts = [int(c) for c in np.diff(np.flatnonzero(np.diff(np.r_[-1, mask.ravel(order="F"), -1])))]
    list_form = {"size": list(shape), "counts": ([0] if mask.ravel(order="F")[0] else []) + counts}
    np.testing.assert_array_equal(rle_decode(list_form), mask)  # uncompressed counts decode too


def test_rle_errors():
    with pytest.raises(ValueError, match="must be 2-D"):
        rle_encode(np.zeros((2, 2, 2), bool))
    with pytest.raises(ValueError, match="add up to 5, not 2x3"):
        rle_decode({"size": [2, 3], "counts": [2, 3]})


def test_class_masks_and_unknown():
    mask = np.array([[0, 1], [2, 1]], np.uint8)
    masks = class_masks(mask, 3)
    assert masks.shape == (3, 2, 2) and masks.sum() == 4
    np.testing.assert_array_equal(np.argmax(masks, axis=0), mask)
    conf = np.array([[0.9, 0.2], [0.5, 0.31]], np.float32)
    np.testing.assert_array_equal(with_unknown(mask, conf, 0.3, 3), [[0, 3], [2, 1]])
    wide = with_unknown(mask, conf, 0.3, 256)
    assert wide.dtype == np.uint16 and wide[0, 1] == 256
    assert mask[0, 1] == 1  # not changed in place
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        with_unknown(mask, conf, 0.0, 3)


def test_probs_bytes_round_trip():
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=(5, 4)).transpose(2, 0, 1).astype(np.float32)
    data = np.load(io.BytesIO(probs_bytes(probs, ["a", "b", "c"])))
    assert data["probs"].dtype == np.float16 and data["names"].tolist() == ["a", "b", "c"]
    np.testing.assert_allclose(data["probs"], probs, atol=5e-4)


def test_confidence_is_the_winning_class_probability(tiny_ckpt):
    import resclip
    from resclip.results import confidence

    seg = resclip.create_segmenter(pretrained=str(tiny_ckpt), sfr=False, rcs_layers=(1, 2), text_cache=False)
    rgb = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    res = seg.predict(rgb, ["cat", "dog", "sky"])
    conf = confidence(res.full)
    assert conf.shape == (70, 90) and conf.dtype == np.float32
    np.testing.assert_array_equal(conf, res.probs.max(axis=0))
    np.testing.assert_array_equal(np.take_along_axis(res.probs, res.mask[None].astype(np.int64), 0)[0], conf)
