"""Memory of FedLL's layer-wise training vs full-model training: modelled and measured, per layer.

Run: ``./run.sh bench memory_fedll [--model vit] [--width 1.0] [--batch-size 64] [--steps 3]
[--dropout 0.0 0.5] [--json PATH]``.

For every FedLL stage (layer 1..L trained with its head, earlier layers frozen) and every depth-dropout
probability in ``--dropout``, and for full-model training, it prints in MB = 2**20 bytes:

* modelled: :func:`common.fedll.required_mb` (stage) / :func:`common.memory.stage_memory` (full),
  the replay of one SGD step on meta tensors (no dropout: an upper bound);
* measured: :func:`common.memory_meter.measure_training_peak` in a fresh subprocess per configuration:
  PyTorch's peak of live bytes during ``--steps`` steps of the client's own ``train_local`` loop
  (SGD momentum 0.9, weight decay 5e-4) on random 3x32x32 data, parameters and buffers included,
  and the process RSS peak; with dropout the depth-dropout generator is seeded (0) and the
  measured skipped share of the frozen forward FLOPs is reported;
* the ratio full-model peak / stage peak (measured) and the model error (modelled / measured - 1).

Target (issue 6): FedLL's peak training memory on the ViT at least 5x below full-model training,
i.e. the worst stage's ratio >= 5. Results go to ``--json`` (default ``outputs/bench/memory_fedll.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.memory import run_module_worker
from common.fedll import FedLLModel, build_layer_heads, num_layers, required_mb
from common.memory import stage_memory
from common.memory_meter import measure_training_peak
from common.models import build_model
from common.training import train_local

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "outputs" / "bench" / "memory_fedll.json"
RATIO_TARGET = 5.0
"""Minimum full-model / FedLL-stage ratio of the measured peak (FedLL's headline figure)."""


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this process: stage ``layer`` (None = full model) at ``dropout``."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    tiny = build_model("smallcnn", width=0.25, seed=1)  # one-time library initialisation outside the measurement
    train_local(tiny, torch.randn(4, 3, 32, 32, generator=gen), torch.arange(4), epochs=1, batch_size=4, lr=0.01)
    model = build_model(spec["model"], 10, spec["width"], seed=0)
    layer = spec["layer"]
    if layer is None:
        module: torch.nn.Module = model
    else:
        heads = build_layer_heads(model, seed=1)
        head = heads[str(layer)] if layer < len(heads) else None
        module = FedLLModel(model, layer, head, dropout=spec["dropout"], seed=0)
    result = measure_training_peak(module, spec["batch_size"], steps=spec["steps"])
    if isinstance(module, FedLLModel):
        result["skipped_share"] = module.skipped_share
    return result


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter so that no earlier model pollutes the measurement."""
    return run_module_worker("bench.memory_fedll", spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="FedLL per-layer training memory vs full-model training")
    parser.add_argument("--model", default="vit")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    for p in args.dropout:
        if not 0 <= p < 1:
            parser.error(f"--dropout {p} is not a probability in [0, 1)")
    t0 = time.time()
    base = {"model": args.model, "width": args.width, "batch_size": args.batch_size, "steps": args.steps}
    full_modelled = stage_memory(build_model(args.model, 10, args.width), None, args.batch_size).total
    full = run_worker({**base, "layer": None, "dropout": 0.0})
    rows: list[dict[str, Any]] = [
        {"config": "full", "layer": None, "dropout": None, "modelled_mb": full_modelled, **full, "ratio": 1.0}
    ]
    for p in args.dropout:
        for layer in range(num_layers(args.model)):
            modelled = required_mb(args.model, 10, args.width, layer, args.batch_size)
            measured = run_worker({**base, "layer": layer, "dropout": p})
            rows.append(
                {
                    "config": f"layer {layer + 1}",
                    "layer": layer,
                    "dropout": p,
                    "modelled_mb": modelled,
                    **measured,
                    "ratio": full["torch_peak_mb"] / measured["torch_peak_mb"],
                }
            )
    print(f"{args.model} width {args.width}, batch {args.batch_size}, {args.steps} steps; MB = 2**20 bytes")
    print(
        f"{'config':<9} {'p':>4} {'modelled':>9} {'measured':>9} {'RSS peak':>9} {'full/this':>9} "
        f"{'error':>7} {'skipped':>8}"
    )
    for r in rows:
        err = 100 * (r["modelled_mb"] / r["torch_peak_mb"] - 1)
        skipped = f"{100 * r['skipped_share']:.1f}%" if "skipped_share" in r else "—"
        p = "—" if r["dropout"] is None else f"{r['dropout']:.1f}"
        print(
            f"{r['config']:<9} {p:>4} {r['modelled_mb']:9.1f} {r['torch_peak_mb']:9.1f} {r['rss_peak_mb']:9.1f} "
            f"{r['ratio']:8.2f}x {err:+6.1f}% {skipped:>8}"
        )
    stages = [r for r in rows if r["layer"] is not None]
    worst = min(r["ratio"] for r in stages)
    max_err = max(abs(r["modelled_mb"] / r["torch_peak_mb"] - 1) for r in rows)
    met = worst >= RATIO_TARGET
    print(
        f"\nworst stage: {worst:.2f}x below full-model training (target >= {RATIO_TARGET:.0f}x): "
        f"{'met' if met else 'NOT met'}; largest model error {100 * max_err:.1f} % (target 15 %)"
    )
    result = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "rows": rows,
        "worst_ratio": worst,
        "ratio_target": RATIO_TARGET,
        "target_met": met,
        "max_model_error": max_err,
        "seconds": time.time() - t0,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"saved {args.json} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
