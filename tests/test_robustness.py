"""Hostile inputs at the public API, tiny images, huge class lists, band-wise outputs, determinism
and low precision (issue 5).

Every bad input goes through ``resclip.create_segmenter`` or ``Segmenter.predict`` and must raise a
documented exception whose message names the argument (or the file) and the expected form.

Distinct bad inputs covered: 113. Images 46: 15 arrays (empty, NaN/inf, float, integer and other
dtypes, wrong channel counts and ranks), 4 PIL images, 4 other objects, 19 files (empty, not an
image, truncated, corrupt, decompression-bomb headers), a truncated file opened lazily by PIL, a
missing path, a directory, an image too thin to segment. Class lists 19, embeddings 11, names and
settings 21 (methods, presets, overrides, values, precision, device, model), checkpoints 16
(unreadable, not a state dict, not a CLIP, a ResNet CLIP, missing, a directory, an unknown tag, another
ViT, NaN weights). ``test_the_docstring_counts_every_bad_input`` keeps this number honest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import resclip
from resclip.methods import get_method
from resclip.preprocess import load_image, rescale_size

SMALL: dict[str, Any] = {"short_side": 64, "slide_crop": 64, "slide_stride": 32, "rcs_layers": (2, 3)}
CLASSES = ["sky, clouds", "cat", "dog"]  # 3 classes, 4 queries
DIM = 32  # tiny model's embedding dimension


def make_segmenter(
    ckpt: Path | str, method: str = "naclip", rcs: bool = True, sfr: bool = True, **kw: Any
) -> resclip.Segmenter:
    settings = {**SMALL, **kw}
    preset = settings.pop("preset", "ade20k")
    text_cache = settings.pop("text_cache", False)
    return resclip.create_segmenter(
        method=method,
        rcs=rcs,
        sfr=sfr,
        preset=preset,
        pretrained=str(ckpt),
        text_cache=text_cache,
        **settings,
    )


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Two colour blocks plus noise: some structure, so that the classes compete."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), dtype=np.float64)
    img[:, : w // 2] = (200, 40, 40)
    img[:, w // 2 :] = (30, 90, 220)
    return np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)


def random_embeddings(q: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(q, DIM)).astype(np.float32)


def check_result(res: resclip.SegResult, shape: tuple[int, int], num_classes: int) -> None:
    assert res.mask.shape == shape
    assert int(res.mask.max()) < num_classes
    probs = res.probs
    assert probs.shape == (num_classes, *shape)
    assert np.isfinite(probs).all() and np.isfinite(res.logits).all()
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def seg(tiny_ckpt: Path) -> resclip.Segmenter:
    """For input handling: RCS on, SFR (the slow part) off, one window per image."""
    return make_segmenter(tiny_ckpt, sfr=False, slide_crop=0)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return random_image(48, 64)


@pytest.fixture(scope="module")
def emb() -> np.ndarray:
    return random_embeddings(4)


# ---------------------------------------------------------------------------------------------- images
# (input, exception type, regex the message must match: the argument and the expected form)
BAD_ARRAYS = {
    "zero-height": (np.zeros((0, 10, 3), np.uint8), ValueError, r"image array is empty \(size 10x0\)"),
    "zero-width": (np.zeros((10, 0, 3), np.uint8), ValueError, r"image array is empty \(size 0x10\)"),
    "nan-float": (np.full((8, 8, 3), np.nan, np.float32), ValueError, r"image array contains NaN.*uint8"),
    "inf-float": (np.full((8, 8, 3), np.inf), ValueError, r"image array contains NaN or inf.*uint8"),
    "float-0-1": (np.random.default_rng(0).random((8, 8, 3)), ValueError, r"must be uint8 RGB.*float64"),
    "float32-0-255": (np.full((8, 8, 3), 100, np.float32), ValueError, r"image array must be uint8.*float32"),
    "int64": (np.full((8, 8, 3), 100, np.int64), ValueError, r"image array must be uint8.*int64"),
    "uint16": (np.full((8, 8, 3), 1000, np.uint16), ValueError, r"image array must be uint8.*uint16"),
    "bool": (np.ones((8, 8, 3), bool), ValueError, r"image array must be uint8.*bool"),
    "object": (np.full((8, 8, 3), 1, dtype=object), ValueError, r"image array must be uint8.*object"),
    "2-channels": (np.zeros((8, 8, 2), np.uint8), ValueError, r"shape \(H, W, 3\).*\(8, 8, 2\)"),
    "channels-first-2": (np.zeros((2, 8, 8), np.uint8), ValueError, r"shape \(H, W, 3\).*\(2, 8, 8\)"),
    "rank-1": (np.zeros(64, np.uint8), ValueError, r"shape \(H, W, 3\).*\(64,\)"),
    "rank-4-batch": (np.zeros((1, 8, 8, 3), np.uint8), ValueError, r"shape \(H, W, 3\).*\(1, 8, 8, 3\)"),
    "rank-0": (np.array(7, np.uint8), ValueError, r"shape \(H, W, 3\).*\(\)"),
}


@pytest.mark.parametrize("name", list(BAD_ARRAYS))
def test_bad_image_arrays_are_rejected(seg, emb, name):
    image, exc, message = BAD_ARRAYS[name]
    with pytest.raises(exc, match=message):
        seg.predict(image, CLASSES, embeddings=emb)


def test_channels_first_and_rgba_arrays_are_taken(seg, emb):
    """(3, H, W) arrays and tensors (torch's layout) are the same image; RGBA is composited on white."""
    import torch

    rgb = np.random.default_rng(1).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    ref = seg.predict(rgb, CLASSES, embeddings=emb)
    chw = rgb.transpose(2, 0, 1)
    for form in (chw, torch.from_numpy(chw.copy()), torch.from_numpy(rgb)):
        np.testing.assert_array_equal(seg.predict(form, CLASSES, embeddings=emb).logits, ref.logits)
    rgba = np.concatenate([rgb, np.full((40, 56, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(seg.predict(rgba, CLASSES, embeddings=emb).logits, ref.logits)
    clear = rgba.copy()
    clear[..., 3] = 0  # fully transparent: white
    white = seg.predict(np.full_like(rgb, 255), CLASSES, embeddings=emb)
    np.testing.assert_array_equal(seg.predict(clear, CLASSES, embeddings=emb).logits, white.logits)


def _float_image(values: list[list[float]]) -> Image.Image:
    return Image.fromarray(np.array(values, dtype=np.float32), mode="F")


BAD_PIL = {
    "empty-pil": (lambda: Image.new("RGB", (0, 0)), r"image is empty \(size 0x0\)"),
    "empty-pil-wide": (lambda: Image.new("L", (12, 0)), r"image is empty \(size 12x0\)"),
    # 32-bit float images (mode F, e.g. from scientific TIFFs) with NaN or inf must not become garbage
    "nan-float-pil": (lambda: _float_image([[0.5, float("nan")], [0.1, 0.2]]), r"image.*NaN"),
    "inf-float-pil": (lambda: _float_image([[0.5, float("inf")], [0.1, 0.2]]), r"image.*(NaN|inf)"),
}


@pytest.mark.parametrize("name", list(BAD_PIL))
def test_bad_pil_images_are_rejected(seg, emb, name):
    make, message = BAD_PIL[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent "invalid value encountered in cast"
        with pytest.raises(ValueError, match=message):
            seg.predict(make(), CLASSES, embeddings=emb)


BAD_OBJECTS = {"none": None, "float": 3.5, "bytes": b"\x89PNG\r\n", "nested-list": [[[0, 0, 0]]]}


@pytest.mark.parametrize("name", list(BAD_OBJECTS))
def test_non_image_objects_are_rejected(seg, emb, name):
    with pytest.raises(TypeError, match=r"image must be a path, a PIL.Image, or a uint8 numpy array"):
        seg.predict(BAD_OBJECTS[name], CLASSES, embeddings=emb)


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header (with a valid CRC) claims ``width x height``, followed by no pixel data."""
    head = bytearray(_png_bytes(np.zeros((8, 8, 3), np.uint8))[:33])
    ihdr = head[12:29]
    ihdr[4:12] = struct.pack(">II", width, height)
    head[12:29] = ihdr
    head[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(head) + b"\x00\x00\x00\x00IDAT"


_PNG = _png_bytes(random_image(40, 50))
_JPEG = _jpeg_bytes(random_image(40, 50))
BAD_FILES = {
    "empty.png": b"",
    "text.txt": b"cat, dog\nsky\n",
    "text-named.jpg": b"this is not a JPEG\n",
    "json.png": json.dumps({"image": [1, 2, 3]}).encode(),
    "random.png": np.random.default_rng(0).bytes(2000),
    "html.webp": b"<html><body>404 Not Found</body></html>",
    "truncated-half.png": _PNG[: len(_PNG) // 2],
    "truncated-half.jpg": _JPEG[: len(_JPEG) // 2],
    "truncated-tail.jpg": _JPEG[:-200],
    "signature-only.png": _PNG[:8],
    "header-only.png": _PNG[:33],
    "soi-only.jpg": b"\xff\xd8\xff",
    "zero-width-header.png": _png_claiming(0, 8),
    "bad-crc.png": _PNG[:29] + b"\x00\x00\x00\x00" + _PNG[33:],
    "gzip.png": zlib.compress(_PNG),
    # a header claiming 20,000 x 20,000 (then no data) or 100,000 x 100,000: must be a ValueError
    # naming the file, not Pillow's DecompressionBombError escaping the documented exceptions
    "claims-20k.png": _png_claiming(20_000, 20_000),
    "claims-100k.png": _png_claiming(100_000, 100_000),
    "riff-only.webp": b"RIFF\x10\x00\x00\x00WEBPVP8 ",
    "bmp-header-only.bmp": b"BM" + b"\x00" * 12,
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_image_files_are_rejected(seg, emb, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BAD_FILES[name])
    with pytest.raises(ValueError) as info:
        seg.predict(str(path), CLASSES, embeddings=emb)
    message = str(info.value)
    assert str(path) in message
    assert re.search(r"expected a readable, complete image file|is empty|MAX_PIXELS", message)


def test_truncated_file_opened_lazily_by_pil_is_rejected(seg, emb, tmp_path):
    """``Image.open`` reads only the header; the truncation shows when the pixels are decoded."""
    path = tmp_path / "truncated.png"
    path.write_bytes(_PNG[: len(_PNG) // 2])
    with Image.open(path) as lazy, pytest.raises(ValueError, match=r"(?i)image.*truncated"):
        seg.predict(lazy, CLASSES, embeddings=emb)


@pytest.mark.parametrize("as_path", [False, True])
def test_missing_image_file(seg, emb, tmp_path, as_path):
    missing = tmp_path / "no" / "such.jpg"
    with pytest.raises(FileNotFoundError, match=re.escape(repr(str(missing)))):
        seg.predict(missing if as_path else str(missing), CLASSES, embeddings=emb)


def test_directory_instead_of_image(seg, emb, tmp_path):
    with pytest.raises(OSError, match=re.escape(str(tmp_path))):
        seg.predict(tmp_path, CLASSES, embeddings=emb)


def test_too_thin_image_is_rejected(seg, emb):
    with pytest.raises(ValueError, match=r"image is 5000x1 pixels: too thin"):
        seg.predict(np.zeros((1, 5000, 3), np.uint8), CLASSES, embeddings=emb)


# ------------------------------------------------------------------------------- converted, not rejected
def _save(img: Image.Image, path: Path, **kw: Any) -> Path:
    img.save(path, **kw)
    return path


def test_16bit_grayscale_png_and_tiff(seg, emb, tmp_path):
    gray = np.random.default_rng(1).integers(0, 60000, (30, 41)).astype(np.uint16)
    want = np.floor(gray / gray.max() * 255 + 0.5)
    for suffix in ("png", "tif"):
        path = _save(Image.fromarray(gray), tmp_path / f"g16.{suffix}")
        assert Image.open(path).mode.startswith("I;16")
        rgb = load_image(path)
        assert rgb.dtype == np.uint8 and rgb.shape == (30, 41, 3)
        assert np.abs(rgb[..., 0].astype(int) - want).max() <= 1
        assert (rgb[..., 0] == rgb[..., 2]).all()
        check_result(seg.predict(path, CLASSES, embeddings=emb), (30, 41), 3)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16bit_rgb_files(seg, emb, tmp_path, suffix):
    deep = np.random.default_rng(2).integers(0, 65536, (30, 41, 3)).astype(np.uint16)
    path = tmp_path / f"rgb16.{suffix}"
    assert cv2.imwrite(str(path), deep[..., ::-1])  # OpenCV writes BGR
    rgb = load_image(path)
    assert rgb.shape == (30, 41, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(int) - (deep >> 8)).max() <= 1
    check_result(seg.predict(path, CLASSES, embeddings=emb), (30, 41), 3)


def test_cmyk_jpeg(seg, emb, tmp_path):
    path = _save(Image.new("CMYK", (41, 30), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    rgb = load_image(path)
    assert rgb.shape == (30, 41, 3)
    assert np.abs(rgb[15, 20].astype(int) - (255, 0, 0)).max() <= 16  # red stays red
    check_result(seg.predict(path, CLASSES, embeddings=emb), (30, 41), 3)


def test_rgba_png_is_composited_on_white(seg, emb, tmp_path):
    rgba = np.zeros((30, 41, 4), np.uint8)
    rgba[..., :3] = random_image(30, 41)
    rgba[:, 20:, 3] = 255  # left part fully transparent
    path = _save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png")
    rgb = load_image(path)
    assert (rgb[:, :20] == 255).all()
    assert np.array_equal(rgb[:, 20:], rgba[:, 20:, :3])
    check_result(seg.predict(path, CLASSES, embeddings=emb), (30, 41), 3)


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_png(seg, emb, tmp_path, transparent):
    pal = Image.fromarray(random_image(30, 41)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    kw = {"transparency": int(np.asarray(pal)[0, 0])} if transparent else {}
    path = _save(pal, tmp_path / "pal.png", **kw)
    assert Image.open(path).mode == "P"
    rgb = load_image(path)
    if transparent:
        assert (rgb[0, 0] == 255).all()
    else:
        assert np.array_equal(rgb, np.asarray(Image.open(path).convert("RGB")))
    check_result(seg.predict(path, CLASSES, embeddings=emb), (30, 41), 3)


@pytest.mark.parametrize("mode", ["L", "1", "LA", "I", "F"])
def test_grayscale_files(seg, emb, tmp_path, mode):
    gray = Image.fromarray(random_image(30, 41)[..., 0]).convert(mode)
    path = _save(gray, tmp_path / ("g.tif" if mode in ("I", "F") else "g.png"))
    rgb = load_image(path)
    assert rgb.shape == (30, 41, 3) and (rgb[..., 0] == rgb[..., 1]).all()
    check_result(seg.predict(path, CLASSES, embeddings=emb), (30, 41), 3)


ALL_MODES = [
    "1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "RGBX", "RGBa",
    "La", "I;16", "I;16L", "I;16B", "I;16N",
]  # fmt: skip


@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_pil_mode_is_converted(seg, emb, mode):
    image = Image.new(mode, (9, 7))
    res = seg.predict(image, CLASSES, embeddings=emb)
    check_result(res, (7, 9), 3)


# EXIF orientation -> how the stored pixels must be turned to be displayed
ORIENTATIONS = {
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    6: lambda a: np.rot90(a, -1),  # rotate 90 degrees clockwise
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_exif_orientation(seg, emb, tmp_path, orientation):
    stored = random_image(30, 50)  # 50 wide, 30 high as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(Image.fromarray(stored), tmp_path / "rot.jpg", exif=exif, quality=95)
    raw = np.asarray(Image.open(path).convert("RGB"))  # decoded, not transposed
    want = ORIENTATIONS[orientation](raw)
    assert np.array_equal(load_image(path), want)
    res = seg.predict(path, CLASSES, embeddings=emb)
    check_result(res, want.shape[:2], 3)
    if orientation in (6, 8):
        assert res.mask.shape == (50, 30)


def test_arrays_of_any_layout_are_accepted(seg, emb, photo):
    ref = seg.predict(photo, CLASSES, embeddings=emb)
    flipped = np.ascontiguousarray(photo[:, ::-1])[:, ::-1]  # a negative-stride view of the same pixels
    readonly = np.broadcast_to(photo, photo.shape)
    fortran = np.asfortranarray(photo)
    for variant in (flipped, readonly, fortran, Image.fromarray(photo)):
        res = seg.predict(variant, CLASSES, embeddings=emb)
        assert np.array_equal(res.mask, ref.mask) and np.array_equal(res.logits, ref.logits)
    gray = seg.predict(photo[..., 0], CLASSES, embeddings=emb)  # (H, W) arrays are grayscale
    assert gray.mask.shape == photo.shape[:2]


def test_file_with_the_wrong_extension(seg, emb, tmp_path):
    path = tmp_path / "actually-a-jpeg.png"
    path.write_bytes(_JPEG)
    check_result(seg.predict(path, CLASSES, embeddings=emb), (40, 50), 3)


# ---------------------------------------------------------------------------------------------- classes
BAD_CLASSES = {
    "empty-list": ([], r"classes is empty: give at least one class name"),
    "empty-tuple": ((), r"classes is empty"),
    "empty-string": ("", r"classes is empty"),
    "separators-only": (" ; \n ;", r"classes is empty"),
    "empty-item": (["cat", ""], r"classes\[1\] is empty or whitespace only"),
    "whitespace-item": (["cat", " \t "], r"classes\[1\] is empty or whitespace only"),
    "empty-line-in-string": ("cat;;dog", r"classes\[1\] is empty or whitespace only"),
    "int-item": (["cat", 3], r"classes\[1\] must be a string, got int"),
    "none-item": ([None, "cat"], r"classes\[0\] must be a string, got NoneType"),
    "bytes-item": (["cat", b"dog"], r"classes\[1\] must be a string, got bytes"),
    "nested-list": ([["cat", "kitten"]], r"classes\[0\] must be a string, got list"),
    "empty-synonym": (["cat, , pet"], r"classes\[0\] = 'cat, , pet' has an empty synonym at position 1"),
    "trailing-comma": (["sky,", "cat"], r"classes\[0\] = 'sky,' has an empty synonym at position 1"),
    "none": (None, r"classes must be a list of class names or a ';'-separated string, got NoneType"),
    "int": (5, r"classes must be a list.*got int"),
    "bytes": (b"cat;dog", r"classes must be a list.*got bytes"),
    "set": ({"cat", "dog"}, r"classes must be a list.*got set"),
    "dict": ({"cat": 1}, r"classes must be a list.*got dict"),
    "generator": ((c for c in ["cat"]), r"classes must be a list.*got generator"),
}


@pytest.mark.parametrize("name", list(BAD_CLASSES))
def test_bad_class_lists_are_rejected(seg, photo, name):
    classes, message = BAD_CLASSES[name]
    with pytest.raises(ValueError, match=message):
        seg.predict(photo, classes)


def test_class_list_forms(seg, photo):
    want = ["sky", "cat", "dog"]
    for classes in (
        ("sky, clouds", "cat", "dog"),
        np.array(["sky, clouds", "cat", "dog"]),
        "sky, clouds; cat\ndog",
        "sky, clouds;cat;dog;\n",
        " sky ,clouds\r\ncat\r\ndog\r\n",
    ):
        res = seg.predict(photo, classes, embeddings=random_embeddings(4))
        assert res.class_names == want
        check_result(res, photo.shape[:2], 3)


def test_unicode_and_punctuation_names(seg, photo):
    res = seg.predict(photo, ["café, crème brûlée", "猫", "🐱 cat", "t-shirt (white)", "?!"])
    check_result(res, photo.shape[:2], 5)
    assert res.class_names[:3] == ["café", "猫", "🐱 cat"]


def test_duplicate_class_lines_warn_and_stay_separate(seg, photo):
    with pytest.warns(UserWarning, match=r"duplicate class lines \['cat'\]"):
        res = seg.predict(photo, ["cat", "dog", "cat"])
    check_result(res, photo.shape[:2], 3)
    assert np.array_equal(res.probs[0], res.probs[2])  # identical embeddings ...
    assert not (res.mask == 2).any()  # ... so the later copy never wins a pixel


def test_synonym_shared_by_two_classes_warns(seg, photo):
    with pytest.warns(UserWarning, match=r"synonyms \['pet'\] appear in several classes"):
        res = seg.predict(photo, ["cat, pet", "dog, pet", "sky"])
    check_result(res, photo.shape[:2], 3)


def test_duplicates_differing_only_in_case_or_spacing_warn(seg, photo):
    """CLIP's tokenizer lowercases and collapses whitespace: these are the same class to the model."""
    for classes in (["Cat", "dog", "cat"], ["big  cat", "dog", "big cat"]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = seg.predict(photo, classes)
        assert np.array_equal(res.probs[0], res.probs[2])  # identical embeddings: class 2 never wins
        assert any("duplicate class lines" in str(w.message) for w in caught), classes


def test_names_longer_than_the_text_context_warn(seg, photo):
    long_name = " ".join(["extraordinarily"] * 90)
    with pytest.warns(UserWarning, match=r"longer than the text encoder's context of 77 tokens"):
        res = seg.predict(photo, ["sky", long_name])
    check_result(res, photo.shape[:2], 2)
    assert res.class_names[1] == long_name


# ------------------------------------------------------------------------------------------- embeddings
def _emb(shape: tuple[int, ...], fill: float | None = None, dtype: Any = np.float32) -> np.ndarray:
    arr = np.random.default_rng(1).normal(size=shape).astype(dtype)
    if fill is not None:
        arr.flat[1] = fill
    return arr


BAD_EMBEDDINGS = {
    "too-many-rows": (
        _emb((5, DIM)),
        r"embeddings must have shape \(num_queries, dim\) = \(4, 32\), got \(5,",
    ),
    "wrong-dim": (_emb((4, DIM + 1)), r"embeddings must have shape .* = \(4, 32\), got \(4, 33\)"),
    "one-row-per-class": (_emb((3, DIM)), r"got \(3, 32\) \(one row per class was given; 4 queries"),
    "rank-1": (_emb((DIM,)), r"embeddings must have shape .* = \(4, 32\), got \(32,\)"),
    "rank-3": (_emb((1, 4, DIM)), r"embeddings must have shape .* got \(1, 4, 32\)"),
    "nan": (_emb((4, DIM), np.nan), r"embeddings contain NaN or infinite values"),
    "inf": (_emb((4, DIM), -np.inf), r"embeddings contain NaN or infinite values"),
    "zero-row": (np.vstack([_emb((3, DIM)), np.zeros((1, DIM))]), r"embeddings rows \[3\] are all zero"),
    "integer": (_emb((4, DIM), dtype=np.int64), r"embeddings must be floating point, got dtype torch.int64"),
    "list": (_emb((4, DIM)).tolist(), r"embeddings must be a torch.Tensor or numpy array of shape \(4, 32\)"),
    "object-array": (_emb((4, DIM), dtype=object), r"embeddings must be .*\(4, 32\)"),
}


@pytest.mark.parametrize("name", list(BAD_EMBEDDINGS))
def test_bad_embeddings_are_rejected(seg, photo, name):
    with pytest.raises(ValueError, match=BAD_EMBEDDINGS[name][1]):
        seg.predict(photo, CLASSES, embeddings=BAD_EMBEDDINGS[name][0])


def test_embeddings_of_any_float_type_are_accepted(seg, photo, emb):
    ref = seg.predict(photo, CLASSES, embeddings=emb)
    for variant in (emb.astype(np.float64), torch.from_numpy(emb), torch.from_numpy(emb).half(), emb * 7.5):
        res = seg.predict(photo, CLASSES, embeddings=variant)
        assert res.mask.shape == ref.mask.shape
        np.testing.assert_allclose(res.logits, ref.logits, atol=2e-3)


# ------------------------------------------------------------------------------ names and settings
_METHODS = re.escape(", ".join(resclip.list_methods()))  # the registry, sorted
_PRESETS = r"valid: 'default', a dataset \(voc21, .*ade20k\).*resclip, sclip, naclip, clearclip, paper"
BAD_SETTINGS: dict[str, tuple[dict[str, Any], Any, str]] = {
    "method": ({"method": "resclip2"}, ValueError, rf"unknown method 'resclip2'; valid methods: {_METHODS}"),
    "method-empty": ({"method": ""}, ValueError, rf"unknown method ''; valid methods: {_METHODS}"),
    "preset": ({"preset": "voc22"}, ValueError, rf"unknown preset 'voc22'; {_PRESETS}"),
    "preset-family": (
        {"preset": "maskclip/voc21"},
        ValueError,
        rf"unknown preset 'maskclip/voc21'; {_PRESETS}",
    ),
    "override": ({"slide_size": 9}, TypeError, r"unknown setting 'slide_size'; valid settings: .*slide_crop"),
    "short-side": ({"short_side": 0}, ValueError, r"short_side and long_side must be >= 1, got 0"),
    "short-side-str": ({"short_side": "336"}, (TypeError, ValueError), r"short_side.*'336'"),
    "slide-crop": ({"slide_crop": -1}, ValueError, r"slide_crop must be >= 0 \(0 = whole image\), got -1"),
    "slide-stride": ({"slide_stride": 0}, ValueError, r"slide_stride must be > 0, got 0"),
    # windows that leave gaps would average over zero windows there (NaN logits, garbage mask)
    "stride-over-crop": ({"slide_stride": 100}, ValueError, r"slide_stride.*100.*slide_crop.*64"),
    "prob-thd": ({"prob_thd": 1.5}, ValueError, r"prob_thd must be in \[0, 1\], got 1.5"),
    "area-thd": ({"area_thd": -0.1}, ValueError, r"area_thd must be None or in \[0, 1\], got -0.1"),
    "pamr-steps": ({"pamr_steps": -1}, ValueError, r"pamr_steps must be >= 0, got -1"),
    "lambda-rcs": ({"lambda_rcs": 1.5}, ValueError, r"RCS lam must be in \[0, 1\], got 1.5"),
    "rcs-layers": ({"rcs_layers": (0, 2)}, ValueError, r"RCS layers must be 1-based block indices"),
    "tau-sfr": ({"tau_sfr": 0.0}, ValueError, r"SFR tau must be > 0, got 0.0"),
    "window-batch": ({"window_batch": 0}, ValueError, r"window_batch must be >= 1, got 0"),
    "precision": (
        {"precision": "fp8"},
        ValueError,
        r"precision='fp8' is not supported; use one of \['bf16', ",
    ),
    "device": ({"device": "gpu:zero"}, ValueError, r"device='gpu:zero' is not a valid device; use 'cpu'"),
    "model-name": (
        {"model": "ViT-Q-99"},
        ValueError,
        r"model='ViT-Q-99' is not a known .* Did you mean one of",
    ),
    "maskclip-sfr": (
        {"method": "maskclip"},
        ValueError,
        r"method 'maskclip' has none \(identity attention\)",
    ),
}


@pytest.mark.parametrize("name", list(BAD_SETTINGS))
def test_bad_names_and_settings_are_rejected(tiny_ckpt, name):
    kw, exc, message = BAD_SETTINGS[name]
    with pytest.raises(exc, match=message):
        make_segmenter(tiny_ckpt, **kw)


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def other_arch(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Another tiny ViT (2 blocks, width 64) registered with open_clip."""
    cfg = {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
    }
    folder = tmp_path_factory.mktemp("other_cfg")
    (folder / "resclip-test-other.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return "resclip-test-other"


def _resnet_state() -> dict[str, torch.Tensor]:
    import torchvision

    return torchvision.models.resnet18(weights=None).state_dict()


def _clip_resnet_state(tiny_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in tiny_state.items() if not k.startswith("visual.")}
    state["visual.layer1.0.conv1.weight"] = torch.zeros(8, 8, 1, 1)
    state["visual.attnpool.c_proj.weight"] = torch.zeros(4, 4)
    return state


# name -> (write the file into path given the tiny state dict, message regex)
_UNREADABLE = (
    r"could not read checkpoint pretrained='.*{}.pt' \(.*truncated or corrupt; expected a torch.save'd"
)
_NOT_A_DICT = r"pretrained='.*{}.pt' is not a CLIP checkpoint: expected a state dict .*got {}"
_NO_VISUAL = r"pretrained='.*{}.pt' is not a CLIP checkpoint \(no 'visual.\*' weights; keys start with \[{}"


def _text_tower(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("visual.")}


# name -> (write the file given its path and the tiny state dict (None: first half of the tiny file), message)
BAD_CHECKPOINTS: dict[str, tuple[Any, str]] = {
    "empty-file": (lambda p, s: p.write_bytes(b""), _UNREADABLE.format("empty-file")),
    "random-bytes": (
        lambda p, s: p.write_bytes(np.random.default_rng(0).bytes(4096)),
        _UNREADABLE.format(".*"),
    ),
    "truncated": (None, _UNREADABLE.format("truncated")),
    "json-text": (lambda p, s: p.write_text('{"visual.proj": [1, 2]}'), _UNREADABLE.format("json-text")),
    "list": (lambda p, s: torch.save([1, 2, 3], p), _NOT_A_DICT.format("list", "list")),
    "tensor": (lambda p, s: torch.save(torch.zeros(3), p), _NOT_A_DICT.format("tensor", "Tensor")),
    "empty-dict": (
        lambda p, s: torch.save({}, p), r"pretrained='.*empty-dict.pt' holds no tensors, so it is not a CLIP"
    ),
    "resnet18": (lambda p, s: torch.save(_resnet_state(), p), _NO_VISUAL.format("resnet18", "'bn1.bias'")),
    "clip-resnet": (lambda p, s: torch.save(_clip_resnet_state(s), p), r"holds a CLIP with a ResNet or timm"),
    "text-tower-only": (lambda p, s: torch.save(_text_tower(s), p), _NO_VISUAL.format("text-tower-only", "")),
}


@pytest.mark.parametrize("name", list(BAD_CHECKPOINTS))
@pytest.mark.parametrize("named", [False, True], ids=["inferred", "model-given"])
def test_bad_checkpoints_are_rejected(tiny_ckpt, tiny_arch, tmp_path, name, named):
    write, message = BAD_CHECKPOINTS[name]
    path = tmp_path / f"{name}.pt"
    if write is None:
        raw = tiny_ckpt.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    else:
        write(path, torch.load(tiny_ckpt, weights_only=True))
    with pytest.raises(ValueError, match=message):
        resclip.create_segmenter(pretrained=str(path), model=tiny_arch if named else None, text_cache=False)


MISSING_CHECKPOINTS = [
    "{tmp}/no/such/ViT-B-16.pt",
    "weights-that-do-not-exist.pt",
    "{tmp}",
]  # the last: a directory


@pytest.mark.parametrize("missing", MISSING_CHECKPOINTS)
def test_missing_checkpoint(tmp_path, missing):
    value = missing.format(tmp=tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(f"pretrained={value!r}")):
        resclip.create_segmenter(pretrained=value, text_cache=False)


def test_unknown_tag_lists_the_tags():
    message = r"pretrained='laion9b' is neither an existing file nor a known open_clip tag.*'openai'"
    with pytest.raises(ValueError, match=message):
        resclip.create_segmenter(model="ViT-B-16", pretrained="laion9b", text_cache=False)


def test_checkpoint_of_another_vit(tiny_ckpt, other_arch):
    with pytest.raises(ValueError) as info:
        resclip.create_segmenter(model=other_arch, pretrained=str(tiny_ckpt), text_cache=False)
    message = str(info.value)
    assert f"pretrained={str(tiny_ckpt)!r} does not fit model={other_arch!r}" in message
    assert "another architecture; omit model= to infer it from the file" in message
    assert "shape mismatches" in message


def test_checkpoint_with_nan_weights_is_rejected(tiny_ckpt, tmp_path):
    """A corrupt (e.g. badly converted fp16) checkpoint must not silently give an all-zero mask."""
    state = torch.load(tiny_ckpt, weights_only=True)
    state["visual.transformer.resblocks.1.mlp.c_fc.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        make_segmenter(path)
    message = str(info.value)
    assert str(path) in message and "visual.transformer.resblocks.1.mlp.c_fc.weight" in message
    assert re.search(r"NaN|infinite|non-finite", message)


# ------------------------------------------------------------------------------------------- tiny images
@pytest.fixture(scope="module")
def wide_seg(tiny_ckpt: Path) -> resclip.Segmenter:
    return make_segmenter(tiny_ckpt, sfr=False, long_side=1024, slide_stride=48)


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (1, 3), (7, 300), (300, 7), (5, 5)])
def test_tiny_images(wide_seg, emb, size):
    image = random_image(*size)
    res = wide_seg.predict(image, CLASSES, embeddings=emb)
    check_result(res, size, 3)
    assert res.logits.shape == (4, *rescale_size(*size, 64, 1024))


# --------------------------------------------------------------------------------- bands (bounded memory)
BAND_CASES = {
    "plain": {"prob_thd": 0.35},
    "pamr-small-halo": {"pamr_steps": 3, "pamr_dilations": (1, 2)},
    "pamr-default": {"pamr_steps": 2},
    "area-thd": {"area_thd": 0.3, "prob_thd": 0.2},
    "area-thd-pamr": {"area_thd": 0.3, "pamr_steps": 2, "pamr_dilations": (2, 4)},
}


@pytest.mark.parametrize("case", list(BAND_CASES))
def test_many_bands_equal_one_band(tiny_ckpt, case):
    seg = make_segmenter(tiny_ckpt, sfr=False, **BAND_CASES[case])  # bands come after the network
    image = random_image(200, 32, seed=4)
    classes = ["sky, clouds", "cat", "dog", "tree, bush", "car", "road"]
    emb = random_embeddings(8, seed=5)
    seg.band_budget = 1 << 40
    one = seg.predict(image, classes, embeddings=emb)
    seg.band_budget = 8 * 32 * 6  # 6 rows of (8 queries, 32 columns); PAMR raises it to fit its halo
    many = seg.predict(image, classes, embeddings=emb)
    assert len(one.full.bands) == 1
    assert len(many.full.bands) >= (2 if "pamr_steps" in BAND_CASES[case] else 30)
    if "area_thd" in BAND_CASES[case]:
        assert (one.full.keep() == 0).any(), "the area filter should remove a class here"
        assert torch.equal(one.full.keep(), many.full.keep())
    assert np.array_equal(one.mask, many.mask)
    np.testing.assert_allclose(many.probs, one.probs, atol=1e-6, rtol=0)
    rows = np.concatenate([many.full.class_prob_rows(a, b).numpy() for a, b in many.full.bands], axis=1)
    np.testing.assert_allclose(rows, one.full.class_prob_rows(0, 200).numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("num_classes", "dtype"), [(256, np.uint8), (257, np.uint16), (1000, np.uint16)])
def test_large_class_lists(tiny_ckpt, photo, num_classes, dtype):
    # the paper's SFR: the released one runs PAMR over every query's first-pass logits (~10 s here)
    seg = make_segmenter(tiny_ckpt, preset="paper/ade20k")
    classes = [f"class {i}" for i in range(num_classes)]
    res = seg.predict(photo, classes, embeddings=random_embeddings(num_classes, seed=num_classes))
    assert res.mask.dtype == dtype
    check_result(res, photo.shape[:2], num_classes)
    assert len(np.unique(res.mask)) > 1
    assert np.array_equal(res.mask, res.probs.argmax(axis=0))


WINDOW_COMBOS = [
    ("naclip", True, True),
    ("sclip", True, True),
    ("clip", False, False),
    ("maskclip", True, False),
]


@pytest.mark.parametrize(("method", "rcs", "sfr"), WINDOW_COMBOS)
def test_window_batch_does_not_change_the_result(tiny_ckpt, method, rcs, sfr):
    seg = make_segmenter(tiny_ckpt, method, rcs, sfr)
    image = random_image(64, 170, seed=6)
    emb = random_embeddings(4, seed=7)
    results = {}
    for batch in (1, 2, 8):
        seg.window_batch = batch
        results[batch] = seg.predict(image, CLASSES, embeddings=emb)
    assert len(resclip.preprocess.window_coords(64, 170, 64, 32)) == 5  # chunks 5x1, 2+2+1, 5
    for batch in (1, 2):
        assert np.array_equal(results[batch].mask, results[8].mask)
        np.testing.assert_allclose(results[batch].logits, results[8].logits, atol=1e-5, rtol=0)


def _decisive(probs: np.ndarray) -> np.ndarray:
    top = np.partition(probs, -2, axis=0)
    return top[-1] - top[-2] > 1e-4


@pytest.mark.parametrize("method", ["naclip", "clip"])
def test_repeated_synonyms_do_not_make_sfr_depend_on_window_batching(tiny_ckpt, method):
    """A synonym in several classes is one query per class, with identical embeddings. The released
    SFR labels the first pass by query, so such exact ties must be broken the same way whatever the
    windows are batched with (2 x 2-patch windows: small matrix products, whose rounding depends on
    the batch)."""
    seg = make_segmenter(tiny_ckpt, method, short_side=85, long_side=128, slide_crop=42, slide_stride=16)
    lines = ["sky", "sky, clouds, cat", "boat, sky, clouds", "sky, boat"]
    image = random_image(40, 100, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # synonyms in several classes
        seg.window_batch = 1
        one = seg.predict(image, lines)
        seg.window_batch = 8
        eight = seg.predict(image, lines)
    np.testing.assert_allclose(eight.logits, one.logits, atol=1e-5, rtol=0)
    decisive = _decisive(one.probs)  # classes sharing the winning synonym tie exactly elsewhere
    assert np.array_equal(eight.mask[decisive], one.mask[decisive])


# ------------------------------------------------------------------------------------------ determinism
DETERMINISM_SCRIPT = r"""
import hashlib
import sys

import numpy as np
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

import resclip
from resclip.methods import get_method


def digests(ckpt):
    seg = resclip.create_segmenter(
        "naclip", rcs=True, sfr=True, preset="ade20k", pretrained=ckpt, text_cache=False,
        short_side=64, slide_crop=64, slide_stride=32, rcs_layers=(2, 3), pamr_steps=2, prob_thd=0.3,
    )
    image = np.random.default_rng(7).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    res = seg.predict(image, ["sky, clouds", "cat", "tree"])
    return {
        name: hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
        for name, value in (("mask", res.mask), ("logits", res.logits), ("probs", res.probs))
    }


if __name__ == "__main__":
    print(digests(sys.argv[1]))
"""


def _digest(res: resclip.SegResult) -> dict[str, str]:
    return {
        name: hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
        for name, value in (("mask", res.mask), ("logits", res.logits), ("probs", res.probs))
    }


def test_same_input_same_bits_in_one_process(tiny_ckpt):
    image = random_image(50, 70, seed=8)
    first = make_segmenter(tiny_ckpt, "sclip", pamr_steps=1)
    a = _digest(first.predict(image, CLASSES))
    b = _digest(first.predict(image, CLASSES))
    c = _digest(make_segmenter(tiny_ckpt, "sclip", pamr_steps=1).predict(image, CLASSES))  # a new model
    assert a == b == c


@pytest.mark.slow
def test_same_input_same_bits_across_processes(tiny_ckpt, tmp_path):
    script = tmp_path / "digests.py"
    script.write_text(DETERMINISM_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "random"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tiny_ckpt)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outputs.append(out.strip().splitlines()[-1])
    namespace: dict[str, Any] = {"__name__": "determinism"}
    exec(compile(DETERMINISM_SCRIPT, str(script), "exec"), namespace)
    here = str(namespace["digests"](str(tiny_ckpt)))
    assert outputs[0] == outputs[1] == here


# ------------------------------------------------------------------------------------- low precision
# CLIP-only methods (with a second model: test_auxiliary.py, test_second_model_methods_run_in_low_precision)
COMBOS = [
    (m, r, s)
    for m in resclip.list_methods()
    if not get_method(m).required_aux()
    for r in (False, True)
    for s in (False, True)
    if not (m == "maskclip" and s)  # rejected: no attention scores (see BAD_SETTINGS)
]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize(("method", "rcs", "sfr"), COMBOS)
def test_low_precision_is_finite(tiny_ckpt, emb, method, rcs, sfr, precision):
    seg = make_segmenter(tiny_ckpt, method, rcs, sfr, precision=precision)
    image = random_image(40, 52, seed=9)  # resized to 64 x 83: two windows
    res = seg.predict(image, CLASSES, embeddings=emb)
    check_result(res, image.shape[:2], 3)


@pytest.fixture(scope="module")
def hot_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Query and key weights x300: attention scores exceed 1e5, beyond fp16's 65504."""
    state = torch.load(tiny_ckpt, weights_only=True)
    for key, value in state.items():
        if key.startswith("visual.transformer.resblocks.") and key.endswith("attn.in_proj_weight"):
            value[: 2 * 128] *= 300.0
    path = tmp_path_factory.mktemp("hot") / "hot.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize(
    ("method", "preset"),  # released (explicit trunk, fp16 SFR scores) and paper (fused trunk) settings
    [("naclip", "ade20k"), ("sclip", "paper/ade20k"), ("clearclip", "ade20k"), ("clip", "paper/ade20k")],
)
def test_huge_attention_scores_do_not_overflow(hot_ckpt, emb, method, precision, preset):
    seg = make_segmenter(hot_ckpt, method, True, True, precision=precision, preset=preset)
    image = random_image(40, 52, seed=10)
    res = seg.predict(image, CLASSES, embeddings=emb)
    check_result(res, image.shape[:2], 3)


# ------------------------------------------------------------------------------------------ bookkeeping
SINGLE_BAD_INPUTS = [
    test_truncated_file_opened_lazily_by_pil_is_rejected,
    test_missing_image_file,
    test_directory_instead_of_image,
    test_too_thin_image_is_rejected,
    test_unknown_tag_lists_the_tags,
    test_checkpoint_of_another_vit,
    test_checkpoint_with_nan_weights_is_rejected,
]


def test_the_docstring_counts_every_bad_input():
    tables = (BAD_ARRAYS, BAD_PIL, BAD_OBJECTS, BAD_FILES, BAD_CLASSES, BAD_EMBEDDINGS, BAD_SETTINGS)
    total = (
        sum(len(t) for t in tables) + len(BAD_CHECKPOINTS) + len(MISSING_CHECKPOINTS) + len(SINGLE_BAD_INPUTS)
    )
    assert __doc__ is not None
    assert f"Distinct bad inputs covered: {total}." in " ".join(__doc__.split())
