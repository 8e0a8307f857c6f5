"""The simulation attaches to an existing Ray cluster: a head and one worker node on localhost.

``ray start --head`` plus ``ray start --address`` (one CPU each, private ``--temp-dir``) form a
two-node cluster; ``./run.sh run --ray-address`` then runs the simulation's ClientApp actors on it:
with one CPU per client, Flower's actor pool puts one actor on each node. The cluster is stopped by
PID (every process whose command line names the private temp dir), never with ``ray stop``, which
would stop every Ray process of the user, other simulations included.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import BIN, ROOT, free_port

pytestmark = pytest.mark.slow

SMALL = "model='smallcnn' synthetic-train-size=600 synthetic-test-size=200 batch-size=32"


def _cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """Processes of the cluster: every process whose command line names ``temp_dir``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(temp_dir in arg for arg in proc.info["cmdline"] or []):
                found.append(proc)
    return found


def _raylets(temp_dir: str) -> dict[int, str]:
    """PID -> 'head' or 'worker' for the cluster's raylets."""
    out = {}
    for proc in _cluster_processes(temp_dir):
        with contextlib.suppress(psutil.Error):
            cmd = proc.cmdline()
            if Path(cmd[0]).name == "raylet":
                out[proc.pid] = "head" if "--head" in cmd else "worker"
    return out


def _stop(temp_dir: str) -> None:
    """SIGTERM, then SIGKILL, every process of the cluster (and the raylets' worker processes)."""
    procs = _cluster_processes(temp_dir)
    for raylet in list(procs):
        with contextlib.suppress(psutil.Error):
            procs += raylet.children(recursive=True)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def ray_cluster() -> Iterator[tuple[str, str]]:
    """A head and a worker node on localhost, one CPU each; yields (address, temp dir)."""
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    common = ["--num-cpus", "1", "--object-store-memory", str(150 * 2**20), "--disable-usage-stats"]
    try:
        subprocess.run(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(port),
                "--temp-dir",
                temp_dir,
                "--include-dashboard",
                "false",
                "--ray-client-server-port",
                str(free_port()),
                "--dashboard-agent-listen-port",
                str(free_port()),
                *common,
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        address = f"127.0.0.1:{port}"
        subprocess.run(
            [
                str(BIN / "ray"),
                "start",
                "--address",
                address,
                "--node-ip-address",
                "127.0.0.1",
                "--dashboard-agent-listen-port",
                str(free_port()),
                *common,
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        deadline = time.monotonic() + 30
        while sorted(_raylets(temp_dir).values()) != ["head", "worker"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert sorted(_raylets(temp_dir).values()) == ["head", "worker"]
        yield address, temp_dir
    finally:
        _stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_simulation_runs_on_an_existing_two_node_cluster(tmp_path: Path, ray_cluster: tuple[str, str]) -> None:
    address, temp_dir = ray_cluster
    raylets = _raylets(temp_dir)
    actors: dict[int, str] = {}  # actor PID -> node kind of its raylet
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for pid, kind in raylets.items():
                with contextlib.suppress(psutil.Error):
                    for child in psutil.Process(pid).children():
                        with contextlib.suppress(psutil.Error):
                            if child.cmdline()[0].startswith("ray::ClientAppActor"):
                                actors[child.pid] = kind
            done.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        res = subprocess.run(
            [
                str(ROOT / "run.sh"),
                "run",
                "--supernodes",
                "4",
                "--ray-address",
                address,
                "--run-config",
                f"{SMALL} num-rounds=2 run-name='ray-cluster' output-dir='{tmp_path}' min-available-nodes=4",
            ],
            env={**os.environ, "PROGFL_OUTPUT_DIR": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        done.set()
        watcher.join()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"clients run on the Ray cluster at {address}" in res.stderr
    doc = json.loads((tmp_path / "ray-cluster" / "metrics.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2]
    assert all(r["participants"] == 4 and r["failures"] == 0 for r in doc["rounds"][1:])
    assert sorted(set(actors.values())) == ["head", "worker"], actors  # one actor per node
    # the cluster outlives the run; the run's actors do not
    assert sorted(_raylets(temp_dir).values()) == ["head", "worker"]
    deadline = time.monotonic() + 20
    while any(psutil.pid_exists(pid) for pid in actors) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(psutil.pid_exists(pid) for pid in actors)
