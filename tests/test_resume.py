"""End-to-end checkpoint and resume: SmartFreeze runs interrupted after a round (by the
``stop-after-round`` testing key, and by SIGKILL of every process of the run) and resumed with
``./run.sh resume`` end exactly like an uninterrupted run of the same seed. The interrupted runs
overlap the server's closing work with the next round (``overlap-server-work='on'``), the reference
does not: the overlap changes no number."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT

from server_app.checkpoint import CheckpointError, load_checkpoint

pytestmark = pytest.mark.slow

ROUNDS, STOP, KILL_AFTER = 9, 5, 3
# Small and fast: 4 simulated clients, 2 per round, budgets that differ per client (uniform profile),
# a pace controller that can freeze after 4 rounds of a stage, RL-CD + bandit selection.
CONFIG = (
    "strategy='smartfreeze' model='smallcnn' synthetic-train-size=600 synthetic-test-size=200 "
    f"num-rounds={ROUNDS} min-stage-rounds=2 pace-window=2 pace-smooth=1 pace-regress=2 pace-consecutive=1 "
    "pace-tau=0.5 device-profile='uniform' fraction-train=0.5 min-available-nodes=4 min-train-nodes=2 seed=3 "
    "evaluate-every=3"  # rounds without a federated evaluation exchange: the ones overlap-server-work overlaps
)
# Columns that legitimately differ: timings, measured memory peaks, and bytes down (restarted nodes no
# longer hold the frozen blocks, so the first resumed round of a later stage sends them again).
MEASURED = {"bytes-down", "max-peak-mb", "max-rss-peak-mb", "max-os-peak-mb"}
"""Round metrics measured on the machine (memory peaks, bytes), which differ between two runs of one seed."""


def _volatile(key: str) -> bool:
    """Whether a round metric is measured rather than computed: wall-clock timings (every ``*seconds*`` key but
    the modelled ``sim-round-seconds``) and the keys in :data:`MEASURED`."""
    return key in MEASURED or ("seconds" in key and key != "sim-round-seconds")


def _run_sh(args: list[str], out: Path) -> subprocess.Popen:
    """Start run.sh; PROGFL_OUTPUT_DIR=out is inherited by every process it starts (the test's marker)."""
    env = {**os.environ, "PROGFL_OUTPUT_DIR": str(out)}
    return subprocess.Popen(
        [str(ROOT / "run.sh"), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _kill_marked(out: Path) -> int:
    """SIGKILL, by PID, every process whose environment holds this run's marker; return how many."""
    marker = f"PROGFL_OUTPUT_DIR={out}\0".encode()
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if marker in Path(f"/proc/{entry}/environ").read_bytes():
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
        except (OSError, ProcessLookupError):
            continue
    return killed


def _checkpoint_round(run_dir: Path) -> int:
    try:
        return load_checkpoint(run_dir, arrays=False).round
    except CheckpointError:
        return 0


def _assert_same_run(ref: Path, run: Path) -> None:
    a = json.loads((ref / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in b["rounds"]] == list(range(ROUNDS + 1))  # the history covers the whole run
    assert b["summary"]["stages"] == a["summary"]["stages"]  # same stage boundaries and freeze reasons
    assert len(a["summary"]["stages"]) == 3
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        assert rb.get("participant-ids") == ra.get("participant-ids"), ra["round"]
        # Every random choice derives from (seed, round[, node]) and the restored state is bit for bit
        # the saved one, so on CPU the numbers come out identical; the tolerance would only absorb a
        # float reduction order changed by a different torch thread count.
        for key in sorted(k for k in set(ra) | set(rb) if not _volatile(k)):
            if isinstance(ra.get(key), float) and isinstance(rb.get(key), float):
                assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), (ra["round"], key)
            else:
                assert rb.get(key) == ra.get(key), (ra["round"], key)
    assert b["summary"]["final-accuracy"] == pytest.approx(a["summary"]["final-accuracy"], abs=1e-9)
    assert b["summary"]["participation-rate"] == a["summary"]["participation-rate"]
    assert json.loads((run / "pace.json").read_text()) == json.loads((ref / "pace.json").read_text())


def test_interrupted_runs_resume_to_the_uninterrupted_result(tmp_path: Path) -> None:
    common = f"{CONFIG} output-dir='{tmp_path}'"
    killed_out = tmp_path / "killed-marker"  # its own marker, so that only the killed run's processes die
    killed_out.mkdir()
    # the three runs go side by side (each run.sh has its own SuperLink) to save wall time
    ref = _run_sh(["run", "--supernodes", "4", "--run-config", f"{common} run-name='ref'"], tmp_path)
    # the interrupted runs overlap the server's work with the next round (deployment's default, here forced on):
    # each round's row, checkpoint (written while the next round trains) and resume must match ref's sequential loop
    overlap = f"{common} overlap-server-work='on'"
    stop = _run_sh(
        ["run", "--supernodes", "4", "--run-config", f"{overlap} run-name='stop' stop-after-round={STOP}"], tmp_path
    )
    kill = _run_sh(["run", "--supernodes", "4", "--run-config", f"{overlap} run-name='kill'"], killed_out)
    deadline = time.monotonic() + 600
    while _checkpoint_round(tmp_path / "kill") < KILL_AFTER and kill.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _kill_marked(killed_out) > 0
    kill.communicate(timeout=60)
    killed_after = _checkpoint_round(tmp_path / "kill")
    assert KILL_AFTER <= killed_after < ROUNDS, killed_after
    assert not (tmp_path / "kill" / "model.pt").exists()  # the run died before its end

    ref_out, _ = ref.communicate(timeout=600)
    stop_out, _ = stop.communicate(timeout=600)
    assert ref.returncode == 0, ref_out[-3000:]
    assert stop.returncode != 0 and f"stop-after-round={STOP}" in stop_out, stop_out[-3000:]
    assert _checkpoint_round(tmp_path / "stop") == STOP
    stopped = json.loads((tmp_path / "stop" / "metrics.json").read_text())
    assert [r["round"] for r in stopped["rounds"]] == list(range(STOP + 1))

    resumed = {name: _run_sh(["resume", str(tmp_path / name)], tmp_path) for name in ("stop", "kill")}
    for name, after in (("stop", STOP), ("kill", killed_after)):
        out, _ = resumed[name].communicate(timeout=600)
        assert resumed[name].returncode == 0, out[-3000:]
        assert f"resumed after round {after}" in out and f"round {after + 1}/{ROUNDS}" in out
        assert f"round {after}/{ROUNDS}" not in out  # rounds before the checkpoint are not run again
        _assert_same_run(tmp_path / "ref", tmp_path / name)
