"""Stop means stop: Ctrl-C (SIGINT to the launcher's process group) and SIGTERM to the launcher alone.

Within 10 s of the signal no process of the run is left (checked by PID: every process that
carries the run's ``PROGFL_OUTPUT_DIR`` marker, Ray's included), the launcher prints how to
resume, the folder's checkpoint is intact and marked interrupted, and ``./run.sh resume`` ends
exactly like an uninterrupted run of the same seed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT
from test_resume import CONFIG, ROUNDS, _assert_same_run, _checkpoint_round, _run_sh

pytestmark = pytest.mark.slow

INTERRUPT_AFTER = 2


def _launch(args: list[str], marker: Path) -> subprocess.Popen:
    """run.sh in its own session with SIGINT at its default (as a shell's foreground job has it)."""
    env = {**os.environ, "PROGFL_OUTPUT_DIR": str(marker)}
    return subprocess.Popen(
        [str(ROOT / "run.sh"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _marked(marker: Path) -> set[int]:
    """PIDs of the live processes whose environment holds ``PROGFL_OUTPUT_DIR=marker``."""
    tag = f"PROGFL_OUTPUT_DIR={marker}\0".encode()
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if tag in Path(f"/proc/{entry}/environ").read_bytes():
                    status = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    if status != "Z":  # a zombie is already dead, waiting for its parent to reap it
                        pids.add(int(entry))
            except OSError:
                continue
    return pids


@pytest.mark.parametrize("how", ["sigint-to-group", "sigterm-to-launcher"])
def test_interrupt_stops_every_process_and_resume_ends_like_an_uninterrupted_run(tmp_path: Path, how: str) -> None:
    common = f"{CONFIG} output-dir='{tmp_path}'"
    ref = _run_sh(["run", "--supernodes", "4", "--run-config", f"{common} run-name='ref'"], tmp_path)
    marker = tmp_path / "marker"
    marker.mkdir()
    run = _launch(["run", "--supernodes", "4", "--run-config", f"{common} run-name='cut'"], marker)
    deadline = time.monotonic() + 600
    while _checkpoint_round(tmp_path / "cut") < INTERRUPT_AFTER and run.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    before = _marked(marker)
    assert len(before) > 5  # launcher, SuperLink, SuperExec, simulation, Ray
    t0 = time.monotonic()
    if how == "sigint-to-group":
        os.killpg(run.pid, signal.SIGINT)
    else:
        run.send_signal(signal.SIGTERM)
    out, _ = run.communicate(timeout=30)
    while (left := before & _marked(marker)) and time.monotonic() - t0 < 10:
        time.sleep(0.2)
    assert not left, f"processes left 10 s after the signal: {sorted(left)}"
    assert run.returncode == 130, out[-2000:]
    line = [ln for ln in out.splitlines() if "interrupted after round" in ln]
    assert len(line) == 1 and f"./run.sh resume {tmp_path / 'cut'}" in line[0], out[-2000:]
    done = _checkpoint_round(tmp_path / "cut")
    assert INTERRUPT_AFTER <= done < ROUNDS
    status = json.loads((tmp_path / "cut" / "status.json").read_text())
    assert status["status"] == "interrupted" and status["checkpoint-round"] == done
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["summary"]["status"] == "interrupted"

    resumed = _run_sh(["resume", str(tmp_path / "cut")], tmp_path)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    ref_out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, ref_out[-3000:]
    _assert_same_run(tmp_path / "ref", tmp_path / "cut")
