"""A node's warm worker: one long-lived process that handles every message the node's ClientApps relay.

Flower 1.41 starts a fresh ``flwr-clientapp`` process per message (its issue #3670, a persistent
ClientApp, is open), so without this every message pays Python start-up, ``import torch``, the
dataset load and partitioning and the model build. The worker keeps them: torch stays imported,
:mod:`client_app.handlers`' caches (data partition, model skeletons, output modules) stay warm, and
each run's ``context.state`` (the frozen blocks SmartFreeze and FedLL keep on the node) lives here.

``python -m client_app.worker --socket PATH [--memory-mb MB] [--name N]`` is the **supervisor**
(started by ``run.sh deploy supernode`` next to ``flower-supernode``, and by ``deploy-local``): it
imports no torch, starts the serving process (``--serve``), puts it under the OS memory limit
(:mod:`common.oslimit`; the mechanism in force, or why none could be set, is logged at start-up),
restarts it whenever it exits, and records each death and its cause (exit code, signal, an
out-of-memory kill at the limit) in ``PATH.deaths`` (JSON lines) for the ClientApp that was waiting
on it (:func:`client_app.relay.death_of`). SIGTERM / SIGINT stop the worker, release the limit and
remove the socket, token and pid files.

Serving is one connection per message, one message at a time (a SuperNode processes one message at
a time); the protocol and what it refuses are in :mod:`common.wire`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import wire
from common.oslimit import OOM_KILLED

log = logging.getLogger("progfl.worker")

IO_TIMEOUT = 120.0
"""Seconds a connection may stall mid-frame before the worker drops it."""
KEEP_RUNS = 2
"""Runs whose node state (frozen blocks) the worker keeps; older ones are dropped."""
RESTART_DELAYS = (0.0, 1.0, 2.0, 5.0, 10.0)
"""Seconds before each restart of a worker that keeps dying within a minute of its start."""
LIMIT_ENV = "PROGFL_WORKER_CGROUP"
"""Environment variable naming the worker's cgroup folder (for its peak and limit-hit counters)."""


# ---------------------------------------------------------------- serving process
class Server:
    """The serving loop's state: token, per-run contexts, frame limit."""

    def __init__(self, socket_path: Path, max_mb: float) -> None:
        self.path = socket_path
        self.max_mb = max_mb
        self.contexts: dict[int, Any] = {}
        self.token = b""
        self.served = 0
        limit = _own_limit()
        self.budget = None if limit is None else Budget(limit.limit_mb, limit.working_set_mb)

    def _budgeted(self, ctx: Any) -> dict[str, Any]:
        """The message's node config with the budget the OS limit leaves (unchanged without a limit)."""
        if self.budget is None:
            return dict(ctx.node_config)
        from client_app.handlers import prepare

        if not self.budget.frozen:
            prepare(ctx)  # the data partition is part of the runtime's floor (a bad data config fails here)
        try:
            return self.budget.apply(dict(ctx.node_config))
        except (OSError, ValueError) as exc:
            log.warning("could not read the memory limit at %s: %s", os.environ.get(LIMIT_ENV), exc)
            return dict(ctx.node_config)

    def context(self, run_id: int, node_config: dict[str, Any], run_config: dict[str, Any]) -> Any:
        """The run's Context (its state persists across messages); config refreshed from the message."""
        from flwr.app import Context, RecordDict

        ctx = self.contexts.get(run_id)
        if ctx is None:
            ctx = Context(run_id, 0, dict(node_config), RecordDict(), dict(run_config))
            self.contexts[run_id] = ctx
            for old in list(self.contexts)[:-KEEP_RUNS]:
                del self.contexts[old]
        else:
            ctx.node_config, ctx.run_config = dict(node_config), dict(run_config)
        return ctx

    def handle(self, conn: socket.socket) -> None:
        """One connection: handshake, request, reply. Bad input is refused and logged; nothing runs on it."""
        from client_app.handlers import HANDLERS
        from client_app.relay import code_digest, from_wire, to_wire
        from common.protocol import METRICS

        conn.settimeout(IO_TIMEOUT)
        header: dict[str, Any] = {}
        try:
            peer = wire.check_peer(conn)
            hello, _ = wire.recv_frame(conn, max_mb=0)
            wire.expect(hello, "hello")
            mine = wire.nonce()
            answer = wire.proof(self.token, "worker", str(hello.get("nonce")))
            wire.send_frame(
                conn, {"kind": "hello", "version": wire.VERSION, "pid": os.getpid(), "nonce": mine, "proof": answer}
            )

            def check(h: dict[str, Any]) -> None:
                wire.expect(h, "request")
                wire.verify(self.token, h.get("proof"), "client", mine, str(h.get("message_id")))

            header, arrays = wire.recv_frame(conn, max_mb=self.max_mb, check=check)
        except Exception as exc:  # whatever a peer sends, the worker answers and keeps serving
            log.warning("refused a connection: %s", exc)
            with contextlib.suppress(OSError):
                wire.send_frame(conn, {"kind": "error", "version": wire.VERSION, "error": str(exc)})
            return
        t0 = time.perf_counter()
        mid = str(header.get("message_id"))
        kind = header.get("message_type")
        try:
            if header.get("code") != code_digest():
                raise wire.WireError(
                    f"the run's app code (digest {header.get('code')!r}) differs from this worker's "
                    f"({code_digest()!r}, {Path(__file__).resolve().parents[1]}): update the device's checkout "
                    "to the run's commit, or start the SuperNode with --no-worker"
                )
            if kind not in HANDLERS:
                raise wire.WireError(f"message_type={kind!r}; valid: {sorted(HANDLERS)}")
            content = from_wire(header.get("records", {}), arrays)
            run_id = int(header.get("run_id", 0))
            ctx = self.context(run_id, dict(header.get("node_config", {})), dict(header.get("run_config", {})))
            ctx.node_config = self._budgeted(ctx)
            try:
                reply = HANDLERS[kind](content, ctx)
            finally:
                if arrays and self.budget is not None:
                    self.budget.freeze()
            if METRICS in reply:
                reply[METRICS] = _with_limit_metrics(reply[METRICS])
            table, out = to_wire(reply)
            doc = {"kind": "reply", "version": wire.VERSION, "message_id": mid, "ok": True, "records": table}
        except Exception as exc:  # the handler's failure is the reply's, as in Flower's own ClientApp
            log.warning("%s message %s (peer pid %d) failed: %s: %s", kind, mid, peer, type(exc).__name__, exc)
            doc = {"kind": "reply", "version": wire.VERSION, "message_id": mid, "ok": False}
            doc["error"] = f"{type(exc).__name__}: {exc}"
            out = {}
        doc["seconds"] = time.perf_counter() - t0
        try:
            wire.send_frame(conn, doc, out)
        except OSError as exc:
            log.warning("could not send the reply to message %s: %s", mid, exc)
        self.served += 1


@functools.cache
def _own_limit() -> Any:
    """This serving process's OS memory limit (its supervisor's cgroup, ``PROGFL_WORKER_CGROUP``), or None."""
    folder = os.environ.get(LIMIT_ENV)
    if not folder:
        return None
    from common.oslimit import LimitError, attach

    try:
        return attach(Path(folder))
    except LimitError as exc:
        log.warning("could not read the memory limit at %s: %s", folder, exc)
        return None


class Budget:
    """What the OS limit leaves a sub-model (MB): the limit minus the runtime's floor.

    The floor is what the serving process holds before it trains anything: torch, the handlers,
    the data partition (~390 MB for ResNet10 on CIFAR-10 here), as the limit's working set
    (:meth:`common.oslimit.MemoryLimit.working_set_mb`). It is read at the start of each message
    until the first message that carries a model, then frozen: after training, the allocator keeps
    the freed activations for the next round, so the charged memory stays near the last peak
    although that memory is reusable; "limit minus current usage" would leave a node that has just
    trained almost no budget. A restarted serving process measures its floor anew.
    """

    def __init__(self, limit_mb: float, reading: Callable[[], float]) -> None:
        self.limit_mb = limit_mb
        self.reading = reading  # MB charged now (the working set)
        self.floor_mb: float | None = None
        self.frozen = False

    def left_mb(self) -> float:
        """Limit minus the floor (MB); re-reads the floor until :meth:`freeze`."""
        if not self.frozen or self.floor_mb is None:
            self.floor_mb = self.reading()
        return self.limit_mb - self.floor_mb

    def freeze(self) -> None:
        """Keep the floor read last (called once a message with a model has been handled)."""
        self.frozen = self.floor_mb is not None

    def apply(self, node_config: dict[str, Any]) -> dict[str, Any]:
        """``node_config`` with ``memory-mb`` = min(declared, limit - floor), at least 1 MB."""
        declared = float(node_config.get("memory-mb", math.inf))
        return {**node_config, "memory-mb": round(max(1.0, min(declared, self.left_mb())), 1)}


def _with_limit_metrics(metrics: Any) -> Any:
    """Add the OS limit's figures to a reply's metrics: limit, peak since the last message, limit hit (0/1)."""
    limit = _own_limit()
    if limit is None:
        return metrics
    from flwr.app import MetricRecord

    from common import protocol as P
    from common.oslimit import LimitError

    try:
        values = {
            **dict(metrics),
            P.OS_LIMIT_MB: limit.limit_mb,
            P.OS_PEAK_MB: limit.peak_mb(),
            P.OS_LIMIT_HIT: float(limit.limit_hit()),
        }
        limit.reset_counters()
    except (OSError, ValueError, LimitError) as exc:
        log.warning("could not read the memory limit's counters at %s: %s", limit.path, exc)
        return metrics
    return MetricRecord(values)


def serve(socket_path: Path, max_mb: float = wire.DEFAULT_MAX_MB) -> None:
    """Bind the socket, then import torch and the handlers, then answer messages until SIGTERM."""
    server = Server(socket_path, max_mb)
    wire.owner_only_folder(socket_path.parent)
    server.token = wire.new_token(socket_path)  # before the bind: a client never reads a dead worker's token
    sock = wire.bind_owner_only(socket_path)  # bound before the imports: a ClientApp arriving now waits
    wire.pid_path(socket_path).write_text(f"{os.getpid()}\n")
    t0 = time.perf_counter()
    import client_app.handlers  # noqa: F401  (torch, the models, the data code: once per worker)

    log.info("worker pid %d ready at %s (imports %.1f s)", os.getpid(), socket_path, time.perf_counter() - t0)
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        sock.close()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        try:
            conn, _ = sock.accept()
        except OSError:
            break
        with conn:
            server.handle(conn)


# ---------------------------------------------------------------- supervisor
def _cause(returncode: int, limit: Any, oom_before: int) -> str:
    """Why the serving process ended, in words (the OOM killer at the limit named as such)."""
    if returncode < 0:
        sig = signal.Signals(-returncode).name
        if limit is not None and limit.oom_kills() > oom_before:
            return (
                f"{OOM_KILLED}: the OS killed the worker ({sig}) at its memory limit of {limit.limit_mb:.0f} MB "
                f"({limit.mechanism}; peak {limit.peak_mb():.0f} MB)"
            )
        return f"killed by {sig}"
    return f"exited with code {returncode}"


def supervise(
    socket_path: Path, memory_mb: float | None, name: str, max_mb: float, parent_pid: int | None = None
) -> int:
    """Run the serving process, under the memory limit when given, restarting it until stopped.

    With ``parent_pid`` (run.sh's), the supervisor also stops when that process is gone.
    """
    from common import oslimit
    from common.procwatch import alive

    deaths = Path(f"{socket_path}.deaths")
    deaths.unlink(missing_ok=True)  # a record per death of this supervisor's workers
    limit = None
    if memory_mb is not None:
        try:
            limit = oslimit.create_limit(memory_mb, name)
            log.info("%s", limit.describe())
        except (oslimit.LimitError, ValueError) as exc:
            log.warning("NO OS memory limit in force (%s); the budget of %.0f MB is only modelled", exc, memory_mb)
    else:
        log.info("no memory limit asked (--memory-mb): the worker may use what the device has")
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    restarts = 0
    env = dict(os.environ)
    if limit is not None:
        env[LIMIT_ENV] = str(limit.path)
    enter = None if limit is None else (lambda: limit.add(os.getpid()))  # in the child, before exec: all charged
    try:
        while not stopping:
            cmd = [sys.executable, "-m", "client_app.worker", "--serve", "--socket", str(socket_path)]
            cmd += ["--max-mb", str(max_mb)]
            oom_before = limit.oom_kills() if limit is not None else 0
            child = subprocess.Popen(cmd, env=env, preexec_fn=enter, process_group=0)
            log.info("worker pid %d started", child.pid)
            started = time.monotonic()
            code = None
            while code is None:
                try:
                    code = child.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    if not alive(parent_pid):
                        log.warning("the process that started this worker (pid %s) is gone: stopping", parent_pid)
                        stop(signal.SIGTERM, None)
            if stopping:
                break
            wire.token_path(socket_path).unlink(missing_ok=True)  # the dead worker's: no client may use it
            cause = _cause(code, limit, oom_before)
            record = {"pid": child.pid, "returncode": code, "cause": cause, "time": time.time()}
            with deaths.open("a") as f:
                f.write(json.dumps(record) + "\n")
            log.warning("worker pid %d %s; restarting", child.pid, cause)
            quick = time.monotonic() - started < 60
            restarts = restarts + 1 if quick else 0
            time.sleep(RESTART_DELAYS[min(restarts, len(RESTART_DELAYS) - 1)] if quick else 0.0)
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if limit is not None:
            try:
                limit.release()
            except oslimit.LimitError as exc:
                log.warning("%s", exc)
        for path in (socket_path, wire.token_path(socket_path), wire.pid_path(socket_path)):
            path.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI: the supervisor (default) or, with ``--serve``, the serving process it starts."""
    parser = argparse.ArgumentParser(description="a node's warm worker for the ClientApp")
    parser.add_argument("--socket", required=True, help="Unix socket path (absolute; its folder becomes 0700)")
    parser.add_argument("--memory-mb", type=float, default=None, help="OS memory limit of the worker, MB")
    parser.add_argument("--name", default="worker", help="name of the worker's cgroup (progfl-<name>)")
    parser.add_argument("--max-mb", type=float, default=wire.DEFAULT_MAX_MB, help="largest frame body, MB")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process is gone (run.sh)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[worker] %(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    path = Path(args.socket).expanduser()
    if not path.is_absolute() or len(str(path).encode()) > 107:
        parser.error(f"--socket {args.socket!r} must be an absolute path of at most 107 bytes")
    if args.memory_mb is not None and not args.memory_mb > 0:
        parser.error(f"--memory-mb {args.memory_mb:g} must be a positive number of MB")
    if args.serve:
        serve(path, args.max_mb)
        return 0
    return supervise(path, args.memory_mb, args.name, args.max_mb, args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
