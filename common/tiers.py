"""Pure helpers of the width- and tier-based baselines (no Flower).

* AllSmall (Liu et al., KDD 2022): the whole federation trains one model whose width is scaled
  down until its training memory fits the smallest budget; :func:`choose_width` walks a ladder.
* TiFL (Chai et al., HPDC 2020): clients are grouped into tiers by their (measured or simulated)
  round time; each round one tier is chosen, with probabilities adapted from per-tier accuracy
  (Algorithm 2: tiers with lower accuracy are chosen more often, each tier at most ``credits``
  times).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

WIDTH_LADDER: tuple[float, ...] = (1.0, 0.875, 0.75, 0.625, 0.5, 0.4375, 0.375, 0.3125, 0.25, 0.1875, 0.125, 0.0625)
"""Relative widths AllSmall tries, widest first (multiples of the configured width)."""


def choose_width(base_width: float, fits: Callable[[float], bool], ladder: Sequence[float] = WIDTH_LADDER) -> float:
    """The widest ``base_width * r`` (r from ``ladder``, descending) for which ``fits(width)`` is true.

    Raises ``ValueError`` naming the narrowest width tried if none fits.
    """
    for r in sorted(ladder, reverse=True):
        width = base_width * r
        if fits(width):
            return width
    raise ValueError(f"no width down to {base_width * min(ladder):g} fits the smallest memory budget")


def assign_tiers(times: Mapping[int, float], num_tiers: int) -> list[list[int]]:
    """Clients grouped into ``num_tiers`` tiers of near-equal size by round time, fastest first."""
    if num_tiers < 1:
        raise ValueError(f"tifl-tiers must be >= 1, got {num_tiers}")
    order = sorted(times, key=lambda c: (times[c], c))
    tiers = [list(map(int, t)) for t in np.array_split(np.array(order, dtype=int), min(num_tiers, max(1, len(order))))]
    return [sorted(t) for t in tiers if len(t)]


def tier_probabilities(accuracies: Sequence[float | None], credits: Sequence[int]) -> np.ndarray:
    """TiFL's adaptive tier probabilities: ranked by accuracy, the least accurate tier most likely.

    Tier with rank j (0 = lowest accuracy) of n eligible tiers gets weight n - j (Algorithm 2);
    tiers without accuracy yet count as lowest; tiers with no credits left get 0. Before any tier
    has an accuracy, every eligible tier is equally likely (Algorithm 2's initialisation).
    """
    n = len(accuracies)
    eligible = [i for i in range(n) if credits[i] > 0]
    probs = np.zeros(n)
    if not eligible:
        return probs
    if all(accuracies[i] is None for i in eligible):
        probs[eligible] = 1.0 / len(eligible)
        return probs
    ranked = sorted(eligible, key=lambda i: (-1.0 if accuracies[i] is None else accuracies[i], i))
    for rank, i in enumerate(ranked):
        probs[i] = len(ranked) - rank
    return probs / probs.sum()
