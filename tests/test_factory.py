"""create_segmenter and Segmenter.with_method: one place builds engines, variants share the weights."""

from __future__ import annotations

import numpy as np
import pytest

import resclip
from resclip.methods import get_method

CLASSES = ["sky, wall", "cat", "person, man, woman"]
SMALL = {"short_side": 80, "slide_crop": 64, "slide_stride": 32, "rcs_layers": (2, 3)}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(1)
    img = np.zeros((56, 84, 3), dtype=np.uint8)
    img[:, 40:] = (30, 90, 220)
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)


def _create(ckpt, method="naclip", rcs=True, sfr=True, **kw):
    return resclip.create_segmenter(method, rcs=rcs, sfr=sfr, preset="ade20k", pretrained=str(ckpt),
                                    text_cache=False, **{**SMALL, **kw})


@pytest.fixture(scope="module")
def base(tiny_ckpt):
    return _create(tiny_ckpt, trunk_attention="fused", window_batch=3)


def test_variant_shares_weights_and_carries_every_setting(base):
    base.band_budget = 12345
    seg = base.with_method("SCLIP", sfr=False)
    assert seg.engine is not base.engine and seg.engine.visual is base.engine.visual
    assert seg.model is base.model and seg.tokenizer is base.tokenizer and seg.text_cache is base.text_cache
    assert (seg.window_batch, seg.band_budget, seg.fingerprint, seg.device) == (
        3, 12345, base.fingerprint, base.device)
    assert seg.config.method == "sclip" and seg.config.rcs == base.config.rcs and seg.config.sfr is None
    assert seg.config.trunk_attention == "fused" and not seg.engine.explicit
    assert seg.engine.method is get_method("sclip") and seg.engine.sfr is None
    assert (seg.config.protocol, seg.config.preset, seg.config.model) == (
        base.config.protocol, base.config.preset, base.config.model)
    assert base.config.method == "naclip" and base.engine.sfr is not None  # base untouched
    kept = base.with_method("clearclip")  # None keeps the base's modules
    assert kept.config.rcs == base.config.rcs and kept.config.sfr == base.config.sfr


@pytest.mark.parametrize(("method", "rcs", "sfr"), [("sclip", True, False), ("clip", False, True),
                                                    ("maskclip", True, False)])
def test_variant_segments_like_a_fresh_segmenter(tiny_ckpt, base, image, method, rcs, sfr):
    got = base.with_method(method, rcs=rcs, sfr=sfr).predict(image, CLASSES)
    want = _create(tiny_ckpt, method, rcs, sfr, trunk_attention="fused").predict(image, CLASSES)
    assert np.array_equal(got.mask, want.mask) and np.array_equal(got.logits, want.logits)


def test_variant_errors(tiny_ckpt, base):
    plain = _create(tiny_ckpt, rcs=False, sfr=False)
    with pytest.raises(ValueError, match="built without SFR settings; create it with sfr=True"):
        plain.with_method("clip", sfr=True)
    with pytest.raises(ValueError, match="built without RCS settings"):
        plain.with_method("clip", rcs=True)
    with pytest.raises(ValueError, match="identity attention"):
        base.with_method("maskclip", sfr=True)
    with pytest.raises(ValueError, match="unknown method 'gem'"):
        base.with_method("gem")


def test_config_records_the_trunk_attention(tiny_ckpt):
    assert _create(tiny_ckpt, rcs=False, sfr=False).config.trunk_attention == "explicit"  # the preset's
    seg = resclip.create_segmenter("naclip", rcs=False, sfr=False, preset="sclip/ade20k",
                                   pretrained=str(tiny_ckpt), text_cache=False, **SMALL)
    assert seg.config.trunk_attention == "fused" and not seg.engine.explicit
    assert seg.config.to_dict()["trunk_attention"] == "fused"


def test_has_scores_is_a_property_of_the_method():
    assert not get_method("maskclip").has_scores and get_method("naclip").has_scores
    assert all(get_method(m).has_scores == bool(get_method(m).pairs) for m in ["clip", "sclip", "clearclip"])


def test_tlp_switches_by_keyword_with_any_method():
    """TLP (PEARL's propagation) is a protocol stage: on or off by keyword, its fields as tlp_<field>."""
    from resclip.factory import apply_overrides
    from resclip.presets import get_preset
    from resclip.tlp import TLPConfig

    plain = get_preset("naclip/ade20k")
    assert plain.protocol.tlp is None
    assert apply_overrides(plain, {"tlp": True}).protocol.tlp == TLPConfig()
    assert apply_overrides(plain, {"tlp_grid": 40}).protocol.tlp == TLPConfig(grid=40)
    pearl = get_preset("pearl/ade20k")
    assert pearl.protocol.tlp is not None
    assert apply_overrides(pearl, {"tlp": False}).protocol.tlp is None
    changed = apply_overrides(pearl, {"tlp_cg_steps": 5}).protocol.tlp
    assert changed == TLPConfig(cg_steps=5, grid=pearl.protocol.tlp.grid)
    with pytest.raises(TypeError, match="setting tlp_grid: expected an integer, got 'x'"):
        apply_overrides(plain, {"tlp_grid": "x"})
    with pytest.raises(TypeError, match="tlp=False contradicts tlp_grid"):
        apply_overrides(plain, {"tlp": False, "tlp_grid": 4})


def test_method_fields_by_keyword(tiny_ckpt, image):
    """``<method>_<field>`` sets a method's own field (recorded in the config, used by the engine, reset
    by with_method for another method); another method's field, a wrong type or a value the method
    rejects is one clear error."""
    from resclip.commands.common import parse_overrides
    from resclip.factory import method_fields, valid_overrides

    assert method_fields(get_method("proxyclip")) == ("beta", "gamma", "vfm", "mae_input")
    keys = {"naclip_gaussian_std", "proxyclip_beta", "proxyclip_sam_beta", "corrclip_masks"}
    assert keys <= set(valid_overrides())
    seg = _create(tiny_ckpt, naclip_gaussian_std=2.5)
    assert seg.config.method_fields == (("gaussian_std", 2.5),)
    assert seg.engine.method.gaussian_std == 2.5
    assert seg.config.to_dict()["method_fields"] == (("gaussian_std", 2.5),)
    plain = _create(tiny_ckpt)
    assert plain.engine.method.gaussian_std == 5.0
    assert not np.array_equal(seg.predict(image, CLASSES).probs, plain.predict(image, CLASSES).probs)
    variant = seg.with_method("sclip")
    assert variant.config.method_fields == () and seg.with_method("naclip").engine.method.gaussian_std == 2.5
    with pytest.raises(TypeError, match=r"^setting proxyclip_beta is a field of method proxyclip, not of "
                                        r"naclip; use naclip_<field> \(its fields: gaussian_std\)$"):
        _create(tiny_ckpt, proxyclip_beta=1.0)
    with pytest.raises(TypeError, match=r"^setting naclip_gaussian_std: expected a number, got 'wide'$"):
        _create(tiny_ckpt, naclip_gaussian_std="wide")
    with pytest.raises(ValueError, match=r"corrclip masks must be one of"):
        resclip.create_segmenter("corrclip", pretrained=None, corrclip_masks="mine", aux_pretrained={})
    # the command line parses and type-checks them before any model loads
    assert parse_overrides(["proxyclip_sam_beta=1.5", "short_side=100"]) == {"proxyclip_sam_beta": 1.5,
                                                                           "short_side": 100}


def test_method_fields_for_commands_that_run_several_methods(base):
    """compare / reproduce take one --set list for several methods: each method gets its own fields,
    with_method(fields=) applies them, and sweep grids over a method's text field."""
    import argparse

    from resclip.commands.sweep import build_grid
    from resclip.factory import fields_for, method_field_owner

    settings = {"proxyclip_beta": 1.0, "naclip_gaussian_std": 3.0, "short_side": 100}
    assert method_field_owner("proxyclip_sam_gamma") == ("proxyclip_sam", "gamma")
    assert method_field_owner("short_side") is None and method_field_owner("nope_x") is None
    assert fields_for(settings, "naclip") == {"gaussian_std": 3.0} and fields_for(settings, "sclip") == {}
    narrow = base.with_method("naclip", fields={"gaussian_std": 3.0})
    assert narrow.engine.method.gaussian_std == 3.0
    assert narrow.config.method_fields == (("gaussian_std", 3.0),)
    with pytest.raises(TypeError, match=r"^setting naclip_gaussian_std: expected a number, got 'x'$"):
        base.with_method("naclip", fields={"gaussian_std": "x"})
    args = argparse.Namespace(lambda_rcs=None, lambda_sfr=None, rcs_layers=None,
                              grid=["proxyclip_vfm=dino,mae", "proxyclip_beta=1.0,1.2"])
    keys, points = build_grid(args)
    assert keys == ["proxyclip_vfm", "proxyclip_beta"] and len(points) == 4
    assert points[1] == {"proxyclip_vfm": "dino", "proxyclip_beta": 1.2}


def test_region_vote_is_refused_where_no_window_mask_is_voted(base):
    """region_vote under CLIPer's or Trident's own pipeline would do nothing: refused in one line;
    with_method(fields=) names an unknown field the same way as the keyword settings."""
    from resclip.factory import apply_overrides, reads_regions
    from resclip.presets import get_preset

    for preset, name in (("trident/voc21", "Trident's"), ("cliper/voc21", "CLIPer's")):
        with pytest.raises(ValueError, match=rf"^region_vote votes on a window method's mask; {name} own"):
            apply_overrides(get_preset(preset), {"region_vote": True})
    assert reads_regions("sclip", "sclip/voc21", region_vote=True)
    assert reads_regions("corrclip", "corrclip/voc21") and not reads_regions("naclip", "voc21")
    with pytest.raises(TypeError, match=r"^setting naclip_nope: method naclip has no field 'nope' \(its "
                                        r"fields: gaussian_std\)$"):
        base.with_method("naclip", fields={"nope": 1})
