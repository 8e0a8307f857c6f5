"""Run one scenario for a list of strategies with identical seeds and compare them.

    ./run.sh bench compare --scenario baselines
    ./run.sh bench compare --scenario selector --rounds 40
    ./run.sh bench compare --scenario smoke --entries fedavg smartfreeze

Each entry is ``LABEL`` (a strategy name) or ``LABEL=OVERRIDES`` (a run-config string, e.g.
``sf-random="strategy='smartfreeze' selector='random'"``). Every entry runs through ``run.sh run``
(its own simulation, stopped afterwards) with the scenario's config, so data partitions, device
population and seeds are identical and only the strategy differs. Writes to
``outputs/compare/<scenario>/``: ``comparison.md``, ``comparison.json``, ``accuracy.png`` (accuracy
per round and per simulated second, every entry) and the runs' own folders under ``runs/``.

Columns: final and best test accuracy of the full model, participation rate (share of devices
that trained at least once), peak client memory (largest measured PyTorch peak of any client in
any round, and the largest modelled stage memory), simulated training time (sum of Eq. 7 round
times), simulated time to reach the reference entry's final accuracy, and bytes moved (down + up,
plus the monitor's queries).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = "../shared/data/cifar10_small.npz"
CIFAR = f"dataset='npz' data-path='{DATA}' model='resnet10' width=0.25 fraction-evaluate=0.1"


@dataclass(frozen=True)
class Scenario:
    """A named federation: simulated clients, run config shared by every entry, default entries."""

    supernodes: int
    config: str
    entries: tuple[str, ...]
    description: str


SCENARIOS: dict[str, Scenario] = {
    "baselines": Scenario(
        40,
        f"{CIFAR} partition='dirichlet' dirichlet-alpha=0.5 device-profile='high-contention' fraction-train=0.25 "
        "num-rounds=60",
        ("smartfreeze", "profl", "fedll=strategy='fedll' fedll-rounds-per-layer=15", "fedavg"),
        "CIFAR-10 small, 40 clients, 10 per round, Dirichlet 0.5, ResNet10 w0.25, high-contention memory",
    ),
    "selector": Scenario(
        40,
        f"{CIFAR} partition='dirichlet' dirichlet-alpha=0.1 device-profile='high-contention' fraction-train=0.25 "
        "num-rounds=60",
        ("smartfreeze", "smartfreeze-random=strategy='smartfreeze' selector='random'"),
        "CIFAR-10 small, 40 clients, 10 per round, Dirichlet 0.1, ResNet10 w0.25, high-contention memory",
    ),
    "iid": Scenario(
        20,
        f"{CIFAR} partition='iid' fraction-train=0.5 num-rounds=60",
        ("smartfreeze", "fedavg"),
        "CIFAR-10 small, 20 clients, 10 per round, IID, ResNet10 w0.25, no memory limit",
    ),
    "faults": Scenario(
        20,
        f"{CIFAR} partition='iid' fraction-train=0.5 num-rounds=20",
        (
            "clean=strategy='fedavg'",
            "faulty=strategy='fedavg' fault-rate=0.2 fault-mode='mixed'",
            "sf-clean=strategy='smartfreeze'",
            "sf-faulty=strategy='smartfreeze' fault-rate=0.2 fault-mode='mixed'",
        ),
        "CIFAR-10 small, 20 clients, 10 per round, IID, ResNet10 w0.25, FedAvg and SmartFreeze; "
        "20 % of replies faulty or hostile",
    ),
    "smoke": Scenario(
        4,
        "model='smallcnn' synthetic-train-size=800 synthetic-test-size=200 device-profile='high-contention' "
        "num-rounds=6 min-train-nodes=1",
        ("fedavg", "smartfreeze"),
        "synthetic data, 4 clients, small CNN (for tests)",
    ),
}


def parse_entry(entry: str) -> tuple[str, str]:
    """``LABEL`` or ``LABEL=OVERRIDES`` -> (label, overrides including the strategy)."""
    label, _, overrides = entry.partition("=")
    if not label:
        raise ValueError(f"entry {entry!r} has no label")
    if "strategy=" not in overrides:
        overrides = f"strategy='{label}' {overrides}".strip()
    return label, overrides


def run_entry(scenario: Scenario, label: str, overrides: str, out: Path, extra: str) -> dict[str, Any]:
    """Run one entry through run.sh; return its metrics.json (raises if the run failed)."""
    config = f"{scenario.config} {overrides} {extra} run-name='{label}' output-dir='{out / 'runs'}'"
    cmd = [str(ROOT / "run.sh"), "run", "--supernodes", str(scenario.supernodes), "--run-config", config]
    print(f"[compare] {label}: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    log = out / "runs" / f"{label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"entry {label!r} failed (exit {res.returncode}); log: {log}\n{res.stderr[-2000:]}")
    doc = json.loads((out / "runs" / label / "metrics.json").read_text())
    doc["wall-seconds-total"] = time.monotonic() - t0
    return doc


SMOOTH = 5
"""Rounds in the moving average of test accuracy used for targets and time-to-accuracy."""


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


def summarise(label: str, doc: dict[str, Any], target: float | None) -> dict[str, Any]:
    """One comparison row from a run's metrics.json."""
    s, rows = doc["summary"], doc["rounds"]
    peaks = [r["max-peak-mb"] for r in rows if r.get("max-peak-mb") is not None]
    modelled = [r["modelled-memory-mb"] for r in rows if r.get("modelled-memory-mb") is not None]
    return {
        "entry": label,
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
        "unconstrained": doc["config"]["strategy"] == "fedavg",
        "rounds-completed": sum(1 for r in rows if r["round"] > 0 and (r.get("participants") or 0) > 0),
        "failed-replies": int(sum(r.get("failures") or 0 for r in rows)),
        "rejections": s.get("rejections") or {},
        "wall-seconds": doc.get("wall-seconds-total"),
    }


def _fmt(value: Any, pct: bool = False, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else ""
    if pct:
        return f"{100 * value:.{digits}f}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _points(value: float | None, base: float | None) -> str:
    """Difference of two accuracies in percentage points, signed (— if either is missing)."""
    if value is None or base is None:
        return "—"
    return f"{100 * (value - base):+.1f}"


def markdown(name: str, scenario: Scenario, rows: list[dict[str, Any]], target: float | None, ref: str) -> str:
    """The comparison table as Markdown."""
    lines = [
        f"Scenario `{name}`: {scenario.description}.",
        "",
        f"Time to target: simulated seconds until the {SMOOTH}-round moving average of test accuracy reaches "
        f"{_fmt(target, True)} % (the final moving average of `{ref}`).",
        "",
        f"| entry | final acc % | last-{SMOOTH} mean % | best acc % | participation % | peak client MB (measured) | "
        "modelled MB | sim time s | time to target s | MB moved |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name_cell = r["entry"] + (" (unconstrained reference)" if r["unconstrained"] else "")
        lines.append(
            f"| {name_cell} | {_fmt(r['final-accuracy'], True)} | {_fmt(r['final-accuracy-smoothed'], True)} | "
            f"{_fmt(r['best-accuracy'], True)} | "
            f"{_fmt(r['participation-rate'], True, 0)} | {_fmt(r['peak-client-memory-mb'])} | "
            f"{_fmt(r['modelled-memory-mb'])} | {_fmt(r['sim-time-s'], digits=0)} | "
            f"{_fmt(r['time-to-target-s'], digits=0)} | {_fmt(r['bytes-moved'] / 2**20, digits=0)} |"
        )
    if any(r["failed-replies"] or r["rejections"] for r in rows):
        lines += [
            "",
            "Faults: a failed reply is a client error (the ClientApp raised) or a reply rejected by the server's "
            "checks (reasons below). Accuracy differences are in points against the clean run: the first entry "
            "of the same strategy without failures.",
            "",
            "| entry | rounds completed | failed or rejected replies | client errors | rejected by reason | "
            f"clean run | final acc vs clean | last-{SMOOTH} mean vs clean |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            base = next((b for b in rows if b["strategy"] == r["strategy"] and not b["failed-replies"]), None)
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["rejections"].items())) or "—"
            errors = r["failed-replies"] - sum(r["rejections"].values())
            lines.append(
                f"| {r['entry']} | {r['rounds-completed']} | {r['failed-replies']} | {errors} | {reasons} | "
                f"{base['entry'] if base else '—'} | "
                f"{_points(r['final-accuracy'], base['final-accuracy'] if base else None)} | "
                f"{_points(r['final-accuracy-smoothed'], base['final-accuracy-smoothed'] if base else None)} |"
            )
    return "\n".join(lines) + "\n"


def plot(docs: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy per round and per simulated second, one line per entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for label, doc in docs.items():
        rows = [r for r in doc["rounds"] if r.get("server-accuracy") is not None]
        acc = [100 * r["server-accuracy"] for r in rows]
        axes[0].plot([r["round"] for r in rows], acc, label=label)
        axes[1].plot([r.get("sim-time") or 0.0 for r in rows], acc, label=label)
    axes[0].set_xlabel("round")
    axes[1].set_xlabel("simulated training time (s, Eq. 7)")
    for ax in axes:
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compare strategies on one scenario")
    parser.add_argument("--scenario", default="baselines", choices=sorted(SCENARIOS))
    parser.add_argument("--entries", nargs="+", default=None, help="LABEL or LABEL=OVERRIDES (default: scenario's)")
    parser.add_argument("--rounds", type=int, default=None, help="override num-rounds")
    parser.add_argument("--reference", default=None, help="entry whose final accuracy is the time-to-target")
    parser.add_argument("--run-config", default="", help="extra overrides for every entry")
    parser.add_argument("--out", type=Path, default=None, help="default outputs/compare/<scenario>")
    parser.add_argument("--summarise-only", action="store_true", help="rebuild the table from existing runs")
    args = parser.parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    if DATA in scenario.config and not (ROOT / DATA).is_file():
        missing = (ROOT / DATA).resolve()
        print(f"error: scenario {args.scenario!r} needs {missing}, which does not exist", file=sys.stderr)
        return 2
    entries = [parse_entry(e) for e in (args.entries or scenario.entries)]
    labels = [label for label, _ in entries]
    if len(set(labels)) != len(labels):
        print(f"error: duplicate entry labels in {labels}", file=sys.stderr)
        return 2
    reference = args.reference or labels[-1]
    if reference not in labels:
        print(f"error: --reference {reference!r} is not one of {labels}", file=sys.stderr)
        return 2
    out = (args.out or ROOT / "outputs" / "compare" / args.scenario).resolve()
    out.mkdir(parents=True, exist_ok=True)
    extra = args.run_config + (f" num-rounds={args.rounds}" if args.rounds else "")
    if args.summarise_only:
        docs = {label: json.loads((out / "runs" / label / "metrics.json").read_text()) for label, _ in entries}
    else:
        docs = {label: run_entry(scenario, label, overrides, out, extra) for label, overrides in entries}
    target = smoothed_final(docs[reference]["rounds"])
    rows = [summarise(label, doc, target) for label, doc in docs.items()]
    table = markdown(args.scenario, scenario, rows, target, reference)
    (out / "comparison.md").write_text(table)
    result = {"scenario": args.scenario, "description": scenario.description, "reference": reference, "rows": rows}
    (out / "comparison.json").write_text(json.dumps(result, indent=2))
    plot(docs, out / "accuracy.png", scenario.description)
    print(table)
    print(f"[compare] wrote {out / 'comparison.md'}, {out / 'comparison.json'}, {out / 'accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
