"""The frames between a thin ClientApp and its node's warm worker: JSON and raw numpy buffers, no pickle.

A Flower SuperNode starts a fresh ``flwr-clientapp`` process for every message; the worker
(:mod:`client_app.worker`) is a long-lived process on the same device that keeps torch, the data
partition and the model skeletons loaded. They talk over a Unix socket, one connection per message:

1. client -> worker: ``hello`` frame with a random nonce;
2. worker -> client: ``hello`` with its pid, its own nonce and ``HMAC(token, "worker:" + client nonce)``;
3. client -> worker: the ``request`` (message type, run and node config, records) whose header holds
   ``HMAC(token, "client:" + worker nonce + ":" + message id)``; the worker checks it before it reads
   the arrays;
4. worker -> client: the ``reply`` naming the same message id.

The token is 32 random bytes the worker writes next to its socket, readable by its owner only
(:func:`token_path`). A socket that is not the worker's (wrong owner, group/other permissions, a
peer of another user, a process that cannot answer the challenge), a frame that is oversized or
malformed, and a reply for another message are refused with :class:`WireError`, which names the
bad value; nothing is trained on it.

Frame layout: ``MAGIC`` (4 bytes) | header length (uint32, big-endian) | body length (uint64) |
header (UTF-8 JSON object) | body (the arrays' bytes, concatenated in the order of
``header["arrays"]``, each ``[name, dtype, shape]``). Only plain numeric dtypes are accepted
(:data:`DTYPES`); shapes must account for the body to the byte. Pure: no Flower, no torch.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import socket
import stat
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"PFW1"
VERSION = 1
PREFIX = struct.Struct(">4sIQ")  # magic, header length, body length
MAX_HEADER_BYTES = 4 * 2**20
"""Largest header accepted (bytes): configs, metrics and the array table, never tensors."""
DEFAULT_MAX_MB = 1024.0
"""Default largest frame body (MB): far above a ResNet or VGG model, far below a device's memory."""
DTYPES = frozenset(
    np.dtype(t).str for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
) | frozenset(np.dtype(t).newbyteorder("<").str for t in ("float16", "float32", "float64"))
"""Array dtypes a frame may carry (numpy ``dtype.str``, little-endian): no objects, no strings, no structs."""
TOKEN_BYTES = 32


class WireError(ValueError):
    """A frame, a socket or a peer that is not what the protocol allows; the message names it."""


class WireMissing(WireError):
    """The worker's socket or token file is not there (yet): a worker starting or being restarted."""


def token_path(socket_path: str | os.PathLike[str]) -> Path:
    """Where the worker listening at ``socket_path`` keeps its token (owner-only file)."""
    return Path(f"{socket_path}.token")


def pid_path(socket_path: str | os.PathLike[str]) -> Path:
    """Where the worker listening at ``socket_path`` writes its process id."""
    return Path(f"{socket_path}.pid")


def new_token(socket_path: str | os.PathLike[str]) -> bytes:
    """Write a fresh random token for the worker at ``socket_path`` (mode 0600) and return it."""
    token = secrets.token_bytes(TOKEN_BYTES)
    path = token_path(socket_path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(token.hex().encode())
    os.replace(tmp, path)
    return token


def _owner_only(path: Path, what: str) -> os.stat_result:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise WireMissing(f"{what} {path} does not exist") from None
    if st.st_uid != os.getuid():
        raise WireError(f"{what} {path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}): refused")
    if st.st_mode & 0o077:
        raise WireError(f"{what} {path} has mode {stat.filemode(st.st_mode)}: it must be owner-only (0600/0700)")
    return st


def read_token(socket_path: str | os.PathLike[str]) -> bytes:
    """The token of the worker at ``socket_path``; its file must be this user's and owner-only."""
    path = token_path(socket_path)
    _owner_only(path, "worker token")
    text = path.read_text().strip()
    try:
        token = bytes.fromhex(text)
    except ValueError:
        raise WireError(f"worker token {path} is not hex") from None
    if len(token) != TOKEN_BYTES:
        raise WireError(f"worker token {path} has {len(token)} bytes, expected {TOKEN_BYTES}")
    return token


def check_socket(socket_path: str | os.PathLike[str]) -> None:
    """Refuse a socket path that is not a Unix socket owned by this user, owner-only, in an owner-only folder."""
    path = Path(socket_path)
    st = _owner_only(path, "worker socket")
    if not stat.S_ISSOCK(st.st_mode):
        raise WireError(f"worker socket {path} is not a Unix socket ({stat.filemode(st.st_mode)})")
    _owner_only(path.parent, "worker socket folder")


def check_peer(sock: socket.socket) -> int:
    """The peer's pid; refused unless it runs as this user (``SO_PEERCRED``, Linux)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    if uid != os.getuid():
        raise WireError(f"peer pid {pid} runs as uid {uid}, not as this user (uid {os.getuid()}): refused")
    return pid


def proof(token: bytes, role: str, *parts: str) -> str:
    """``HMAC-SHA256(token, role:part:...)`` as hex: what the other side checks."""
    return hmac.new(token, ":".join((role, *parts)).encode(), hashlib.sha256).hexdigest()


def verify(token: bytes, given: object, role: str, *parts: str) -> None:
    """Refuse ``given`` unless it is the proof of ``role`` over ``parts`` (constant-time compare)."""
    if not isinstance(given, str) or not hmac.compare_digest(given, proof(token, role, *parts)):
        raise WireError(f"the {role}'s proof does not match this worker's token: not the worker's peer, refused")


def nonce() -> str:
    """A fresh random challenge (hex)."""
    return secrets.token_hex(16)


def owner_only_folder(folder: Path) -> None:
    """Create ``folder`` with mode 0700 if missing; an existing one must be this user's and owner-only."""
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700)
    _owner_only(folder, "socket folder")


def bind_owner_only(path: Path) -> socket.socket:
    """Bind ``path`` (mode 0600) in an owner-only folder; a stale socket is replaced, anything else is refused.

    A missing folder is created with mode 0700; an existing one must already be this user's and
    owner-only (a shared folder such as ``/tmp`` is refused, never changed).
    """
    owner_only_folder(path.parent)
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise WireError(f"{path} exists and is not a socket: refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: a stale socket of a worker that died
        else:
            probe.close()
            raise WireError(f"another worker is already listening at {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


# ---------------------------------------------------------------- frames
def encode(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> list[bytes | memoryview]:
    """The parts of one frame (send them in order): prefix, header JSON, each array's bytes."""
    table, buffers = [], []
    for name, value in (arrays or {}).items():
        arr = np.asarray(value)
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")
        if arr.dtype.byteorder == ">" and arr.dtype.kind in "fiu":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if arr.dtype.str not in DTYPES:
            raise WireError(f"array {name!r} has dtype {arr.dtype}; a frame carries only {sorted(DTYPES)}")
        table.append([str(name), arr.dtype.str, list(arr.shape)])
        buffers.append(memoryview(arr.reshape(-1)).cast("B") if arr.nbytes else b"")
    head = json.dumps({**header, "arrays": table}, separators=(",", ":"), allow_nan=True).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise WireError(f"frame header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    body = sum(len(b) for b in buffers)
    return [PREFIX.pack(MAGIC, len(head), body), head, *buffers]


def send_frame(sock: socket.socket, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> int:
    """Send one frame; returns its size in bytes."""
    parts = encode(header, arrays)
    for part in parts:
        sock.sendall(part)
    return sum(len(p) for p in parts)


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"connection closed after {got} of {n} bytes of the {what}")
        got += k
    return buf


def _array_table(header: Mapping[str, Any], body_len: int) -> list[tuple[str, np.dtype, tuple[int, ...], int]]:
    table = header.get("arrays", [])
    if not isinstance(table, list):
        raise WireError(f"frame header 'arrays' is {type(table).__name__}, expected a list")
    rows, total, names = [], 0, set()
    for i, row in enumerate(table):
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and isinstance(row[2], list)):
            raise WireError(f"frame array entry {i} is {row!r}, expected [name, dtype, shape]")
        name, dtype, shape = row
        if name in names:
            raise WireError(f"frame names array {name!r} twice")
        names.add(name)
        if dtype not in DTYPES:
            raise WireError(f"frame array {name!r} has dtype {dtype!r}; allowed: {sorted(DTYPES)}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise WireError(f"frame array {name!r} has shape {shape!r}; expected non-negative integers")
        dt = np.dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize  # Python integers: a huge shape cannot wrap around
        if nbytes > body_len:
            raise WireError(f"frame array {name!r} has shape {shape!r}: {nbytes} B, more than the body's {body_len}")
        rows.append((name, dt, tuple(shape), nbytes))
        total += nbytes
    if total != body_len:
        raise WireError(f"frame body has {body_len} bytes but its array table accounts for {total}")
    return rows


def recv_frame(
    sock: socket.socket,
    max_mb: float = DEFAULT_MAX_MB,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read one frame: (header, arrays). ``check`` sees the header before the body is read.

    Refused with :class:`WireError`: a wrong magic, a header or body over the limits, a header
    that is not a JSON object, an array table that does not match the body. A peer that closes
    early raises :class:`ConnectionError`.
    """
    magic, head_len, body_len = PREFIX.unpack(bytes(_recv_exact(sock, PREFIX.size, "frame prefix")))
    if magic != MAGIC:
        raise WireError(f"frame starts with {bytes(magic)!r}, not {MAGIC!r}: not this protocol")
    if head_len > MAX_HEADER_BYTES:
        raise WireError(f"frame header of {head_len} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    limit = int(max_mb * 2**20)
    if body_len > limit:
        raise WireError(f"frame body of {body_len / 2**20:.1f} MB exceeds the limit of {max_mb:g} MB")
    try:
        header = json.loads(bytes(_recv_exact(sock, head_len, "frame header")))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"frame header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise WireError(f"frame header is a JSON {type(header).__name__}, expected an object")
    rows = _array_table(header, body_len)
    if check is not None:
        check(header)
    body = _recv_exact(sock, body_len, "frame body") if body_len else bytearray()
    arrays, offset = {}, 0
    for name, dt, shape, nbytes in rows:
        arrays[name] = np.frombuffer(body, dtype=dt, count=nbytes // dt.itemsize, offset=offset).reshape(shape)
        offset += nbytes
    return header, arrays


def expect(header: Mapping[str, Any], kind: str) -> None:
    """Refuse a frame whose ``kind`` is not ``kind`` or whose protocol version differs."""
    if header.get("kind") != kind:
        raise WireError(f"expected a {kind!r} frame, got kind={header.get('kind')!r}")
    if header.get("version", VERSION) != VERSION:
        raise WireError(f"peer speaks protocol version {header.get('version')!r}, this side {VERSION}")
