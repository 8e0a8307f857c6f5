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

# metric keys (client -> server)
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
TRAIN_LOSS = "train-loss"
LOSS_SQ_MEAN = "loss-sq-mean"
FROZEN_HELD = "frozen-held"
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
