"""Presets encode the released per-dataset settings (reference protocol, section 4.2)."""

from __future__ import annotations

import pytest

from resclip.factory import apply_overrides, valid_overrides
from resclip.presets import DATASETS, get_preset, list_presets, to_fidelity

# dataset: short side, slide crop, prob_thd, temp_thd, (tau_rcs, lam_rcs), (tau_sfr, lam_sfr)
RELEASED = {
    "voc21": (336, 0, 0.1, 0.50, (2.0, 0.3), (2.2, 0.7)),
    "context60": (336, 224, 0.1, 0.30, (2.0, 0.3), (1.8, 0.7)),
    "coco_object": (336, 224, 0.1, 0.11, (2.0, 0.4), (1.8, 0.7)),
    "voc20": (336, 0, 0.0, 0.10, (2.0, 0.6), (2.1, 0.6)),
    "cityscapes": (560, 224, 0.0, 0.10, (2.0, 0.2), (2.1, 0.6)),
    "context59": (336, 224, 0.0, 0.25, (2.0, 0.4), (1.8, 0.7)),
    "ade20k": (336, 224, 0.0, 0.25, (2.0, 0.3), (2.1, 0.7)),
    "coco_stuff": (336, 224, 0.0, 0.11, (2.0, 0.4), (1.8, 0.7)),
}


@pytest.mark.parametrize("ds", DATASETS)
def test_released_settings(ds):
    short, crop, prob, temp, rcs, sfr = RELEASED[ds]
    p = get_preset(ds)
    alias = get_preset(f"resclip/{ds}")
    assert (alias.protocol, alias.rcs, alias.sfr) == (p.protocol, p.rcs, p.sfr) and p.dataset == ds
    assert (p.protocol.short_side, p.protocol.slide_crop, p.protocol.prob_thd) == (short, crop, prob)
    assert (p.protocol.logit_scale, p.protocol.pamr_steps, p.protocol.area_thd) == (40.0, 0, None)
    assert p.sfr.confidence_thd == temp and (p.rcs.tau, p.rcs.lam) == rcs and (p.sfr.tau, p.sfr.lam) == sfr
    assert p.rcs.layers == (6, 7, 8, 9)
    assert p.sfr.first_pass_pamr_steps == 10 and p.sfr.label_level == "query" and p.sfr.path == "line"
    assert p.sfr.fp16_scores and p.sfr.bias_after_mix and p.fidelity == "official"


def test_baseline_repository_protocols():
    s = get_preset("sclip/voc21").protocol
    assert (s.logit_scale, s.prob_thd, s.area_thd, s.slide_crop) == (65.0, 0.1, 0.1, 224)
    assert get_preset("sclip/coco_stuff").protocol.short_side == 448
    assert get_preset("sclip/context60").protocol.logit_scale == 50.0
    n = get_preset("naclip/voc21").protocol
    assert (n.pamr_steps, n.slide_crop, n.prob_thd) == (10, 0, 0.1)
    c = get_preset("clearclip/voc21").protocol
    assert (c.short_side, c.slide_crop, c.slide_stride, c.logit_scale, c.prob_thd) == (
        448,
        448,
        224,
        50.0,
        0.5,
    )
    city = get_preset("clearclip/cityscapes").protocol
    assert (city.short_side, city.slide_crop, city.slide_stride) == (448, 224, 224)


def test_paper_presets_and_fidelity_switch():
    p = get_preset("paper/voc21")
    assert p.fidelity == "paper" and p.protocol.slide_crop == 224
    assert (p.rcs.lam, p.rcs.tau, p.sfr.lam, p.sfr.tau) == (0.5, 1.0, 0.7, 1.0)
    assert p.sfr.path == "connected" and p.sfr.label_level == "class" and p.sfr.first_pass_pamr_steps == 0
    assert not p.sfr.fp16_scores and not p.sfr.normalise
    official = to_fidelity(get_preset("voc20"), "paper")
    assert official.protocol == get_preset("voc20").protocol and official.sfr.lam == 0.6
    back = to_fidelity(official, "official")
    assert back.sfr == get_preset("voc20").sfr and back.rcs == get_preset("voc20").rcs


def test_list_and_unknown():
    names = list_presets()
    assert "default" in names and "voc21" in names and "clearclip/ade20k" in names
    assert len(names) == 14 * 8 + 1  # 14 families of the eight datasets, and default
    assert "pearl/cityscapes" in names and "cliper/coco_stuff" in names and "cliper_l14/ade20k" in names
    with pytest.raises(ValueError, match="unknown preset 'voc22'; valid: 'default', a dataset"):
        get_preset("voc22")
    with pytest.raises(ValueError, match="pearl, cliper, cliper_l14, proxyclip, trident, corrclip"):
        get_preset("pearl/voc22")


def test_pearl_presets_carry_tlp_and_the_method_setting():
    p = get_preset("pearl/cityscapes")
    assert p.protocol.tlp is not None and p.protocol.tlp.grid == 224 and p.protocol.short_side == 560
    assert p.method_settings("pearl") == {"alpha_kk": 0.3} and p.method_settings("naclip") == {}
    assert get_preset("pearl/voc21").protocol.slide_crop == 0 and get_preset("voc21").protocol.tlp is None
    paper = to_fidelity(p, "paper")
    assert paper.protocol.tlp is not None and paper.protocol.tlp.coupling == "matrix"
    assert to_fidelity(get_preset("voc21"), "paper").protocol.tlp is None


def test_overrides():
    p = apply_overrides(
        get_preset("voc21"),
        {"prob_thd": 0.3, "lambda_rcs": 0.5, "temp_thd": 0.2, "rcs_layers": [1, 2], "sfr_path": "connected"},
    )
    assert p.protocol.prob_thd == 0.3 and p.rcs.lam == 0.5 and p.rcs.layers == (1, 2)
    assert p.sfr.confidence_thd == 0.2 and p.sfr.path == "connected"
    with pytest.raises(TypeError, match=r"unknown setting 'prob_threshold'; valid settings: .*prob_thd"):
        apply_overrides(get_preset("voc21"), {"prob_threshold": 0.3})
    with pytest.raises(ValueError, match="prob_thd must be in"):
        apply_overrides(get_preset("voc21"), {"prob_thd": 2})
    assert "slide_crop" in valid_overrides() and "lambda_sfr" in valid_overrides()


def test_list_presets_verbose_shows_every_setting(capsys):
    from resclip.cli import main

    assert main(["list", "presets", "--verbose"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("pearl/ade20k:"):out.index("pearl/cityscapes:")]
    assert "short_side=336" in block and "slide_crop=224" in block and "pearl: alpha_kk=0.3" in block
    assert "tlp: grid=80" in block and "fidelity=official" in block
    pipelines = sum(name.split("/")[0] in ("cliper", "cliper_l14") for name in list_presets())
    assert out.count("\n    protocol: ") == len(list_presets()) - pipelines == 97
    assert out.count("\n    cliper pipeline: ") == pipelines == 16


def test_cliper_presets_hold_the_release_configs():
    v21, v20, city = get_preset("cliper/voc21").protocol.cliper, get_preset("cliper/voc20").protocol.cliper, \
        get_preset("cliper/cityscapes").protocol.cliper
    assert v21 is not None and v20 is not None and city is not None
    assert (v21.slide_crop, v21.logit_scale, v21.score_thr, v21.bkg_thr, v21.normalise, v21.background) == (
        336, 100.0, 0.7, 0.6, True, True)
    # VOC-20 is VOC with background ignored: VOC's background words, unassigned pixels are misses
    assert not v20.background and v20.background_words[:3] == ("sky", "wall", "tree") and v20.bkg_thr == 0.001
    assert (city.short_side, city.attention_thr, city.templates, city.background_words) == (
        560, 0.35, "openai", ("background",))
    lines = get_preset("cliper/voc21").settings_lines()
    assert lines[0].startswith("cliper pipeline: short_side=336 slide_crop=336") and len(lines) == 2


def test_foundation_model_presets_hold_the_release_configs():
    px, cc = get_preset("proxyclip/ade20k").protocol, get_preset("corrclip/cityscapes").protocol
    got = (px.short_side, px.slide_crop, px.slide_stride, px.logit_scale, px.window_multiple)
    assert got == (448, 336, 112, 40.0, 56)
    assert not px.region_vote and get_preset("proxyclip/voc21").protocol.prob_thd == 0.2
    assert (cc.short_side, cc.slide_crop, cc.window_multiple, cc.region_vote) == (448, 224, 56, True)
    assert get_preset("corrclip/cityscapes").trunk_attention == "explicit"
    assert get_preset("corrclip/voc21").class_file == "corrclip_voc21.txt"
    assert get_preset("proxyclip/coco_object").class_file == "proxyclip_coco_object.txt"
    assert get_preset("proxyclip/ade20k").class_file is None  # the release's file equals resclip's
    for name in ("proxyclip/voc21", "corrclip/ade20k", "trident/context60"):
        path = get_preset(name).class_file_path()
        assert path is None or path.exists()
