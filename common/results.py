"""A run's figures from its ``metrics.json``, and an entry's figures over seeds (pure, no Flower, no torch).

Shared by ``bench compare`` (:mod:`bench.compare_table`) and the comparison page of the report
(:mod:`server_app.report_compare`). A *run* is one config at one seed; an *entry* is a config run
once per seed. :func:`summarise` makes a run's row, :func:`aggregate` the entry's row of
:class:`~common.seedstats.Spread` values over seeds, :func:`headline` the paired difference
between SmartFreeze and the best other memory-constrained entry.

The headline metric is the **last-5 mean**: the mean test accuracy of the full model over the
last :data:`SMOOTH` evaluated rounds. One final round moves by several points with nothing but
float rounding (BENCHMARKS.md, noise floor), the mean of five moves less; ranks and the headline
use it, the final round is shown beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from common.seedstats import PairedDifference, paired_difference, spread

SMOOTH = 5
"""Rounds in the moving average of test accuracy used for targets, time-to-accuracy and the headline."""

HEADLINE = "final-accuracy-smoothed"
"""The metric entries are ranked by and the headline compares (the last-SMOOTH mean)."""

UNCONSTRAINED = ("fedavg",)
"""Strategies that ignore the devices' memory budgets (references, not competitors)."""

SPREAD_METRICS = (
    "final-accuracy-smoothed",
    "final-accuracy",
    "best-accuracy",
    "participation-rate",
    "peak-client-memory-mb",
    "modelled-memory-mb",
    "sim-time-s",
    "time-to-target-s",
    "bytes-moved",
    "knn-accuracy",
    "floor-probe-accuracy",
    "floor-knn-accuracy",
    "client-gflops",
    "client-mb",
)
"""Per-run metrics that :func:`aggregate` reports as mean +- std with the per-seed values."""


def smoothed_accuracy(rounds: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(simulated time, moving average of the last SMOOTH rounds' test accuracy) per trained round."""
    rows = [r for r in rounds if r["round"] > 0 and r.get("server-accuracy") is not None]
    out = []
    for i, r in enumerate(rows):
        window = [x["server-accuracy"] for x in rows[max(0, i - SMOOTH + 1) : i + 1]]
        out.append((float(r.get("sim-time") or 0.0), sum(window) / len(window)))
    return out


def time_to_accuracy(rounds: list[dict[str, Any]], target: float) -> float | None:
    """Simulated seconds until the smoothed test accuracy first reaches ``target`` (None if never).

    Smoothing (moving average over SMOOTH rounds) keeps one lucky round on a noisy non-IID curve
    from counting as having reached the target.
    """
    for sim_time, acc in smoothed_accuracy(rounds):
        if acc >= target:
            return sim_time
    return None


def smoothed_final(rounds: list[dict[str, Any]]) -> float | None:
    """Moving average of the last SMOOTH rounds' test accuracy."""
    curve = smoothed_accuracy(rounds)
    return curve[-1][1] if curve else None


def summarise(label: str, seed: int, doc: dict[str, Any], target: float | None) -> dict[str, Any]:
    """One run's row from its metrics.json (``target``: the reference entry's last-5 mean at this seed)."""
    s, rows = doc["summary"], doc["rounds"]
    peaks = [r["max-peak-mb"] for r in rows if r.get("max-peak-mb") is not None]
    modelled = [r["modelled-memory-mb"] for r in rows if r.get("modelled-memory-mb") is not None]
    return {
        "entry": label,
        "seed": seed,
        "strategy": doc["config"]["strategy"],
        "final-accuracy": s.get("final-accuracy"),
        "final-accuracy-smoothed": smoothed_final(rows),
        "best-accuracy": s.get("best-accuracy"),
        "participation-rate": s.get("participation-rate"),
        "peak-client-memory-mb": max(peaks, default=None),
        "modelled-memory-mb": max(modelled, default=None),
        "sim-time-s": rows[-1].get("sim-time"),
        "time-to-target-s": None if target is None else time_to_accuracy(rows, target),
        "bytes-moved": (s.get("bytes-down") or 0) + (s.get("bytes-up") or 0) + (s.get("monitor-bytes") or 0),
        "unconstrained": doc["config"]["strategy"] in UNCONSTRAINED,
        "rounds-completed": sum(1 for r in rows if r["round"] > 0 and (r.get("participants") or 0) > 0),
        "failed-replies": int(sum(r.get("failures") or 0 for r in rows)),
        "rejections": s.get("rejections") or {},
        "wall-seconds": doc.get("wall-seconds-total"),
        "knn-accuracy": s.get("ssl-knn-accuracy"),  # FedLL SSL: final-accuracy is the linear probe's
        "floor-probe-accuracy": s.get("ssl-floor-probe-accuracy"),
        "floor-knn-accuracy": s.get("ssl-floor-knn-accuracy"),
        "client-gflops": s.get("client-gflops-per-round"),
        "client-mb": s.get("client-mb-per-round"),
    }


def aggregate(label: str, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """An entry's row over its seeds: every :data:`SPREAD_METRICS` value as a Spread (or None)."""
    row: dict[str, Any] = {
        "entry": label,
        "strategy": runs[0]["strategy"],
        "unconstrained": runs[0]["unconstrained"],
        "seeds": [r["seed"] for r in runs],
    }
    for key in SPREAD_METRICS:
        row[key] = spread([r[key] for r in runs])
    return row


def headline(rows: Sequence[Mapping[str, Any]], runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """SmartFreeze minus the best other memory-constrained entry, paired by seed (empty if not both present).

    "Best" is the highest mean :data:`HEADLINE` among entries that respect the budgets (not
    :data:`UNCONSTRAINED`), other than the first SmartFreeze entry. Differences are taken for the
    headline metric and the final round, over the seeds both entries ran.
    """
    sf = next((r for r in rows if r["strategy"] == "smartfreeze"), None)
    others = [r for r in rows if r is not sf and not r["unconstrained"] and r[HEADLINE] is not None]
    if sf is None or sf[HEADLINE] is None or not others:
        return {}
    best = max(others, key=lambda r: r[HEADLINE].mean)
    a = {r["seed"]: r for r in runs[sf["entry"]]}
    b = {r["seed"]: r for r in runs[best["entry"]]}
    seeds = sorted(set(a) & set(b))
    out: dict[str, Any] = {"a": sf["entry"], "b": best["entry"], "seeds": seeds}
    for key in (HEADLINE, "final-accuracy"):
        pairs = [(a[s][key], b[s][key]) for s in seeds if a[s][key] is not None and b[s][key] is not None]
        if pairs:
            out[key] = paired_difference([x for x, _ in pairs], [y for _, y in pairs])
    return out


def versus(runs: Mapping[str, Sequence[Mapping[str, Any]]], reference: str) -> dict[str, dict[str, Any]]:
    """Every entry minus ``reference``, paired by seed, for the headline metric and the final round.

    An ablation's question ("does this mechanism move the method?") is this difference with its
    Student-t interval. Entries without a seed in common with the reference are left out; the
    reference itself too. Pure.
    """
    ref = {r["seed"]: r for r in runs.get(reference, ())}
    out: dict[str, dict[str, Any]] = {}
    for label, per_seed in runs.items():
        if label == reference:
            continue
        mine = {r["seed"]: r for r in per_seed}
        seeds = sorted(set(mine) & set(ref))
        diffs: dict[str, Any] = {}
        for key in (HEADLINE, "final-accuracy"):
            pairs = [(mine[s][key], ref[s][key]) for s in seeds if mine[s][key] is not None and ref[s][key] is not None]
            if pairs:
                diffs[key] = paired_difference([x for x, _ in pairs], [y for _, y in pairs])
        if diffs:
            out[label] = diffs
    return out


def mean_curve(docs: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Rounds, mean simulated time, mean and sample std of test accuracy (%) over runs, per round all runs have."""
    by_round: dict[int, list[tuple[float, float]]] = {}
    for doc in docs:
        for r in doc["rounds"]:
            if r.get("server-accuracy") is not None:
                by_round.setdefault(int(r["round"]), []).append((100 * r["server-accuracy"], r.get("sim-time") or 0.0))
    rounds = sorted(k for k, v in by_round.items() if len(v) == len(docs))
    mean, std, sim = [], [], []
    for k in rounds:
        s = spread([a for a, _ in by_round[k]])
        assert s is not None
        mean.append(s.mean)
        std.append(s.std or 0.0)
        sim.append(sum(t for _, t in by_round[k]) / len(by_round[k]))
    return rounds, sim, mean, std


def difference_line(what: str, d: PairedDifference) -> str:
    """``+1.9 ± 0.4 points (95 % CI [+0.9, +2.9]; per seed +1.6, +2.3, +1.8): significant`` and the like."""
    per_seed = ", ".join(f"{100 * x:+.1f}" for x in d.differences)
    if d.std is None:
        return f"{what}: {100 * d.mean:+.1f} points (one seed: no spread, no significance)"
    lo, hi = d.ci95 or (0.0, 0.0)
    verdict = "significant at 95 %" if d.significant else "**not significant** (the interval contains 0)"
    return (
        f"{what}: {100 * d.mean:+.1f} ± {100 * d.std:.1f} points (mean ± std of the {d.n} paired differences; "
        f"95 % CI [{100 * lo:+.1f}, {100 * hi:+.1f}], t = {d.t:.2f}; per seed {per_seed}): {verdict}"
    )
