"""End-to-end runs through Flower: simulation via run.sh, and a deployment on localhost."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import BIN, ROOT, Processes, flower_env, free_port, wait_healthy, write_connection

pytestmark = pytest.mark.slow

SMALL = "model='smallcnn' synthetic-train-size=600 synthetic-test-size=200 batch-size=32"


def _flower_leftovers(marker: str) -> list[str]:
    """Flower/Ray processes whose environment holds ``marker`` (i.e. started by this test's run.sh)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    names = ("flower-superlink", "flower-supernode", "flwr-simulation", "raylet", "gcs_server", "ray::")
    found = []
    for line in out.splitlines():
        if not any(k in line for k in names):
            continue
        try:
            environ = Path(f"/proc/{line.split()[0]}/environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in environ:
            found.append(line)
    return found


def test_run_sh_rejects_bad_config_before_starting_anything() -> None:
    res = subprocess.run(
        [str(ROOT / "run.sh"), "run", "--run-config", "strategy='nope'"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2
    assert "strategy='nope'" in res.stderr and "valid choices: fedavg" in res.stderr
    res = subprocess.run(
        [str(ROOT / "run.sh"), "run", "--run-config", "dataset='npz' data-path='/nonexistent/x.npz'"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "/nonexistent/x.npz" in res.stderr


def test_simulation_via_run_sh_learns_and_cleans_up(tmp_path: Path) -> None:
    env = {**os.environ, "PROGFL_OUTPUT_DIR": str(tmp_path)}  # marks every process this run starts
    res = subprocess.run(
        [
            str(ROOT / "run.sh"),
            "run",
            "--supernodes",
            "3",
            "--run-config",
            f"{SMALL} num-rounds=3 run-name='e2e-sim' output-dir='{tmp_path}' min-train-nodes=3 min-available-nodes=3",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "round 3/3" in res.stdout
    # by default (verbose=false) no Ray/Flower/profiler chatter, one readable progress line per round
    lines = res.stdout.splitlines()
    noise = r"INFO|WARNING|USDT|ClientAppActor|raylet|\(pid=\d+"  # Flower logs, kineto, Ray workers' output
    assert [ln for ln in lines if re.search(noise, ln)] == [], res.stdout
    assert [ln.split("|")[0].strip() for ln in lines if ln.startswith("[fedavg] round")] == [
        f"[fedavg] round {r}/3" for r in (1, 2, 3)
    ]
    doc = json.loads((tmp_path / "e2e-sim" / "metrics.json").read_text())
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert all(r["participants"] == 3 and r["failures"] == 0 for r in rounds[1:])
    assert all(r["bytes-down"] > 0 and r["bytes-up"] > 0 for r in rounds[1:])
    assert [r["exchanges"] for r in rounds[1:]] == [2, 2, 1]  # train + evaluate; the last round's evaluation ...
    assert rounds[-1]["final-evaluate-seconds"] > 0 and rounds[-1]["client-accuracy"] is not None  # ... is apart
    assert doc["summary"]["final-accuracy"] > 0.3  # chance is 0.1
    assert doc["summary"]["participation-rate"] == 1.0
    for name in ("metrics.csv", "config.json", "accuracy.png", "model.pt"):
        assert (tmp_path / "e2e-sim" / name).stat().st_size > 0
    state = torch.load(tmp_path / "e2e-sim" / "model.pt", weights_only=True)
    assert "head.2.weight" in state
    deadline = time.monotonic() + 20  # Ray workers exit on their own once their parent is gone
    while _flower_leftovers(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(1)
    assert _flower_leftovers(str(tmp_path)) == []


def test_deployment_on_localhost_one_round(tmp_path: Path, processes: Processes) -> None:
    flwr_home = tmp_path / "flwr-home"
    out = tmp_path / "outputs"
    env = flower_env(flwr_home, out)
    port = free_port()
    link = processes.start(
        "superlink",
        [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port)],
        env,
        tmp_path,
    )
    wait_healthy(port, link)
    for i in range(2):
        processes.start(
            f"supernode-{i}",
            [
                str(BIN / "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{port}",
                "--node-config",
                f"partition-id={i} num-partitions=2",
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
            ],
            env,
            tmp_path,
        )
    write_connection(flwr_home, "deploy", port)
    res = subprocess.run(
        [
            str(BIN / "flwr"),
            "run",
            str(ROOT),
            "deploy",
            "--stream",
            "--run-config",
            f"{SMALL} num-rounds=1 run-name='e2e-deploy' output-dir='{out}' fraction-evaluate=1.0 node-wait-seconds=60",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "round 1/1" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:] + processes.log("supernode-0")[-2000:]
    doc = json.loads((out / "e2e-deploy" / "metrics.json").read_text())
    last = doc["rounds"][-1]
    assert last["round"] == 1 and last["participants"] == 2 and last["failures"] == 0
    assert last["client-accuracy"] is not None and last["exchanges"] == 1 and last["final-evaluate-seconds"] > 0
    assert doc["summary"]["num-nodes"] == 2
    processes.stop_all()
    assert all(p.poll() is not None for p in processes.procs)


def test_smartfreeze_simulation_goes_through_every_stage(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            str(ROOT / "run.sh"),
            "run",
            "--supernodes",
            "3",
            "--run-config",
            f"{SMALL.replace('smallcnn', 'resnet10')} strategy='smartfreeze' num-rounds=8 min-stage-rounds=2 "
            f"run-name='e2e-sf' output-dir='{tmp_path}'",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run_dir = tmp_path / "e2e-sf"
    doc = json.loads((run_dir / "metrics.json").read_text())
    rows = doc["rounds"][1:]
    assert [r["stage"] for r in rows] == [1, 1, 2, 2, 3, 3, 4, 4]  # resnet10 has 4 blocks
    assert [s["stage"] for s in doc["summary"]["stages"]] == [1, 2, 3, 4]
    assert doc["summary"]["stages"][-1]["end-round"] == 8
    assert doc["summary"]["final-accuracy"] > 0.15  # chance 0.1; 2 rounds per block on 600 images
    # uploads carry only the active block + output module: less than the full model per client
    full = sum(v.numel() * v.element_size() for v in torch.load(run_dir / "model.pt", weights_only=True).values())
    assert all(0 < r["bytes-up"] / r["participants"] < full for r in rows)
    assert rows[2]["bytes-down"] > rows[3]["bytes-down"]  # first round of stage 2 also ships frozen block 1
    pace = json.loads((run_dir / "pace.json").read_text())
    assert len(pace["pace"]) == 8 and pace["stages"]["stage"] == 3
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert not any(k.startswith("outmod.") for k in state) and "head.2.weight" in state


def test_simulation_survives_failing_and_hostile_clients(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            str(ROOT / "run.sh"),
            "run",
            "--supernodes",
            "4",
            "--run-config",
            f"{SMALL} num-rounds=4 fault-rate=0.4 fault-mode='mixed' min-train-nodes=1 run-name='e2e-faults' "
            f"output-dir='{tmp_path}'",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((tmp_path / "e2e-faults" / "metrics.json").read_text())
    rows = doc["rounds"][1:]
    assert len(rows) == 4
    assert sum(r["failures"] for r in rows) > 0  # raised or rejected replies were dropped ...
    assert all(r["participants"] + r["failures"] == 4 for r in rows)  # ... and the rest aggregated
    assert doc["summary"]["final-accuracy"] > 0.1


def test_every_strategy_runs_and_compare_writes_the_table(tmp_path: Path) -> None:
    from common.config import STRATEGY_NAMES

    overrides = {"profl": "min-stage-rounds=1"}  # ProFL: 2 phases x 3 blocks must fit the smoke's 6 rounds
    entries = [f"{s}=strategy='{s}' {overrides[s]}" if s in overrides else s for s in STRATEGY_NAMES]
    res = subprocess.run(
        [
            str(ROOT / "run.sh"),
            "bench",
            "compare",
            "--scenario",
            "smoke",
            "--entries",
            *entries,
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = json.loads((tmp_path / "comparison.json").read_text())
    assert [r["entry"] for r in table["rows"]] == list(STRATEGY_NAMES)
    assert table["seeds"] == [0] and list(table["runs"]) == list(STRATEGY_NAMES)
    for (row,) in table["runs"].values():
        assert row["seed"] == 0 and row["final-accuracy"] is not None, row
        assert row["bytes-moved"] > 0 or row["participation-rate"] == 0, row  # nobody fits: nothing sent
        assert (tmp_path / "runs" / row["entry"] / "seed-0" / "metrics.csv").is_file()
        assert (tmp_path / "runs" / row["entry"] / "seed-0" / "report.html").is_file()
    assert (tmp_path / "comparison.md").read_text().count("\n|") >= len(STRATEGY_NAMES) + 1
    assert (tmp_path / "accuracy.png").stat().st_size > 0
