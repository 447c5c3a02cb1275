"""95 % intervals over training seeds: known values, the pooled-image floor, paired differences, and bad input."""

from __future__ import annotations

import math

import pytest

from erasekit.errors import ErasekitError
from erasekit.eval.intervals import paired_difference, rate_interval, verdict


def test_rate_interval_is_students_t_over_seeds() -> None:
    span = rate_interval([80.0, 90.0, 100.0])
    half = 4.302652729911275 * 10.0 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert span.mean == pytest.approx(90.0)
    assert span.lo == pytest.approx(90.0 - half) and span.hi == 100.0  # clipped to a rate's range


def test_a_rate_equal_on_every_seed_keeps_the_uncertainty_of_its_images() -> None:
    span = rate_interval([100.0, 100.0, 100.0], images=32)
    assert span.hi == 100.0 and span.lo == pytest.approx(100 * 96 / (96 + 1.959963984540054**2), rel=1e-6)  # Wilson, 96 of 96
    assert rate_interval([100.0, 100.0, 100.0], images=320).lo > span.lo  # more images, a tighter interval


def test_paired_difference_resolves_only_when_it_excludes_zero() -> None:
    close = paired_difference([71.0, 62.0, 80.0], [70.0, 60.0, 81.0])
    assert verdict(close) == "no difference" and close.lo < 0 < close.hi
    clear = paired_difference([80.0, 81.0, 82.0], [70.0, 70.5, 71.0])
    assert clear.mean == pytest.approx(10.5) and verdict(clear) == "higher"


@pytest.mark.parametrize("values", [[], [90.0], [90.0, math.nan]])
def test_bad_input_is_a_one_line_error(values: list[float]) -> None:
    with pytest.raises(ErasekitError):
        rate_interval(values)
    with pytest.raises(ErasekitError, match="same seeds on both sides"):
        paired_difference([1.0, 2.0], [1.0, 2.0, 3.0])
