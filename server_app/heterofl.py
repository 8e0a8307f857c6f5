"""HeteroFL (Diao et al., ICLR 2021) as a strategy: width-scaled sub-models of one global model.

Each node trains the largest sub-model whose modelled training memory fits its budget: the
global model (configured ``width``) narrowed to a rate ``r`` in :data:`common.heterofl.RATES`
(1, 1/2, ..., 1/16), i.e. the project's model built at width ``width x r``, with static BN and
HeteroFL's Scaler (see :mod:`common.heterofl`). The memory is :func:`common.heterofl.required_mb`
(:func:`common.memory.stage_memory` of that sub-model, full-model training), the same number the
client checks before training. A node that fits no rate is never sampled.

Per round the server sends every sampled node the leading channels of every global array
(the sub-model's shapes), and averages each entry of each array over the nodes that trained it,
without weighting by example count (the original ``Federation.combine``); entries no node
trained keep their value. The global model (full width, static BN) is what the server evaluates,
what nodes evaluate and what ``model.pt`` holds.

Not implemented: the original's label-split masking (``label_split``: a client's classifier
rows of classes absent from its data are masked out of its loss and of the aggregation). It is a
non-IID trick independent of the width scaling that the other strategies here do not get, it
changes the training loss, and it needs every client to disclose its label set to the server;
with IID partitions it is a no-op.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.serverapp import Grid

from common import protocol as P
from common.config import RunConfig
from common.flops import completion_time, stage_flops
from common.heterofl import (
    RATES,
    aggregate_nested,
    build_heterofl_model,
    choose_rate,
    required_mb,
    slice_arrays,
    submodel_shapes,
)
from common.models import BlockModel, build_model
from common.training import evaluate, load_numpy, state_to_numpy
from server_app.outputs import RunRecorder
from server_app.strategy import FedAvgStrategy, log


class HeteroFLStrategy(FedAvgStrategy):
    """HeteroFL: every node trains the widest nested sub-model (rate 1 .. 1/16) that fits its memory."""

    name = "heterofl"
    enforces_budget = True
    # caches; the rates follow from the budgets
    transient_attrs = ("_rate_mb", "_payloads", "_skeletons", "_submodels")

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, num_classes: int) -> None:
        super().__init__(cfg, recorder, num_classes)
        self.model = build_heterofl_model(cfg.model, num_classes, cfg.width, seed=cfg.seed)
        self.arrays = state_to_numpy(self.model)
        self._rate_mb: dict[float, float] = {}
        self._payloads: dict[float, dict[str, np.ndarray]] = {}
        self._skeletons: dict[float, BlockModel] = {}
        self._submodels: dict[float, BlockModel] = {}

    # ------------------------------------------------------------------ rates and resources
    def rate_required_mb(self, rate: float) -> float:
        """Modelled training memory (MB) of the rate-``rate`` sub-model at the configured batch size."""
        if rate not in self._rate_mb:
            self._rate_mb[rate] = required_mb(
                self.cfg.model, self.num_classes, self.cfg.width, rate, self.cfg.batch_size, self.input_shape()
            )
        return self._rate_mb[rate]

    def rate_of(self, partition_id: int) -> float | None:
        """The largest rate whose sub-model fits the node's budget, or None if none fits."""
        budget = self.nodes[partition_id].memory_mb
        return choose_rate(lambda r: self.rate_required_mb(r) <= budget)

    def node_required_mb(self, partition_id: int) -> float:
        """Modelled training memory (MB) of the node's own rate (0 if none fits: it is not sent anything)."""
        rate = self.rate_of(partition_id)
        return 0.0 if rate is None else self.rate_required_mb(rate)

    def fits(self, partition_id: int) -> bool:
        """True if some sub-model (down to rate 1/16) fits the node's budget."""
        return self.rate_of(partition_id) is not None

    def completion_time(self, partition_id: int) -> float:
        """Simulated local training time (s, Eq. 6) of the node's own sub-model; 0 if unknown."""
        node = self.nodes[partition_id]
        rate = self.rate_of(partition_id)
        if node.speed_flops <= 0 or rate is None:
            return 0.0
        if rate not in self._skeletons:
            with torch.device("meta"):
                self._skeletons[rate] = build_model(self.cfg.model, self.num_classes, self.cfg.width * rate)
        flops = stage_flops(self._skeletons[rate], None, self.input_shape()).total
        return completion_time(flops, node.num_examples, self.cfg.local_epochs, node.speed_flops)

    def on_start(self, grid: Grid) -> None:
        """Log and record every node's rate (None: fits no sub-model)."""
        rates = {pid: self.rate_of(pid) for pid in sorted(self.nodes)}
        counts = {r: sum(1 for v in rates.values() if v == r) for r in (*RATES, None)}
        log.info(
            "heterofl: nodes per rate %s (modelled MB per rate %s)",
            {str(r): n for r, n in counts.items() if n},
            {str(r): round(self.rate_required_mb(r), 2) for r in RATES},
        )
        self.recorder.set_summary(
            **{
                "heterofl-rates": {str(pid): r for pid, r in rates.items()},
                "heterofl-rate-mb": {str(r): self.rate_required_mb(r) for r in RATES},
            }
        )

    # ------------------------------------------------------------------ hooks
    def before_round(self, grid: Grid, server_round: int) -> None:
        """Forget last round's sliced payloads (the global arrays have changed)."""
        self._payloads.clear()

    def train_payload(self, server_round: int, partition_id: int) -> dict[str, np.ndarray]:
        """The leading channels of every global array, in the shapes of the node's sub-model."""
        rate = self.rate_of(partition_id)
        if rate is None:
            raise ValueError(f"partition {partition_id} fits no HeteroFL sub-model and must not be sampled")
        if rate not in self._payloads:
            shapes = submodel_shapes(self.cfg.model, self.num_classes, self.cfg.width * rate)
            self._payloads[rate] = slice_arrays(self.arrays, shapes)
        return self._payloads[rate]

    def train_config(self, server_round: int, partition_id: int) -> dict[str, int | float | str | bool]:
        """FedAvg's config plus the sub-model's width, static BN and the Scaler rate."""
        rate = self.rate_of(partition_id)
        if rate is None:
            raise ValueError(f"partition {partition_id} fits no HeteroFL sub-model and must not be sampled")
        return {
            **super().train_config(server_round, partition_id),
            P.WIDTH: self.cfg.width * rate,
            P.STATIC_BN: True,
            P.SCALER: rate,
        }

    def apply_updates(self, server_round: int, updates: list[tuple[dict[str, np.ndarray], float]]) -> None:
        """Entry-wise mean over the nodes holding each entry (unweighted, as HeteroFL's ``combine``)."""
        self.merge(aggregate_nested(self.arrays, [arrays for arrays, _ in updates]))

    def eval_payload(self, server_round: int) -> tuple[dict[str, np.ndarray], dict[str, int | float | str | bool]]:
        """The full-width global model, built by the node with static BN."""
        return self.arrays, {P.STATIC_BN: True}

    def rate_accuracy(self, rate: float) -> float:
        """Test accuracy of the global model's rate-``rate`` sub-model (its leading channels, static BN)."""
        from common.data import held_out_set

        if rate not in self._submodels:
            self._submodels[rate] = build_heterofl_model(self.cfg.model, self.num_classes, self.cfg.width * rate)
        sub = self._submodels[rate]
        shapes = submodel_shapes(self.cfg.model, self.num_classes, self.cfg.width * rate)
        load_numpy(sub, slice_arrays(self.arrays, shapes))
        x, y = held_out_set(self.cfg.data_spec())
        return evaluate(sub, x, y, self.cfg.eval_batch_size)[1]

    def end_round(self, server_round: int) -> dict[str, float | int | str | bool | None]:
        """Mean rate of the nodes sampled in this round (1 = full width); accuracy of every narrower rate in use.

        ``rate-accuracies`` (``"0.5:0.3120,0.25:0.3605"``): the test accuracy of each sub-model a node
        trains, narrower than the global model: whether the wide channels, held by few nodes, add
        to or take from the core that most nodes train.
        """
        rates = [self.rate_of(pid) for pid in self._round_participants]
        known = [r for r in rates if r is not None]
        row: dict[str, float | int | str | bool | None] = {"mean-rate": float(np.mean(known))} if known else {}
        in_use = sorted({r for r in (self.rate_of(pid) for pid in self.nodes) if r is not None and r < 1}, reverse=True)
        if in_use:
            row["rate-accuracies"] = ",".join(f"{r:g}:{self.rate_accuracy(r):.4f}" for r in in_use)
        return row
