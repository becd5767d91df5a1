"""RCS (Eq. 5-6): the mix, its settings and the layer range."""

from __future__ import annotations

import pytest
import torch

from resclip.rcs import RCSConfig, rcs_mix


def test_mix_is_the_printed_expression_bit_for_bit():
    """``tau * ((1 - lam) * A_s + lam * A_c)``: the in-place form rounds the same three times."""
    gen = torch.Generator().manual_seed(0)
    attn = torch.rand(2, 3, 7, 7, generator=gen).softmax(-1)
    attn_c = torch.rand(2, 3, 7, 7, generator=gen).softmax(-1)
    for lam, tau in [(0.3, 2.0), (0.5, 1.0), (0.0, 1.0), (1.0, 2.0)]:
        cfg = RCSConfig(lam=lam, tau=tau)
        assert torch.equal(rcs_mix(attn, attn_c, cfg), tau * ((1 - lam) * attn + lam * attn_c))
    assert torch.equal(rcs_mix(attn, attn_c, RCSConfig(lam=0.0, tau=1.0)), attn)
    before = attn.clone()
    rcs_mix(attn, attn_c, RCSConfig())
    assert torch.equal(attn, before)  # the inputs are left alone


def test_rows_keep_summing_to_tau():
    gen = torch.Generator().manual_seed(1)
    attn = torch.rand(1, 2, 5, 5, generator=gen).softmax(-1)
    attn_c = torch.rand(1, 2, 5, 5, generator=gen).softmax(-1)
    out = rcs_mix(attn, attn_c, RCSConfig(lam=0.4, tau=2.0))
    torch.testing.assert_close(out.sum(-1), torch.full((1, 2, 5), 2.0))


def test_layers_are_sorted_and_converted_to_zero_based():
    cfg = RCSConfig(layers=(9, 6, 8, 7))
    assert cfg.layers == (6, 7, 8, 9)
    assert cfg.zero_based(12) == (5, 6, 7, 8)
    with pytest.raises(ValueError, match=r"must lie in 1\.\.8"):
        cfg.zero_based(9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lam": 1.5}, "lam must be in"),
        ({"lam": -0.1}, "lam must be in"),
        ({"tau": 0.0}, "tau must be > 0"),
        ({"layers": ()}, "1-based block indices"),
        ({"layers": (0, 3)}, "1-based block indices"),
        ({"layers": (2.5,)}, "1-based block indices"),
        ({"layers": (3, 3)}, "duplicates"),
    ],
)
def test_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RCSConfig(**kwargs)
