"""Names of the records and keys in the messages between ServerApp and ClientApp.

The two apps never import each other; both import these names, so a message written by one
is read by the other with the same keys.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord

from common import oslimit
from common.wire import DTYPES

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# config keys (server -> client)
ROUND = "server-round"
SEED = "seed"
STAGE = "stage"
WIDTH = "width"  # width multiplier of the model to build (AllSmall, HeteroFL); default: run config's
DEPTH = "depth"  # DepthFL: number of leading blocks (with their classifiers) to build
STATIC_BN = "static-bn"  # HeteroFL: build BN layers without running statistics (static BN); default false
SCALER = "scaler-rate"  # HeteroFL: Scaler rate (inputs of norm layers divided by it in training); default 1
FEDLL_LAYER = "fedll-layer"  # FedLL: the 0-based layer to train (sub-model: frozen layers before it + its head)
SHRINK = "profl-shrink-block"  # ProFL: shrinking step with this real block (0-based); absent or < 0: none

PRE_EVAL = "pre-eval"  # train: evaluate the received model on the local validation split before training
WANT_GRAD = "want-grad"
QUERY_BATCH = "query-batch-size"  # deployed monitor query: train at this batch (what the node's budget fits)
ENFORCE_BUDGET = "enforce-budget"  # false for the unconstrained reference (fedavg)
REQUIRED_MB = "required-mb"  # deployed: the server's modelled need of what it sends (MB), so the node need not model it

# metric keys (client -> server)
MEMORY_MB = "memory-mb"  # the device's training budget in MB; -1 = unlimited
SPEED_FLOPS = "speed-flops"  # the device's training speed, FLOP/s
LOSS_MEAN = "loss-mean"
PEAK_MB = "peak-mb"  # measured peak of PyTorch allocations during local training, MB
RSS_PEAK_MB = "rss-peak-mb"  # measured process RSS peak during local training, MB
GRAD = "output-grad"  # ArrayRecord key of the output-layer gradient (Eq. 8)
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
TRAIN_LOSS = "train-loss"
LOSS_SQ_MEAN = "loss-sq-mean"
FROZEN_HELD = "frozen-held"
FEDLL_HELD = "fedll-held"  # FedLL: the frozen layers this node keeps between rounds
FEDLL_FROZEN_FLOPS = "fedll-frozen-flops"  # FedLL: forward FLOPs of the frozen layers over local training
FEDLL_SKIPPED_FLOPS = "fedll-skipped-flops"  # FedLL: of those, the FLOPs depth dropout skipped
TRAIN_SECONDS = "train-seconds"
SAMPLES_PER_SECOND = "samples-per-second"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
PRE_EVAL_LOSS = "pre-eval-loss"  # train reply (with pre-eval): validation loss of the model received
PRE_EVAL_ACCURACY = "pre-eval-accuracy"
PRE_EVAL_EXAMPLES = "pre-eval-examples"
STARTUP_SECONDS = "clientapp-startup-seconds"  # flwr-clientapp process start -> handler entry, s
NODE_SECONDS = "node-seconds"  # the handler's own time on the node (worker or in-process), s
RELAY_SECONDS = "relay-seconds"  # thin ClientApp <-> worker: connect, handshake, frames, s (worker only)
OS_LIMIT_MB = "os-limit-mb"  # the OS memory limit the worker runs under, MB (absent: none in force)
OS_PEAK_MB = "os-peak-mb"  # the worker's peak memory charged to that limit during this message, MB
OS_LIMIT_HIT = "os-limit-hit"  # 1 if a charge reached the limit during this message (the kernel reclaimed)
OOM_KILLED = oslimit.OOM_KILLED  # in a failed reply's reason: the OS killed the worker at its memory limit


PACKED = "packed-arrays"  # ArrayRecord key: every array of a message in one buffer (see to_record)
PACKED_INDEX = "packed-index"  # ArrayRecord key: [[name, dtype, shape, offset], ...] as UTF-8 JSON bytes
PACK_ALIGN = 64
"""Byte alignment of each array in the packed buffer (views into it are aligned for any dtype)."""
PACK_DTYPES = DTYPES
"""Dtypes a packed message carries: plain numbers only, the same allow-list as the worker's frames."""


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Numpy arrays -> one Flower ArrayRecord holding them packed in a single buffer (keys and order kept).

    Flower moves every Array of a message as separate objects, one request each on every hop
    (ServerApp -> SuperLink -> SuperNode -> ClientApp and back): 74 arrays of a ResNet10 are ~150
    requests per hop. Packed, a message carries two Arrays: the concatenated bytes (each array
    aligned to :data:`PACK_ALIGN`) and their index. 0-d arrays are sent as shape (1,), as before.
    """
    index: list[list[object]] = []
    parts: list[np.ndarray] = []
    offset = 0
    for key, value in arrays.items():
        arr = np.ascontiguousarray(np.atleast_1d(value))
        if arr.dtype.str not in PACK_DTYPES:
            raise TypeError(f"array {key!r} has dtype {arr.dtype}, which a message does not carry")
        pad = (-offset) % PACK_ALIGN
        if pad:
            parts.append(np.zeros(pad, np.uint8))
            offset += pad
        index.append([str(key), arr.dtype.str, list(arr.shape), offset])
        parts.append(arr.reshape(-1).view(np.uint8))
        offset += arr.nbytes
    buf = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    table = np.frombuffer(json.dumps(index, separators=(",", ":")).encode(), np.uint8)
    return ArrayRecord({PACKED: Array(buf), PACKED_INDEX: Array(table.copy())})


def _unpack(record: ArrayRecord) -> dict[str, np.ndarray]:
    buf = record[PACKED].numpy()
    try:
        index = json.loads(record[PACKED_INDEX].numpy().tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"packed arrays: the index is not JSON ({exc})") from None
    if buf.dtype != np.uint8 or buf.ndim != 1 or not isinstance(index, list):
        raise ValueError(f"packed arrays: buffer {buf.dtype} {buf.shape} / index {type(index).__name__} malformed")
    out: dict[str, np.ndarray] = {}
    for entry in index:
        if not (isinstance(entry, list) and len(entry) == 4):
            raise ValueError(f"packed arrays: index entry {entry!r} is not [name, dtype, shape, offset]")
        key, dtype, shape, offset = entry
        if not isinstance(key, str) or key in out:
            raise ValueError(f"packed arrays: name {key!r} is not a string or repeats")
        if dtype not in PACK_DTYPES:
            raise ValueError(f"packed arrays: {key!r} has dtype {dtype!r}; allowed {sorted(PACK_DTYPES)}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"packed arrays: {key!r} has shape {shape!r}")
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if not (isinstance(offset, int) and offset >= 0 and offset + nbytes <= buf.size):
            raise ValueError(f"packed arrays: {key!r} at offset {offset!r} (+{nbytes} B) is outside the buffer")
        out[key] = buf[offset : offset + nbytes].view(dt).reshape(shape)
    return out


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Flower ArrayRecord -> numpy arrays (keys kept, order kept): packed (:func:`to_record`) or one per key."""
    if PACKED in record and PACKED_INDEX in record and len(record) == 2:
        return _unpack(record)
    return {k: v.numpy() for k, v in record.items()}
