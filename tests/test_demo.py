"""The web demo's request handler as a plain function (no server), its page and its command."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import DEMO_FAST
from resclip import demo
from resclip.cli import main

BIRD = Path(__file__).parent / "data" / "benchmarks" / "VOCdevkit" / "VOC2012" / "JPEGImages" / "crop_114.jpg"
FAST = DEMO_FAST


pytestmark = pytest.mark.usefixtures("text_cache_env")


def test_segment_image_returns_overlay_legend_and_status(settings):
    res = demo.segment_image(str(BIRD), "bird; water, lake; sky", "naclip", True, True, 0.5,
                             settings=settings)
    assert res.mask.shape == (513, 513)
    assert res.overlay.shape[0] == 513 and res.overlay.shape[1] > 513 and res.overlay.dtype == np.uint8
    present = set(np.unique(res.mask).tolist())
    assert [row["name"] for row in res.legend] == [["bird", "water", "sky"][i] for i in sorted(present)]
    assert sum(row["share"] for row in res.legend) == pytest.approx(1.0)
    assert all(row["color"].startswith("#") and len(row["color"]) == 7 for row in res.legend)
    for row in res.legend:
        assert row["name"] in res.legend_html and row["color"] in res.legend_html
    assert res.status.startswith("naclip + RCS + SFR, preset default, 513x513 px")


def test_segment_image_accepts_pil_and_arrays_and_every_method(settings):
    pil = Image.open(BIRD).convert("L").resize((80, 60))
    for method in ("clip", "maskclip", "sclip", "clearclip", "naclip"):
        res = demo.segment_image(pil, "bird; water", method, rcs=True, sfr=method != "maskclip",
                                 settings=settings)
        assert res.mask.shape == (60, 80)
    res = demo.segment_image(np.asarray(pil.convert("RGB")), "bird\nwater", "sclip", False, False,
                             settings=settings)
    assert res.status.startswith("sclip + no modules")


def test_model_loads_once_per_settings(settings, monkeypatch):
    import resclip.factory

    demo.load_base.cache_clear()
    calls = []
    real = resclip.factory.load_clip
    monkeypatch.setattr(resclip.factory, "load_clip", lambda *a, **k: calls.append(a) or real(*a, **k))
    for method, rcs, sfr in [("naclip", True, True), ("sclip", False, True), ("clip", True, False)]:
        demo.segment_image(str(BIRD), "bird; water", method, rcs, sfr, settings=settings)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("image", "classes", "method", "sfr", "message"),
    [
        (None, "bird", "naclip", True, "upload an image first"),
        (str(BIRD), "", "naclip", True, "classes is empty"),
        (str(BIRD), "bird; ; water", "naclip", True, "class 2 is empty"),
        (str(BIRD), "bird; water, , lake", "naclip", True, "class 2 = ' water, , lake' has an empty synonym"),
        (str(BIRD), "bird", "maskclip", True, "switch SFR off"),
        (str(BIRD), "bird", "segformer", False, "unknown method"),
    ],
    ids=["no-image", "no-classes", "empty-class", "empty-synonym", "maskclip-sfr", "bad-method"],
)
def test_segment_image_user_errors(settings, image, classes, method, sfr, message):
    with pytest.raises(ValueError, match=message):
        demo.segment_image(image, classes, method, True, sfr, settings=settings)


def test_segment_image_unreadable_upload(settings, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(BIRD.read_bytes()[:3000])
    with pytest.raises(ValueError, match="could not read image"):
        demo.segment_image(str(broken), "bird", settings=settings)


def test_class_lists():
    voc = demo.class_list("PASCAL VOC (21)").split("; ")
    assert len(voc) == 21 and voc[1] == "aeroplane"
    assert len(demo.class_list("ADE20K (150)").split("; ")) == 150


def test_build_app_without_launching(settings):
    gr = pytest.importorskip("gradio")
    app = demo.build_app(settings)
    assert isinstance(app, gr.Blocks)


def test_demo_command_without_gradio(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)
    rc = main(["demo", "--pretrained", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "resclip: error: the web demo needs Gradio: pip install 'resclip[demo]'"


def test_demo_command_missing_checkpoint(capsys, tmp_path):
    pytest.importorskip("gradio")
    rc = main(["demo", "--pretrained", str(tmp_path / "none" / "ViT-B-16.pt"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("resclip: error:")] == [
        line for line in err.splitlines() if "no such checkpoint file" in line
    ]
