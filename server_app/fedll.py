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

Self-supervised mode (``fedll-objective='ssl'``, :mod:`common.ssl`): every layer k trains with its
projection head ``sslhead.<k>`` on two views of the clients' images (labels unread); the clients
evaluate nothing (no classifier: no evaluate messages, no ``pre-eval``). The server evaluates the
stage's encoder (layers 0..k) downstream every ``ssl-eval-every`` rounds and after the last: a
linear probe and a k-NN accuracy on the test split, fitted on its labelled probe set (a seeded
``ssl-probe-fraction`` of the training split); ``server-accuracy`` is the probe's accuracy, the
rounds between evaluations have none. The randomly initialised encoder's probe (round 0) is the
floor (``ssl-floor-*`` in the summary). At the end the fitted probe becomes the model's classifier
``head.*`` (standardisation folded in), so ``model.pt`` classifies. ``fedll-layerwise=false`` is
the end-to-end reference: one stage in which every layer trains, with the last layer's head.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from common import protocol as P
from common.config import RunConfig
from common.data import held_out_set
from common.fedll import (
    HEAD_PREFIX,
    SSL_HEAD_PREFIX,
    EndToEndModel,
    FedLLModel,
    build_layer_heads,
    build_ssl_heads,
    end_to_end_prefixes,
    frozen_layer_prefixes,
    model_layers,
    required_mb,
    stage_flops,
    stage_prefixes,
    warm_start_head,
)
from common.flops import completion_time
from common.models import BlockModel
from common.output_modules import DEFAULT_FROZEN_CHUNK
from common.stages import StageMachine
from common.training import evaluate, load_numpy, state_to_numpy
from server_app.outputs import RunRecorder
from server_app.strategy import FedAvgStrategy, log


class FedLLStrategy(FedAvgStrategy):
    """Layer-wise training on a fixed schedule, frozen-layer store on the nodes, memory-fit selection."""

    name = "fedll"
    enforces_budget = True
    checkpoint_attrs = ("machine", "frozen_flops", "skipped_flops", "ssl_results", "client_flops", "client_rounds")
    # layers/heads: structure and containers (the heads' arrays are in ``arrays``); frozen_held: what
    # nodes hold is lost when they restart, so a resumed run sends frozen layers again; the rest caches.
    transient_attrs = (
        "ssl",
        "layerwise",
        "layers",
        "heads",
        "ssl_heads",
        "frozen_held",
        "_layer_mb",
        "_layer_flops",
        "_round_skip",
        "_probe_data",
        "_round",
        "_round_ssl",
        "_probe_head",
    )

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, num_classes: int) -> None:
        super().__init__(cfg, recorder, num_classes)
        self.layers = model_layers(self.model)
        shape = self.input_shape()
        self.ssl = cfg.self_supervised
        self.layerwise = cfg.fedll_layerwise
        # only the mode's heads are built (each profiles the model once at start-up)
        self.heads = nn.ModuleDict() if self.ssl else build_layer_heads(self.model, shape, seed=cfg.seed + 1)
        self.ssl_heads = (
            build_ssl_heads(self.model, cfg.ssl_method, cfg.ssl_proj_dim, shape, seed=cfg.seed + 2)
            if self.ssl
            else nn.ModuleDict()
        )
        if self.ssl:
            self.arrays.update({f"{SSL_HEAD_PREFIX}.{k}": v for k, v in state_to_numpy(self.ssl_heads).items()})
        else:
            self.arrays.update({f"{HEAD_PREFIX}.{k}": v for k, v in state_to_numpy(self.heads).items()})
        self.machine = StageMachine(
            num_blocks=len(self.layers) if self.layerwise else 1,
            total_rounds=cfg.num_rounds,
            min_rounds=1,
            max_rounds=cfg.fedll_layer_rounds() if self.layerwise else cfg.num_rounds,
        )
        self.client_flops = 0.0  # training FLOPs of every reply (modelled, Eq. 5 per sample x examples x epochs)
        self.client_rounds = 0  # replies counted in it
        self.ssl_results: dict[str, dict[str, float]] = {}  # SSL: downstream evaluation per round ("0" = floor)
        self._probe_data: tuple | None = None
        self._round = 0
        self._round_ssl: dict[str, float] = {}
        self._probe_head: dict[str, np.ndarray] = {}
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

    @property
    def client_evaluation(self) -> bool:  # type: ignore[override]
        """Clients evaluate on labels only when supervised (SSL has no classifier until the server's probe)."""
        return not self.ssl

    def _active_keys(self) -> list[str]:
        if self.layerwise:
            prefixes = stage_prefixes(self.layers, self.layer, self.ssl)
        else:
            prefixes = end_to_end_prefixes(self.layers, self.ssl)
        return [k for k in self.arrays if k.startswith(prefixes)]

    # ------------------------------------------------------------------ resources
    def required_mb(self, stage: int | None = None) -> float:
        """Modelled training memory (MB) of FedLL stage ``stage`` (default: the current layer)."""
        layer = self.layer if stage is None else stage
        if layer not in self._layer_mb:
            c = self.cfg
            method, dim = (c.ssl_method, c.ssl_proj_dim) if self.ssl else ("", 64)
            shape = self.input_shape()
            chunk = DEFAULT_FROZEN_CHUNK
            end_to_end = not self.layerwise
            self._layer_mb[layer] = required_mb(
                c.model, self.num_classes, c.width, layer, c.batch_size, shape, chunk, method, dim, end_to_end
            )
        return self._layer_mb[layer]

    def completion_time(self, partition_id: int) -> float:
        """Simulated local training time (s, Eq. 6) of the current stage, frozen layers at the expected dropout."""
        node = self.nodes[partition_id]
        if node.speed_flops <= 0:
            return 0.0
        return completion_time(self.flops_per_sample(), node.num_examples, self.cfg.local_epochs, node.speed_flops)

    def flops_per_sample(self) -> float:
        """Training FLOPs per local example of the current stage (Eq. 5; SSL: both views, twice)."""
        if self.layer not in self._layer_flops:
            layer = self.layer if self.layerwise else None
            flops = stage_flops(self.model, layer, self.cfg.fedll_dropout, self.input_shape())
            self._layer_flops[self.layer] = flops.total * (2 if self.ssl else 1)
        return self._layer_flops[self.layer]

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
        examples = float(metrics.get(P.NUM_EXAMPLES, 0.0))
        self.client_flops += self.flops_per_sample() * examples * self.cfg.local_epochs
        self.client_rounds += 1

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
        prefixes = frozen_layer_prefixes(self.layers, self.layer) + stage_prefixes(self.layers, self.layer, self.ssl)
        if not self.layerwise:
            prefixes = end_to_end_prefixes(self.layers, self.ssl)
        return {k: v for k, v in self.arrays.items() if k.startswith(prefixes)}, {P.FEDLL_LAYER: self.layer}

    # ------------------------------------------------------------------ evaluation and stages
    def server_model(self) -> FedLLModel | EndToEndModel:
        """The current stage sub-model with the global arrays loaded (eval: no dropout)."""
        last = self.num_layers - 1
        if not self.layerwise:
            sub: FedLLModel | EndToEndModel = EndToEndModel(
                self.model, self.ssl_heads[str(last)] if self.ssl else None, self.ssl
            )
        elif self.ssl:
            sub = FedLLModel(
                self.model, self.layer, self.ssl_heads[str(self.layer)], input_shape=self.input_shape(), ssl=True
            )
        else:
            head = None if self.layer == last else self.heads[str(self.layer)]
            sub = FedLLModel(self.model, self.layer, head, input_shape=self.input_shape())
        keys = set(sub.state_dict())
        load_numpy(sub, {k: v for k, v in self.arrays.items() if k in keys})
        return sub

    def before_round(self, grid: object, server_round: int) -> None:
        """Remember the round (the SSL evaluation schedule reads it)."""
        self._round = server_round

    def evaluate_server(self) -> tuple[float | None, float | None]:
        """Supervised: the stage sub-model on the test set. SSL: the probe's loss and accuracy when due, else None."""
        if not self.ssl:
            return super().evaluate_server()
        every, rnd = self.cfg.ssl_eval_every, self._round
        if not (rnd == 0 or rnd == self.cfg.num_rounds or (every > 0 and rnd % every == 0)):
            self._round_ssl = {}
            return None, None
        result = self._downstream(full=rnd == 0)
        self.ssl_results[str(rnd)] = result
        self._round_ssl = {"knn-accuracy": result["knn-accuracy"], "probe-accuracy": result["probe-accuracy"]}
        return result["probe-loss"], result["probe-accuracy"]

    def _downstream(self, full: bool = False) -> dict[str, float]:
        """Linear probe and k-NN accuracy of the current encoder (:mod:`common.ssl`); keeps the probe's weights.

        The encoder is the stage's (layers 0..k), or with ``full`` every layer: the floor at round 0
        is the whole randomly initialised encoder for the layer-wise run too, the same encoder (same
        seed) the end-to-end reference starts from.
        """
        from common.data import load_dataset, to_tensor
        from common.ssl import features, fit_linear_probe, knn_accuracy, probe_indices

        spec = self.cfg.data_spec()
        if self._probe_data is None:
            ds = load_dataset(spec)
            idx = probe_indices(len(ds.y_train), self.cfg.ssl_probe_fraction, self.cfg.seed)
            x_test, y_test = held_out_set(spec)
            self._probe_data = (to_tensor(spec, ds.x_train[idx]), torch.from_numpy(ds.y_train[idx]), x_test, y_test)
        x_probe, y_probe, x_test, y_test = self._probe_data
        sub = self.server_model()
        if full and self.layerwise:
            load_numpy(self.model, self.final_arrays())
            sub = EndToEndModel(self.model, self.ssl_heads[str(self.num_layers - 1)], True)
        sub.eval()
        batch = self.cfg.eval_batch_size
        f_probe, f_test = features(sub.encode, x_probe, batch), features(sub.encode, x_test, batch)
        probe = fit_linear_probe(f_probe, y_probe, f_test, y_test, self.num_classes)
        knn = knn_accuracy(f_probe, y_probe, f_test, y_test, self.num_classes, k=self.cfg.ssl_knn_k)
        weight_key = next(k for k in self.arrays if k.startswith("head.") and k.endswith(".weight"))
        if tuple(self.arrays[weight_key].shape) == tuple(probe.weight.T.shape):  # the full encoder: a classifier
            bias_key = weight_key[: -len("weight")] + "bias"
            self._probe_head = {
                weight_key: probe.weight.T.float().numpy().copy(),
                bias_key: probe.bias.float().numpy().copy(),
            }
        return {
            "probe-loss": probe.loss,
            "probe-accuracy": probe.accuracy,
            "knn-accuracy": knn,
            "probe-examples": float(len(y_probe)),
        }

    def final_arrays(self) -> dict[str, np.ndarray]:
        """Blocks and head only (the per-layer heads are training scaffolding); in SSL the head is the last probe."""
        scaffold = (f"{HEAD_PREFIX}.", f"{SSL_HEAD_PREFIX}.")
        out = {k: v for k, v in self.arrays.items() if not k.startswith(scaffold)}
        if self.ssl and self._probe_head:
            out.update(self._probe_head)
        return out

    def full_model(self) -> BlockModel:
        """The full network with the global arrays loaded."""
        load_numpy(self.model, self.final_arrays())
        return self.model

    def final_evaluation(self) -> tuple[float, float]:
        """Test loss and accuracy of the full model (SSL: the last round's linear probe, i.e. ``model.pt``'s head)."""
        if self.ssl:
            last = self.ssl_results.get(str(self.cfg.num_rounds)) or self._downstream()
            return last["probe-loss"], last["probe-accuracy"]
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
            if self.cfg.outmod_warm_start and not self.ssl:
                self.arrays.update(warm_start_head(self.arrays, self.layer, self.num_layers))
        return {
            "fedll-skipped-share": skipped / frozen if frozen > 0 else None,
            "froze-layer": layer + 1 if reason else None,
            "freeze-reason": reason,
            **self._round_ssl,
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
            **self._client_costs(),
            **self._ssl_summary(),
        }

    def _client_costs(self) -> dict[str, float]:
        """Per client and round: modelled training GFLOPs and MB moved (down + up), over every reply."""
        n = max(1, self.client_rounds)
        moved = sum((r.get("bytes-down") or 0) + (r.get("bytes-up") or 0) for r in self.recorder.rounds)
        return {"client-gflops-per-round": self.client_flops / n / 1e9, "client-mb-per-round": moved / n / 2**20}

    def _ssl_summary(self) -> dict[str, object]:
        """SSL: the final and the floor's (round 0, random encoder) downstream figures, every evaluation by round."""
        if not self.ssl:
            return {}
        final = self.ssl_results.get(str(self.cfg.num_rounds), {})
        floor = self.ssl_results.get("0", {})
        return {
            "ssl-method": self.cfg.ssl_method,
            "fedll-layerwise": self.layerwise,
            "ssl-probe-accuracy": final.get("probe-accuracy"),
            "ssl-knn-accuracy": final.get("knn-accuracy"),
            "ssl-floor-probe-accuracy": floor.get("probe-accuracy"),
            "ssl-floor-knn-accuracy": floor.get("knn-accuracy"),
            "ssl-evaluations": self.ssl_results,
        }
