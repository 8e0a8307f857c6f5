"""What determines a dataset and its partitioning: the data layer's cache key, without torch.

:mod:`common.config` builds a :class:`DataSpec` from the run config and validates ``dataset``
against :data:`DATASET_NAMES` without importing torch (``run.sh``'s preflight); :mod:`common.data`
loads and partitions what it describes.
"""

from __future__ import annotations

from dataclasses import dataclass

DATASET_NAMES: tuple[str, ...] = ("synthetic", "cifar10", "cifar100", "npz")


@dataclass(frozen=True)
class DataSpec:
    """Everything that determines a dataset and its partitioning (hashable cache key)."""

    dataset: str = "synthetic"
    data_path: str = ""
    data_dir: str = ""
    download: bool = False
    seed: int = 0
    synthetic_train_size: int = 6000
    synthetic_test_size: int = 1000
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    min_partition_size: int = 10
    val_fraction: float = 0.1
    num_classes: int = 0
    """0: the labels 0..C-1 found in the data (contiguous); C > 0: C classes, every label below C."""
