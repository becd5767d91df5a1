"""Palettes, colour masks, palette PNGs, overlays, legends and panels (Pillow only)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resclip import viz
from resclip.figures import CompareRow, compare_figure, picture_bytes
from resclip.palettes import distinct_palette, get_palette, voc_palette
from resclip.results import json_text

BIRD = Path(__file__).parent / "data" / "benchmarks" / "VOCdevkit" / "VOC2012" / "JPEGImages" / "crop_114.jpg"


def photo() -> np.ndarray:
    return np.asarray(Image.open(BIRD).convert("RGB"))


def stripes(h: int = 60, w: int = 90, classes: int = 3) -> np.ndarray:
    return (np.arange(w)[None, :] * classes // w).repeat(h, axis=0).astype(np.int64)


def test_voc_palette_known_colours():
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[0].tolist() == [0, 0, 0]
    assert pal[1].tolist() == [128, 0, 0]  # aeroplane
    assert pal[15].tolist() == [192, 128, 128]  # person
    assert pal[20].tolist() == [0, 64, 128]  # tv monitor
    assert pal[255].tolist() == [224, 224, 192]  # void
    assert len({tuple(c) for c in pal.tolist()}) == 256


def test_distinct_palette_is_deterministic_bright_and_unique():
    pal = distinct_palette(256)
    assert len({tuple(c) for c in pal.tolist()}) == 256
    np.testing.assert_array_equal(pal[:10], distinct_palette(10))
    assert (pal.max(axis=1) > 60).all()  # no near-black
    assert len(distinct_palette(300)) == 300
    assert get_palette("voc", 300)[:256].tolist() == voc_palette().tolist()
    with pytest.raises(ValueError, match="unknown palette"):
        get_palette("rainbow")


def test_colorize_and_overlay():
    mask = stripes()
    rgb = np.full((60, 90, 3), 200, dtype=np.uint8)
    colours = viz.colorize(mask)
    np.testing.assert_array_equal(colours[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(colours[0, -1], [0, 128, 0])
    blended = viz.overlay(rgb, mask, 0.25)
    np.testing.assert_array_equal(blended[0, 45], np.round(0.75 * 200 + 0.25 * np.array([128, 0, 0])))
    np.testing.assert_array_equal(viz.overlay(rgb, mask, 0.0), rgb)
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(rgb, mask, 1.2)
    with pytest.raises(ValueError, match="sizes differ"):
        viz.overlay(rgb[:10], mask)


def test_mask_image_palette_png_roundtrip():
    mask = stripes(classes=5)
    buf = io.BytesIO()
    viz.mask_image(mask, 5).save(buf, format="PNG")
    back = Image.open(io.BytesIO(buf.getvalue()))
    assert back.mode == "P"
    np.testing.assert_array_equal(np.asarray(back), mask)
    assert back.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
    with pytest.raises(ValueError, match="only 4 classes"):
        viz.mask_image(mask, 4)


def test_mask_image_more_than_256_classes_is_16_bit():
    mask = np.arange(300 * 2).reshape(20, 30) % 300
    buf = io.BytesIO()
    viz.mask_image(mask, 300).save(buf, format="PNG")
    back = Image.open(io.BytesIO(buf.getvalue()))
    assert back.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(back).astype(np.int64), mask)


def test_legend_lists_present_classes_with_their_colours():
    mask = np.zeros((40, 40), dtype=np.int64)
    mask[:, 30:] = 2  # class 1 absent
    entries = viz.present_entries(mask, ["sky", "cat", "grass"], with_share=True)
    assert entries == [("sky (75.0%)", (0, 0, 0)), ("grass (25.0%)", (0, 128, 0))]
    key = np.asarray(viz.legend(entries, font_size=14))
    for _, colour in entries:
        assert (key.reshape(-1, 3) == colour).all(axis=1).sum() >= 14 * 14 - 4 * 14
    assert not (key.reshape(-1, 3) == (128, 0, 0)).all(axis=1).any()


def test_legend_wraps_into_columns():
    entries = [(f"class {i}", viz.rgb(c)) for i, c in enumerate(distinct_palette(30))]
    tall = viz.legend(entries, font_size=12)
    wrapped = viz.legend(entries, font_size=12, max_height=200)
    assert wrapped.height <= 200 < tall.height
    assert wrapped.width > tall.width


def test_overlay_with_legend_keeps_the_image_size_on_the_left():
    rgb = photo()
    mask = stripes(513, 513, 4)
    picture = viz.overlay_with_legend(rgb, mask, ["bird", "water", "sky", "background"])
    assert picture.height == 513 and picture.width > 513
    np.testing.assert_array_equal(np.asarray(picture)[:, :513], viz.overlay(rgb, mask))


def test_overlay_with_legend_on_a_tiny_image_grows_the_canvas():
    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    picture = viz.overlay_with_legend(rgb, np.zeros((4, 5), dtype=np.int64), ["sky"])
    assert picture.height > 4 and picture.width > 5


def test_panels_and_fit_height():
    rgb = photo()
    assert viz.fit_height(rgb, 100).size == (100, 100)
    mask_panel = viz.fit_height(viz.colorize(stripes(30, 60)), 100, nearest=True)
    assert mask_panel.size == (200, 100)
    colours = set(map(tuple, np.asarray(mask_panel).reshape(-1, 3).tolist()))
    assert colours <= {(0, 0, 0), (128, 0, 0), (0, 128, 0)}
    grid = viz.panels([("a", viz.fit_height(rgb, 100)), ("b", mask_panel), ("c", mask_panel)], columns=2)
    assert grid.width >= 2 * 200 and grid.height >= 2 * 100
    with pytest.raises(ValueError, match="no panels"):
        viz.panels([])


def test_compare_figure_has_a_shared_legend():
    rgb = photo()
    a = stripes(513, 513, 2)
    b = np.full((513, 513), 3, dtype=np.int64)
    names = ["bird", "water", "sky", "background"]
    fig = np.asarray(compare_figure([CompareRow(rgb, [("clip", a), ("resclip", b)])], names, height=96))
    flat = fig.reshape(-1, 3)
    legend_part = fig[:, 3 * 96 + 8 :].reshape(-1, 3)
    for index in (0, 1, 3):  # classes shown in some mask
        assert (flat == voc_palette()[index]).all(axis=1).any()
    assert (legend_part == voc_palette()[3]).all(axis=1).sum() >= 100
    assert not (legend_part == voc_palette()[2]).all(axis=1).any()  # 'sky' appears in no mask


def test_json_text_is_valid_and_compact():
    record = {"color": [0, 128, 0], "synonyms": ["a, b", "c]d"], "nested": {"x": [1.5, None]}, "e": []}
    text = json_text(record)
    assert json.loads(text) == record
    assert '"color": [0, 128, 0]' in text


def test_compare_figure_rows_and_truth():
    rgb = photo()
    a = stripes(513, 513, 2)
    truth = np.full((513, 513), 255, dtype=np.int64)
    truth[:100] = 2  # 'sky' only in the ground truth: it gets a legend entry
    names = ["bird", "water", "sky"]
    one = compare_figure([CompareRow(rgb, [("CLIP", a)])], names, height=64)
    two = compare_figure([CompareRow(rgb, [("CLIP", a)], truth), CompareRow(rgb, [("CLIP", a)])], names,
                         height=64)
    assert two.height > 2 * 64 and two.width > one.width  # a second row and a truth column
    flat = np.asarray(two).reshape(-1, 3)
    assert (flat == voc_palette()[2]).all(axis=1).any()
    with pytest.raises(ValueError, match="same methods"):
        compare_figure([CompareRow(rgb, [("CLIP", a)]), CompareRow(rgb, [("SCLIP", a)])], names)
    with pytest.raises(ValueError, match="no images"):
        compare_figure([], names)


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg", ".webp"])
def test_picture_bytes_are_reproducible(suffix):
    picture = Image.fromarray(photo()[:64, :64])
    assert picture_bytes(picture, suffix) == picture_bytes(picture, suffix)
    with pytest.raises(ValueError, match=r"cannot write '\.gif'"):
        picture_bytes(picture, ".gif")


def test_class_palette_keeps_black_for_background_only():
    from resclip.palettes import class_palette

    voc = voc_palette(256)
    assert class_palette(["person", "dog"])[:2].tolist() == voc[1:3].tolist()  # no black class
    names = ["background", "aeroplane", "bicycle"]
    np.testing.assert_array_equal(class_palette(names), voc_palette(256))  # VOC's own order: VOC colours
    table = class_palette(["cat", "Ignore", "sky, background", "dog"])
    assert table[:4].tolist() == [voc[1].tolist(), [0, 0, 0], [0, 0, 0], voc[2].tolist()]
    assert class_palette(["a"] * 300).shape == (300, 3) and class_palette(["a"]).shape == (256, 3)
    np.testing.assert_array_equal(class_palette(["cat"], "voc"), voc_palette(256))
    with pytest.raises(ValueError, match="unknown palette"):
        class_palette(["cat"], "rainbow")
