"""The warm worker and its wire protocol: frames, socket checks, records, handshake, serving loop, supervisor.

Fast tests exercise :mod:`common.wire` over ``socket.socketpair()`` and owner-only Unix sockets in
short ``/tmp`` folders, :mod:`client_app.relay` against fake listeners that are not the worker, and
:class:`client_app.worker.Server` in-process with recording fake handlers (no training). The slow
tests start the real supervisor (``python -m client_app.worker``): a real train message compared with
the in-process handler, the serving process killed by PID mid-message, and an out-of-memory kill at a
cgroup memory limit. Every process a test starts is stopped by PID at teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT, Processes
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from client_app import relay, worker
from client_app.relay import WorkerFailure
from common import protocol as P
from common import wire
from common.wire import WireError

MAX = wire.MAX_HEADER_BYTES


# ---------------------------------------------------------------- helpers
@pytest.fixture
def short_dir() -> Iterator[Path]:
    """An owner-only folder under /tmp: socket paths stay far below the 107-byte limit of AF_UNIX."""
    folder = Path(tempfile.mkdtemp(prefix="pfw-", dir="/tmp"))
    os.chmod(folder, 0o700)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _listen(path: Path, mode: int = 0o600) -> socket.socket:
    """A listening Unix socket at ``path`` with ``mode``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, mode)
    sock.listen(4)
    return sock


def _raw(
    header: object,
    body: bytes = b"",
    magic: bytes = wire.MAGIC,
    head_len: int | None = None,
    body_len: int | None = None,
) -> bytes:
    """A frame's bytes built by hand: ``header`` as JSON (or raw bytes), lengths overridable."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    hl = len(head) if head_len is None else head_len
    bl = len(body) if body_len is None else body_len
    return wire.PREFIX.pack(magic, hl, bl) + head + body


def _recv_raw(data: bytes, **kwargs: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``wire.recv_frame`` over a socketpair whose other end sent ``data`` and closed."""
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        return wire.recv_frame(b, **kwargs)


def _table(*rows: list[Any]) -> dict[str, Any]:
    return {"kind": "x", "arrays": list(rows)}


def _sample_content() -> RecordDict:
    """A RecordDict of every record type the protocol carries."""
    return RecordDict(
        {
            "arrays": ArrayRecord(
                {
                    "conv.weight": Array(np.arange(24, dtype=np.float32).reshape(2, 3, 4)),
                    "bn.num_batches_tracked": Array(np.array([5], dtype=np.int64)),
                    "mask": Array(np.array([True, False, True])),
                }
            ),
            "config": ConfigRecord(
                {"server-round": 3, "lr": 0.05, "strategy": "fedavg", "pre-eval": True, "held": [0, 2, 5]}
            ),
            "metrics": MetricRecord({"train-loss": 1.25, "num-examples": 270, "per-block": [0.5, 1.5]}),
        }
    )


def _assert_same_content(got: RecordDict, want: RecordDict) -> None:
    assert list(got.keys()) == list(want.keys())
    for name, record in want.items():
        assert type(got[name]) is type(record), name
        if isinstance(record, ArrayRecord):
            assert list(got[name].keys()) == list(record.keys())
            for key in record:
                a, b = got[name][key].numpy(), record[key].numpy()
                assert a.dtype == b.dtype and a.shape == b.shape, key
                np.testing.assert_array_equal(a, b)
        else:
            assert dict(got[name]) == dict(record)
            assert {k: type(v) for k, v in got[name].items()} == {k: type(v) for k, v in record.items()}


# ---------------------------------------------------------------- 1. frames round trip
def test_frame_round_trip_keeps_header_values_dtypes_and_shapes() -> None:
    arrays = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "f64": np.array([np.pi, -0.0, np.inf, -np.inf, np.nan]),
        "f16": np.array([1.5, -2.25], dtype=np.float16),
        "i64": np.array([-(2**63), 2**63 - 1, 0], dtype=np.int64),
        "u8": np.arange(256, dtype=np.uint8).reshape(16, 16),
        "bool": np.array([[True, False], [False, True]]),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "strided": np.arange(24.0).reshape(4, 6)[:, ::2],  # not contiguous: copied on the way
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
        "empty-last": np.zeros((3, 0), dtype=np.uint8),  # an empty array at the very end of the body
    }
    header = {"kind": "request", "n": 3, "x": 0.5, "s": "é", "flags": [True, None], "nested": {"a": [1, 2]}}
    a, b = socket.socketpair()
    with a, b:
        sent = wire.send_frame(a, header, arrays)
        got_header, got = wire.recv_frame(b)
    body = sum(v.nbytes for v in arrays.values())
    assert sent == sum(len(p) for p in wire.encode(header, arrays)) > wire.PREFIX.size + body
    assert {k: v for k, v in got_header.items() if k != "arrays"} == header
    assert [row[0] for row in got_header["arrays"]] == list(arrays)
    assert list(got) == list(arrays)
    for name, want in arrays.items():
        arr = got[name]
        assert arr.dtype == want.dtype, name
        assert arr.shape == want.shape, name
        np.testing.assert_array_equal(arr, want)
        assert arr.flags.writeable, f"{name} is read-only"
    got["f32"][0, 0] = 42.0  # writable, and writing one array leaves the others alone
    np.testing.assert_array_equal(got["f64"], arrays["f64"])
    assert got["f32"][0, 0] == 42.0


def test_frame_sends_big_endian_arrays_as_little_endian_with_the_same_values() -> None:
    big = np.array([1.5, -2.0, 1e300], dtype=">f8")
    ints = np.array([1, -2, 2**30], dtype=">i4")
    a, b = socket.socketpair()
    with a, b:
        wire.send_frame(a, {}, {"big": big, "ints": ints})
        header, got = wire.recv_frame(b)
    assert [row[1] for row in header["arrays"]] == ["<f8", "<i4"]
    np.testing.assert_array_equal(got["big"], big)
    np.testing.assert_array_equal(got["ints"], ints)


def test_frame_keeps_zero_dim_arrays() -> None:
    a, b = socket.socketpair()
    with a, b:
        wire.send_frame(a, {}, {"scalar": np.array(3.5), "count": np.array(7, dtype=np.int64)})
        header, got = wire.recv_frame(b)
    assert header["arrays"] == [["scalar", "<f8", []], ["count", "<i8", []]]
    assert got["scalar"].shape == () and got["scalar"] == 3.5
    assert got["count"].shape == () and got["count"] == 7


def test_recv_frame_reads_a_0d_table_entry_as_a_0d_array() -> None:
    body = np.array(2.5, dtype="<f4").tobytes()
    header, got = _recv_raw(_raw(_table(["s", "<f4", []]), body))
    assert got["s"].shape == () and got["s"].dtype == np.float32 and float(got["s"]) == 2.5
    assert got["s"].flags.writeable


# ---------------------------------------------------------------- 2. malformed frames
MALFORMED = [
    pytest.param(
        _raw({}, magic=b"XXXX"),
        {},
        re.escape("frame starts with b'XXXX', not b'PFW1': not this protocol"),
        id="wrong-magic",
    ),
    pytest.param(
        wire.PREFIX.pack(wire.MAGIC, MAX + 1, 0),
        {},
        f"frame header of {MAX + 1} bytes exceeds the limit of {MAX}",
        id="header-too-long",
    ),
    pytest.param(
        _raw({}, body_len=3 * 2**20),
        {"max_mb": 2},
        "frame body of 3.0 MB exceeds the limit of 2 MB",
        id="body-over-max",
    ),
    pytest.param(
        _raw({}, body_len=1), {"max_mb": 0}, "frame body of 0.0 MB exceeds the limit of 0 MB", id="hello-body"
    ),
    pytest.param(_raw(b"{not json"), {}, r"frame header is not JSON \(Expecting property name", id="not-json"),
    pytest.param(_raw(b'"\xff"'), {}, r"frame header is not JSON \('utf-8' codec can't decode", id="not-utf8"),
    pytest.param(_raw([1, 2]), {}, "frame header is a JSON list, expected an object", id="json-list"),
    pytest.param(_raw("hello"), {}, "frame header is a JSON str, expected an object", id="json-str"),
    pytest.param(_raw({"arrays": {"a": 1}}), {}, "frame header 'arrays' is dict, expected a list", id="table-dict"),
    pytest.param(
        _raw(_table(["a", "<f4"])),
        {},
        re.escape("frame array entry 0 is ['a', '<f4'], expected [name, dtype, shape]"),
        id="row-short",
    ),
    pytest.param(
        _raw(_table(["a", "<f4", [3]], ["b", "|u1", [2]]), bytes(12)),
        {},
        "frame body has 12 bytes but its array table accounts for 14",
        id="sizes-do-not-add-up",
    ),
    pytest.param(
        _raw(_table(["a", "<f4", [2]]), bytes(9)),
        {},
        "frame body has 9 bytes but its array table accounts for 8",
        id="body-too-long",
    ),
    pytest.param(
        _raw(_table(["a", "|O", [1]]), bytes(8)), {}, r"frame array 'a' has dtype '\|O'; allowed: \[", id="dtype-object"
    ),
    pytest.param(
        _raw(_table(["a", "<U3", [1]]), bytes(12)), {}, "frame array 'a' has dtype '<U3'; allowed", id="dtype-str"
    ),
    pytest.param(
        _raw(_table(["a", ">f4", [1]]), bytes(4)), {}, "frame array 'a' has dtype '>f4'; allowed", id="dtype-big-endian"
    ),
    pytest.param(
        _raw(_table(["a", "<c8", [1]]), bytes(8)), {}, "frame array 'a' has dtype '<c8'; allowed", id="dtype-complex"
    ),
    pytest.param(
        _raw(_table(["a", "<f4", [2, -1]])),
        {},
        re.escape("frame array 'a' has shape [2, -1]; expected non-negative"),
        id="shape-negative",
    ),
    pytest.param(
        _raw(_table(["a", "<f4", [1.5]]), bytes(4)),
        {},
        re.escape("frame array 'a' has shape [1.5]; expected"),
        id="shape-float",
    ),
    pytest.param(
        _raw(_table(["a", "<f4", [True]]), bytes(4)),
        {},
        re.escape("frame array 'a' has shape [True]; expected"),
        id="shape-bool",
    ),
    pytest.param(
        _raw(_table(["a", "<f4", ["2"]]), bytes(8)),
        {},
        re.escape("frame array 'a' has shape ['2']; expected"),
        id="shape-str",
    ),
    pytest.param(
        _raw(_table(["a", "<f4", [1]], ["a", "<f4", [1]]), bytes(8)),
        {},
        "frame names array 'a' twice",
        id="duplicate-name",
    ),
]


@pytest.mark.parametrize(("data", "kwargs", "match"), MALFORMED)
def test_malformed_frame_is_refused_naming_the_problem(data: bytes, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(WireError, match=match):
        _recv_raw(data, **kwargs)


def test_limits_are_checked_before_reading_header_or_body() -> None:
    """An oversized header or body is refused from the 16-byte prefix alone: nothing else is sent here."""
    for prefix in (wire.PREFIX.pack(wire.MAGIC, MAX + 1, 0), wire.PREFIX.pack(wire.MAGIC, 2, 2**40)):
        a, b = socket.socketpair()
        with a, b:
            b.settimeout(2)  # a reader that waited for the header would time out instead
            a.sendall(prefix)
            with pytest.raises(WireError, match="exceeds the limit"):
                wire.recv_frame(b)


def test_check_sees_the_header_before_the_body_is_read() -> None:
    seen: list[dict[str, Any]] = []

    def check(header: dict[str, Any]) -> None:
        seen.append(header)
        raise WireError("refused by check")

    data = _raw(_table(["a", "<f8", [4]]), body_len=32)  # the 32 body bytes are never sent
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(2)
        a.sendall(data)
        with pytest.raises(WireError, match="refused by check"):
            wire.recv_frame(b, check=check)
    assert seen == [{"kind": "x", "arrays": [["a", "<f8", [4]]]}]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        pytest.param(b"PFW1\x00", "connection closed after 5 of 16 bytes of the frame prefix", id="prefix"),
        pytest.param(_raw({"k": 1})[:-2], "connection closed after 6 of 8 bytes of the frame header", id="header"),
        pytest.param(
            _raw(_table(["a", "<f4", [3]]), bytes(5), body_len=12),
            "connection closed after 5 of 12 bytes of the frame body",
            id="body",
        ),
    ],
)
def test_peer_closing_mid_frame_is_a_connection_error(data: bytes, match: str) -> None:
    with pytest.raises(ConnectionError, match=match):
        _recv_raw(data)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.array([1, "a"], dtype=object), "array 'v' has dtype object; a frame carries only"),
        (np.array(["abc"]), "array 'v' has dtype <U3; a frame carries only"),
        (np.array([1 + 2j]), "array 'v' has dtype complex128; a frame carries only"),
        (np.zeros(2, dtype=[("x", "<f4"), ("y", "<i4")]), r"array 'v' has dtype \[\('x', '<f4'\), \('y', '<i4'\)\]"),
    ],
)
def test_encode_refuses_arrays_a_frame_cannot_carry(value: np.ndarray, match: str) -> None:
    with pytest.raises(WireError, match=match):
        wire.encode({"kind": "x"}, {"v": value})


def test_encode_refuses_an_oversized_header() -> None:
    with pytest.raises(WireError, match=rf"frame header of \d+ bytes exceeds {MAX}"):
        wire.encode({"kind": "x", "blob": "a" * MAX})


def test_shape_too_large_for_int64_is_refused_as_wire_error() -> None:
    with pytest.raises(WireError, match="frame array 'a' has shape"):
        _recv_raw(_raw(_table(["a", "|u1", [2**70]])))


def test_shape_whose_size_wraps_int64_is_refused_as_wire_error() -> None:
    with pytest.raises(WireError, match="frame (array 'a' has shape|body has 0 bytes)"):
        _recv_raw(_raw(_table(["a", "|u1", [2**32, 2**32]])))


# ---------------------------------------------------------------- 3. socket checks
def test_check_socket_refuses_what_is_not_an_owner_only_socket(short_dir: Path) -> None:
    missing = short_dir / "none.sock"
    with pytest.raises(WireError, match=f"worker socket {missing} does not exist"):
        wire.check_socket(missing)

    regular = short_dir / "file.sock"
    regular.write_text("")
    os.chmod(regular, 0o600)
    with pytest.raises(WireError, match=re.escape(f"worker socket {regular} is not a Unix socket (-rw-------)")):
        wire.check_socket(regular)

    shared = short_dir / "shared.sock"
    match = re.escape(f"{shared} has mode srw-rw-rw-: it must be owner-only")
    with _listen(shared, 0o666), pytest.raises(WireError, match=match):
        wire.check_socket(shared)
    group = short_dir / "group.sock"
    match = re.escape(f"{group} has mode srw-rw----: it must be owner-only")
    with _listen(group, 0o660), pytest.raises(WireError, match=match):
        wire.check_socket(group)

    open_dir = short_dir / "open"
    open_dir.mkdir(mode=0o700)
    in_open = open_dir / "w.sock"
    with _listen(in_open):
        os.chmod(open_dir, 0o755)
        with pytest.raises(
            WireError, match=re.escape(f"worker socket folder {open_dir} has mode drwxr-xr-x: it must be owner-only")
        ):
            wire.check_socket(in_open)
        os.chmod(open_dir, 0o700)
        assert wire.check_socket(in_open) is None  # the same socket once its folder is owner-only

    good = short_dir / "good.sock"
    with _listen(good):
        assert stat.S_IMODE(good.stat().st_mode) == 0o600
        assert stat.S_IMODE(short_dir.stat().st_mode) == 0o700
        assert wire.check_socket(good) is None
        assert wire.check_socket(str(good)) is None


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a socket to another user")
def test_check_socket_refuses_a_socket_of_another_user(short_dir: Path) -> None:
    sock = short_dir / "other.sock"
    with _listen(sock):
        os.chown(sock, 65534, -1)
        with pytest.raises(
            WireError, match=re.escape(f"belongs to uid 65534, not to this user (uid {os.getuid()}): refused")
        ):
            wire.check_socket(sock)


def test_token_file_must_be_owner_only_and_well_formed(short_dir: Path) -> None:
    path = short_dir / "w.sock"
    token = wire.new_token(path)
    assert len(token) == wire.TOKEN_BYTES
    assert stat.S_IMODE(wire.token_path(path).stat().st_mode) == 0o600
    assert wire.read_token(path) == token
    assert wire.new_token(path) != token  # a fresh one each time
    os.chmod(wire.token_path(path), 0o644)
    with pytest.raises(WireError, match=re.escape(f"worker token {wire.token_path(path)} has mode -rw-r--r--")):
        wire.read_token(path)
    os.chmod(wire.token_path(path), 0o600)
    wire.token_path(path).write_text("zz")
    with pytest.raises(WireError, match="is not hex"):
        wire.read_token(path)
    wire.token_path(path).write_text("ab" * 8)
    with pytest.raises(WireError, match="has 8 bytes, expected 32"):
        wire.read_token(path)


def test_proof_binds_token_role_and_parts() -> None:
    token = bytes(range(32))
    good = wire.proof(token, "client", "n1", "m1")
    wire.verify(token, good, "client", "n1", "m1")
    for given, role, parts in (
        (good, "worker", ("n1", "m1")),
        (good, "client", ("n1", "m2")),
        (good, "client", ("n2", "m1")),
        (wire.proof(bytes(32), "client", "n1", "m1"), "client", ("n1", "m1")),
        (None, "client", ("n1", "m1")),
        (good.upper(), "client", ("n1", "m1")),
    ):
        with pytest.raises(WireError, match=f"the {role}'s proof does not match this worker's token"):
            wire.verify(token, given, role, *parts)


# ---------------------------------------------------------------- 4. records <-> wire
def test_records_round_trip_through_a_frame() -> None:
    content = _sample_content()
    table, arrays = relay.to_wire(content)
    assert table["arrays"] == {"type": "array", "keys": ["conv.weight", "bn.num_batches_tracked", "mask"]}
    assert list(arrays) == ["arrays:0", "arrays:1", "arrays:2"]
    assert table["config"]["type"] == "config" and table["metrics"]["type"] == "metric"
    a, b = socket.socketpair()
    with a, b:
        wire.send_frame(a, {"records": table}, arrays)
        header, got_arrays = wire.recv_frame(b)
    back = relay.from_wire(header["records"], got_arrays)
    _assert_same_content(back, content)
    assert back["config"]["pre-eval"] is True and back["config"]["held"] == [0, 2, 5]


@pytest.mark.parametrize(
    ("table", "arrays", "match"),
    [
        ({"x": {"type": "blob"}}, {}, "record 'x' has type 'blob'; valid: 'array', 'config', 'metric'"),
        ({"x": 3}, {}, "record 'x' has type None; valid"),
        (
            {"a": {"type": "array", "keys": ["w", "b"]}},
            {"a:0": np.zeros(2)},
            "record 'a': array 'a:1' is not in the frame",
        ),
        ({"a": {"type": "array", "keys": ["w"]}}, {}, "record 'a': array 'a:0' is not in the frame"),
        (
            {"a": {"type": "array", "keys": ["w"]}},
            {"a:0": np.zeros(2), "a:1": np.zeros(2)},
            "frame carries 2 arrays, its records name 1",
        ),
        ({}, {"stray:0": np.zeros(1)}, "frame carries 1 arrays, its records name 0"),
        ({"a": {"type": "array", "keys": "w"}}, {}, "record 'a': 'keys' must be a list of strings"),
        ({"c": {"type": "config", "values": [1]}}, {}, "record 'c': 'values' must be an object"),
        (
            {"c": {"type": "config", "values": {"k": {"x": 1}}}},
            {},
            r"c\['k'\] holds a dict; only numbers, strings, booleans and lists pass",
        ),
        ({"m": {"type": "metric", "values": {"k": "text"}}}, {}, "record 'm': Not all values are of valid type"),
        ("not a table", {}, "records table is str, expected an object"),
    ],
)
def test_from_wire_refuses_a_table_that_does_not_match(table: Any, arrays: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(WireError, match=match):
        relay.from_wire(table, arrays)


def test_to_wire_refuses_values_the_protocol_does_not_carry() -> None:
    with pytest.raises(WireError, match=r"config\['blob'\] holds a bytes; only numbers, strings, booleans and lists"):
        relay.to_wire(RecordDict({"config": ConfigRecord({"ok": 1, "blob": b"\x00\x01"})}))
    with pytest.raises(WireError, match=r"config\['blobs'\] holds a list; only"):
        relay.to_wire(RecordDict({"config": ConfigRecord({"blobs": [b"a", b"b"]})}))


# ---------------------------------------------------------------- 5. fake listeners: not the worker
class _Stop(Exception):
    """Raised by a fake's ``check`` to stop reading a frame after its header."""


class FakeListener:
    """A listener at an owner-only socket that is not the worker; ``play(conn, self)`` is its side.

    It records the frames it received (``frames``, headers only where it refused before the body)
    and the number of arrays it read from them (``arrays``).
    """

    def __init__(self, path: Path, play: Callable[[socket.socket, FakeListener], None]) -> None:
        self.path = path
        self.sock = _listen(path)
        self.token = wire.new_token(path)
        self.play = play
        self.frames: list[dict[str, Any]] = []
        self.arrays = 0
        self.unread = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def recv(self, conn: socket.socket) -> dict[str, Any]:
        header, arrays = wire.recv_frame(conn)
        self.frames.append(header)
        self.arrays += len(arrays)
        return header

    def recv_header(self, conn: socket.socket) -> dict[str, Any]:
        """Read a frame's header only (as the worker does before it refuses), never its arrays."""
        got: dict[str, Any] = {}

        def check(header: dict[str, Any]) -> None:
            got.update(header)
            raise _Stop

        with contextlib.suppress(_Stop):
            wire.recv_frame(conn, check=check)
        self.frames.append(got)
        return got

    def expect_closed(self, conn: socket.socket) -> None:
        """The client hung up without sending anything more."""
        assert conn.recv(1) == b"", "the client sent more after the refusal"

    def _run(self) -> None:
        self.sock.settimeout(10)
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(10)
                self.play(conn, self)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def join(self) -> None:
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive()
        assert self.error is None, f"the fake failed: {self.error!r}"


def _forward(path: Path, content: RecordDict | None = None, mid: str = "msg-1", **kwargs: Any) -> Any:
    return relay.forward(
        str(path),
        "train",
        mid,
        _sample_content() if content is None else content,
        run_id=5,
        node_config={"partition-id": 0, "num-partitions": 2},
        run_config={"model": "smallcnn"},
        **{"timeout": 5.0, **kwargs},
    )


def _worker_hello(fake: FakeListener, hello: dict[str, Any], proof: str | None = None) -> dict[str, Any]:
    mine = wire.nonce()
    answer = wire.proof(fake.token, "worker", str(hello["nonce"])) if proof is None else proof
    return {"kind": "hello", "version": wire.VERSION, "pid": 4242, "nonce": mine, "proof": answer}


def test_forward_refuses_a_listener_that_cannot_prove_the_token(short_dir: Path) -> None:
    def play(conn: socket.socket, fake: FakeListener) -> None:
        hello = fake.recv(conn)
        wire.send_frame(conn, _worker_hello(fake, hello, proof="0" * 64))
        fake.expect_closed(conn)  # no request after a wrong proof

    fake = FakeListener(short_dir / "w.sock", play)
    with pytest.raises(WireError, match="the worker's proof does not match this worker's token: not the worker's peer"):
        _forward(fake.path)
    fake.join()
    assert [f["kind"] for f in fake.frames] == ["hello"]
    assert fake.arrays == 0  # no request, no arrays ever reached it


def test_forward_refuses_a_reply_for_another_message(short_dir: Path) -> None:
    def play(conn: socket.socket, fake: FakeListener) -> None:
        hello = fake.recv(conn)
        mine = _worker_hello(fake, hello)
        wire.send_frame(conn, mine)
        request = fake.recv(conn)
        wire.verify(fake.token, request["proof"], "client", mine["nonce"], request["message_id"])
        table, arrays = relay.to_wire(RecordDict({"arrays": ArrayRecord({"w": Array(np.full(3, 9.0))})}))
        reply = {"kind": "reply", "version": wire.VERSION, "message_id": "msg-0", "ok": True, "records": table}
        wire.send_frame(conn, reply, arrays)
        fake.expect_closed(conn)

    fake = FakeListener(short_dir / "w.sock", play)
    with pytest.raises(
        WireError, match="worker replied for message 'msg-0', this ClientApp asked about 'msg-1': refused"
    ):
        _forward(fake.path)
    fake.join()
    assert [f["kind"] for f in fake.frames] == ["hello", "request"]
    request = fake.frames[1]
    assert request["message_id"] == "msg-1" and request["message_type"] == "train" and request["run_id"] == 5
    assert request["code"] == relay.code_digest()
    assert fake.arrays == 3  # the request's arrays; its reply's arrays were refused by the client


@pytest.mark.parametrize("when", ["hello", "request"])
def test_forward_raises_the_refusal_of_an_error_frame(short_dir: Path, when: str) -> None:
    def play(conn: socket.socket, fake: FakeListener) -> None:
        hello = fake.recv(conn)
        if when == "request":
            wire.send_frame(conn, _worker_hello(fake, hello))
            fake.recv_header(conn)
        wire.send_frame(conn, {"kind": "error", "version": wire.VERSION, "error": f"no thanks at {when}"})
        if when == "hello":
            fake.expect_closed(conn)
        else:  # take the unread body off the socket (as bytes, not arrays) until the client hangs up
            while chunk := conn.recv(65536):
                fake.unread += len(chunk)

    fake = FakeListener(short_dir / "w.sock", play)
    with pytest.raises(WireError, match=f"the worker refused this message: no thanks at {when}"):
        _forward(fake.path)
    fake.join()
    assert [f["kind"] for f in fake.frames] == (["hello"] if when == "hello" else ["hello", "request"])
    assert fake.arrays == 0  # the refusing side never read the arrays
    assert fake.unread == (
        0 if when == "hello" else sum(a.nbytes for a in relay.to_wire(_sample_content())[1].values())
    )


def test_forward_refuses_a_socket_in_a_shared_folder_without_connecting(short_dir: Path) -> None:
    folder = short_dir / "shared"
    folder.mkdir(mode=0o700)
    path = folder / "w.sock"
    with _listen(path) as listener:
        wire.new_token(path)
        os.chmod(folder, 0o755)
        with pytest.raises(WireError, match=re.escape(f"worker socket folder {folder} has mode drwxr-xr-x")):
            _forward(path)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # no connection was ever made


def test_forward_refuses_a_token_readable_by_others(short_dir: Path) -> None:
    path = short_dir / "w.sock"
    with _listen(path) as listener:
        wire.new_token(path)
        os.chmod(wire.token_path(path), 0o644)
        with pytest.raises(WireError, match=re.escape(f"worker token {wire.token_path(path)} has mode -rw-r--r--")):
            _forward(path)
        listener.settimeout(1)
        conn, _ = listener.accept()  # it connected (to check the peer) but sent nothing
        with conn:
            conn.settimeout(1)
            assert conn.recv(1) == b""


def test_forward_without_a_worker_names_the_missing_socket(short_dir: Path) -> None:
    path = short_dir / "none.sock"
    t0 = time.monotonic()
    with pytest.raises(WireError, match=f"worker socket {path} does not exist"):
        _forward(path, timeout=0.3)
    assert 0.3 <= time.monotonic() - t0 < 3


def test_forward_to_a_listener_that_never_answers_is_a_worker_failure(short_dir: Path) -> None:
    path = short_dir / "w.sock"
    with _listen(path):
        wire.new_token(path)
        with pytest.raises(WorkerFailure, match=f"no worker answering at {path} after 1 s"):
            _forward(path, timeout=1.0)  # connected, hello sent, never answered: timed out


# ---------------------------------------------------------------- 6. the serving loop in-process
@pytest.fixture(scope="module")
def handlers_module() -> Any:
    """client_app.handlers (imports torch once for this module; nothing is trained by the fast tests)."""
    import client_app.handlers

    return client_app.handlers


class Recorder:
    """Fake handlers: record each call; ``train`` echoes its content plus a metric."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple[str, RecordDict, Context]] = []
        self.fail = fail

    def handler(self, kind: str) -> Callable[[RecordDict, Context], RecordDict]:
        def run(content: RecordDict, context: Context) -> RecordDict:
            self.calls.append((kind, content, context))
            if self.fail is not None:
                raise self.fail
            reply = RecordDict({k: v for k, v in content.items() if k != "metrics"})
            reply[P.METRICS] = MetricRecord({"seen": float(len(self.calls))})
            return reply

        return run

    def table(self) -> dict[str, Callable[[RecordDict, Context], RecordDict]]:
        return {kind: self.handler(kind) for kind in ("query", "train", "evaluate")}


@pytest.fixture
def recorder(handlers_module: Any, monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(handlers_module, "HANDLERS", rec.table())
    monkeypatch.delenv(worker.LIMIT_ENV, raising=False)
    return rec


TOKEN = bytes(range(32))


class PairServer:
    """``Server.handle`` on one end of a socketpair, in a thread; the test plays the client on ``cli``."""

    def __init__(self, max_mb: float = 16.0) -> None:
        self.server = worker.Server(Path("/nonexistent/w.sock"), max_mb)
        self.server.token = TOKEN
        srv, self.cli = socket.socketpair()
        self.cli.settimeout(5)
        self.error: BaseException | None = None

        def run() -> None:
            with srv:
                try:
                    self.server.handle(srv)
                except BaseException as exc:  # reported by the test
                    self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def hello(self) -> str:
        """The client's side of the handshake; returns the worker's nonce (its proof checked)."""
        mine = wire.nonce()
        wire.send_frame(self.cli, {"kind": "hello", "version": wire.VERSION, "nonce": mine})
        hello, arrays = wire.recv_frame(self.cli, max_mb=0)
        assert hello["kind"] == "hello" and hello["pid"] == os.getpid() and arrays == {}
        wire.verify(TOKEN, hello["proof"], "worker", mine)
        return str(hello["nonce"])

    def finish(self) -> None:
        self.thread.join(10)
        self.cli.close()
        assert not self.thread.is_alive(), "Server.handle did not return"
        assert self.error is None, f"Server.handle raised {self.error!r}"


def _request(nonce: str, mid: str = "m-1", content: RecordDict | None = None, **over: Any) -> tuple[dict, dict]:
    table, arrays = relay.to_wire(_sample_content() if content is None else content)
    header = {
        "kind": "request",
        "version": wire.VERSION,
        "message_id": mid,
        "message_type": "train",
        "run_id": 7,
        "node_config": {"partition-id": 1, "num-partitions": 3},
        "run_config": {"model": "smallcnn", "seed": 4},
        "records": table,
        "code": relay.code_digest(),
        "proof": wire.proof(TOKEN, "client", nonce, mid),
    }
    header.update(over)
    return header, arrays


def test_server_handles_a_valid_request(recorder: Recorder) -> None:
    pair = PairServer()
    nonce = pair.hello()
    header, arrays = _request(nonce)
    wire.send_frame(pair.cli, header, arrays)
    reply, reply_arrays = wire.recv_frame(pair.cli)
    pair.finish()
    assert reply["kind"] == "reply" and reply["message_id"] == "m-1" and reply["ok"] is True, reply
    assert reply["seconds"] >= 0
    back = relay.from_wire(reply["records"], reply_arrays)
    want = _sample_content()
    assert dict(back[P.METRICS]) == {"seen": 1.0}
    _assert_same_content(
        RecordDict({k: back[k] for k in ("arrays", "config")}), RecordDict({k: want[k] for k in ("arrays", "config")})
    )
    [(kind, content, ctx)] = recorder.calls
    assert kind == "train"
    _assert_same_content(content, want)
    assert (ctx.run_id, ctx.node_config, ctx.run_config) == (
        7,
        {"partition-id": 1, "num-partitions": 3},
        {"model": "smallcnn", "seed": 4},
    )
    assert pair.server.served == 1


@pytest.mark.parametrize(
    "proof",
    [
        pytest.param("0" * 64, id="garbage"),
        pytest.param(None, id="missing"),
        pytest.param("other-message", id="for-another-message"),
        pytest.param("worker-role", id="worker-role"),
        pytest.param("other-token", id="other-token"),
    ],
)
def test_server_refuses_a_request_with_a_wrong_proof_before_reading_its_arrays(
    recorder: Recorder, proof: str | None
) -> None:
    pair = PairServer()
    nonce = pair.hello()
    given = {
        "other-message": wire.proof(TOKEN, "client", nonce, "m-0"),
        "worker-role": wire.proof(TOKEN, "worker", nonce, "m-1"),
        "other-token": wire.proof(bytes(32), "client", nonce, "m-1"),
    }.get(proof or "", proof)
    header, arrays = _request(nonce, proof=given)
    parts = wire.encode(header, arrays)
    pair.cli.sendall(b"".join(bytes(p) for p in parts[:2]))  # prefix and header: it must answer without the arrays
    refusal, got = wire.recv_frame(pair.cli, max_mb=0)
    pair.finish()
    assert refusal["kind"] == "error" and got == {}
    assert refusal["error"] == "the client's proof does not match this worker's token: not the worker's peer, refused"
    assert recorder.calls == [] and pair.server.served == 0 and pair.server.contexts == {}


def test_server_refuses_a_request_from_other_code(recorder: Recorder) -> None:
    pair = PairServer()
    nonce = pair.hello()
    header, arrays = _request(nonce, code="0123456789abcdef")
    wire.send_frame(pair.cli, header, arrays)
    reply, got = wire.recv_frame(pair.cli)
    pair.finish()
    assert reply["kind"] == "reply" and reply["message_id"] == "m-1" and reply["ok"] is False and got == {}
    assert reply["error"].startswith(
        "WireError: the run's app code (digest '0123456789abcdef') differs from this "
        f"worker's ('{relay.code_digest()}', "
    )
    assert recorder.calls == []


def test_server_refuses_an_unknown_message_type(recorder: Recorder) -> None:
    pair = PairServer()
    nonce = pair.hello()
    header, arrays = _request(nonce, message_type="fit")
    wire.send_frame(pair.cli, header, arrays)
    reply, _ = wire.recv_frame(pair.cli)
    pair.finish()
    assert reply["ok"] is False and reply["message_id"] == "m-1"
    assert reply["error"] == "WireError: message_type='fit'; valid: ['evaluate', 'query', 'train']"
    assert recorder.calls == []


def test_server_refuses_a_body_over_its_limit(recorder: Recorder) -> None:
    pair = PairServer(max_mb=1.0)
    nonce = pair.hello()
    big = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(2**19, dtype=np.float32))})})  # 2 MB
    header, arrays = _request(nonce, content=big)
    parts = wire.encode(header, arrays)
    pair.cli.sendall(b"".join(bytes(p) for p in parts[:2]))  # one write: the worker refuses after the prefix
    refusal, _ = wire.recv_frame(pair.cli, max_mb=0)
    pair.finish()
    assert refusal == {
        "kind": "error",
        "version": wire.VERSION,
        "error": "frame body of 2.0 MB exceeds the limit of 1 MB",
        "arrays": [],
    }
    assert recorder.calls == []


def test_server_refuses_a_first_frame_that_is_not_a_hello(recorder: Recorder) -> None:
    pair = PairServer()
    wire.send_frame(pair.cli, {"kind": "request", "version": wire.VERSION, "nonce": "n"})
    refusal, _ = wire.recv_frame(pair.cli, max_mb=0)
    pair.finish()
    assert refusal["kind"] == "error" and refusal["error"] == "expected a 'hello' frame, got kind='request'"
    assert recorder.calls == []


def test_server_refuses_another_protocol_version(recorder: Recorder) -> None:
    pair = PairServer()
    wire.send_frame(pair.cli, {"kind": "hello", "version": 99, "nonce": "n"})
    refusal, _ = wire.recv_frame(pair.cli, max_mb=0)
    pair.finish()
    assert refusal["error"] == f"peer speaks protocol version 99, this side {wire.VERSION}"


def test_server_answers_a_hello_with_an_overflowing_shape_with_an_error_frame(recorder: Recorder) -> None:
    pair = PairServer()
    pair.cli.sendall(_raw({"kind": "hello", "version": wire.VERSION, "nonce": "n", "arrays": [["a", "|u1", [2**70]]]}))
    refusal, _ = wire.recv_frame(pair.cli, max_mb=0)
    pair.finish()
    assert refusal["kind"] == "error" and "frame array 'a' has shape" in refusal["error"]


def test_server_reports_a_handler_failure_in_the_reply(handlers_module: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(fail=RuntimeError("boom at step 3"))
    monkeypatch.setattr(handlers_module, "HANDLERS", rec.table())
    pair = PairServer()
    nonce = pair.hello()
    header, arrays = _request(nonce, message_type="evaluate")
    wire.send_frame(pair.cli, header, arrays)
    reply, got = wire.recv_frame(pair.cli)
    pair.finish()
    assert reply["ok"] is False and reply["error"] == "RuntimeError: boom at step 3" and got == {}
    assert [c[0] for c in rec.calls] == ["evaluate"] and pair.server.served == 1


def test_server_keeps_each_runs_context_and_drops_the_oldest() -> None:
    server = worker.Server(Path("/nonexistent/w.sock"), 1.0)
    first = server.context(1, {"partition-id": 0}, {"lr": 0.1})
    first.state["kept"] = ConfigRecord({"x": 1})
    again = server.context(1, {"partition-id": 0}, {"lr": 0.2})
    assert again is first and again.run_config == {"lr": 0.2} and "kept" in again.state
    second = server.context(2, {}, {})
    assert second is not first and second.run_id == 2
    server.context(3, {}, {})
    assert list(server.contexts) == [2, 3]  # KEEP_RUNS = 2: run 1's node state is dropped
    assert worker.KEEP_RUNS == 2


class ThreadWorker:
    """``Server.handle`` behind a real owner-only Unix socket, in a thread, for ``n`` connections."""

    def __init__(self, path: Path, n: int, max_mb: float = wire.DEFAULT_MAX_MB) -> None:
        self.path = path
        self.sock = _listen(path)
        self.server = worker.Server(path, max_mb)
        self.server.token = wire.new_token(path)
        self.error: BaseException | None = None

        def run() -> None:
            self.sock.settimeout(15)
            try:
                for _ in range(n):
                    conn, _ = self.sock.accept()
                    with conn:
                        self.server.handle(conn)
            except BaseException as exc:  # reported by the test
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(20)
        self.sock.close()
        assert not self.thread.is_alive() and self.error is None, self.error


def test_forward_through_the_in_process_server(recorder: Recorder, short_dir: Path) -> None:
    served = ThreadWorker(short_dir / "w.sock", n=2)
    reply, timing = _forward(served.path)
    _assert_same_content(RecordDict({"arrays": reply["arrays"]}), RecordDict({"arrays": _sample_content()["arrays"]}))
    assert dict(reply[P.METRICS]) == {"seen": 1.0}
    assert set(timing) == {P.NODE_SECONDS, P.RELAY_SECONDS, "request-seconds"}
    assert all(v >= 0 for v in timing.values())
    recorder.fail = ValueError("no partition 9")
    with pytest.raises(WorkerFailure, match=rf"^worker pid {os.getpid()}: ValueError: no partition 9$"):
        _forward(served.path, mid="msg-2")
    served.join()
    assert [c[0] for c in recorder.calls] == ["train", "train"]
    assert recorder.calls[0][2] is recorder.calls[1][2]  # the same run: the same Context
    assert served.server.served == 2


def test_forward_reports_the_workers_refusal_of_an_oversized_body(
    recorder: Recorder, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay, "death_of", lambda path, pid, wait=0.0: None)  # no supervisor: do not wait 3 s
    served = ThreadWorker(short_dir / "w.sock", n=1, max_mb=1.0)
    big = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(2**22, dtype=np.float32))})})  # 16 MB
    try:
        with pytest.raises((WireError, WorkerFailure), match="frame body of 16.0 MB exceeds the limit of 1 MB"):
            _forward(served.path, content=big)
    finally:
        served.join()
    assert recorder.calls == []


# ---------------------------------------------------------------- 7-9. the real supervisor (slow)
class WorkerHome:
    """A supervisor started by a test: its socket in a short owner-only /tmp folder, its log, its workers."""

    def __init__(self, folder: Path, processes: Processes) -> None:
        self.folder = folder
        self.sock = folder / "w.sock"
        self.processes = processes
        self.proc: subprocess.Popen | None = None
        self.pids: set[int] = set()

    def start(self, *extra: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop(worker.LIMIT_ENV, None)
        args = [sys.executable, "-m", "client_app.worker", "--socket", str(self.sock), *extra]
        self.proc = self.processes.start("worker", args, env=env, cwd=ROOT)
        return self.proc

    def log(self) -> str:
        return self.processes.log("worker")

    def serving_pid(self, other_than: int | None = None, timeout: float = 60.0) -> int:
        """The serving process's pid (``<socket>.pid``; another than ``other_than``), remembered for teardown."""
        path = wire.pid_path(self.sock)
        deadline = time.monotonic() + timeout

        def current() -> int | None:
            with contextlib.suppress(OSError, ValueError):
                return int(path.read_text())
            return None

        while current() in (None, other_than):
            assert self.proc is not None and self.proc.poll() is None, f"supervisor exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"no new pid in {path} after {timeout} s:\n{self.log()}"
            time.sleep(0.1)
        pid = current()
        assert pid is not None
        self.pids.add(pid)
        return pid

    def stop(self) -> int:
        """SIGTERM the supervisor and wait for it; its exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def forward(self, message_type: str, content: RecordDict, run_config: dict[str, Any], mid: str) -> Any:
        return relay.forward(str(self.sock), message_type, mid, content, 1, NODE_CONFIG, run_config, timeout=90.0)


def _alive(pid: int, marker: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "client_app.worker" in cmdline and marker in cmdline


@pytest.fixture
def home(tmp_path: Path) -> Iterator[WorkerHome]:
    folder = Path(tempfile.mkdtemp(prefix="pfw-", dir="/tmp"))
    processes = Processes(tmp_path)
    h = WorkerHome(folder, processes)
    try:
        yield h
    finally:
        processes.stop_all()
        with contextlib.suppress(OSError, ValueError):
            h.pids.add(int(wire.pid_path(h.sock).read_text()))
        for pid in h.pids:  # serving processes run in their own process group: stop any the supervisor left
            if _alive(pid, str(h.sock)):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)


NODE_CONFIG = {"partition-id": 0, "num-partitions": 2}


def _run_config(**over: Any) -> dict[str, Any]:
    from common.preflight import app_defaults

    return {**app_defaults(ROOT), "strategy": "fedavg", **over}


def _train_content(model: str, seed: int = 3) -> RecordDict:
    from common.models import build_model
    from common.training import state_to_numpy

    arrays = state_to_numpy(build_model(model, 10, 0.25))
    return RecordDict({P.ARRAYS: P.to_record(arrays), P.CONFIG: ConfigRecord({P.ROUND: 1, P.SEED: seed})})


@pytest.mark.slow
def test_worker_trains_a_message_as_the_in_process_handler_does(home: WorkerHome) -> None:
    from client_app import handlers

    run_config = _run_config(**{"model": "smallcnn", "synthetic-train-size": 300, "synthetic-test-size": 100})
    content = _train_content("smallcnn")
    home.start()
    reply, timing = home.forward("train", content, run_config, "train-1")
    assert timing[P.NODE_SECONDS] > 0
    assert P.TRAIN_LOSS in reply[P.METRICS]
    assert worker.LIMIT_ENV not in os.environ and P.OS_LIMIT_MB not in reply[P.METRICS]  # no limit asked

    local = handlers.train(content, Context(1, 0, dict(NODE_CONFIG), RecordDict(), dict(run_config)))
    got, want = P.from_record(reply[P.ARRAYS]), P.from_record(local[P.ARRAYS])
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    sent = P.from_record(content[P.ARRAYS])
    assert any(not np.array_equal(got[k], sent[k]) for k in sent)  # it did train
    assert reply[P.METRICS][P.TRAIN_LOSS] == local[P.METRICS][P.TRAIN_LOSS]
    assert reply[P.METRICS][P.NUM_EXAMPLES] == local[P.METRICS][P.NUM_EXAMPLES]
    assert home.stop() == 0
    assert not home.sock.exists() and not wire.token_path(home.sock).exists()
    assert not wire.pid_path(home.sock).exists()


@pytest.mark.slow
def test_worker_killed_mid_message_fails_it_and_is_restarted(home: WorkerHome) -> None:
    run_config = _run_config(**{"model": "resnet10", "synthetic-train-size": 6000})
    home.start()
    warm = home.forward("query", RecordDict(), run_config, "query-1")  # worker ready, data partitioned
    assert warm[0][P.METRICS][P.PARTITION_ID] == 0
    pid = home.serving_pid()
    content = _train_content("resnet10")  # built first: the message is on the wire ~1 s before the kill
    outcome: dict[str, BaseException | object] = {}

    def send() -> None:
        try:
            outcome["reply"] = home.forward("train", content, run_config, "train-1")
        except BaseException as exc:  # checked below
            outcome["error"] = exc

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive(), f"the train message ended before the kill: {outcome}"
    os.kill(pid, signal.SIGKILL)
    thread.join(30)
    assert not thread.is_alive()
    error = outcome.get("error")
    assert isinstance(error, WorkerFailure), outcome
    assert str(error).startswith(f"worker pid {pid} at {home.sock} stopped during this train message: ")
    assert "killed by SIGKILL" in str(error) and "restarted" in str(error)

    after = home.forward("query", RecordDict(), run_config, "query-2")
    assert after[0][P.METRICS][P.PARTITION_ID] == 0 and after[0][P.METRICS][P.NUM_PARTITIONS] == 2
    new_pid = home.serving_pid(other_than=pid)
    lines = Path(f"{home.sock}.deaths").read_text().splitlines()
    assert len(lines) == 1, lines
    death = json.loads(lines[0])
    assert (death["pid"], death["returncode"], death["cause"]) == (pid, -9, "killed by SIGKILL")
    assert relay.death_of(home.sock, pid, wait=0) == "killed by SIGKILL"
    assert relay.death_of(home.sock, new_pid, wait=0) is None
    assert home.stop() == 0
    assert not _alive(new_pid, str(home.sock))


@pytest.mark.slow
def test_worker_over_its_memory_limit_is_reported_as_an_oom_kill(home: WorkerHome) -> None:
    from common.oslimit import detect

    support = detect()
    if support.mechanism not in ("cgroup1", "cgroup2"):
        pytest.skip(f"no cgroup memory limit on this machine: {support.mechanism}: {support.reason}")
    name = f"test-worker-{os.getpid()}"
    home.start("--memory-mb", "350", "--name", name)
    run_config = _run_config(**{"model": "resnet10", "batch-size": 256, "synthetic-train-size": 3000})
    pid = home.serving_pid()
    found = re.search(rf"memory limit 350 MB enforced by cgroup v[12] at (/\S*/progfl-{re.escape(name)})\n", home.log())
    assert found, home.log()
    cgroup = Path(found.group(1))
    assert cgroup.is_dir()
    assert str(pid) in (cgroup / "cgroup.procs").read_text().split()  # the serving process is charged to it

    with pytest.raises(WorkerFailure) as failure:
        home.forward("train", _train_content("resnet10"), run_config, "train-oom")
    message = str(failure.value)
    assert P.OOM_KILLED in message, message
    assert f"worker pid {pid} " in message and "at its memory limit of 350 MB" in message
    death = json.loads(Path(f"{home.sock}.deaths").read_text().splitlines()[-1])
    assert death["pid"] == pid and death["returncode"] == -9 and death["cause"].startswith(P.OOM_KILLED)

    restarted = home.serving_pid(other_than=pid)
    assert home.stop() == 0
    assert not _alive(restarted, str(home.sock))  # the supervisor stopped its restarted worker
    assert not cgroup.exists(), f"{cgroup} left behind"
    assert not list(cgroup.parent.glob(f"progfl-{name}*"))


def test_budget_is_the_limit_minus_the_floor_read_until_a_model_was_handled() -> None:
    """After training, the charged memory stays near the peak; the budget must not shrink with it."""
    readings = iter([300.0, 380.0, 610.0, 650.0])
    budget = worker.Budget(700.0, lambda: next(readings))
    assert budget.apply({"memory-mb": 1000.0})["memory-mb"] == 400.0  # discovery query: torch + handlers
    assert budget.apply({"memory-mb": 1000.0})["memory-mb"] == 320.0  # + the data partition
    budget.freeze()  # that message carried a model
    for _ in range(3):  # the allocator now holds ~610 MB: the floor stays at 380
        assert budget.apply({"memory-mb": 1000.0}) == {"memory-mb": 320.0}
    assert budget.apply({"memory-mb": 250.0, "partition-id": 1}) == {"memory-mb": 250.0, "partition-id": 1}
    assert worker.Budget(300.0, lambda: 400.0).apply({})["memory-mb"] == 1.0  # over the limit already


def test_budget_freeze_before_any_reading_keeps_reading() -> None:
    readings = iter([100.0, 200.0])
    budget = worker.Budget(500.0, lambda: next(readings))
    budget.freeze()
    assert not budget.frozen
    assert budget.left_mb() == 400.0
    budget.freeze()
    assert budget.left_mb() == 400.0
