"""What a node says about itself in ``--node-config`` (partition, budget), validated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class NodeConfigError(ValueError):
    """A ``--node-config`` value is missing or invalid; the message names it."""


@dataclass(frozen=True)
class NodeIdentity:
    """A node's data partition: index ``partition_id`` of ``num_partitions``."""

    partition_id: int
    num_partitions: int


def _as_int(node_config: Mapping[str, Any], key: str) -> int:
    if key not in node_config:
        raise NodeConfigError(
            f"node-config has no {key!r} (got keys: {sorted(node_config) or 'none'}); start the SuperNode with "
            f'--node-config "partition-id=<i> num-partitions=<n>"'
        )
    value = node_config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise NodeConfigError(f"node-config {key}={value!r} is not an integer")
    try:
        as_float = float(value)
    except ValueError:
        raise NodeConfigError(f"node-config {key}={value!r} is not an integer") from None
    if not as_float.is_integer():
        raise NodeConfigError(f"node-config {key}={value!r} is not an integer")
    return int(as_float)


def node_identity(node_config: Mapping[str, Any]) -> NodeIdentity:
    """Read and check ``partition-id`` and ``num-partitions`` from a node config."""
    pid = _as_int(node_config, "partition-id")
    num = _as_int(node_config, "num-partitions")
    if num < 1:
        raise NodeConfigError(f"node-config num-partitions={num} must be >= 1")
    if not 0 <= pid < num:
        raise NodeConfigError(f"node-config partition-id={pid} outside range [0, {num - 1}] for num-partitions={num}")
    return NodeIdentity(pid, num)


def node_memory_mb(node_config: Mapping[str, Any]) -> float | None:
    """The ``memory-mb`` budget from a node config (MB), or None if absent; errors name the value."""
    if "memory-mb" not in node_config:
        return None
    value = node_config["memory-mb"]
    try:
        mb = float(value)
    except (TypeError, ValueError):
        raise NodeConfigError(f"node-config memory-mb={value!r} is not a number (MB, e.g. memory-mb=512)") from None
    if isinstance(value, bool) or not mb > 0 or mb != mb or mb == float("inf"):
        raise NodeConfigError(f"node-config memory-mb={value!r} must be a positive number of MB")
    return mb
