"""Pre-imported ``flwr-clientapp`` processes: a fork server that removes Flower's per-message start-up.

For every message a SuperNode's SuperExec starts ``flwr-clientapp`` (found on ``PATH``), a Python
process that imports Flower's runtime (~1 s on a laptop core, several on a Raspberry Pi) before it
pulls the message. ``run.sh deploy supernode`` / ``deploy-local`` put a shim of that name first on
the SuperNode's ``PATH`` (:data:`SHIM`, written by :func:`write_shim`): it hands its arguments,
environment and standard streams (file descriptors over ``SCM_RIGHTS``) to this launcher, which has
imported Flower's runtime once and forks a child that runs Flower's own ``flwr_clientapp()`` with
them. The child is Flower's ClientApp process in every respect (same code, arguments, token,
streams, exit code); only the imports are already done. The shim forwards SIGTERM/SIGINT to the
child and exits with its exit code (137 when it was killed). Without a launcher socket, or when
the launcher does not answer, the shim runs the real ``flwr-clientapp``.

The child drops the project's own modules the launcher imported (``client_app``, ``common``) and
the launcher's folder from ``sys.path`` before Flower loads the app, so the app always comes from
the run's FAB, never from this checkout. The launcher must run with the SuperNode's environment
(``FLWR_HOME``, telemetry settings): Flower reads some of it at import time.

``python -m client_app.launcher --socket PATH`` serves; ``--write-shim DIR`` writes the shim.
Only processes of the same user may connect (``SO_PEERCRED``; the socket is 0600 in a 0700 folder).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import traceback
from pathlib import Path

from common import wire

log = logging.getLogger("progfl.launcher")

MAX_REQUEST = 1 << 20
"""Largest launch request (bytes): argv, environment and working folder as JSON."""
ENV_SOCKET = "PROGFL_LAUNCHER_SOCKET"
ENV_REAL = "PROGFL_REAL_CLIENTAPP"
SHIM = '''#!{python} -IS
"""flwr-clientapp shim (written by client_app/launcher.py): hand this launch to the pre-imported launcher."""
import json, os, signal, socket, stat, sys

def real():
    exe = os.environ.get("{env_real}") or "flwr-clientapp"
    os.execvp(exe, [exe, *sys.argv[1:]])

path = os.environ.get("{env_socket}", "")
try:
    st = os.stat(path)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise OSError("not an owner-only socket")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    request = {{"argv": ["flwr-clientapp", *sys.argv[1:]], "env": dict(os.environ), "cwd": os.getcwd()}}
    socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
    replies = conn.makefile("rb")
    pid = int(json.loads(replies.readline())["pid"])
except (OSError, ValueError, KeyError):
    real()
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda s, _f: os.kill(pid, s))
line = replies.readline()
sys.exit(int(json.loads(line)["exit"]) if line else 137)
'''


def write_shim(folder: Path, python: str = sys.executable) -> Path:
    """Write the ``flwr-clientapp`` shim into ``folder`` (put it first on the SuperNode's PATH)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "flwr-clientapp"
    path.write_text(SHIM.format(python=python, env_real=ENV_REAL, env_socket=ENV_SOCKET))
    path.chmod(0o755)
    return path


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _forget_project(project: Path) -> None:
    """Drop this checkout's modules and folder: the child loads the app from the FAB only."""
    for name in list(sys.modules):
        if name.split(".")[0] in ("client_app", "common", "server_app", "bench"):
            del sys.modules[name]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != project]


def _child(conn: socket.socket, listener: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: become the ``flwr-clientapp`` process of the request, then exit."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    code = 1
    try:
        listener.close()
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        logging.root.handlers.clear()  # the launcher's own log format is not the ClientApp's
        logging.root.setLevel(logging.WARNING)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.chdir(str(request["cwd"]))
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in dict(request["env"]).items()})
        sys.argv = [str(a) for a in request["argv"]]
        _forget_project(Path(__file__).resolve().parents[1])
        # Every ClientApp process imports the app from the run's installed FAB: cache its bytecode there (even
        # where PYTHONDONTWRITEBYTECODE is set), or each message compiles the app's modules again (~45 ms of CPU).
        sys.dont_write_bytecode = False
        try:
            flwr_clientapp()
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        except BaseException:  # Flower's own process would print the traceback and exit 1
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
    finally:
        os._exit(code)


def _launch(conn: socket.socket, listener: socket.socket) -> None:
    """One shim's request: fork the ClientApp process, tell the shim its pid."""
    fds: list[int] = []
    try:
        wire.check_peer(conn)
        data, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 3)
        request = json.loads(data)
        if not isinstance(request, dict) or not {"argv", "env", "cwd"} <= set(request) or len(fds) != 3:
            raise wire.WireError(f"launch request needs argv, env, cwd and 3 descriptors; got {sorted(request)}")
    except (wire.WireError, OSError, ValueError) as exc:
        log.warning("refused a launch request: %s", exc)
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    pid = os.fork()
    if pid == 0:
        _child(conn, listener, request, fds)
    for fd in fds:
        os.close(fd)
    try:
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    except OSError as exc:
        log.warning("launched pid %d but could not tell the shim: %s", pid, exc)
    conn.close()


def serve(socket_path: Path, parent_pid: int | None = None) -> None:
    """Import Flower's ClientApp runtime once, then fork one ClientApp process per shim request.

    With ``parent_pid`` (run.sh's), the launcher stops when that process is gone.
    """
    # Flower's ClientApp runtime, and what a child would import lazily: httpcore and h11 at its first HTTP
    # client (httpx loads its transport then), cp437 at the FAB's unzip (~20 ms of CPU per message here).
    import encodings.cp437  # noqa: F401

    import flwr.app  # noqa: F401
    import flwr.clientapp  # noqa: F401
    import flwr.supernode.cli.flwr_clientapp  # noqa: F401
    import flwr.supernode.runtime.run_clientapp  # noqa: F401
    import h11  # noqa: F401
    import httpcore  # noqa: F401
    import numpy  # noqa: F401

    from common.procwatch import alive

    listener = wire.bind_owner_only(socket_path)
    listener.settimeout(1.0)  # wake up every second to check on the parent
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        listener.close()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("launcher pid %d ready at %s", os.getpid(), socket_path)
    try:
        while not stopping:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                if not alive(parent_pid):
                    log.warning("the process that started this launcher (pid %s) is gone: stopping", parent_pid)
                    break
                continue
            except OSError:
                break
            conn.settimeout(None)
            _launch(conn, listener)
    finally:
        socket_path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """CLI: serve at ``--socket``, or write the shim with ``--write-shim DIR``."""
    parser = argparse.ArgumentParser(description="pre-imported flwr-clientapp processes for a SuperNode")
    parser.add_argument("--socket", help="Unix socket path (absolute, in an owner-only folder)")
    parser.add_argument("--write-shim", metavar="DIR", help="write the flwr-clientapp shim into DIR and exit")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process is gone (run.sh)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[launcher] %(asctime)s %(levelname)s %(message)s")
    if args.write_shim:
        print(write_shim(Path(args.write_shim)))
        return 0
    if not args.socket or not Path(args.socket).is_absolute():
        parser.error(f"--socket {args.socket!r} must be an absolute path")
    serve(Path(args.socket), args.parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
