"""Where the simulation's per-round overhead goes: the app's own work per message, measured in one process.

Run: ``./run.sh bench overhead_parts [--reps 5] [--clients 10] [--json PATH]``
(``.venv/bin/python -m bench.overhead_parts``). Companion of ``bench/overhead.py``: that benchmark
measures the whole simulation against a plain loop; this one times, without Flower's runtime or Ray,
the pieces a simulated round adds to the plain loop's work, on the default workload's data and model
(``../shared/data/cifar10_small.npz``, 20 partitions, ResNet10 width 0.25, batch 32, one torch thread
as a client):

* **client, per train message**: the ClientApp's real ``train`` handler (``client_app.handlers.train``) on a
  real ``Message``/``Context``, against ``train_local`` alone (the plain loop's work); the difference is
  config parsing, the device budget (``_device``: memory model), ``track_peak`` (profiler for three
  steps, RSS high-water mark), ``from_record``/``to_record`` and ``state_to_numpy``. Timed also with
  ``track_peak`` replaced by a no-op (in this process only), to isolate it.
* **client, per evaluate message**: the ``evaluate`` handler against ``evaluate`` alone.
* **transport**: pickling (protocol 5, as Ray ships a task's arguments and result) of a train
  message with its ``Context`` and of its reply, and unpickling both.
* **server, per round**: ``FedAvgStrategy.configure_train`` + ``aggregate_train`` (reply checks,
  update norms, ``weighted_average``, ``to_record`` of the result) + ``configure_evaluate`` +
  ``aggregate_evaluate`` + ``RunRecorder.add_round`` for ``--clients`` replies, against the plain
  loop's ``weighted_average`` alone.
* **cold start** (in a fresh process): importing torch, Flower and the apps, the first ``query`` a
  ClientApp answers (dataset, partitions, memory model) and the next one, building the strategy and the
  initial server evaluation: what every actor and the ServerApp pay before round 1.
* **Flower's polling**: the pull interval of ``InMemoryGrid`` and the Simulation Engine's wait
  between scans of the LinkState for new messages (read from flwr), which every ``send_and_receive``
  waits for on average half of each (two per round: train and evaluate).

Every figure is the smallest process CPU time of ``--reps`` repetitions (seconds; CPU time, not wall, so that
other load on the machine disturbs it little); the client variants run interleaved and also report wall
times and medians. Results go to ``--json`` (default
``outputs/bench/overhead_parts.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "outputs" / "bench" / "overhead_parts.json"
DATA = str((ROOT / "../shared/data/cifar10_small.npz").resolve())


def best(fn: Callable[[], Any], reps: int) -> float:
    """Smallest process CPU time (s) of ``reps`` calls of ``fn`` (CPU time: robust on a busy machine)."""
    times = []
    for _ in range(reps):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def interleaved(variants: dict[str, Callable[[], Any]], reps: int) -> dict[str, dict[str, float]]:
    """Run the variants in turn ``reps`` times; smallest and median wall and CPU time (s) of each."""
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        k: {
            "cpu-min": min(cpu[k]),
            "cpu-median": float(np.median(cpu[k])),
            "wall-min": min(wall[k]),
            "wall-median": float(np.median(wall[k])),
        }
        for k in variants
    }


@contextlib.contextmanager
def no_track_peak() -> Iterator[None]:
    """Replace the ClientApp's ``track_peak`` with a no-op meter for the duration of the block."""
    import client_app.handlers as client
    from common.memory_meter import PeakMeter

    @contextlib.contextmanager
    def noop(module: Any = None, max_steps: int | None = 3) -> Iterator[PeakMeter]:
        yield PeakMeter()

    saved = client.track_peak
    client.track_peak = noop
    try:
        yield
    finally:
        client.track_peak = saved


def with_id(msg: Any) -> Any:
    """Give a message the id the grid would give it when pushed (needed to reply to it)."""
    msg.metadata.__dict__["_message_id"] = str(uuid4())
    return msg


def uss_mb() -> float:
    """This process's private memory (USS), MB."""
    import psutil

    return psutil.Process().memory_full_info().uss / 2**20


def cold_start(partitions: int) -> dict[str, float]:
    """Start-up of a ClientApp actor and of the ServerApp's first steps, timed in this fresh process.

    Seconds (wall) and, as ``uss-mb ...``, this process's private memory after each step: what one
    ClientApp actor holds after importing, after its first query and after it served every partition.
    """
    t0 = time.perf_counter()
    import torch  # noqa: F401

    t_torch = time.perf_counter()
    mem_torch = uss_mb()
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import client_app.app as capp
    from common import protocol as P
    from common.config import parse_run_config
    from common.preflight import app_defaults
    from server_app.outputs import RunRecorder
    from server_app.strategy import FedAvgStrategy, NodeInfo

    t_import = time.perf_counter()
    mem_import = uss_mb()
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    run_config = {**app_defaults(ROOT), "dataset": "npz", "data-path": DATA, "fraction-train": 0.5}

    def context(pid: int) -> Context:
        return Context(1, pid + 1, {"partition-id": pid, "num-partitions": partitions}, RecordDict(), run_config)

    def query(pid: int) -> float:
        msg = with_id(Message(RecordDict({P.CONFIG: ConfigRecord({P.ROUND: 0})}), pid + 1, MessageType.QUERY))
        start = time.perf_counter()
        capp.query(msg, context(pid))
        return time.perf_counter() - start

    first = query(0)
    mem_first = uss_mb()
    second = query(1)
    cfg = parse_run_config(run_config)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        strategy = FedAvgStrategy(cfg, RunRecorder(cfg, Path(tmp) / "run"), 10)
        t_build = time.perf_counter() - start
        start = time.perf_counter()
        strategy.evaluate_server()
        t_eval = time.perf_counter() - start
        strategy.nodes = {pid: NodeInfo(pid + 1, pid, 1) for pid in range(partitions)}
        cfg_round = ConfigRecord()
        strategy.cfg = cfg.model_copy(update={"fraction_train": 1.0})
        for msg in strategy.configure_train(1, ArrayRecord(), cfg_round, None):  # type: ignore[arg-type]
            pid = msg.metadata.dst_node_id - 1
            capp.train(with_id(msg), context(pid))
    return {
        "import-torch": t_torch - t0,
        "import-flwr-and-apps": t_import - t_torch,
        "client-first-query (data, partitions, memory model)": first,
        "client-next-query (cached)": second,
        "server-build-strategy": t_build,
        "server-initial-evaluation": t_eval,
        "uss-mb after import torch": mem_torch,
        "uss-mb after import flwr and apps": mem_import,
        "uss-mb after first query": mem_first,
        f"uss-mb after training every partition once ({partitions})": uss_mb(),
    }


def measure(reps: int, clients: int, partitions: int) -> dict[str, Any]:
    """Time every piece; returns the figures (seconds)."""
    import flwr.server.superlink.fleet.vce.vce_api as vce
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    import client_app.app as capp
    import client_app.handlers as client
    from common import protocol as P
    from common.aggregate import weighted_average
    from common.config import parse_run_config
    from common.data import client_data, held_out_set
    from common.preflight import app_defaults
    from common.training import evaluate, load_numpy, set_torch_threads, train_local
    from server_app.outputs import RunRecorder
    from server_app.strategy import FedAvgStrategy, NodeInfo

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # as the simulation sets them
    torch_default = torch.get_num_threads()
    run_config = {**app_defaults(ROOT), "dataset": "npz", "data-path": DATA, "fraction-train": 0.5}
    cfg = parse_run_config(run_config)
    set_torch_threads(cfg.client_threads)
    out_dir = Path(tempfile.mkdtemp(prefix="overhead-parts-"))
    recorder = RunRecorder(cfg.model_copy(update={"output_dir": str(out_dir), "run_name": "parts"}), out_dir / "run")
    strategy = FedAvgStrategy(cfg, recorder, 10)
    data = client_data(cfg.data_spec(), 0, partitions)
    strategy.nodes = {
        pid: NodeInfo(pid + 1, pid, len(client_data(cfg.data_spec(), pid, partitions).y_train))
        for pid in range(partitions)
    }
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": partitions},
        state=RecordDict(),
        run_config=run_config,
    )
    train_msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), None))  # type: ignore[arg-type]
    msg = with_id(train_msgs[0])
    seed = int(msg.content[P.CONFIG][P.SEED])
    capp.train(msg, context)  # warm-up: data, memory model, profiler initialisation

    def bare_train() -> None:
        load_numpy(client._model(cfg.model, 10, cfg.width), strategy.arrays)
        train_local(
            client._model(cfg.model, 10, cfg.width),
            data.x_train,
            data.y_train,
            epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            seed=seed,
        )

    def handler_without_track_peak() -> None:
        with no_track_peak():
            capp.train(msg, context)

    figures: dict[str, Any] = {}
    clients_timed = interleaved(
        {
            "train_local": bare_train,
            "handler": lambda: capp.train(msg, context),
            "handler-without-track-peak": handler_without_track_peak,
        },
        reps,
    )
    figures["client-train-timings"] = clients_timed
    figures["client-train-local"] = clients_timed["train_local"]["cpu-min"]
    figures["client-train-handler"] = clients_timed["handler"]["cpu-min"]
    figures["client-train-handler-without-track-peak"] = clients_timed["handler-without-track-peak"]["cpu-min"]
    figures["client-device-budget (_device)"] = best(
        lambda: client._device(cfg, client.node_identity(context.node_config), context, data), reps
    )
    reply = capp.train(msg, context)

    eval_msgs = list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), None))  # type: ignore[arg-type]
    emsg = with_id(eval_msgs[0])
    model = client._model(cfg.model, 10, cfg.width)
    figures["client-evaluate"] = best(
        lambda: (load_numpy(model, strategy.arrays), evaluate(model, data.x_val, data.y_val, cfg.eval_batch_size)),
        reps,
    )
    figures["client-evaluate-handler"] = best(lambda: capp.evaluate_local(emsg, context), reps)

    blob = pickle.dumps((msg, context), protocol=5)
    rblob = pickle.dumps(reply, protocol=5)
    figures["transport-train-message-bytes"] = len(blob)
    figures["transport-reply-bytes"] = len(rblob)
    figures["transport-pickle-round-trip"] = best(
        lambda: (
            pickle.loads(pickle.dumps((msg, context), protocol=5)) and pickle.loads(pickle.dumps(reply, protocol=5))
        ),
        reps,
    )

    trained = P.from_record(reply.content[P.ARRAYS])
    rng = np.random.default_rng(0)

    def replies_for(msgs: list[Any]) -> list[Any]:
        out = []
        for m in msgs:
            with_id(m)
            pid = next(p for p, n in strategy.nodes.items() if n.node_id == m.metadata.dst_node_id)
            arrays = {
                k: (v + rng.normal(scale=1e-4, size=v.shape).astype(v.dtype) if v.dtype.kind == "f" else v)
                for k, v in trained.items()
            }
            metrics = dict(reply.content[P.METRICS])
            metrics[P.NUM_EXAMPLES] = strategy.nodes[pid].num_examples
            content = RecordDict(
                {P.ARRAYS: P.to_record(arrays), P.METRICS: reply.content[P.METRICS].__class__(metrics)}
            )
            r = Message(content, reply_to=m)
            r.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            out.append(r)
        return out

    rnd_msgs = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), None))  # type: ignore[arg-type]
    replies = replies_for(rnd_msgs)
    updates = [(P.from_record(r.content[P.ARRAYS]), float(r.content[P.METRICS][P.NUM_EXAMPLES])) for r in replies]
    x_test, y_test = held_out_set(cfg.data_spec())
    set_torch_threads(torch_default)
    figures[f"server-evaluation ({torch_default} threads, both runs)"] = best(
        lambda: evaluate(strategy.server_model(), x_test, y_test, cfg.eval_batch_size), max(1, reps // 2)
    )
    set_torch_threads(cfg.client_threads)
    figures["server-weighted-average (plain loop)"] = best(lambda: weighted_average(updates), reps)

    def server_round() -> None:
        msgs = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), None))  # type: ignore[arg-type]
        saved = dict(strategy.arrays)
        strategy.aggregate_train(2, replies)
        strategy.arrays = saved
        emsgs = list(strategy.configure_evaluate(2, ArrayRecord(), ConfigRecord(), None))  # type: ignore[arg-type]
        del msgs, emsgs

    with contextlib.redirect_stderr(None):
        figures["server-configure-aggregate (train + evaluate)"] = best(server_round, reps)
    for rnd in range(1, 21):
        row = {"round": rnd, "server-accuracy": 0.5, "server-loss": 1.0, "participant-ids": list(range(clients))}
        recorder.rounds.append(row)
    figures["server-recorder-add-round (at round 20)"] = best(
        lambda: recorder.add_round({"round": 21, "server-accuracy": 0.5}) or recorder.rounds.pop(), reps
    )
    figures["server-eligible+required_mb"] = best(lambda: (strategy.eligible(2), strategy.required_mb()), reps)
    figures["flower-grid-pull-interval"] = float(
        inspect.signature(InMemoryGrid.__init__).parameters["pull_interval"].default
    )
    figures["flower-engine-scan-wait"] = (
        0.1 if "f_stop.wait(0.1)" in inspect.getsource(vce.add_messages_to_queue) else None
    )
    figures["replies-per-round"] = len(replies)
    shutil.rmtree(out_dir, ignore_errors=True)
    return figures


def report(f: dict[str, Any], clients: int, actors: int) -> dict[str, Any]:
    """Per-message and per-round overheads derived from the timings."""
    train_extra = f["client-train-handler"] - f["client-train-local"]
    track = f["client-train-handler"] - f["client-train-handler-without-track-peak"]
    eval_extra = f["client-evaluate-handler"] - f["client-evaluate"]
    evals = max(1, clients // 2)
    server_eval = next(v for k, v in f.items() if k.startswith("server-evaluation"))
    server_extra = f["server-configure-aggregate (train + evaluate)"] - f["server-weighted-average (plain loop)"]
    polling = 2 * (f["flower-grid-pull-interval"] / 2 + (f["flower-engine-scan-wait"] or 0.0) / 2)
    client_total = (clients * (train_extra + f["transport-pickle-round-trip"]) + evals * eval_extra) / actors
    per_round = client_total + server_extra + f["server-recorder-add-round (at round 20)"] + polling
    return {
        "client-train-overhead-per-message": train_extra,
        "of-which-track-peak": track,
        "client-evaluate-overhead-per-message": eval_extra,
        "server-overhead-per-round": server_extra + f["server-recorder-add-round (at round 20)"],
        "polling-latency-per-round (expected)": polling,
        "client-overhead-per-round (wall, over the actors)": client_total,
        "estimated-overhead-per-round": per_round,
        "plain-work-per-round (CPU: train, evaluate, server evaluation)": clients * f["client-train-local"]
        + evals * f["client-evaluate"]
        + server_eval,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure, print, save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10, help="replies per round")
    parser.add_argument("--partitions", type=int, default=20)
    parser.add_argument("--actors", type=int, default=2, help="ClientApp actors running at once in the simulation")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--cold-start", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cold_start:
        print(json.dumps(cold_start(args.partitions)))
        return 0
    res = subprocess.run(
        [sys.executable, "-m", "bench.overhead_parts", "--cold-start", "--partitions", str(args.partitions)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    cold = json.loads(res.stdout.strip().splitlines()[-1])
    figures = measure(args.reps, args.clients, args.partitions)
    figures["cold-start (fresh process)"] = {
        k: {"wall" if not k.startswith("uss") else "MB": v} for k, v in cold.items()
    }
    derived = report(figures, args.clients, args.actors)
    for k, v in {**figures, **derived}.items():
        if isinstance(v, dict):
            for name, t in v.items():
                print(f"  {name:53} " + ", ".join(f"{m} {x:.3f}" for m, x in t.items()))
        else:
            print(f"{k:55} {v:12.4f}" if isinstance(v, float) else f"{k:55} {v!s:>12}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "overhead_parts",
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "reps": args.reps,
        "clients-per-round": args.clients,
        "actors": args.actors,
        "seconds": figures,
        "derived-seconds": derived,
    }
    args.json.write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
