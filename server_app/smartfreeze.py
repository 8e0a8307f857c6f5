"""SmartFreeze (IWQoS 2024): progressive block training with output modules and a pace controller.

The server owns the global state: the model's blocks and head (``blocks.<i>.*``, ``head.*``) and
one output module per non-final block (``outmod.<k>.*``). Stage k (0-based; shown 1-based in
logs and metrics) trains block k with output module k; blocks 0..k-1 are frozen. Per round:

1. Each sampled node gets block k and output module k, plus the frozen blocks it does not hold
   yet (nodes report the frozen blocks they hold in every reply; a node that lost them fails the
   round and is sent them again next time).
2. Replies carry block k and output module k only; they are averaged (Eq. 1) into the state.
3. The server evaluates the stage sub-model (frozen prefix + block k + output module k).
4. The pace controller observes block k's parameters (every trainable scalar of the block, not
   BN running statistics) and the stage machine advances when it signals convergence, when the
   stage hits ``max-stage-rounds``, or when the remaining budget is needed by later stages.

The last stage trains the last block with the model's own head, i.e. the full network with a
frozen prefix; the final evaluation and ``model.pt`` are the full model.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import protocol as P
from common.community import RLCDConfig, data_importance, rl_cd, similarity_matrix
from common.config import RunConfig
from common.models import BlockModel
from common.output_modules import OUTMOD_PREFIX, StageModel, build_output_modules, frozen_prefixes, stage_prefixes
from common.pace import PaceController
from common.selector import ParticipantSelector
from common.stages import StageMachine
from common.training import evaluate, load_numpy, state_to_numpy
from server_app.outputs import RunRecorder, atomic_write_bytes
from server_app.strategy import FedAvgStrategy, log


def warm_start_arrays(arrays: dict[str, np.ndarray], stage: int, num_blocks: int) -> dict[str, np.ndarray]:
    """Initial arrays for stage ``stage``'s output module (or head) from stage ``stage - 1``'s.

    Output module k-1 is [conv for block k, conv for block k+1, ..., classifier]; output module k
    is the same without its first conv (BN, ReLU), with identical shapes. So module k starts from
    module k-1's trained layers for blocks k+1.. and its classifier; at the last stage the
    model's head (pool, flatten, linear: the same layout as the classifier) starts from the last
    output module's classifier. Without this every stage would start its tail from scratch.
    """
    prev = f"{OUTMOD_PREFIX}.{stage - 1}."
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if not key.startswith(prev):
            continue
        rest = key[len(prev) :]
        part, _, tail = rest.partition(".")
        if part == "classifier":
            new = f"head.{tail}" if stage == num_blocks - 1 else f"{OUTMOD_PREFIX}.{stage}.classifier.{tail}"
        else:
            index, _, name = tail.partition(".")
            if int(index) < 3:  # conv, BN, ReLU standing in for block `stage`, now trained for real
                continue
            new = f"{OUTMOD_PREFIX}.{stage}.convs.{int(index) - 3}.{name}"
        if new not in arrays or arrays[new].shape != value.shape:
            raise KeyError(f"warm start: {key} has no counterpart {new} of the same shape")
        out[new] = value.copy()
    return out


class SmartFreezeStrategy(FedAvgStrategy):
    """Progressive training with output modules, pace-controlled freezing and a stage machine."""

    name = "smartfreeze"
    enforces_budget = True
    checkpoint_attrs = (
        "machine",
        "pace",
        "selector",
        "communities",
        "community_splits",
        "monitored_stage",
        "monitor_bytes",
    )
    # output_modules: containers (their arrays are in ``arrays``); grads: used once by RL-CD at start;
    # frozen_held: what nodes hold is lost when they restart, so a resumed run sends frozen blocks again.
    transient_attrs = ("output_modules", "grads", "frozen_held", "_monitor_due")

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, num_classes: int) -> None:
        super().__init__(cfg, recorder, num_classes)
        self.output_modules = build_output_modules(self.model, seed=cfg.seed + 1)
        self.arrays.update({f"{OUTMOD_PREFIX}.{k}": v for k, v in state_to_numpy(self.output_modules).items()})
        self.machine = StageMachine(
            num_blocks=self.model.num_blocks,
            total_rounds=cfg.num_rounds,
            min_rounds=cfg.min_stage_rounds,
            max_rounds=cfg.max_stage_rounds,
        )
        self.pace = PaceController(cfg.pace_config())
        self.pace.reset(0)
        self.frozen_held: dict[int, set[int]] = {}
        self.selector = ParticipantSelector(cfg.selector_config())
        self.grads: dict[int, np.ndarray] = {}
        self._monitor_due = False  # stage-monitor=with-round: the new stage's queries go out with the round
        self.communities: list[list[int]] = []
        self.community_splits: list[dict] = []
        self.monitored_stage: int | None = None
        self.monitor_bytes = 0

    @property
    def stage(self) -> int:
        """The 0-based stage being trained."""
        return self.machine.stage

    def _active_keys(self) -> list[str]:
        prefixes = stage_prefixes(self.stage, self.model.num_blocks)
        return [k for k in self.arrays if k.startswith(prefixes)]

    def _block_param_keys(self, block: int) -> list[str]:
        return [f"blocks.{block}.{name}" for name, _ in self.model.blocks[block].named_parameters()]

    # ------------------------------------------------------------------ payloads and aggregation
    def train_payload(self, server_round: int, partition_id: int) -> dict[str, np.ndarray]:
        """Active block + output module, plus the frozen blocks this node does not hold."""
        held = self.frozen_held.get(partition_id, set())
        payload = {k: self.arrays[k] for k in self._active_keys()}
        for block in range(self.stage):
            if block not in held:
                payload.update({k: v for k, v in self.arrays.items() if k.startswith(f"blocks.{block}.")})
        return payload

    def train_config(self, server_round: int, partition_id: int) -> dict[str, int | float | str | bool]:
        """FedAvg's per-node config plus the stage to build."""
        return {**super().train_config(server_round, partition_id), P.STAGE: self.stage}

    def on_reply(self, server_round: int, partition_id: int, metrics: dict) -> None:
        """Remember which frozen blocks the node holds; refresh its data importance (Eq. 9)."""
        held = metrics.get(P.FROZEN_HELD, [])
        self.frozen_held[partition_id] = {int(b) for b in held} if isinstance(held, list) else set()
        if P.LOSS_SQ_MEAN in metrics:
            importance = data_importance(int(metrics[P.NUM_EXAMPLES]), float(metrics[P.LOSS_SQ_MEAN]))
            self.selector.record_success(partition_id, server_round, importance, self._known_time(partition_id))

    def _known_time(self, partition_id: int) -> float | None:
        """The node's modelled completion time (s), or None while its speed is unknown (its monitor query failed)."""
        seconds = self.completion_time(partition_id)
        return seconds if seconds > 0 else None

    def on_failure(self, server_round: int, partition_id: int) -> None:
        """A failed node may have lost its frozen blocks (send them again); its utility drops."""
        self.frozen_held.pop(partition_id, None)
        self.selector.record_failure(partition_id, server_round)

    # ------------------------------------------------------------------ monitor and selection
    def current_stage(self) -> int | None:
        """The 0-based stage being trained."""
        return self.stage

    def monitor(self, grid: Grid, arrays: dict[str, np.ndarray], stage: int, want_grad: bool, pids: list[int]) -> None:
        """Query the local monitor of ``pids`` with a model; refresh budgets, speeds, importance, gradients."""
        if pids:
            self.take_monitor_replies(self.exchange(grid, self.monitor_messages(arrays, stage, want_grad, pids)))
        self.monitored_stage = stage

    def monitor_messages(
        self, arrays: dict[str, np.ndarray], stage: int, want_grad: bool, pids: list[int]
    ) -> list[Message]:
        """One monitor ``query`` per node in ``pids`` with the (sub-)model ``arrays`` of ``stage`` (-1: full)."""
        record = P.to_record(arrays)
        config = {P.STAGE: stage, P.WANT_GRAD: want_grad, P.ROUND: self.machine.completed_rounds}
        msgs = [
            Message(
                RecordDict(
                    {
                        P.ARRAYS: ArrayRecord(dict(record.items())),
                        P.CONFIG: ConfigRecord(self._query_config(config, pid)),
                    }
                ),
                self.nodes[pid].node_id,
                MessageType.QUERY,
            )
            for pid in pids
        ]
        self.monitor_bytes += record.count_bytes() * len(msgs)
        return msgs

    def take_monitor_replies(self, replies: list[Message]) -> None:
        """Budgets, speeds, data importance (Eq. 9) and output-layer gradients from monitor replies."""
        by_node = {n.node_id: n for n in self.nodes.values()}
        for reply in replies:
            node = by_node.get(reply.metadata.src_node_id)
            if node is None or reply.has_error():
                reason = reply.error.reason if reply.has_error() else "unknown node"
                log.warning("monitor query failed on node %s: %s", reply.metadata.src_node_id, reason)
                continue
            m = dict(reply.content[P.METRICS])
            node.update(m)
            importance = data_importance(node.num_examples, float(m.get(P.LOSS_SQ_MEAN, 0.0)))
            self.selector.update_client(
                node.partition_id, importance=importance, completion_time=self._known_time(node.partition_id)
            )
            if P.GRAD in reply.content:
                self.grads[node.partition_id] = P.from_record(reply.content[P.GRAD])[P.GRAD]

    def _query_config(self, config: dict[str, Any], partition_id: int) -> dict[str, Any]:
        """Deployed, the query trains at the batch the node's budget fits (an OS limit may kill it otherwise)."""
        if not self.deployed:
            return config
        stage = int(config[P.STAGE])
        return {**config, P.QUERY_BATCH: self.query_batch_size(partition_id, None if stage < 0 else stage)}

    def on_start(self, grid: Grid) -> None:
        """First monitor query with the global model: budgets, speeds, importance, gradients; RL-CD."""
        pids = sorted(self.nodes)
        self.monitor(grid, self.final_arrays(), -1, self.cfg.selector == "rlcd", pids)
        if self.cfg.selector != "rlcd":
            return
        have = [pid for pid in pids if pid in self.grads]
        if len(have) < 2:
            log.warning("RL-CD needs output-layer gradients from at least 2 nodes, got %d; no communities", len(have))
            return
        sim = similarity_matrix(np.stack([self.grads[pid] for pid in have]))
        buf = io.BytesIO()
        np.save(buf, sim)  # rows/cols: the partition ids in `have` (sorted), i.e. the union of the communities
        atomic_write_bytes(self.recorder.run_dir / "similarity.npy", buf.getvalue())
        result = rl_cd(sim, RLCDConfig(seed=self.cfg.seed))
        self.communities = [[have[i] for i in c] for c in result.communities]
        self.community_splits = result.splits
        self.selector.set_communities(self.communities)
        first = len(result.first_level)
        log.info("RL-CD: %d communities (%d from the first Louvain pass)", len(self.communities), first)

    def stage_monitor_with_round(self) -> bool:
        """Whether a new stage's monitor query goes out with the round's training (``stage-monitor``)."""
        mode = self.cfg.stage_monitor
        return mode == "with-round" or (mode == "auto" and self.deployed)

    def before_round(self, grid: Grid, server_round: int) -> None:
        """At a new stage, refresh the data importance of the nodes that fit it (Sec. IV-C3).

        ``stage-monitor='query'``: a query exchange before the round's selection, as in the paper.
        ``'with-round'``: the query goes to the fitting nodes that are not selected, in the round's
        own exchange (:meth:`round_side_messages`); the round's selection uses the importance known
        so far, and the selected nodes' training replies refresh theirs (:meth:`on_reply`). This
        saves an exchange per stage, which deployed waits on Flower's 3 s SuperNode idle poll.
        """
        if self.monitored_stage == self.stage or self.cfg.selector != "rlcd":
            return
        if self.stage_monitor_with_round():
            self._monitor_due = True
            return
        arrays, _ = self.eval_payload(server_round)
        self.monitor(grid, arrays, self.stage, False, self.eligible(server_round))

    def round_side_messages(self, server_round: int) -> list[Message]:
        """With ``stage-monitor='with-round'``, a new stage's monitor queries to the fitting nodes not training."""
        if not self._monitor_due:
            return []
        self._monitor_due = False
        self.monitored_stage = self.stage
        training = set(self._round_participants)
        pids = [pid for pid in self.eligible(server_round) if pid not in training]
        return self.monitor_messages(self.eval_payload(server_round)[0], self.stage, False, pids) if pids else []

    def on_side_replies(self, server_round: int, replies: list[Message]) -> None:
        """The monitor replies that came with the round's training replies."""
        self.take_monitor_replies(replies)

    def sample(self, server_round: int) -> list[int]:
        """Nodes that fit the stage, chosen by the selector (RL-CD + bandit) or uniformly (``selector='random'``)."""
        if self.cfg.selector == "random":
            return super().sample(server_round)
        pool = self.eligible(server_round)
        k = max(self.cfg.min_train_nodes, math.ceil(self.cfg.fraction_train * len(self.nodes)))
        return sorted(self.selector.select(server_round, pool, k, self.cfg.min_train_nodes))

    def expected_reply_keys(self, partition_id: int) -> set[str]:
        """Replies carry the active block and output module only."""
        return set(self._active_keys())

    def apply_updates(self, server_round: int, updates: list[tuple[dict[str, np.ndarray], float]]) -> None:
        """Average the active block and output module (Eq. 1); everything else is untouched."""
        self.merge_part(updates, set(self._active_keys()), f"stage {self.stage + 1}")

    def eval_payload(self, server_round: int) -> tuple[dict[str, np.ndarray], dict[str, int | float | str | bool]]:
        """The whole stage sub-model (frozen prefix + active block + output module)."""
        prefixes = frozen_prefixes(self.stage) + stage_prefixes(self.stage, self.model.num_blocks)
        return {k: v for k, v in self.arrays.items() if k.startswith(prefixes)}, {P.STAGE: self.stage}

    # ------------------------------------------------------------------ evaluation and stages
    def server_model(self) -> StageModel:
        """The current stage sub-model with the global arrays loaded."""
        om = self.output_modules[str(self.stage)] if self.stage < self.model.num_blocks - 1 else None
        sub = StageModel(self.model, self.stage, om)
        state_keys = set(sub.state_dict())
        load_numpy(sub, {k: v for k, v in self.arrays.items() if k in state_keys})
        return sub

    def full_model(self) -> BlockModel:
        """The full network (every block and the model head) with the global arrays loaded."""
        load_numpy(self.model, self.final_arrays())
        return self.model

    def final_arrays(self) -> dict[str, np.ndarray]:
        """Blocks and head only (output modules are training scaffolding)."""
        return {k: v for k, v in self.arrays.items() if not k.startswith(f"{OUTMOD_PREFIX}.")}

    def final_evaluation(self) -> tuple[float, float]:
        """Test loss and accuracy of the full model."""
        from common.data import held_out_set

        x, y = held_out_set(self.cfg.data_spec())
        return evaluate(self.full_model(), x, y, self.cfg.eval_batch_size)

    def round_info(self, server_round: int) -> dict[str, float | int | str]:
        """The 1-based stage trained in this round."""
        return {"stage": self.stage + 1}

    def end_round(self, server_round: int) -> dict[str, float | int | str | bool | None]:
        """Feed the pace controller, advance the stage machine, report both."""
        trained = self._round_aggregated  # a failed round (< min-replies) does not count
        block = self.stage
        step = None
        if trained:
            params = np.concatenate([self.arrays[k].ravel() for k in self._block_param_keys(block)])
            step = self.pace.observe(server_round, params)
        reason = self.machine.end_of_round(converged=bool(step and step.freeze))
        if reason is not None:
            log.info("round %d: block %d frozen (%s); stage %d starts", server_round, block + 1, reason, self.stage + 1)
            self.pace.reset(self.stage)
            if self.cfg.outmod_warm_start:
                self.arrays.update(warm_start_arrays(self.arrays, self.stage, self.model.num_blocks))
        self._write_pace()
        return {
            "pace-metric": None if step is None else step.metric,
            "pace-smoothed": None if step is None else step.smoothed,
            "pace-slope": None if step is None else step.slope,
            "pace-streak": None if step is None else step.streak,
            "froze-block": block + 1 if reason else None,
            "freeze-reason": reason,
        }

    def _write_pace(self) -> None:
        doc = {"stages": self.machine.state_dict(), "pace": self.pace.history}
        atomic_write_bytes(self.recorder.run_dir / "pace.json", json.dumps(doc, indent=1).encode())

    def summary_extras(self) -> dict[str, object]:
        """Stage schedule: rounds per stage and the round each block froze."""
        self.machine.finish()
        self._write_pace()
        return {
            "communities": self.communities,
            "community-splits": self.community_splits,
            "monitor-bytes": self.monitor_bytes,
            "stages": [
                {"stage": h.stage + 1, "start-round": h.start_round, "end-round": h.end_round, "reason": h.reason}
                for h in self.machine.history
            ],
        }
