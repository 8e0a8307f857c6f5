"""Run one scenario for a list of strategies under N seeds and compare them (mean ± std, paired by seed).

    ./run.sh bench compare --scenario baselines --seeds 3
    ./run.sh bench compare --scenario selector --rounds 40
    ./run.sh bench compare --scenario smoke --entries fedavg smartfreeze
    ./run.sh bench compare --scenario iid --seeds 3 --data-path ../shared/data/cifar10_eval.npz

Each entry is ``LABEL`` (a strategy name) or ``LABEL=OVERRIDES`` (a run-config string, e.g.
``sf-random="strategy='smartfreeze' selector='random'"``). Every entry runs through ``run.sh run``
(its own simulation, stopped afterwards) once per seed with the scenario's config, so at one seed
data partitions, device population and initialisation are identical and only the strategy
differs. The run config of a run is, left to right with the later value winning (a key may
repeat): the scenario's config, the entry's overrides, ``--run-config``, ``--rounds``,
``--data-path``, then ``seed``, ``run-name`` and ``output-dir``.

What ``seed`` changes (one integer, every random choice of the run derives from it):

* the data partition (``common.partition``: the IID permutation or the Dirichlet draws, and each
  partition's train/validation split, ``common.data``),
* the simulated device draws (``common.devices``: memory budget and speed of every partition id),
* the participant sampling every round (``FedAvgStrategy.sample``, the SmartFreeze selector's
  tie-breaks and exploration, TiFL's tier draws, Oort's exploration, ProFL's seeded choice),
  and the evaluation sample (``configure_evaluate``),
* the initialisation of the model, output modules, basic layers and heads, and every client's
  local shuffling, depth-dropout draws and fault injection (per-node seeds derived from
  ``(seed, round, partition id)``); RL-CD's Louvain passes.

It does not change the data file, the test set, the scenario's hyper-parameters or the device
profile's shape. ``synthetic`` data is itself drawn from the seed.

Writes to ``outputs/compare/<scenario>/``: ``comparison.md``, ``comparison.json`` (every run's row,
every entry's mean/std/per-seed values, the headline), ``accuracy.png`` (mean accuracy per round
and per simulated second with a ±1 std band) and the runs under ``runs/<label>/seed-<s>/``. A run
whose folder already holds a finished ``metrics.json`` of the same effective config is reused
(``--rerun`` runs it again), so an interrupted comparison continues where it stopped.

Columns: last-5 mean (the headline metric, see :mod:`bench.compare_table`), final and best test
accuracy of the full model, participation rate (share of devices that trained at least once),
peak client memory (largest measured PyTorch peak of any client in any round, and the largest
modelled stage memory), simulated training time (sum of Eq. 7 round times), simulated time to
reach the reference entry's last-5 mean, and bytes moved (down + up, plus the monitor's queries).
With several seeds the page also lists every entry minus the reference (``--reference``, default
the last entry), paired by seed with a Student-t interval: the line an ablation is read from.
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

from bench.compare_table import markdown, plot
from common.config import ConfigError
from common.preflight import app_defaults, parse_overrides, toml_value
from common.results import aggregate, headline, smoothed_final, summarise, versus

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


SSL_BASE = (
    f"dataset='npz' data-path='{DATA}' model='vit' width=0.25 device-profile='none' fraction-train=0.5 "
    "fraction-evaluate=0.0 num-rounds=40 strategy='fedll' fedll-objective='ssl' ssl-eval-every=5"
)
SSL_ENTRIES = ("fedll-ssl=strategy='fedll'", "fedssl=strategy='fedll' fedll-layerwise=false")
"""FedLL's self-supervised scenarios: layer-wise against end-to-end (the reference, last) on the same encoder."""

SCENARIOS: dict[str, Scenario] = {
    "baselines": Scenario(
        40,
        f"{CIFAR} partition='dirichlet' dirichlet-alpha=0.5 device-profile='high-contention' fraction-train=0.25 "
        "num-rounds=60",
        (
            "smartfreeze",
            "exclusivefl",
            "allsmall",
            "heterofl",
            "depthfl",
            "tifl",
            "oort",
            "profl",
            "fedll=strategy='fedll' fedll-rounds-per-layer=15",
            "fedavg",
        ),
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
        ("smartfreeze", "depthfl", "profl", "fedavg"),
        "CIFAR-10 small, 20 clients, 10 per round, IID, ResNet10 w0.25, no memory limit",
    ),
    "ssl": Scenario(
        10,
        f"{SSL_BASE} partition='iid'",
        SSL_ENTRIES,
        "FedLL's headline, self-supervised: CIFAR-10 small, 10 clients, 5 per round, IID, ViT w0.25, SimCLR, "
        "40 rounds; layer-wise (5 rounds per layer) against end-to-end FedSSL; accuracy = linear probe",
    ),
    "ssl-dirichlet": Scenario(
        10,
        f"{SSL_BASE} partition='dirichlet' dirichlet-alpha=0.5",
        SSL_ENTRIES,
        "as `ssl`, Dirichlet 0.5",
    ),
    "paper": Scenario(
        100,
        "dataset='npz' data-path='../shared/data/cifar10_small.npz' model='vgg11bn' width=1.0 "
        "partition='iid' device-profile='low-contention' fraction-train=0.2 fraction-evaluate=0.05 num-rounds=200",
        ("smartfreeze", "allsmall", "heterofl", "depthfl", "exclusivefl", "profl", "fedavg"),
        "paper scale (SmartFreeze Sec. V, VGG11-BN row): VGG11-BN width 1, 100 clients, 20 per round, IID, "
        "low-contention memory, 200 rounds; on 2 CPU cores run it at reduced length (--rounds 20, ~10 min per "
        "entry); point --data-path at the full CIFAR-10 as .npz for the paper's data",
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


LOCATION_KEYS = ("run-name", "output-dir", "overwrite", "verbose")
"""Config keys that say where a run lives or how it talks, not what it computes."""
MISSING = object()


def parse_entry(entry: str) -> tuple[str, str]:
    """``LABEL`` or ``LABEL=OVERRIDES`` -> (label, overrides including the strategy)."""
    label, _, overrides = entry.partition("=")
    if not label:
        raise ValueError(f"entry {entry!r} has no label")
    if "strategy=" not in overrides:
        overrides = f"strategy='{label}' {overrides}".strip()
    return label, overrides


def effective_config(*parts: str) -> dict[str, Any]:
    """Run-config strings fused left to right; a repeated key takes its last value."""
    return parse_overrides([p for p in parts if p.strip()])


def config_string(config: dict[str, Any]) -> str:
    """A fused config as one ``--run-config`` string (no key twice)."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in config.items())


def run_config(scenario: Scenario, overrides: str, extra: str, seed: int, run_dir: Path) -> dict[str, Any]:
    """The effective config of one run (entry at one seed), ``run-name``/``output-dir`` from ``run_dir``."""
    config = effective_config(scenario.config, overrides, extra)
    if isinstance(config.get("data-path"), str) and config["data-path"]:
        config["data-path"] = str((ROOT / Path(config["data-path"]).expanduser()).resolve())
    config.update({"seed": seed, "run-name": run_dir.name, "output-dir": str(run_dir.parent)})
    return config


def finished(run_dir: Path, config: dict[str, Any], strict: bool = True) -> dict[str, Any] | None:
    """The run's metrics.json if it finished every round with ``config`` (else None).

    ``strict`` (what a comparison uses to skip a run): the whole resolved config must match, the
    pyproject defaults with ``config`` on top, key by key, so a run made before a default changed
    or a key was added is not taken for one of today's. Not strict (``--summarise-only``): only
    the keys the scenario, the entry and the command set must match; whoever rebuilds a table
    from older runs vouches that the code they ran is comparable. ``run-name`` and ``output-dir``
    say where a run lives, not what it computed: a finished run moved into ``run_dir`` counts.
    The code itself is never compared: after a change that moves results, run with ``--rerun``.
    """
    path = run_dir / "metrics.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    saved = doc.get("config") or {}
    want = {**app_defaults(ROOT), **config} if strict else config
    done = {r.get("round") for r in doc.get("rounds", [])}
    same = all(saved.get(k, MISSING) == v for k, v in want.items() if k not in LOCATION_KEYS)
    return doc if same and doc.get("summary") and int(saved.get("num-rounds", -1)) in done else None


def run_entry(scenario: Scenario, label: str, config: dict[str, Any], run_dir: Path, rerun: bool) -> dict[str, Any]:
    """Run one entry at one seed through run.sh (or reuse its finished run); return its metrics.json."""
    if not rerun and (doc := finished(run_dir, config)) is not None:
        print(f"[compare] {label} seed {config['seed']}: reusing the finished run in {run_dir}", flush=True)
        return doc
    cmd = [
        str(ROOT / "run.sh"),
        "run",
        "--supernodes",
        str(scenario.supernodes),
        "--run-config",
        config_string({**config, "overwrite": True}),  # what the folder holds is not a finished run of this config
    ]
    print(f"[compare] {label} seed {config['seed']}: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"entry {label!r} failed (exit {res.returncode}); log: {log}\n{res.stderr[-2000:]}")
    doc = json.loads((run_dir / "metrics.json").read_text())
    doc["wall-seconds-total"] = time.monotonic() - t0
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compare strategies on one scenario under N seeds")
    parser.add_argument("--scenario", default="baselines", choices=sorted(SCENARIOS))
    parser.add_argument("--entries", nargs="+", default=None, help="LABEL or LABEL=OVERRIDES (default: scenario's)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per entry (default 1; figures use >= 3)")
    parser.add_argument("--seed-start", type=int, default=0, help="first seed (seeds are consecutive)")
    parser.add_argument("--rounds", type=int, default=None, help="override num-rounds")
    parser.add_argument("--data-path", default=None, help="override data-path (an .npz, dataset='npz')")
    parser.add_argument("--reference", default=None, help="entry paired against and timed to (default: last)")
    parser.add_argument("--run-config", default="", help="overrides for every entry (later keys win)")
    parser.add_argument("--out", type=Path, default=None, help="default outputs/compare/<scenario>")
    parser.add_argument("--rerun", action="store_true", help="run again even where a finished run exists")
    parser.add_argument("--summarise-only", action="store_true", help="rebuild the table from existing runs")
    args = parser.parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    if args.seeds < 1 or args.seed_start < 0:
        print(f"error: --seeds {args.seeds} / --seed-start {args.seed_start}: need >= 1 / >= 0", file=sys.stderr)
        return 2
    extra = " ".join(
        p
        for p in (
            args.run_config,
            f"num-rounds={args.rounds}" if args.rounds else "",
            f"dataset='npz' data-path='{args.data_path}'" if args.data_path else "",
        )
        if p
    )
    try:
        entries = [parse_entry(e) for e in (args.entries or scenario.entries)]
        common = effective_config(scenario.config, extra)
        for _, overrides in entries:
            effective_config(overrides)
    except (ValueError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data = common.get("data-path")
    if common.get("dataset") == "npz" and not (ROOT / Path(str(data)).expanduser()).is_file():
        missing = (ROOT / Path(str(data)).expanduser()).resolve()
        print(f"error: scenario {args.scenario!r} needs data-path {missing}, which does not exist", file=sys.stderr)
        return 2
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
    seeds = list(range(args.seed_start, args.seed_start + args.seeds))
    docs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for seed in seeds:  # seed outermost: a stopped comparison has whole seeds first
        for label, overrides in entries:
            run_dir = out / "runs" / label / f"seed-{seed}"
            config = run_config(scenario, overrides, extra, seed, run_dir)
            if args.summarise_only:
                doc = finished(run_dir, config, strict=False)
                if doc is None:
                    print(
                        f"error: no finished run of {label!r} seed {seed} with this config in {run_dir}",
                        file=sys.stderr,
                    )
                    return 2
            else:
                doc = run_entry(scenario, label, config, run_dir, args.rerun)
            docs[label].append(doc)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for i, seed in enumerate(seeds):
        target = smoothed_final(docs[reference][i]["rounds"])
        for label in labels:
            runs[label].append(summarise(label, seed, docs[label][i], target))
    rows = [aggregate(label, runs[label]) for label in labels]
    head = headline(rows, runs)
    against = versus(runs, reference) if len(seeds) > 1 else {}
    effective = config_string(common)
    table = markdown(
        args.scenario, scenario.description, effective, dict(entries), rows, runs, head, reference, against
    )
    (out / "comparison.md").write_text(table)
    result = {
        "scenario": args.scenario,
        "description": scenario.description,
        "effective-config": effective,
        "entries": dict(entries),
        "seeds": seeds,
        "reference": reference,
        "rows": [_jsonable(r) for r in rows],
        "runs": runs,
        "headline": _jsonable(head),
        "versus-reference": _jsonable(against),
    }
    (out / "comparison.json").write_text(json.dumps(result, indent=2))
    plot(docs, out / "accuracy.png", scenario.description)
    print(table)
    print(f"[compare] wrote {out / 'comparison.md'}, {out / 'comparison.json'}, {out / 'accuracy.png'}")
    return 0


def _jsonable(value: Any) -> Any:
    """Spreads and paired differences (dataclasses) as dicts, recursively."""
    from dataclasses import asdict, is_dataclass

    if is_dataclass(value) and not isinstance(value, type):
        return {**asdict(value), **({"significant": value.significant} if hasattr(value, "significant") else {})}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
