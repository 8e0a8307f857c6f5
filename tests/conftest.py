"""Shared test helpers: free ports, process handling and app env (end-to-end tests); strategies with fake nodes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path, output_dir: Path) -> dict[str, str]:
    """Environment for Flower processes started by a test: isolated FLWR_HOME, no telemetry."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        RAY_USAGE_STATS_ENABLED="0",
        PROGFL_OUTPUT_DIR=str(output_dir),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


class Processes:
    """Processes started by a test, each in its own session; all stopped by PID at teardown."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError):  # children left in the session (superexec, apps)
                os.killpg(proc.pid, signal.SIGTERM)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait until the SuperLink's HTTP health endpoint answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"SuperLink exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"SuperLink on port {port} not healthy after {timeout} s")


def write_connection(flwr_home: Path, name: str, port: int) -> None:
    """A SuperLink connection in $FLWR_HOME/config.toml."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )


SMALL_SYNTHETIC = {"model": "smallcnn", "synthetic-train-size": 200, "synthetic-test-size": 50}
"""Run-config overrides for strategy unit tests: the small CNN on a tiny synthetic set."""


def strategy_with_nodes(
    cls: type,
    run_dir: Path,
    budgets: list[float],
    node_offset: int = 100,
    examples: int = 50,
    examples_step: int = 0,
    **over: object,
):
    """Strategy ``cls`` on :data:`SMALL_SYNTHETIC` (+ ``over``) with fake nodes, no Flower.

    Node ``pid`` (0..len(budgets)-1) has node id ``node_offset + pid``, ``examples + examples_step * pid``
    training examples, memory budget ``budgets[pid]`` MB and a seeded speed of 1-5 GFLOP/s.
    """
    import numpy as np

    from common.config import parse_run_config
    from server_app.outputs import RunRecorder
    from server_app.strategy import NodeInfo

    cfg = parse_run_config({**SMALL_SYNTHETIC, "strategy": cls.name, **over})
    strategy = cls(cfg, RunRecorder(cfg, run_dir), 10)
    rng = np.random.default_rng(0)
    for pid, mb in enumerate(budgets):
        speed = float(rng.uniform(1e9, 5e9))
        strategy.nodes[pid] = NodeInfo(node_offset + pid, pid, examples + examples_step * pid, mb, speed)
    return strategy
