"""Round-by-round diff of two runs' decision traces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.trace_diff import diff_traces, load_metrics, main


def _doc(ids: list[list[int]], acc: list[float], froze: int | None = None, communities=None) -> dict:
    rounds = [
        {"round": k + 1, "participant-ids": p, "server-accuracy": a, "froze-block": froze if k == 1 else None}
        for k, (p, a) in enumerate(zip(ids, acc, strict=True))
    ]
    return {"rounds": rounds, "summary": {"final-accuracy": acc[-1], "communities": communities or [[0, 1]]}}


def test_identical_runs_have_no_divergence() -> None:
    d = _doc([[0, 1], [1, 2]], [0.2, 0.3])
    result = diff_traces(d, json.loads(json.dumps(d)))
    assert result["first-divergence"] is None and result["max-abs-accuracy-delta"] == 0.0
    assert result["run-decisions-differ"] == []


def test_first_divergence_per_key_and_accuracy_gap() -> None:
    a = _doc([[0, 1], [1, 2], [2, 3]], [0.2, 0.3, 0.4])
    b = _doc([[0, 1], [1, 2], [2, 4]], [0.2, 0.31, 0.35], froze=1, communities=[[0], [1]])
    result = diff_traces(a, b)
    assert result["first-divergence"] == 2
    assert result["first-divergence-by-key"] == {"froze-block": 2, "participant-ids": 3}
    assert result["run-decisions-differ"] == ["communities"]
    assert result["max-abs-accuracy-delta"] == pytest.approx(0.05)


def test_cli_names_an_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "metrics.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match=r"metrics.json is not valid JSON"):
        load_metrics(tmp_path)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_doc([[0]], [0.1])))
    assert main([str(good), str(good), "--json", str(tmp_path / "d.json")]) == 0
    assert "decisions: identical in every round" in capsys.readouterr().out
    assert json.loads((tmp_path / "d.json").read_text())["rounds-compared"] == 1
