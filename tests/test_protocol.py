"""Post-processing on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from resclip.protocol import Protocol, class_probabilities, predict_mask, renormalise


def test_class_probabilities_take_the_max_over_synonyms():
    logits = torch.tensor([0.0, math.log(2.0), math.log(3.0)]).view(3, 1, 1)  # softmax = 1/6, 2/6, 3/6
    probs = class_probabilities(logits, torch.tensor([0, 0, 1]), logit_scale=1.0)
    assert torch.allclose(probs.view(-1), torch.tensor([2 / 6, 3 / 6]))
    assert torch.allclose(renormalise(probs).view(-1), torch.tensor([0.4, 0.6]))


def test_background_threshold():
    probs = torch.tensor([[0.2, 0.1], [0.3, 0.5], [0.5, 0.4]]).view(3, 1, 2)
    mask, _ = predict_mask(probs, prob_thd=0.45)
    assert mask.tolist() == [[2, 1]]
    mask, _ = predict_mask(probs, prob_thd=0.51)
    assert mask.tolist() == [[0, 0]]


def test_area_threshold_removes_small_foreground_classes():
    # 10 pixels: class 1 wins 7, class 2 wins 2, background wins 1
    probs = torch.zeros(3, 1, 10)
    probs[1, 0, :7] = 0.9
    probs[2, 0, 7:9] = 0.9
    probs[0, 0, 9] = 0.9
    probs[0] += 0.05
    probs[2, 0, :7] = 0.04
    mask, kept = predict_mask(probs, prob_thd=0.0, area_thd=0.25)  # 2 / 9 <= 0.25 -> class 2 removed
    assert torch.all(kept[2] == 0)
    assert mask.tolist() == [[1] * 7 + [0, 0, 0]]
    mask, _ = predict_mask(probs, prob_thd=0.0, area_thd=0.2)  # 2 / 9 > 0.2 -> kept
    assert mask.tolist() == [[1] * 7 + [2, 2, 0]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"slide_crop": -1}, "slide_crop"),
        ({"slide_stride": 0}, "slide_stride"),
        ({"logit_scale": 0}, "logit_scale"),
        ({"prob_thd": -0.1}, "prob_thd"),
        ({"area_thd": 3}, "area_thd"),
        ({"pamr_steps": -2}, "pamr_steps"),
        ({"short_side": 0}, "short_side"),
    ],
)
def test_protocol_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Protocol(**kwargs)
