"""Noise floor: the spread float rounding alone causes (same seed, other thread counts), beside the seed spread.

    ./run.sh bench noise_floor --regress bench/regression.json
    ./run.sh bench noise_floor --pair outputs/compare/baselines/comparison.json:smartfreeze \\
        outputs/compare/noise/comparison.json:smartfreeze-t2 --out docs/results/noise-floor

Two runs of one seed whose only difference is the thread count of the clients (``client-threads``)
and of the ServerApp (``server-threads``) are *twins*: same partitions, device draws,
initialisation and sampling streams, other summation order inside torch's kernels. For every
metric this prints, per seed, the twins' difference ``d``; one run's noise std
``sigma = sqrt(mean(d^2) / 2)`` (:func:`common.seedstats.pooled_sigma`, pooled over seeds); and,
beside it, the sample std of the same metric *across seeds* of each twin. A ratio near 1 says
that once float rounding has changed a decision, a run is as different from its twin as from a
run of another seed: the seed spread already contains the float noise, and a difference between
methods has to be read against the seed spread, paired by seed.

Sources (any number, combined into one table):

* ``--pair A.json:ENTRY B.json:ENTRY``: two ``bench compare`` results (``comparison.json``) and the
  entry label in each; the twins are the runs of equal seed. Where the runs' folders still exist
  (``<dir of A.json>/runs/<ENTRY>/seed-<s>``), the first round whose decisions differ
  (:func:`bench.trace_diff.diff_traces`) is reported too.
* ``--regress FILE``: the ``noise`` block of ``bench regress --noise --record`` (every entry of
  the guard, its seeds, the two thread settings); the decision traces come from the guard's run
  folders under ``--regress-runs`` (default ``outputs/regress``) when they exist.

Writes ``<out>.md`` and ``<out>.json`` (default ``outputs/noise-floor``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.trace_diff import diff_traces
from common.seedstats import pooled_sigma, spread

ROOT = Path(__file__).resolve().parents[1]

METRICS: dict[str, tuple[str, float]] = {
    "final-accuracy-smoothed": ("last-5 mean (points)", 100.0),
    "final-accuracy": ("final accuracy (points)", 100.0),
    "best-accuracy": ("best accuracy (points)", 100.0),
    "participation-rate": ("participation (points)", 100.0),
    "sim-time-s": ("simulated time (s)", 1.0),
    "bytes-moved": ("bytes moved (MB)", 1e-6),
}
"""Metric key -> (label, scale from the stored unit to the printed one)."""


def twin_rows(
    a: Mapping[int, Mapping[str, Any]], b: Mapping[int, Mapping[str, Any]], metrics: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per metric: the twins' per-seed differences (B - A), one run's noise std and each twin's seed std.

    ``a`` and ``b`` map a seed to that run's summary (metric -> value, None where missing). Only
    seeds both hold, and metrics both report, count. Pure.
    """
    seeds = sorted(set(a) & set(b))
    out: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        pairs = [(s, a[s].get(metric), b[s].get(metric)) for s in seeds]
        pairs = [(s, x, y) for s, x, y in pairs if x is not None and y is not None]
        if not pairs:
            continue
        diffs = [float(y) - float(x) for _, x, y in pairs]
        sa = spread([x for _, x, _ in pairs])
        sb = spread([y for _, _, y in pairs])
        sigma = pooled_sigma(diffs)
        seed_std = [s.std for s in (sa, sb) if s is not None and s.std is not None]
        mean_seed_std = sum(seed_std) / len(seed_std) if seed_std else None
        out[metric] = {
            "seeds": [s for s, _, _ in pairs],
            "differences": diffs,
            "noise-std": sigma,
            "seed-std-a": sa.std if sa else None,
            "seed-std-b": sb.std if sb else None,
            "noise-to-seed": sigma / mean_seed_std if mean_seed_std else None,
        }
    return out


def _split(spec: str) -> tuple[Path, str]:
    path, sep, entry = spec.rpartition(":")
    if not sep or not path or not entry:
        example = "outputs/compare/baselines/comparison.json:smartfreeze"
        raise SystemExit(f"error: --pair expects FILE:ENTRY (e.g. {example}), got {spec!r}")
    return Path(path), entry


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise SystemExit(f"error: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise SystemExit(f"error: {path} is not valid JSON ({exc})") from None


def _runs_of(doc: Mapping[str, Any], entry: str, path: Path) -> dict[int, dict[str, Any]]:
    runs = doc.get("runs", {})
    if entry not in runs:
        raise SystemExit(f"error: {path} has no entry {entry!r}; its entries: {', '.join(sorted(runs)) or 'none'}")
    return {int(r["seed"]): r for r in runs[entry]}


def _traces(dirs_a: Mapping[int, Path], dirs_b: Mapping[int, Path]) -> dict[int, dict[str, Any]]:
    """Per seed whose two run folders both hold a metrics.json: first diverging round and largest gap."""
    out = {}
    for seed in sorted(set(dirs_a) & set(dirs_b)):
        fa, fb = dirs_a[seed] / "metrics.json", dirs_b[seed] / "metrics.json"
        if fa.is_file() and fb.is_file():
            d = diff_traces(_load(fa), _load(fb))
            out[seed] = {
                "first-divergence": d["first-divergence"],
                "first-divergence-by-key": d["first-divergence-by-key"],
                "max-abs-accuracy-delta": d["max-abs-accuracy-delta"],
                "rounds-compared": d["rounds-compared"],
            }
    return out


def from_pair(spec_a: str, spec_b: str) -> dict[str, Any]:
    """One twin set from two comparison.json files."""
    (pa, ea), (pb, eb) = _split(spec_a), _split(spec_b)
    da, db = _load(pa), _load(pb)
    runs_a, runs_b = _runs_of(da, ea, pa), _runs_of(db, eb, pb)
    sides = ((pa, ea, runs_a), (pb, eb, runs_b))
    dirs = [{s: p.parent / "runs" / e / f"seed-{s}" for s in runs} for p, e, runs in sides]
    return {
        "name": f"{ea} vs {eb}",
        "a": f"{pa}:{ea}",
        "b": f"{pb}:{eb}",
        "config-a": da.get("effective-config", ""),
        "entry-a": da.get("entries", {}).get(ea, ""),
        "entry-b": db.get("entries", {}).get(eb, ""),
        "metrics": twin_rows(runs_a, runs_b, list(METRICS)),
        "traces": _traces(*dirs),
    }


def from_regress(path: Path, runs: Path) -> list[dict[str, Any]]:
    """One twin set per entry of the drift guard's recorded noise block."""
    doc = _load(path)
    noise = doc.get("noise")
    if not noise:
        raise SystemExit(f"error: {path} has no noise block: record it with ./run.sh bench regress --noise --record")
    labels = sorted(next(iter(noise.values())))
    if len(labels) != 2:
        raise SystemExit(f"error: {path}: expected two thread settings per seed, found {labels}")
    ta, tb = labels
    entries = sorted(next(iter(noise.values()))[ta])
    sets = []
    for entry in entries:
        a = {int(s): d[ta][entry] for s, d in noise.items()}
        b = {int(s): d[tb][entry] for s, d in noise.items()}
        dirs = [{s: runs / t / entry / f"seed-{s}" for s in a} for t in (ta, tb)]
        sets.append(
            {
                "name": f"{entry} {ta} vs {tb} ({doc.get('rounds')} rounds)",
                "a": f"{path}:{entry}:{ta}",
                "b": f"{path}:{entry}:{tb}",
                "metrics": twin_rows(a, b, list(METRICS)),
                "traces": _traces(*dirs),
            }
        )
    return sets


def _fmt(value: float | None, scale: float) -> str:
    return "—" if value is None else f"{scale * value:.2f}"


def render(sets: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per twin set and metric; then the decision-trace divergence per seed."""
    lines = [
        "| twins | metric | B − A per seed | noise std (one run) | seed std A | seed std B | noise / seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in sets:
        for metric, row in t["metrics"].items():
            label, scale = METRICS[metric]
            diffs = ", ".join(f"{scale * d:+.2f}" for d in row["differences"])
            ratio = "—" if row["noise-to-seed"] is None else f"{row['noise-to-seed']:.2f}"
            lines.append(
                f"| {t['name']} | {label} | {diffs} | {_fmt(row['noise-std'], scale)} | "
                f"{_fmt(row['seed-std-a'], scale)} | {_fmt(row['seed-std-b'], scale)} | {ratio} |"
            )
    traced = [t for t in sets if t["traces"]]
    if traced:
        lines += ["", "| twins | seed | first round whose decisions differ | largest per-round accuracy gap (points) |"]
        lines.append("|---|---|---|---|")
        for t in traced:
            for seed, tr in t["traces"].items():
                first = tr["first-divergence"]
                what = "none" if first is None else f"{first} ({', '.join(tr['first-divergence-by-key'])})"
                lines.append(f"| {t['name']} | {seed} | {what} | {100 * tr['max-abs-accuracy-delta']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="float-rounding noise of twin runs beside the spread across seeds")
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A.json:ENTRY", "B.json:ENTRY"))
    parser.add_argument("--regress", type=Path, default=None, help="bench/regression.json (its noise block)")
    parser.add_argument("--regress-runs", type=Path, default=ROOT / "outputs" / "regress")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "noise-floor", help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    if not args.pair and args.regress is None:
        parser.error("name at least one source: --pair A.json:ENTRY B.json:ENTRY or --regress bench/regression.json")
    sets = [from_pair(a, b) for a, b in args.pair]
    if args.regress is not None:
        sets += from_regress(args.regress, args.regress_runs)
    text = render(sets)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"sets": sets}, indent=1) + "\n")
    print(f"[noise_floor] wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
