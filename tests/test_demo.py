"""The web demo's request handler as a plain function (no server), its page and its command."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CLI_FAST, DEMO_FAST
from resclip import demo, viz
from resclip.cli import main
from resclip.methods import get_method, list_methods
from resclip.palettes import class_palette

BIRD = Path(__file__).parent / "data" / "benchmarks" / "VOCdevkit" / "VOC2012" / "JPEGImages" / "crop_114.jpg"
FAST = DEMO_FAST


pytestmark = pytest.mark.usefixtures("text_cache_env")


def test_segment_image_returns_overlay_legend_and_status(settings):
    res = demo.segment_image(str(BIRD), "bird; water, lake; sky", "naclip", True, True, 0.5,
                             settings=settings)
    assert res.mask.shape == (513, 513)
    assert res.overlay.shape == (513, 513, 3) and res.overlay.dtype == np.uint8  # no legend baked in
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


def _blocks(app) -> dict:
    return {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}


# ------------------------------------------------------------------------------- issue 14: the page


def test_overlay_has_no_baked_legend_and_the_html_legend_is_shown_once(settings):
    res = demo.segment_image(str(BIRD), "bird; water, lake; sky", "naclip", True, True, 0.4,
                             settings=settings)
    rgb = np.asarray(Image.open(BIRD).convert("RGB"))
    colours = class_palette(["bird", "water", "sky"], "classes")
    np.testing.assert_array_equal(res.overlay, viz.overlay(rgb, res.mask, 0.4, colours))
    assert res.legend_html.count("<table") == 1
    gr = pytest.importorskip("gradio")
    blocks = _blocks(demo.build_app(settings))
    assert isinstance(blocks["legend"], gr.HTML)  # the legend is page text, below the picture


def test_example_photos_are_shipped_small_and_credited():
    assert demo.EXAMPLES_DIR.parent.parent == Path(demo.__file__).parent  # inside the package
    readme = (demo.EXAMPLES_DIR / "README.md").read_text()
    examples = demo.example_inputs()
    assert len(examples) == len(demo.EXAMPLES) >= 2
    for path, classes in examples:
        assert Path(path).stat().st_size <= 100_000
        with Image.open(path) as img:
            assert img.format == "JPEG" and max(img.size) <= 640
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{Path(path).name}`"))
        assert "CC0" in row or "public domain" in row  # free to redistribute in the wheel
        assert len(classes.split(";")) >= 2


def test_page_offers_the_examples(settings):
    gr = pytest.importorskip("gradio")
    blocks = _blocks(demo.build_app(settings))
    dataset = blocks["examples"]
    assert isinstance(dataset, gr.Dataset)
    names = [Path(sample[0]["path"] if isinstance(sample[0], dict) else sample[0]).name
             for sample in dataset.samples]
    assert names == [name for name, _ in demo.EXAMPLES]
    assert [sample[1] for sample in dataset.samples] == [classes for _, classes in demo.EXAMPLES]


def test_every_example_segments(settings):
    for path, classes in demo.example_inputs():
        res = demo.segment_image(path, classes, settings=settings)
        assert res.mask.shape == np.asarray(Image.open(path)).shape[:2]


def test_weights_notice(settings, tiny64):
    random_weights = demo.DemoSettings(pretrained=None, device="cpu")
    assert demo.weights_notice(random_weights) == demo.RANDOM_WEIGHTS_NOTICE  # no model loaded for that
    with pytest.warns(UserWarning, match="architecture"):
        custom = demo.DemoSettings(pretrained=str(tiny64), device="cpu", overrides=DEMO_FAST)
        assert demo.weights_notice(custom) == demo.CUSTOM_WEIGHTS_NOTICE
    assert demo.weights_notice(settings) is None  # the tiny test architecture is registered
    assert "RANDOM" in demo.RANDOM_WEIGHTS_NOTICE


def test_random_weights_banner_on_the_page(settings):
    pytest.importorskip("gradio")
    from resclip.demo_server import notice_html

    banner = _blocks(demo.build_app(demo.DemoSettings(pretrained=None, device="cpu")))["weights-notice"]
    assert "RANDOM weights" in banner.value and 'class="resclip-notice"' in banner.value
    assert "weights-notice" not in _blocks(demo.build_app(settings))  # a known architecture: no banner
    assert notice_html("<b>x</b>").count("&lt;b&gt;") == 1  # escaped


def test_sfr_box_follows_the_method(settings):
    pytest.importorskip("gradio")
    from resclip.demo_server import sfr_update

    assert {name for _, name in demo.method_choices()} == set(list_methods())  # every method, no fixed list
    assert ("NACLIP", "naclip") in demo.method_choices() and ("MaskCLIP", "maskclip") in demo.method_choices()
    for name in list_methods():
        update = sfr_update(name)
        assert update["interactive"] is get_method(name).has_scores
        if not get_method(name).has_scores:
            assert update["value"] is False
        else:
            assert "value" not in update  # the visitor's choice is kept
    sfr = _blocks(demo.build_app(demo.DemoSettings(pretrained=settings.pretrained, device="cpu",
                                                   overrides=DEMO_FAST, method="maskclip")))["sfr"]
    assert sfr.interactive is False and sfr.value is False
    assert _blocks(demo.build_app(settings))["sfr"].interactive is True


def test_downloads_are_what_resclip_segment_writes(settings, tiny_ckpt, tmp_path):
    classes = "bird; water, lake; sky"
    files = demo.SessionFiles(tmp_path / "cache")
    upload = tmp_path / "cache" / "up1" / "crop_114.jpg"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(BIRD.read_bytes())
    out, _, _, mask, record = demo.handle_request(
        files, "s1", {"path": str(upload)}, classes, "naclip", True, True, 0.5, "classes", settings=settings)
    assert Path(mask).name == "crop_114_mask.png" and Path(record).name == "crop_114.json"
    assert Path(out).name == "crop_114_overlay.png"
    assert Path(mask).parent == Path(record).parent == Path(out).parent  # one folder per request
    assert set(files.held("s1").values()) == {upload, Path(out), Path(mask), Path(record)}

    cli = tmp_path / "cli"
    assert main(["segment", str(upload), "--classes", classes, "--out", str(cli), "--pretrained",
                 str(tiny_ckpt), *CLI_FAST]) == 0
    assert Path(mask).read_bytes() == (cli / "crop_114_mask.png").read_bytes()
    ours, theirs = json.loads(Path(record).read_text()), json.loads((cli / "crop_114.json").read_text())
    assert ours["image"] == "crop_114.jpg"  # the upload's name, never its server path
    assert ours["settings"]["pretrained"] == tiny_ckpt.name
    assert str(tmp_path) not in Path(record).read_text()
    theirs["image"], theirs["settings"]["pretrained"] = ours["image"], ours["settings"]["pretrained"]
    assert ours == theirs
    assert Path(record).read_text() == demo.segment_image(str(upload), classes, settings=settings).json_text


def test_demo_command_share_flag(monkeypatch, capsys):
    pytest.importorskip("gradio")
    got = []
    monkeypatch.setattr(demo, "launch", lambda settings, host, port, share=False: got.append(share))
    assert main(["demo", "--pretrained", "none", "--share"]) == 0
    assert main(["demo", "--pretrained", "none"]) == 0
    assert got == [True, False]
    assert "public Gradio link" in capsys.readouterr().out


def test_demo_command_method_alias_is_a_page_choice(monkeypatch):
    pytest.importorskip("gradio")
    got = []
    monkeypatch.setattr(demo, "launch", lambda settings, host, port, share=False: got.append(settings))
    assert main(["demo", "--pretrained", "none", "--method", "resclip"]) == 0
    assert (got[0].method, got[0].rcs, got[0].sfr) == ("naclip", True, True)  # 'resclip' = naclip + RCS + SFR
    assert got[0].method in {name for _, name in demo.method_choices()}


def test_share_reaches_gradio_launch(settings, monkeypatch):
    gr = pytest.importorskip("gradio")
    seen: list = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: seen.append(kwargs))
    demo.launch(settings, share=True)
    demo.launch(settings)
    assert [kwargs["share"] for kwargs in seen] == [True, False]
    assert all(kwargs["server_name"] == "127.0.0.1" for kwargs in seen)  # the server itself stays local


VISITOR_ERRORS = [
    (None, "bird"), (str(BIRD), ""), (str(BIRD), "bird; ; water"), (str(BIRD), "bird; water, , lake"),
    (str(BIRD), "; ".join(f"thing {i}" for i in range(300))), (str(BIRD), "bird; caf\udcff"),
]


def test_errors_shown_to_visitors_name_no_command_line_flags(settings, tmp_path):
    small = demo.DemoSettings(pretrained=settings.pretrained, device="cpu", overrides=DEMO_FAST,
                              max_upload_mb=0.01, max_pixels=1000)
    files = demo.SessionFiles(tmp_path / "cache")
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    cases = [(s, image, classes, "naclip", True) for image, classes in VISITOR_ERRORS for s in (settings,)]
    cases += [(small, str(BIRD), "bird", "naclip", True), (settings, str(text), "bird", "naclip", True),
              (settings, str(tmp_path / "gone.jpg"), "bird", "naclip", True),
              (settings, str(BIRD), "bird", "maskclip", True),
              (settings, str(BIRD), "bird", "segformer", False)]
    messages = []
    for s, image, classes, method, sfr in cases:
        with pytest.raises(ValueError) as err:
            demo.handle_request(files, "s", {"path": image} if image else None, classes, method, True, sfr,
                                0.5, "classes", settings=s)
        messages.append(str(err.value))
    assert len(messages) == len(cases)
    assert [m for m in messages if "--" in m or "\n" in m] == []
    _, _, status, _, _ = demo.handle_request(files, "s", {"path": str(BIRD)}, "bird,water; bird,water",
                                             "naclip", True, True, 0.5, "classes", settings=settings)
    assert "warning:" in status and "--" not in status  # the class-list warnings shown with the result


def test_demo_source_has_no_flag_names_in_visitor_strings():
    """Every string in the demo's modules except docstrings: no ``--flag`` reaches a visitor."""
    for module in (demo, pytest.importorskip("resclip.demo_server")):
        tree = ast.parse(Path(module.__file__).read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert not re.search(r"--[a-z]", node.value), (module.__name__, node.value)


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


def test_method_fields_reach_their_method_only(tiny_ckpt):
    """A ``<method>_<field>`` setting (``--set naclip_gaussian_std=2.5``) reaches that method's
    segmenter; the shared base and the other methods load without it."""
    from resclip import demo

    fields = (*DEMO_FAST, ("naclip_gaussian_std", 2.5), ("proxyclip_beta", 1.0))
    settings = demo.DemoSettings(pretrained=str(tiny_ckpt), device="cpu", overrides=fields)
    naclip = demo.method_segmenter(settings, "naclip", True, True)
    sclip = demo.method_segmenter(settings, "sclip", True, False)
    assert naclip.engine.method.gaussian_std == 2.5
    assert naclip.config.method_fields == (("gaussian_std", 2.5),)
    assert sclip.config.method_fields == () and sclip.engine.visual is naclip.engine.visual
