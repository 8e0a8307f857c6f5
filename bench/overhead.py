"""Simulation overhead: a Flower/Ray simulation run vs the same federated work in one plain PyTorch loop.

Run: ``./run.sh bench overhead [--strategy fedavg|smartfreeze] [--supernodes 20] [--rounds 20]
[--fraction-train 0.5] [--cpus-per-client 1] [--plain-threads N] [--interval 0.5] [--label NAME]``
(``.venv/bin/python -m bench.overhead``). One invocation measures, one after the other:

(a) **simulation**: ``./run.sh run`` as a subprocess (preflight, its own SuperLink, ``flwr run``, which
    exits once the run is submitted while run.sh follows the ServerApp's progress file, ``flwr list``,
    superexec, ``flwr-simulation`` with the ServerApp and the Ray driver, Ray's raylet/gcs_server/agents and
    the ClientApp actors, teardown); wall time from launch to exit;
(b) **plain loop**: the same federated work in one fresh Python process (``--plain-worker``), with the
    project's own functions: ``build_model`` with the run seed, ``client_data`` partitions, FedAvg's
    sampling rule (``np.random.default_rng([seed, round])`` over the sorted partition ids, k = min(n,
    max(min-train-nodes, ceil(fraction-train * n)))) and per-client seeds (``derive_seed``),
    ``train_local``, ``weighted_average``, the federated evaluation of the same seeded fraction-evaluate of
    clients on their validation split and the server evaluation on ``held_out_set`` every round.

Both run the resolved config of one preflight (the simulation's ``metrics.json`` config is checked against
it), so they train the same clients on the same data from the same initial model with the same seeds, and
reach the same accuracy. Torch threads: client work (training, federated evaluation, monitor queries) uses
``client-threads`` threads like the simulated clients (``--plain-threads`` overrides; another count changes
float reductions, so results then drift apart); server evaluation uses torch's default thread count, like
the ServerApp's process.

**SmartFreeze** (``--strategy smartfreeze``): participants come from the selector (RL-CD + bandit), whose
completion-time estimates come from *measured* throughput, so its choices depend on timing and cannot be
recomputed. The plain loop therefore replays the simulation's schedule from its ``metrics.json`` (stage and
``participant-ids`` of every round) and does the same work with it: the start-up monitor query of every
client (loss statistics, throughput, output-layer gradient; similarity matrix and RL-CD on the server), the
query of the new stage at every stage change, training of the ``StageModel`` sub-models (output modules
built by ``build_output_modules`` with seed ``seed + 1``; warm start at each stage change with
``warm_start_arrays``), aggregation of the active block and output module, federated and server
evaluation of the stage sub-model, the pace controller and stage machine (their own freeze decisions are
compared with the replayed schedule), and the final evaluation of the full model.

Measured for both: wall seconds (total; rounds only: the simulation's per-round ``round-seconds`` from
``metrics.json``, the plain loop's own timing of the same span, monitor query at a stage change
included), CPU seconds of every process, and memory: the peak over time of the summed PSS of every
process of the run, sampled every ``--interval`` seconds by a low-priority thread of this process. The
simulation's processes are the process tree of the ``run.sh`` subprocess (walked recursively every sample)
plus any process started after the launch that carries this benchmark's tag in its environment (Ray
processes that detached from the tree still inherit it). Ray processes (``ray::``, ``raylet``,
``gcs_server``) started during the run *without* the tag belong to someone else's concurrent run: they are
not counted, only reported. The simulation's timeline comes from process start times (SuperLink,
``flwr run``, ``flwr-simulation``, first ClientApp actor) and its run folder (``config.json`` is written
when the ServerApp starts; ``metrics.json``'s last write minus its ``wall-seconds`` is the start of round 1).

Parallelism: with ``--cpus-per-client 1`` on a 2-CPU machine Ray runs two ClientApp actors at once, while the
plain loop trains one client after the other on one thread; the simulation's rounds can then be faster than
the plain loop's, which hides its overhead. ``--cpus-per-client 2`` (one actor) makes both sequential, a
like-for-like comparison of the same work; the CPU-seconds ratio does not depend on it. Memory is reported
as PSS (the issue's measure: shared pages split between the processes that map them, so it also depends on
what else runs on the machine) and USS (private pages only).

Also recorded: load average, CPU time used on the machine by other processes during each phase (a busy
machine makes every figure noisier: re-run when ``foreign CPU`` is high), the sampler's own CPU time,
per-process-group peak PSS and CPU seconds (in the rounds window too), and per-round accuracies of both.
Results go to ``--json`` (default ``outputs/bench/overhead.json``; one entry per ``--label``, default
the strategy, kept across invocations), the runs' logs to ``outputs/bench/overhead-runs/``.

Targets (issue "Simulation throughput"): wall ratio <= 1.10x and memory ratio <= 2x; Flower's own minimal
FedAvg example measured 1.16x (about 22 s of start-up) and about 2.3x memory on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data/cifar10_small.npz"
DEFAULT_JSON = ROOT / "outputs" / "bench" / "overhead.json"
RUNS_DIR = ROOT / "outputs" / "bench" / "overhead-runs"
TAG_ENV = "PROGFL_BENCH_OVERHEAD_TAG"
TARGET_WALL_RATIO = 1.10
TARGET_MEMORY_RATIO = 2.0
FLOWER_EXAMPLE = {"wall-ratio": 1.16, "startup-seconds": 22.0, "memory-ratio": 2.3}
"""Flower's own minimal FedAvg example on this machine, as reported in the issue."""
MB = 2**20
RAY_MARKERS = ("ray::", "raylet", "gcs_server")

PROCESS_TITLES: tuple[tuple[str, str], ...] = (
    ("ray::ClientAppActor", "ray ClientApp actors"),
    ("ray::IDLE", "ray idle workers"),
    ("ray::", "ray agents"),
)
"""Ray workers rename themselves (``ray::<actor>.<method>``): matched on the start of the command line."""
EXECUTABLES: dict[str, str] = {
    "raylet": "ray raylet",
    "gcs_server": "ray gcs_server",
    "flwr-simulation": "flwr-simulation (ServerApp, Ray driver)",
    "flower-superexec": "superexec",
    "flower-superlink": "superlink",
    "flwr": "flwr CLI (run, list)",
    "default_worker.py": "ray idle workers",
    "setup_worker.py": "ray idle workers",
    "dashboard.py": "ray dashboard",
    "agent.py": "ray agents",
    "main.py": "ray agents",
    "log_monitor.py": "ray log/autoscaler monitors",
    "monitor.py": "ray log/autoscaler monitors",
    "common.preflight": "run.sh helpers (preflight, port, health checks)",
    "-c": "run.sh helpers (preflight, port, health checks)",
    "bench.overhead": "plain loop",
}
"""Executable, Python script or ``-m`` module (first match of the command line) -> process group."""


# ---------------------------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    """CPU, memory, OS and library versions of this machine."""
    import flwr
    import numpy as np
    import torch

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical-cpus": psutil.cpu_count(),
        "physical-cpus": psutil.cpu_count(logical=False),
        "memory-gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch-default-threads": torch.get_num_threads(),
        "flwr": flwr.__version__,
        "ray": ray_version,
        "numpy": np.__version__,
        "psutil": psutil.__version__,
    }


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs, everything but idle and iowait)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0))


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's reaped descendants (getrusage RUSAGE_CHILDREN)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------------------------- sampling
def group_of(cmdline: list[str]) -> str:
    """Process group (superlink, ray actors, ...) of a command line."""
    if not cmdline:
        return "other"
    for prefix, name in PROCESS_TITLES:
        if cmdline[0].startswith(prefix):
            return name
    for i, arg in enumerate(cmdline[:4]):
        if arg == "-m" and i + 1 < len(cmdline):
            return EXECUTABLES.get(cmdline[i + 1], "other: python -m " + cmdline[i + 1])
        name = EXECUTABLES.get(Path(arg).name)
        if name is not None:
            return name
    if Path(cmdline[0]).name in ("bash", "sh", "tee", "grep", "sleep", "setsid", "cat", "date", "ls"):
        return "run.sh (bash) and shell tools"
    return "other: " + Path(cmdline[0]).name


@dataclass
class ProcRecord:
    """What the sampler learnt about one process of a run."""

    pid: int
    create_time: float
    group: str
    cmd: str
    how: str
    first_seen: float
    last_seen: float = 0.0
    peak_pss: int = 0
    peak_uss: int = 0
    cpu: float = 0.0


@dataclass
class Sample:
    """One sample: time (epoch s), summed PSS and USS, processes, cumulative CPU seconds per group, summed RSS.

    Summed RSS counts a page shared by several processes once per process (an upper bound of the
    memory in use); PSS splits it between them (the sum is the memory the processes use together).
    """

    t: float
    pss: int
    uss: int
    procs: int
    pss_by_group: dict[str, int]
    cpu_by_group: dict[str, float]
    rss: int = 0


class TreeSampler:
    """Samples PSS and CPU time of a run's processes every ``interval`` s in a low-priority thread.

    Members: ``root_pid`` and its descendants (walked recursively every sample), plus any process
    created after ``t0`` whose environment holds ``TAG_ENV=tag`` (detached Ray processes). Ray
    processes created after ``t0`` without the tag are someone else's and only listed in ``foreign``.
    """

    def __init__(self, root_pid: int, tag: str | None, t0: float, interval: float) -> None:
        self.root_pid = root_pid
        self.tag = tag
        self.t0 = t0
        self.interval = interval
        self.records: dict[tuple[int, float], ProcRecord] = {}
        self.samples: list[Sample] = []
        self.foreign: dict[int, str] = {}
        self.sampler_cpu = 0.0
        self._procs: dict[int, psutil.Process] = {}
        self._classified: dict[tuple[int, float], bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="overhead-sampler", daemon=True)

    def start(self) -> None:
        """Start sampling (first sample at once)."""
        self._thread.start()

    def stop(self) -> None:
        """Take a last sample and stop."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        start = time.thread_time()
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                break
        self.sample()
        self.sampler_cpu = time.thread_time() - start

    def _process(self, pid: int) -> psutil.Process | None:
        proc = self._procs.get(pid)
        if proc is None:
            try:
                proc = self._procs[pid] = psutil.Process(pid)
            except psutil.Error:
                return None
        return proc

    def _tagged(self) -> list[tuple[psutil.Process, str]]:
        """Processes created after t0 that carry the tag (checked once per process)."""
        found: list[tuple[psutil.Process, str]] = []
        if self.tag is None:
            return found
        for pid in psutil.pids():
            proc = self._process(pid)
            if proc is None:
                continue
            try:
                key = (pid, proc.create_time())
                if key not in self._classified:
                    mine = False
                    if key[1] >= self.t0 - 1.0:
                        try:
                            mine = proc.environ().get(TAG_ENV) == self.tag
                        except psutil.AccessDenied:
                            mine = False
                        if not mine:
                            text = " ".join(proc.cmdline())
                            if any(m in text for m in RAY_MARKERS):
                                self.foreign[pid] = text[:160]
                    self._classified[key] = mine
                if self._classified[key]:
                    found.append((proc, "tag"))
            except psutil.Error:
                continue
        return found

    def members(self) -> list[tuple[psutil.Process, str]]:
        """The run's live processes and how each was found (tree or tag)."""
        out: dict[int, tuple[psutil.Process, str]] = {}
        root = self._process(self.root_pid)
        if root is not None:
            try:
                out[root.pid] = (root, "tree")
                for child in root.children(recursive=True):
                    out[child.pid] = (self._process(child.pid) or child, "tree")
            except psutil.Error:
                pass
        for proc, how in self._tagged():
            out.setdefault(proc.pid, (proc, how))
        return list(out.values())

    def sample(self) -> None:
        """One sample of every member's PSS and CPU time."""
        now = time.time()
        total = total_uss = total_rss = 0
        pss_by_group: dict[str, int] = defaultdict(int)
        count = 0
        for proc, how in self.members():
            try:
                with proc.oneshot():
                    key = (proc.pid, proc.create_time())
                    cmdline = proc.cmdline()
                    cpu = proc.cpu_times()
                mem = proc.memory_full_info()
            except psutil.Error:
                continue
            group = group_of(cmdline)
            rec = self.records.get(key)
            if rec is None:
                rec = self.records[key] = ProcRecord(proc.pid, key[1], group, " ".join(cmdline)[:200], how, now)
            if not rec.group.startswith("ray ClientApp") and group.startswith("ray ClientApp"):
                rec.group = group  # an idle Ray worker became an actor
            rec.last_seen = now
            rec.peak_pss = max(rec.peak_pss, mem.pss)
            rec.peak_uss = max(rec.peak_uss, mem.uss)
            rec.cpu = max(rec.cpu, cpu.user + cpu.system)
            total += mem.pss
            total_uss += mem.uss
            total_rss += mem.rss
            pss_by_group[rec.group] += mem.pss
            count += 1
        cpu_by_group: dict[str, float] = defaultdict(float)
        for rec in self.records.values():
            cpu_by_group[rec.group] += rec.cpu
        self.samples.append(Sample(now, total, total_uss, count, dict(pss_by_group), dict(cpu_by_group), total_rss))

    # ------------------------------------------------------------------ summaries
    def peak(self) -> Sample | None:
        """The sample with the largest summed PSS."""
        return max(self.samples, key=lambda s: s.pss, default=None)

    def cpu_seconds(self) -> float:
        """CPU seconds of every member seen (last value sampled per process)."""
        return sum(r.cpu for r in self.records.values())

    def cpu_between(self, t_start: float, t_end: float) -> dict[str, float]:
        """CPU seconds per group between two times (from the cumulative per-group samples)."""

        def at(t: float) -> dict[str, float]:
            best = None
            for s in self.samples:
                if s.t <= t:
                    best = s
            return best.cpu_by_group if best else {}

        a, b = at(t_start), at(t_end)
        return {g: b.get(g, 0.0) - a.get(g, 0.0) for g in sorted(set(a) | set(b)) if b.get(g, 0.0) - a.get(g, 0.0) > 0}

    def peak_by_group(self) -> dict[str, float]:
        """Largest summed PSS (MB) of each group over the samples."""
        out: dict[str, float] = defaultdict(float)
        for s in self.samples:
            for g, v in s.pss_by_group.items():
                out[g] = max(out[g], v / MB)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def first_start(self, group: str) -> float | None:
        """Earliest start time (epoch s) of a process of ``group``."""
        times = [r.create_time for r in self.records.values() if r.group == group]
        return min(times) if times else None

    def timeline(self, step: float = 2.0) -> list[dict[str, float]]:
        """Summed PSS over time, thinned to about one point per ``step`` seconds."""
        out: list[dict[str, float]] = []
        last = -math.inf
        for s in self.samples:
            if s.t - last >= step:
                out.append({"t": round(s.t - self.t0, 2), "pss-mb": round(s.pss / MB, 1), "procs": s.procs})
                last = s.t
        return out


@dataclass
class Phase:
    """One measured subprocess run: times, sampler, CPU accounting, captured output."""

    name: str
    t0: float
    t_end: float = 0.0
    returncode: int | None = None
    lines: list[tuple[float, str]] = field(default_factory=list)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    busy_cpu: float = 0.0
    reaped_cpu: float = 0.0
    sampler: TreeSampler | None = None

    @property
    def wall(self) -> float:
        """Seconds from launch to exit."""
        return self.t_end - self.t0


def run_measured(name: str, cmd: list[str], env: dict[str, str], tag: str | None, interval: float, log: Path) -> Phase:
    """Run ``cmd`` in ROOT, sample its processes, timestamp its output lines, stop it cleanly on interrupt."""
    phase = Phase(name, 0.0, load_before=os.getloadavg())
    busy0, reaped0 = busy_cpu_seconds(), children_cpu_seconds()
    phase.t0 = time.time()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    sampler = phase.sampler = TreeSampler(proc.pid, tag, phase.t0, interval)
    sampler.start()
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log, "w") as f:
            assert proc.stdout is not None
            for line in proc.stdout:
                now = time.time()
                phase.lines.append((now, line.rstrip("\n")))
                f.write(f"[{now - phase.t0:8.2f}] {line}")
                f.flush()
        phase.returncode = proc.wait()
        phase.t_end = time.time()
    finally:
        if proc.poll() is None:  # interrupted: run.sh's own trap stops the SuperLink, simulation and Ray
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        sampler.stop()
    phase.busy_cpu = busy_cpu_seconds() - busy0
    phase.reaped_cpu = children_cpu_seconds() - reaped0
    phase.load_after = os.getloadavg()
    return phase


def phase_summary(phase: Phase) -> dict[str, Any]:
    """Wall, CPU, memory and machine-load figures of a phase."""
    s = phase.sampler
    assert s is not None
    peak = s.peak()
    own_cpu = s.cpu_seconds()
    foreign = max(0.0, phase.busy_cpu - own_cpu - s.sampler_cpu)
    ncpu = psutil.cpu_count() or 1
    cpu_by_group: dict[str, float] = defaultdict(float)
    for rec in s.records.values():
        cpu_by_group[rec.group] += rec.cpu
    return {
        "wall-seconds": phase.wall,
        "returncode": phase.returncode,
        "cpu-seconds": own_cpu,
        "cpu-seconds-reaped": phase.reaped_cpu,
        "peak-pss-mb": (peak.pss / MB) if peak else None,
        "peak-pss-at-seconds": (peak.t - phase.t0) if peak else None,
        "peak-uss-mb": max((x.uss for x in s.samples), default=0) / MB,
        "peak-rss-summed-mb": max((x.rss for x in s.samples), default=0) / MB,
        "peak-processes": max((x.procs for x in s.samples), default=0),
        "peak-pss-by-group-mb": s.peak_by_group(),
        "pss-at-peak-by-group-mb": {g: v / MB for g, v in sorted((peak.pss_by_group if peak else {}).items())},
        "cpu-seconds-by-group": dict(sorted(cpu_by_group.items(), key=lambda kv: -kv[1])),
        "processes": len(s.records),
        "processes-found-by-tag-only": sum(1 for r in s.records.values() if r.how == "tag"),
        "foreign-ray-processes-excluded": len(s.foreign),
        "samples": len(s.samples),
        "sampler-cpu-seconds": s.sampler_cpu,
        "load-average-before": list(phase.load_before),
        "load-average-after": list(phase.load_after),
        "machine-busy-cpu-seconds": phase.busy_cpu,
        "foreign-cpu-seconds": foreign,
        "foreign-cpu-share": foreign / (phase.wall * ncpu) if phase.wall > 0 else None,
        "pss-timeline": s.timeline(),
    }


# ---------------------------------------------------------------------------------------------- config
def resolve_config(config: str) -> dict[str, Any]:
    """The run config run.sh's preflight produces for ``config``, resolved and validated (flat dict)."""
    from common.config import parse_run_config
    from common.preflight import app_defaults, preflight

    overrides = preflight(ROOT, [config], ROOT, None)
    return parse_run_config({**app_defaults(ROOT), **overrides}).to_flat()


def workload_config(args: argparse.Namespace, run_dir: Path) -> str:
    """The ``--run-config`` string of the workload."""
    parts = [
        f"strategy='{args.strategy}'",
        "dataset='npz'",
        f"data-path='{args.data}'",
        f"model='{args.model}'",
        f"width={args.width}",
        f"num-rounds={args.rounds}",
        f"fraction-train={args.fraction_train}",
        f"seed={args.seed}",
        f"run-name='{run_dir.name}'",
        f"output-dir='{run_dir.parent}'",
    ]
    if args.run_config:
        parts.append(args.run_config)
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------- simulation
def simulation_timeline(phase: Phase, run_dir: Path, doc: dict[str, Any]) -> dict[str, float | None]:
    """Seconds after launch of the simulation's milestones (process starts, run-folder writes)."""
    s = phase.sampler
    assert s is not None

    def rel(t: float | None) -> float | None:
        return None if t is None else t - phase.t0

    def mtime(name: str) -> float | None:
        p = run_dir / name
        return p.stat().st_mtime if p.exists() else None

    rounds = [r for r in doc["rounds"] if r["round"] > 0]
    summary_written = mtime("metrics.json")
    rounds_start = rounds_end = None
    if summary_written is not None and doc["summary"].get("wall-seconds") is not None:
        rounds_start = summary_written - float(doc["summary"]["wall-seconds"])
        rounds_end = rounds_start + float(rounds[-1]["wall-seconds"])
    done_line = next((t for t, line in phase.lines if "run " in line and "completed" in line), None)
    return {
        "superlink-started": rel(s.first_start("superlink")),
        "flwr-cli-started": rel(s.first_start("flwr CLI (run, list)")),
        "superexec-started": rel(s.first_start("superexec")),
        "flwr-simulation-started": rel(s.first_start("flwr-simulation (ServerApp, Ray driver)")),
        "ray-gcs-started": rel(s.first_start("ray gcs_server")),
        "first-actor-process-started": rel(s.first_start("ray ClientApp actors")),
        "serverapp-started (config.json)": rel(mtime("config.json")),
        "round-1-started": rel(rounds_start),
        "last-round-ended": rel(rounds_end),
        "summary-written (metrics.json)": rel(summary_written),
        "report-written (report.html)": rel(mtime("report.html")),
        "run.sh-reported-completed": rel(done_line),
        "exited": phase.wall,
    }


def run_simulation(args: argparse.Namespace, config: str, run_dir: Path, tag: str) -> tuple[Phase, dict[str, Any]]:
    """``./run.sh run`` the workload; return the phase and the run's metrics.json."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
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
    print(f"[overhead] simulation: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    env = {**os.environ, TAG_ENV: tag}
    phase = run_measured("simulation", cmd, env, tag, args.interval, RUNS_DIR / f"{run_dir.name}.log")
    if phase.returncode != 0:
        tail = "\n".join(line for _, line in phase.lines[-30:])
        raise RuntimeError(f"simulation failed (exit {phase.returncode}); log {RUNS_DIR / run_dir.name}.log\n{tail}")
    doc = json.loads((run_dir / "metrics.json").read_text())
    return phase, doc


# ---------------------------------------------------------------------------------------------- plain loop
def plain_worker(spec_path: Path, out_path: Path) -> int:
    """Entry of the plain-loop process: read the spec, run the loop, write the result JSON."""
    t_process = psutil.Process().create_time()
    t_imports = time.time()
    spec = json.loads(spec_path.read_text())
    result = PlainLoop(spec, t_process).run()
    result["timeline"]["imports-started"] = t_imports - t_process
    out_path.write_text(json.dumps(result, indent=1))
    return 0


class PlainLoop:
    """The simulation's federated work in one process, with the project's own functions."""

    def __init__(self, spec: dict[str, Any], t_process: float) -> None:
        import torch

        from common.config import parse_run_config

        self.torch = torch
        self.cfg = parse_run_config(spec["config"])
        self.num_partitions = int(spec["num-partitions"])
        self.client_threads = int(spec["client-threads"])
        self.server_threads = int(spec.get("server-threads") or torch.get_num_threads())
        self.replay: list[dict[str, Any]] | None = spec.get("replay")
        self.t_process = t_process
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        """Record a milestone (seconds since the process started)."""
        self.marks[name] = time.time() - self.t_process

    # ------------------------------------------------------------------ shared pieces
    def setup(self) -> None:
        """Data of every client, the test set, the model (seeded as the ServerApp's)."""
        from common.data import client_data, held_out_set, load_dataset
        from common.models import build_model
        from common.training import state_to_numpy

        self.mark("imports-done")
        spec = self.cfg.data_spec()
        num_classes = load_dataset(spec).num_classes
        self.x_test, self.y_test = held_out_set(spec)
        self.clients = {pid: client_data(spec, pid, self.num_partitions) for pid in range(self.num_partitions)}
        self.mark("data-loaded")
        self.model = build_model(self.cfg.model, num_classes, self.cfg.width, seed=self.cfg.seed)
        self.arrays = state_to_numpy(self.model)

    def client_mode(self) -> None:
        """Torch threads of a simulated client."""
        from common.training import set_torch_threads

        set_torch_threads(self.client_threads)

    def server_mode(self) -> None:
        """Torch threads of the ServerApp's process."""
        from common.training import set_torch_threads

        set_torch_threads(self.server_threads)

    def merge(self, aggregated: dict[str, Any]) -> None:
        """Write aggregated arrays into the global state, keeping the global shapes."""
        for key, value in aggregated.items():
            self.arrays[key] = value.reshape(self.arrays[key].shape)

    def train_clients(self, rnd: int, pids: list[int], build: Any) -> tuple[list[tuple[dict, float]], float]:
        """Train ``build()``'s module on every client of ``pids``; (updates, weighted train loss)."""
        from common.training import load_numpy, state_to_numpy, train_local
        from server_app.strategy import derive_seed

        cfg = self.cfg
        self.client_mode()
        updates: list[tuple[dict, float]] = []
        loss_sum = 0.0
        for pid in pids:
            data = self.clients[pid]
            module, prefixes = build()
            load_numpy(module, {k: self.arrays[k] for k in module.state_dict()}, strict=True)
            res = train_local(
                module,
                data.x_train,
                data.y_train,
                epochs=cfg.local_epochs,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                momentum=cfg.momentum,
                weight_decay=cfg.weight_decay,
                seed=derive_seed(cfg.seed, rnd, pid),
            )
            n = float(len(data.y_train))
            updates.append((state_to_numpy(module, prefixes), n))
            loss_sum += res.loss * n
        return updates, loss_sum / sum(n for _, n in updates)

    def federated_evaluation(self, rnd: int, build: Any) -> float | None:
        """Client accuracy of the seeded fraction-evaluate of clients (as FedAvgStrategy.configure_evaluate)."""
        import numpy as np

        from common.training import evaluate, load_numpy

        cfg = self.cfg
        if cfg.fraction_evaluate <= 0:
            return None
        pool = sorted(self.clients)
        k = max(1, math.ceil(cfg.fraction_evaluate * len(pool)))
        rng = np.random.default_rng([cfg.seed, rnd, 1])
        chosen = sorted(int(p) for p in rng.choice(pool, size=min(k, len(pool)), replace=False))
        self.client_mode()
        rows = []
        for pid in chosen:
            data = self.clients[pid]
            module, _ = build()
            load_numpy(module, {k: self.arrays[k] for k in module.state_dict()}, strict=True)
            _, acc = evaluate(module, data.x_val, data.y_val, cfg.eval_batch_size)
            if len(data.y_val) > 0:
                rows.append((acc, float(len(data.y_val))))
        total = sum(n for _, n in rows)
        return sum(a * n for a, n in rows) / total if total else None

    def server_evaluation(self, module: Any) -> tuple[float, float]:
        """Test loss and accuracy of ``module`` (loaded with the global arrays) on the held-out set."""
        from common.training import evaluate, load_numpy

        self.server_mode()
        load_numpy(module, {k: self.arrays[k] for k in module.state_dict()}, strict=True)
        return evaluate(module, self.x_test, self.y_test, self.cfg.eval_batch_size)

    # ------------------------------------------------------------------ FedAvg
    def sample(self, rnd: int) -> list[int]:
        """FedAvgStrategy.sample: a seeded draw of fraction-train of the sorted partition ids."""
        import numpy as np

        cfg = self.cfg
        pool = sorted(self.clients)
        if len(pool) < cfg.min_train_nodes:
            return pool
        k = min(len(pool), max(cfg.min_train_nodes, math.ceil(cfg.fraction_train * len(pool))))
        rng = np.random.default_rng([cfg.seed, rnd])
        return sorted(int(p) for p in rng.choice(pool, size=k, replace=False))

    def run_fedavg(self) -> dict[str, Any]:
        """FedAvg rounds: sample, train, average, federated evaluation, server evaluation."""
        from common.aggregate import weighted_average

        def full() -> tuple[Any, None]:
            self.model.requires_grad_(True)
            return self.model, None

        rows = []
        loss0, acc0 = self.server_evaluation(self.model)
        rows.append({"round": 0, "server-accuracy": acc0, "server-loss": loss0})
        self.mark("initial-evaluation-done")
        for rnd in range(1, self.cfg.num_rounds + 1):
            t, t_cpu = time.perf_counter(), time.process_time()
            pids = self.sample(rnd)
            updates, train_loss = self.train_clients(rnd, pids, full)
            self.merge(weighted_average(updates))
            client_acc = self.federated_evaluation(rnd, full)
            loss, acc = self.server_evaluation(self.model)
            rows.append(
                {
                    "round": rnd,
                    "server-accuracy": acc,
                    "server-loss": loss,
                    "client-accuracy": client_acc,
                    "train-loss": train_loss,
                    "participant-ids": pids,
                    "round-seconds": time.perf_counter() - t,
                    "round-cpu-seconds": time.process_time() - t_cpu,
                }
            )
        self.mark("rounds-done")
        return {"rounds": rows, "final-accuracy": rows[-1]["server-accuracy"], "final-loss": rows[-1]["server-loss"]}

    # ------------------------------------------------------------------ SmartFreeze
    def run_smartfreeze(self) -> dict[str, Any]:
        """SmartFreeze rounds on the replayed stage schedule and participants (module docstring)."""
        import numpy as np

        from common.aggregate import weighted_average
        from common.community import RLCDConfig, rl_cd, similarity_matrix
        from common.monitor import loss_statistics, measure_throughput, output_layer_gradient
        from common.output_modules import (
            OUTMOD_PREFIX,
            StageModel,
            build_output_modules,
            frozen_prefixes,
            stage_prefixes,
        )
        from common.pace import PaceController
        from common.stages import StageMachine
        from common.training import load_numpy, state_to_numpy
        from server_app.smartfreeze import warm_start_arrays

        cfg = self.cfg
        assert self.replay is not None
        model = self.model
        num_blocks = model.num_blocks
        output_modules = build_output_modules(model, seed=cfg.seed + 1)
        self.arrays.update({f"{OUTMOD_PREFIX}.{k}": v for k, v in state_to_numpy(output_modules).items()})
        machine = StageMachine(num_blocks, cfg.num_rounds, cfg.min_stage_rounds, cfg.max_stage_rounds)
        pace = PaceController(cfg.pace_config())
        rlcd = cfg.selector == "rlcd"

        def stage_model(stage: int) -> StageModel:
            om = output_modules[str(stage)] if stage < num_blocks - 1 else None
            return StageModel(model, stage, om)

        def trainer(stage: int) -> Any:
            def build() -> tuple[Any, tuple[str, ...]]:
                sub = stage_model(stage)
                return sub, sub.trainable_prefixes()

            return build

        def monitor(stage: int, want_grad: bool) -> None:
            """The monitor query of every client (all fit: no device profile) and RL-CD at start-up."""
            self.client_mode()
            grads = []
            for data in self.clients.values():
                if stage < 0:
                    module = model
                    module.requires_grad_(True)
                    load_numpy(module, {k: v for k, v in self.arrays.items() if not k.startswith(OUTMOD_PREFIX)})
                else:
                    module = stage_model(stage)
                    keep = frozen_prefixes(stage) + stage_prefixes(stage, num_blocks)
                    load_numpy(module, {k: v for k, v in self.arrays.items() if k.startswith(keep)})
                loss_statistics(module, data.x_train, data.y_train, cfg.eval_batch_size)
                measure_throughput(module, data.x_train, data.y_train, cfg.batch_size)
                if want_grad:
                    grads.append(
                        output_layer_gradient(
                            model,
                            data.x_train,
                            data.y_train,
                            steps=cfg.monitor_steps,
                            batch_size=cfg.batch_size,
                            lr=cfg.lr,
                        )
                    )
            if len(grads) >= 2:
                self.server_mode()
                rl_cd(similarity_matrix(np.stack(grads)), RLCDConfig(seed=cfg.seed))

        monitor(-1, rlcd)
        monitored = -1
        rows = []
        loss0, acc0 = self.server_evaluation(stage_model(0))
        rows.append({"round": 0, "stage": 1, "server-accuracy": acc0, "server-loss": loss0})
        self.mark("initial-evaluation-done")
        schedule = {int(r["round"]): r for r in self.replay}
        agree = []
        for rnd in range(1, cfg.num_rounds + 1):
            t, t_cpu = time.perf_counter(), time.process_time()
            stage = int(schedule[rnd]["stage"]) - 1
            if rlcd and monitored != stage:
                monitor(stage, False)
                monitored = stage
            pids = [int(p) for p in schedule[rnd]["participant-ids"]]
            updates, train_loss = self.train_clients(rnd, pids, trainer(stage))
            self.merge(weighted_average(updates))
            client_acc = self.federated_evaluation(rnd, lambda s=stage: (stage_model(s), None))
            loss, acc = self.server_evaluation(stage_model(stage))
            seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - t_cpu
            params = np.concatenate(
                [self.arrays[f"blocks.{stage}.{n}"].ravel() for n, _ in model.blocks[stage].named_parameters()]
            )
            step = pace.observe(rnd, params)
            snapshot = machine.state_dict()
            own = machine.end_of_round(converged=bool(step.freeze))
            nxt = int(schedule[rnd + 1]["stage"]) - 1 if rnd + 1 in schedule else stage
            agree.append((own is not None) == (nxt != stage))
            if (own is not None) != (nxt != stage):  # follow the replayed schedule
                machine = StageMachine.from_state_dict(snapshot)
                machine.completed_rounds += 1
                machine.rounds_in_stage += 1
                if nxt != stage:
                    machine.advance("replayed")
            if nxt != stage:
                pace.reset(nxt)
                if cfg.outmod_warm_start:
                    self.arrays.update(warm_start_arrays(self.arrays, nxt, num_blocks))
            rows.append(
                {
                    "round": rnd,
                    "stage": stage + 1,
                    "server-accuracy": acc,
                    "server-loss": loss,
                    "client-accuracy": client_acc,
                    "train-loss": train_loss,
                    "participant-ids": pids,
                    "round-seconds": seconds,
                    "round-cpu-seconds": cpu_seconds,
                }
            )
        self.mark("rounds-done")
        self.server_mode()
        full = {k: v for k, v in self.arrays.items() if not k.startswith(OUTMOD_PREFIX)}
        load_numpy(model, full)
        from common.training import evaluate

        final_loss, final_acc = evaluate(model, self.x_test, self.y_test, cfg.eval_batch_size)
        return {
            "rounds": rows,
            "final-accuracy": final_acc,
            "final-loss": final_loss,
            "own-freeze-decisions-agree": all(agree),
            "own-freeze-disagreements": [i + 1 for i, ok in enumerate(agree) if not ok],
        }

    def run(self) -> dict[str, Any]:
        """Set up, run the strategy's rounds, return rows, accuracies and the timeline."""
        self.setup()
        if self.cfg.strategy == "fedavg":
            out = self.run_fedavg()
        elif self.cfg.strategy == "smartfreeze":
            out = self.run_smartfreeze()
        else:
            raise ValueError(f"the plain loop implements fedavg and smartfreeze, not {self.cfg.strategy!r}")
        self.mark("done")
        out["timeline"] = dict(self.marks)
        out["torch-threads"] = {"client": self.client_threads, "server": self.server_threads}
        return out


def run_plain(
    args: argparse.Namespace, flat: dict[str, Any], replay: list[dict[str, Any]] | None, label: str
) -> tuple[Phase, dict[str, Any]]:
    """Run the plain loop in a fresh process; return the phase and the loop's result."""
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec = {
            "config": flat,
            "num-partitions": args.supernodes,
            "client-threads": args.plain_threads or flat["client-threads"],
            "server-threads": args.plain_server_threads,
            "replay": replay,
        }
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "bench.overhead", "--plain-worker", str(spec_path), str(out_path)]
        print("[overhead] plain loop: one process, same clients, data, model, rounds and seeds", flush=True)
        phase = run_measured("plain", cmd, dict(os.environ), None, args.interval, RUNS_DIR / f"{label}-plain.log")
        if phase.returncode != 0:
            tail = "\n".join(line for _, line in phase.lines[-30:])
            raise RuntimeError(f"plain loop failed (exit {phase.returncode})\n{tail}")
        return phase, json.loads(out_path.read_text())


# ---------------------------------------------------------------------------------------------- report
def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None."""
    return a / b if a is not None and b else None


def compare_rounds(sim_rows: list[dict[str, Any]], plain_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-round agreement of the two runs: participants, accuracies."""
    sim = {int(r["round"]): r for r in sim_rows}
    diffs, same_participants = [], True
    for r in plain_rows:
        s = sim.get(int(r["round"]))
        if s is None:
            continue
        if s.get("server-accuracy") is not None:
            diffs.append(abs(s["server-accuracy"] - r["server-accuracy"]))
        if r["round"] > 0 and sorted(s.get("participant-ids", [])) != sorted(r.get("participant-ids", [])):
            same_participants = False
    return {
        "same-participants-every-round": same_participants,
        "max-abs-accuracy-difference-points": 100 * max(diffs, default=0.0),
        "identical-accuracy-every-round": all(d == 0 for d in diffs),
    }


def build_result(
    args: argparse.Namespace,
    flat: dict[str, Any],
    sim: Phase,
    doc: dict[str, Any],
    plain: Phase,
    out: dict[str, Any],
    run_dir: Path,
) -> dict[str, Any]:
    """Everything measured, as one JSON-serialisable dict."""
    sim_rounds = [r for r in doc["rounds"] if r["round"] > 0]
    plain_rounds = [r for r in out["rounds"] if r["round"] > 0]
    sim_round_s = sum(float(r["round-seconds"]) for r in sim_rounds)
    plain_round_s = sum(float(r["round-seconds"]) for r in plain_rounds)
    s, p = phase_summary(sim), phase_summary(plain)
    timeline = simulation_timeline(sim, run_dir, doc)
    window = (sim.t0 + (timeline["round-1-started"] or 0.0), sim.t0 + (timeline["last-round-ended"] or sim.wall))
    assert sim.sampler is not None
    rounds_cpu = sim.sampler.cpu_between(*window)
    sim_acc, plain_acc = doc["summary"]["final-accuracy"], out["final-accuracy"]
    ncpu = psutil.cpu_count() or 1
    actors = max(1, ncpu // args.cpus_per_client)
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "date-utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "workload": {
            "strategy": args.strategy,
            "data": flat["data-path"],
            "clients": args.supernodes,
            "per-round": math.ceil(flat["fraction-train"] * args.supernodes),
            "rounds": flat["num-rounds"],
            "model": f"{flat['model']} width {flat['width']}",
            "seed": flat["seed"],
            "cpus-per-client": args.cpus_per_client,
            "concurrent-actors": min(actors, args.supernodes),
            "run-config": workload_config(args, run_dir),
            "resolved-config": flat,
        },
        "torch-threads": {
            "simulation-clients": flat["client-threads"],
            "plain-clients": out["torch-threads"]["client"],
            "plain-server": out["torch-threads"]["server"],
        },
        "simulation": {
            **s,
            "rounds-seconds": sim_round_s,
            "per-round-seconds": [float(r["round-seconds"]) for r in sim_rounds],
            "startup-and-teardown-seconds": sim.wall - sim_round_s,
            "timeline-seconds": timeline,
            "rounds-window-cpu-seconds-by-group": rounds_cpu,
            "rounds-cpu-seconds": sum(rounds_cpu.values()),
            "final-accuracy": sim_acc,
            "server-accuracy-per-round": [r.get("server-accuracy") for r in doc["rounds"]],
            "client-accuracy-per-round": [r.get("client-accuracy") for r in sim_rounds],
            "stages": doc["summary"].get("stages"),
            "run-dir": str(run_dir),
        },
        "plain": {
            **p,
            "rounds-seconds": plain_round_s,
            "per-round-seconds": [r["round-seconds"] for r in plain_rounds],
            "per-round-cpu-seconds": [r["round-cpu-seconds"] for r in plain_rounds],
            "rounds-cpu-seconds": sum(r["round-cpu-seconds"] for r in plain_rounds),
            "startup-and-teardown-seconds": plain.wall - plain_round_s,
            "timeline-seconds": out["timeline"],
            "final-accuracy": plain_acc,
            "server-accuracy-per-round": [r["server-accuracy"] for r in out["rounds"]],
            "client-accuracy-per-round": [r.get("client-accuracy") for r in plain_rounds],
            **{k: v for k, v in out.items() if k.startswith("own-freeze")},
        },
        "ratios": {
            "wall-total": ratio(sim.wall, plain.wall),
            "wall-rounds": ratio(sim_round_s, plain_round_s),
            "cpu-seconds": ratio(s["cpu-seconds"], p["cpu-seconds"]),
            "cpu-seconds-rounds": ratio(sum(rounds_cpu.values()), sum(r["round-cpu-seconds"] for r in plain_rounds)),
            "peak-pss": ratio(s["peak-pss-mb"], p["peak-pss-mb"]),
            "peak-uss": ratio(s["peak-uss-mb"], p["peak-uss-mb"]),
        },
        "agreement": {
            "final-accuracy-difference-points": 100 * (sim_acc - plain_acc),
            "within-1-point": abs(sim_acc - plain_acc) <= 0.01,
            **compare_rounds(doc["rounds"], out["rounds"]),
        },
        "targets": {
            "wall-ratio": TARGET_WALL_RATIO,
            "memory-ratio": TARGET_MEMORY_RATIO,
            "flower-minimal-example": FLOWER_EXAMPLE,
            "wall-met": (ratio(sim.wall, plain.wall) or math.inf) <= TARGET_WALL_RATIO,
            "memory-met": (ratio(s["peak-pss-mb"], p["peak-pss-mb"]) or math.inf) <= TARGET_MEMORY_RATIO,
        },
    }


def _f(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "—" if value is None else f"{value:,.{digits}f}{suffix}"


def table(res: dict[str, Any]) -> str:
    """The human-readable report of one result."""
    w, s, p, r, a = res["workload"], res["simulation"], res["plain"], res["ratios"], res["agreement"]
    th = res["torch-threads"]
    n = w["rounds"]
    lines = [
        f"Simulation overhead — {w['strategy']}, {Path(w['data']).name}, {w['clients']} clients ({w['per-round']} per "
        f"round), {n} rounds, {w['model']}, seed {w['seed']}; {res['date']}",
        f"simulation: run.sh run --supernodes {w['clients']} --cpus-per-client {w['cpus-per-client']} "
        f"({w['concurrent-actors']} ClientApp actors at once); torch threads: clients {th['simulation-clients']} "
        f"(client-threads) in both, plain-loop server evaluation {th['plain-server']}",
        "",
        f"{'':34}{'simulation':>12}{'plain':>12}{'sim/plain':>12}",
        f"{'wall total (s)':34}{_f(s['wall-seconds']):>12}{_f(p['wall-seconds']):>12}{_f(r['wall-total'], 2, 'x'):>12}",
        f"{'  start-up + teardown (s)':34}{_f(s['startup-and-teardown-seconds']):>12}"
        f"{_f(p['startup-and-teardown-seconds']):>12}{'':>12}",
        f"{'  rounds (s)':34}{_f(s['rounds-seconds']):>12}{_f(p['rounds-seconds']):>12}"
        f"{_f(r['wall-rounds'], 2, 'x'):>12}",
        f"{'  per round, mean (s)':34}{_f(s['rounds-seconds'] / n, 2):>12}{_f(p['rounds-seconds'] / n, 2):>12}{'':>12}",
        f"{'CPU time, all processes (s)':34}{_f(s['cpu-seconds']):>12}{_f(p['cpu-seconds']):>12}"
        f"{_f(r['cpu-seconds'], 2, 'x'):>12}",
        f"{'  in the rounds (s)':34}{_f(s['rounds-cpu-seconds']):>12}{_f(p['rounds-cpu-seconds']):>12}"
        f"{_f(r['cpu-seconds-rounds'], 2, 'x'):>12}",
        f"{'peak PSS, summed (MB)':34}{_f(s['peak-pss-mb'], 0):>12}{_f(p['peak-pss-mb'], 0):>12}"
        f"{_f(r['peak-pss'], 2, 'x'):>12}",
        f"{'peak USS, summed (MB)':34}{_f(s['peak-uss-mb'], 0):>12}{_f(p['peak-uss-mb'], 0):>12}"
        f"{_f(r['peak-uss'], 2, 'x'):>12}",
        f"{'processes (at most at once)':34}{s['peak-processes']:>12}{p['peak-processes']:>12}{'':>12}",
        f"{'final accuracy (%)':34}{_f(100 * s['final-accuracy'], 2):>12}{_f(100 * p['final-accuracy'], 2):>12}"
        f"{_f(a['final-accuracy-difference-points'], 2, ' pt'):>12}",
        "",
        f"agreement: same participants every round: {a['same-participants-every-round']}; identical server accuracy "
        f"every round: {a['identical-accuracy-every-round']} "
        f"(max difference {a['max-abs-accuracy-difference-points']:.2f} pt)",
        f"targets: wall <= {TARGET_WALL_RATIO}x: {'met' if res['targets']['wall-met'] else 'NOT met'}; memory <= "
        f"{TARGET_MEMORY_RATIO}x: {'met' if res['targets']['memory-met'] else 'NOT met'} (Flower's minimal FedAvg "
        f"example here: {FLOWER_EXAMPLE['wall-ratio']}x wall, ~{FLOWER_EXAMPLE['startup-seconds']:.0f} s start-up, "
        f"~{FLOWER_EXAMPLE['memory-ratio']}x memory)",
        f"machine load: load average {s['load-average-before'][0]:.2f} before / {s['load-average-after'][0]:.2f} after "
        f"the simulation, {p['load-average-after'][0]:.2f} after the plain loop; CPU used by other processes: "
        f"{100 * (s['foreign-cpu-share'] or 0):.0f} % of the machine during the simulation, "
        f"{100 * (p['foreign-cpu-share'] or 0):.0f} % during the plain loop; sampler: "
        f"{s['sampler-cpu-seconds']:.1f} + {p['sampler-cpu-seconds']:.1f} CPU s",
        "",
        "simulation timeline (s after launch): "
        + ", ".join(f"{k} {v:.1f}" for k, v in s["timeline-seconds"].items() if v is not None),
        "plain-loop timeline (s after process start): "
        + ", ".join(f"{k} {v:.1f}" for k, v in p["timeline-seconds"].items()),
        "simulation peak PSS by process group (MB): "
        + ", ".join(f"{g} {v:.0f}" for g, v in s["peak-pss-by-group-mb"].items()),
        "simulation CPU s by process group: " + ", ".join(f"{g} {v:.1f}" for g, v in s["cpu-seconds-by-group"].items()),
        "  of which during the rounds: "
        + ", ".join(f"{g} {v:.1f}" for g, v in s["rounds-window-cpu-seconds-by-group"].items()),
    ]
    if "own-freeze-decisions-agree" in p:
        lines.append(
            f"SmartFreeze: replayed stages {s['stages']}; the plain loop's own pace/stage decisions agree: "
            f"{p['own-freeze-decisions-agree']} {p.get('own-freeze-disagreements') or ''}"
        )
    return "\n".join(lines)


def save(res: dict[str, Any], label: str, path: Path, machine: dict[str, Any]) -> None:
    """Merge ``res`` under ``label`` into the JSON file (other labels are kept)."""
    doc: dict[str, Any] = {}
    if path.exists():
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError:
            doc = {}
    doc.setdefault("results", {})[label] = {**res, "machine": machine}
    doc.update({"benchmark": "overhead", "machine": machine, "date": res["date"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="Flower/Ray simulation vs the same work in one plain PyTorch loop")
    parser.add_argument("--strategy", default="fedavg", choices=("fedavg", "smartfreeze"))
    parser.add_argument("--data", default=DEFAULT_DATA, help="npz dataset (relative to the project)")
    parser.add_argument("--supernodes", type=int, default=20, help="simulated clients (= partitions)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--fraction-train", type=float, default=0.5)
    parser.add_argument("--model", default="resnet10")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-config", default="", help="extra run-config overrides for both runs")
    parser.add_argument("--cpus-per-client", type=int, default=1, help="run.sh --cpus-per-client (Ray actors)")
    parser.add_argument("--plain-threads", type=int, default=None, help="plain-loop client threads (client-threads)")
    parser.add_argument(
        "--plain-server-threads", type=int, default=None, help="plain-loop server threads (torch's default)"
    )
    parser.add_argument("--interval", type=float, default=0.5, help="PSS sampling interval (s)")
    parser.add_argument("--label", default=None, help="key of this result in the JSON (default: the strategy)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--plain-worker", nargs=2, type=Path, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run both measurements, print the table, save the JSON."""
    args = parse_args(argv)
    if args.plain_worker:
        return plain_worker(*args.plain_worker)
    label = args.label or args.strategy
    run_dir = RUNS_DIR / label
    config = workload_config(args, run_dir)
    try:
        flat = resolve_config(config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if flat["device-profile"] != "none":
        print("error: the plain loop assumes every client fits (device-profile='none')", file=sys.stderr)
        return 2
    machine = machine_info()
    print(f"[overhead] load average {os.getloadavg()[0]:.2f} on {machine['logical-cpus']} CPUs", flush=True)
    tag = uuid.uuid4().hex
    sim, doc = run_simulation(args, config, run_dir, tag)
    mismatched = {k for k, v in flat.items() if doc["config"].get(k) != v}
    if mismatched:
        print(f"[overhead] warning: the simulation resolved {sorted(mismatched)} differently", file=sys.stderr)
    replay = None
    if args.strategy == "smartfreeze":
        replay = [
            {"round": r["round"], "stage": r["stage"], "participant-ids": r["participant-ids"]}
            for r in doc["rounds"]
            if r["round"] > 0
        ]
    plain, out = run_plain(args, flat, replay, label)
    res = build_result(args, flat, sim, doc, plain, out, run_dir)
    print()
    print(table(res))
    save(res, label, args.json, machine)
    print(f"\n[overhead] wrote {args.json} (entry {label!r}); logs in {RUNS_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
