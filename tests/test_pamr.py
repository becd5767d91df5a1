"""PAMR on hand-built inputs."""

from __future__ import annotations

import torch

from resclip.pamr import pamr, pamr_affinity


def test_uniform_image_averages_the_neighbours():
    image = torch.zeros(1, 3, 20, 20)
    mask = torch.zeros(1, 1, 20, 20)
    mask[0, 0, 10, 10] = 16.0
    aff = pamr_affinity(image, (1,))
    assert torch.allclose(aff, torch.full_like(aff, 1 / 8))
    out = pamr(image, mask, steps=1, dilations=(1,))
    # every one of the 8 neighbours of (10, 10) receives 16 / 8; the centre itself gets nothing
    assert out[0, 0, 9:12, 9:12].tolist() == [[2.0, 2.0, 2.0], [2.0, 0.0, 2.0], [2.0, 2.0, 2.0]]
    assert out.sum().item() == 16.0


def test_affinities_favour_similar_pixels():
    image = torch.zeros(1, 1, 8, 8)
    image[..., :, 4:] = 1.0  # two flat halves
    aff = pamr_affinity(image, (1,))
    # pixel (3, 3) on the edge: its left neighbour (same side) outweighs its right one (other side)
    left, right = 3, 4  # neighbour order: (-1,-1), (-1,0), (-1,1), (0,-1), (0,1), ...
    assert aff[0, left, 3, 3] > 10 * aff[0, right, 3, 3]
    assert torch.allclose(aff.sum(dim=1), torch.ones(1, 8, 8))


def test_zero_steps_is_identity_and_shapes_are_checked():
    mask = torch.randn(1, 2, 6, 6)
    assert pamr(torch.zeros(1, 3, 6, 6), mask, steps=0) is mask
    try:
        pamr(torch.zeros(1, 3, 5, 6), mask, steps=1)
    except ValueError as err:
        assert "sizes differ" in str(err)
    else:  # pragma: no cover
        raise AssertionError("size mismatch accepted")


def test_sparse_and_shifted_propagation_agree():
    """The CPU sparse-matrix form sums the same products in the same order as the shifted-copy form."""
    from resclip.pamr import _propagate_shifted, _propagate_sparse

    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 23, 31, generator=gen)
    mask = torch.randn(5, 23, 31, generator=gen)
    aff = pamr_affinity(image, (2, 5))[0]
    for steps in (3, 4):
        sparse = torch.empty(23, 31, 5).permute(2, 0, 1)  # channels-last output
        shifted = mask.clone()  # in place
        _propagate_sparse(aff, mask, steps, (2, 5), sparse)
        _propagate_shifted(aff, shifted, steps, (2, 5), shifted)
        torch.testing.assert_close(sparse, shifted, atol=1e-6, rtol=0)
    wide = torch.randn(37, 23, 31, generator=gen)  # 3 groups of the sparse form: 16, 16, 5
    sparse, shifted = torch.empty_like(wide), torch.empty_like(wide)
    _propagate_sparse(aff, wide, 2, (2, 5), sparse)
    _propagate_shifted(aff, wide, 2, (2, 5), shifted)
    torch.testing.assert_close(sparse, shifted, atol=1e-6, rtol=0)


def test_affinity_matches_the_stacked_std_formula():
    """The two-pass std equals torch.std over the stacked 3x3 windows of every dilation."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 12, 17, generator=gen)
    dil = (1, 3)
    views, diffs = [], []
    for d in dil:
        p = F.pad(image, [d] * 4, mode="replicate")

        def view(dy: int, dx: int, p=p, d=d) -> torch.Tensor:
            return p[..., d + dy * d : d + dy * d + 12, d + dx * d : d + dx * d + 17]

        views += [view(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        diffs += [(image - view(dy, dx)).abs() for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    std = torch.stack(views, 2).std(dim=2, keepdim=True)
    want = (-torch.stack(diffs, 2) / (1e-8 + 0.1 * std)).mean(dim=1).softmax(dim=1)
    torch.testing.assert_close(pamr_affinity(image, dil), want, atol=1e-6, rtol=1e-5)


def test_the_shifted_form_used_off_cpu_gives_the_same_refinement(monkeypatch):
    """GPUs run the shifted-copy form; forced on CPU, ``pamr`` gives what the sparse form gives."""
    import resclip.pamr as pamr_mod

    gen = torch.Generator().manual_seed(2)
    image = torch.rand(2, 3, 40, 50, generator=gen)
    mask = torch.randn(2, 20, 40, 50, generator=gen)
    want = pamr(image, mask, 3, (2, 5))
    monkeypatch.setattr(pamr_mod, "_propagate_sparse", pamr_mod._propagate_shifted)
    # float rounding only: values up to ~4 in magnitude, so relative as well as absolute 1e-6
    torch.testing.assert_close(pamr(image, mask, 3, (2, 5)), want, atol=1e-6, rtol=1e-6)
    assert pamr(image, mask, 0) is mask


def test_plain_step_is_what_both_fast_forms_compute():
    """``pamr_step`` is the reference: the off-CPU form repeats it exactly; the sparse CPU form sums the
    same products in the same order, equal to float rounding (1e-6)."""
    from resclip.pamr import _propagate_shifted, _propagate_sparse, pamr_step

    gen = torch.Generator().manual_seed(4)
    for (h, w), dil in [((17, 29), (1, 3)), ((30, 21), (8, 16)), ((9, 9), (2,))]:
        image = torch.rand(1, 3, h, w, generator=gen)
        mask = torch.randn(6, h, w, generator=gen)
        aff = pamr_affinity(image, dil)[0]
        want = mask
        for _ in range(3):
            want = pamr_step(aff, want, dil)
        shifted, sparse = torch.empty_like(mask), torch.empty_like(mask)
        _propagate_shifted(aff, mask, 3, dil, shifted)
        _propagate_sparse(aff, mask, 3, dil, sparse)
        assert torch.equal(shifted, want)
        torch.testing.assert_close(sparse, want, atol=1e-6, rtol=1e-6)


def test_no_warning_filter_is_installed_and_no_notice_escapes():
    """The sparse form silences torch's one-time "beta" notice where it builds the matrix, leaving the
    process-wide warning filters as they were."""
    import subprocess
    import sys
    import warnings

    before = list(warnings.filters)
    pamr(torch.rand(1, 3, 12, 12), torch.rand(1, 2, 12, 12), 2, (1, 2))
    assert warnings.filters == before
    code = (
        "import torch\nfrom resclip.pamr import pamr\n"
        "pamr(torch.rand(1, 3, 9, 9), torch.rand(1, 2, 9, 9), 1)"
    )
    cmd = [sys.executable, "-W", "error::UserWarning", "-c", code]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
