"""Tests of common.oslimit: fast ones on fake cgroup trees in tmp_path, slow ones under a real limit."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common import oslimit
from common.oslimit import MB, LimitError, apply_limit, detect, systemd_run_prefix

ROOT = Path(__file__).resolve().parents[1]
OWN = "process_api/abc123"
UNLIMITED = "9223372036854771712"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def v1(tmp_path: Path) -> tuple[Path, Path]:
    """Fake hybrid v1 layout (like this machine): memory controller at cg/memory, v2 without memory."""
    root = tmp_path / "cg"
    for d in (root / "memory", root / "memory" / OWN):
        write(d / "memory.limit_in_bytes", UNLIMITED + "\n")
        write(d / "cgroup.procs", "")
    write(root / "unified" / "cgroup.controllers", "hugetlb\n")
    write(root / "unified" / "cgroup.subtree_control", "\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"9:name=systemd:/\n4:memory:/{OWN}\n1:cpu:/\n0::/\n")
    return root, proc


@pytest.fixture
def v2(tmp_path: Path) -> tuple[Path, Path]:
    """Fake unified layout: our cgroup user.slice/worker delegates the memory controller."""
    root = tmp_path / "cg"
    write(root / "cgroup.controllers", "cpu io memory pids\n")
    write(root / "cgroup.subtree_control", "memory pids\n")
    own = root / "user.slice" / "worker"
    write(own / "cgroup.controllers", "memory pids\n")
    write(own / "cgroup.subtree_control", "memory\n")
    write(own / "cgroup.procs", "")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/user.slice/worker\n")
    return root, proc


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch):
    """Make oslimit's cgroup mkdir fill in control files as the kernel does; returns a setter for swap."""
    state = {"swap": True}

    def mkdir(path: Path) -> None:
        os.mkdir(path)
        if (path.parent / "memory.limit_in_bytes").exists():  # v1
            files = {"limit_in_bytes": UNLIMITED, "usage_in_bytes": "0", "max_usage_in_bytes": "0", "failcnt": "0"}
            for key, value in files.items():
                write(path / f"memory.{key}", value + "\n")
                if state["swap"]:
                    write(path / f"memory.memsw.{key}", value + "\n")
            write(path / "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
        else:
            write(path / "memory.max", "max\n")
            write(path / "memory.current", "0\n")
            write(path / "memory.peak", "0\n")
            write(path / "memory.events", "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n")
            if state["swap"]:
                write(path / "memory.swap.max", "max\n")
        write(path / "cgroup.procs", "")

    monkeypatch.setattr(oslimit, "_mkdir_cgroup", mkdir)
    return state


def clear(path: Path) -> None:
    """Delete a fake cgroup's files (the kernel's rmdir ignores them, a tmpfs rmdir does not)."""
    for f in path.iterdir():
        f.unlink()


def no_systemd(tmp_path: Path) -> Path:
    return tmp_path / "no-run-systemd-system"


def test_detect_v1_hybrid(v1, tmp_path: Path) -> None:
    root, proc = v1
    before = sorted(p.name for p in (root / "memory" / OWN).iterdir())
    support = detect(root, proc, no_systemd(tmp_path))
    assert support.mechanism == "cgroup1"
    assert str(root / "memory" / OWN) in support.reason
    assert f"memory controller not available in {root / 'unified'}" in support.reason
    assert sorted(p.name for p in (root / "memory" / OWN).iterdir()) == before  # probe removed


def test_detect_v1_falls_back_to_root_when_own_cgroup_invisible(v1, tmp_path: Path, kernel) -> None:
    root, proc = v1
    proc.write_text("4:memory:/elsewhere/xyz\n")
    support = detect(root, proc, no_systemd(tmp_path))
    assert support.mechanism == "cgroup1"
    assert f"created in {root / 'memory'}" in support.reason
    limit = apply_limit(5, 64, "n", root, proc)
    assert limit.path == root / "memory" / "progfl-n"


def test_detect_v2(v2, tmp_path: Path) -> None:
    root, proc = v2
    support = detect(root, proc, no_systemd(tmp_path))
    assert support.mechanism == "cgroup2"
    assert str(root / "user.slice" / "worker") in support.reason
    assert sorted(p.name for p in (root / "user.slice" / "worker").iterdir()) == [
        "cgroup.controllers",
        "cgroup.procs",
        "cgroup.subtree_control",
    ]


def test_detect_v2_memory_not_delegated(v2, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, proc = v2
    own = root / "user.slice" / "worker"
    (own / "cgroup.subtree_control").write_text("\n")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p).parent == own else real_access(p, mode))
    support = detect(root, proc, no_systemd(tmp_path))
    assert support.mechanism == "none"
    assert "memory controller not enabled in cgroup.subtree_control of" in support.reason
    assert f"no memory controller mounted at {root / 'memory'}" in support.reason
    assert "systemd-run" in support.reason


def _moving_writes(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[tuple[Path, str]]:
    """Make oslimit's writes behave like cgroupfs for cgroup.procs (a pid written to one leaves the others)."""
    writes: list[tuple[Path, str]] = []

    def write_like_the_kernel(path: Path, value: object) -> None:
        writes.append((path, str(value)))
        if path.name != "cgroup.procs":
            path.write_text(str(value))
            return
        for procs in root.rglob("cgroup.procs"):
            procs.write_text("".join(f"{p}\n" for p in procs.read_text().split() if p != str(value)))
        path.write_text(path.read_text() + f"{value}\n")

    monkeypatch.setattr(oslimit, "_write", write_like_the_kernel)
    return writes


def test_v2_delegated_cgroup_with_processes_moves_them_to_a_leaf_then_enables_memory(
    v2, tmp_path: Path, kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A systemd unit with Delegate=memory: memory is available but not enabled, and the unit's processes
    (run.sh, the SuperNode, the supervisor) sit in it; detect says so and changes nothing, create moves them."""
    root, proc = v2
    own = root / "user.slice" / "worker"
    (own / "cgroup.subtree_control").write_text("\n")
    (own / "cgroup.procs").write_text("101\n102\n")
    support = detect(root, proc, no_systemd(tmp_path))
    assert support.mechanism == "cgroup2" and f"once its processes are in {oslimit.LEAF}" in support.reason
    assert not (own / oslimit.LEAF).exists() and (own / "cgroup.subtree_control").read_text() == "\n"
    writes = _moving_writes(monkeypatch, root)
    limit = apply_limit(99, 300, "node-0", root, proc)
    assert (own / oslimit.LEAF / "cgroup.procs").read_text().split() == ["101", "102"]
    assert (own / "cgroup.procs").read_text().split() == []
    assert limit.path == own / "progfl-node-0" and (limit.path / "cgroup.procs").read_text().split() == ["99"]
    order = [(p.relative_to(own).as_posix(), v) for p, v in writes]
    assert order.index(("cgroup.subtree_control", "+memory")) > order.index((f"{oslimit.LEAF}/cgroup.procs", "102"))
    assert order.index(("cgroup.subtree_control", "+memory")) < order.index(("progfl-node-0/memory.max", str(300 * MB)))


def test_v2_delegation_failure_is_a_limit_error_naming_the_cgroup(
    v2, tmp_path: Path, kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, proc = v2
    own = root / "user.slice" / "worker"
    (own / "cgroup.subtree_control").write_text("\n")
    (own / "cgroup.procs").write_text("101\n")

    def busy(path: Path, value: object) -> None:
        if path.name == "cgroup.subtree_control":
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        path.write_text(str(value))

    monkeypatch.setattr(oslimit, "_write", busy)
    with pytest.raises(LimitError, match=r"cgroup v2: cannot move the processes of .*worker into .*progfl-procs"):
        apply_limit(99, 300, "node-0", root, proc)


def test_detect_none_on_empty_tree(tmp_path: Path) -> None:
    support = detect(tmp_path / "cg", tmp_path / "missing", no_systemd(tmp_path))
    assert support.mechanism == "none"
    assert f"cannot read {tmp_path / 'missing'}" in support.reason
    assert "cgroup v2: no unified hierarchy" in support.reason
    assert "cgroup v1: no memory controller" in support.reason


def test_detect_read_only_v1(v1, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, proc = v1

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    with monkeypatch.context() as m:
        m.setattr(os, "mkdir", read_only)
        support = detect(root, proc, no_systemd(tmp_path))
    assert support.mechanism == "none"
    assert f"cgroup v1 memory controller at {root / 'memory'}" in support.reason
    assert "[Errno 30] Read-only file system" in support.reason


def test_apply_v1_writes_limit_then_memsw_and_moves_pid(v1, kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    root, proc = v1
    order: list[str] = []
    real_write = oslimit._write
    monkeypatch.setattr(oslimit, "_write", lambda path, value: (order.append(path.name), real_write(path, value)))
    limit = apply_limit(4321, 600, "node0", root, proc)
    path = root / "memory" / OWN / "progfl-node0"
    assert (limit.mechanism, limit.path, limit.limit_mb) == ("cgroup1", path, 600.0)
    assert (path / "memory.limit_in_bytes").read_text() == str(600 * MB)
    assert (path / "memory.memsw.limit_in_bytes").read_text() == str(600 * MB)
    assert (path / "cgroup.procs").read_text() == "4321"
    assert order == ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "cgroup.procs"]
    assert limit.describe() == f"memory limit 600 MB enforced by cgroup v1 at {path}"


def test_apply_v1_without_swap_accounting(v1, kernel) -> None:
    kernel["swap"] = False
    limit = apply_limit(7, 150.5, "w", *v1)
    assert (limit.path / "memory.limit_in_bytes").read_text() == str(int(150.5 * MB))
    assert not (limit.path / "memory.memsw.limit_in_bytes").exists()


@pytest.mark.parametrize("swap", [True, False])
def test_apply_v2(v2, kernel, swap: bool) -> None:
    kernel["swap"] = swap
    root, proc = v2
    limit = apply_limit(99, 256, "node-1.a_b", root, proc)
    assert limit.path == root / "user.slice" / "worker" / "progfl-node-1.a_b"
    assert (limit.path / "memory.max").read_text() == str(256 * MB)
    assert (limit.path / "memory.swap.max").exists() is swap
    if swap:
        assert (limit.path / "memory.swap.max").read_text() == "0"
    assert (limit.path / "cgroup.procs").read_text() == "99"
    assert limit.describe().startswith("memory limit 256 MB enforced by cgroup v2 at ")


def test_readings_v1(v1, kernel) -> None:
    limit = apply_limit(1, 150, "r", *v1)
    assert (limit.usage_mb(), limit.peak_mb(), limit.oom_kills(), limit.limit_hit()) == (0, 0, 0, False)
    (limit.path / "memory.usage_in_bytes").write_text(f"{100 * MB}\n")
    (limit.path / "memory.max_usage_in_bytes").write_text(f"{140 * MB}\n")
    (limit.path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert (limit.usage_mb(), limit.peak_mb(), limit.oom_kills()) == (100, 140, 2)
    assert not limit.limit_hit()
    (limit.path / "memory.failcnt").write_text("3\n")
    assert limit.limit_hit()


@pytest.mark.parametrize(
    ("mechanism", "usage", "key"),
    [("cgroup1", "memory.usage_in_bytes", "total_inactive_file"), ("cgroup2", "memory.current", "inactive_file")],
)
def test_working_set_leaves_out_inactive_file_cache(
    request: pytest.FixtureRequest, kernel, mechanism: str, usage: str, key: str
) -> None:
    limit = apply_limit(1, 500, "w", *request.getfixturevalue("v1" if mechanism == "cgroup1" else "v2"))
    (limit.path / usage).write_text(f"{300 * MB}\n")
    assert limit.working_set_mb() == 300  # no memory.stat: nothing known to be reclaimable
    other = "inactive_file" if key.startswith("total_") else "total_inactive_file"
    (limit.path / "memory.stat").write_text(f"cache 1\nactive_file {20 * MB}\n{other} {70 * MB}\n{key} {40 * MB}\n")
    assert limit.working_set_mb() == 260
    (limit.path / "memory.stat").write_text(f"{key} {400 * MB}\n")
    assert limit.working_set_mb() == 0


def test_v1_limit_hit_by_memsw_peak(v1, kernel) -> None:
    """With memsw limited, the memsw counter fails first and memory.failcnt may stay 0 (kernel 6.18)."""
    limit = apply_limit(1, 150, "r", *v1)
    (limit.path / "memory.memsw.max_usage_in_bytes").write_text(f"{150 * MB}\n")
    assert limit.limit_hit()


def test_v1_oom_kills_fallback_without_counter(v1, kernel) -> None:
    limit = apply_limit(1, 150, "r", *v1)
    (limit.path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")
    assert limit.oom_kills() == 0
    (limit.path / "memory.failcnt").write_text("5\n")
    assert limit.oom_kills() == 1  # only "limit hit" is known


def test_readings_v2(v2, kernel) -> None:
    limit = apply_limit(1, 150, "r", *v2)
    assert (limit.oom_kills(), limit.limit_hit()) == (0, False)
    (limit.path / "memory.current").write_text(f"{10 * MB}\n")
    (limit.path / "memory.peak").write_text(f"{149 * MB}\n")
    (limit.path / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 0\n")
    assert (limit.usage_mb(), limit.peak_mb(), limit.oom_kills(), limit.limit_hit()) == (10, 149, 1, True)
    (limit.path / "memory.peak").unlink()
    assert math.isnan(limit.peak_mb())


@pytest.mark.parametrize("name", ["", "a/b", "../x", "node 0", "nöde", "x;rm"])
def test_bad_name(v1, kernel, name: str) -> None:
    with pytest.raises(ValueError, match="name must match") as info:
        apply_limit(1, 100, name, *v1)
    assert repr(name) in str(info.value)
    assert not list((v1[0] / "memory" / OWN).glob("progfl-*"))


@pytest.mark.parametrize("bad", [0, -5, math.nan, math.inf, "600", True, None])
def test_bad_limit(v1, kernel, bad) -> None:
    with pytest.raises(ValueError, match="limit_mb") as info:
        apply_limit(1, bad, "n", *v1)
    assert repr(bad) in str(info.value)
    with pytest.raises(ValueError, match="limit_mb"):
        systemd_run_prefix(bad)


@pytest.mark.parametrize("pid", [0, -1, 1.5, "12"])
def test_bad_pid(v1, kernel, pid) -> None:
    with pytest.raises(ValueError, match=f"pid must be a positive int, got {pid!r}"):
        apply_limit(pid, 100, "n", *v1)


def test_apply_without_mechanism_raises(tmp_path: Path) -> None:
    with pytest.raises(LimitError, match="no cgroup memory limit can be applied: .*no memory controller mounted"):
        apply_limit(1, 100, "n", tmp_path / "cg", tmp_path / "missing")


def test_apply_write_error_names_mechanism_path_and_error(v1, kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(path: Path, value: object) -> None:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(path))

    monkeypatch.setattr(oslimit, "_write", failing)
    with pytest.raises(LimitError) as info:
        apply_limit(1, 100, "n", *v1)
    message = str(info.value)
    assert message.startswith(f"cgroup v1: cannot write {100 * MB} to {v1[0] / 'memory' / OWN / 'progfl-n'}")
    assert "[Errno 22] Invalid argument" in message


def test_existing_cgroup_in_use(v1, kernel) -> None:
    busy = v1[0] / "memory" / OWN / "progfl-n"
    write(busy / "cgroup.procs", "77\n")
    with pytest.raises(LimitError, match="progfl-n already exists and is in use"):
        apply_limit(1, 100, "n", *v1)


def test_add_and_failed_add(v1, kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = apply_limit(1, 100, "n", *v1)
    limit.add(2)
    assert (limit.path / "cgroup.procs").read_text() == "2"
    with pytest.raises(ValueError, match="-3"):
        limit.add(-3)

    def gone(path: Path, value: object) -> None:
        raise ProcessLookupError(errno.ESRCH, os.strerror(errno.ESRCH))

    monkeypatch.setattr(oslimit, "_write", gone)
    with pytest.raises(
        LimitError, match="cgroup v1: cannot move pid 12345 into .*progfl-n/cgroup.procs.*No such process"
    ):
        limit.add(12345)


def test_release_moves_pids_to_parent_then_removes(v1, kernel) -> None:
    limit = apply_limit(4321, 100, "n", *v1)
    with pytest.raises(LimitError, match="cannot release"):  # tmpfs: the directory still holds files
        limit.release()
    assert (limit.path.parent / "cgroup.procs").read_text() == "4321"
    clear(limit.path)
    limit.release()
    assert not limit.path.exists()
    limit.release()  # idempotent


def test_release_of_vanished_cgroup(v2, kernel) -> None:
    limit = apply_limit(1, 100, "n", *v2)
    shutil.rmtree(limit.path)
    limit.release()
    limit.release()


def test_systemd_run_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    tail = ["--scope", "--quiet", "-p", "MemoryMax=600M", "-p", "MemorySwapMax=0", "--"]
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert systemd_run_prefix(600.9) == ["systemd-run", *tail]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert systemd_run_prefix(600) == ["systemd-run", "--user", *tail]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "common.oslimit", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_cli_check() -> None:
    res = cli("--check")
    assert res.returncode == 0, res.stderr
    mechanism, _, reason = res.stdout.strip().partition(": ")
    assert mechanism in {"cgroup2", "cgroup1", "systemd-run", "none"}
    assert mechanism == detect().mechanism and reason


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        oslimit.main([])
    assert info.value.code == 2
    assert oslimit.main(["--limit-mb", "-1", "--name", "x", "--", "true"]) == 2
    assert "got -1.0" in capsys.readouterr().err
    assert oslimit.main(["--limit-mb", "10", "--name", "a b", "--", "true"]) == 2
    assert "got 'a b'" in capsys.readouterr().err


# --- real limits -------------------------------------------------------------------------------------------------

ALLOC = """import sys
sys.stdin.readline()
b = bytearray({mb} * 1024 * 1024)
for i in range(0, len(b), 4096):
    b[i] = 1
"""


def require_cgroups() -> str:
    support = detect()
    if support.mechanism not in {"cgroup1", "cgroup2"}:
        pytest.skip(f"no usable cgroup memory limit here ({support.mechanism}): {support.reason}")
    return support.mechanism


def run_limited(alloc_mb: int, limit_mb: float, name: str) -> tuple[int, int, bool, float, Path]:
    """Start a child that allocates alloc_mb MB once told to, after it has been moved under the limit."""
    child = subprocess.Popen([sys.executable, "-c", ALLOC.format(mb=alloc_mb)], stdin=subprocess.PIPE)
    limit = None
    try:
        limit = apply_limit(child.pid, limit_mb, name)
        assert limit.describe().startswith(f"memory limit {limit_mb:g} MB enforced by cgroup v")
        child.stdin.write(b"go\n")
        child.stdin.close()
        rc = child.wait(timeout=120)
        return rc, limit.oom_kills(), limit.limit_hit(), limit.peak_mb(), limit.path
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if limit is not None:
            limit.release()


@pytest.mark.slow
def test_real_limit_kills_and_lets_small_run() -> None:
    mechanism = require_cgroups()
    rc, kills, hit, _, path = run_limited(400, 150, f"test-{os.getpid()}-oom")
    assert rc == -9
    assert kills >= 1 or hit
    assert not path.exists()
    rc, kills, hit, peak, path = run_limited(50, 150, f"test-{os.getpid()}-ok")
    assert (rc, kills) == (0, 0)
    assert 40 <= peak <= 150 or (mechanism == "cgroup2" and math.isnan(peak))
    assert not path.exists()


@pytest.mark.slow
def test_cli_run_over_limit() -> None:
    require_cgroups()
    name = f"test-{os.getpid()}-cli"
    alloc = "b = bytearray(400 * 1024 * 1024)"
    res = cli("--limit-mb", "150", "--name", name, "--", sys.executable, "-c", alloc)
    assert res.returncode == 137, res.stderr
    report = json.loads(res.stderr.strip().splitlines()[-1])
    assert set(report) == {"mechanism", "limit_mb", "peak_mb", "oom_kills", "limit_hit", "returncode"}
    assert report["mechanism"] == detect().mechanism and report["limit_mb"] == 150
    assert report["returncode"] == -9
    assert report["oom_kills"] >= 1 or report["limit_hit"]
    parent = oslimit._locate(oslimit.ROOT, oslimit.PROC_CGROUP, None)[1]
    assert not (parent / f"progfl-{name}").exists()
