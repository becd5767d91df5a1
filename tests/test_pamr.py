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
