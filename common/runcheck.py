"""Checks of a run that need more than its config: the data file, the partition plan, the width, the CPUs.

``run.sh`` runs them (through :mod:`common.preflight`) before it starts Flower, so that a plan
that cannot work is one message at once instead of a failure on every node after the
simulation has started. Everything here is numpy only (no torch, no Flower): the dataset is
loaded by :mod:`common.arrays`, and the partition is made by the very function the clients call
(:func:`common.partition.partition_indices`) with the same seed and arguments, so a plan that
passes here is the plan the clients make.

Checked:

* the dataset (``dataset='npz'``: readable archive, arrays, dtypes and shapes, lengths, labels;
  ``synthetic``: made as the clients make it; ``cifar10``/``cifar100`` through torchvision are
  checked by the clients only);
* the partition of the training set over ``num_partitions`` clients (``partition``,
  ``min-partition-size``, ``dirichlet-alpha``, ``seed``);
* the width: the model's narrowest layer must keep at least :data:`common.zoo.MIN_CHANNELS`
  channels;
* CPUs per simulated client against this machine's CPUs (not with an external Ray cluster).
"""

from __future__ import annotations

import math
import os

from common.arrays import ArrayDataset, DataError, load_npz, make_synthetic
from common.config import ConfigError, RunConfig
from common.partition import partition_plan
from common.zoo import MIN_CHANNELS, MODEL_BASE_CHANNELS, scaled


def dataset_arrays(cfg: RunConfig) -> ArrayDataset | None:
    """The run's dataset as the clients will see it, or None when it comes through torchvision."""
    if cfg.dataset == "npz":
        return load_npz(cfg.data_path, cfg.num_classes)
    if cfg.dataset == "synthetic":
        return make_synthetic(cfg.synthetic_train_size, cfg.synthetic_test_size, cfg.seed, cfg.num_classes or 10)
    return None


def check_partition(cfg: RunConfig, ds: ArrayDataset, num_partitions: int) -> None:
    """Make the partition the clients will make; ConfigError naming the keys if it cannot be made."""
    try:
        partition_plan(ds.y_train, cfg.data_spec(), num_partitions)
    except ValueError as exc:
        raise ConfigError(
            f"the data cannot be partitioned over {num_partitions} clients ({len(ds.y_train)} training images, "
            f"partition={cfg.partition!r}, min-partition-size={cfg.min_partition_size}"
            + (f", dirichlet-alpha={cfg.dirichlet_alpha}" if cfg.partition == "dirichlet" else "")
            + f"): {exc}"
        ) from None


def check_width(cfg: RunConfig) -> None:
    """The narrowest layer of the model at ``width`` must keep at least MIN_CHANNELS channels."""
    base = MODEL_BASE_CHANNELS[cfg.model]
    if scaled(base, cfg.width) < MIN_CHANNELS:
        smallest = math.ceil((MIN_CHANNELS - 0.5) / base * 1000) / 1000
        raise ConfigError(
            f"width={cfg.width} leaves model {cfg.model!r} a narrowest layer of {scaled(base, cfg.width)} "
            f"channel(s) ({base} at width 1), fewer than {MIN_CHANNELS}: it would train at chance; "
            f"use width >= {smallest}"
        )


def check_cpus(cpus_per_client: float, available: int | None = None) -> None:
    """A simulated client cannot ask for more CPUs than the machine has (Ray would start no actor)."""
    available = available or os.cpu_count() or 1
    if cpus_per_client > available:
        raise ConfigError(
            f"--cpus-per-client {cpus_per_client:g} exceeds the {available} CPU(s) of this machine: no simulated "
            f"client could start; use --cpus-per-client <= {available}"
        )


def check_run(cfg: RunConfig, num_partitions: int | None = None, cpus_per_client: float | None = None) -> None:
    """Every check of the module docstring; raises ConfigError or DataError (both ValueError) naming the cause."""
    check_width(cfg)
    if cpus_per_client is not None and not os.environ.get("RAY_ADDRESS"):
        check_cpus(cpus_per_client)
    ds = dataset_arrays(cfg)
    if ds is not None and num_partitions:
        check_partition(cfg, ds, num_partitions)


__all__ = ["DataError", "check_cpus", "check_partition", "check_run", "check_width", "dataset_arrays"]
