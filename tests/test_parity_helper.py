"""The cross-CPU allowance of the golden comparisons is narrow: it cannot hide a real difference."""

from __future__ import annotations

import numpy as np
import pytest

from parity import assert_parity


def test_within_tolerance_passes() -> None:
    want = np.linspace(0, 1, 10_000, dtype=np.float32)
    assert_parity(want + 9e-6, want, atol=1e-5)


def test_a_few_elements_slightly_over_pass() -> None:
    want = np.zeros(10_000)
    got = want.copy()
    got[:10] = 2.5e-5  # 0.1% of the elements, under 3x the tolerance
    assert_parity(got, want, atol=1e-5)


@pytest.mark.parametrize(("count", "value"), [(11, 2e-5), (1, 3.1e-5), (10_000, 1.1e-5)])
def test_more_or_larger_differences_fail(count: int, value: float) -> None:
    want = np.zeros(10_000)
    got = want.copy()
    got[:count] = value
    with pytest.raises(AssertionError, match="Not equal to tolerance rtol=0, atol=1e-05"):
        assert_parity(got, want, atol=1e-5)


def test_shape_mismatch_fails() -> None:
    with pytest.raises(AssertionError):
        assert_parity(np.zeros(3), np.zeros(4), atol=1e-5)
