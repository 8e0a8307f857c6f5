"""Checks on clients' training replies before anything is aggregated (pure numpy, no Flower).

A reply is rejected, with a reason, when its arrays do not match what was sent (missing or
extra keys, other shapes, non-float data where floats were sent), hold NaN or Inf, claim a
``num-examples`` that is not a positive integer or exceeds what the node reported holding, or
when its update is far larger than the round's others (root-mean-square update more than
``norm_factor`` times the round's median, with at least three replies to compare).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

MAX_EXAMPLES = 10**8
"""Upper bound on ``num-examples`` when the node's data size is not known."""


def check_arrays(
    arrays: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], expected_keys: set[str]
) -> str | None:
    """Reason to reject ``arrays`` against the ``expected`` reference arrays, or None if they are fine."""
    missing = sorted(expected_keys - set(arrays))
    extra = sorted(set(arrays) - expected_keys)
    if missing or extra:
        return f"keys: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
    for key in expected_keys:
        got, ref = arrays[key], expected[key]
        if got.size != ref.size or (got.shape != ref.shape and got.size != 1):
            return f"shape: {key} is {got.shape}, expected {ref.shape}"
        if np.issubdtype(ref.dtype, np.floating) and not np.issubdtype(got.dtype, np.floating):
            return f"dtype: {key} is {got.dtype}, expected {ref.dtype}"
        if np.issubdtype(ref.dtype, np.integer) and not np.issubdtype(got.dtype, np.integer):
            return f"dtype: {key} is {got.dtype}, expected {ref.dtype}"
        if np.issubdtype(got.dtype, np.floating) and not np.isfinite(got).all():
            return f"non-finite: {key} holds NaN or Inf"
    return None


def check_num_examples(value: object, known: int | None) -> str | None:
    """Reason to reject a reported sample count, or None: a positive integer, at most the node's data."""
    try:
        n = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return f"num-examples: {value!r} is not a number"
    if not math.isfinite(n) or n != int(n) or n < 1:
        return f"num-examples: {value!r} is not a positive integer"
    limit = known if known else MAX_EXAMPLES
    if n > limit:
        return f"num-examples: {int(n)} exceeds the {limit} samples the node holds"
    return None


def update_norm(arrays: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> float:
    """Root-mean-square update (reply minus what was sent) over the floating-point values.

    Per value rather than the plain L2 norm, so that sub-models of different sizes (HeteroFL's
    width rates, DepthFL's depths) are compared fairly within a round.
    """
    total = 0.0
    count = 0
    for key, value in arrays.items():
        ref = sent[key]
        if np.issubdtype(ref.dtype, np.floating):
            diff = value.astype(np.float64).reshape(ref.shape) - ref
            total += float(np.dot(diff.ravel(), diff.ravel()))
            count += diff.size
    return math.sqrt(total / count) if count else 0.0


def norm_outliers(norms: Mapping[int, float], factor: float) -> dict[int, str]:
    """Clients whose update norm exceeds ``factor`` x the median of the round (needs >= 3 norms)."""
    if len(norms) < 3:
        return {}
    median = float(np.median(list(norms.values())))
    return {
        c: f"norm: update norm {n:.3g} is more than {factor:g} x the round's median {median:.3g}"
        for c, n in norms.items()
        if n > factor * median and n > 0
    }
