"""Deterministic data partitioning across clients (pure numpy, no Flower).

Two schemes:

* ``iid``: a seeded permutation cut into near-equal contiguous pieces.
* ``dirichlet``: label skew; for each class, its samples are split among the partitions in
  proportions drawn from Dirichlet(alpha, ..., alpha) (Hsu et al., 2019). Draws are repeated
  (same seeded generator) until every partition holds at least ``min_size`` samples.

Both return a list of index arrays: disjoint, covering every training sample exactly once,
identical for identical arguments.
"""

from __future__ import annotations

import numpy as np

PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet")


def iid_partition(num_samples: int, num_partitions: int, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Split ``range(num_samples)`` uniformly at random into ``num_partitions`` near-equal parts."""
    _check_counts(num_samples, num_partitions, min_size)
    if num_samples // num_partitions < min_size:
        raise ValueError(
            f"iid partition: {num_samples} samples over {num_partitions} partitions gives "
            f"{num_samples // num_partitions} per partition, below min-partition-size={min_size}"
        )
    perm = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(p) for p in np.array_split(perm, num_partitions)]


def dirichlet_partition(
    labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed partition: per class, proportions ~ Dirichlet(alpha) over the partitions.

    Smaller ``alpha`` gives more skew. Raises ``ValueError`` naming the arguments when no draw
    within ``max_tries`` gives every partition ``min_size`` samples.
    """
    labels = np.asarray(labels)
    _check_counts(len(labels), num_partitions, min_size)
    if not alpha > 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha!r}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for idx in by_class:
            props = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for p, piece in enumerate(np.split(idx, cuts)):
                parts[p].append(piece)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(r) for r in result) >= min_size:
            return result
    raise ValueError(
        f"dirichlet partition: no draw in {max_tries} tries gave every one of {num_partitions} "
        f"partitions at least min-partition-size={min_size} samples (alpha={alpha}, "
        f"{len(labels)} samples); raise alpha, lower min-partition-size or use fewer partitions"
    )


def partition_indices(
    labels: np.ndarray,
    scheme: str,
    num_partitions: int,
    seed: int,
    alpha: float = 0.5,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Partition sample indices by ``scheme`` (one of :data:`PARTITION_SCHEMES`)."""
    if scheme == "iid":
        return iid_partition(len(labels), num_partitions, seed, min_size)
    if scheme == "dirichlet":
        return dirichlet_partition(labels, num_partitions, alpha, seed, min_size)
    raise ValueError(f"unknown partition scheme {scheme!r}; valid choices: {', '.join(PARTITION_SCHEMES)}")


def label_histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-partition label counts, shape (num_partitions, num_classes)."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def _check_counts(num_samples: int, num_partitions: int, min_size: int) -> None:
    if num_partitions < 1:
        raise ValueError(f"num-partitions must be >= 1, got {num_partitions!r}")
    if min_size < 0:
        raise ValueError(f"min-partition-size must be >= 0, got {min_size!r}")
    if num_samples < num_partitions:
        raise ValueError(f"cannot split {num_samples} samples into {num_partitions} partitions")


def partition_plan(labels: np.ndarray, spec: object, num_partitions: int) -> list[np.ndarray]:
    """The partition a run's clients make: ``spec`` is its :class:`common.dataspec.DataSpec`.

    One call for the clients (:func:`common.data.partitions`) and for the launcher's check
    before anything starts (:func:`common.runcheck.check_partition`), so both make the same plan.
    """
    return partition_indices(
        labels,
        spec.partition,  # type: ignore[attr-defined]
        num_partitions,
        seed=spec.seed,  # type: ignore[attr-defined]
        alpha=spec.dirichlet_alpha,  # type: ignore[attr-defined]
        min_size=spec.min_partition_size,  # type: ignore[attr-defined]
    )
