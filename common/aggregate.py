"""Aggregation of client arrays (pure numpy, no Flower)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def weighted_average(updates: Sequence[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """FedAvg aggregation (SmartFreeze Eq. 1): sum_i (n_i / n) * w_i for every key.

    ``updates`` is a sequence of (arrays, weight) with weight = local sample count n_i. All
    updates must hold the same keys and shapes. Sums run in float64 and the result takes each
    key's original dtype (integer buffers such as BatchNorm's ``num_batches_tracked`` are
    rounded).
    """
    if not updates:
        raise ValueError("weighted_average: no updates to aggregate")
    total = float(sum(w for _, w in updates))
    if not total > 0:
        raise ValueError(f"weighted_average: total weight must be > 0, got {total}")
    keys = list(updates[0][0])
    for arrays, _ in updates[1:]:
        if set(arrays) != set(keys):
            raise ValueError(f"weighted_average: updates hold different keys ({sorted(set(arrays) ^ set(keys))[:5]})")
    out: dict[str, np.ndarray] = {}
    for k in keys:
        ref = updates[0][0][k]
        acc = np.zeros(ref.shape, dtype=np.float64)
        for arrays, w in updates:
            a = arrays[k]
            if a.shape != ref.shape:
                raise ValueError(
                    f"weighted_average: key {k!r} has shape {a.shape} in one update, {ref.shape} in another"
                )
            acc += a.astype(np.float64) * (w / total)
        out[k] = np.rint(acc).astype(ref.dtype) if np.issubdtype(ref.dtype, np.integer) else acc.astype(ref.dtype)
    return out
