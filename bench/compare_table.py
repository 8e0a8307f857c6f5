"""Rows, tables and plots of ``bench compare``: one run's row, the seed spread per entry, the headline.

A *run* is one entry at one seed (its ``metrics.json``); an *entry* is a strategy with its
overrides, run once per seed. :func:`summarise` makes a run's row, :func:`aggregate` the entry's
row of :class:`~bench.compare_stats.Spread` values over seeds, :func:`headline` the paired
difference between SmartFreeze and the best other memory-constrained entry, :func:`markdown` the
page and :func:`plot` the mean curves with a +-1 std band.

The headline metric is the **last-5 mean**: the mean test accuracy of the full model over the
last :data:`SMOOTH` evaluated rounds. One final round moves by several points with nothing but
float rounding (BENCHMARKS.md, noise floor), the mean of five moves less; ranks and the headline
use it, the final round is shown beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.compare_stats import PairedDifference, Spread, paired_difference, spread

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


def _fmt(value: Any, pct: bool = False, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, Spread):
        mean = _fmt(value.mean, pct, digits)
        return mean if value.std is None else f"{mean} ± {_fmt(value.std, pct, digits)}"
    if pct:
        return f"{100 * value:.{digits}f}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _mb(value: Any) -> Any:
    """Bytes (a number or a Spread of numbers) in MiB."""
    if isinstance(value, Spread):
        return Spread(value.mean / 2**20, None if value.std is None else value.std / 2**20, value.values)
    return None if value is None else value / 2**20


def _points(value: float | None, base: float | None) -> str:
    """Difference of two accuracies in percentage points, signed (— if either is missing)."""
    if value is None or base is None:
        return "—"
    return f"{100 * (value - base):+.1f}"


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


def markdown(
    name: str,
    description: str,
    effective: str,
    entries: Mapping[str, str],
    rows: Sequence[Mapping[str, Any]],
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    head: Mapping[str, Any],
    ref: str,
) -> str:
    """The comparison page: entry table (mean ± std), headline, per-seed table, faults table if any."""
    seeds = sorted({s for r in rows for s in r["seeds"]})
    lines = [
        f"Scenario `{name}`: {description}.",
        "",
        f"Seeds: {', '.join(map(str, seeds))} (n = {len(seeds)}; each seed changes the data partition, the device "
        "draws, the participant sampling and the model initialisation together). Cells: mean ± sample std over "
        "seeds.",
        "",
        f"Effective config of every entry: `{effective}`",
        "",
        "Entries: " + "; ".join(f"`{label}`: `{ov}`" for label, ov in entries.items()),
        "",
        f"Headline metric: last-{SMOOTH} mean, the mean test accuracy of the full model over the last {SMOOTH} "
        f"rounds. Time to target: simulated seconds until the {SMOOTH}-round moving average reaches the "
        f"last-{SMOOTH} mean of `{ref}` at the same seed.",
        "",
        f"| entry | last-{SMOOTH} mean % | final acc % | best acc % | participation % | peak client MB (measured) | "
        "modelled MB | sim time s | time to target s | MB moved |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name_cell = r["entry"] + (" (unconstrained reference)" if r["unconstrained"] else "")
        lines.append(
            f"| {name_cell} | {_fmt(r['final-accuracy-smoothed'], True)} | {_fmt(r['final-accuracy'], True)} | "
            f"{_fmt(r['best-accuracy'], True)} | {_fmt(r['participation-rate'], True, 0)} | "
            f"{_fmt(r['peak-client-memory-mb'])} | {_fmt(r['modelled-memory-mb'])} | "
            f"{_fmt(r['sim-time-s'], digits=0)} | {_fmt(r['time-to-target-s'], digits=0)} | "
            f"{_fmt(_mb(r['bytes-moved']), digits=0)} |"
        )
    if head:
        lines += [
            "",
            f"Headline, paired by seed: `{head['a']}` minus `{head['b']}` (the best other memory-constrained entry "
            f"by mean last-{SMOOTH}):",
            "",
        ]
        for key, what in ((HEADLINE, f"last-{SMOOTH} mean"), ("final-accuracy", "final round")):
            if key in head:
                lines.append(f"- {difference_line(what, head[key])}")
    lines += [
        "",
        "Per seed:",
        "",
        f"| entry | seed | last-{SMOOTH} mean % | final acc % | best acc % | participation % | peak client MB | "
        "sim time s | MB moved |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, per_seed in runs.items():
        for r in per_seed:
            lines.append(
                f"| {label} | {r['seed']} | {_fmt(r['final-accuracy-smoothed'], True)} | "
                f"{_fmt(r['final-accuracy'], True)} | {_fmt(r['best-accuracy'], True)} | "
                f"{_fmt(r['participation-rate'], True, 0)} | {_fmt(r['peak-client-memory-mb'])} | "
                f"{_fmt(r['sim-time-s'], digits=0)} | {_fmt(_mb(r['bytes-moved']), digits=0)} |"
            )
    flat = [r for per_seed in runs.values() for r in per_seed]
    if any(r["failed-replies"] or r["rejections"] for r in flat):
        lines += faults_table(flat)
    return "\n".join(lines) + "\n"


def faults_table(flat: Sequence[Mapping[str, Any]]) -> list[str]:
    """Failed and rejected replies per run, against the same strategy's clean run at the same seed."""
    lines = [
        "",
        "Faults: a failed reply is a client error (the ClientApp raised) or a reply rejected by the server's "
        "checks (reasons below). Accuracy differences are in points against the clean run: the first entry "
        "of the same strategy at the same seed without failures.",
        "",
        "| entry | seed | rounds completed | failed or rejected replies | client errors | rejected by reason | "
        f"clean run | final acc vs clean | last-{SMOOTH} mean vs clean |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in flat:
        base = next(
            (b for b in flat if b["strategy"] == r["strategy"] and b["seed"] == r["seed"] and not b["failed-replies"]),
            None,
        )
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["rejections"].items())) or "—"
        errors = r["failed-replies"] - sum(r["rejections"].values())
        lines.append(
            f"| {r['entry']} | {r['seed']} | {r['rounds-completed']} | {r['failed-replies']} | {errors} | {reasons} | "
            f"{base['entry'] if base else '—'} | "
            f"{_points(r['final-accuracy'], base['final-accuracy'] if base else None)} | "
            f"{_points(r['final-accuracy-smoothed'], base['final-accuracy-smoothed'] if base else None)} |"
        )
    return lines


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


def plot(docs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, title: str) -> None:
    """Mean test accuracy per round and per simulated second, one line per entry, a +-1 std band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    n = max(len(v) for v in docs.values())
    for label, runs in docs.items():
        rounds, sim, mean, std = mean_curve(runs)
        lo = [m - s for m, s in zip(mean, std, strict=True)]
        hi = [m + s for m, s in zip(mean, std, strict=True)]
        for ax, x in ((axes[0], rounds), (axes[1], sim)):
            (line,) = ax.plot(x, mean, label=label, lw=1.3)
            if len(runs) > 1:
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18, lw=0)
    axes[0].set_xlabel("round")
    axes[1].set_xlabel("simulated training time (s, Eq. 7)")
    for ax in axes:
        ax.set_ylabel("test accuracy (%)" + (f", mean ± std over {n} seeds" if n > 1 else ""))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
