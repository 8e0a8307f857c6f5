"""Spread across seeds and paired differences: the statistics of ``bench compare --seeds N`` and the report.

Pure functions (no Flower, no torch), unit-tested in ``tests/test_compare_stats.py``.

* :func:`spread`: mean and sample standard deviation (``ddof = 1``, the unbiased variance) of one
  metric over the seeds of one entry; one seed has no spread (``std = None``).
* :func:`paired_difference`: entry A minus entry B seed by seed (the seeds share partitions,
  device draws and initialisation, so pairing removes what the seed does to both), with the
  mean and sample std of the differences, Student's t statistic
  ``t = mean / (std / sqrt(n))`` with ``n - 1`` degrees of freedom and the two-sided 95 %
  confidence interval ``mean +- t_0.975(n - 1) * std / sqrt(n)``. The difference is called
  significant when that interval excludes 0 (equivalently ``|t| > t_0.975``).
* :func:`pooled_sigma`: one run's noise std from differences between twins (the same seed run
  twice under other float rounding): each twin carries its own noise, so
  ``Var(d) = 2 sigma^2`` and ``sigma = sqrt(mean(d^2) / 2)`` (the twins' expected difference is 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

T_975: dict[int, float] = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}
"""Two-sided 95 % quantiles of Student's t by degrees of freedom (standard tables, 3 decimals)."""


def t_quantile_975(df: int) -> float:
    """``t_0.975(df)``; between tabulated values the next smaller df (a conservative, wider interval)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df > 30:
        return 1.960
    return T_975[max(k for k in T_975 if k <= df)]


@dataclass(frozen=True)
class Spread:
    """One metric over seeds: mean, sample std (None for one seed) and the per-seed values."""

    mean: float
    std: float | None
    values: tuple[float, ...]


def spread(values: Sequence[float | None]) -> Spread | None:
    """Mean and sample std of the values that are not None (None if all are missing)."""
    xs = tuple(float(v) for v in values if v is not None)
    if not xs:
        return None
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return Spread(mean, std, xs)


@dataclass(frozen=True)
class PairedDifference:
    """A - B seed by seed: mean, sample std, t statistic and 95 % CI of the mean (None for one seed)."""

    mean: float
    std: float | None
    n: int
    t: float | None
    ci95: tuple[float, float] | None
    differences: tuple[float, ...]

    @property
    def significant(self) -> bool | None:
        """Whether the 95 % confidence interval of the mean difference excludes 0 (None for one seed)."""
        if self.ci95 is None:
            return None
        return self.ci95[0] > 0 or self.ci95[1] < 0


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """Paired differences ``a[i] - b[i]`` (same seed i) with their spread and Student-t interval."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need the same non-zero length, got {len(a)} and {len(b)}")
    diffs = tuple(float(x) - float(y) for x, y in zip(a, b, strict=True))
    s = spread(diffs)
    assert s is not None
    n = len(diffs)
    if s.std is None:
        return PairedDifference(s.mean, None, n, None, None, diffs)
    sem = s.std / math.sqrt(n)
    half = t_quantile_975(n - 1) * sem
    t = math.inf if sem == 0 and s.mean != 0 else (0.0 if sem == 0 else s.mean / sem)
    return PairedDifference(s.mean, s.std, n, t, (s.mean - half, s.mean + half), diffs)


def pooled_sigma(differences: Sequence[float]) -> float:
    """One run's noise std from twin differences: ``sqrt(mean(d^2) / 2)`` (0 without differences)."""
    if not differences:
        return 0.0
    return math.sqrt(sum(d * d for d in differences) / len(differences) / 2)
