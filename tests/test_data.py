"""Datasets, npz loading, per-client data and node-config parsing."""

from pathlib import Path

import numpy as np
import pytest
import torch

from common.data import DataSpec, client_data, held_out_set, load_dataset, load_npz, make_synthetic
from common.node import NodeConfigError, node_identity


def test_synthetic_is_deterministic_and_shaped() -> None:
    a = make_synthetic(200, 50, seed=1)
    b = make_synthetic(200, 50, seed=1)
    c = make_synthetic(200, 50, seed=2)
    assert a.x_train.shape == (200, 32, 32, 3) and a.x_train.dtype == np.uint8
    assert a.input_shape == (3, 32, 32) and a.num_classes == 10
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    assert set(np.bincount(a.y_train)) == {20}


def _write_npz(path: Path, n: int = 60, **over: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
        "y_train": np.arange(n) % 3,
        "x_test": rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8),
        "y_test": np.arange(12) % 3,
    }
    arrays.update(over)
    np.savez(path, **arrays)
    return path


def test_npz_roundtrip(tmp_path: Path) -> None:
    ds = load_npz(_write_npz(tmp_path / "mine.npz"))
    assert ds.name == "mine" and ds.num_classes == 3
    assert ds.x_train.shape == (60, 8, 8, 3) and ds.y_train.dtype == np.int64


def test_npz_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_npz(tmp_path / "absent.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"missing arrays \['y_train', 'x_test', 'y_test'\]"):
        load_npz(bad)
    with pytest.raises(ValueError, match="x_train must be uint8"):
        load_npz(_write_npz(tmp_path / "f.npz", x_train=np.zeros((60, 8, 8, 3), np.float32)))
    with pytest.raises(ValueError, match="y_train has negative labels"):
        load_npz(_write_npz(tmp_path / "l.npz", y_train=-np.ones(60, np.int64)))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_npz(garbage)


def test_client_data_splits_partition_into_train_and_val(tmp_path: Path) -> None:
    spec = DataSpec(
        dataset="npz", data_path=str(_write_npz(tmp_path / "c.npz")), min_partition_size=5, val_fraction=0.2
    )
    parts = [client_data(spec, i, 3) for i in range(3)]
    assert sum(len(p.y_train) + len(p.y_val) for p in parts) == 60
    assert all(len(p.y_val) == 4 for p in parts)
    assert parts[0].x_train.dtype == torch.float32 and parts[0].x_train.shape[1:] == (3, 8, 8)
    x, y = held_out_set(spec)
    assert x.shape == (12, 3, 8, 8) and len(y) == 12
    assert abs(float(load_dataset(spec).x_train.mean()) - 127.5) < 5
    with pytest.raises(ValueError, match=r"partition-id 3 outside range \[0, 3\)"):
        client_data(spec, 3, 3)


def test_torchvision_without_download_says_how(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download=true"):
        load_dataset(DataSpec(dataset="cifar10", data_dir=str(tmp_path)))


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({}, "no 'partition-id'"),
        ({"partition-id": 0}, "no 'num-partitions'"),
        ({"partition-id": "a", "num-partitions": 2}, "partition-id='a' is not an integer"),
        ({"partition-id": 1.5, "num-partitions": 2}, "partition-id=1.5 is not an integer"),
        ({"partition-id": 2, "num-partitions": 2}, r"partition-id=2 outside range \[0, 1\]"),
        ({"partition-id": 0, "num-partitions": 0}, "num-partitions=0 must be >= 1"),
    ],
)
def test_node_config_errors(node_config: dict, message: str) -> None:
    with pytest.raises(NodeConfigError, match=message):
        node_identity(node_config)


def test_node_config_accepts_ints_and_numeric_strings() -> None:
    assert node_identity({"partition-id": 1, "num-partitions": 4}).partition_id == 1
    assert node_identity({"partition-id": "3", "num-partitions": "4"}).num_partitions == 4
