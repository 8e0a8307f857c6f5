"""Drift guard: a short, seeded run of the headline scenario, compared with figures recorded in the repo.

    ./run.sh bench regress              # run the set, compare with bench/regression.json (exit 1 if outside)
    ./run.sh bench regress --noise      # measure the float noise: seeds 0..2 x client/server threads (1,0), (2,1)
    ./run.sh bench regress --record     # record this code's figures (and, with --noise, the tolerance)

The set is :data:`ENTRIES` on the ``baselines`` scenario of :mod:`bench.compare` (CIFAR-10 small,
40 clients, Dirichlet 0.5, ResNet10 w0.25, high-contention memory) at :data:`ROUNDS` rounds and
seed 0: SmartFreeze and DepthFL, the two entries whose figures moved most between the first
comparison table and later runs. A changed figure beyond the tolerance means a change of the code
moved a method by more than float rounding can (the guard is a benchmark command, not a timed
test: it takes about 3 minutes; ``--noise`` about 15).

Tolerance. The same seed with other thread counts for the clients and the ServerApp gives other
float rounding, and from some round on other decisions. ``--noise`` runs the set at seeds
0..``NOISE_SEEDS - 1`` under two thread settings; for a metric, each (entry, seed) pair of twins
gives a difference ``d``, and since each twin carries its own rounding noise,
``sigma = sqrt(mean(d^2) / 2)`` estimates one run's noise std (pooled over entries and seeds).
The tolerance is ``max(3 sigma, MIN_TOLERANCE)``: a genuine shift of the method has to stand
three noise stds out. Reproducible regardless: on one machine with one thread setting the same
commit repeats every figure exactly, and the report says whether the decision trace (participants
and stages per round) matched the recorded one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.compare import ROOT, SCENARIOS, run_config, run_entry
from common.results import summarise
from common.seedstats import pooled_sigma

ENTRIES: dict[str, str] = {
    "smartfreeze": "strategy='smartfreeze'",
    "depthfl": "strategy='depthfl'",
}
ROUNDS = 20
SEED = 0
NOISE_SEEDS = 3
THREADS: tuple[tuple[int, int], ...] = ((1, 0), (2, 1))
"""(client-threads, server-threads) of the two noise twins; (1, 0) is the default every run uses."""

METRICS: tuple[str, ...] = ("final-accuracy-smoothed", "final-accuracy", "participation-rate")
"""Figures the guard compares (fractions; shown in percentage points)."""

MIN_TOLERANCE = 0.005
"""Smallest tolerance (half a point): below it a metric is within rounding of the printed figure."""

RECORD = ROOT / "bench" / "regression.json"


def run_set(out: Path, seed: int, threads: tuple[int, int]) -> dict[str, dict[str, Any]]:
    """Run every entry once; returns per entry its summary row plus its decision trace."""
    scenario = SCENARIOS["baselines"]
    extra = f"num-rounds={ROUNDS} client-threads={threads[0]} server-threads={threads[1]}"
    result = {}
    for label, overrides in ENTRIES.items():
        run_dir = out / f"t{threads[0]}-{threads[1]}" / label / f"seed-{seed}"
        doc = run_entry(scenario, label, run_config(scenario, overrides, extra, seed, run_dir), run_dir, rerun=False)
        row = summarise(label, seed, doc, None)
        result[label] = {
            **{m: row[m] for m in METRICS},
            "trace": [[r.get("stage"), r.get("participant-ids")] for r in doc["rounds"] if r["round"] > 0],
            "run": str(run_dir),
        }
    return result


def tolerances(noise: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float]:
    """Per metric ``max(3 sigma, MIN_TOLERANCE)`` from ``noise[seed][threads-label][entry]`` rows."""
    out = {}
    for metric in METRICS:
        diffs = []
        for by_threads in noise.values():
            a, b = (by_threads[f"t{t[0]}-{t[1]}"] for t in THREADS)
            diffs += [
                a[e][metric] - b[e][metric] for e in ENTRIES if a[e][metric] is not None and b[e][metric] is not None
            ]
        out[metric] = max(3 * pooled_sigma(diffs), MIN_TOLERANCE)
    return out


def compare(now: dict[str, dict[str, Any]], recorded: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """Rows (entry, metric, recorded, now, delta, tolerance, ok) and whether every figure is inside."""
    rows, ok = [], True
    for label in ENTRIES:
        ref = recorded["entries"].get(label)
        if ref is None:
            rows.append({"entry": label, "metric": "(not recorded)", "ok": False})
            ok = False
            continue
        for metric in METRICS:
            tol = recorded["tolerance"][metric]
            delta = now[label][metric] - ref[metric]
            inside = abs(delta) <= tol
            ok &= inside
            rows.append(
                {"entry": label, "metric": metric, "recorded": ref[metric], "now": now[label][metric], "delta": delta}
                | {"tolerance": tol, "ok": inside, "same-decisions": now[label]["trace"] == ref["trace"]}
            )
    return rows, ok


def render(rows: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table (percentage points)."""
    lines = [
        "| entry | metric | recorded % | now % | difference (points) | tolerance (points) | within | same decisions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "recorded" not in r:
            lines.append(f"| {r['entry']} | {r['metric']} | — | — | — | — | no | — |")
            continue
        lines.append(
            f"| {r['entry']} | {r['metric']} | {100 * r['recorded']:.2f} | {100 * r['now']:.2f} | "
            f"{100 * r['delta']:+.2f} | {100 * r['tolerance']:.2f} | {'yes' if r['ok'] else '**no**'} | "
            f"{'yes' if r['same-decisions'] else 'no'} |"
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Commit, date, CPU model and the memory benchmarks' version facts the figures come from."""
    from bench.memory import environment as versions

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True, capture_output=True)
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    names = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")]
    import numpy

    return {
        **versions(),
        "numpy": numpy.__version__,
        "commit": commit.stdout.strip() or "unknown",
        "date": datetime.date.today().isoformat(),
        "cpu": names[0] if names else "unknown",
    }


ENVIRONMENT_KEYS = ("cpu", "machine", "cpus", "threads", "python", "torch", "numpy")
"""Facts of the machine and libraries that set the float rounding (the commit and date do not)."""


def environment_changes(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between the record's environment and this one (``"cpu 'A' -> 'B'"``), for
    :data:`ENVIRONMENT_KEYS`; a fact the record lacks is named as unrecorded."""
    changes = []
    for key in ENVIRONMENT_KEYS:
        if key not in now:
            continue
        if key not in recorded:
            changes.append(f"{key} unrecorded -> {now[key]!r}")
        elif recorded[key] != now[key]:
            changes.append(f"{key} {recorded[key]!r} -> {now[key]!r}")
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="short seeded regression run vs recorded figures")
    parser.add_argument("--record", action="store_true", help=f"write the figures to {RECORD.relative_to(ROOT)}")
    parser.add_argument("--noise", action="store_true", help="measure the float noise and derive the tolerance")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "regress")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    now = run_set(out, SEED, THREADS[0])
    noise = None
    if args.noise:
        noise = {
            str(seed): {
                f"t{t[0]}-{t[1]}": (now if (seed, t) == (SEED, THREADS[0]) else run_set(out, seed, t)) for t in THREADS
            }
            for seed in range(NOISE_SEEDS)
        }
        print("tolerance (points): " + ", ".join(f"{m} {100 * v:.2f}" for m, v in tolerances(noise).items()))
    result: dict[str, Any] = {"environment": environment(), "rounds": ROUNDS, "seed": SEED, "entries": now}
    if args.record:
        old = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
        if noise is None and "tolerance" not in old:
            print("error: no tolerance recorded yet: run --record together with --noise", file=sys.stderr)
            return 2
        record = {
            **result,
            "threads": list(THREADS[0]),
            "tolerance": tolerances(noise) if noise else old["tolerance"],
            "noise": _strip(noise) if noise else old.get("noise"),
        }
        RECORD.write_text(json.dumps(record, indent=1) + "\n")
        print(f"[regress] recorded {RECORD}")
        return 0
    if not RECORD.is_file():
        print(f"error: {RECORD} does not exist: record it first with --record --noise", file=sys.stderr)
        return 2
    record = json.loads(RECORD.read_text())
    rows, ok = compare(now, record)
    print(render(rows))
    changes = environment_changes(record.get("environment", {}), result["environment"])
    if changes:
        commit = record.get("environment", {}).get("commit", "?")
        print(
            f"[regress] this environment differs from the record's ({'; '.join(changes)}): float rounding differs "
            "across CPUs and library versions, and from some round on SmartFreeze's decisions with it, so a drift "
            f"here may be the machine's, not the code's. To tell: run the recorded commit {commit} here; if it "
            "drifts the same way, re-record on this machine (--record --noise) at a commit you trust."
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "regress.json").write_text(json.dumps({**result, "rows": rows, "ok": ok}, indent=1))
    print(f"[regress] {'every figure within tolerance' if ok else 'DRIFT: a figure is outside its tolerance'}")
    return 0 if ok else 1


def _strip(noise: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """The noise runs without their traces (the figures only)."""
    return {
        s: {t: {e: {m: r[m] for m in METRICS} for e, r in rows.items()} for t, rows in d.items()}
        for s, d in noise.items()
    }


if __name__ == "__main__":
    sys.exit(main())
