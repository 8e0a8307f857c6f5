"""One writer per run folder, stale locks, and results that are never overwritten unless asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.preflight import main
from common.runfolder import (
    RunFolderError,
    RunLock,
    check_run_folder,
    clear_outputs,
    owner_of,
    results_in,
    write_status,
)

HOLD = (
    "import sys, time; from common.runfolder import RunLock; "
    "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"
)


def _finished_run(run_dir: Path, rounds: int = 3) -> dict[str, bytes]:
    run_dir.mkdir(parents=True)
    doc = {"config": {}, "summary": {}, "rounds": [{"round": r} for r in range(rounds + 1)]}
    (run_dir / "metrics.json").write_text(json.dumps(doc))
    (run_dir / "model.pt").write_bytes(b"weights")
    (run_dir / "report.html").write_text("<html></html>")
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


def test_a_second_writer_is_refused_with_the_owners_pid(tmp_path: Path) -> None:
    run_dir = tmp_path / "x"
    root = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert owner_of(run_dir) == holder.pid
        with pytest.raises(RunFolderError, match=f"in use by a live run \\(PID {holder.pid}\\)"):
            RunLock(run_dir).acquire()
        with pytest.raises(RunFolderError, match=f"cannot resume .*PID {holder.pid}"):
            check_run_folder(run_dir, resume=True, overwrite=False)
    finally:
        holder.kill()
        holder.wait()
    # The owner died (SIGKILL): its lock died with it; the next writer takes over, naming it.
    assert owner_of(run_dir) is None
    with RunLock(run_dir) as lock:
        assert lock.took_over == holder.pid
        assert (run_dir / ".lock").read_text().strip() == str(os.getpid())


def test_results_are_never_overwritten_unless_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "out" / "x"
    before = _finished_run(run_dir)
    assert results_in(run_dir) == ["metrics.json with 3 trained rounds", "model.pt"]
    code = main(["--run-config", f"run-name='x' output-dir='{tmp_path / 'out'}'"])
    err = capsys.readouterr().err
    assert code == 2 and "holds the results of an earlier run" in err and "--overwrite" in err and str(run_dir) in err
    assert {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())} == before  # byte-identical
    assert main(["--run-config", f"run-name='x' output-dir='{tmp_path / 'out'}' overwrite=true"]) == 0
    assert (
        main(["--run-config", f"run-name='x' output-dir='{tmp_path / 'out'}' resume=true"]) == 0
    )  # resuming is not overwriting
    assert sorted(clear_outputs(run_dir)) == ["metrics.json", "model.pt", "report.html"]


def test_a_run_that_failed_before_round_1_is_marked_and_does_not_block(tmp_path: Path) -> None:
    run_dir = tmp_path / "y"
    _finished_run(run_dir, rounds=0)
    (run_dir / "model.pt").unlink()
    write_status(run_dir, "failed", reason="ValueError: bad", **{"rounds-completed": 0})
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    assert results_in(run_dir) == []
    check_run_folder(run_dir, resume=False, overwrite=False)  # nothing worth keeping: no refusal
