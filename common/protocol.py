"""Names of the records and keys in the messages between ServerApp and ClientApp.

The two apps never import each other; both import these names, so a message written by one
is read by the other with the same keys.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

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
ENFORCE_BUDGET = "enforce-budget"  # false for the unconstrained reference (fedavg)

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
OOM_KILLED = "out-of-memory kill"  # in a failed reply's reason: the OS killed the worker at its memory limit


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Numpy arrays -> Flower ArrayRecord (keys kept, order kept; 0-d arrays sent as shape (1,))."""
    return ArrayRecord({k: Array(np.ascontiguousarray(np.atleast_1d(v))) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Flower ArrayRecord -> numpy arrays (keys kept, order kept)."""
    return {k: v.numpy() for k, v in record.items()}
