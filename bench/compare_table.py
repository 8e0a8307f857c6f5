"""Tables and plots of ``bench compare``: the entry table (mean ± std over seeds), the headline, per-seed rows.

The figures themselves (a run's row, an entry's spread, the headline pairing) come from
:mod:`common.results`, which the report's comparison page shares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.results import HEADLINE, SMOOTH, difference_line, mean_curve
from common.seedstats import PairedDifference, Spread


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


def markdown(
    name: str,
    description: str,
    effective: str,
    entries: Mapping[str, str],
    rows: Sequence[Mapping[str, Any]],
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    head: Mapping[str, Any],
    ref: str,
    against: Mapping[str, Mapping[str, PairedDifference]] | None = None,
) -> str:
    """The comparison page: entry table (mean ± std), headline, each entry against ``ref`` (paired by seed,
    from :func:`common.results.versus`), per-seed table, faults table if any."""
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
    if against:
        lines += ["", f"Each entry minus `{ref}`, paired by seed (ablations read here):", ""]
        for label, diffs in against.items():
            for key, what in ((HEADLINE, f"last-{SMOOTH} mean"), ("final-accuracy", "final round")):
                if key in diffs:
                    lines.append(f"- `{label}`, {difference_line(what, diffs[key])}")
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
    if any(r.get("knn-accuracy") is not None for r in rows):
        lines += ssl_table(rows, ref)
    flat = [r for per_seed in runs.values() for r in per_seed]
    if any(r["failed-replies"] or r["rejections"] for r in flat):
        lines += faults_table(flat)
    return "\n".join(lines) + "\n"


def _ratio(ref: Any, value: Any) -> str:
    """``ref / value`` of two Spreads' means as "N.Nx" (how many times less than the reference), — if unknown."""
    a = ref.mean if isinstance(ref, Spread) else ref
    b = value.mean if isinstance(value, Spread) else value
    return "—" if not a or not b else f"{a / b:.1f}x"


def ssl_table(rows: Sequence[Mapping[str, Any]], ref: str) -> list[str]:
    """FedLL's self-supervised entries: downstream accuracy, its floor, and per-client costs with ratios to ``ref``."""
    base = next((r for r in rows if r["entry"] == ref), None)
    lines = [
        "",
        "Self-supervised entries (final acc = linear probe on the final encoder; floor = the same probe on the "
        f"randomly initialised encoder; costs per client and round; ratios: `{ref}` / entry):",
        "",
        "| entry | linear probe % | k-NN % | floor probe % | floor k-NN % | peak client MB | GFLOPs | MB moved "
        "| memory ratio | GFLOPs ratio | communication ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("knn-accuracy") is None:
            continue
        ratios = (
            ("—", "—", "—")
            if base is None
            else tuple(_ratio(base[k], r[k]) for k in ("peak-client-memory-mb", "client-gflops", "client-mb"))
        )
        lines.append(
            f"| {r['entry']} | {_fmt(r['final-accuracy'], True)} | {_fmt(r['knn-accuracy'], True)} | "
            f"{_fmt(r['floor-probe-accuracy'], True)} | {_fmt(r['floor-knn-accuracy'], True)} | "
            f"{_fmt(r['peak-client-memory-mb'])} | {_fmt(r['client-gflops'], digits=2)} | "
            f"{_fmt(r['client-mb'], digits=2)} | {ratios[0]} | {ratios[1]} | {ratios[2]} |"
        )
    return lines


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
