"""Cost of SmartFreeze participant selection for 1,000 clients: similarity (Eq. 8), RL-CD, one selection.

Run: ``cd /work/main && .venv/bin/python -m bench.selector_cost``. Prints a table and writes
``outputs/bench/selector_cost.json``. Target: similarity + RL-CD + one selection (k=10) under 2 s.

Clients: 50 planted groups of 20 in 25 pairs; group g has dominant label g // 2 (0.6) and its own
secondary label 50 + g (0.3) of 100 classes. Each client draws 100 labels from its group's mix; its
output-layer (bias) gradient is p - mean(onehot(y)) with p the global label mix, plus Gaussian noise
(100-dim). ``shared`` data add a common direction to every gradient (mostly positive cosines, as
with the weight part of a real output layer), so that ``clip`` gives a dense graph too. Every
configuration is timed ``REPEATS`` times; the table shows the median.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from common.community import RLCDConfig, rl_cd, similarity_graph, similarity_matrix, similarity_weights
from common.selector import ParticipantSelector, SelectorConfig

CLIENTS = 1000
GROUPS = 50
CLASSES = 100
SAMPLES = 100
K = 10
REPEATS = 3
TARGET_S = 2.0
OUT = Path(__file__).resolve().parents[1] / "outputs" / "bench" / "selector_cost.json"
CONFIGS: list[tuple[str, str, int | None]] = [
    ("bias", "clip", 50),
    ("bias", "clip", None),
    ("bias", "shift", 50),
    ("bias", "shift", None),
    ("shared", "clip", 50),
    ("shared", "clip", None),
]


def planted_gradients(seed: int = 0, noise: float = 0.002, shared: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(CLIENTS, CLASSES) output-layer bias gradients from the planted groups, and each client's group.

    ``shared`` adds that multiple of a common random direction (unit norm) to every gradient, as the
    weight part of a real output layer does: cosines become mostly positive and the ``clip`` graph dense.
    """
    rng = np.random.default_rng(seed)
    groups = np.arange(CLIENTS) % GROUPS
    base = np.full((GROUPS, CLASSES), 0.1 / (CLASSES - 2))
    for g in range(GROUPS):
        base[g, g // 2] = 0.6
        base[g, GROUPS + g] = 0.3
    base /= base.sum(axis=1, keepdims=True)
    mixes = np.stack([rng.multinomial(SAMPLES, base[g]) for g in groups]) / SAMPLES
    grads = mixes.mean(axis=0) - mixes + noise * rng.normal(size=mixes.shape)
    common = rng.normal(size=CLASSES)
    return grads + shared * common / np.linalg.norm(common), groups


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (1 = identical partitions)."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) / 2).sum())

    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), len(ai) * (len(ai) - 1) / 2
    expected = rows * cols / total
    return (index - expected) / ((rows + cols) / 2 - expected)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result, median wall seconds over REPEATS calls)."""
    seconds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return result, float(np.median(seconds))


def loaded_selector(communities: list[list[int]], seed: int = 0) -> ParticipantSelector:
    """A selector knowing every client (random importance in sample-nats, completion time in s) and the communities."""
    rng = np.random.default_rng(seed)
    selector = ParticipantSelector(SelectorConfig(seed=seed))
    selector.set_communities(communities)
    for c in range(CLIENTS):
        selector.update_client(c, importance=float(rng.uniform(1, 100)), completion_time=float(rng.uniform(1, 60)))
    return selector


def run() -> dict[str, Any]:
    """Time every configuration; returns the JSON record."""
    data = {"bias": planted_gradients(), "shared": planted_gradients(shared=0.5)}
    rows = []
    for name, weight_map, top_k in CONFIGS:
        grads, groups = data[name]
        sim, sim_s = timed(lambda grads=grads: similarity_matrix(grads))
        cfg = RLCDConfig(weight_map=weight_map, top_k=top_k)
        result, cd_s = timed(lambda sim=sim, cfg=cfg: rl_cd(sim, cfg))
        edges = similarity_graph(similarity_weights(sim, weight_map), list(range(CLIENTS)), top_k).number_of_edges()
        selectors = iter([loaded_selector(result.communities) for _ in range(REPEATS)])
        chosen, select_s = timed(lambda selectors=selectors: next(selectors).select(1, range(CLIENTS), K))
        first = np.zeros(CLIENTS, dtype=np.int64)
        for c, members in enumerate(result.first_level):
            first[members] = c
        total = sim_s + cd_s + select_s
        rows.append(
            {
                "data": name,
                "weight_map": weight_map,
                "top_k": top_k,
                "first_graph_edges": edges,
                "similarity_s": sim_s,
                "rl_cd_s": cd_s,
                "select_s": select_s,
                "total_s": total,
                "under_target": total < TARGET_S,
                "first_level_communities": len(result.first_level),
                "communities": len(result.communities),
                "splits": len(result.splits),
                "ari_single_louvain": adjusted_rand_index(groups, first),
                "ari_rl_cd": adjusted_rand_index(groups, result.labels(CLIENTS)),
                "selected": len(chosen),
            }
        )
    return {
        "clients": CLIENTS,
        "gradient_dim": CLASSES,
        "planted_groups": GROUPS,
        "k": K,
        "repeats": REPEATS,
        "target_s": TARGET_S,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "networkx": nx.__version__,
            "load_average_1min": os.getloadavg()[0],
        },
        "rows": rows,
    }


def main() -> None:
    """Run the benchmark, print the table, write the JSON."""
    record = run()
    print(f"{CLIENTS} clients, {CLASSES}-dim gradients, {GROUPS} planted groups, k={K}, median of {REPEATS} runs")
    header = (
        f"{'data':>6} {'weights':>7} {'top_k':>5} {'edges':>6} {'sim s':>6} {'RL-CD s':>7} {'select s':>8} "
        f"{'total s':>7} {'<2s':>4} {'1st':>4} {'final':>5} {'ARI 1st':>7} {'ARI RL-CD':>9}"
    )
    print(header)
    for r in record["rows"]:
        print(
            f"{r['data']:>6} {r['weight_map']:>7} {r['top_k'] or 'all':>5} {r['first_graph_edges']:6d} "
            f"{r['similarity_s']:6.3f} {r['rl_cd_s']:7.3f} "
            f"{r['select_s']:8.3f} {r['total_s']:7.3f} {'yes' if r['under_target'] else 'no':>4} "
            f"{r['first_level_communities']:4d} {r['communities']:5d} {r['ari_single_louvain']:7.3f} "
            f"{r['ari_rl_cd']:9.3f}"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record, indent=2) + "\n")
    print(f"load average (1 min) {record['machine']['load_average_1min']:.2f} on {record['machine']['cpus']} CPUs")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
