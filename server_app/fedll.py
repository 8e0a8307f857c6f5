"""FedLL: layer-wise federated training with depth dropout (the model logic is :mod:`common.fedll`).

The server owns the global state: the model's blocks and head (``blocks.<b>.*``, ``head.*``) and a
head per non-final layer (``lhead.<k>.*``). Stage k (0-based; 1-based in logs and metrics) trains
layer k with its head; layers 0..k-1 are frozen, later layers are not used. Per round:

1. Only nodes whose budget holds the stage sub-model's modelled training memory
   (:func:`common.fedll.required_mb`) are eligible (``enforces_budget``); a seeded draw of them
   trains.
2. Each gets layer k and its head, plus the frozen layers it does not hold yet (nodes report the
   frozen layers they keep in every reply; a node that failed is sent them again). Clients
   train with depth dropout (``fedll-dropout``) over the frozen layers.
3. Replies carry layer k and its head only; they are averaged (FedAvg) into the state.
4. The server evaluates the stage sub-model (frozen layers + layer k + head) on the test set.

Schedule: a fixed ``fedll-rounds-per-layer`` rounds per layer (default 0: ``num-rounds`` split
evenly over the layers, :meth:`RunConfig.fedll_layer_rounds`), then the next layer
(:class:`common.stages.StageMachine` with ``max_rounds`` = that and no convergence signal). The
last layer, trained with the model's own head, runs all remaining rounds; if the budget is short,
later layers get one round each (the machine's budget rule), so every run ends with the full
network trained (``num-rounds`` >= the number of layers, checked by the config). At a new stage
the head starts from the previous one's trained arrays where the shapes agree
(``outmod-warm-start``). The final evaluation and ``model.pt`` are the full model.
"""

from __future__ import annotations

import math

import numpy as np

from common import protocol as P
from common.config import RunConfig
from common.data import held_out_set
from common.fedll import (
    HEAD_PREFIX,
    FedLLModel,
    build_layer_heads,
    frozen_layer_prefixes,
    model_layers,
    required_mb,
    stage_flops,
    stage_prefixes,
    warm_start_head,
)
from common.flops import completion_time
from common.models import BlockModel
from common.stages import StageMachine
from common.training import evaluate, load_numpy, state_to_numpy
from server_app.outputs import RunRecorder
from server_app.strategy import FedAvgStrategy, log


class FedLLStrategy(FedAvgStrategy):
    """Layer-wise training on a fixed schedule, frozen-layer store on the nodes, memory-fit selection."""

    name = "fedll"
    enforces_budget = True
    checkpoint_attrs = ("machine", "frozen_flops", "skipped_flops")
    # layers/heads: structure and containers (the heads' arrays are in ``arrays``); frozen_held: what
    # nodes hold is lost when they restart, so a resumed run sends frozen layers again; the rest caches.
    transient_attrs = ("layers", "heads", "frozen_held", "_layer_mb", "_layer_flops", "_round_skip")

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, num_classes: int) -> None:
        super().__init__(cfg, recorder, num_classes)
        self.layers = model_layers(self.model)
        shape = self.input_shape()
        self.heads = build_layer_heads(self.model, shape, seed=cfg.seed + 1)
        self.arrays.update({f"{HEAD_PREFIX}.{k}": v for k, v in state_to_numpy(self.heads).items()})
        self.machine = StageMachine(
            num_blocks=len(self.layers),
            total_rounds=cfg.num_rounds,
            min_rounds=1,
            max_rounds=cfg.fedll_layer_rounds(),
        )
        self.frozen_held: dict[int, set[int]] = {}
        self.frozen_flops = 0.0
        self.skipped_flops = 0.0
        self._round_skip = [0.0, 0.0]
        self._layer_mb: dict[int, float] = {}
        self._layer_flops: dict[int, float] = {}

    @property
    def layer(self) -> int:
        """The 0-based layer being trained."""
        return self.machine.stage

    @property
    def num_layers(self) -> int:
        """Number of layers L of the model."""
        return len(self.layers)

    def current_stage(self) -> int | None:
        """The 0-based layer being trained (FedLL's stage)."""
        return self.layer

    def _active_keys(self) -> list[str]:
        prefixes = stage_prefixes(self.layers, self.layer)
        return [k for k in self.arrays if k.startswith(prefixes)]

    # ------------------------------------------------------------------ resources
    def required_mb(self, stage: int | None = None) -> float:
        """Modelled training memory (MB) of FedLL stage ``stage`` (default: the current layer)."""
        layer = self.layer if stage is None else stage
        if layer not in self._layer_mb:
            self._layer_mb[layer] = required_mb(
                self.cfg.model, self.num_classes, self.cfg.width, layer, self.cfg.batch_size, self.input_shape()
            )
        return self._layer_mb[layer]

    def completion_time(self, partition_id: int) -> float:
        """Simulated local training time (s, Eq. 6) of the current stage, frozen layers at the expected dropout."""
        node = self.nodes[partition_id]
        if node.speed_flops <= 0:
            return 0.0
        if self.layer not in self._layer_flops:
            flops = stage_flops(self.model, self.layer, self.cfg.fedll_dropout, self.input_shape())
            self._layer_flops[self.layer] = flops.total
        flops_per_sample = self._layer_flops[self.layer]
        return completion_time(flops_per_sample, node.num_examples, self.cfg.local_epochs, node.speed_flops)

    # ------------------------------------------------------------------ payloads and aggregation
    def train_payload(self, server_round: int, partition_id: int) -> dict[str, np.ndarray]:
        """Active layer + head, plus the frozen layers this node does not hold."""
        held = self.frozen_held.get(partition_id, set())
        payload = {k: self.arrays[k] for k in self._active_keys()}
        for layer in self.layers[: self.layer]:
            if layer.index not in held:
                payload.update({k: v for k, v in self.arrays.items() if k.startswith(layer.prefixes)})
        return payload

    def train_config(self, server_round: int, partition_id: int) -> dict[str, int | float | str | bool]:
        """FedAvg's per-node config plus the layer to train."""
        return {**super().train_config(server_round, partition_id), P.FEDLL_LAYER: self.layer}

    def on_reply(self, server_round: int, partition_id: int, metrics: dict) -> None:
        """Remember which frozen layers the node holds; add up the depth-dropout FLOP counts."""
        held = metrics.get(P.FEDLL_HELD, [])
        self.frozen_held[partition_id] = {int(i) for i in held} if isinstance(held, list) else set()
        frozen = float(metrics.get(P.FEDLL_FROZEN_FLOPS, 0.0))
        skipped = float(metrics.get(P.FEDLL_SKIPPED_FLOPS, 0.0))
        if math.isfinite(frozen) and math.isfinite(skipped) and 0 <= skipped <= frozen:
            self._round_skip[0] += frozen
            self._round_skip[1] += skipped

    def on_failure(self, server_round: int, partition_id: int) -> None:
        """A failed node may have lost its frozen layers: send them again next time."""
        self.frozen_held.pop(partition_id, None)

    def expected_reply_keys(self, partition_id: int) -> set[str]:
        """Replies carry the active layer and its head only."""
        return set(self._active_keys())

    def apply_updates(self, server_round: int, updates: list[tuple[dict[str, np.ndarray], float]]) -> None:
        """Average the active layer and head (FedAvg); everything else is untouched."""
        self.merge_part(updates, set(self._active_keys()), f"layer {self.layer + 1}")

    def eval_payload(self, server_round: int) -> tuple[dict[str, np.ndarray], dict[str, int | float | str | bool]]:
        """The whole stage sub-model (frozen layers + active layer + head)."""
        prefixes = frozen_layer_prefixes(self.layers, self.layer) + stage_prefixes(self.layers, self.layer)
        return {k: v for k, v in self.arrays.items() if k.startswith(prefixes)}, {P.FEDLL_LAYER: self.layer}

    # ------------------------------------------------------------------ evaluation and stages
    def server_model(self) -> FedLLModel:
        """The current stage sub-model with the global arrays loaded (eval: no dropout)."""
        head = None if self.layer == self.num_layers - 1 else self.heads[str(self.layer)]
        sub = FedLLModel(self.model, self.layer, head, input_shape=self.input_shape())
        keys = set(sub.state_dict())
        load_numpy(sub, {k: v for k, v in self.arrays.items() if k in keys})
        return sub

    def final_arrays(self) -> dict[str, np.ndarray]:
        """Blocks and head only (the per-layer heads are training scaffolding)."""
        return {k: v for k, v in self.arrays.items() if not k.startswith(f"{HEAD_PREFIX}.")}

    def full_model(self) -> BlockModel:
        """The full network with the global arrays loaded."""
        load_numpy(self.model, self.final_arrays())
        return self.model

    def final_evaluation(self) -> tuple[float, float]:
        """Test loss and accuracy of the full model."""
        x, y = held_out_set(self.cfg.data_spec())
        return evaluate(self.full_model(), x, y, self.cfg.eval_batch_size)

    def round_info(self, server_round: int) -> dict[str, float | int | str]:
        """The 1-based stage (= layer) trained in this round."""
        return {"stage": self.layer + 1}

    def end_round(self, server_round: int) -> dict[str, float | int | str | bool | None]:
        """Report the round's depth-dropout savings; advance the fixed schedule."""
        frozen, skipped = self._round_skip
        self._round_skip = [0.0, 0.0]
        self.frozen_flops += frozen
        self.skipped_flops += skipped
        layer = self.layer
        reason = self.machine.end_of_round(converged=False)
        if reason is not None:
            log.info("round %d: layer %d frozen (%s); stage %d starts", server_round, layer + 1, reason, self.layer + 1)
            if reason == "budget":
                log.warning("num-rounds leaves layer %d and later fewer than fedll-rounds-per-layer", self.layer + 1)
            if self.cfg.outmod_warm_start:
                self.arrays.update(warm_start_head(self.arrays, self.layer, self.num_layers))
        return {
            "fedll-skipped-share": skipped / frozen if frozen > 0 else None,
            "froze-layer": layer + 1 if reason else None,
            "freeze-reason": reason,
        }

    def summary_extras(self) -> dict[str, object]:
        """Stage schedule, modelled memory per layer and the depth-dropout savings of the run."""
        self.machine.finish()
        return {
            "stages": [
                {"stage": h.stage + 1, "start-round": h.start_round, "end-round": h.end_round, "reason": h.reason}
                for h in self.machine.history
            ],
            "fedll-layers": self.num_layers,
            "fedll-modelled-memory-mb": [round(self.required_mb(k), 3) for k in range(self.num_layers)],
            "fedll-skipped-share": self.skipped_flops / self.frozen_flops if self.frozen_flops > 0 else 0.0,
            "fedll-dropout": self.cfg.fedll_dropout,
        }
