"""SFR pieces on hand-built label maps."""

from __future__ import annotations

import math

import pytest
import torch

from resclip.protocol import class_max
from resclip.sfr import (
    RefinementTrace,
    SFRConfig,
    patch_mode,
    refinement_scores,
    refinement_scores_reference,
    sfr_mix,
    smooth_rows,
    valid_paths_reference,
)
from resclip.sfr_paths import _line_table, connected_components, valid_path_line


def test_line_samples_match_the_documented_example():
    # 5x5 grid, pair (2,1) -> (2,3): the released check samples (2,1), (2,2), (2,2)
    table = _line_table(5, 5)
    i, j = 2 * 5 + 1, 2 * 5 + 3
    assert table[i, j, :3].tolist() == [11, 12, 12]
    assert set(table[i, j, 3:].tolist()) == {i}  # samples past the distance repeat the query patch


def test_line_path_only_inspects_the_first_part_of_the_segment():
    labels = torch.zeros(1, 1, 5, dtype=torch.long)
    labels[0, 0, 4] = 1  # the last patch differs
    valid = valid_path_line(labels)[0]
    assert valid[0, 3]  # 0 -> 3: samples 0,1,2,2 (t <= 3/4) never reach patch 4
    labels[0, 0, 2] = 1
    valid = valid_path_line(labels)[0]
    assert not valid[0, 3]  # now patch 2 breaks the path
    assert valid[0, 1]


def test_connected_components_4_vs_8():
    labels = torch.tensor([[[1, 0], [0, 1]]])
    c8 = connected_components(labels, 8)
    c4 = connected_components(labels, 4)
    assert c8[0, 0, 0] == c8[0, 1, 1]
    assert c4[0, 0, 0] != c4[0, 1, 1]


def test_patch_mode_takes_smallest_label_on_ties():
    labels = torch.tensor([[[3, 3, 1, 1], [1, 1, 3, 2], [0, 0, 0, 0], [0, 0, 0, 0]]])  # 2x2 patches of 2x2
    out = patch_mode(labels, 2, num_labels=4)
    assert out.tolist() == [[[1, 1], [0, 0]]]


def test_patch_mode_drops_partial_blocks():
    labels = torch.ones(1, 5, 7, dtype=torch.long)
    assert patch_mode(labels, 2, 2).shape == (1, 2, 3)


def test_class_max_over_synonyms():
    probs = torch.tensor([[0.1, 0.3, 0.2, 0.4]]).view(1, 4, 1)
    out = class_max(probs, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(out.view(-1), torch.tensor([0.3, 0.4]))


def test_smoothing_kernel_is_normalised_gaussian():
    n = 40
    s = torch.zeros(1, n, n)
    s[0, 20, 20] = 1.0
    out = smooth_rows(s, 5.0)[0, 20]
    assert math.isclose(out.sum().item(), 1.0, rel_tol=1e-6)  # K = 31 taps, all inside the row
    assert math.isclose((out[21] / out[20]).item(), math.exp(-1 / 50), rel_tol=1e-5)


def test_own_label_per_patch_gives_the_smoothing_kernel():
    """With every patch its own label, S' is the identity; Ŝ rows are the (normalised) kernel."""
    labels = torch.arange(16).view(1, 4, 4)
    cfg = SFRConfig(path="line", normalise=True)
    out = refinement_scores(labels, cfg)[0]
    assert torch.all(out[0] == 0) and torch.all(out[:, 0] == 0)
    row = out[1 + 5, 1:]
    assert row.argmax().item() == 5
    assert torch.allclose(
        row / row.sum(),
        smooth_rows(torch.eye(16)[None], 5.0)[0, 5] / smooth_rows(torch.eye(16)[None], 5.0)[0, 5].sum(),
        atol=1e-6,
    )
    assert math.isclose(out.max().item(), 1.0, rel_tol=1e-6)


def test_distance_decay_hand_case():
    # 1x3 grid, labels a b a: pair (0 -> 2) has the same label but patch 1 breaks the path
    labels = torch.tensor([[[0, 1, 0]]])
    cfg = SFRConfig(path="line", smoothing_std=1e-3, normalise=False)  # kernel of one tap = identity
    trace = RefinementTrace()
    out = refinement_scores(labels, cfg, trace)[0, 1:, 1:]
    # samples use t = (0, 0.5, 1) with half-to-even rounding: 0 -> 1 checks patches 0, 0 (round(0.5) = 0)
    assert trace.valid_path[0].tolist() == [
        [True, True, False],
        [False, True, False],
        [False, True, True],
    ]
    assert math.isclose(out[0, 2].item(), math.exp(-2 / 2), rel_tol=1e-6)  # D = exp(-d / Mx), d = Mx = 2
    assert out[0, 1].item() == 0.0 and out[0, 0].item() == 1.0


def test_sfr_mix_with_lambda_zero_and_unit_tau_is_identity():
    torch.manual_seed(0)
    s = torch.randn(1, 2, 5, 5)
    r = torch.rand(1, 1, 5, 5)
    for fp16 in (True, False):
        assert torch.equal(sfr_mix(s, r, SFRConfig(lam=0.0, tau=1.0, fp16_scores=fp16)), s)


def test_sfr_mix_rounds_through_fp16_like_the_released_code():
    s = torch.zeros(1, 1, 1, 1)
    r = torch.full((1, 1, 1, 1), 0.1)
    got = sfr_mix(s, r, SFRConfig(lam=0.7, tau=2.0, fp16_scores=True)).item()
    want = 2.0 * float(torch.tensor(0.7 * float(torch.tensor(0.1).half())).half())
    assert got == pytest.approx(want, abs=0) and got != pytest.approx(2.0 * 0.07, abs=1e-7)


@pytest.mark.parametrize("field", ["lam", "confidence_thd"])
def test_config_validation(field):
    with pytest.raises(ValueError, match=field):
        SFRConfig(**{field: 1.5})
    with pytest.raises(ValueError, match="path"):
        SFRConfig(path="bfs")  # type: ignore[arg-type]


def test_line_path_matches_a_pair_by_pair_check():
    """Block-built tables: every pair (i, j) checked by walking its samples one at a time."""
    h, w = 4, 6
    mx = max(h, w) - 1
    t = torch.linspace(0, 1, mx + 1, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 2, (1, h, w), generator=gen)
    valid = valid_path_line(labels)[0]
    for i in range(h * w):
        ri, ci = divmod(i, w)
        for j in range(h * w):
            rj, cj = divmod(j, w)
            steps = max(abs(ri - rj), abs(ci - cj))
            want = True
            for k in range(steps + 1):
                r = int(torch.round(ri * (1 - t[k]) + rj * t[k]))
                c = int(torch.round(ci * (1 - t[k]) + cj * t[k]))
                want &= bool(labels[0, r, c] == labels[0, ri, ci])
            assert bool(valid[i, j]) == want, (i, j)


def _label_maps() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    blobs = torch.zeros(1, 6, 7, dtype=torch.long)
    blobs[0, 1:4, 1:3] = 1
    blobs[0, 4:, 4:] = 1  # a second region with label 1, not connected to the first
    blobs[0, 0, 5] = 2
    return [
        torch.randint(0, 3, (2, 5, 8), generator=gen),  # two windows, noisy labels
        blobs,
        torch.zeros(1, 1, 6, dtype=torch.long),  # one row
        torch.tensor([[[0, 1, 0], [1, 0, 1], [0, 1, 0]]]),  # diagonal neighbours only
        torch.zeros(1, 1, 1, dtype=torch.long),  # one patch: Mx = 0
    ]


@pytest.mark.parametrize("path", ["line", "connected"])
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize(("normalise", "decay"), [(False, True), (True, True), (True, False)])
def test_fast_form_equals_the_plain_equations(path, connectivity, normalise, decay):
    """refinement_scores (all rows at once, cached tables) against refinement_scores_reference (Eq. 7-11
    row by row in float64): V exactly; Ŝ to 1e-6, the float32 rounding of the fast form's exp and
    31-tap sums."""
    cfg = SFRConfig(path=path, connectivity=connectivity, normalise=normalise, distance_decay=decay)
    for labels in _label_maps():
        trace = RefinementTrace()
        fast = refinement_scores(labels, cfg, trace)
        want = refinement_scores_reference(labels, cfg)
        torch.testing.assert_close(fast.double(), want, atol=1e-6, rtol=0)
        if decay:
            for b in range(labels.shape[0]):
                for i in range(labels.shape[1] * labels.shape[2]):
                    assert trace.valid_path[b, i].tolist() == [
                        v == 1.0 for v in valid_paths_reference(labels[b], i, cfg)
                    ]
