"""Checks before anything starts: bad data files, impossible partition plans, width and CPUs (common/runcheck.py).

Each bad-data case goes through the preflight CLI that ``run.sh`` calls (and, in
``test_launcher_refuses_bad_data``, through ``run.sh`` itself): exit code 2, one message that
names the file and the problem, no traceback, before Flower starts.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from common.arrays import DataError, check_labels, load_npz
from common.config import ConfigError, parse_run_config
from common.preflight import main
from common.runcheck import check_cpus, check_partition, check_width, dataset_arrays

ROOT = Path(__file__).resolve().parents[1]


def write_npz(path: Path, n: int = 200, **over: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
        "y_train": np.arange(n) % 10,
        "x_test": rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8),
        "y_test": np.arange(50) % 10,
    }
    arrays.update(over)
    np.savez(path, **arrays)
    return path


def bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """Each bad-data case of the issue: (file, the words its message must contain)."""
    good = write_npz(tmp / "good.npz")
    truncated = tmp / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp / "text.npz"
    text.write_text("x_train,y_train\n1,2\n")
    names = tmp / "names.npz"
    np.savez(names, images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.zeros(4, np.int64))
    y99 = np.arange(200) % 10
    y99[7] = 99
    return {
        "truncated": (truncated, "not a readable .npz archive"),
        "text": (text, "not a readable .npz archive"),
        "array names": (names, "missing arrays ['x_train', 'y_train', 'x_test', 'y_test']"),
        "shape": (write_npz(tmp / "shape.npz", x_train=np.zeros((200, 8, 8), np.float32)), "x_train must be uint8"),
        "negative": (write_npz(tmp / "negative.npz", y_train=-(np.arange(200) % 10)), "y_train has negative labels"),
        "lengths": (write_npz(tmp / "lengths.npz", y_train=np.arange(150) % 10), "y_train has 150 labels for 200"),
        "label 99": (write_npz(tmp / "label99.npz", y_train=y99), "labels run up to 99"),
    }


@pytest.mark.parametrize("case", ["truncated", "text", "array names", "shape", "negative", "lengths", "label 99"])
def test_bad_data_is_one_message_naming_file_and_problem(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, words = bad_files(tmp_path)[case]
    t0 = time.monotonic()
    code = main(["--run-config", f"dataset='npz' data-path='{path}'", "--num-partitions", "4"])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - t0 < 10
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert path.name in err and words in err


def test_label_99_is_accepted_when_num_classes_covers_it(tmp_path: Path) -> None:
    path = bad_files(tmp_path)["label 99"][0]
    assert load_npz(path, num_classes=100).num_classes == 100
    with pytest.raises(DataError, match=r"labels 99 outside 0..49 \(num-classes=50\)"):
        load_npz(path, num_classes=50)
    assert main(["--run-config", f"dataset='npz' data-path='{path}' num-classes=100", "--num-partitions", "4"]) == 0


def test_check_labels_rule() -> None:
    y = np.array([0, 1, 2, 2])
    assert check_labels(y, np.array([0, 1]), 0, "f") == 3
    assert check_labels(y, np.array([0]), 5, "f") == 5  # classes may be absent when declared
    with pytest.raises(DataError, match="missing 1"):
        check_labels(np.array([0, 2]), np.array([0]), 0, "f")


def test_impossible_partition_plan_is_one_message_naming_the_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_npz(tmp_path / "d.npz")
    code = main(["--run-config", f"dataset='npz' data-path='{path}' partition='iid'", "--num-partitions", "2000"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "cannot be partitioned over 2000 clients (200 training images" in err and "min-partition-size=10" in err
    cfg = parse_run_config(
        {"dataset": "npz", "data-path": str(path), "partition": "dirichlet", "dirichlet-alpha": 0.01}
    )
    with pytest.raises(ConfigError, match="dirichlet-alpha=0.01"):
        check_partition(cfg, dataset_arrays(cfg), 15)
    check_partition(cfg, dataset_arrays(cfg), 2)  # a plan that works passes


def test_width_and_cpus() -> None:
    check_width(parse_run_config({"width": 0.25}))
    with pytest.raises(ConfigError, match=r"width=0.02 leaves model 'resnet10' a narrowest layer of 1 channel"):
        check_width(parse_run_config({"width": 0.02}))
    check_width(parse_run_config({"width": 0.055}))  # round(64 x 0.055) = 4 channels
    with pytest.raises(ConfigError, match="--cpus-per-client 8 exceeds the 2 CPU"):
        check_cpus(8, available=2)
    check_cpus(2, available=2)


def test_preflight_with_data_checks_imports_no_torch(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz")
    code = (
        "import sys; from common.preflight import main; "
        f"rc = main(['--run-config', \"dataset='npz' data-path='{path}'\", '--num-partitions', '4']); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    res = subprocess.run([os.sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_launcher_refuses_bad_data(tmp_path: Path) -> None:
    """``run.sh run`` with a bad file: exit 2 within 10 s, one line naming the file, no traceback."""
    path = bad_files(tmp_path)["label 99"][0]
    env = {**os.environ, "PROGFL_OUTPUT_DIR": str(tmp_path / "out")}
    t0 = time.monotonic()
    res = subprocess.run(
        [str(ROOT / "run.sh"), "run", "--supernodes", "4", "--run-config", f"dataset='npz' data-path='{path}'"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 2 and time.monotonic() - t0 < 10, res.stderr
    assert "Traceback" not in res.stdout + res.stderr and "label99.npz" in res.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing started
