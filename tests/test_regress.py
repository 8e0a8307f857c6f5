"""The drift guard's tolerance rule and its comparison (bench/regress.py), without running anything."""

from __future__ import annotations

import math

import pytest

from bench.regress import (
    ENTRIES,
    METRICS,
    MIN_TOLERANCE,
    THREADS,
    compare,
    environment_changes,
    pooled_sigma,
    tolerances,
)


def _rows(acc: float, trace: list | None = None) -> dict:
    return {e: {m: acc for m in METRICS} | {"trace": trace or [[1, [0, 1]]]} for e in ENTRIES}


def test_pooled_sigma_is_one_runs_noise_std() -> None:
    # Twins differing by d each carry noise of variance s^2: Var(d) = 2 s^2.
    assert pooled_sigma([0.02, -0.02]) == pytest.approx(0.02 / math.sqrt(2))
    assert pooled_sigma([]) == 0.0


def test_tolerance_is_three_sigma_with_a_floor() -> None:
    a, b = (f"t{t[0]}-{t[1]}" for t in THREADS)
    noise = {"0": {a: _rows(0.40), b: _rows(0.43)}, "1": {a: _rows(0.41), b: _rows(0.38)}}
    tol = tolerances(noise)
    assert tol["final-accuracy"] == pytest.approx(3 * 0.03 / math.sqrt(2))
    quiet = {"0": {a: _rows(0.40), b: _rows(0.40)}}
    assert tolerances(quiet)["final-accuracy"] == MIN_TOLERANCE


def test_compare_flags_a_shift_beyond_tolerance_and_reports_decisions() -> None:
    recorded = {"entries": _rows(0.40), "tolerance": dict.fromkeys(METRICS, 0.02)}
    rows, ok = compare(_rows(0.41), recorded)
    assert ok and all(r["same-decisions"] for r in rows)
    rows, ok = compare(_rows(0.45, [[1, [0, 2]]]), recorded)
    assert not ok and not any(r["ok"] for r in rows) and not rows[0]["same-decisions"]
    rows, ok = compare(_rows(0.40), {"entries": {}, "tolerance": dict.fromkeys(METRICS, 0.02)})
    assert not ok and rows[0]["metric"] == "(not recorded)"


def test_a_changed_machine_or_library_is_named_and_the_commit_date_are_not() -> None:
    recorded = {"cpu": "AMD EPYC", "torch": "2.14.1", "threads": 2, "commit": "abc", "date": "2026-12-07"}
    now = {"cpu": "Intel Xeon", "torch": "2.14.1", "threads": 2, "numpy": "2.4.6", "commit": "def", "date": "x"}
    assert environment_changes(recorded, now) == ["cpu 'AMD EPYC' -> 'Intel Xeon'", "numpy unrecorded -> '2.4.6'"]
    assert environment_changes(now, now) == []
