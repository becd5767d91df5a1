"""Dense ViT forward helpers: head groups and their invariance."""

from __future__ import annotations

import warnings

import pytest
import torch

from resclip import vit
from resclip.engine import DenseEngine, WindowTrace
from resclip.methods import get_method
from resclip.rcs import RCSConfig
from resclip.sfr import SFRConfig


def test_head_chunks_split_evenly_within_the_budget():
    # ViT-L/14 on a 336x448 image: 769 tokens, one head's map is 591,361 elements -> 7 per 2^22,
    # so 3 groups, balanced as 6 + 6 + 4
    assert vit.head_chunks(1, 16, 769, budget=1 << 22) == [slice(0, 6), slice(6, 12), slice(12, 16)]
    # six ViT-B/16 windows: 6 * 197^2 = 232,854 elements per head -> all 12 heads at once
    assert vit.head_chunks(6, 12, 197, budget=1 << 22) == [slice(0, 12)]
    # a budget below one head still gives one head per group
    assert vit.head_chunks(1, 3, 100, budget=10) == [slice(0, 1), slice(1, 2), slice(2, 3)]


@pytest.fixture(scope="module")
def tiny_visual(tiny_ckpt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from resclip.clip import load_clip

        return load_clip(None, str(tiny_ckpt)).model.visual


@pytest.mark.parametrize("method", ["naclip", "sclip"])
def test_one_head_at_a_time_gives_the_same_logits(tiny_visual, monkeypatch, method):
    """Head groups only bound memory: the trunk's explicit attention, the RCS mean and both
    last-block passes agree when every head is its own group."""
    torch.manual_seed(5)
    x = torch.randn(2, 3, 64, 80)
    text = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)
    q2c = torch.tensor([0, 0, 1, 2, 2])
    eng = DenseEngine(tiny_visual, get_method(method), RCSConfig(layers=(2, 3)), SFRConfig(), "explicit")
    trace_all = WindowTrace()
    together = eng.window_logits(x, text, q2c, trace_all)

    def one_head(b: int, h: int, t: int, budget: int = 0) -> list[slice]:
        return [slice(i, i + 1) for i in range(h)]

    monkeypatch.setattr(vit, "head_chunks", one_head)  # serves the trunk and both last-block passes
    trace_one = WindowTrace()
    apart = eng.window_logits(x, text, q2c, trace_one)
    torch.testing.assert_close(apart, together, atol=1e-6, rtol=0)
    for one, every in [(trace_one.rcs_attn, trace_all.rcs_attn), (trace_one.sfr.attn, trace_all.sfr.attn),
                       (trace_one.attn, trace_all.attn)]:
        torch.testing.assert_close(one, every, atol=1e-6, rtol=0)
    assert torch.equal(trace_one.sfr.label_map, trace_all.sfr.label_map)
