"""server_app.progress.tee_output: the ServerApp's output copied to the file run.sh follows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from server_app.progress import PROGRESS_ENV, tee_output


def test_stdout_and_stderr_reach_both_the_stream_and_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "progress.log"
    path.write_text("earlier line\n")
    with tee_output(str(path)):
        print("[fedavg] round 1/2 | acc 10.0%")
        print("a warning", file=sys.stderr)
    print("after the block")
    out, err = capsys.readouterr()
    assert "[fedavg] round 1/2" in out and "a warning" in err and "after the block" in out
    assert path.read_text() == "earlier line\n[fedavg] round 1/2 | acc 10.0%\na warning\n"


def test_a_failure_is_written_in_one_line_and_reraised(tmp_path: Path) -> None:
    path = tmp_path / "progress.log"
    with pytest.raises(RuntimeError, match="round 3 broke"), tee_output(str(path)):
        print("[fedavg] round 2/5")
        raise RuntimeError("round 3 broke")
    lines = path.read_text().splitlines()
    assert lines == ["[fedavg] round 2/5", "[progfl] the ServerApp failed: RuntimeError: round 3 broke"]


def test_without_the_environment_variable_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    before = sys.stdout
    with tee_output():
        assert sys.stdout is before
        print("only on stdout")
    target = tmp_path / "from-env.log"
    monkeypatch.setenv(PROGRESS_ENV, str(target))
    with tee_output():
        print("via the environment")
    assert target.read_text() == "via the environment\n"
    assert sys.stdout is before
