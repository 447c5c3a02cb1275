"""95 % intervals for rates (ESR, PSR, ASR, in %) over training seeds and images, and for paired differences.

A rate measured on several training seeds varies for two reasons: the seed changes the erased model, and each
model is judged on a finite sample of images. The spread of the per-seed rates carries both, so the interval is
Student's t over the per-seed rates; it is widened to at least the Wilson interval of all images pooled, so a rate
that comes out the same on every seed (100 % on three seeds) still shows the uncertainty of its images. With
2-3 seeds the t quantile is large (4.3 at 3 seeds): the interval is wide because the data are few, not by choice.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from erasekit.errors import ErasekitError

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean over training seeds with its interval (same unit as the rates: %)."""

    mean: float
    lo: float
    hi: float
    seeds: int
    images: int | None = None  # images behind each seed's rate (None where unknown)

    @property
    def half_width(self) -> float:
        """Half the interval's width."""
        return (self.hi - self.lo) / 2

    def cell(self) -> str:
        """``mean [lo, hi]`` with one decimal, as the tables print it."""
        return f"{self.mean:.1f} [{self.lo:.1f}, {self.hi:.1f}]"

    def as_dict(self) -> dict[str, float | int | None]:
        """JSON form."""
        return {"mean": round(self.mean, 4), "lo": round(self.lo, 4), "hi": round(self.hi, 4), "seeds": self.seeds, "images": self.images}

    def excludes_zero(self) -> bool:
        """For a difference: does it resolve (the interval lies on one side of 0)?"""
        return self.lo > 0 or self.hi < 0


def _check(values: Sequence[float], what: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) < 2:
        raise ErasekitError(f"an interval over training seeds needs at least 2 seeds, got {len(values)} {what}; pass --seeds 2 or more")
    if not all(math.isfinite(v) for v in values):
        raise ErasekitError(f"cannot take an interval over {what} that are not finite numbers: {values}")
    return values


def _t_half_width(values: list[float], level: float) -> float:
    from scipy.stats import t

    return float(t.ppf((1 + level) / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def rate_interval(per_seed: Sequence[float], images: int | None = None, level: float = LEVEL) -> Interval:
    """Mean of per-seed rates (%) and its interval: t over seeds, widened to the pooled Wilson interval of ``images`` per seed."""
    values = _check(per_seed, "per-seed rates")
    mean = statistics.fmean(values)
    h = _t_half_width(values, level)
    lo, hi = mean - h, mean + h
    if images:
        from scipy.stats import binomtest

        n = images * len(values)
        k = int(round(sum(v / 100 * images for v in values)))
        wilson = binomtest(min(max(k, 0), n), n).proportion_ci(confidence_level=level, method="wilson")
        lo, hi = min(lo, 100 * wilson.low), max(hi, 100 * wilson.high)
    return Interval(mean, max(lo, 0.0), min(hi, 100.0), len(values), images)


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean of per-seed differences a - b (the same seeds on both sides) and its t interval."""
    a, b = _check(a, "per-seed rates"), _check(b, "per-seed rates")
    if len(a) != len(b):
        raise ErasekitError(f"a paired difference needs the same seeds on both sides, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(diffs)
    h = _t_half_width(diffs, level)
    return Interval(mean, mean - h, mean + h, len(diffs))


def verdict(diff: Interval, higher: str = "higher", lower: str = "lower") -> str:
    """'no difference' when the interval holds 0, else which way it resolves."""
    if not diff.excludes_zero():
        return "no difference"
    return higher if diff.mean > 0 else lower
