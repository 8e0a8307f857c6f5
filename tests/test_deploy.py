"""Edge deployment: node-config checks, ``run.sh deploy`` errors, TLS + SuperNode authentication, a node killed mid-run.

The slow tests start real SuperLinks and SuperNodes on localhost through ``run.sh deploy`` (free
ports, temporary certificates and FLWR_HOMEs) and stop every process by PID at teardown.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, Processes, flower_env, free_port

from common.node import (
    NodeConfigError,
    format_node_config,
    main,
    node_data_path,
    parse_node_config,
    supernode_node_config,
)

RUN_SH = str(ROOT / "run.sh")
SMALL = "model='smallcnn' synthetic-train-size=600 synthetic-test-size=200 batch-size=32 strategy='fedavg'"


def _npz(path: Path, keys: tuple[str, ...] = ("x_train", "y_train", "x_test", "y_test")) -> Path:
    np.savez(path, **{k: np.zeros((4, 8, 8, 3) if k.startswith("x") else 4, np.uint8) for k in keys})
    return path


# ---------------------------------------------------------------- node config (fast)
def test_node_config_string_parses_and_refuses_what_flower_would_drop() -> None:
    assert parse_node_config('partition-id=0 num-partitions=2 memory-mb=512.5 name="pi 4"') == {
        "partition-id": 0,
        "num-partitions": 2,
        "memory-mb": 512.5,
        "name": "pi 4",
    }
    assert parse_node_config("") == {}
    with pytest.raises(NodeConfigError, match="'partition-id' is not key=value"):
        parse_node_config("partition-id 0")
    with pytest.raises(NodeConfigError, match="'=3' is not key=value"):
        parse_node_config("=3")
    with pytest.raises(NodeConfigError, match="malformed"):
        parse_node_config("memory-mb=1GB")
    with pytest.raises(NodeConfigError, match="malformed"):
        parse_node_config('name="unterminated')


def test_supernode_config_validates_every_value_and_names_it(tmp_path: Path) -> None:
    cfg = supernode_node_config("1", "3", "2048", None, "")
    assert cfg == {"partition-id": 1, "num-partitions": 3, "memory-mb": 2048.0}
    with pytest.raises(NodeConfigError, match=r"partition-id=3 outside range \[0, 2\]"):
        supernode_node_config("3", "3")
    with pytest.raises(NodeConfigError, match="partition-id='one' is not an integer"):
        supernode_node_config("one", "3")
    with pytest.raises(NodeConfigError, match="memory-mb='2GB' is not a number"):
        supernode_node_config("0", "3", "2GB")
    with pytest.raises(NodeConfigError, match="memory-mb='-5' must be a positive number"):
        supernode_node_config("0", "3", "-5")
    with pytest.raises(NodeConfigError, match="repeats \\['partition-id'\\]"):
        supernode_node_config("0", "3", None, None, "partition-id=1")
    missing = str(tmp_path / "none.npz")
    with pytest.raises(NodeConfigError, match=f"data-path='{missing}': no such file"):
        supernode_node_config("0", "3", "100", missing)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(NodeConfigError, match="not a readable .npz"):
        supernode_node_config("0", "3", "100", str(tmp_path / "junk.npz"))
    partial = _npz(tmp_path / "partial.npz", ("x_train", "y_train"))
    with pytest.raises(NodeConfigError, match=r"missing arrays \['x_test', 'y_test'\]"):
        supernode_node_config("0", "3", "100", str(partial))
    good = _npz(tmp_path / "good.npz")
    assert supernode_node_config("0", "3", "100", str(good), "speed=2")["data-path"] == str(good)


def test_budget_defaults_to_available_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    class Mem:
        available = 3 * 2**30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem())
    assert supernode_node_config("0", "1")["memory-mb"] == 3072.0


def test_unreadable_data_path_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    path = _npz(tmp_path / "secret.npz")
    path.chmod(0)
    with pytest.raises(NodeConfigError, match="not readable"):
        node_data_path({"data-path": str(path)})


def test_node_data_path_is_optional_and_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert node_data_path({"partition-id": 0}) is None
    _npz(tmp_path / "d.npz")
    monkeypatch.chdir(tmp_path)
    assert node_data_path({"data-path": "d.npz"}) == str(tmp_path / "d.npz")
    with pytest.raises(NodeConfigError, match="non-empty path"):
        node_data_path({"data-path": 3})


def test_cli_prints_a_node_config_flower_reads_back(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = _npz(tmp_path / "d.npz")
    assert main(["--partition-id", "2", "--num-partitions", "4", "--memory-mb", "900", "--data-path", str(data)]) == 0
    printed = capsys.readouterr().out.strip()
    assert parse_node_config(printed) == {
        "partition-id": 2,
        "num-partitions": 4,
        "memory-mb": 900.0,
        "data-path": str(data),
    }
    assert main(["--partition-id", "5", "--num-partitions", "4"]) == 2
    assert "partition-id=5 outside range" in capsys.readouterr().err
    with pytest.raises(NodeConfigError, match="double quote"):
        format_node_config({"name": 'a"b'})


def test_client_reads_the_dataset_from_the_nodes_data_path(tmp_path: Path) -> None:
    """A device's ``data-path`` replaces the run config's (a path that exists only on the server)."""
    import tomllib

    from flwr.app import Context, RecordDict
    from flwr.common.config import flatten_dict

    from client_app.handlers import _setup

    rng = np.random.default_rng(0)
    local = tmp_path / "device-copy.npz"
    np.savez(
        local,
        x_train=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8),
        y_train=np.arange(40) % 4,
        x_test=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
        y_test=np.arange(8) % 4,
    )
    with open(ROOT / "pyproject.toml", "rb") as f:
        run_config = flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
    run_config.update({"dataset": "npz", "data-path": "/only/on/the/server.npz", "min-partition-size": 5})
    node = {"partition-id": 1, "num-partitions": 2, "data-path": str(local)}
    cfg, ident, data = _setup(Context(1, 7, node, RecordDict(), run_config))
    assert cfg.data_path == str(local) and ident.partition_id == 1
    assert len(data.y_train) + len(data.y_val) == 20 and data.num_classes == 4
    with pytest.raises(ValueError, match="/only/on/the/server.npz"):
        _setup(Context(1, 7, {"partition-id": 1, "num-partitions": 2}, RecordDict(), run_config))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["deploy"], "name what to start: superlink, supernode, register or run"),
        (["deploy", "superlink", "--port", "70000"], "--port must be a port number in 1..65535, got '70000'"),
        (
            ["deploy", "superlink", "--certs", "/nonexistent/certs"],
            "TLS is the default and '/nonexistent/certs/ca",
        ),
        (["deploy", "superlink", "--insecure", "--auth-keys", "k.pub"], "--auth-keys needs TLS"),
        (["deploy", "supernode", "--superlink", "nohost"], "--superlink must be HOST:PORT"),
        (["deploy", "supernode", "--superlink", "h:1"], "--partition-id I and --num-partitions N are required"),
        (
            ["deploy", "supernode", "--superlink", "h:1", "--partition-id", "4", "--num-partitions", "4", "--insecure"],
            r"partition-id=4 outside range \[0, 3\]",
        ),
        (
            ["deploy", "supernode", "--superlink", "h:1", "--partition-id", "0", "--num-partitions", "4"]
            + ["--memory-mb", "lots", "--insecure"],
            "memory-mb='lots' is not a number",
        ),
        (
            ["deploy", "supernode", "--superlink", "h:1", "--partition-id", "0", "--num-partitions", "2"]
            + ["--node-config", "gpu", "--insecure"],
            "'gpu' is not key=value",
        ),
        (
            ["deploy", "supernode", "--superlink", "h:1", "--partition-id", "0", "--num-partitions", "2"]
            + ["--data-path", "/nonexistent/d.npz", "--insecure"],
            "data-path='/nonexistent/d.npz': no such file",
        ),
        (
            ["deploy", "supernode", "--superlink", "h:1", "--partition-id", "0", "--num-partitions", "2"]
            + ["--root-cert", "/nonexistent/ca.crt"],
            "--root-cert '/nonexistent/ca.crt': no such readable file",
        ),
        (
            ["deploy", "supernode", "--superlink", "h:1", "--partition-id", "0", "--num-partitions", "2"]
            + ["--insecure", "--auth-key", "k"],
            "--auth-key needs TLS",
        ),
        (["deploy", "run", "--superlink", "h:1", "--insecure", "--run-config", "num-round=3"], "did you mean"),
    ],
)
def test_run_sh_deploy_rejects_bad_input_naming_it(args: list[str], message: str) -> None:
    res = subprocess.run([RUN_SH, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2, res.stdout + res.stderr
    assert re.search(message, res.stderr), res.stderr


# ---------------------------------------------------------------- deployments on localhost (slow)
def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 90.0) -> str:
    """Wait until ``text`` appears in the log at ``path``; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = path.read_text(errors="replace") if path.exists() else ""
        if text in log:
            return log
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before logging {text!r}:\n{log[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(
        f"{text!r} not logged within {timeout} s:\n{(path.read_text() if path.exists() else '')[-3000:]}"
    )


def _forget_deploy_homes(*ports: int) -> None:
    """Remove the FLWR_HOMEs run.sh deploy made for these ports (under .flwr/deploy)."""
    for port in ports:
        for role in ("superlink", "supernode"):
            shutil.rmtree(ROOT / ".flwr" / "deploy" / f"{role}-{port}", ignore_errors=True)


def _insecure_federation(
    processes: Processes, cwd: Path, env: dict[str, str], port: int, node_ports: list[int], extra: dict[int, list[str]]
) -> list[subprocess.Popen]:
    """A SuperLink (ready) and one SuperNode per port through ``run.sh deploy``, without TLS; ``extra``: per node."""
    link = processes.start(
        "superlink", [RUN_SH, "deploy", "superlink", "--host", "127.0.0.1", "--port", str(port), "--insecure"], env, cwd
    )
    _wait_for(cwd / "superlink.log", "SuperLink ready: http://127.0.0.1", link)
    return [
        processes.start(
            f"supernode-{i}",
            [RUN_SH, "deploy", "supernode", "--superlink", f"127.0.0.1:{port}", "--insecure"]
            + ["--partition-id", str(i), "--num-partitions", str(len(node_ports)), "--port", str(node_port)]
            + extra.get(i, []),
            env,
            cwd,
        )
        for i, node_port in enumerate(node_ports)
    ]


@pytest.mark.slow
def test_tls_with_authenticated_supernodes_and_an_unregistered_key_refused(
    tmp_path: Path, processes: Processes
) -> None:
    certs = tmp_path / "certs"
    res = subprocess.run(
        [str(ROOT / "scripts" / "make_certs.sh"), "--out", str(certs), "--nodes", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    out = tmp_path / "outputs"
    env = flower_env(tmp_path / "flwr-home", out)
    port, node_ports = free_port(), [free_port() for _ in range(3)]
    try:
        link = processes.start(
            "superlink",
            [RUN_SH, "deploy", "superlink", "--host", "127.0.0.1", "--port", str(port), "--certs", str(certs)]
            + ["--auth-keys", str(certs / "node-0.pub"), str(certs / "node-1.pub")],
            env,
            tmp_path,
        )
        log = _wait_for(tmp_path / "superlink.log", "SuperLink ready: https://127.0.0.1", link)
        assert "registered SuperNode key" in log and "node-2.pub" not in log
        common = ["--superlink", f"127.0.0.1:{port}", "--certs", str(certs), "--num-partitions", "2"]
        for i in range(2):
            processes.start(
                f"supernode-{i}",
                [RUN_SH, "deploy", "supernode", *common, "--partition-id", str(i), "--port", str(node_ports[i])]
                + ["--auth-key", str(certs / f"node-{i}")]
                + (["--memory-mb", "3000"] if i == 0 else []),
                env,
                tmp_path,
            )
        rogue = processes.start(
            "supernode-rogue",
            [RUN_SH, "deploy", "supernode", *common, "--partition-id", "1", "--port", str(node_ports[2])]
            + ["--auth-key", str(certs / "node-2")],
            env,
            tmp_path,
        )
        assert rogue.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in processes.log("supernode-rogue")
        run = subprocess.run(
            [RUN_SH, "deploy", "run", "--superlink", f"127.0.0.1:{port}", "--certs", str(certs), "--run-config"]
            + [f"{SMALL} num-rounds=1 run-name='tls' fraction-evaluate=1.0 node-wait-seconds=90"]
            + ["--run-config", "min-available-nodes=2 min-train-nodes=2"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + processes.log("supernode-0")[-2000:]
        assert "round 1/1" in run.stdout
        doc = json.loads((out / "tls" / "metrics.json").read_text())
        assert doc["config"]["device-profile"] == "measured"
        assert doc["summary"]["num-nodes"] == 2  # the rogue never joined
        last = doc["rounds"][-1]
        assert last["round"] == 1 and last["participants"] == 2 and last["failures"] == 0
        budgets = doc["summary"]["node-memory-mb"]
        # --memory-mb reaches the server via the query reply: under an OS limit (the worker's log says
        # which), the budget is what the limit leaves after the runtime's own memory, else all of it
        worker_log = (ROOT / ".flwr" / "deploy" / f"supernode-{node_ports[0]}" / "worker.log").read_text()
        if "enforced by cgroup" in worker_log:
            assert 1500.0 < budgets["0"] < 3000.0, worker_log[-2000:]
        else:
            assert "NO OS memory limit in force" in worker_log
            assert budgets["0"] == pytest.approx(3000.0)
        assert budgets["1"] > 100  # default: memory available on the device at start-up
        assert "Failed to activate" not in processes.log("supernode-1")
    finally:
        processes.stop_all()
        _forget_deploy_homes(port, *node_ports)
    assert all(p.poll() is not None for p in processes.procs)


@pytest.mark.slow
def test_run_finishes_when_a_supernode_is_killed_mid_run(tmp_path: Path, processes: Processes) -> None:
    out = tmp_path / "outputs"
    env = flower_env(tmp_path / "flwr-home", out)
    port, node_ports = free_port(), [free_port() for _ in range(3)]
    try:
        nodes = _insecure_federation(processes, tmp_path, env, port, node_ports, {})
        deadline = time.monotonic() + 120
        while (tmp_path / "superlink.log").read_text(errors="replace").count("Activated node_id") < 3:
            assert time.monotonic() < deadline, "the three SuperNodes did not connect within 120 s"
            time.sleep(0.5)
        run_log = tmp_path / "run.log"
        with open(run_log, "wb") as sink:
            run = subprocess.Popen(
                [RUN_SH, "deploy", "run", "--superlink", f"127.0.0.1:{port}", "--insecure", "--run-config"]
                + [f"{SMALL} num-rounds=3 run-name='kill' fraction-evaluate=0.0 node-wait-seconds=90"]
                + ["--run-config", "min-available-nodes=2 min-train-nodes=1 min-replies=1 round-timeout=60"],
                env=env,
                cwd=tmp_path,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            processes.procs.append(run)
            _wait_for(run_log, "round 1/3", run, timeout=300)
            os.killpg(nodes[2].pid, signal.SIGKILL)  # the device drops out: SuperNode and its ClientApp
            nodes[2].wait(timeout=10)
            rc = run.wait(timeout=600)
        assert rc == 0, run_log.read_text()[-4000:]
        doc = json.loads((out / "kill" / "metrics.json").read_text())
        rounds = [r for r in doc["rounds"] if r["round"] > 0]
        assert [r["round"] for r in rounds] == [1, 2, 3]
        assert rounds[0]["participants"] == 3, rounds
        later = rounds[1:]
        assert all(2 not in r["participant-ids"] for r in later)
        assert all(r["participants"] == 2 for r in later)  # the others' updates were aggregated
        assert later[0]["failures"] >= 1
    finally:
        processes.stop_all()
        _forget_deploy_homes(port, *node_ports)
    assert all(p.poll() is not None for p in processes.procs)


@pytest.mark.slow
def test_killing_a_worker_mid_message_costs_its_node_one_reply(tmp_path: Path, processes: Processes) -> None:
    """SIGKILL of a node's warm worker while it trains: that reply fails with the cause, the run completes.

    The supervisor restarts the worker; the node trains again in the next round.
    """
    out = tmp_path / "outputs"
    env = flower_env(tmp_path / "flwr-home", out)
    port, node_ports = free_port(), [free_port() for _ in range(2)]
    job = "model='resnet10' synthetic-train-size=3000 synthetic-test-size=200 batch-size=32 strategy='fedavg'"
    try:
        _insecure_federation(processes, tmp_path, env, port, node_ports, {})
        home = ROOT / ".flwr" / "deploy" / f"supernode-{node_ports[0]}"
        run_log = tmp_path / "run.log"
        with open(run_log, "wb") as sink:
            run = subprocess.Popen(
                [RUN_SH, "deploy", "run", "--superlink", f"127.0.0.1:{port}", "--insecure", "--run-config"]
                + [f"{job} num-rounds=3 run-name='wkill' fraction-evaluate=0.0 node-wait-seconds=90"]
                + ["--run-config", "min-available-nodes=2 min-train-nodes=1 min-replies=1 round-timeout=120"],
                env=env,
                cwd=tmp_path,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            processes.procs.append(run)
            node_log = tmp_path / "supernode-0.log"
            deadline = time.monotonic() + 300
            # messages node 0 received: the start-up query, round 1's and round 2's train messages
            while node_log.read_text(errors="replace").count("Received successfully") < 3:
                assert run.poll() is None and time.monotonic() < deadline, "node 0 got no round-2 message"
                time.sleep(0.1)
            time.sleep(1.5)  # the ClientApp has relayed the message: the worker is training
            worker_pid = int((home / "worker" / "worker.sock.pid").read_text())
            os.kill(worker_pid, signal.SIGKILL)
            rc = run.wait(timeout=600)
        assert rc == 0, run_log.read_text()[-4000:]
        doc = json.loads((out / "wkill" / "metrics.json").read_text())
        rounds = [r for r in doc["rounds"] if r["round"] > 0]
        assert [r["round"] for r in rounds] == [1, 2, 3]
        assert [r["failures"] for r in rounds] == [0, 1, 0], rounds
        assert 0 not in rounds[1]["participant-ids"] and 0 in rounds[2]["participant-ids"]
        assert f"worker pid {worker_pid}" in run_log.read_text() and "killed by SIGKILL" in run_log.read_text()
        deaths = (home / "worker" / "worker.sock.deaths").read_text().splitlines()
        assert [json.loads(line)["pid"] for line in deaths] == [worker_pid]
    finally:
        processes.stop_all()
        _forget_deploy_homes(port, *node_ports)
    assert all(p.poll() is not None for p in processes.procs)


LIMIT = 665
"""Node 0's OS memory limit (MB) in the test below: midway between SmartFreeze's stage-1 peak and the full model's."""


@pytest.mark.slow
def test_a_node_under_an_os_limit_trains_smartfreeze_stages_and_the_full_model_is_refused(
    tmp_path: Path, processes: Processes
) -> None:
    """Node 0 under an OS memory limit between SmartFreeze's stage-1 need and the full model's (real memory).

    VGG11-BN width 0.5, batch 256: measured here, the worker's peak charged to the limit is ~560-610 MB
    training stage 1 and over 690 MB training the full model (``bench deploy --memory-limit``; at 690
    FedAvg is OOM-killed). At :data:`LIMIT` MB node 0 trains every SmartFreeze stage, never OOM-killed
    (at 640 MB, on a loaded machine, stage 1 was OOM-killed once: 30 MB is too thin a margin); under
    FedAvg (the full model) its worker is OOM-killed once, that reply fails with the reason, and it is
    not sent the model again.
    Runs where cgroups are writable (``common.oslimit.detect``); skipped with the reason elsewhere.
    """
    from common.oslimit import detect

    support = detect()
    if support.mechanism not in ("cgroup1", "cgroup2"):
        pytest.skip(f"no writable cgroup memory controller here: {support.reason}")
    out = tmp_path / "outputs"
    env = flower_env(tmp_path / "flwr-home", out)
    port, node_ports = free_port(), [free_port() for _ in range(2)]
    job = (
        "model='vgg11bn' width=0.5 batch-size=256 synthetic-train-size=1200 synthetic-test-size=200 "
        "fraction-evaluate=0.0 node-wait-seconds=90 min-stage-rounds=1 max-stage-rounds=1"
    )
    more = "min-available-nodes=2 min-train-nodes=1 min-replies=1 round-timeout=120"

    def run(strategy: str, rounds: int) -> tuple[list[dict], list[dict], str]:
        res = subprocess.run(
            [RUN_SH, "deploy", "run", "--superlink", f"127.0.0.1:{port}", "--insecure", "--run-config"]
            + [f"{job} strategy='{strategy}' num-rounds={rounds} run-name='{strategy}'", "--run-config", more],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        doc = json.loads((out / strategy / "metrics.json").read_text())
        seen = doc["summary"].get("node-memory-seen", {}).get("0", [])
        return [r for r in doc["rounds"] if r["round"] > 0], seen, res.stdout + res.stderr

    try:
        _insecure_federation(processes, tmp_path, env, port, node_ports, {0: ["--memory-mb", str(LIMIT)]})
        rounds, seen, _ = run("smartfreeze", 5)
        worker_log = (ROOT / ".flwr" / "deploy" / f"supernode-{node_ports[0]}" / "worker.log").read_text()
        assert f"memory limit {LIMIT} MB enforced by cgroup" in worker_log, worker_log[-2000:]
        assert [r["stage"] for r in rounds] == [1, 2, 3, 4, 5]
        assert all(r["participant-ids"] == [0, 1] and r["failures"] == 0 for r in rounds), rounds
        assert not any(r.get("oom-kills") for r in rounds)
        assert [int(row["round"]) for row in seen] == [1, 2, 3, 4, 5] and not any(row.get("oom") for row in seen)
        assert all(0 < row["os-peak-mb"] <= LIMIT for row in seen), seen  # what the limit measured, per stage

        rounds, seen, text = run("fedavg", 3)
        killed = [int(row["round"]) for row in seen if row.get("oom")]
        assert len(killed) == 1 and killed[0] <= 2, seen  # the first full-model message(s) over the limit
        assert rounds[killed[0] - 1]["failures"] == 1 and rounds[-1]["oom-kills"] == 1, rounds
        assert all(r["participant-ids"] == [1] for r in rounds[killed[0] - 1 :]), rounds  # never sent again
        assert "out-of-memory kill" in text
    finally:
        processes.stop_all()
        _forget_deploy_homes(port, *node_ports)
    assert all(p.poll() is not None for p in processes.procs)
