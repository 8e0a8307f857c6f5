"""The preflight check run.sh does before Flower starts."""

from pathlib import Path

import pytest

from common.config import ConfigError
from common.preflight import main, parse_overrides, preflight, toml_value

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_keys_are_rejected_with_suggestion() -> None:
    with pytest.raises(ConfigError, match="'num-round' \\(did you mean 'num-rounds'\\?\\)"):
        preflight(ROOT, ["num-round=3"], ROOT, None)


def test_relative_paths_become_absolute_and_output_dir_defaulted(tmp_path: Path) -> None:
    data = tmp_path / "d.npz"
    data.write_bytes(b"")
    out = preflight(ROOT, ["dataset='npz' data-path='d.npz' num-rounds=2"], tmp_path, tmp_path / "outs")
    assert out == {"dataset": "npz", "data-path": str(data), "num-rounds": 2, "output-dir": str(tmp_path / "outs")}


def test_cli_prints_overrides_or_fails_with_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--run-config", "num-rounds=2 verbose=true model='smallcnn'"]) == 0
    assert capsys.readouterr().out.strip() == 'num-rounds=2 verbose=true model="smallcnn"'
    assert main(["--run-config", "strategy='nope'"]) == 2
    assert "valid choices: fedavg" in capsys.readouterr().err
    assert toml_value(0.5) == "0.5" and toml_value(False) == "false"


def test_repeated_key_last_one_wins_within_and_across_strings() -> None:
    out = preflight(ROOT, ["num-rounds=60 seed=1 num-rounds=40", "seed=3"], ROOT, None)
    assert out["num-rounds"] == 40 and out["seed"] == 3
    assert parse_overrides(["model='vgg11bn' model=\"smallcnn\""]) == {"model": "smallcnn"}


def test_unquoted_string_names_the_key_and_the_quoting_hint() -> None:
    with pytest.raises(ConfigError, match=r"key 'strategy': cannot read value 'fedavg' \(a string must be quoted"):
        parse_overrides(["num-rounds=2 strategy=fedavg"])
    with pytest.raises(ConfigError, match="'junk' is not a key=value pair"):
        parse_overrides(["num-rounds=2 junk"])
