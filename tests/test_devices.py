"""Simulated device population: deterministic, profile shapes, floors, explicit lists."""

import math

import numpy as np
import pytest

from common.devices import FULL_FIT_SHARE, parse_list, simulated_device
from common.node import NodeConfigError, node_memory_mb


def budgets(profile: str, n: int = 2000, **kw: float) -> np.ndarray:
    return np.array([simulated_device(profile, i, 0, 100.0, **kw).memory_mb for i in range(n)])


def test_devices_are_deterministic_per_seed_and_partition() -> None:
    a = simulated_device("high-contention", 7, 3, 100.0)
    assert a == simulated_device("high-contention", 7, 3, 100.0)
    assert a != simulated_device("high-contention", 7, 4, 100.0)
    assert a.speed_flops > 1e9


def test_high_contention_lets_only_a_small_share_train_the_full_model() -> None:
    high = budgets("high-contention")
    low = budgets("low-contention")
    assert abs((high >= 100).mean() - FULL_FIT_SHARE) < 0.03
    assert (low >= 100).mean() > 0.4  # same scale, far less contention
    assert np.median(low) > 2 * np.median(high)


def test_floor_keeps_every_device_able_to_train_the_cheapest_stage() -> None:
    assert budgets("high-contention", min_fraction=0.3).min() == pytest.approx(30.0)
    assert budgets("high-contention", floor_mb=42.0).min() == pytest.approx(42.0)
    assert budgets("uniform", floor_mb=42.0).min() >= 42.0


def test_list_and_none_profiles() -> None:
    assert [simulated_device("list", i, 0, 100.0, memory_list="10, 20,30").memory_mb for i in range(4)] == [
        10.0,
        20.0,
        30.0,
        10.0,
    ]
    assert math.isinf(simulated_device("none", 0, 0, 100.0).memory_mb)
    with pytest.raises(ValueError, match="valid choices: none, high-contention"):
        simulated_device("phones", 0, 0, 100.0)


def test_parse_list_and_node_memory_errors_name_the_value() -> None:
    assert parse_list("1.5,2", "x") == [1.5, 2.0]
    with pytest.raises(ValueError, match="'abc' is not a number"):
        parse_list("1,abc", "device-memory-mb")
    with pytest.raises(ValueError, match="'-3' must be > 0"):
        parse_list("-3", "device-memory-mb")
    assert node_memory_mb({}) is None and node_memory_mb({"memory-mb": 512}) == 512.0
    with pytest.raises(NodeConfigError, match="memory-mb='lots' is not a number"):
        node_memory_mb({"memory-mb": "lots"})
    with pytest.raises(NodeConfigError, match="must be a positive number"):
        node_memory_mb({"memory-mb": 0})
