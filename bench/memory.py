"""Memory of progressive training: modelled (SmartFreeze Eq. 4) vs measured, per stage and full model.

Run: ``cd /work/main && .venv/bin/python -m bench.memory [--models resnet18 vgg16bn] [--batch-size 64]
[--width 1.0] [--steps 3] [--json PATH] [--frozen-chunk N] [--zero-grad-after-forward] [--skip-overhead]``.

For each model and each training configuration (stage 1..B, i.e. 0-based stage 0..B-1 with its
output module, and full-model training) it prints, all in MB = 2**20 bytes:

* modelled: :func:`common.memory.stage_memory` (refined Eq. 4) and the paper's literal Eq. 4;
* measured: :func:`common.memory_meter.measure_training_peak` in a fresh subprocess per configuration
  (the client's ``train_local`` loop, SGD momentum 0.9, weight decay 5e-4, ``--steps`` steps on
  random data; the stage sub-model's frozen forward in micro-batches of ``--frozen-chunk``
  samples, default :data:`common.output_modules.DEFAULT_FROZEN_CHUNK`, 0 = whole batch):
  PyTorch's peak of live bytes (parameters and buffers + everything allocated in the steps) and
  the process RSS peak and growth;
* reduction of the measured torch peak vs full-model training (%), and model error
  (modelled / measured - 1, %).

It checks the project targets (ResNet18: measured reductions >= 45/65/75/65 % for stages 1-4 and a
mean >= 62 %; model within 15 % of the measured peak for every configuration) and, unless
``--skip-overhead``, times :func:`common.memory_meter.track_peak` around a short training loop.
``--zero-grad-after-forward`` measures the previous loop order, which freed the previous step's
gradients only between the forward and the backward pass (the model assumes ``train_local``'s
order, gradients freed before the forward pass, so its error column then shows the difference).
Results go to ``--json`` (default ``outputs/bench/memory.json``).

RSS grows by more than the torch peak: glibc keeps freed tensors in its heap (its mmap threshold
rises to the largest freed block), so the resident set holds the high-water mark plus
fragmentation; with ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment the RSS growth matches the
torch peak minus the parameters within a few MB (and steps run 2-4x slower).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.memory import stage_memory
from common.memory_meter import measure_training_peak, track_peak
from common.models import build_model
from common.output_modules import DEFAULT_FROZEN_CHUNK, StageModel, build_output_module
from common.sgd import SGD
from common.training import train_local

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "outputs" / "bench" / "memory.json"
RESNET18_TARGETS = (45.0, 65.0, 75.0, 65.0)
"""Minimum measured reduction (%) vs full training of ResNet18 stages 1-4."""
RESNET18_MEAN_TARGET = 62.0
MODEL_ERROR_TARGET = 15.0


def train_zero_grad_after_forward(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    seed: int,
) -> None:
    """``train_local``'s loop with ``zero_grad(set_to_none=True)`` after the forward pass (what-if:
    the previous step's gradients stay alive during the forward)."""
    opt = SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx], reduction="none").mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def training_module(name: str, width: float, stage: int | None, frozen_chunk: int = DEFAULT_FROZEN_CHUNK) -> nn.Module:
    """The module a client trains: the full model (``stage=None``) or the stage sub-model."""
    model = build_model(name, width=width, seed=0)
    if stage is None:
        return model
    last = model.num_blocks - 1
    outmod = None if stage == last else build_output_module(model, stage)
    return StageModel(model, stage, outmod, frozen_chunk=frozen_chunk)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration (runs in its own process); returns measure_training_peak's dict."""
    if spec.get("overhead"):
        return overhead()
    warm_up()
    module = training_module(spec["model"], spec["width"], spec["stage"], spec["frozen_chunk"])
    train_fn = train_zero_grad_after_forward if spec["zero_grad_after_forward"] else train_local
    return measure_training_peak(module, spec["batch_size"], steps=spec["steps"], train_fn=train_fn)


def warm_up() -> None:
    """One training step of a tiny model, so that the RSS growth measured next excludes the process's
    one-time library initialisation (oneDNN, OpenMP threads), as in a client that trains every round."""
    gen = torch.Generator().manual_seed(1)
    tiny = build_model("smallcnn", width=0.25, seed=1)
    train_local(tiny, torch.randn(4, 3, 32, 32, generator=gen), torch.arange(4), epochs=1, batch_size=4, lr=0.01)


def overhead(reps: int = 5, steps: int = 30) -> dict[str, Any]:
    """Time (s, best of ``reps``, wall and process CPU) of a short loop plain and inside ``track_peak``.

    ResNet10 width 0.25, batch 32, one intra-op thread (a client's default), so that other load on
    the machine disturbs the comparison as little as possible.
    """
    torch.set_num_threads(1)
    model = build_model("resnet10", width=0.25, seed=0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(steps * 32, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (steps * 32,), generator=gen)
    kwargs = {"epochs": 1, "batch_size": 32, "lr": 0.01}
    train_local(model, x[:64], y[:64], **kwargs)
    labels = ("plain", "track_peak(max_steps=3)", "track_peak(max_steps=None)")
    wall: dict[str, list[float]] = {k: [] for k in labels}
    cpu: dict[str, list[float]] = {k: [] for k in labels}
    with track_peak(model):
        train_local(model, x[:64], y[:64], **kwargs)
    for _ in range(reps):
        for label in labels:
            model.zero_grad(set_to_none=True)
            start, start_cpu = time.perf_counter(), time.process_time()
            if label == "plain":
                train_local(model, x, y, **kwargs)
            else:
                with track_peak(model, max_steps=3 if "=3" in label else None):
                    train_local(model, x, y, **kwargs)
            wall[label].append(time.perf_counter() - start)
            cpu[label].append(time.process_time() - start_cpu)
    best = {k: min(v) for k, v in wall.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    return {
        "loop": f"train_local resnet10 width 0.25, batch 32, {steps} steps, 1 thread",
        "seconds": best,
        "cpu_seconds": best_cpu,
        "overhead_pct": {k: 100 * (v / best["plain"] - 1) for k, v in best.items() if k != "plain"},
        "cpu_overhead_pct": {k: 100 * (v / best_cpu["plain"] - 1) for k, v in best_cpu.items() if k != "plain"},
    }


def environment() -> dict[str, Any]:
    """Versions and machine facts saved with every memory benchmark's JSON."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter so no earlier model pollutes the measurement."""
    return run_module_worker("bench.memory", spec)


def run_module_worker(module: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``python -m <module> --worker <spec as JSON>`` in a fresh interpreter; its last stdout line as JSON.

    Shared by the memory benchmarks, whose workers measure one configuration each in a clean process.
    """
    env = dict(os.environ, KINETO_LOG_LEVEL="5", TORCH_CPP_LOG_LEVEL="ERROR")
    proc = subprocess.run(
        [sys.executable, "-m", module, "--worker", json.dumps(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows (one per stage and one for full training) of model ``name``."""
    model = build_model(name, width=args.width, seed=0)
    stages: list[int | None] = [*range(model.num_blocks), None]
    rows = []
    for stage in stages:
        start = time.perf_counter()
        modelled = stage_memory(model, stage, args.batch_size, frozen_chunk=args.frozen_chunk)
        model_seconds = time.perf_counter() - start
        spec = {
            "model": name,
            "width": args.width,
            "stage": stage,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "frozen_chunk": args.frozen_chunk,
            "zero_grad_after_forward": args.zero_grad_after_forward,
        }
        measured = run_worker(spec)
        rows.append(
            {
                "model": name,
                "config": "full" if stage is None else f"stage {stage + 1}",
                "stage": stage,
                "modelled_mb": modelled.total,
                "eq4_literal_mb": modelled.eq4_total,
                "breakdown_mb": modelled.as_dict(),
                "model_seconds": model_seconds,
                **measured,
            }
        )
        print(f"  measured {name} {rows[-1]['config']}: {measured['torch_peak_mb']:.1f} MB", flush=True)
    full = rows[-1]["torch_peak_mb"]
    for row in rows:
        row["reduction_pct"] = 100 * (1 - row["torch_peak_mb"] / full)
        row["rss_reduction_pct"] = 100 * (1 - row["rss_delta_mb"] / rows[-1]["rss_delta_mb"])
        row["model_error_pct"] = 100 * (row["modelled_mb"] / row["torch_peak_mb"] - 1)
        row["eq4_error_pct"] = 100 * (row["eq4_literal_mb"] / row["torch_peak_mb"] - 1)
    return rows


def check_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Project targets: ResNet18 reductions per stage and mean; model error on every row."""
    result: dict[str, Any] = {
        "model_error_max_pct": max(abs(r["model_error_pct"]) for r in rows),
        "model_within_15pct": all(abs(r["model_error_pct"]) <= MODEL_ERROR_TARGET for r in rows),
    }
    stages = [r for r in rows if r["model"] == "resnet18" and r["stage"] is not None]
    if stages:
        reductions = [r["reduction_pct"] for r in stages]
        result["resnet18_reductions_pct"] = reductions
        result["resnet18_stage_targets_pct"] = list(RESNET18_TARGETS)
        result["resnet18_stage_met"] = [red >= t for red, t in zip(reductions, RESNET18_TARGETS, strict=True)]
        result["resnet18_mean_reduction_pct"] = sum(reductions) / len(reductions)
        result["resnet18_mean_met"] = result["resnet18_mean_reduction_pct"] >= RESNET18_MEAN_TARGET
    return result


def print_table(rows: list[dict[str, Any]]) -> None:
    """The results table (MB = 2**20 bytes)."""
    head = (
        f"{'model':9s} {'config':8s} {'modelled':>9s} {'Eq.4 lit':>9s} {'measured':>9s} {'RSS peak':>9s} "
        f"{'RSS grow':>9s} {'reduction':>9s} {'model err':>9s} {'Eq.4 err':>9s}"
    )
    print(head)
    print(f"{'':9s} {'':8s} {'MB':>9s} {'MB':>9s} {'torch MB':>9s} {'MB':>9s} {'MB':>9s} {'%':>9s} {'%':>9s} {'%':>9s}")
    for r in rows:
        print(
            f"{r['model']:9s} {r['config']:8s} {r['modelled_mb']:9.1f} {r['eq4_literal_mb']:9.1f} "
            f"{r['torch_peak_mb']:9.1f} {r['rss_peak_mb']:9.1f} {r['rss_delta_mb']:9.1f} {r['reduction_pct']:9.1f} "
            f"{r['model_error_pct']:+9.1f} {r['eq4_error_pct']:+9.1f}"
        )


def print_targets(targets: dict[str, Any], args: argparse.Namespace) -> None:
    """Whether the targets are met."""
    verdict = "met" if targets["model_within_15pct"] else "MISSED"
    print(f"model within 15 % of measured on every row: {verdict} (max |error| {targets['model_error_max_pct']:.1f} %)")
    if "resnet18_reductions_pct" in targets:
        if args.width != 1.0 or args.batch_size != 64:
            print("note: the ResNet18 targets are defined for width 1.0, batch 64")
        for i, (red, tgt, ok) in enumerate(
            zip(
                targets["resnet18_reductions_pct"],
                targets["resnet18_stage_targets_pct"],
                targets["resnet18_stage_met"],
                strict=True,
            )
        ):
            print(f"resnet18 stage {i + 1}: reduction {red:.1f} % (target >= {tgt:.0f} %): {'met' if ok else 'MISSED'}")
        mean = targets["resnet18_mean_reduction_pct"]
        ok = "met" if targets["resnet18_mean_met"] else "MISSED"
        print(f"resnet18 mean reduction {mean:.1f} % (target >= {RESNET18_MEAN_TARGET:.0f} %): {ok}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "vgg16bn"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=3, help="training steps measured per configuration")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument(
        "--frozen-chunk",
        type=int,
        default=DEFAULT_FROZEN_CHUNK,
        help="samples per micro-batch of the stages' frozen forward (0 = whole batch)",
    )
    parser.add_argument(
        "--zero-grad-after-forward",
        action="store_true",
        help="measure the previous loop order (gradients freed after the forward pass)",
    )
    parser.add_argument("--skip-overhead", action="store_true", help="do not time track_peak's overhead")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in args.models:
        print(
            f"{name}: width {args.width}, batch {args.batch_size}, 3x32x32, {args.steps} steps, "
            f"frozen chunk {args.frozen_chunk}",
            flush=True,
        )
        rows += bench_model(name, args)
    print()
    print_table(rows)
    targets = check_targets(rows)
    print()
    print_targets(targets, args)
    result: dict[str, Any] = {
        "config": {
            "models": args.models,
            "batch_size": args.batch_size,
            "width": args.width,
            "input_shape": [3, 32, 32],
            "steps": args.steps,
            "loop": "zero_grad after forward" if args.zero_grad_after_forward else "common.training.train_local",
            "frozen_chunk": args.frozen_chunk,
            "optimizer": "SGD momentum 0.9, weight decay 5e-4",
            "units": "MB = 2**20 bytes",
        },
        "environment": environment(),
        "rows": rows,
        "targets": targets,
    }
    if not args.skip_overhead:
        result["track_peak_overhead"] = run_worker({"overhead": True})
        print()
        ov = result["track_peak_overhead"]
        print(f"track_peak overhead on {ov['loop']}:")
        for label, pct in ov["overhead_pct"].items():
            print(
                f"  {label}: wall {ov['seconds'][label]:.2f} s vs {ov['seconds']['plain']:.2f} s plain ({pct:+.1f} %), "
                f"CPU {ov['cpu_seconds'][label]:.2f} s vs {ov['cpu_seconds']['plain']:.2f} s "
                f"({ov['cpu_overhead_pct'][label]:+.1f} %)"
            )
    result["seconds"] = time.perf_counter() - start
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nsaved {args.json} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
