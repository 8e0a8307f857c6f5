"""Partitioning: disjoint, covering, deterministic; Dirichlet skew; minimum size."""

import numpy as np
import pytest

from common.partition import dirichlet_partition, iid_partition, label_histograms, partition_indices

LABELS = np.repeat(np.arange(10), 300)  # 3000 samples, 10 balanced classes


def _check_exact_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    assert np.array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("num_partitions", [1, 7, 20])
def test_partitions_are_disjoint_and_cover(scheme: str, num_partitions: int) -> None:
    parts = partition_indices(LABELS, scheme, num_partitions, seed=3, alpha=0.5, min_size=5)
    assert len(parts) == num_partitions
    _check_exact_cover(parts, len(LABELS))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_deterministic_for_a_seed(scheme: str) -> None:
    a = partition_indices(LABELS, scheme, 10, seed=11, alpha=0.3)
    b = partition_indices(LABELS, scheme, 10, seed=11, alpha=0.3)
    c = partition_indices(LABELS, scheme, 10, seed=12, alpha=0.3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_sizes_are_balanced_and_labels_mixed() -> None:
    parts = iid_partition(len(LABELS), 10, seed=0)
    assert {len(p) for p in parts} == {300}
    hist = label_histograms(LABELS, parts, 10)
    assert hist.min() > 10  # every client sees every class


def test_small_alpha_gives_skewed_label_histograms() -> None:
    skewed = label_histograms(LABELS, dirichlet_partition(LABELS, 10, alpha=0.05, seed=0, min_size=10), 10)
    mild = label_histograms(LABELS, dirichlet_partition(LABELS, 10, alpha=100.0, seed=0, min_size=10), 10)

    def dominant_share(h: np.ndarray) -> float:
        return float(np.mean(h.max(axis=1) / h.sum(axis=1)))

    assert dominant_share(skewed) > 0.6  # most of a client's data is one class
    assert dominant_share(mild) < 0.2  # close to the balanced 0.1
    assert (skewed == 0).sum() > 30  # many (client, class) cells empty


def test_min_partition_size_is_respected_or_named() -> None:
    parts = dirichlet_partition(LABELS, 20, alpha=0.1, seed=0, min_size=40)
    assert min(len(p) for p in parts) >= 40
    with pytest.raises(ValueError, match="min-partition-size=2000"):
        dirichlet_partition(LABELS, 20, alpha=0.1, seed=0, min_size=2000, max_tries=5)
    with pytest.raises(ValueError, match="min-partition-size=400"):
        iid_partition(len(LABELS), 10, seed=0, min_size=400)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_partition(LABELS, 5, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="valid choices: iid, dirichlet"):
        partition_indices(LABELS, "shards", 5, seed=0)
    with pytest.raises(ValueError, match="cannot split 3000 samples into 5000"):
        iid_partition(3000, 5000, seed=0)
