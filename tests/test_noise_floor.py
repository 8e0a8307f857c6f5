"""The noise-floor table: twin differences, one run's noise std and the seed spread beside it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.noise_floor import from_pair, from_regress, render, twin_rows
from common.seedstats import pooled_sigma


def test_twin_rows_noise_std_and_seed_std() -> None:
    a = {0: {"final-accuracy": 0.40}, 1: {"final-accuracy": 0.42}, 2: {"final-accuracy": 0.44}}
    b = {0: {"final-accuracy": 0.41}, 1: {"final-accuracy": 0.40}, 2: {"final-accuracy": 0.44}, 3: {}}
    row = twin_rows(a, b, ["final-accuracy", "bytes-moved"])["final-accuracy"]
    assert row["seeds"] == [0, 1, 2]
    assert row["differences"] == pytest.approx([0.01, -0.02, 0.0])
    assert row["noise-std"] == pytest.approx(math.sqrt((0.01**2 + 0.02**2) / 3 / 2))
    assert row["seed-std-a"] == pytest.approx(0.02)
    mean_seed = (0.02 + row["seed-std-b"]) / 2
    assert row["noise-to-seed"] == pytest.approx(row["noise-std"] / mean_seed)


def test_twin_rows_skips_missing_metrics() -> None:
    a = {0: {"final-accuracy": None}}
    b = {0: {"final-accuracy": 0.3}}
    assert twin_rows(a, b, ["final-accuracy"]) == {}


def test_pooled_sigma_identical_twins_have_no_noise() -> None:
    assert pooled_sigma([0.0, 0.0]) == 0.0


def _comparison(path: Path, entry: str, values: list[float]) -> Path:
    runs = [{"seed": s, "final-accuracy": v, "final-accuracy-smoothed": v} for s, v in enumerate(values)]
    path.write_text(json.dumps({"effective-config": "x=1", "entries": {entry: ""}, "runs": {entry: runs}}))
    return path


def test_from_pair_reads_two_comparisons_and_their_run_traces(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pa = _comparison(tmp_path / "a" / "comparison.json", "sf", [0.40, 0.42])
    pb = _comparison(tmp_path / "b" / "comparison.json", "sf-t2", [0.41, 0.42])
    for side, entry, acc in (("a", "sf", 0.40), ("b", "sf-t2", 0.41)):
        run = tmp_path / side / "runs" / entry / "seed-0"
        run.mkdir(parents=True)
        rounds = [{"round": 1, "participant-ids": [1, 2], "server-accuracy": 0.3}]
        rounds.append({"round": 2, "participant-ids": [1, 2] if side == "a" else [1, 3], "server-accuracy": acc})
        (run / "metrics.json").write_text(json.dumps({"rounds": rounds, "summary": {}}))
    result = from_pair(f"{pa}:sf", f"{pb}:sf-t2")
    assert result["metrics"]["final-accuracy"]["differences"] == pytest.approx([0.01, 0.0])
    assert result["traces"][0]["first-divergence"] == 2
    assert 1 not in result["traces"]
    text = render([result])
    assert "+1.00, +0.00" in text
    assert "| sf vs sf-t2 | 0 | 2 (participant-ids) | 1.00 |" in text


def test_from_pair_names_a_missing_entry(tmp_path: Path) -> None:
    pa = _comparison(tmp_path / "a.json", "sf", [0.4])
    with pytest.raises(SystemExit, match="no entry 'nope'.*sf"):
        from_pair(f"{pa}:nope", f"{pa}:sf")
    with pytest.raises(SystemExit, match="FILE:ENTRY"):
        from_pair(str(pa), f"{pa}:sf")


def test_from_regress_pairs_the_two_thread_settings(tmp_path: Path) -> None:
    noise = {
        str(s): {"t1-0": {"sf": {"final-accuracy": 0.4 + s / 100}}, "t2-1": {"sf": {"final-accuracy": 0.41 + s / 100}}}
        for s in range(3)
    }
    path = tmp_path / "regression.json"
    path.write_text(json.dumps({"rounds": 20, "noise": noise}))
    (result,) = from_regress(path, tmp_path / "runs")
    assert result["name"] == "sf t1-0 vs t2-1 (20 rounds)"
    assert result["metrics"]["final-accuracy"]["noise-std"] == pytest.approx(0.01 / math.sqrt(2))
    assert result["traces"] == {}
    path.write_text(json.dumps({"rounds": 20}))
    with pytest.raises(SystemExit, match="no noise block"):
        from_regress(path, tmp_path)
