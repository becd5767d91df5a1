"""Hand-computed cases for the attention helpers and each base method's scores."""

from __future__ import annotations

import math
import re

import pytest
import torch

from resclip.attention import gaussian_bias, interpolate_pos_embed, merge_heads, project_qkv, scaled_scores
from resclip.methods import get_method, list_methods


def test_scaled_scores_hand_case():
    a = torch.tensor([[[[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]]])  # (1,1,2,4): d = 4, scale 1/2
    b = torch.tensor([[[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]]]])
    out = scaled_scores(a, b)
    assert torch.equal(out, torch.tensor([[[[0.5, 0.0], [1.0, 0.0]]]]))


def test_project_qkv_and_merge_heads_roundtrip():
    torch.manual_seed(0)
    z = torch.randn(2, 5, 8)
    weight = torch.eye(8).repeat(3, 1)  # q = k = v = z
    q, _k, v = project_qkv(z, weight, None, heads=2)
    assert q.shape == (2, 2, 5, 4)
    assert torch.equal(q[:, 1], z[:, :, 4:])
    assert torch.equal(merge_heads(v), z)


def test_gaussian_bias_values():
    omega = gaussian_bias(2, 3, 5.0, torch.device("cpu"))
    assert omega.shape == (7, 7)
    assert torch.all(omega[0] == 0) and torch.all(omega[:, 0] == 0)
    assert torch.allclose(torch.diagonal(omega)[1:], torch.ones(6))
    # patch (0,0) -> (1,2): squared distance 1 + 4 = 5
    assert math.isclose(omega[1, 6].item(), math.exp(-5 / 50), rel_tol=1e-6)


def test_pos_embed_untouched_on_native_grid_and_resized_otherwise():
    pos = torch.randn(1 + 4 * 4, 6)
    assert interpolate_pos_embed(pos, 4, 4) is pos
    out = interpolate_pos_embed(pos, 3, 5)
    assert out.shape == (16, 6)
    assert torch.equal(out[0], pos[0])


@pytest.fixture
def qk():
    torch.manual_seed(1)
    return torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)


def test_method_scores_hand_computed(qk):
    q, k = qk
    s = 8**-0.5
    (clip,) = get_method("clip").score_terms(q, k)
    assert torch.allclose(clip, s * q @ k.transpose(-1, -2), atol=1e-6)
    qq, kk = get_method("sclip").score_terms(q, k)
    assert torch.allclose(qq, s * q @ q.transpose(-1, -2), atol=1e-6)
    assert torch.allclose(kk, s * k @ k.transpose(-1, -2), atol=1e-6)
    (clear,) = get_method("clearclip").score_terms(q, k)
    assert torch.allclose(clear, qq)
    (na,) = get_method("naclip").score_terms(q, k)
    assert torch.allclose(na, kk)
    assert get_method("maskclip").score_terms(q, k) == []


def test_method_residual_flags_and_bias():
    assert get_method("clip").keep_residual and get_method("sclip").keep_residual
    assert not get_method("clearclip").keep_residual
    assert not get_method("naclip").keep_residual and not get_method("maskclip").keep_residual
    assert get_method("naclip").score_bias(2, 2, torch.device("cpu")).shape == (5, 5)
    assert get_method("sclip").score_bias(2, 2, torch.device("cpu")) is None


def test_unknown_method_lists_valid_ones():
    names = ", ".join(sorted(list_methods()))
    assert names.startswith("clearclip, clip, cliper, corrclip, maskclip, naclip")
    with pytest.raises(ValueError, match=f"valid methods: {re.escape(names)}$"):
        get_method("gem")
