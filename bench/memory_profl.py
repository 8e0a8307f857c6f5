"""ProFL's training memory per step (shrinking and growing) vs full-model training: modelled and measured.

Run: ``./run.sh bench memory_profl [--models resnet18 resnet18-fine vgg16bn] [--batch-size 64] [--width 1.0]
[--steps 3] [--json PATH]``.

For each model, every ProFL step (shrinking S_B .. S_1: basic layers + real block k, all
trained, :class:`common.profl.ShrinkModel`; growing G_1 .. G_B: frozen prefix + block k + output
module k, :class:`common.output_modules.StageModel`) and full-model training, it reports in MB =
2**20 bytes:

* modelled: :func:`common.profl.shrink_memory` (shrinking) or :func:`common.memory.stage_memory`
  (growing, full);
* measured: :func:`common.memory_meter.measure_training_peak` (the client's ``train_local`` loop, SGD
  momentum 0.9, weight decay 5e-4, ``--steps`` steps on random data) in a fresh subprocess per
  configuration, as ``bench/memory.py`` does: PyTorch's peak of live bytes, and the process RSS
  peak;
* reduction of the measured peak vs full training (%), and the model error (%).

ProFL's peak is the largest measured step; the target (issue 6) is a peak at least 50 % below
full training on ResNet18 (width 1, batch 64, 3x32x32), checked for ``resnet18`` (4 blocks, its
residual stages) and ``resnet18-fine`` (the same network in 8 blocks, one per BasicBlock). Results: ``--json`` (default
``outputs/bench/memory_profl.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from torch import nn

from bench.memory import environment, run_module_worker, training_module, warm_up
from common.memory import stage_memory
from common.memory_meter import measure_training_peak
from common.models import build_model
from common.profl import ProFLSchedule, ShrinkModel, build_basic_layers, shrink_memory

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "outputs" / "bench" / "memory_profl.json"
PEAK_TARGET_PCT = 50.0
"""Minimum reduction (%) of ProFL's peak (largest step) vs full training, ResNet18."""
TARGET_MODELS: tuple[str, ...] = ("resnet18", "resnet18-fine")
"""Models the target applies to: ResNet18 in its 4 residual stages and, the same network, in 8 BasicBlocks."""


def step_module(name: str, width: float, phase: str | None, block: int) -> nn.Module:
    """What a client trains in a step: ``phase`` 'shrinking' / 'growing', or None for the full model."""
    if phase == "shrinking":
        model = build_model(name, width=width, seed=0)
        return ShrinkModel(model, block, build_basic_layers(model, seed=1))
    return training_module(name, width, block if phase == "growing" else None)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration (in its own process); measure_training_peak's dict."""
    warm_up()
    module = step_module(spec["model"], spec["width"], spec["phase"], spec["block"])
    return measure_training_peak(module, spec["batch_size"], steps=spec["steps"])


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter, so no earlier model pollutes the measurement."""
    return run_module_worker("bench.memory_profl", spec)


def modelled_mb(name: str, width: float, phase: str | None, block: int, batch_size: int) -> float:
    """Modelled memory (MB) of one configuration."""
    if phase == "shrinking":
        return shrink_memory(name, 10, width, block, batch_size, (3, 32, 32)).total
    model = build_model(name, width=width, seed=0)
    return stage_memory(model, block if phase == "growing" else None, batch_size).total


def bench_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows of model ``name``: every ProFL step in schedule order, then full training."""
    schedule = ProFLSchedule(build_model(name, width=0.0625).num_blocks)
    configs: list[tuple[str, str | None, int]] = [(s.label, s.phase, s.block) for s in schedule.steps()]
    configs.append(("full", None, -1))
    rows = []
    for label, phase, block in configs:
        spec = {
            "model": name,
            "width": args.width,
            "phase": phase,
            "block": block,
            "batch_size": args.batch_size,
            "steps": args.steps,
        }
        measured = run_worker(spec)
        rows.append(
            {
                "model": name,
                "config": label,
                "phase": phase or "full",
                "block": None if phase is None else block + 1,
                "modelled_mb": modelled_mb(name, args.width, phase, block, args.batch_size),
                **measured,
            }
        )
        print(f"  {name} {label}: measured {measured['torch_peak_mb']:.1f} MB", flush=True)
    full = rows[-1]["torch_peak_mb"]
    for row in rows:
        row["reduction_pct"] = 100 * (1 - row["torch_peak_mb"] / full)
        row["model_error_pct"] = 100 * (row["modelled_mb"] / row["torch_peak_mb"] - 1)
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model: ProFL's peak (largest step), its reduction, the mean step reduction, the target check."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        steps = [r for r in mine if r["phase"] != "full"]
        full = next(r for r in mine if r["phase"] == "full")
        peak = max(steps, key=lambda r: r["torch_peak_mb"])
        reduction = 100 * (1 - peak["torch_peak_mb"] / full["torch_peak_mb"])
        out[name] = {
            "full_mb": full["torch_peak_mb"],
            "profl_peak_mb": peak["torch_peak_mb"],
            "profl_peak_step": peak["config"],
            "profl_peak_reduction_pct": reduction,
            "mean_step_reduction_pct": sum(r["reduction_pct"] for r in steps) / len(steps),
            "model_error_max_pct": max(abs(r["model_error_pct"]) for r in mine),
            "target_pct": PEAK_TARGET_PCT if name in TARGET_MODELS else None,
            "target_met": reduction >= PEAK_TARGET_PCT if name in TARGET_MODELS else None,
        }
    return out


def print_table(rows: list[dict[str, Any]], summary: dict[str, dict[str, Any]]) -> None:
    """Results table and per-model summary (MB = 2**20 bytes)."""
    print(
        f"{'model':13s} {'step':5s} {'modelled MB':>12s} {'measured MB':>12s} {'RSS peak MB':>12s} {'reduction %':>12s}"
    )
    for r in rows:
        print(
            f"{r['model']:13s} {r['config']:5s} {r['modelled_mb']:12.1f} {r['torch_peak_mb']:12.1f} "
            f"{r['rss_peak_mb']:12.1f} {r['reduction_pct']:12.1f}"
        )
    for name, s in summary.items():
        verdict = "" if s["target_met"] is None else f" (target >= {s['target_pct']:.0f} %: "
        verdict += "" if s["target_met"] is None else ("met)" if s["target_met"] else "MISSED)")
        print(
            f"{name}: ProFL peak {s['profl_peak_mb']:.1f} MB at {s['profl_peak_step']} vs full {s['full_mb']:.1f} MB: "
            f"{s['profl_peak_reduction_pct']:.1f} % below{verdict}; mean step reduction "
            f"{s['mean_step_reduction_pct']:.1f} %; model error max {s['model_error_max_pct']:.1f} %"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "vgg16bn"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=3, help="training steps measured per configuration")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in args.models:
        print(f"{name}: width {args.width}, batch {args.batch_size}, 3x32x32, {args.steps} steps", flush=True)
        rows += bench_model(name, args)
    summary = summarise(rows)
    print()
    print_table(rows, summary)
    result = {
        "config": {
            "models": args.models,
            "batch_size": args.batch_size,
            "width": args.width,
            "input_shape": [3, 32, 32],
            "steps": args.steps,
            "loop": "common.training.train_local",
            "optimizer": "SGD momentum 0.9, weight decay 5e-4",
            "units": "MB = 2**20 bytes",
        },
        "environment": environment(),
        "rows": rows,
        "summary": summary,
        "seconds": time.perf_counter() - start,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nsaved {args.json} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
