"""What ``bench compare --seeds`` changes between seeds, and how it fuses run-config strings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.compare import SCENARIOS, config_string, effective_config, run_config
from common.config import parse_run_config
from common.data import client_data, held_out_set, partitions
from common.devices import simulated_device
from common.models import build_model
from common.preflight import app_defaults

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def small_npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(123)
    path = tmp_path / "small.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (2000, 32, 32, 3), dtype=np.uint8),
        y_train=np.repeat(np.arange(10), 200),
        x_test=rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8),
        y_test=np.repeat(np.arange(10), 20),
    )
    return path


def _configs(tmp_path: Path, npz: Path, seed: int):
    extra = f"dataset='npz' data-path='{npz}'"
    raw = run_config(SCENARIOS["baselines"], "strategy='smartfreeze'", extra, seed, tmp_path / "runs" / f"seed-{seed}")
    return raw, parse_run_config({**app_defaults(ROOT), **raw})


def test_seed_changes_partitions_devices_and_init_and_nothing_else(tmp_path: Path, small_npz: Path) -> None:
    raw0, cfg0 = _configs(tmp_path, small_npz, 0)
    raw1, cfg1 = _configs(tmp_path, small_npz, 1)
    _, again0 = _configs(tmp_path, small_npz, 0)
    # The config differs in the seed and where the run lives, nothing else.
    assert {k for k in raw0 if raw0[k] != raw1[k]} == {"seed", "run-name"}
    n = SCENARIOS["baselines"].supernodes
    # Data partition (Dirichlet draws) and each client's train/validation split.
    p0, p1, q0 = partitions(cfg0.data_spec(), n), partitions(cfg1.data_spec(), n), partitions(again0.data_spec(), n)
    assert all(np.array_equal(a, b) for a, b in zip(p0, q0, strict=True))
    assert sum(not np.array_equal(a, b) for a, b in zip(p0, p1, strict=True)) > n // 2
    v0, v1 = client_data(cfg0.data_spec(), 0, n), client_data(cfg1.data_spec(), 0, n)
    assert not torch.equal(v0.y_val, v1.y_val) or len(v0.y_val) != len(v1.y_val)
    # Simulated device draws: same seed, same devices; another seed, other budgets and speeds.
    d0 = [simulated_device(cfg0.device_profile, pid, cfg0.seed, 30.0, floor_mb=5.0) for pid in range(n)]
    d1 = [simulated_device(cfg1.device_profile, pid, cfg1.seed, 30.0, floor_mb=5.0) for pid in range(n)]
    assert d0 == [simulated_device(again0.device_profile, pid, again0.seed, 30.0, floor_mb=5.0) for pid in range(n)]
    assert sum(a != b for a, b in zip(d0, d1, strict=True)) > n // 2
    # Model initialisation.
    m0, m1 = (build_model(c.model, 10, c.width, seed=c.seed).state_dict() for c in (cfg0, cfg1))
    assert not torch.equal(m0["blocks.0.0.weight"], m1["blocks.0.0.weight"])
    # Not the test set.
    x0, y0 = held_out_set(cfg0.data_spec())
    x1, y1 = held_out_set(cfg1.data_spec())
    assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_repeated_keys_and_rounds_resolve_last_one_wins(tmp_path: Path) -> None:
    scenario = SCENARIOS["selector"]
    assert "num-rounds=60" in scenario.config
    config = run_config(scenario, "strategy='smartfreeze' lr=0.1", "num-rounds=40 lr=0.02", 2, tmp_path / "x")
    assert config["num-rounds"] == 40 and config["lr"] == 0.02 and config["seed"] == 2
    assert config["dirichlet-alpha"] == 0.1 and config["output-dir"] == str(tmp_path)
    fused = effective_config("a=1 b='x'", "a=2", "b='y' a=3")
    assert fused == {"a": 3, "b": "y"} and config_string(fused) == 'a=3 b="y"'


def test_a_finished_run_is_reused_only_with_the_same_resolved_config(tmp_path: Path) -> None:
    import json

    from bench.compare import finished

    run_dir = tmp_path / "runs" / "sf" / "seed-0"
    config = run_config(SCENARIOS["smoke"], "strategy='smartfreeze'", "", 0, run_dir)
    saved = {**app_defaults(ROOT), **config, "run-name": "elsewhere", "output-dir": "/moved/from"}
    run_dir.mkdir(parents=True)
    doc = {"config": saved, "summary": {"final-accuracy": 0.3}, "rounds": [{"round": r} for r in range(7)]}
    (run_dir / "metrics.json").write_text(json.dumps(doc))
    assert finished(run_dir, config) is not None  # moved runs count
    assert finished(run_dir, {**config, "lr": 0.1}) is None  # another config
    older = {k: v for k, v in saved.items() if k != "server-threads"}  # a run from before a key existed
    (run_dir / "metrics.json").write_text(json.dumps({**doc, "config": older}))
    assert finished(run_dir, config) is None
    assert finished(run_dir, config, strict=False) is not None  # --summarise-only: the keys given
    (run_dir / "metrics.json").write_text(json.dumps({**doc, "rounds": doc["rounds"][:3]}))
    assert finished(run_dir, config) is None  # unfinished


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_scenario_entry_is_a_valid_config(name: str, small_npz: Path, tmp_path: Path) -> None:
    from bench.compare import parse_entry

    scenario = SCENARIOS[name]
    data = f"data-path='{small_npz}'" if "data-path" in scenario.config else ""
    rounds = " num-rounds=20" if name == "paper" else ""  # the reduced length its description gives
    for entry in scenario.entries:
        _, overrides = parse_entry(entry)
        for extra in (data, data + rounds):
            config = run_config(scenario, overrides, extra, 0, tmp_path / "seed-0")
            parse_run_config({**app_defaults(ROOT), **config})
