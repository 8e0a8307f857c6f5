"""Diff two runs round by round: the decisions they took and the accuracy they reached.

    ./run.sh bench trace_diff outputs/a outputs/b
    ./run.sh bench trace_diff outputs/compare/noise/runs/t1/seed-0 outputs/compare/noise/runs/t2/seed-0 --json d.json

Every decision a run takes is in its ``metrics.json`` (written by the ServerApp each round):
the participants (``participant-ids``), the stage and its switches (``stage``, ``froze-block``,
``freeze-reason``; ProFL's ``phase``/``block``), the pace metric the switch rests on
(``pace-metric``, ``pace-smoothed``, ``pace-slope``, ``pace-streak``), TiFL's ``tier``, DepthFL's
holder counts, the round's retries (``attempts``) and, once per run, the communities RL-CD found
and its splits (``summary.communities``, ``summary.community-splits``). This prints, per round,
where the decision trace of two runs first differs and how far apart their test accuracies are,
and saves the same as JSON. Two runs of the same config and seed on one machine must show no
decision difference; the same seed with other thread counts shows where float rounding first
changed a decision (the noise floor in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

DECISION_KEYS: tuple[str, ...] = (
    "participant-ids",
    "stage",
    "phase",
    "block",
    "froze-block",
    "freeze-reason",
    "tier",
    "block-counts",
    "classifier-counts",
    "attempts",
    "eligible",
)
"""Per-round fields that are decisions (discrete); a difference in any is a divergence."""

METRIC_KEYS: tuple[str, ...] = ("server-accuracy", "train-loss", "pace-metric")
"""Per-round real-valued fields compared by their difference."""

RUN_DECISIONS: tuple[str, ...] = ("communities", "community-splits", "stages")
"""Once-per-run decisions in the summary."""


def load_metrics(run: Path) -> dict[str, Any]:
    """A run folder's (or a metrics.json file's) parsed metrics; exits with a clear message if unreadable."""
    path = run / "metrics.json" if run.is_dir() else run
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise SystemExit(f"error: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise SystemExit(f"error: {path} is not valid JSON ({exc})") from None


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def diff_traces(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Round-by-round comparison of two metrics.json documents (pure; see module docstring)."""
    ra = {int(r["round"]): r for r in a.get("rounds", [])}
    rb = {int(r["round"]): r for r in b.get("rounds", [])}
    rounds = sorted(set(ra) & set(rb))
    per_round = []
    first: dict[str, int] = {}
    for k in rounds:
        x, y = ra[k], rb[k]
        differing = [key for key in DECISION_KEYS if not _close(x.get(key), y.get(key))]
        for key in differing:
            first.setdefault(key, k)
        deltas = {}
        for key in METRIC_KEYS:
            if isinstance(x.get(key), int | float) and isinstance(y.get(key), int | float):
                deltas[key] = float(y[key]) - float(x[key])
        per_round.append({"round": k, "decisions-differ": differing, "delta": deltas})
    acc = [abs(r["delta"]["server-accuracy"]) for r in per_round if "server-accuracy" in r["delta"]]
    sa, sb = a.get("summary", {}), b.get("summary", {})
    return {
        "rounds-compared": len(rounds),
        "rounds-only-in-a": sorted(set(ra) - set(rb)),
        "rounds-only-in-b": sorted(set(rb) - set(ra)),
        "first-divergence": min(first.values()) if first else None,
        "first-divergence-by-key": dict(sorted(first.items(), key=lambda kv: kv[1])),
        "run-decisions-differ": [key for key in RUN_DECISIONS if not _close(sa.get(key), sb.get(key))],
        "max-abs-accuracy-delta": max(acc, default=0.0),
        "final-accuracy": [sa.get("final-accuracy"), sb.get("final-accuracy")],
        "per-round": per_round,
    }


def render(result: dict[str, Any], a: str, b: str) -> str:
    """The diff as text: one line per round where something differs, then a summary."""
    lines = [f"A = {a}", f"B = {b}", "", "round | decisions that differ | B - A accuracy (points) | B - A train loss"]
    for r in result["per-round"]:
        acc = r["delta"].get("server-accuracy")
        loss = r["delta"].get("train-loss")
        if r["decisions-differ"] or acc or loss:
            acc_s = "—" if acc is None else f"{100 * acc:+.2f}"
            loss_s = "—" if loss is None else f"{loss:+.5f}"
            lines.append(f"{r['round']:5d} | {', '.join(r['decisions-differ']) or '—'} | {acc_s} | {loss_s}")
    first = result["first-divergence"]
    lines += [
        "",
        f"rounds compared: {result['rounds-compared']}"
        + (f" (only in A: {result['rounds-only-in-a']})" if result["rounds-only-in-a"] else "")
        + (f" (only in B: {result['rounds-only-in-b']})" if result["rounds-only-in-b"] else ""),
        "decisions: identical in every round"
        if first is None
        else "first decision that differs: round "
        + f"{first} ("
        + ", ".join(f"{k} from round {v}" for k, v in result["first-divergence-by-key"].items())
        + ")",
        "once-per-run decisions that differ: " + (", ".join(result["run-decisions-differ"]) or "none"),
        f"largest |accuracy difference| in a round: {100 * result['max-abs-accuracy-delta']:.2f} points",
    ]
    fa, fb = result["final-accuracy"]
    if fa is not None and fb is not None:
        lines.append(f"final accuracy: A {100 * fa:.2f} %, B {100 * fb:.2f} %")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="diff two runs' decision traces round by round")
    parser.add_argument("a", type=Path, help="run folder (or its metrics.json)")
    parser.add_argument("b", type=Path, help="run folder (or its metrics.json)")
    parser.add_argument("--json", type=Path, default=None, help="also save the diff here")
    args = parser.parse_args(argv)
    result = diff_traces(load_metrics(args.a), load_metrics(args.b))
    print(render(result, str(args.a), str(args.b)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"[trace_diff] wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
