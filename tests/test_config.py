"""Run-config validation: defaults from pyproject, clear errors for bad values."""

import tomllib
from pathlib import Path

import numpy as np
import pytest

from common.config import STRATEGY_NAMES, ConfigError, RunConfig, parse_run_config, valid_keys

ROOT = Path(__file__).resolve().parents[1]


def pyproject_defaults() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_validate_and_match_model_defaults() -> None:
    defaults = pyproject_defaults()
    cfg = parse_run_config(defaults)
    assert set(defaults) == set(valid_keys())
    assert cfg.to_flat() == RunConfig().to_flat()


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ({"strategy": "nope"}, ["strategy='nope'", *STRATEGY_NAMES]),
        ({"model": "resnet50"}, ["model='resnet50'", "resnet18", "vgg16bn", "smallcnn"]),
        ({"dataset": "mnist"}, ["dataset='mnist'", "synthetic", "cifar10", "npz"]),
        ({"partition": "shards"}, ["partition='shards'", "iid", "dirichlet"]),
        ({"num-rounds": 0}, ["num-rounds=0", "greater than 0"]),
        ({"dirichlet-alpha": 0.0}, ["dirichlet-alpha=0.0", "greater than 0"]),
        ({"fraction-train": 1.5}, ["fraction-train=1.5", "less than or equal to 1"]),
        ({"fraction-train": 0.0}, ["fraction-train=0.0", "greater than 0"]),
        ({"num-round": 3}, ["unknown key 'num-round'", "did you mean 'num-rounds'"]),
    ],
)
def test_bad_values_name_key_value_and_choices(override: dict, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_run_config({**pyproject_defaults(), **override})
    for needle in needles:
        assert needle in str(info.value)


def test_missing_npz_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "data.npz"
    with pytest.raises(ConfigError, match=str(missing)):
        parse_run_config({"dataset": "npz", "data-path": str(missing)})
    with pytest.raises(ConfigError, match="data-path is required"):
        parse_run_config({"dataset": "npz"})
    ok = tmp_path / "d.npz"
    np.savez(ok, x_train=np.zeros((1, 2, 2, 3), np.uint8))
    assert parse_run_config({"dataset": "npz", "data-path": str(ok)}).data_spec().data_path == str(ok)


def test_several_problems_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        parse_run_config({"strategy": "x", "num-rounds": -1})
    assert "strategy='x'" in str(info.value) and "num-rounds=-1" in str(info.value)
