"""One writer per run folder, and results that are never overwritten unless asked (no torch, no Flower).

A live run holds an exclusive OS lock (``fcntl.flock``) on ``<run folder>/.lock`` for as long as
its ServerApp runs; the file holds the owner's PID. The lock is the kernel's: it is released when
the owner exits, however it exits (a crash, SIGKILL), so a stale lock is simply taken over, with a
note naming the PID that held it.

* :func:`check_run_folder` is what ``run.sh`` calls (through :mod:`common.preflight`) before it
  starts Flower: a folder that a live run owns is refused with that run's PID; a folder that
  holds results of an earlier run (:func:`results_in`) is refused unless ``overwrite=true`` or the
  run resumes it.
* :class:`RunLock` is what the ServerApp holds while it writes (it checks again: between the
  preflight and the ServerApp's start another run may have taken the folder).
* :func:`write_status` records how a run ended (``status.json``: finished, failed with the reason,
  interrupted at round N), so a folder is never left looking like a run that is still going.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from common.procwatch import alive

LOCK_NAME = ".lock"
STATUS_NAME = "status.json"
RESULT_FILES = ("metrics.json", "model.pt", "checkpoint.npz")
"""Files whose presence (with at least one trained round in metrics.json) means a folder holds results."""
OUTPUT_FILES = (
    *RESULT_FILES,
    "metrics.csv",
    "config.json",
    "accuracy.png",
    "report.html",
    "pace.json",
    "similarity.npy",
    STATUS_NAME,
    "progress.log",
)
"""Everything a run writes into its folder: what ``overwrite=true`` removes before the new run starts."""


OUTPUT_ENV = "PROGFL_OUTPUT_DIR"


def run_folder(output_dir: str, run_name: str, strategy: str, model: str, now: float | None = None) -> Path:
    """``<output-dir>/<run-name>``: output-dir from the config, else $PROGFL_OUTPUT_DIR, else ./outputs.

    An empty run-name becomes ``<strategy>-<model>-<YYYYmmdd-HHMMSS>``.
    """
    import time

    root = Path(output_dir or os.environ.get(OUTPUT_ENV) or Path.cwd() / "outputs").expanduser()
    name = run_name or f"{strategy}-{model}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"
    if "/" in name or name in (".", ".."):
        raise ValueError(f"run-name {name!r} must be a plain folder name")
    return root.resolve() / name


class RunFolderError(ValueError):
    """A run folder cannot be used; the message names the folder, the reason and what to do."""


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or "0") or None
    except (OSError, ValueError):
        return None


class RunLock:
    """The exclusive lock of a run folder, held from :meth:`acquire` until :meth:`release` (or exit)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self.took_over: int | None = None
        """PID of a dead owner whose lock file was found (the lock itself died with it)."""

    def acquire(self) -> RunLock:
        """Take the lock or raise RunFolderError naming the live owner's PID."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            owner = _read_pid(self.path)
            raise RunFolderError(
                f"{self.run_dir} is in use by a live run (PID {owner or 'unknown'}): wait for it to finish, "
                f"stop it (./run.sh stops its runs on Ctrl-C), or choose another run-name"
            ) from None
        previous = _read_pid(self.path)
        if previous and previous != os.getpid() and not alive(previous):
            self.took_over = previous
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (the file stays, empty of meaning: no process holds it)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def owner_of(run_dir: Path) -> int | None:
    """PID of the live run that holds ``run_dir``'s lock, or None if no process holds it."""
    path = Path(run_dir) / LOCK_NAME
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read_pid(path) or -1
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def trained_rounds(run_dir: Path) -> int:
    """Training rounds recorded in ``run_dir/metrics.json`` (0 if none or unreadable)."""
    try:
        doc = json.loads((Path(run_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return 0
    return sum(1 for r in doc.get("rounds", []) if isinstance(r, dict) and int(r.get("round", 0)) >= 1)


def results_in(run_dir: Path) -> list[str]:
    """What of an earlier run's results ``run_dir`` holds (empty: nothing worth keeping)."""
    run_dir = Path(run_dir)
    found = []
    rounds = trained_rounds(run_dir)
    if rounds:
        found.append(f"metrics.json with {rounds} trained round{'s' if rounds != 1 else ''}")
    found += [name for name in ("model.pt", "checkpoint.npz") if (run_dir / name).is_file()]
    return found


def check_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder a live run owns, or one with results unless resumed or ``overwrite``."""
    run_dir = Path(run_dir)
    owner = owner_of(run_dir)
    if owner is not None:
        what = "resume" if resume else "start a run in"
        raise RunFolderError(
            f"cannot {what} {run_dir}: a live run (PID {owner if owner > 0 else 'unknown'}) is writing there; "
            "wait for it to finish or stop it first"
        )
    if not resume:
        refuse_results(run_dir, overwrite)


def refuse_results(run_dir: Path, overwrite: bool) -> None:
    """RunFolderError if ``run_dir`` holds an earlier run's results and ``overwrite`` is off."""
    found = results_in(run_dir)
    if found and not overwrite:
        raise RunFolderError(
            f"{run_dir} holds the results of an earlier run ({', '.join(found)}); nothing was changed. "
            f"Choose another run-name, resume it (./run.sh resume {run_dir}), or replace it with "
            "--overwrite (run-config overwrite=true)"
        )


def clear_outputs(run_dir: Path) -> list[str]:
    """Remove every file a run writes (:data:`OUTPUT_FILES`) from ``run_dir``; returns the names removed."""
    removed = []
    for name in OUTPUT_FILES:
        path = Path(run_dir) / name
        if path.is_file():
            path.unlink()
            removed.append(name)
    return removed


def write_status(run_dir: Path, status: str, **details: Any) -> None:
    """``status.json``: how the run ended (``finished``, ``failed`` with ``reason``, ``interrupted`` at ``round``)."""
    path = Path(run_dir) / STATUS_NAME
    tmp = path.with_name(f".{STATUS_NAME}.{os.getpid()}")
    tmp.write_text(json.dumps({"status": status, "pid": os.getpid(), **details}, indent=2) + "\n")
    os.replace(tmp, path)


def checkpoint_round(run_dir: Path) -> int | None:
    """The round ``run_dir/checkpoint.npz`` was taken after (None without a readable checkpoint)."""
    import numpy as np

    try:
        with np.load(Path(run_dir) / "checkpoint.npz", allow_pickle=False) as z:
            return int(json.loads(z["state"].tobytes().decode())["round"])
    except (OSError, ValueError, KeyError):
        return None


def mark_interrupted(run_dir: Path) -> str:
    """Record an interrupt in ``status.json`` and in metrics.json's summary; return the line to print."""
    run_dir = Path(run_dir)
    done, ckpt = trained_rounds(run_dir), checkpoint_round(run_dir)
    write_status(run_dir, "interrupted", **{"rounds-completed": done, "checkpoint-round": ckpt})
    metrics = run_dir / "metrics.json"
    try:
        doc = json.loads(metrics.read_text())
    except (OSError, ValueError):
        doc = None
    if isinstance(doc, dict):
        doc.setdefault("summary", {}).update({"status": "interrupted", "interrupted-after-round": done})
        tmp = metrics.with_name(f".metrics.json.{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, metrics)
    if ckpt is None:
        return f"interrupted after round {done}; no checkpoint was written yet, so the run starts anew"
    return (
        f"interrupted after round {done}; continue from its checkpoint (round {ckpt}) with: ./run.sh resume {run_dir}"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m common.runfolder interrupted DIR``: what ``run.sh`` calls after it stopped a run."""
    import argparse

    parser = argparse.ArgumentParser(description="run-folder bookkeeping for run.sh")
    parser.add_argument("action", choices=["interrupted"])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    print(f"[run.sh] {mark_interrupted(args.run_dir)}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
