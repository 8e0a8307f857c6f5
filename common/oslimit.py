"""OS-enforced memory limit for a process (a long-lived training worker), with its peak and OOM report.

All sizes are in MB = 2**20 bytes (:data:`MB`). Pure standard library.

Mechanisms, in order of preference (:func:`detect`)
    ``cgroup2``
        The unified hierarchy (``<root>`` itself, or ``<root>/unified`` on a hybrid system) where the
        memory controller is enabled in our own cgroup's ``cgroup.subtree_control``, so a child cgroup
        created there gets ``memory.max``. The limit is ``memory.max``; ``memory.swap.max`` is set to 0
        when present so swap cannot hide the excess. A cgroup delegated to us whose controllers list
        memory but whose ``subtree_control`` does not (a systemd unit with ``Delegate=memory``: run.sh,
        the SuperNode and the supervisor all live in it) cannot enable it while it holds processes
        (the kernel's no-internal-process rule); :func:`create_limit` then first moves every process
        of that cgroup into a leaf child :data:`LEAF` and enables memory for children
        (:func:`_delegate`), which is what systemd's ``DelegateSubgroup=`` does at start.
    ``cgroup1``
        The v1 memory controller mounted at ``<root>/memory``; the child is created under our own
        memory cgroup (from ``/proc/self/cgroup``) or, if that directory is not visible, under the v1
        root. The limit is ``memory.limit_in_bytes`` and, when swap accounting exists,
        ``memory.memsw.limit_in_bytes`` at the same value (written second: memsw must stay >= limit).
    ``systemd-run``
        Only reported: a command is then launched as ``systemd_run_prefix(mb) + cmd`` (a transient
        scope with ``MemoryMax``); peak and OOM counts are not read back.
    ``none``
        Nothing usable; the reason lists why each mechanism was rejected.

"Limit hit" versus "OOM kill"
    Hitting the limit means a charge reached it; the kernel then reclaims (page cache, swap) and the
    process usually goes on. Only when reclaim fails does the cgroup's OOM killer SIGKILL a process
    (returncode -9). v1: ``memory.failcnt`` counts limit hits, the ``oom_kill`` line of
    ``memory.oom_control`` (kernel >= 4.13) counts kills. v2: ``memory.events`` has ``max`` (limit
    hits) and ``oom_kill`` (kills). Without the v1 ``oom_kill`` line, :meth:`MemoryLimit.oom_kills`
    falls back to 1 if the limit was hit, else 0: a weaker signal (a hit need not end in a kill).
    v1 "limit hit" is ``failcnt`` > 0 (memory or memsw) or a peak (``max_usage_in_bytes``) that
    reached the limit: with memsw limited too, the memsw counter is charged first and fails first,
    and some kernels (seen on 6.18) do not count memsw failures, so ``memory.failcnt`` stays 0.

Note: a process moved into a cgroup keeps its earlier memory charged to its old cgroup; only what
it allocates afterwards counts (start workers so that they wait, or use the CLI, which moves the
child in before ``exec``).

CLI: ``python -m common.oslimit --check`` and ``python -m common.oslimit --limit-mb MB --name N -- CMD ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MB = 1024 * 1024
OOM_KILLED = "out-of-memory kill"
"""Marker in a worker's death cause (and so in the failed reply's reason): killed by the OS at its limit."""
ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
SYSTEMD_DIR = Path("/run/systemd/system")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_LABEL = {"cgroup1": "cgroup v1", "cgroup2": "cgroup v2"}
LEAF = "progfl-procs"
"""cgroup v2: the leaf child our own cgroup's processes move into, so that it may enable memory for children."""


class LimitError(RuntimeError):
    """The memory limit could not be put in place (or removed); the message names mechanism, path and OS error."""


@dataclass(frozen=True)
class LimitSupport:
    """Which mechanism :func:`detect` found and why."""

    mechanism: str  # "cgroup2", "cgroup1", "systemd-run" or "none"
    reason: str  # why this one, or why none could be used


def _check_mb(limit_mb: float) -> float:
    if isinstance(limit_mb, bool) or not isinstance(limit_mb, int | float) or not 0 < limit_mb < math.inf:
        raise ValueError(f"limit_mb must be a positive finite number of MB, got {limit_mb!r}")
    return float(limit_mb)


def _check_pid(pid: int) -> int:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ValueError(f"pid must be a positive int, got {pid!r}")
    return pid


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"name must match [A-Za-z0-9_.-]+, got {name!r}")
    return name


def _write(path: Path, value: object) -> None:
    with open(path, "w") as f:  # one value per write(2), as cgroupfs wants
        f.write(str(value))


def _own_paths(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """(v1 memory cgroup path, v2 cgroup path) of the process, from ``/proc/<pid>/cgroup``."""
    v1 = v2 = None
    for line in proc_cgroup.read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and not controllers:
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v1, v2


def _probe(parent: Path) -> str | None:
    """Create and remove a child cgroup in ``parent``: None if that works, else the error."""
    probe = parent / f"progfl-probe-{os.getpid()}"
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:  # e names the file; if only rmdir failed, the probe is still there
        return f"cannot create and remove a child cgroup in {parent}: {e}"
    return None


def _delegable(parent: Path) -> str | None:
    """cgroup v2: None if ``parent`` may move its processes into a leaf and enable memory for children, else why."""
    for name in ("cgroup.subtree_control", "cgroup.procs"):
        if not os.access(parent / name, os.W_OK):
            return f"{parent / name} is not writable by this user (the cgroup is not delegated to it)"
    return _probe(parent)


def _delegate(parent: Path) -> None:
    """cgroup v2: move every process of ``parent`` into ``parent/LEAF``, then enable memory for its children.

    The kernel lets a non-root cgroup enable a controller in ``cgroup.subtree_control`` only while it
    holds no processes. Processes that exit meanwhile are skipped; the leaf is kept if it exists."""
    leaf = parent / LEAF
    try:
        if not leaf.is_dir():
            _mkdir_cgroup(leaf)
        for _ in range(3):  # a process may fork while we move; repeat until none is left
            pids = (parent / "cgroup.procs").read_text().split()
            if not pids:
                break
            for pid in pids:
                try:
                    _write(leaf / "cgroup.procs", pid)
                except ProcessLookupError:
                    continue
        _write(parent / "cgroup.subtree_control", "+memory")
    except OSError as e:
        raise LimitError(
            f"cgroup v2: cannot move the processes of {parent} into {leaf} and enable memory for its children: {e}"
        ) from e


def _locate(root: Path, proc_cgroup: Path, systemd_dir: Path | None) -> tuple[LimitSupport, Path | None]:
    """Detected support plus the parent cgroup to create children in (None unless cgroup1/2)."""
    notes: list[str] = []
    own_v1 = own_v2 = None
    try:
        own_v1, own_v2 = _own_paths(proc_cgroup)
    except (OSError, ValueError) as e:
        notes.append(f"cannot read {proc_cgroup}: {e}")
    base = root if (root / "cgroup.controllers").exists() else root / "unified"
    if not (base / "cgroup.controllers").exists():
        notes.append(f"cgroup v2: no unified hierarchy at {root} or {root / 'unified'}")
    elif own_v2 is None:
        notes.append(f"cgroup v2: no '0::' line in {proc_cgroup}")
    else:
        parent = base / own_v2.lstrip("/")
        try:
            avail = (parent / "cgroup.controllers").read_text().split()
            enabled = (parent / "cgroup.subtree_control").read_text().split()
        except OSError as e:
            notes.append(f"cgroup v2: cannot read the controllers of {parent}: {e}")
        else:
            if "memory" not in enabled:
                listed = f"(controllers: {' '.join(avail) or '-'})"
                if "memory" not in avail:
                    notes.append(f"cgroup v2: memory controller not available in {parent} {listed}")
                elif (err := _delegable(parent)) is not None:
                    notes.append(
                        f"cgroup v2: memory controller not enabled in cgroup.subtree_control of {parent}: {err}"
                    )
                else:
                    why = f"memory controller available in {parent}, for children once its processes are in {LEAF}"
                    return LimitSupport("cgroup2", why), parent
            elif (err := _probe(parent)) is not None:
                notes.append(f"cgroup v2: {err}")
            else:
                return LimitSupport("cgroup2", f"memory controller enabled for children of {parent}"), parent
    mem = root / "memory"
    if not (mem / "memory.limit_in_bytes").exists():
        notes.append(f"cgroup v1: no memory controller mounted at {mem}")
    else:
        own = mem / own_v1.lstrip("/") if own_v1 is not None else None
        for parent in dict.fromkeys(p for p in (own, mem) if p is not None and p.is_dir()):
            if (err := _probe(parent)) is None:
                why = f"child cgroups can be created in {parent}" + (f" ({'; '.join(notes)})" if notes else "")
                return LimitSupport("cgroup1", why), parent
            notes.append(f"cgroup v1 memory controller at {mem}: {err}")
    if systemd_dir is not None:
        exe = shutil.which("systemd-run")
        if exe is None:
            notes.append("systemd-run: not on PATH")
        elif not systemd_dir.is_dir():
            notes.append(f"systemd-run: {exe} exists but systemd is not the service manager ({systemd_dir} missing)")
        else:
            cmd = [exe, *(["--user"] if os.geteuid() != 0 else []), "--scope", "--quiet", "true"]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
            except (OSError, subprocess.TimeoutExpired) as e:
                notes.append(f"systemd-run: {' '.join(cmd)} failed: {e}")
            else:
                if res.returncode == 0:
                    return LimitSupport("systemd-run", f"{' '.join(cmd)} works; {'; '.join(notes)}"), None
                notes.append(f"systemd-run: {' '.join(cmd)} exited {res.returncode}: {res.stderr.strip()}")
    return LimitSupport("none", "; ".join(notes)), None


def detect(root: Path = ROOT, proc_cgroup: Path = PROC_CGROUP, systemd_dir: Path = SYSTEMD_DIR) -> LimitSupport:
    """Best usable mechanism (cgroup2 > cgroup1 > systemd-run > none) and why; leaves nothing behind."""
    return _locate(root, proc_cgroup, systemd_dir)[0]


def _mkdir_cgroup(path: Path) -> None:
    """Create a cgroup directory (the kernel fills in its control files; tests replace this to simulate that)."""
    os.mkdir(path)


class MemoryLimit:
    """A child cgroup with a memory limit; readings in MB. Made by :func:`apply_limit`, ended by :meth:`release`."""

    def __init__(self, mechanism: str, path: Path, limit_mb: float) -> None:
        self.mechanism = mechanism  # "cgroup1" or "cgroup2"
        self.path = path  # the child cgroup directory
        self.limit_mb = limit_mb  # MB
        self._released = False

    def _int(self, name: str) -> int:
        return int((self.path / name).read_text().split()[0])

    def _kv(self, name: str) -> dict[str, int]:
        pairs = (line.split() for line in (self.path / name).read_text().splitlines())
        return {p[0]: int(p[1]) for p in pairs if len(p) == 2}

    def _set(self, name: str, value: object) -> None:
        try:
            _write(self.path / name, value)
        except OSError as e:
            raise LimitError(f"{_LABEL[self.mechanism]}: cannot write {value} to {self.path / name}: {e}") from e

    def _set_limit(self) -> None:
        nbytes = int(self.limit_mb * MB)
        v1 = self.mechanism == "cgroup1"
        self._set("memory.limit_in_bytes" if v1 else "memory.max", nbytes)
        swap, value = ("memory.memsw.limit_in_bytes", nbytes) if v1 else ("memory.swap.max", 0)
        if (self.path / swap).exists():
            self._set(swap, value)

    def usage_mb(self) -> float:
        """Current memory charged to the cgroup, MB."""
        return self._int("memory.usage_in_bytes" if self.mechanism == "cgroup1" else "memory.current") / MB

    def working_set_mb(self) -> float:
        """Charged memory the kernel cannot simply drop, MB: usage minus inactive file cache.

        The same "working set" container runtimes report (cAdvisor, kubelet): the page cache of
        the dataset file and of torch's libraries is charged to the cgroup but reclaimed under
        pressure, so it is not part of what the runtime holds.
        """
        stat = self._kv("memory.stat") if (self.path / "memory.stat").exists() else {}
        inactive = stat.get("total_inactive_file" if self.mechanism == "cgroup1" else "inactive_file", 0)
        return max(0.0, self.usage_mb() - inactive / MB)

    def peak_mb(self) -> float:
        """Peak memory charged to the cgroup since creation, MB (nan on v2 kernels without ``memory.peak``)."""
        name = "memory.max_usage_in_bytes" if self.mechanism == "cgroup1" else "memory.peak"
        return self._int(name) / MB if (self.path / name).exists() else math.nan

    def oom_kills(self) -> int:
        """Processes killed by this cgroup's OOM killer (v1 without an ``oom_kill`` counter: 1 if limit hit, else 0)."""
        if self.mechanism == "cgroup2":
            return self._kv("memory.events").get("oom_kill", 0)
        kills = self._kv("memory.oom_control").get("oom_kill")
        return int(self.limit_hit()) if kills is None else kills

    def limit_hit(self) -> bool:
        """Whether a charge ever reached the limit (v2 ``max`` event > 0; v1: see the module doc)."""
        if self.mechanism == "cgroup2":
            return self._kv("memory.events").get("max", 0) > 0
        for pre in ("memory.", "memory.memsw."):  # failcnt > 0, or the peak reached the limit
            files = [self.path / f"{pre}{n}" for n in ("failcnt", "max_usage_in_bytes", "limit_in_bytes")]
            if all(f.exists() for f in files):
                failcnt, peak, limit = (int(f.read_text().split()[0]) for f in files)
                if failcnt > 0 or peak >= limit:
                    return True
        return False

    def add(self, pid: int) -> None:
        """Move process ``pid`` into the cgroup (only memory it allocates from now on is charged here)."""
        try:
            _write(self.path / "cgroup.procs", _check_pid(pid))
        except OSError as e:
            raise LimitError(
                f"{_LABEL[self.mechanism]}: cannot move pid {pid} into {self.path}/cgroup.procs: {e}"
            ) from e

    def release(self) -> None:
        """Move remaining processes to the parent cgroup and remove the cgroup; idempotent, ok if already gone."""
        for attempt in range(50):
            if self._released:
                return
            try:
                with contextlib.suppress(FileNotFoundError):
                    for pid in (self.path / "cgroup.procs").read_text().split():
                        with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                            _write(self.path.parent / "cgroup.procs", pid)
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(self.path)
                self._released = True
            except OSError as e:
                if e.errno != errno.EBUSY or attempt == 49:
                    raise LimitError(f"{_LABEL[self.mechanism]}: cannot release {self.path}: {e}") from e
                time.sleep(0.02)  # a process is still exiting

    def reset_counters(self) -> None:
        """Start a new measurement window: v1 peak and failure counters to 0 (v2 keeps them: no reset there)."""
        if self.mechanism != "cgroup1":
            return
        for name in (
            "memory.max_usage_in_bytes",
            "memory.memsw.max_usage_in_bytes",
            "memory.failcnt",
            "memory.memsw.failcnt",
        ):
            if (self.path / name).exists():
                self._set(name, 0)

    def describe(self) -> str:
        """One line for a start-up log."""
        return f"memory limit {self.limit_mb:g} MB enforced by {_LABEL[self.mechanism]} at {self.path}"


def _create(limit_mb: float, name: str, root: Path, proc_cgroup: Path) -> MemoryLimit:
    """A new empty limited cgroup ``progfl-<name>`` under our own memory cgroup."""
    limit_mb = _check_mb(limit_mb)
    _check_name(name)
    support, parent = _locate(root, proc_cgroup, None)
    if parent is None:
        raise LimitError(f"no cgroup memory limit can be applied: {support.reason}")
    if support.mechanism == "cgroup2" and "memory" not in (parent / "cgroup.subtree_control").read_text().split():
        _delegate(parent)
    path = parent / f"progfl-{name}"
    try:
        _mkdir_cgroup(path)
    except FileExistsError:  # a leftover of a crashed run can be removed; a cgroup in use cannot
        try:
            os.rmdir(path)
            _mkdir_cgroup(path)
        except OSError as e:
            raise LimitError(f"{_LABEL[support.mechanism]}: {path} already exists and is in use: {e}") from e
    except OSError as e:
        raise LimitError(f"{_LABEL[support.mechanism]}: cannot create {path}: {e}") from e
    limit = MemoryLimit(support.mechanism, path, limit_mb)
    try:
        limit._set_limit()
    except BaseException:
        with contextlib.suppress(LimitError):
            limit.release()
        raise
    return limit


def create_limit(limit_mb: float, name: str, root: Path = ROOT, proc_cgroup: Path = PROC_CGROUP) -> MemoryLimit:
    """A new empty cgroup ``progfl-<name>`` limited to ``limit_mb`` MB; processes join with :meth:`MemoryLimit.add`.

    Start a process inside it from the beginning with ``subprocess.Popen(..., preexec_fn=lambda:
    limit.add(os.getpid()))``: all its memory is then charged to the limit.
    """
    return _create(limit_mb, name, root, proc_cgroup)


def attach(path: Path) -> MemoryLimit:
    """The limit of an existing cgroup folder (made by :func:`create_limit`, e.g. in another process)."""
    v1 = (path / "memory.limit_in_bytes").exists()
    name = "memory.limit_in_bytes" if v1 else "memory.max"
    try:
        raw = (path / name).read_text().split()[0]
    except (OSError, IndexError) as e:
        raise LimitError(f"{path} is not a memory cgroup this module can read ({name}: {e})") from e
    limit_mb = math.inf if raw == "max" else int(raw) / MB
    return MemoryLimit("cgroup1" if v1 else "cgroup2", path, limit_mb)


def apply_limit(
    pid: int, limit_mb: float, name: str, root: Path = ROOT, proc_cgroup: Path = PROC_CGROUP
) -> MemoryLimit:
    """Put process ``pid`` under a ``limit_mb`` MB limit in a new cgroup ``progfl-<name>``; raises LimitError."""
    _check_pid(pid)
    limit = _create(limit_mb, name, root, proc_cgroup)
    try:
        limit.add(pid)
    except BaseException:
        with contextlib.suppress(LimitError):
            limit.release()
        raise
    return limit


def systemd_run_prefix(limit_mb: float) -> list[str]:
    """Command prefix running a command in a transient systemd scope limited to ``limit_mb`` MB, without swap."""
    mb = max(1, int(_check_mb(limit_mb)))
    user = ["--user"] if os.geteuid() != 0 else []
    return ["systemd-run", *user, "--scope", "--quiet", "-p", f"MemoryMax={mb}M", "-p", "MemorySwapMax=0", "--"]


def _run(cmd: list[str], limit_mb: float, name: str) -> int:
    """Run ``cmd`` under the limit, forwarding SIGINT/SIGTERM; report on stderr; return its exit code."""
    _check_mb(limit_mb)
    _check_name(name)
    support, limit, procs = detect(), None, []
    if support.mechanism == "none":
        print(f"oslimit: no OS memory limit available: {support.reason}", file=sys.stderr)
        return 2
    forward = lambda sig, _frame: [p.send_signal(sig) for p in procs]  # noqa: E731
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if support.mechanism == "systemd-run":
            cmd = systemd_run_prefix(limit_mb) + cmd
        else:
            limit = _create(limit_mb, name, ROOT, PROC_CGROUP)
        enter = None if limit is None else (lambda: limit.add(os.getpid()))  # in the child, before exec
        procs.append(subprocess.Popen(cmd, preexec_fn=enter, process_group=0))  # Ctrl-C reaches us only
        rc = procs[0].wait()
        peak = math.nan if limit is None else limit.peak_mb()  # JSON has no nan: unknown values are null
        report = {"mechanism": support.mechanism, "limit_mb": limit_mb, "peak_mb": None if math.isnan(peak) else peak}
        report["oom_kills"] = None if limit is None else limit.oom_kills()
        report["limit_hit"] = None if limit is None else limit.limit_hit()
        print(json.dumps({**report, "returncode": rc}), file=sys.stderr)
        return 128 - rc if rc < 0 else rc
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if limit is not None:
            try:
                limit.release()
            except LimitError as e:
                print(f"oslimit: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(prog="python -m common.oslimit", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="print the detected mechanism and why")
    parser.add_argument("--limit-mb", type=float, help="memory limit in MB (2**20 bytes)")
    parser.add_argument("--name", help="cgroup name suffix: progfl-<name>")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.check:
        support = detect()
        print(f"{support.mechanism}: {support.reason}")
        return 0
    if args.limit_mb is None or args.name is None or not cmd:
        parser.error("give --check, or --limit-mb MB --name N -- CMD ...")
    try:
        return _run(cmd, args.limit_mb, args.name)
    except (ValueError, LimitError, subprocess.SubprocessError, OSError) as e:
        print(f"oslimit: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
