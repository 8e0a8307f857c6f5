"""The thin ClientApp's side of the warm worker: Flower records to frames, one connection per message.

:func:`forward` sends a message's records to the worker listening at the node's ``worker-socket``
(:mod:`common.wire` frames: JSON for configs and metrics, raw buffers for arrays) and returns the
worker's reply records. It imports no torch: the ``flwr-clientapp`` process Flower starts for every
message stays a few hundred milliseconds of work. :func:`to_wire` / :func:`from_wire` are the
record conversion both sides use.

A worker that dies during a message (killed by PID, or by the OS at its memory limit) fails that
message with the cause its supervisor recorded (:func:`death_of`); the supervisor restarts it, so
the node answers the next message again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common import protocol as P
from common import wire

CONNECT_TIMEOUT = 60.0
"""Seconds a message waits for the worker's socket to appear or accept (a worker being restarted)."""
DEATH_WAIT = 3.0
"""Seconds to wait for the supervisor's record of a worker that died mid-message."""
SCALARS = (bool, int, float, str)


APP_ROOT = Path(__file__).resolve().parents[1]
"""The project folder this module was loaded from (the FAB's install, or the device's checkout)."""


@functools.lru_cache(maxsize=2)
def code_digest(root: Path = APP_ROOT) -> str:
    """SHA-256 over the sources that handle a message (``client_app/*.py``, ``common/*.py`` under ``root``).

    The thin ClientApp runs the app Flower installed from the FAB; the worker runs the device's own
    checkout. A request carries the FAB's digest and the worker refuses one that differs from its
    own: a device never trains with other code than the run's.
    """
    h = hashlib.sha256()
    for path in sorted([*root.glob("client_app/*.py"), *root.glob("common/*.py")]):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class WorkerFailure(RuntimeError):
    """The worker could not answer this message; the reason says why (and the run goes on)."""


def _value(value: Any, where: str) -> Any:
    if isinstance(value, SCALARS) or (isinstance(value, list) and all(isinstance(v, SCALARS) for v in value)):
        return value
    raise wire.WireError(f"{where} holds a {type(value).__name__}; only numbers, strings, booleans and lists pass")


def to_wire(content: RecordDict) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A RecordDict as (records table for the header, arrays named ``<record>:<index>``)."""
    table: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            keys = list(record.keys())
            table[name] = {"type": "array", "keys": keys}
            for i, key in enumerate(keys):
                arrays[f"{name}:{i}"] = record[key].numpy()
        elif isinstance(record, (ConfigRecord, MetricRecord)):
            kind = "config" if isinstance(record, ConfigRecord) else "metric"
            table[name] = {"type": kind, "values": {k: _value(v, f"{name}[{k!r}]") for k, v in record.items()}}
        else:
            what = type(record).__name__
            raise wire.WireError(f"record {name!r} is a {what}, which the worker protocol does not carry")
    return table, arrays


def from_wire(table: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> RecordDict:
    """Inverse of :func:`to_wire`; refuses a table that does not match the arrays."""
    if not isinstance(table, Mapping):
        raise wire.WireError(f"records table is {type(table).__name__}, expected an object")
    content = RecordDict()
    used = 0
    for name, spec in table.items():
        kind = spec.get("type") if isinstance(spec, Mapping) else None
        if kind == "array":
            keys = spec.get("keys")
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise wire.WireError(f"record {name!r}: 'keys' must be a list of strings")
            try:
                content[name] = ArrayRecord({k: Array(np.asarray(arrays[f"{name}:{i}"])) for i, k in enumerate(keys)})
            except KeyError as exc:
                raise wire.WireError(f"record {name!r}: array {exc} is not in the frame") from None
            used += len(keys)
        elif kind in ("config", "metric"):
            values = spec.get("values")
            if not isinstance(values, Mapping):
                raise wire.WireError(f"record {name!r}: 'values' must be an object")
            clean = {str(k): _value(v, f"{name}[{k!r}]") for k, v in values.items()}
            try:
                content[name] = ConfigRecord(clean) if kind == "config" else MetricRecord(clean)
            except (TypeError, ValueError) as exc:
                raise wire.WireError(f"record {name!r}: {exc}") from None
        else:
            raise wire.WireError(f"record {name!r} has type {kind!r}; valid: 'array', 'config', 'metric'")
    if used != len(arrays):
        raise wire.WireError(f"frame carries {len(arrays)} arrays, its records name {used}")
    return content


def death_of(socket_path: str | Path, pid: int, wait: float = DEATH_WAIT) -> str | None:
    """The supervisor's account of worker ``pid``'s death (``<socket>.deaths``), waiting up to ``wait`` s."""
    path = Path(f"{socket_path}.deaths")
    deadline = time.monotonic() + wait
    while True:
        if path.is_file():
            for line in reversed(path.read_text().splitlines()):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("pid") == pid:
                    return str(rec.get("cause", "died"))
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def _pending_refusal(sock: socket.socket) -> str | None:
    """The error frame a worker sent before closing, if one is waiting on ``sock`` (else None)."""
    try:
        sock.settimeout(1.0)
        header, _ = wire.recv_frame(sock, max_mb=0)
    except (OSError, ConnectionError, wire.WireError, ValueError):
        return None
    return str(header.get("error")) if header.get("kind") == "error" else None


def _refused(header: Mapping[str, Any]) -> None:
    """Raise the worker's refusal (an ``error`` frame) as :class:`common.wire.WireError`."""
    if header.get("kind") == "error":
        raise wire.WireError(f"the worker refused this message: {header.get('error')}")


def _greet(socket_path: str, timeout: float) -> tuple[bytes, socket.socket, dict[str, Any]]:
    """Connect and complete the handshake: (token, socket, worker's hello).

    A worker that is starting or being restarted (no socket yet, connection refused or reset
    before its hello) is waited for, up to ``timeout`` s; a socket or a peer that is not the
    worker's is refused at once (:class:`common.wire.WireError`).
    """
    deadline = time.monotonic() + timeout
    while True:
        sock = None
        try:
            wire.check_socket(socket_path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(1.0, timeout))
            sock.connect(socket_path)
            wire.check_peer(sock)
            token = wire.read_token(socket_path)
            mine = wire.nonce()
            wire.send_frame(sock, {"kind": "hello", "version": wire.VERSION, "nonce": mine})
            hello, _ = wire.recv_frame(sock, max_mb=0)
            _refused(hello)
            wire.expect(hello, "hello")
            wire.verify(token, hello.get("proof"), "worker", mine)
            sock.settimeout(None)
            return token, sock, hello
        except (TimeoutError, FileNotFoundError, ConnectionError, wire.WireMissing) as exc:
            if sock is not None:
                sock.close()
            if time.monotonic() >= deadline:
                if isinstance(exc, wire.WireMissing):
                    raise
                raise WorkerFailure(
                    f"no worker answering at {socket_path} after {timeout:.0f} s ({exc}); it is started next to "
                    "the SuperNode by `run.sh deploy supernode` (see its log)"
                ) from None
            time.sleep(0.1)
        except wire.WireError:
            if sock is not None:
                sock.close()
            raise


def forward(
    socket_path: str,
    message_type: str,
    message_id: str,
    content: RecordDict,
    run_id: int,
    node_config: Mapping[str, Any],
    run_config: Mapping[str, Any],
    max_mb: float = wire.DEFAULT_MAX_MB,
    timeout: float = CONNECT_TIMEOUT,
) -> tuple[RecordDict, dict[str, float]]:
    """Have the worker at ``socket_path`` handle one message; (reply content, timing in seconds).

    Raises :class:`common.wire.WireError` for a socket or a reply that is not the worker's (nothing
    is trained on it) and :class:`WorkerFailure` for a worker that is absent, failed or died.
    """
    t0 = time.perf_counter()
    table, arrays = to_wire(content)
    token, sock, hello = _greet(socket_path, timeout)
    pid = int(hello.get("pid", -1))
    with sock:
        request = {
            "kind": "request",
            "version": wire.VERSION,
            "message_id": message_id,
            "message_type": message_type,
            "run_id": int(run_id),
            "node_config": dict(node_config),
            "run_config": dict(run_config),
            "records": table,
            "code": code_digest(),
            "proof": wire.proof(token, "client", str(hello.get("nonce")), message_id),
        }
        sent = time.perf_counter()
        try:
            wire.send_frame(sock, request, arrays)
            header, reply_arrays = wire.recv_frame(sock, max_mb=max_mb)
        except (TimeoutError, ConnectionError) as exc:
            refusal = _pending_refusal(sock)
            if refusal is not None:  # the worker refused the request after its header and closed
                raise wire.WireError(f"the worker refused this message: {refusal}") from None
            cause = death_of(socket_path, pid)
            raise WorkerFailure(
                f"worker pid {pid} at {socket_path} stopped during this {message_type} message: "
                f"{cause or exc}; it is restarted for the next message"
            ) from None
        got = time.perf_counter()
        _refused(header)
    wire.expect(header, "reply")
    if header.get("message_id") != message_id:
        other = header.get("message_id")
        raise wire.WireError(
            f"worker replied for message {other!r}, this ClientApp asked about {message_id!r}: refused"
        )
    if not header.get("ok", False):
        raise WorkerFailure(f"worker pid {pid}: {header.get('error', 'failed without a reason')}")
    reply = from_wire(header.get("records", {}), reply_arrays)
    worker_s = float(header.get("seconds", 0.0))
    return reply, {
        P.NODE_SECONDS: worker_s,
        P.RELAY_SECONDS: max(0.0, (got - t0) - worker_s),
        "request-seconds": sent - t0,
    }
