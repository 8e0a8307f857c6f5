"""DepthFL (Kim et al., ICLR 2023) as a strategy: depth-scaled sub-models with self-distillation.

The global state is the model's blocks and head plus one auxiliary classifier after every
non-final block (``aux.<k>.*``, see :mod:`common.depthfl`). Each node trains the deepest prefix
of ``d`` blocks (1..B) whose modelled training memory (:func:`common.depthfl.required_mb`, the
same number the client checks) fits its budget, with the ``d`` classifiers it holds, on the sum
of their cross-entropies and the mutual self-distillation among them. A node that fits no depth
is never sampled.

Per round the server sends every sampled node the arrays of its prefix and classifiers (and the
depth and width to build); replies carry the same arrays, and each array is averaged over the
nodes that hold it, weighted by example count; arrays nobody trained keep their value. The
``block-counts`` column records how many nodes held each block (``classifier-counts``: each
classifier, the head last); ``exit-accuracies`` the test accuracy of each classifier on its own
(shallowest first), beside the ensemble's ``server-accuracy``. What the server evaluates, what
nodes evaluate and what ``model.pt`` holds is the full-depth model, predicting with the ensemble
of all B classifiers.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.serverapp import Grid

from common import protocol as P
from common.config import RunConfig
from common.depthfl import (
    DepthFLModel,
    aggregate_by_holder,
    build_depthfl,
    choose_depth,
    client_module,
    exit_accuracies,
    holder_counts,
    required_mb,
    select_depth_arrays,
)
from common.flops import completion_time, forward_flops
from common.training import load_numpy, state_to_numpy
from server_app.outputs import RunRecorder
from server_app.strategy import FedAvgStrategy, log


class DepthFLStrategy(FedAvgStrategy):
    """DepthFL: every node trains the deepest block prefix (with its classifiers) that fits its memory."""

    name = "depthfl"
    enforces_budget = True
    # net: the container the arrays are loaded into; the rest are caches or per-round scratch
    transient_attrs = ("net", "num_blocks", "_depth_mb", "_depth_flops", "_payloads", "_counts")

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, num_classes: int) -> None:
        super().__init__(cfg, recorder, num_classes)
        depth = self.model.num_blocks
        self.net, self.model = build_depthfl(cfg.model, num_classes, cfg.width, depth, seed=cfg.seed)
        self.num_blocks = self.model.num_blocks
        self.arrays = state_to_numpy(self.net)
        self._depth_mb: dict[int, float] = {}
        self._depth_flops: dict[int, float] = {}
        self._payloads: dict[int, dict[str, np.ndarray]] = {}
        self._counts: tuple[list[int], list[int]] | None = None

    # ------------------------------------------------------------------ depths and resources
    def depth_required_mb(self, depth: int) -> float:
        """Modelled training memory (MB) of a depth-``depth`` client at the configured batch size."""
        if depth not in self._depth_mb:
            self._depth_mb[depth] = required_mb(
                self.cfg.model, self.num_classes, self.cfg.width, depth, self.cfg.batch_size, self.input_shape()
            )
        return self._depth_mb[depth]

    def depth_of(self, partition_id: int) -> int | None:
        """The deepest depth whose modelled memory fits the node's budget, or None if none fits."""
        budget = self.nodes[partition_id].memory_mb
        return choose_depth(lambda d: self.depth_required_mb(d) <= budget, self.num_blocks)

    def node_required_mb(self, partition_id: int) -> float:
        """Modelled training memory (MB) of the node's own depth (0 if none fits: it is not sent anything)."""
        depth = self.depth_of(partition_id)
        return 0.0 if depth is None else self.depth_required_mb(depth)

    def fits(self, partition_id: int) -> bool:
        """True if some depth (down to one block with its classifier) fits the node's budget."""
        return self.depth_of(partition_id) is not None

    def required_mb(self, stage: int | None = None) -> float:
        """Modelled training memory (MB) of the full-depth model (``stage`` is ignored: DepthFL has none)."""
        return self.depth_required_mb(self.num_blocks)

    def _require_depth(self, partition_id: int) -> int:
        depth = self.depth_of(partition_id)
        if depth is None:
            raise ValueError(f"partition {partition_id} fits no DepthFL depth and must not be sampled")
        return depth

    def completion_time(self, partition_id: int) -> float:
        """Simulated local training time (s, Eq. 6) at the node's depth; 0 if its speed is unknown.

        FLOPs per sample: forward of the depth-d module (blocks and all its classifiers) plus twice
        that for the backward (everything is trained).
        """
        node = self.nodes[partition_id]
        depth = self.depth_of(partition_id)
        if node.speed_flops <= 0 or depth is None:
            return 0.0
        if depth not in self._depth_flops:
            module = client_module(self.cfg.model, self.num_classes, self.cfg.width, depth)
            fwd, _ = forward_flops(module, torch.zeros(1, *self.input_shape()))
            self._depth_flops[depth] = 3.0 * fwd
        return completion_time(self._depth_flops[depth], node.num_examples, self.cfg.local_epochs, node.speed_flops)

    def on_start(self, grid: Grid) -> None:
        """Log and record every node's depth (None: fits no depth) and the modelled memory per depth."""
        depths = {pid: self.depth_of(pid) for pid in sorted(self.nodes)}
        per_depth = {d: sum(1 for v in depths.values() if v == d) for d in (*range(1, self.num_blocks + 1), None)}
        mb = {d: self.depth_required_mb(d) for d in range(1, self.num_blocks + 1)}
        log.info(
            "depthfl: nodes per depth %s (modelled MB per depth %s)",
            {str(d): n for d, n in per_depth.items() if n},
            {str(d): round(v, 2) for d, v in mb.items()},
        )
        self.recorder.set_summary(
            **{
                "depthfl-depths": {str(pid): d for pid, d in depths.items()},
                "depthfl-depth-mb": {str(d): v for d, v in mb.items()},
            }
        )

    # ------------------------------------------------------------------ hooks
    def before_round(self, grid: Grid, server_round: int) -> None:
        """Forget last round's payloads and holder counts (the global arrays have changed)."""
        self._payloads.clear()
        self._counts = None

    def train_payload(self, server_round: int, partition_id: int) -> dict[str, np.ndarray]:
        """The global arrays of the node's prefix of blocks and its classifiers."""
        depth = self._require_depth(partition_id)
        if depth not in self._payloads:
            self._payloads[depth] = select_depth_arrays(self.arrays, depth, self.num_blocks)
        return self._payloads[depth]

    def train_config(self, server_round: int, partition_id: int) -> dict[str, int | float | str | bool]:
        """FedAvg's config plus the depth and the width to build."""
        depth = self._require_depth(partition_id)
        return {**super().train_config(server_round, partition_id), P.DEPTH: depth, P.WIDTH: self.cfg.width}

    def apply_updates(self, server_round: int, updates: list[tuple[dict[str, np.ndarray], float]]) -> None:
        """Each array averaged over the nodes holding it, weighted by example count; the rest kept."""
        self._counts = holder_counts([list(arrays) for arrays, _ in updates], self.num_blocks)
        self.merge(aggregate_by_holder(self.arrays, updates))

    def eval_payload(self, server_round: int) -> tuple[dict[str, np.ndarray], dict[str, int | float | str | bool]]:
        """The full-depth global model (all classifiers), built by the node at full depth."""
        return self.arrays, {P.DEPTH: self.num_blocks, P.WIDTH: self.cfg.width}

    def server_model(self) -> DepthFLModel:  # type: ignore[override]
        """The full-depth DepthFL model in eval mode: its output is the ensemble of all classifiers."""
        load_numpy(self.net, self.arrays)
        return self.net.eval()

    def end_round(self, server_round: int) -> dict[str, float | int | str | bool | None]:
        """Holder counts per block and per classifier (``"3,2,1,1"``, shallowest first) and the mean depth."""
        depths = [d for d in (self.depth_of(pid) for pid in self._round_succeeded) if d is not None]
        blocks, classifiers = self._counts or ([0] * self.num_blocks, [0] * self.num_blocks)
        row: dict[str, float | int | str | bool | None] = {
            "block-counts": ",".join(map(str, blocks)),
            "classifier-counts": ",".join(map(str, classifiers)),
        }
        if depths:
            row["mean-depth"] = float(np.mean(depths))
        from common.data import held_out_set

        x, y = held_out_set(self.cfg.data_spec())
        row["exit-accuracies"] = ",".join(
            f"{a:.4f}" for a in exit_accuracies(self.server_model(), x, y, self.cfg.eval_batch_size)
        )
        return row
