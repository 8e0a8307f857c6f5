"""Deployed against simulated, round by round: the same job in simulation and on localhost SuperNodes.

    ./run.sh bench deploy                      # SmartFreeze and FedAvg, 3 nodes, 10 rounds, cifar10_small
    ./run.sh bench deploy --baseline           # also Flower's plain per-message processes (the "before")
    ./run.sh bench deploy --memory-limit 690   # also: node 0 under an OS memory limit of 690 MB

One invocation runs, per strategy, the job in simulation (``run.sh run``) and deployed
(``run.sh deploy-local``: a SuperLink and N SuperNodes with their warm workers and the
``flwr-clientapp`` launcher, all started and stopped by run.sh), with ``--baseline`` also deployed
as Flower ships it (``--no-worker --no-launcher``, ``poll-interval=3`` like ``send_and_receive``,
the SuperExec's 1 s poll). Every run has the same config and seed; the job sets ``evaluate-every`` and
``stage-monitor`` explicitly (:func:`job_keys`) so that simulation and deployment do the same work.

Per round it prints: wall time deployed and simulated and their ratio; the node-side compute on
the critical path (per exchange the slowest node's handler, ``node-seconds``); the ClientApp
start-up on it (process start to the app's import, which includes the message's pull:
``clientapp-startup-seconds``); Flower's transport and polling (the rest of the exchanges); and the
ServerApp's own time between the exchanges (in simulation aggregation and server evaluation;
deployed, ``overlap-server-work``, aggregation and the round's decisions only: the evaluation, the
record and the checkpoint run inside the next round's exchange, while the nodes train, so that a
deployed round's time is the time from its push to the next round's push). The first (cold)
round is shown apart from the warm ones, and the run's final federated evaluation after the last round
(``final-evaluate-seconds``) apart from that round. The overhead beyond node-side compute is
``round - node-seconds-critical``; Flower's fixed waits are named in BENCHMARKS.md.

With ``--memory-limit MB`` it also runs SmartFreeze and FedAvg deployed with node 0 under an OS
memory limit of MB (the others unlimited) and reports, per strategy, what node 0 trained, its
failures, whether one was an out-of-memory kill, and the largest memory charged to its limit. These
two runs train :data:`LIMIT_JOB`'s model (VGG11-BN width 0.5, batch 256) instead of the timing job's
ResNet10: on the CPU, ResNet10 width 0.25's stage 1 needs nearly all of the full model's real memory
(its first block holds most activations; README's device guide), so no limit separates them
robustly, whereas VGG11-BN's stage 1 grows the process by ~210 MB and the full model by ~410 MB
(``./run.sh bench memory --models vgg11bn --width 0.5 --batch-size 256``). Saves ``deploy.json``
and ``deploy.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.compare import ROOT, config_string, effective_config

DATA = "../shared/data/cifar10_small.npz"
JOB = (
    "dataset='npz' model='resnet10' width=0.25 partition='iid' fraction-train=1.0 fraction-evaluate=1.0 "
    "device-profile='none' seed=0"
)
LIMIT_JOB = "model='vgg11bn' width=0.5 batch-size=256 min-stage-rounds=1 max-stage-rounds=2"
"""What the ``--memory-limit`` runs change in the job: a model whose SmartFreeze stages need clearly less real
memory than the full model (see the module docstring), every stage reached within 10 rounds."""
BASELINE_FLAGS = ("--no-worker", "--no-launcher")
BASELINE_CONFIG = "poll-interval=3.0"


def breakdown(row: dict[str, Any]) -> dict[str, float]:
    """One deployed round's time split (s): node compute, ClientApp start-up, transport + polling, server."""
    wall = float(row.get("round-seconds", math.nan))
    exchange = float(row.get("exchange-seconds", math.nan))
    node = float(row.get("node-seconds-critical", 0.0))
    startup = float(row.get("startup-seconds-critical", 0.0))
    return {
        "wall": wall,
        "node": node,
        "startup": startup,
        "transport": max(0.0, exchange - node - startup),
        "server": max(0.0, wall - exchange),
        "overhead": wall - node,
    }


def compare_rounds(sim: list[dict[str, Any]], dep: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per training round (1..R): the deployed breakdown with the simulated wall time and the ratio."""
    by_round = {int(r["round"]): r for r in sim if int(r.get("round", 0)) > 0}
    rows = []
    for r in dep:
        rnd = int(r.get("round", 0))
        if rnd <= 0 or rnd not in by_round:
            continue
        b = breakdown(r)
        s = float(by_round[rnd].get("round-seconds", math.nan))
        rows.append({"round": rnd, **b, "sim": s, "ratio": b["wall"] / s if s > 0 else math.nan})
    return rows


def warm_summary(rows: list[dict[str, float]]) -> dict[str, float]:
    """Means over the warm rounds (all but the first): wall, simulated, ratio, overhead; and the worst ratio."""
    warm = [r for r in rows if r["round"] > 1]
    if not warm:
        return {}
    keys = ("wall", "sim", "ratio", "overhead", "node", "startup", "transport", "server")
    out = {f"mean-{k}": statistics.fmean(r[k] for r in warm) for k in keys}
    out["max-ratio"] = max(r["ratio"] for r in warm)
    out["max-overhead"] = max(r["overhead"] for r in warm)
    out["rounds"] = float(len(warm))
    return out


def job_keys(data: Path, rounds: int, strategy: str) -> str:
    """The per-invocation keys of the job. Simulation and deployment do the same work: what deployment does by
    default (``evaluate-every=0`` and ``stage-monitor='auto'`` there) is set explicitly for both: one federated
    evaluation after the last round, and SmartFreeze's new-stage queries in the round's own exchange."""
    keys = f"data-path='{data}' num-rounds={rounds} strategy='{strategy}'"
    return f"{keys} evaluate-every={rounds} stage-monitor='with-round'"


def job(data: Path, rounds: int, strategy: str, overrides: str) -> dict[str, Any]:
    """The benchmark's run config for one strategy (``overrides`` last: they win)."""
    return effective_config(JOB, job_keys(data, rounds, strategy), overrides)


# ---------------------------------------------------------------- running
def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[deploy] {' '.join(cmd[1:])}", flush=True)
    with log.open("w") as f:
        res = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if res.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd[1:3])} failed (exit {res.returncode}); log: {log}\n{tail}")


def run_job(kind: str, config: dict[str, Any], out: Path, nodes: int, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """``kind`` = sim | warm | plain | limited: run the job, return its metrics.json."""
    name = str(config["run-name"])
    rc = config_string({**config, "output-dir": str(out / "runs"), "overwrite": True})
    env = None
    if kind == "sim":
        cmd = [str(ROOT / "run.sh"), "run", "--supernodes", str(nodes), "--run-config", rc]
    else:
        cmd = [str(ROOT / "run.sh"), "deploy-local", "--nodes", str(nodes), "--run-config", rc, *extra]
        if kind == "plain":
            env = {**os.environ, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"}  # Flower's default
    t0 = time.monotonic()
    _run(cmd, out / "logs" / f"{name}.log", env)
    doc = json.loads((out / "runs" / name / "metrics.json").read_text())
    doc["invocation-seconds"] = time.monotonic() - t0
    return doc


def _fmt(v: float, nd: int = 1) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def table(label: str, rows: list[dict[str, float]]) -> list[str]:
    """Markdown rows of one deployed run against its simulated twin."""
    lines = [
        f"**{label}**",
        "",
        "| round | deployed s | simulated s | ratio | node compute s | ClientApp start-up s | transport + polling s "
        "| server s | overhead beyond compute s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tag = " (cold)" if r["round"] == 1 else ""
        lines.append(
            f"| {r['round']}{tag} | {_fmt(r['wall'])} | {_fmt(r['sim'])} | {_fmt(r['ratio'], 2)} | {_fmt(r['node'])} "
            f"| {_fmt(r['startup'])} | {_fmt(r['transport'])} | {_fmt(r['server'])} | {_fmt(r['overhead'])} |"
        )
    w = warm_summary(rows)
    if w:
        lines.append(
            f"| warm mean | {_fmt(w['mean-wall'])} | {_fmt(w['mean-sim'])} | {_fmt(w['mean-ratio'], 2)} "
            f"(max {_fmt(w['max-ratio'], 2)}) | {_fmt(w['mean-node'])} | {_fmt(w['mean-startup'])} "
            f"| {_fmt(w['mean-transport'])} | {_fmt(w['mean-server'])} | {_fmt(w['mean-overhead'])} "
            f"(max {_fmt(w['max-overhead'])}) |"
        )
    return [*lines, ""]


def final_step(rounds: list[dict[str, Any]]) -> float:
    """Seconds of the run's final federated evaluation (the last round's ``final-evaluate-seconds``; nan if none)."""
    return float(rounds[-1].get("final-evaluate-seconds", math.nan)) if rounds else math.nan


def node_report(doc: dict[str, Any], pid: int) -> dict[str, Any]:
    """What partition ``pid`` did in a run: rounds trained, stages, failures, OOM kills seen by the server, and
    per stage (``full`` without stages) the largest memory its OS limit charged (MB, ``node-memory-seen``)."""
    rounds = [r for r in doc.get("rounds", []) if int(r.get("round", 0)) > 0]
    trained = [int(r["round"]) for r in rounds if pid in (r.get("participant-ids") or [])]
    stages = sorted({int(r["stage"]) for r in rounds if pid in (r.get("participant-ids") or []) and "stage" in r})
    stage_of = {int(r["round"]): (f"stage {int(r['stage'])}" if "stage" in r else "full") for r in rounds}
    seen = ((doc.get("summary") or {}).get("node-memory-seen") or {}).get(str(pid), [])
    peaks: dict[str, float] = {}
    for row in seen:
        if "os-peak-mb" in row:
            label = stage_of.get(int(row["round"]), "?")
            peaks[label] = max(peaks.get(label, 0.0), float(row["os-peak-mb"]))
    return {
        "rounds-trained": trained,
        "stages-trained": stages,
        "oom-kills": max((float(r.get("oom-kills", 0.0)) for r in rounds), default=0.0),
        "oom-rounds": [int(row["round"]) for row in seen if row.get("oom")],
        "failures": sum(float(r.get("failures", 0.0)) for r in rounds),
        "peak-mb-by-stage": peaks,
        "final-accuracy": (doc.get("summary") or {}).get("final-accuracy"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="deployed vs simulated round time, same job, one invocation")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--strategies", default="smartfreeze,fedavg")
    parser.add_argument("--data-path", default=DATA)
    parser.add_argument("--run-config", default="", help="more overrides of the job (last value wins)")
    parser.add_argument("--baseline", action="store_true", help="also deployed the way Flower ships it (before)")
    parser.add_argument("--memory-limit", type=float, default=None, help="also runs with node 0 under this OS limit")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench-deploy"))
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.rounds < 1:
        parser.error(f"--nodes {args.nodes} and --rounds {args.rounds} must be positive")
    data = Path(args.data_path).expanduser()
    data = data if data.is_absolute() else (ROOT / data).resolve()
    if not data.is_file():
        parser.error(f"--data-path {args.data_path!r}: no such file (resolved to {data})")
    out = Path(args.out).resolve()
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    results: dict[str, Any] = {"runs": {}, "tables": {}, "summary": {}}
    lines = [
        f"# Deployed vs simulated ({datetime.date.today().isoformat()}, commit {_commit()})",
        "",
        f"`./run.sh bench deploy {' '.join(argv if argv is not None else sys.argv[1:])}`: {args.nodes} nodes, "
        f"{args.rounds} rounds, {data.name}.",
        "",
    ]
    for strategy in strategies:
        base = job(data, args.rounds, strategy, args.run_config)
        sim = run_job("sim", {**base, "run-name": f"sim-{strategy}"}, out, args.nodes)
        kinds = [("warm", (), "")]
        if args.baseline:
            kinds.append(("plain", BASELINE_FLAGS, BASELINE_CONFIG))
        for kind, flags, more in kinds:
            config = {**effective_config(config_string(base), more), "run-name": f"{kind}-{strategy}"}
            dep = run_job(kind, config, out, args.nodes, flags)
            rows = compare_rounds(sim["rounds"], dep["rounds"])
            label = f"{strategy}, {'warm runtime' if kind == 'warm' else 'Flower as shipped (before)'}"
            lines += table(label, rows)
            acc = (dep.get("summary") or {}).get("final-accuracy")
            sim_acc = (sim.get("summary") or {}).get("final-accuracy")
            final = (final_step(dep["rounds"]), final_step(sim["rounds"]))
            results["tables"][f"{kind}-{strategy}"] = rows
            results["summary"][f"{kind}-{strategy}"] = {
                **warm_summary(rows),
                "final-accuracy": acc,
                "sim-final-accuracy": sim_acc,
                "final-evaluate-seconds": final[0],
                "sim-final-evaluate-seconds": final[1],
            }
            lines.append(
                f"Final federated evaluation (after the last round, not in its time): deployed {_fmt(final[0])} s, "
                f"simulated {_fmt(final[1])} s. Final accuracy: deployed {_pct(acc)}, simulated {_pct(sim_acc)}.\n"
            )
        results["runs"][strategy] = {"sim-final-accuracy": (sim.get("summary") or {}).get("final-accuracy")}
    if args.memory_limit is not None:
        lines += [f"## Node 0 under an OS memory limit of {args.memory_limit:g} MB", ""]
        lines += [
            f"Job changes: `{LIMIT_JOB}`.",
            "",
            "| strategy | rounds node 0 trained | stages | OOM-killed rounds | failures "
            "| node 0's peak charged to its limit, MB | final accuracy |",
            "|---|---|---|---|---|---|---|",
        ]
        mems = ",".join([f"{args.memory_limit:g}"] + ["100000"] * (args.nodes - 1))
        for strategy in ("smartfreeze", "fedavg"):
            base = effective_config(JOB, f"{job_keys(data, args.rounds, strategy)} {LIMIT_JOB}", args.run_config)
            dep = run_job(
                "limited", {**base, "run-name": f"limited-{strategy}"}, out, args.nodes, ("--memory-mb", mems)
            )
            rep = node_report(dep, 0)
            results["summary"][f"limited-{strategy}"] = rep
            lines.append(
                f"| {strategy} | {rep['rounds-trained']} | {rep['stages-trained']} | {rep['oom-rounds']} "
                f"| {rep['failures']:.0f} "
                f"| {', '.join(f'{k}: {v:.0f}' for k, v in rep['peak-mb-by-stage'].items()) or '—'} "
                f"| {_pct(rep['final-accuracy'])} |"
            )
        lines.append("")
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deploy.md").write_text(text + "\n")
    (out / "deploy.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"[deploy] saved {out / 'deploy.md'} and {out / 'deploy.json'}")
    return 0


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * float(v):.2f} %"


def _commit() -> str:
    res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return res.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
