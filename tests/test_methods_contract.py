"""Every registered method passes the same contract, with and without RCS and SFR."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch

import resclip
from parity import GOLDEN
from resclip.auxiliary import AUX_KINDS, load_aux
from resclip.engine import DenseEngine, WindowTrace
from resclip.methods import get_method
from resclip.rcs import RCSConfig
from resclip.sfr import RefinementTrace, SFRConfig
from resclip.vit import encode_trunk, run_block

CLASSES = ["sky, wall", "cat", "person, man, woman", "tree"]
SMALL = {"short_side": 96, "slide_crop": 64, "slide_stride": 32, "rcs_layers": (2, 3)}



# an auxiliary model of every kind a method may declare; DINO with patch 16 as the tiny CLIP, so that
# the methods whose stage runs on the DINO grid (ProxyCLIP) compose with RCS and SFR
AUX_PRETRAINED = {"dino": GOLDEN / "aux" / "dino_vitb16_tiny_fp16.pth",
                  "sam": GOLDEN / "aux" / "sam_vit_tiny_fp16.pth",
                  "mae": GOLDEN / "aux" / "mae_tiny_fp16.pth"}


# CorrCLIP's regions come from SAM 2's automatic mask generator
AUX_BY_METHOD = {"corrclip": {"sam": GOLDEN / "aux" / "sam2_hiera_tiny_fp16.pt"}}


def _aux(method):
    return {kind: AUX_BY_METHOD.get(method, {}).get(kind, AUX_PRETRAINED[kind])
            for kind in get_method(method).required_aux()}


def _own_grid(method):
    """A last stage on a grid other than the tiny CLIP's 16-pixel one (ProxyCLIP with SAM): RCS and SFR,
    which mix attention on the CLIP grid, are refused with one line."""
    base = get_method(method)
    aux = {kind: load_aux(kind, source) for kind, source in _aux(method).items()}
    return base.replaces_last_block and base.out_patch(16, aux) != 16


# CorrCLIP's branches read blocks 3..L-2: the 4-block tiny tower is too shallow, the golden one has 12
CKPT_BY_METHOD = {"corrclip": GOLDEN / "tiny_clip_b16_fp16.pt"}


def _seg(ckpt, method, rcs, sfr, **kw):
    settings = {**SMALL, **kw}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*custom ViT")  # the golden checkpoint's architecture
        return resclip.create_segmenter(
            method=method, rcs=rcs, sfr=sfr, preset="ade20k",
            pretrained=str(CKPT_BY_METHOD.get(method, ckpt)), text_cache=False, aux_pretrained=_aux(method),
            **settings
        )


COMBOS = list(itertools.product(resclip.list_methods(), [False, True], [False, True]))
# SFR edits attention scores: methods without them (identity attention) reject it
SCORED = [m for m in resclip.list_methods() if get_method(m).has_scores]


@pytest.mark.parametrize(("method", "rcs", "sfr"), COMBOS)
def test_contract(tiny_ckpt, photo, method, rcs, sfr):
    if (rcs or sfr) and _own_grid(method):
        with pytest.raises(ValueError, match="RCS and SFR mix the CLIP's 16-pixel grid"):
            _seg(tiny_ckpt, method, rcs, sfr)
        return
    if sfr and method not in SCORED:
        with pytest.raises(ValueError, match="identity attention"):
            _seg(tiny_ckpt, method, rcs, sfr)
        return
    seg = _seg(tiny_ckpt, method, rcs, sfr)
    res = seg.predict(photo, CLASSES)
    assert res.mask.shape == photo.shape[:2] and res.mask.dtype == np.uint8
    assert res.mask.min() >= 0 and res.mask.max() < len(CLASSES)
    assert res.probs.shape == (len(CLASSES), *photo.shape[:2])
    assert np.isfinite(res.probs).all()
    np.testing.assert_allclose(res.probs.sum(axis=0), 1.0, atol=1e-5)
    assert res.class_names == ["sky", "cat", "person", "tree"]
    again = seg.predict(photo, CLASSES)
    assert np.array_equal(res.mask, again.mask) and np.array_equal(res.probs, again.probs)


# SFR on a method without scores is rejected; test_contract checks the message
MODULE_CASES = [(m, "rcs") for m in resclip.list_methods() if not _own_grid(m)] + [
    (m, "sfr") for m in SCORED if not _own_grid(m)]


@pytest.mark.parametrize(("method", "module"), MODULE_CASES)
def test_each_module_really_changes_the_output(tiny_ckpt, photo, method, module):
    base = _seg(tiny_ckpt, method, False, False).predict(photo, CLASSES)
    on = _seg(tiny_ckpt, method, module == "rcs", module == "sfr").predict(photo, CLASSES)
    assert np.abs(on.logits - base.logits).max() > 1e-4


def _engine_logits(model_visual, method, rcs=None, sfr=None, x=None, text=None):
    aux = {kind: load_aux(kind, source) for kind, source in _aux(method).items()}
    eng = DenseEngine(model_visual, get_method(method), rcs, sfr, aux=aux)
    q2c = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    trace = WindowTrace()
    return eng.window_logits(x, text, q2c, trace), trace


@pytest.fixture(scope="module")
def tiny_visual(tiny_ckpt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from resclip.clip import load_clip

        return load_clip(None, str(tiny_ckpt)).model.visual


@pytest.fixture(scope="module")
def window_inputs():
    torch.manual_seed(3)
    return torch.randn(2, 3, 64, 80), torch.nn.functional.normalize(torch.randn(7, 32), dim=-1)


# the engine-level checks run on the 4-block tiny tower (CorrCLIP's are in tests/test_corrclip.py)
ENGINE_METHODS = [m for m in resclip.list_methods() if not _own_grid(m) and m not in CKPT_BY_METHOD]


@pytest.mark.parametrize("method", ENGINE_METHODS)
def test_rcs_with_lambda_zero_is_the_base_method(tiny_visual, window_inputs, method):
    x, text = window_inputs
    base, _ = _engine_logits(tiny_visual, method, x=x, text=text)
    zero, _ = _engine_logits(
        tiny_visual, method, rcs=RCSConfig(lam=0.0, tau=1.0, layers=(2, 3)), x=x, text=text
    )
    assert torch.equal(base, zero)


@pytest.mark.parametrize("method", [m for m in SCORED if m in ENGINE_METHODS])
@pytest.mark.parametrize("official", [False, True])
def test_sfr_with_lambda_zero_is_the_base_method(tiny_visual, window_inputs, method, official):
    x, text = window_inputs
    base, _ = _engine_logits(tiny_visual, method, x=x, text=text)
    sfr = SFRConfig(
        lam=0.0,
        tau=1.0,
        fp16_scores=official,
        bias_after_mix=official,
        normalise=official,
        path="line" if official else "connected",
    )
    zero, _ = _engine_logits(tiny_visual, method, sfr=sfr, x=x, text=text)
    assert torch.equal(base, zero)


def test_rcs_layer_range_is_honoured(tiny_visual, window_inputs):
    x, text = window_inputs
    _, trace = _engine_logits(
        tiny_visual, "naclip", rcs=RCSConfig(lam=0.5, tau=1.0, layers=(1, 3)), x=x, text=text
    )
    # recompute the q-k attention of blocks 1 and 3 (1-based) by hand and average
    trunk = encode_trunk(tiny_visual, x)
    from resclip.vit import embed_patches

    y, _ = embed_patches(tiny_visual, x)
    maps = []
    for block in tiny_visual.transformer.resblocks[:-1]:
        y, attn = run_block(block, y, keep_attn=True)
        maps.append(attn)
    torch.testing.assert_close(trace.rcs_attn, (maps[0] + maps[2]) / 2)
    torch.testing.assert_close(trunk.x, y)
    other, _ = _engine_logits(
        tiny_visual, "naclip", rcs=RCSConfig(lam=0.5, tau=1.0, layers=(2, 3)), x=x, text=text
    )
    first, _ = _engine_logits(
        tiny_visual, "naclip", rcs=RCSConfig(lam=0.5, tau=1.0, layers=(1, 3)), x=x, text=text
    )
    assert not torch.equal(first, other)


def test_rcs_layers_must_precede_the_last_block(tiny_ckpt):
    with pytest.raises(ValueError, match=r"must lie in 1\.\.3"):
        _seg(tiny_ckpt, "naclip", True, False, rcs_layers=(3, 4))


def test_sfr_with_one_label_everywhere_has_no_decay(tiny_visual, window_inputs):
    """A single region: every path is valid, so Ŝ is the smoothed all-ones matrix."""
    from resclip.sfr import refinement_scores, smooth_rows

    labels = torch.zeros(1, 4, 5, dtype=torch.long)
    for path in ("line", "connected"):
        trace = RefinementTrace()
        out = refinement_scores(labels, SFRConfig(path=path), trace)
        assert trace.valid_path is not None and trace.valid_path.all()
        torch.testing.assert_close(out[0, 1:, 1:], smooth_rows(torch.ones(1, 20, 20), 5.0)[0])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_on_cpu_is_finite_and_close(tiny_ckpt, photo, precision):
    ref = _seg(tiny_ckpt, "naclip", True, True).predict(photo, CLASSES)
    low = resclip.create_segmenter(
        method="naclip",
        preset="ade20k",
        pretrained=str(tiny_ckpt),
        text_cache=False,
        precision=precision,
        **SMALL,
    ).predict(photo, CLASSES)
    assert np.isfinite(low.probs).all()
    assert np.abs(low.probs - ref.probs).mean() < 0.05


@pytest.mark.parametrize("method", resclip.list_methods())
def test_registry_entry_is_consistent(method):
    """Each registered method answers to its own name, and ``has_scores`` says whether it has score terms."""
    base = get_method(method)
    assert base.name == method and get_method(f" {method.upper()} ") is base and base.description
    q = torch.randn(1, 2, 5, 8)
    terms = base.score_terms(q, q)
    # a stage of its own may have scores that are no function of q, k alone (ProxyCLIP's proxy scores)
    assert base.has_scores == bool(terms) or base.replaces_last_block
    assert all(t.shape == (1, 2, 5, 5) and t.dtype == torch.float32 for t in terms)
    assert set(base.required_aux()) <= set(AUX_KINDS) and set(base.required_aux()) <= set(AUX_PRETRAINED)


def test_registering_a_name_twice_is_refused():
    from resclip.methods import BaseAttention, register_method

    with pytest.raises(ValueError, match="registered twice"):
        register_method(BaseAttention("clip", keep_residual=True, pairs=("qk",)))
    with pytest.raises(ValueError, match="lower case"):
        register_method(BaseAttention("My Method", keep_residual=True))
    with pytest.raises(ValueError, match="score pairs"):
        BaseAttention("odd", keep_residual=True, pairs=("qv",))


# the methods that bring their own stages, each under its own repository preset (PEARL's adds TLP)
STAGE_PRESETS = {"sc_clip": "sc_clip/ade20k", "sfp": "sfp/ade20k", "pearl": "pearl/ade20k",
                 "cliper": "default", "proxyclip": "default"}


@pytest.mark.parametrize("method", list(STAGE_PRESETS))
@pytest.mark.parametrize(("rcs", "sfr", "pamr"), [(True, False, 0), (False, True, 0), (True, True, 0),
                                                  (False, False, 10), (True, True, 10)])
def test_stage_methods_compose_with_every_module(tiny_ckpt, photo, method, rcs, sfr, pamr):
    """RCS and SFR change a stage method's logits; PAMR (and TLP) act after them."""
    def seg(r: bool, s: bool, p: int) -> resclip.Segmenter:
        return resclip.create_segmenter(method=method, rcs=r, sfr=s, preset=STAGE_PRESETS[method],
                                        pretrained=str(tiny_ckpt), text_cache=False, pamr_steps=p,
                                        aux_pretrained=_aux(method), **SMALL)

    base = seg(False, False, 0).predict(photo, CLASSES)
    res = seg(rcs, sfr, pamr).predict(photo, CLASSES)
    assert res.mask.shape == photo.shape[:2] and np.isfinite(res.probs).all()
    np.testing.assert_allclose(res.probs.sum(axis=0), 1.0, atol=1e-5)
    if rcs or sfr:
        assert np.abs(res.logits - base.logits).max() > 1e-4
    else:
        np.testing.assert_array_equal(res.logits, base.logits)
        assert np.abs(res.full.logits_full() - base.full.logits_full()).max() > 1e-4
