"""Large simulated populations: memory and time per round of a run with many clients, few per round.

Run: ``./run.sh bench population [--supernodes 1000] [--per-round 10] [--rounds 5] [--model smallcnn]
[--cpus-per-client 1] [--run-config "k=v ..."] [--label NAME]`` (``.venv/bin/python -m bench.population``).

One ``./run.sh run`` on the default (synthetic) data with ``--supernodes`` simulated clients, of which
``--per-round`` train each round (``fraction-train`` and ``fraction-evaluate`` = per-round / supernodes),
measured with ``bench/overhead.py``'s sampler (every process of the run: SuperLink, simulation,
ServerApp, Ray and its ClientApp actors; found by process tree and by an environment tag): peak summed
PSS (memory the processes use together) and peak summed RSS (shared pages counted once per process:
an upper bound), wall time, the time from the ServerApp's start to round 1 (initial evaluation and the
discovery ``query`` of every node, so it grows with the population) with the CPU seconds each process
group spent in it (less sensitive to other load on the machine than wall time) and the time of every round.

The default data has 6,000 training images: 1,000 IID clients hold 6 each (5 for training, 1 for
validation), below the default ``min-partition-size`` of 10, so the workload sets
``min-partition-size=5`` (for every population, so that runs compare). Results go to ``--json``
(default ``outputs/bench/population.json``, one entry per ``--label``, default ``clients-<N>``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from bench.overhead import ROOT, TAG_ENV, machine_info, phase_summary, run_measured, simulation_timeline

DEFAULT_JSON = ROOT / "outputs" / "bench" / "population.json"
RUNS_DIR = ROOT / "outputs" / "bench" / "population-runs"


def workload(args: argparse.Namespace, run_dir: Path) -> str:
    """The ``--run-config`` string of the run."""
    if not 1 <= args.per_round <= args.supernodes:
        raise ValueError(f"--per-round {args.per_round} must be in [1, --supernodes={args.supernodes}]")
    fraction = args.per_round / args.supernodes
    parts = [
        f"model='{args.model}'",
        f"num-rounds={args.rounds}",
        f"fraction-train={fraction!r}",
        f"fraction-evaluate={fraction!r}",
        f"min-partition-size={args.min_partition_size}",
        f"seed={args.seed}",
        f"run-name='{run_dir.name}'",
        f"output-dir='{run_dir.parent}'",
    ]
    if args.run_config:
        parts.append(args.run_config)
    return " ".join(parts)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the simulation once, sampled; return the figures."""
    label = args.label or f"clients-{args.supernodes}"
    run_dir = RUNS_DIR / label
    if run_dir.exists():
        shutil.rmtree(run_dir)
    config = workload(args, run_dir)
    cmd = [
        str(ROOT / "run.sh"),
        "run",
        "--supernodes",
        str(args.supernodes),
        "--cpus-per-client",
        str(args.cpus_per_client),
        "--run-config",
        config,
    ]
    print(f"[population] {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    tag = uuid.uuid4().hex
    phase = run_measured("simulation", cmd, {**os.environ, TAG_ENV: tag}, tag, args.interval, RUNS_DIR / f"{label}.log")
    if phase.returncode != 0:
        tail = "\n".join(line for _, line in phase.lines[-30:])
        raise RuntimeError(f"run failed (exit {phase.returncode}); log {RUNS_DIR / label}.log\n{tail}")
    doc = json.loads((run_dir / "metrics.json").read_text())
    summary = phase_summary(phase)
    timeline = simulation_timeline(phase, run_dir, doc)
    rounds = [r for r in doc["rounds"] if r["round"] > 0]
    per_round = [float(r["round-seconds"]) for r in rounds]
    started, first = timeline["serverapp-started (config.json)"], timeline["round-1-started"]
    assert phase.sampler is not None
    start_cpu = phase.sampler.cpu_between(phase.t0 + started, phase.t0 + first) if started is not None and first else {}
    return {
        "label": label,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "workload": {
            "supernodes": args.supernodes,
            "per-round": args.per_round,
            "rounds": args.rounds,
            "model": args.model,
            "cpus-per-client": args.cpus_per_client,
            "run-config": config,
        },
        "wall-seconds": phase.wall,
        "serverapp-start-to-round-1-seconds": None if started is None or first is None else first - started,
        "serverapp-start-to-round-1-cpu-seconds-by-group": start_cpu,
        "per-round-seconds": per_round,
        "mean-round-seconds": sum(per_round) / len(per_round),
        "participants-per-round": [r.get("participants") for r in rounds],
        "num-nodes": doc["summary"].get("num-nodes"),
        "final-accuracy": doc["summary"]["final-accuracy"],
        "peak-pss-mb": summary["peak-pss-mb"],
        "peak-rss-summed-mb": summary["peak-rss-summed-mb"],
        "peak-pss-by-group-mb": summary["peak-pss-by-group-mb"],
        "peak-processes": summary["peak-processes"],
        "cpu-seconds": summary["cpu-seconds"],
        "load-average-before": summary["load-average-before"],
        "foreign-cpu-share": summary["foreign-cpu-share"],
        "timeline-seconds": timeline,
        "run-dir": str(run_dir),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure, print, save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supernodes", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="smallcnn")
    parser.add_argument("--min-partition-size", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--run-config", default="", help="extra run-config overrides")
    parser.add_argument("--interval", type=float, default=1.0, help="memory sampling interval (s)")
    parser.add_argument("--label", default=None)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    try:
        res = measure(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    w = res["workload"]
    print(
        f"\n{w['supernodes']} clients ({res['num-nodes']} discovered), {w['per-round']} per round, "
        f"{w['rounds']} rounds, "
        f"{w['model']}: wall {res['wall-seconds']:.1f} s; ServerApp start -> round 1 "
        f"{res['serverapp-start-to-round-1-seconds'] or float('nan'):.1f} s; per round "
        + ", ".join(f"{t:.2f}" for t in res["per-round-seconds"])
        + f" s (mean {res['mean-round-seconds']:.2f}); peak summed PSS {res['peak-pss-mb']:.0f} MB, "
        f"summed RSS {res['peak-rss-summed-mb']:.0f} MB, {res['peak-processes']} processes; final accuracy "
        f"{100 * res['final-accuracy']:.1f} %; load average before {res['load-average-before'][0]:.1f} on "
        f"{psutil.cpu_count()} CPUs, other processes used {100 * (res['foreign-cpu-share'] or 0):.0f} % of the machine"
    )
    cpu = res["serverapp-start-to-round-1-cpu-seconds-by-group"].items()
    print("CPU s from ServerApp start to round 1 by process group: " + ", ".join(f"{g} {v:.1f}" for g, v in cpu))
    groups = res["peak-pss-by-group-mb"].items()
    print("peak PSS by process group (MB): " + ", ".join(f"{g} {v:.0f}" for g, v in groups))
    doc: dict[str, Any] = {}
    if args.json.exists():
        doc = json.loads(args.json.read_text())
    doc.setdefault("results", {})[res["label"]] = res
    doc.update({"benchmark": "population", "machine": machine_info()})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1))
    print(f"[population] wrote {args.json} (entry {res['label']!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
