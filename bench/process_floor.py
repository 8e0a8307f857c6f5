"""What one more Python process with torch costs in summed PSS: the floor under the simulation's memory.

Run: ``./run.sh bench process_floor [--max-procs 3] [--json PATH]`` (``.venv/bin/python -m bench.process_floor``).

The overhead benchmark (``bench/overhead.py``) compares the summed PSS of every process of a simulation
(ServerApp with the Ray driver, ClientApp actors, Ray's and Flower's own processes) with one plain-loop
process. This one measures, with nothing trained, what each *kind* of process holds after its imports:

* ``torch``: ``import torch`` (the project's pinned build);
* ``client``: ``import torch, ray, flwr`` and the ClientApp module (what a ClientApp actor holds
  before it touches data);
* ``client+train``: the same plus one ``train_local`` step of ResNet10 width 0.25 (the training path:
  :class:`common.sgd.SGD`, no ``torch._dynamo``);
* ``server+memory-model``: ``import torch, ray, flwr``, the ServerApp module and one
  :func:`common.memory.stage_memory` replay (what the ServerApp's process holds before its first
  round; the meta-tensor replay of BatchNorm goes through ``torch._refs`` wrappers that import
  ``torch._dynamo``).

For each kind it starts 1 .. ``--max-procs`` such processes at once, waits until all are ready, and sums
their PSS (shared pages split between the processes that map them), RSS and USS; the increment per
extra process is the memory a simulation pays for every process of that kind beyond the first, which
no sharing of library pages removes (anonymous memory: the heap and library data of torch's CUDA
build, Python objects of every imported module).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "outputs" / "bench" / "process_floor.json"
MB = 2**20

KINDS: dict[str, str] = {
    "torch": "import torch",
    "client": "import torch, ray, flwr\nimport client_app.app",
    "client+train": (
        "import torch, ray, flwr\nimport client_app.app\n"
        "from common.models import build_model\nfrom common.training import train_local\n"
        "m = build_model('resnet10', 10, 0.25, seed=0)\n"
        "train_local(m, torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)), epochs=1, batch_size=32, lr=0.05)"
    ),
    "server+memory-model": (
        "import torch, ray, flwr\nimport server_app.app\n"
        "from common.memory import stage_memory\nfrom common.models import build_model\n"
        "stage_memory(build_model('resnet10', 10, 0.25, seed=0), None, 32)"
    ),
}
"""Kind of process -> the code it runs before it reports ready."""


def _child(code: str) -> subprocess.Popen[str]:
    script = f"{code}\nimport sys, torch\ntorch.set_num_threads(1)\nprint('ready', flush=True)\nsys.stdin.read()\n"
    return subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def measure(kind: str, n: int) -> dict[str, Any]:
    """Start ``n`` processes of ``kind`` at once; summed PSS/RSS/USS (MB) once all are ready."""
    procs = [_child(KINDS[kind]) for _ in range(n)]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"{kind}: a child exited before it was ready (exit code {p.wait()})")
        time.sleep(0.5)
        infos = [psutil.Process(p.pid).memory_full_info() for p in procs]
        return {
            "processes": n,
            "pss-mb": sum(i.pss for i in infos) / MB,
            "rss-mb": sum(i.rss for i in infos) / MB,
            "uss-mb": sum(i.uss for i in infos) / MB,
        }
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in procs:
            p.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    """Measure every kind for 1 .. --max-procs processes, print the table, save the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-procs", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if args.max_procs < 1:
        print(f"error: --max-procs must be >= 1, got {args.max_procs}", file=sys.stderr)
        return 2
    results: dict[str, list[dict[str, Any]]] = {}
    print(f"{'kind':22}{'procs':>6}{'sum PSS MB':>12}{'sum RSS MB':>12}{'sum USS MB':>12}{'+PSS/proc':>11}")
    for kind in args.kinds:
        rows = [measure(kind, n) for n in range(1, args.max_procs + 1)]
        results[kind] = rows
        for row in rows:
            extra = (
                (row["pss-mb"] - rows[0]["pss-mb"]) / (row["processes"] - 1) if row["processes"] > 1 else float("nan")
            )
            row["extra-pss-per-process-mb"] = extra
            print(
                f"{kind:22}{row['processes']:>6}{row['pss-mb']:>12.0f}{row['rss-mb']:>12.0f}{row['uss-mb']:>12.0f}"
                f"{'' if row['processes'] == 1 else f'{extra:.0f}':>11}"
            )
    # not bench.memory.environment(): it imports torch here, and the parent's torch pages would then
    # be shared with (and lower) the children's PSS
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    doc = {
        "benchmark": "process_floor",
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), ""),
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1))
    print(f"[process_floor] wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
