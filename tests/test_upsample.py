"""Band-wise bilinear upsampling equals PyTorch's whole-map resize."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from resclip.upsample import bilinear_rows, bilinear_rows_exact, row_bands, source_rows


def _whole(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize(("src", "size"), [((7, 9), (50, 61)), ((14, 14), (224, 224)), ((30, 40), (17, 23))])
def test_any_band_matches_the_whole_resize(src: tuple[int, int], size: tuple[int, int]) -> None:
    x = torch.randn(3, *src, generator=torch.Generator().manual_seed(0))
    whole = _whole(x, size)
    for start, stop in [(0, size[0]), (0, 1), (size[0] // 3, size[0] // 2 + 1), (size[0] - 1, size[0])]:
        band = bilinear_rows(x, size, start, stop)
        torch.testing.assert_close(band, whole[:, start:stop], atol=1e-6, rtol=1e-6)


def test_exact_form_is_bitwise_when_upsampling() -> None:
    x = torch.rand(3, 21, 28, generator=torch.Generator().manual_seed(1))
    size = (300, 500)
    whole = _whole(x, size)
    for start, stop in [(0, 37), (150, 151), (263, 300)]:
        assert torch.equal(bilinear_rows_exact(x, size, start, stop), whole[:, start:stop])


def test_a_slab_of_source_rows_gives_the_same_band() -> None:
    x = torch.randn(4, 40, 30, generator=torch.Generator().manual_seed(2))
    size = (123, 77)
    start, stop = 50, 80
    first, last = source_rows(40, size[0], start, stop)
    assert 0 <= first < last <= 40
    slab = x[:, first:last]
    assert torch.equal(bilinear_rows(slab, size, start, stop, height=40, offset=first),
                       bilinear_rows(x, size, start, stop))


def test_row_bands_cover_every_row_once_within_budget() -> None:
    bands = row_bands(1000, 640, 150, budget=1 << 20)
    assert bands[0][0] == 0 and bands[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bands))
    assert all((stop - start) * 640 * 150 <= 1 << 20 for start, stop in bands)
    assert row_bands(5, 10, 10**9) == [(r, r + 1) for r in range(5)]  # at least one row per band
