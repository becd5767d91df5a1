"""`resclip segment`, `compare` and `attention` on real photos with a tiny random CLIP: the files
written, and a one-line error (exit 2, no traceback) for every kind of bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import resclip
import resclip.preprocess
from conftest import CLI_FAST
from resclip import viz
from resclip.cli import main
from resclip.palettes import class_palette, voc_palette

BENCH = Path(__file__).parent / "data" / "benchmarks"
VOC = BENCH / "VOCdevkit" / "VOC2012" / "JPEGImages"
ADE = BENCH / "ADEChallengeData2016" / "images" / "validation"
COCO = BENCH / "coco_stuff164k" / "images" / "val2017"
BIRD = VOC / "crop_114.jpg"  # 513 x 513
HOUSE = ADE / "ADE_val_00000001.jpg"  # 683 x 512
TALL = COCO / "000000007977.jpg"  # 429 x 640
CLASSES = "bird; water, lake; sky, clouds; background"
NAMES = ["bird", "water", "sky", "background"]
FAST = CLI_FAST


pytestmark = pytest.mark.usefixtures("text_cache_env")


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def one_error(rc: int, err: str, *fragments: str) -> str:
    """Exit 2 and exactly one ``resclip: error:`` line holding every fragment."""
    errors = [line for line in err.splitlines() if line.startswith("resclip: error:")]
    assert rc == 2, err
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def save_jpeg_part(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


# ---------------------------------------------------------------------------------------------- segment


def test_segment_writes_mask_overlay_and_json(tmp_path, capsys, model):
    out = tmp_path / "out"
    rc, stdout, _ = cli(capsys, "segment", BIRD, TALL, "--classes", CLASSES, "--out", out, *model)
    assert rc == 0
    assert "wrote 2 images" in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "000000007977.json", "000000007977_mask.png", "000000007977_overlay.png",
        "crop_114.json", "crop_114_mask.png", "crop_114_overlay.png",
    ]
    for photo in (BIRD, TALL):
        rgb = np.asarray(Image.open(photo).convert("RGB"))
        h, w = rgb.shape[:2]
        mask_img = Image.open(out / f"{photo.stem}_mask.png")
        assert mask_img.mode == "P" and mask_img.size == (w, h)
        palette = np.array(mask_img.getpalette()[: 3 * 256]).reshape(-1, 3)
        # the default "classes" palette: VOC colours 1, 2, 3 in order, black only for 'background'
        np.testing.assert_array_equal(palette[:4], [*voc_palette(4)[1:], [0, 0, 0]])
        np.testing.assert_array_equal(palette[4:], voc_palette()[4:])  # the rest as VOC
        mask = np.asarray(mask_img).astype(np.int64)
        assert mask.max() < 4

        record = json.loads((out / f"{photo.stem}.json").read_text(encoding="utf-8"))
        assert (record["width"], record["height"]) == (w, h)
        assert record["image"] == str(photo)
        assert record["mask"] == f"{photo.stem}_mask.png" and record["overlay"] == f"{photo.stem}_overlay.png"
        names = [c["name"] for c in record["classes"]]
        assert names == ["bird", "water", "sky", "background"]
        assert record["classes"][1]["synonyms"] == ["water", "lake"]
        assert [c["color"] for c in record["classes"]] == [*voc_palette(4)[1:].tolist(), [0, 0, 0]]
        counts = np.bincount(mask.ravel(), minlength=4)
        assert [c["pixels"] for c in record["classes"]] == counts.tolist()
        assert sum(c["share"] for c in record["classes"]) == pytest.approx(1.0, abs=1e-5)
        assert record["present"] == [record["classes"][i]["name"] for i in np.flatnonzero(counts)]
        settings = record["settings"]
        assert settings["method"] == "naclip" and settings["preset"] == "default"
        assert settings["rcs"]["layers"] == [1, 2] and settings["sfr"] is not None
        assert settings["protocol"]["short_side"] == 128
        assert record["resclip_version"] == resclip.__version__

        overlay = Image.open(out / f"{photo.stem}_overlay.png").convert("RGB")
        assert overlay.width > w and overlay.height >= h  # image at its size, legend strip to the right
        picture = np.asarray(overlay)
        np.testing.assert_array_equal(picture[:h, :w], viz.overlay(rgb, mask, 0.5, class_palette(names)))
        legend = picture[:, w:].reshape(-1, 3)
        for entry in record["classes"]:  # a swatch for each class present, none for the others
            has_swatch = (legend == entry["color"]).all(axis=1).sum() >= 25
            assert has_swatch == (entry["pixels"] > 0), entry["name"]


def test_segment_default_preset_sliding_windows(tmp_path, capsys, tiny_ckpt):
    """The everyday default: naclip + RCS + SFR, 'default' preset (224-px windows, PAMR'd SFR labels)."""
    rc, _, _ = cli(capsys, "segment", HOUSE, "--classes", "house, building; sky; grass; tree",
                   "--out", tmp_path, "--pretrained", tiny_ckpt, "--device", "cpu",
                   "--set", "rcs_layers=(1,2)")
    assert rc == 0
    record = json.loads((tmp_path / "ADE_val_00000001.json").read_text())
    assert record["settings"]["protocol"]["slide_crop"] == 224
    assert record["settings"]["sfr"]["first_pass_pamr_steps"] == 10
    assert Image.open(tmp_path / "ADE_val_00000001_mask.png").size == (683, 512)


def test_segment_folder_and_glob_inputs_sorted_without_repeats(tmp_path, capsys, model):
    out = tmp_path / "out"
    rc, stdout, _ = cli(capsys, "segment", ADE, str(ADE / "*_00000002.jpg"), ADE / "ADE_val_00000003.jpg",
                        "--classes", "house; sky", "--out", out, "--quiet", *model)
    assert rc == 0 and stdout == ""
    assert sorted(p.name for p in out.glob("*.json")) == [f"ADE_val_0000000{i}.json" for i in (1, 2, 3)]


def test_segment_is_deterministic_and_refuses_to_overwrite(tmp_path, capsys, model):
    out = tmp_path / "out"
    args = ["segment", BIRD, "--classes", CLASSES, "--out", out, *model]
    assert cli(capsys, *args)[0] == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, stdout, _ = cli(capsys, *args)  # same settings: the finished image is skipped (resume)
    assert rc == 0 and "skipped 1 image" in stdout
    rc, _, err = cli(capsys, "segment", BIRD, "--classes", "bird; background", "--out", out, *model)
    one_error(rc, err, "crop_114.json", "exists", "classes", "--overwrite")
    (out / "crop_114_overlay.png").unlink()  # not a finished image: its other files are refused
    rc, _, err = cli(capsys, *args)
    one_error(rc, err, "crop_114_mask.png", "exists", "--overwrite")
    (out / "crop_114_overlay.png").write_bytes(first["crop_114_overlay.png"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert cli(capsys, *args, "--overwrite")[0] == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def test_segment_duplicate_stems_are_an_error(tmp_path, capsys, model):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "photo.jpg").write_bytes(BIRD.read_bytes())
    rc, _, err = cli(capsys, "segment", tmp_path / "a", tmp_path / "b", "--classes", CLASSES,
                     "--out", tmp_path / "out", *model)
    one_error(rc, err, "photo_mask.png", str(tmp_path / "a" / "photo.jpg"), str(tmp_path / "b" / "photo.jpg"))
    assert not (tmp_path / "out").exists()


def test_segment_converts_image_modes(tmp_path, capsys, model):
    """16-bit, CMYK, RGBA, palette and grayscale images are converted to RGB and segmented."""
    src = Image.open(BIRD).convert("RGB").resize((96, 64))
    folder = tmp_path / "modes"
    folder.mkdir()
    gray16 = (np.asarray(src.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")
    assert Image.open(folder / "gray16.png").mode.startswith("I")
    src.convert("CMYK").save(folder / "cmyk.jpg")
    rgba = src.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    src.convert("P").save(folder / "palette.png")
    src.convert("L").save(folder / "gray.png")
    rc, _, err = cli(capsys, "segment", folder, "--classes", CLASSES, "--out", tmp_path / "out", *model)
    assert rc == 0, err
    for name in ("gray16", "cmyk", "rgba", "palette", "gray"):
        assert Image.open(tmp_path / "out" / f"{name}_mask.png").size == (96, 64)


def test_segment_honours_exif_orientation(tmp_path, capsys, model):
    img = Image.open(HOUSE)  # 683 x 512 as stored
    exif = img.getexif()
    exif[0x0112] = 6  # viewers rotate it 90 degrees clockwise: 512 x 683
    rotated = tmp_path / "rotated.jpg"
    img.save(rotated, exif=exif.tobytes(), quality=95)
    rc, _, _ = cli(capsys, "segment", rotated, "--classes", CLASSES, "--out", tmp_path / "out", *model)
    assert rc == 0
    mask = np.asarray(Image.open(tmp_path / "out" / "rotated_mask.png")).astype(np.int64)
    assert mask.shape == (683, 512)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(rotated)).convert("RGB"))
    overlay = np.asarray(Image.open(tmp_path / "out" / "rotated_overlay.png").convert("RGB"))
    np.testing.assert_array_equal(overlay[:683, :512], viz.overlay(upright, mask, 0.5, class_palette(NAMES)))


def test_segment_image_smaller_than_a_patch(tmp_path, capsys, model):
    Image.open(BIRD).resize((5, 4)).save(tmp_path / "tiny.png")
    rc, _, _ = cli(capsys, "segment", tmp_path / "tiny.png", "--classes", CLASSES, "--out", tmp_path / "o",
                   *model)
    assert rc == 0
    assert Image.open(tmp_path / "o" / "tiny_mask.png").size == (5, 4)


def test_segment_large_image_keeps_its_size(tmp_path, capsys, model):
    big = tmp_path / "big.jpg"
    Image.open(HOUSE).resize((2400, 1800)).save(big)
    rc, _, _ = cli(capsys, "segment", big, "--classes", CLASSES, "--out", tmp_path / "o", *model)
    assert rc == 0
    assert Image.open(tmp_path / "o" / "big_mask.png").size == (2400, 1800)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_segment_bad_image_among_several_keeps_the_others(tmp_path, capsys, model, workers):
    broken = save_jpeg_part(BIRD, tmp_path / "broken.jpg", 0.5)
    rc, _, err = cli(capsys, "segment", TALL, broken, HOUSE, "--classes", CLASSES, "--out", tmp_path / "out",
                     "--workers", workers, *model)
    assert rc == 2
    errors = [line for line in err.splitlines() if line.startswith("resclip: error:")]
    assert len(errors) == 2, err
    assert "broken.jpg" in errors[0] and "could not read image" in errors[0] and "skipped" in errors[0]
    assert "1 of 3 images failed" in errors[1]
    assert (tmp_path / "out" / f"{TALL.stem}_mask.png").is_file()
    assert (tmp_path / "out" / f"{HOUSE.stem}.json").is_file()
    assert not (tmp_path / "out" / "broken_mask.png").exists()


def test_segment_rle_probabilities_and_unknown(tmp_path, capsys, model):
    from resclip.results import rle_area, rle_decode

    out = tmp_path / "o"
    rc, _, err = cli(capsys, "segment", BIRD, "--classes", CLASSES, "--out", out, "--format", "rle",
                     "--save-probs", *model)
    assert rc == 0, err
    record = json.loads((out / "crop_114.json").read_text())
    mask = np.asarray(Image.open(out / "crop_114_mask.png")).astype(np.int64)
    for index, entry in enumerate(record["classes"]):
        np.testing.assert_array_equal(rle_decode(entry["rle"]), mask == index)
        assert rle_area(entry["rle"]) == entry["pixels"]
    assert record["probs"] == "crop_114_probs.npz"
    assert record["output"] == {"alpha": 0.5, "palette": "classes", "format": "rle", "unknown_below": None,
                                "save_probs": True}
    probs = np.load(out / "crop_114_probs.npz")
    assert probs["names"].tolist() == NAMES and probs["probs"].shape == (4, *mask.shape)
    np.testing.assert_allclose(probs["probs"].astype(np.float32).sum(0), 1.0, atol=3e-3)
    assert (probs["probs"].argmax(0) == mask).mean() > 0.999  # float16 ties aside, the mask's classes

    # unknown: pixels whose class probability is below the threshold get label 4, "unknown", black
    top = probs["probs"].astype(np.float32).max(0)
    thd = float(np.quantile(top, 0.3))
    rc, _, err = cli(capsys, "segment", BIRD, "--classes", CLASSES, "--out", tmp_path / "u", "--unknown",
                     str(thd), *model)
    assert rc == 0, err
    record = json.loads((tmp_path / "u" / "crop_114.json").read_text())
    assert [c["name"] for c in record["classes"]] == [*NAMES, "unknown"]
    assert record["classes"][-1]["color"] == [0, 0, 0]
    low = top < thd
    unknown = np.asarray(Image.open(tmp_path / "u" / "crop_114_mask.png")) == 4
    assert 0.2 < unknown.mean() < 0.4 and (unknown & low).sum() > 0.9 * low.sum()  # float16 copy: ~equal
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "u" / "crop_114_mask.png"))[~unknown],
                                  mask[~unknown])
    rc, _, err = cli(capsys, "segment", BIRD, "--classes", CLASSES, "--out", tmp_path / "v",
                     "--unknown", "1.5", *model)
    one_error(rc, err, "--unknown must be in (0, 1]")


def test_segment_workers_write_the_same_bytes(tmp_path, capsys, model):
    """Background decoding and writing change nothing in the outputs."""
    outs = {}
    for workers in ("0", "1", "3"):
        out = tmp_path / workers
        rc, _, err = cli(capsys, "segment", BIRD, TALL, HOUSE, "--classes", CLASSES, "--out", out,
                         "--workers", workers, "--quiet", *model)
        assert rc == 0, err
        outs[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert len(outs["0"]) == 9 and outs["0"] == outs["1"] == outs["3"]
    rc, _, err = cli(capsys, "segment", BIRD, "--classes", CLASSES, "--out", tmp_path / "x",
                     "--workers", "-1", *model)
    one_error(rc, err, "--workers must be >= 0")


@pytest.mark.parametrize("kind", ["truncated", "not-an-image", "empty-file"])
def test_segment_unreadable_image(tmp_path, capsys, model, kind):
    path = tmp_path / "photo.jpg"
    if kind == "truncated":
        save_jpeg_part(BIRD, path, 0.6)
    elif kind == "not-an-image":
        path.write_text("hello, I am not a JPEG")
    else:
        path.write_bytes(b"")
    rc, _, err = cli(capsys, "segment", path, "--classes", CLASSES, "--out", tmp_path / "out", *model)
    one_error(rc, err, "photo.jpg", "could not read image")
    assert not (tmp_path / "out" / "photo_mask.png").exists()


def test_segment_missing_image(tmp_path, capsys, model):
    rc, _, err = cli(capsys, "segment", tmp_path / "nope.jpg", "--classes", CLASSES, "--out", tmp_path,
                     *model)
    one_error(rc, err, "image not found", "nope.jpg")


def test_segment_empty_folder_and_unmatched_glob(tmp_path, capsys, model):
    rc, _, err = cli(capsys, "segment", tmp_path, "--classes", CLASSES, "--out", tmp_path / "o", *model)
    one_error(rc, err, "holds no images")
    rc, _, err = cli(capsys, "segment", str(tmp_path / "*.jpg"), "--classes", CLASSES, "--out", tmp_path,
                     *model)
    one_error(rc, err, "no images match")


def test_segment_too_thin_image(tmp_path, capsys, model):
    Image.new("RGB", (900, 1), (120, 30, 30)).save(tmp_path / "line.png")
    rc, _, err = cli(capsys, "segment", tmp_path / "line.png", "--classes", CLASSES, "--out", tmp_path / "o",
                     *model)
    one_error(rc, err, "line.png", "900x1", "too thin")


def test_segment_decompression_bomb(tmp_path, capsys, model, monkeypatch):
    monkeypatch.setattr(resclip.preprocess, "MAX_PIXELS", 1000)
    rc, _, err = cli(capsys, "segment", BIRD, "--classes", CLASSES, "--out", tmp_path / "o", *model)
    one_error(rc, err, "crop_114.jpg", "too large to open safely")


@pytest.mark.parametrize(
    ("classes", "fragments"),
    [
        ("", ["classes is empty"]),
        ("  ; cat", ["class 1 is empty"]),
        ("cat;;sofa", ["class 2 is empty"]),
        ("cat; sofa, , couch", ["class 2", "empty synonym"]),
    ],
    ids=["empty", "blank", "empty-class", "empty-synonym"],
)
def test_segment_bad_class_names(tmp_path, capsys, model, classes, fragments):
    rc, _, err = cli(capsys, "segment", BIRD, "--classes", classes, "--out", tmp_path / "o", *model)
    one_error(rc, err, *fragments)
    assert not (tmp_path / "o").exists()


def test_segment_class_file(tmp_path, capsys, model):
    good = tmp_path / "classes.txt"
    good.write_bytes("\ufeffbird\r\nwater, lake\r\ncafé\r\n\r\n".encode())
    rc, _, _ = cli(capsys, "segment", BIRD, "--class-file", good, "--out", tmp_path / "o", *model)
    assert rc == 0
    names = [c["name"] for c in json.loads((tmp_path / "o" / "crop_114.json").read_text("utf-8"))["classes"]]
    assert names == ["bird", "water", "café"]

    latin = tmp_path / "latin1.txt"
    latin.write_bytes("bird\ncafé\n".encode("latin-1"))
    rc, _, err = cli(capsys, "segment", BIRD, "--class-file", latin, "--out", tmp_path / "p", *model)
    one_error(rc, err, "latin1.txt", "not valid UTF-8")

    rc, _, err = cli(capsys, "segment", BIRD, "--class-file", tmp_path / "none.txt", "--out", tmp_path,
                     *model)
    one_error(rc, err, "class file not found", "none.txt")

    empty = tmp_path / "empty-line.txt"
    empty.write_text("bird\n\nwater\n")
    rc, _, err = cli(capsys, "segment", BIRD, "--class-file", empty, "--out", tmp_path / "q", *model)
    one_error(rc, err, f"class file {str(empty)!r} line 2 is empty")


def test_segment_missing_checkpoint(tmp_path, capsys):
    rc, _, err = cli(capsys, "segment", BIRD, "--classes", CLASSES, "--out", tmp_path / "o",
                     "--pretrained", tmp_path / "missing" / "ViT-B-16.pt", "--device", "cpu")
    one_error(rc, err, "no such checkpoint file", "ViT-B-16.pt")
    assert not (tmp_path / "o").exists()


def test_segment_bad_options(tmp_path, capsys, model):
    (tmp_path / "file").write_text("x")
    rc, _, err = cli(capsys, "segment", BIRD, "--classes", CLASSES, "--out", tmp_path / "file", *model)
    one_error(rc, err, "is a file")
    args = ["segment", BIRD, "--classes", CLASSES, "--out", tmp_path]
    rc, _, err = cli(capsys, *args, "--alpha", "1.5", *model)
    one_error(rc, err, "--alpha")
    rc, _, err = cli(capsys, *args, "--set", "nope=1", *model)
    one_error(rc, err, "nope", "unknown setting")


def test_segment_distinct_palette_and_alpha(tmp_path, capsys, model):
    rc, _, _ = cli(capsys, "segment", BIRD, "--classes", CLASSES, "--out", tmp_path, "--palette", "distinct",
                   "--alpha", "1", *model)
    assert rc == 0
    record = json.loads((tmp_path / "crop_114.json").read_text())
    mask = np.asarray(Image.open(tmp_path / "crop_114_mask.png")).astype(np.int64)
    overlay = np.asarray(Image.open(tmp_path / "crop_114_overlay.png").convert("RGB"))[:513, :513]
    colours = np.array([c["color"] for c in record["classes"]], dtype=np.uint8)
    np.testing.assert_array_equal(overlay, colours[mask])
    assert record["output"] == {"alpha": 1.0, "palette": "distinct", "format": "png", "unknown_below": None,
                                "save_probs": False}


# ---------------------------------------------------------------------------------------------- compare


def test_compare_loads_the_model_once(tmp_path, capsys, model, monkeypatch):
    import resclip.factory

    calls = []
    real = resclip.factory.load_clip
    monkeypatch.setattr(resclip.factory, "load_clip", lambda *a, **k: calls.append(a) or real(*a, **k))
    fig = tmp_path / "figs" / "compare.png"
    rc, stdout, _ = cli(capsys, "compare", BIRD, "--classes", CLASSES, "--methods",
                        "clip,maskclip,sclip+rcs,naclip,resclip", "--out", fig, "--height", "128", *model)
    assert rc == 0 and str(fig) in stdout
    assert len(calls) == 1
    picture = Image.open(fig)
    assert picture.height >= 128 and picture.width >= 6 * 128  # image + five square panels
    rc, _, err = cli(capsys, "compare", BIRD, "--classes", CLASSES, "--out", fig, *model)
    one_error(rc, err, "exists", "--overwrite")


@pytest.mark.parametrize(
    ("methods", "fragments"),
    [("clip,segformer", ["unknown method 'segformer'"]), ("maskclip+sfr", ["maskclip", "drop +sfr"]),
     ("naclip+pamr", ["+rcs and/or +sfr"]), ("clip,clip", ["clip more than once"]), (" , ", ["empty"])],
)
def test_compare_bad_methods(tmp_path, capsys, model, methods, fragments):
    rc, _, err = cli(capsys, "compare", BIRD, "--classes", CLASSES, "--methods", methods,
                     "--out", tmp_path / "f.png", *model)
    one_error(rc, err, *fragments)


def test_compare_several_images_with_truth_as_pdf_and_svg(tmp_path, capsys, model):
    truth = tmp_path / "bird_gt.png"
    gt = np.zeros((513, 513), np.uint8)
    gt[:200] = 2
    gt[500:] = 255
    Image.fromarray(gt, mode="L").save(truth)
    other = tmp_path / "bird2.png"
    Image.open(BIRD).save(other)
    args = [BIRD, other, "--classes", CLASSES, "--methods", "clip,sclip+rcs,resclip", "--truth", truth,
            "--truth", truth, "--height", "64", *model]
    rc, _, err = cli(capsys, "compare", *args, "--out", tmp_path / "f.png")
    assert rc == 0, err
    with Image.open(tmp_path / "f.png") as picture:
        grid = np.asarray(picture.convert("RGB"))
    assert grid.shape[0] >= 2 * 64 and grid.shape[1] >= 5 * 64  # 2 rows: image, truth, 3 methods
    rc, _, err = cli(capsys, "compare", *args, "--out", tmp_path / "f.pdf")
    assert rc == 0, err
    pdf = (tmp_path / "f.pdf").read_bytes()
    assert pdf.startswith(b"%PDF")
    rc, _, err = cli(capsys, "compare", *args, "--out", tmp_path / "f.pdf", "--overwrite")
    assert rc == 0 and (tmp_path / "f.pdf").read_bytes() == pdf  # no creation date: same bytes
    rc, _, err = cli(capsys, "compare", *args, "--out", tmp_path / "f.svg")
    assert rc == 0 and (tmp_path / "f.svg").read_text().startswith("<svg")
    rc, _, err = cli(capsys, "compare", BIRD, other, "--truth", truth, "--classes", CLASSES,
                     "--out", tmp_path / "g.png", *model)
    one_error(rc, err, "1 --truth masks for 2 images")
    small = tmp_path / "small.png"
    Image.fromarray(gt[:10, :10], mode="L").save(small)
    rc, _, err = cli(capsys, "compare", BIRD, "--truth", small, "--classes", CLASSES,
                     "--out", tmp_path / "g.png", *model)
    one_error(rc, err, "is 10x10, its image 513x513")


def test_compare_titles_follow_the_papers():
    from resclip.figures import parse_variants

    titles = [v.title for v in parse_variants("clip,sclip+rcs,clearclip+rcs+sfr,resclip,naclip+sfr,sc_clip")]
    assert titles == ["CLIP", "SCLIP + RCS", "ClearCLIP + RCS + SFR", "ResCLIP", "NACLIP + SFR", "SC-CLIP"]


def test_compare_bad_image_and_extension(tmp_path, capsys, model):
    broken = save_jpeg_part(BIRD, tmp_path / "broken.jpg", 0.5)
    rc, _, err = cli(capsys, "compare", broken, "--classes", CLASSES, "--out", tmp_path / "f.png", *model)
    one_error(rc, err, "could not read image")
    rc, _, err = cli(capsys, "compare", BIRD, "--classes", CLASSES, "--out", tmp_path / "f.txt", *model)
    one_error(rc, err, "extensions")


# -------------------------------------------------------------------------------------------- attention


def test_attention_figure(tmp_path, capsys, model):
    pytest.importorskip("matplotlib")
    fig = tmp_path / "attention.png"
    rc, _, err = cli(capsys, "attention", TALL, "--point", "200,300", "--layers", "1,2,4",
                     "--methods", "clip,naclip+rcs,resclip", "--classes", CLASSES, "--size", "128",
                     "--out", fig, *model)
    assert rc == 0, err
    assert Image.open(fig).format == "PNG"
    assert "note" not in err


def test_attention_without_classes_shows_sfr_methods_with_rcs_only(tmp_path, capsys, model):
    pytest.importorskip("matplotlib")
    rc, _, err = cli(capsys, "attention", BIRD, "--point", "10,10", "--size", "96",
                     "--out", tmp_path / "a.svg", *model)
    assert rc == 0
    assert "no --classes given" in err
    svg = (tmp_path / "a.svg").read_text()
    assert "NACLIP + RCS" in svg and "ResCLIP" not in svg  # the panel says what was computed
    assert "attention (per panel)" in svg  # the colour bar


def test_attention_maps_follow_the_point(tiny_ckpt):
    """MaskCLIP's identity attention puts all of the source patch's weight on itself."""
    from resclip.figures import Variant, attention_maps

    seg = resclip.create_segmenter(pretrained=str(tiny_ckpt), sfr=False, rcs_layers=(1, 2), text_cache=False)
    rgb = np.asarray(Image.open(TALL).convert("RGB"))  # 429 x 640 -> 128 x 191 at --size 128
    maps = attention_maps(seg, rgb, (300.0, 100.0), [1, 3], [Variant("maskclip", "maskclip", False, False),
                                                            Variant("naclip+rcs", "naclip", True, False)],
                          short_side=128)
    assert maps.image.shape == (176, 128, 3)  # 11 x 8 patches of 16 px
    assert maps.patch == (100 * 191 // 640 // 16, 300 * 128 // 429 // 16)
    assert [t for t, _ in maps.layers] == ["layer 1 (q-k)", "layer 3 (q-k)"]
    for _, heat in maps.layers + maps.methods:
        assert heat.shape == (11, 8) and heat.min() >= 0 and heat.sum() <= 2.0 + 1e-4  # RCS tau = 2
    identity = maps.methods[0][1]
    assert identity[maps.patch] == pytest.approx(1.0) and identity.sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [(["--point", "900,10"], ["outside the 513x513 image"]), (["--point", "ten,10"], ["--point expects X,Y"]),
     (["--point", "5,5", "--layers", "0,9"], ["block numbers must lie in 1..4"]),
     (["--point", "5,5", "--methods", "resclip+rcs"], ["+rcs and/or +sfr"])],
)
def test_attention_bad_input(tmp_path, capsys, model, extra, fragments):
    pytest.importorskip("matplotlib")
    rc, _, err = cli(capsys, "attention", BIRD, *extra, "--out", tmp_path / "a.png", *model)
    one_error(rc, err, *fragments)


def test_attention_without_matplotlib(tmp_path, capsys, model, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc, _, err = cli(capsys, "attention", BIRD, "--point", "5,5", "--out", tmp_path / "a.png", *model)
    one_error(rc, err, "pip install 'resclip[viz]'")


# ---------------------------------------------------------------------------------------------- --regions
def test_segment_with_instance_maps_from_a_folder(tmp_path, capsys, golden_ckpt_b16):
    """`segment --method corrclip --regions DIR`: each image's own map reaches predict() (masks equal
    predict(regions=map)), no SAM 2 is needed; a missing map is one error before any model loads."""
    aux = Path(__file__).parent / "data" / "golden" / "aux" / "dino_vitb16_tiny_fp16.pth"
    rng = np.random.default_rng(3)
    images, maps = [], {}
    for name in ("a", "b"):
        rgb = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(tmp_path / f"{name}.png")
        m = np.zeros((48, 64), np.uint16)
        m[:, 20 if name == "a" else 40:] = 1  # two different partitions
        m[30:, :] = 2
        Image.fromarray(m).save(tmp_path / f"{name}_map.png")  # a 16-bit PNG map
        (tmp_path / "maps").mkdir(exist_ok=True)
        (tmp_path / f"{name}_map.png").rename(tmp_path / "maps" / f"{name}.png")
        images.append(tmp_path / f"{name}.png")
        maps[name] = m.astype(np.int64)
    argv = ["segment", *images, "--out", tmp_path / "out", "--classes", "cat; dog; sky", "--method",
            "corrclip", "--preset", "corrclip/voc21", "--pretrained", golden_ckpt_b16, "--aux-pretrained",
            f"dino={aux}", "--set", "short_side=64", "--no-rcs", "--no-sfr", "--device", "cpu", "--regions",
            tmp_path / "maps"]
    rc, out, err = cli(capsys, *argv)
    assert rc == 0 and "wrote 2 images" in out, err
    with pytest.warns(UserWarning, match="custom ViT"):
        seg = resclip.create_segmenter("corrclip", preset="corrclip/voc21", pretrained=str(golden_ckpt_b16),
                                       aux_pretrained={"dino": str(aux)}, short_side=64, rcs=False, sfr=False,
                                       corrclip_masks="given", text_cache=False, device="cpu")
    for name, m in maps.items():
        want = seg.predict(np.asarray(Image.open(tmp_path / f"{name}.png")), "cat; dog; sky", regions=m).mask
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / f"{name}_mask.png")), want)
        record = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert record["regions"].split()[0] == f"{name}.png" and len(record["regions"].split()[1]) == 64
    rc, out, err = cli(capsys, *argv)  # the same maps: done already
    assert rc == 0 and "skipped 2 images already segmented" in out
    changed = maps["a"].copy()
    changed[:, :5] = 9
    Image.fromarray(changed.astype(np.uint16)).save(tmp_path / "maps" / "a.png")
    rc, out, err = cli(capsys, *argv)  # a changed map is not taken for done
    one_error(rc, err, "a.json' exists with other regions; pass --overwrite")
    Image.fromarray(maps["a"].astype(np.uint16)).save(tmp_path / "maps" / "a.png")
    # the same settings without --regions: outputs made with the maps are not taken for done either
    rc, out, err = cli(capsys, *argv[:-2], "--set", "corrclip_masks=given")
    one_error(rc, err, "a.json' exists with other regions; pass --overwrite")
    (tmp_path / "maps" / "b.png").unlink()
    no_model = [a if a != golden_ckpt_b16 else "/nonexistent.pt" for a in argv]  # fails before loading
    rc, out, err = cli(capsys, *no_model, "--overwrite")
    one_error(rc, err, f"1 of 2 images have no instance map in {str(tmp_path / 'maps')!r} (first: 'b'")
