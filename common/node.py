"""What a node says about itself in ``--node-config`` (partition, budget, data file), validated.

``python -m common.node --partition-id I --num-partitions N [--memory-mb MB] [--data-path F]``
checks a SuperNode's settings before ``run.sh deploy supernode`` starts it and prints the
``--node-config`` string; bad input exits with code 2 and a message naming the value.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


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


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
"""Arrays a dataset file named by a node's ``data-path`` must hold (see :func:`common.data.load_npz`)."""


def parse_node_config(text: str) -> dict[str, Any]:
    """Parse a ``--node-config`` string the way Flower does, but refuse what Flower would drop.

    Flower's parser silently ignores a token without ``=`` (``"partition-id 0"`` becomes ``{}``);
    here every space-separated token must be ``key=value``. Errors name the offending text.
    """
    from flwr.common.config import parse_config_args

    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise NodeConfigError(f"node-config {text!r} is malformed ({exc})") from None
    bad = [t for t in tokens if "=" not in t or t.startswith("=")]
    if bad:
        raise NodeConfigError(
            f"node-config {text!r} is malformed: {bad[0]!r} is not key=value "
            f'(expected e.g. "partition-id=0 num-partitions=4 memory-mb=2048")'
        )
    try:
        parsed = parse_config_args([text]) if tokens else {}
    except Exception as exc:  # click.ClickException or a TOML error: bad value syntax
        raise NodeConfigError(f"node-config {text!r} is malformed: {exc}") from None
    return dict(parsed)


def node_data_path(node_config: Mapping[str, Any], check_contents: bool = False) -> str | None:
    """The node's ``data-path`` (absolute), or None if absent: where this device keeps the dataset file.

    It replaces the run config's ``data-path`` on this node only (the partitioning is unchanged),
    so a device can hold its copy of the ``.npz`` anywhere. The file must exist and be readable;
    with ``check_contents`` it must also be an ``.npz`` holding ``x_train, y_train, x_test, y_test``.
    """
    if "data-path" not in node_config:
        return None
    value = node_config["data-path"]
    if not isinstance(value, str) or not value:
        raise NodeConfigError(f"node-config data-path={value!r} must be a non-empty path string")
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise NodeConfigError(f"node-config data-path={value!r}: no such file (resolved to {path})")
    if not os.access(path, os.R_OK):
        raise NodeConfigError(f"node-config data-path={value!r}: file is not readable by this user")
    if check_contents:
        try:
            with np.load(path, allow_pickle=False) as z:
                files = set(z.files)
        except (OSError, ValueError) as exc:
            raise NodeConfigError(f"node-config data-path={value!r}: not a readable .npz file ({exc})") from None
        missing = [k for k in NPZ_KEYS if k not in files]
        if missing:
            raise NodeConfigError(
                f"node-config data-path={value!r}: missing arrays {missing}; the .npz needs {', '.join(NPZ_KEYS)}"
            )
    return str(path)


def node_worker_socket(node_config: Mapping[str, Any]) -> str | None:
    """The node's ``worker-socket`` (absolute path of its warm worker's Unix socket), or None if absent.

    Set by ``run.sh deploy supernode`` / ``deploy-local`` (which start the worker); without it the
    ClientApp trains in its own process. The socket itself is checked when a message is relayed
    (:func:`common.wire.check_socket`): it may not exist yet while the worker starts.
    """
    if "worker-socket" not in node_config:
        return None
    value = node_config["worker-socket"]
    if not isinstance(value, str) or not value.strip():
        raise NodeConfigError(f"node-config worker-socket={value!r} must be a non-empty path string")
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise NodeConfigError(f"node-config worker-socket={value!r} must be an absolute path")
    if len(str(path).encode()) > 107:
        raise NodeConfigError(f"node-config worker-socket={value!r} is longer than a Unix socket path may be (107 B)")
    return str(path)


def available_memory_mb() -> float:
    """Memory the OS reports available right now (MB, psutil ``virtual_memory().available``)."""
    import psutil

    return float(psutil.virtual_memory().available) / 2**20


def supernode_node_config(
    partition_id: str,
    num_partitions: str,
    memory_mb: str | None = None,
    data_path: str | None = None,
    extra: str = "",
    worker_socket: str | None = None,
) -> dict[str, Any]:
    """Validated node config for ``flower-supernode --node-config`` from ``run.sh deploy supernode``.

    Values arrive as the strings typed on the command line; every one is checked here (the
    partition against its range, the budget as a positive number of MB, the data file as a
    readable ``.npz``). Without ``memory_mb`` the budget is the memory available now
    (:func:`available_memory_mb`), measured once at start-up. ``extra`` is a further
    ``--node-config`` string; its keys may not repeat the ones given as options. ``worker_socket``
    is where the node's warm worker listens (:func:`node_worker_socket`).
    """
    config = parse_node_config(extra)
    given = {"partition-id": partition_id, "num-partitions": num_partitions}
    if memory_mb is not None:
        given["memory-mb"] = memory_mb
    if data_path is not None:
        given["data-path"] = data_path
    if worker_socket is not None:
        given["worker-socket"] = worker_socket
    clash = sorted(set(config) & set(given))
    if clash:
        raise NodeConfigError(f"node-config {extra!r} repeats {clash}, which are set by their own options")
    config.update(given)
    ident = node_identity(config)
    config["partition-id"], config["num-partitions"] = ident.partition_id, ident.num_partitions
    budget = node_memory_mb(config)
    config["memory-mb"] = round(budget if budget is not None else available_memory_mb(), 1)
    path = node_data_path(config, check_contents=True)
    if path is not None:
        config["data-path"] = path
    node_worker_socket(config)
    return config


def format_node_config(config: Mapping[str, Any]) -> str:
    """A node config as a ``--node-config`` string (strings quoted, as Flower parses them back)."""
    parts = []
    for key, value in config.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, str):
            if '"' in value:
                raise NodeConfigError(f"node-config {key}={value!r} contains a double quote, which cannot be passed")
            parts.append(f'{key}="{value}"')
        else:
            parts.append(f"{key}={value!r}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """CLI for ``run.sh deploy supernode``: print the checked ``--node-config`` string, or fail with code 2."""
    parser = argparse.ArgumentParser(description="check a SuperNode's node config and print it for --node-config")
    parser.add_argument("--partition-id", required=True)
    parser.add_argument("--num-partitions", required=True)
    parser.add_argument("--memory-mb", default=None, help="budget in MB (default: memory available now)")
    parser.add_argument("--data-path", default=None, help="this device's copy of the .npz dataset")
    parser.add_argument("--node-config", default="", help="further key=value pairs")
    parser.add_argument("--worker-socket", default=None, help="the warm worker's Unix socket (absolute path)")
    args = parser.parse_args(argv)
    try:
        config = supernode_node_config(
            args.partition_id, args.num_partitions, args.memory_mb, args.data_path, args.node_config, args.worker_socket
        )
        print(format_node_config(config))
    except NodeConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
