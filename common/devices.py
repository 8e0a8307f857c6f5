"""Simulated device population: a memory budget (MB) and a compute speed (FLOP/s) per client.

Every value comes deterministically from ``(seed, partition_id)``, so the server and each
client derive the same device without talking, and a client costs nothing until it is used.

Memory profiles (SmartFreeze Sec. V-A takes the RAM left free on phones and boards by
background apps, after the Android Authority survey it cites):

* total RAM is drawn from a mix of 2/3/4/6/8/12 GB devices (Raspberry Pi, Jetson, phones);
* the free share after background apps is Beta(2, 5) under ``high-contention`` (mean 29 %, many
  apps such as a browser running) and Beta(5, 2) under ``low-contention`` (mean 71 %);
* the free RAM is *scaled* to the configured model and batch size: budgets are expressed
  relative to the modelled full-model training memory ``full_mb`` so that, under
  ``high-contention``, only ``FULL_FIT_SHARE`` (10 %) of devices can train the full model. The
  same scale applies to ``low-contention``, where far more devices fit. Our CIFAR models need
  tens of MB rather than GB, so absolute MB would make every device fit;
* budgets are floored at the larger of ``min_fraction * full_mb`` (default 0.3) and ``floor_mb``
  (the caller passes the modelled memory of the cheapest progressive stage): a device that
  cannot train even one block could not take part in any strategy and is outside the population
  studied (the premise of SmartFreeze's evaluation, where every device trains some block).

``uniform`` draws budgets uniformly in [min_fraction, 1.5] x full_mb; ``list`` cycles through an
explicit list of budgets (MB) by partition id. ``none`` gives every device an unlimited budget
(the unconstrained reference). Speeds: a per-class FLOP/s figure (board, older phone, newer
phone) with lognormal spread, correlated with RAM (bigger devices are newer and faster).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

DEVICE_PROFILES: tuple[str, ...] = ("none", "high-contention", "low-contention", "uniform", "list")
FULL_FIT_SHARE = 0.10
RAM_GB = np.array([2.0, 3.0, 4.0, 6.0, 8.0, 12.0])
RAM_P = np.array([0.15, 0.20, 0.30, 0.20, 0.10, 0.05])
# effective training FLOP/s by RAM class (Raspberry Pi 4 / Jetson Nano class .. recent phones)
SPEED_GFLOPS = np.array([4.0, 6.0, 10.0, 16.0, 24.0, 32.0])
FREE_SHARE_BETA = {"high-contention": (2.0, 5.0), "low-contention": (5.0, 2.0)}


@dataclass(frozen=True)
class Device:
    """One client's resources: memory budget in MB (2**20 bytes) and training speed in FLOP/s."""

    memory_mb: float
    speed_flops: float

    def fits(self, required_mb: float) -> bool:
        """True if a sub-model needing ``required_mb`` MB can train within the budget."""
        return required_mb <= self.memory_mb


def _draw(profile: str, rng: np.random.Generator) -> tuple[float, float]:
    """(free RAM share x RAM in GB, speed in FLOP/s) for one device."""
    cls = rng.choice(len(RAM_GB), p=RAM_P)
    a, b = FREE_SHARE_BETA[profile]
    free_gb = RAM_GB[cls] * rng.beta(a, b)
    speed = SPEED_GFLOPS[cls] * 1e9 * float(np.exp(rng.normal(0.0, 0.25)))
    return float(free_gb), speed


@functools.lru_cache(maxsize=1)
def _high_contention_quantile() -> float:
    """Free RAM (GB) above which FULL_FIT_SHARE of high-contention devices lie (fixed reference draw)."""
    rng = np.random.default_rng(20240101)
    free = np.array([_draw("high-contention", rng)[0] for _ in range(20000)])
    return float(np.quantile(free, 1.0 - FULL_FIT_SHARE))


def parse_list(text: str, what: str) -> list[float]:
    """Comma-separated positive numbers, e.g. ``"300,450.5,800"``; errors name the bad item."""
    values: list[float] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            v = float(item)
        except ValueError:
            raise ValueError(f"{what}: {item!r} is not a number (expected e.g. '300,450,800')") from None
        if not v > 0:
            raise ValueError(f"{what}: {item!r} must be > 0")
        values.append(v)
    if not values:
        raise ValueError(f"{what}: empty list (expected e.g. '300,450,800')")
    return values


def simulated_device(
    profile: str,
    partition_id: int,
    seed: int,
    full_mb: float,
    min_fraction: float = 0.3,
    memory_list: str = "",
    floor_mb: float = 0.0,
) -> Device:
    """The device of client ``partition_id`` under ``profile`` (see module docstring)."""
    if profile not in DEVICE_PROFILES:
        raise ValueError(f"unknown device profile {profile!r}; valid choices: {', '.join(DEVICE_PROFILES)}")
    rng = np.random.default_rng([seed, partition_id, 7919])
    sampling_profile = profile if profile in FREE_SHARE_BETA else "high-contention"
    free_gb, speed = _draw(sampling_profile, rng)
    if profile == "none":
        return Device(float("inf"), speed)
    if profile == "list":
        budgets = parse_list(memory_list, "device-memory-mb")
        return Device(budgets[partition_id % len(budgets)], speed)
    floor = max(min_fraction * full_mb, floor_mb)
    if profile == "uniform":
        return Device(max(full_mb * float(rng.uniform(min_fraction, 1.5)), floor), speed)
    budget = full_mb * free_gb / _high_contention_quantile()
    return Device(max(budget, floor), speed)
