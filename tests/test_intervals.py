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


def _record(seed: int, metrics: dict[str, dict[str, float]], evaluations: dict[str, dict]) -> dict:
    from erasekit.compare_seeds import rate_counts

    return {"seed": seed, "run": f"m-seed{seed}", "wall_s": 1.0, "metrics": metrics,
            "counts": {suite: rate_counts(e) for suite, e in evaluations.items()}}


def test_every_rate_of_a_seeded_comparison_keeps_its_images_pooled_interval() -> None:
    """The skull erased, judged on indirect prompts and on objects: no group of either suite is 'erased'.

    Equal rates on every seed must still get the Wilson interval of the images behind them (192 indirect-prompt
    images for implicit@0.5, 80 object images for PSR-1 per seed), not a zero-width one; FID is no proportion.
    """
    from erasekit.compare_seeds import aggregate

    implicit = {"erased": [], "images": [{"group": f"prompt {i % 24}"} for i in range(192)]}
    objects = {"erased": [], "images": [{"group": f"object {i % 10}"} for i in range(80)]}
    metrics = {"toy-implicit": {"implicit@0.5": 1.5625, "FID vs base": 3.0}, "toy-objects": {"PSR-1": 100.0}}
    row = aggregate("trce", [_record(s, metrics, {"toy-implicit": implicit, "toy-objects": objects}) for s in range(3)], intervals=True)
    rate = row["intervals"]["toy-implicit"]["implicit@0.5"]
    wilson = rate_interval([1.5625] * 3, images=192)
    assert rate["images"] == 192 and rate["lo"] == pytest.approx(wilson.lo, abs=1e-3) and rate["hi"] == pytest.approx(wilson.hi, abs=1e-3)
    assert rate["lo"] < 1.5625 < rate["hi"]  # 9 of 576 images: [0.8, 2.9], not [1.6, 1.6]
    psr = row["intervals"]["toy-objects"]["PSR-1"]
    assert psr["images"] == 80 and psr["lo"] < 99.0 and psr["hi"] == 100.0
    assert row["intervals"]["toy-implicit"]["FID vs base"]["images"] is None  # a score, not a rate: t over seeds alone


def test_esr_and_psr_pool_the_erased_and_the_kept_groups_images() -> None:
    from erasekit.compare_seeds import images_behind, rate_counts

    counts = rate_counts({"erased": ["circle"], "images": [{"group": g} for g in ["circle"] * 16 + ["ring"] * 144]})
    assert images_behind("ESR-1", counts) == 16 and images_behind("PSR-5", counts) == 144 and images_behind("CLIP", counts) is None
