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


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Numpy arrays -> Flower ArrayRecord (keys kept, order kept; 0-d arrays sent as shape (1,))."""
    return ArrayRecord({k: Array(np.ascontiguousarray(np.atleast_1d(v))) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Flower ArrayRecord -> numpy arrays (keys kept, order kept)."""
    return {k: v.numpy() for k, v in record.items()}
