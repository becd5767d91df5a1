"""Window-level parity with the released code (golden vectors) for every method and ablation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity import assert_parity
from resclip.engine import DenseEngine, WindowTrace
from resclip.methods import get_method
from resclip.presets import official_sfr
from resclip.rcs import RCSConfig

# window -> (model, input key, temp_thd, (tau_rcs, lam_rcs), (tau_sfr, lam_sfr)); see the golden README
WINDOWS = {
    "W0": ("b16", "W0__input_nchw", 0.30, (2.0, 0.3), (1.8, 0.7)),
    "W1": ("b16", "W1__input_nchw", 0.50, (2.0, 0.3), (2.2, 0.7)),
    "W2": ("b32", "W0__input_nchw", 0.10, (2.0, 0.6), (2.1, 0.6)),
}
VARIANTS = [("clip", "")] + [
    (b, s) for b in ("sclip", "clearclip", "naclip") for s in ("", "_rcs", "_sfr", "_resclip")
]
VARIANTS.append(("naclip", "default"))


def _engine(models, window: str, base: str, suffix: str, trunk: str = "explicit") -> DenseEngine:
    model, _, temp, (tr, lr), (ts, ls) = WINDOWS[window]
    rcs = RCSConfig(lam=lr, tau=tr) if suffix in ("_rcs", "_resclip", "default") else None
    sfr = official_sfr(ls, ts, temp) if suffix in ("_sfr", "_resclip", "default") else None
    return DenseEngine(models[model].visual, get_method(base), rcs, sfr, trunk_attention=trunk)


def _key(window: str, base: str, suffix: str) -> str:
    return f"{window}__resclip_default" if suffix == "default" else f"{window}__{base}{suffix}"


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize(("base", "suffix"), VARIANTS)
def test_window_parity(golden, golden_models, window, base, suffix):
    eng = _engine(golden_models, window, base, suffix)
    x = torch.from_numpy(golden[WINDOWS[window][1]])
    text = torch.from_numpy(golden["classifier__voclike"])
    q2c = torch.from_numpy(golden["text__voclike__query_idx"])
    trace = WindowTrace()
    logits = eng.window_logits(x, text, q2c, trace)
    key = _key(window, base, suffix)
    assert_parity(trace.tokens[0].numpy(), golden[f"{key}__tokens"], atol=1e-4)
    assert_parity(logits[0].numpy(), golden[f"{key}__patch_logits"], atol=1e-5)
    if "sfr" in suffix or "resclip" in suffix or suffix == "default":
        sfr = trace.sfr
        assert_parity(
            sfr.patch_logits[0].numpy(), golden[f"{key}__sfr_first_pass_patch_logits"], atol=1e-5)
        np.testing.assert_array_equal(sfr.label_map[0].numpy(), golden[f"{key}__sfr_label_map"])
        if f"{key}__sfr_valid_path" in golden:
            np.testing.assert_array_equal(sfr.valid_path[0].numpy(), golden[f"{key}__sfr_valid_path"] == 1)
            assert_parity(
                sfr.prenorm[0].numpy(), golden[f"{key}__sfr_matrix_prenorm"], atol=1e-5)
            pix = sfr.pixel_labels[0].numpy()
            # a pixel whose top-2 probabilities tie within float noise may flip; the patch modes may not
            assert (pix != golden[f"{key}__sfr_pixel_labels"]).sum() <= 2


def test_pre_last_block_and_attention_maps(golden, golden_models):
    eng = _engine(golden_models, "W0", "naclip", "_resclip")
    trace = WindowTrace()
    eng.window_logits(
        torch.from_numpy(golden["W0__input_nchw"]),
        torch.from_numpy(golden["classifier__voclike"]),
        torch.from_numpy(golden["text__voclike__query_idx"]),
        trace,
    )
    assert_parity(trace.pre_last_block_x[0].numpy(), golden["W0__pre_last_block_x"], atol=1e-4)
    maps = {"rcs_attn_avg": trace.rcs_attn, "first_pass_attn": trace.sfr.attn, "final_attn": trace.attn}
    for name, got in maps.items():
        assert_parity(got[0].numpy(), golden[f"W0__naclip_resclip__{name}"], atol=1e-5)


def test_first_pass_probs_after_pamr(golden, golden_models):
    """The SFR first pass runs PAMR(10, (8, 16)) on the window; compare its softmax at sampled pixels."""
    from resclip.pamr import pamr

    eng = _engine(golden_models, "W0", "naclip", "_resclip")
    trace = WindowTrace()
    x = torch.from_numpy(golden["W0__input_nchw"])
    eng.window_logits(
        x,
        torch.from_numpy(golden["classifier__voclike"]),
        torch.from_numpy(golden["text__voclike__query_idx"]),
        trace,
    )
    up = torch.nn.functional.interpolate(trace.sfr.patch_logits, size=(224, 224), mode="bilinear")
    probs = torch.softmax(40 * pamr(x, up, 10, (8, 16)), dim=1)[0].flatten(1)
    idx = torch.from_numpy(golden["W0__naclip_resclip__sfr_first_pass_probs_idx"])
    assert_parity(
        probs[:, idx].numpy(), golden["W0__naclip_resclip__sfr_first_pass_probs_samples"], atol=1e-5)


@pytest.mark.parametrize(("base", "suffix"), [("naclip", "_resclip"), ("sclip", "_rcs"), ("clearclip", "")])
def test_fused_trunk_stays_within_token_tolerance(golden, golden_models, base, suffix):
    eng = _engine(golden_models, "W0", base, suffix, trunk="fused")
    trace = WindowTrace()
    eng.window_logits(
        torch.from_numpy(golden["W0__input_nchw"]),
        torch.from_numpy(golden["classifier__voclike"]),
        torch.from_numpy(golden["text__voclike__query_idx"]),
        trace,
    )
    want = golden[f"W0__{base}{suffix}__tokens"]
    assert_parity(trace.tokens[0].numpy(), want, atol=1e-4)


BASELINE_REPOS = [
    ("naclip", "naclip", "naclip"),
    ("naclip", "sclip_csa", "sclip"),
    ("naclip", "clip", "clip"),
    ("sclip", "sclip", "sclip"),
    ("clearclip", "clearclip", "clearclip"),
    ("clearclip", "maskclip", "maskclip"),
]


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize(("repo", "variant", "method"), BASELINE_REPOS)
def test_baseline_repositories(golden, golden_models, window, repo, variant, method):
    """Our base methods reproduce each baseline repository's own code (tokens, logits)."""
    eng = DenseEngine(golden_models[WINDOWS[window][0]].visual, get_method(method), trunk_attention="fused")
    trace = WindowTrace()
    logits = eng.window_logits(
        torch.from_numpy(golden[WINDOWS[window][1]]),
        torch.from_numpy(golden["classifier__voclike"]),
        torch.from_numpy(golden["text__voclike__query_idx"]),
        trace,
    )
    key = f"{repo}__{window}__{variant}"
    tokens = trace.tokens[0]
    if repo == "clearclip":  # that repository returns patch tokens only
        tokens = tokens[1:]
    assert_parity(tokens.numpy(), golden[f"{key}__tokens"], atol=1e-4)
    assert_parity(logits[0].numpy(), golden[f"{key}__patch_logits"], atol=1e-5)


@pytest.mark.parametrize("window", list(WINDOWS))
def test_clearclip_released_base_config(golden, golden_models, window):
    """ClearCLIP's base config: vanilla q-k attention with the residual dropped."""
    from resclip.methods import BaseAttention

    method = BaseAttention("clip-noresidual", keep_residual=False, pairs=("qk",))
    eng = DenseEngine(golden_models[WINDOWS[window][0]].visual, method)
    logits = eng.window_logits(
        torch.from_numpy(golden[WINDOWS[window][1]]),
        torch.from_numpy(golden["classifier__voclike"]),
        torch.from_numpy(golden["text__voclike__query_idx"]),
    )
    want = golden[f"clearclip__{window}__released_base_config__patch_logits"]
    assert_parity(logits[0].numpy(), want, atol=1e-5)
