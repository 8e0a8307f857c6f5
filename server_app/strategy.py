"""FedAvg as a Flower Message-API ``Strategy``: the base the progressive strategies extend.

What it adds to Flower's own FedAvg:

* **Seeded, reproducible sampling.** Node IDs are random per run, so at start-up (and when new
  nodes appear) every node is asked, with a ``query`` message, for its ``partition-id``;
  sampling then draws partition ids from a generator seeded by ``(seed, round)``.
* **Messages built per node**: every node gets its own ``RecordDict`` (arrays, config with its
  own local seed), the hook the progressive strategies use to send each node its sub-model.
* **Accounting**: bytes down and up per round, failures, participation.
* **Outputs**: one progress line per round, and metrics/checkpoint/plot in the run folder.
* **Checkpoint and resume**: after every round :meth:`FedAvgStrategy.checkpoint_state` is written
  to ``<run-dir>/checkpoint.npz`` (:mod:`server_app.checkpoint`); ``start(checkpoint=...)``
  restores it and continues with the next round. Per-round random choices derive from
  ``(seed, round)``, so a resumed run replays the uninterrupted one.

Subclasses override :meth:`train_payload` (what a node receives) and :meth:`apply_updates`
(how replies change the global model) and :meth:`server_model` (what is evaluated).

Its parts live in their own modules: node records and discovery (:mod:`server_app.nodes`),
checkpoint and resume (:mod:`server_app.strategy_state`), the round loop and progress line
(:mod:`server_app.round_loop`); this module holds sampling, budgets, payloads and aggregation.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import protocol as P
from common.aggregate import weighted_average
from common.config import RunConfig
from common.data import held_out_set
from common.flops import completion_time, round_time, stage_flops
from common.memory import stage_memory
from common.models import BlockModel, build_model
from common.monitor import largest_fitting_batch
from common.training import evaluate, load_numpy, state_to_numpy
from server_app.exchange import exchange_timing, send_and_receive
from server_app.failures import group_failures
from server_app.nodes import NodeDiscovery, NodeInfo
from server_app.outputs import RunRecorder
from server_app.round_loop import RoundLoop
from server_app.strategy_state import CheckpointState
from server_app.validation import check_arrays, check_num_examples, norm_outliers, update_norm

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("progfl")

QUERY_MEMORY_MARGIN = 3.0
"""A monitor query's batch is sized to 1/3 of the node's budget in the memory model: on the CPU a training step's
real memory runs 2.2-2.7x its modelled tensors (allocator and kernel buffers; README's device guide), and the
query only measures (speed, the output-layer gradient), so it takes the margin rather than risk an OOM kill."""
PER_ROUND_MAXIMA = (
    P.PEAK_MB,
    P.RSS_PEAK_MB,
    P.STARTUP_SECONDS,
    P.NODE_SECONDS,
    P.RELAY_SECONDS,
    P.OS_PEAK_MB,
    P.OS_LIMIT_HIT,
)
"""Reply metrics whose largest value over a round's participants is recorded as ``max-<key>``."""


def derive_seed(*parts: int) -> int:
    """A 31-bit seed derived from integers (run seed, round, partition, ...)."""
    return int(np.random.default_rng([abs(int(p)) for p in parts]).integers(0, 2**31 - 1))


class FedAvgStrategy(NodeDiscovery, CheckpointState, RoundLoop, Strategy):
    """Plain FedAvg on the full model with seeded sampling, per-node messages and accounting."""

    name = "fedavg"

    checkpoint_attrs: tuple[str, ...] = ("arrays", "sim_time", "_ever_eligible", "rejections")
    """Attributes saved in every checkpoint and set again on resume. Each class lists only its own;
    the lists along the MRO are joined. Values: JSON types, numpy arrays, sets, tuples, dicts, or
    objects with ``state_dict``/``from_state_dict`` (stage machine, pace controller, selector)."""

    transient_attrs: tuple[str, ...] = (
        "cfg",
        "recorder",
        "num_classes",
        "nodes",
        "model",
        "_required_cache",
        "_sent",
        "_round_bytes_down",
        "_round_failures",
        "_round_participants",
        "_round_succeeded",
        "_round_train_metrics",
        "_round_rejections",
        "_round_aggregated",
        "_connected",
        "_sent_mb",
        "deployed",
        "_exchanges",
        "oom_kills",
    )
    """Attributes not checkpointed: built from the run config, caches, per-round scratch (joined along
    the MRO like :attr:`checkpoint_attrs`). ``nodes`` is saved by partition id in the base state
    (node IDs change when nodes reconnect) and ``model`` is a container the arrays are loaded into."""

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, num_classes: int) -> None:
        self.cfg = cfg
        self.recorder = recorder
        self.num_classes = num_classes
        self.nodes: dict[int, NodeInfo] = {}
        self.model: BlockModel = build_model(cfg.model, num_classes, cfg.width, seed=cfg.seed)
        self.arrays: dict[str, np.ndarray] = state_to_numpy(self.model)
        self._round_bytes_down = 0
        self._round_failures = 0
        self._round_aggregated = False
        self._connected: set[int] | None = None
        self._round_participants: list[int] = []
        self._round_succeeded: list[int] = []
        self._round_train_metrics: dict[str, float] = {}
        self._required_cache: dict[int, float] = {}
        self.sim_time = 0.0
        self._ever_eligible = False
        self._sent: dict[int, dict[str, np.ndarray]] = {}
        self._round_rejections: list[tuple[int, str]] = []
        self.rejections: dict[str, int] = {}
        self.oom_kills = 0
        self._sent_mb: dict[int, float] = {}
        self.deployed = False  # set by start(): True on a SuperLink's grid, False in simulation
        self._exchanges: list[dict[str, float]] = []  # this round's message exchanges (timing)

    def exchange(
        self,
        grid: Grid,
        messages: Iterable[Message],
        timeout: float | None = None,
        while_waiting: Callable[[], None] | None = None,
    ) -> list[Message]:
        """Push messages, collect replies (deployment: pulled every ``poll-interval`` s, :mod:`server_app.exchange`).

        ``while_waiting`` runs once between the push and the first pull (the previous round's closing work).
        """
        timeout = self.cfg.round_timeout if timeout is None else timeout
        start = time.monotonic()
        replies = send_and_receive(grid, messages, timeout, self.cfg.poll_interval, while_waiting)
        self._exchanges.append(exchange_timing(time.monotonic() - start, replies))
        return replies

    def evaluates_in(self, server_round: int, num_rounds: int) -> bool:
        """Whether ``server_round`` has a separate federated-evaluation exchange (``evaluate-every``).

        ``evaluate-every=0`` (auto): every round in simulation, where a message costs microseconds,
        and in deployment only the final one after the last round: there every exchange waits on
        Flower's polling (the SuperNode sleeps 3 s when it finds no message), and the train replies
        already carry the participants' evaluation of the model they received (``pre-eval``). The
        last round always has it; :meth:`start` times that final evaluation apart from the round.
        """
        if not self.client_evaluation:
            return False
        if self.needs_every_evaluation:
            return True
        if server_round == num_rounds:
            return True
        every = self.cfg.evaluate_every or (0 if self.deployed else 1)
        return every > 0 and server_round % every == 0

    client_evaluation = True
    """False for models the clients cannot evaluate on labels (FedLL's SSL: no classifier until the server's probe):
    no evaluate messages, no ``pre-eval``."""

    needs_every_evaluation = False
    """True for strategies whose decisions read the federated evaluation (TiFL's tier accuracies)."""

    # ------------------------------------------------------------------ resources
    enforces_budget = False  # FedAvg is the unconstrained reference: it ignores memory budgets

    def input_shape(self) -> tuple[int, ...]:
        """(channels, height, width) of one input image."""
        return tuple(held_out_set(self.cfg.data_spec())[0].shape[1:])

    def current_stage(self) -> int | None:
        """0-based stage trained now, or None when the full model is trained."""
        return None

    def required_mb(self, stage: int | None = None) -> float:
        """Modelled training memory (MB, Eq. 4) of ``stage`` (default: the current one) at the batch size."""
        stage = self.current_stage() if stage is None else stage
        key = -1 if stage is None else stage
        if key not in self._required_cache:
            self._required_cache[key] = stage_memory(self.model, stage, self.cfg.batch_size, self.input_shape()).total
        return self._required_cache[key]

    def fits(self, partition_id: int) -> bool:
        """True if the node's budget holds the current (sub-)model's modelled training memory."""
        return self.nodes[partition_id].memory_mb >= self.required_mb()

    def query_batch_size(self, partition_id: int, stage: int | None) -> int:
        """Batch at which a monitor query may train ``stage`` (None: full model) on the node.

        The configured batch if a :data:`QUERY_MEMORY_MARGIN` share of the node's budget (and of any
        OOM cap) holds it in the memory model, else the largest smaller batch that does
        (:func:`common.monitor.largest_fitting_batch`).
        """
        node = self.nodes[partition_id]
        budget = min(node.memory_mb, node.oom_cap_mb) / QUERY_MEMORY_MARGIN
        if math.isinf(budget):
            return self.cfg.batch_size
        shape = self.input_shape()
        return largest_fitting_batch(
            lambda b: stage_memory(self.model, stage, b, shape).total, budget, self.cfg.batch_size
        )

    def completion_time(self, partition_id: int) -> float:
        """Simulated local training time in seconds of the node (Eq. 6); 0 if its speed is unknown."""
        node = self.nodes[partition_id]
        if node.speed_flops <= 0:
            return 0.0
        flops = stage_flops(self.model, self.current_stage(), self.input_shape()).total
        return completion_time(flops, node.num_examples, self.cfg.local_epochs, node.speed_flops)

    def available(self) -> list[int]:
        """Partition ids of the nodes connected at the last :meth:`discover` (all known before it)."""
        if self._connected is None:
            return sorted(self.nodes)
        return sorted(pid for pid, n in self.nodes.items() if n.node_id in self._connected)

    def node_required_mb(self, partition_id: int) -> float:
        """Modelled training memory (MB) of what this node would be sent now (strategies sizing per node override)."""
        return self.required_mb()

    def eligible(self, server_round: int) -> list[int]:
        """Partition ids that may train this round: connected nodes (FedAvg), and that fit the budget.

        A node whose worker the OS killed at its memory limit on something of the size it would be
        sent now is left out, also by strategies that ignore budgets (FedAvg).
        """
        pool = [p for p in self.available() if self._under_cap(p)]
        if not self.enforces_budget:
            return pool
        return [pid for pid in pool if self.fits(pid)]

    def _under_cap(self, partition_id: int) -> bool:
        """False if an OOM kill capped the node below what it would be sent now (no memory model needed otherwise)."""
        cap = self.nodes[partition_id].oom_cap_mb
        return math.isinf(cap) or self.node_required_mb(partition_id) <= cap

    def on_oom(self, server_round: int, partition_id: int, required_mb: float) -> None:
        """The OS killed the node's worker at its memory limit: never send it this much again (MB, modelled)."""
        node = self.nodes[partition_id]
        node.observe_memory(server_round, required_mb, None)
        node.oom_cap_mb = min(node.oom_cap_mb, required_mb * (1 - 1e-6))
        node.memory_mb = min(node.memory_mb, node.oom_cap_mb)
        self.oom_kills += 1
        log.warning(
            "round %d: node %d was killed by the OS at its memory limit on a sub-model of %.1f MB (modelled); "
            "its budget is now below that and it is sent nothing of that size again",
            server_round,
            partition_id,
            required_mb,
        )

    def sample(self, server_round: int) -> list[int]:
        """Partition ids to train in ``server_round``: a seeded draw among the eligible.

        The round size is fraction-train of *all* nodes (as in "10 of 40 per round"), capped by
        how many are eligible, so every strategy aims at the same number of participants.
        """
        pool = self.eligible(server_round)
        if len(pool) < self.cfg.min_train_nodes:
            log.warning(
                "round %d: %d eligible nodes, fewer than min-train-nodes=%d; using all",
                server_round,
                len(pool),
                self.cfg.min_train_nodes,
            )
            return pool
        k = min(len(pool), max(self.cfg.min_train_nodes, math.ceil(self.cfg.fraction_train * len(self.nodes))))
        rng = np.random.default_rng([self.cfg.seed, server_round])
        return sorted(int(p) for p in rng.choice(pool, size=k, replace=False))

    # ------------------------------------------------------------------ hooks
    def train_payload(self, server_round: int, partition_id: int) -> dict[str, np.ndarray]:
        """Arrays sent to one node for training (the full global model for FedAvg)."""
        return self.arrays

    def train_config(self, server_round: int, partition_id: int) -> dict[str, int | float | str | bool]:
        """Per-node training config sent with the arrays."""
        return {
            P.ROUND: server_round,
            P.SEED: derive_seed(self.cfg.seed, server_round, partition_id),
            P.ENFORCE_BUDGET: self.enforces_budget,
        }

    def apply_updates(self, server_round: int, updates: list[tuple[dict[str, np.ndarray], float]]) -> None:
        """Aggregate replies into the global model (FedAvg, SmartFreeze Eq. 1)."""
        self.merge(weighted_average(updates))

    def merge_part(self, updates: list[tuple[dict[str, np.ndarray], float]], expected: set[str], what: str) -> None:
        """Weighted average (Eq. 1) of replies that each carry exactly the keys ``expected`` (the trained
        part, ``what`` names it in the error), merged into the global state; the rest is untouched."""
        for arrays, _ in updates:
            if set(arrays) != expected:
                extra, missing = sorted(set(arrays) - expected), sorted(expected - set(arrays))
                raise ValueError(f"{what} reply: unexpected keys {extra[:3]}, missing {missing[:3]}")
        self.merge(weighted_average(updates))

    def merge(self, aggregated: dict[str, np.ndarray]) -> None:
        """Write aggregated arrays into the global state, keeping each key's global shape.

        Messages carry scalars as shape (1,); the global state keeps the model's own shapes.
        """
        for key, value in aggregated.items():
            ref = self.arrays.get(key)
            if ref is None:
                raise KeyError(f"aggregated key {key!r} is not part of the global model")
            if value.size != ref.size:
                raise ValueError(f"aggregated {key!r} has {value.size} values, the global model {ref.size}")
            self.arrays[key] = value.reshape(ref.shape)

    def on_start(self, grid: Grid) -> None:
        """Called once all nodes are known, before round 1 (the monitor's first query in subclasses)."""

    def before_round(self, grid: Grid, server_round: int) -> None:
        """Called before each round is configured (e.g. re-query the monitor at a new stage)."""

    def expected_reply_keys(self, partition_id: int) -> set[str]:
        """Array keys a training reply must hold: everything sent (subclasses that upload part override)."""
        return set(self._sent[partition_id])

    def reject(self, server_round: int, partition_id: int, reason: str) -> None:
        """Drop a reply from aggregation, log why, and count it by reason."""
        log.warning("round %d: reply of node %d rejected (%s)", server_round, partition_id, reason)
        self._round_rejections.append((partition_id, reason))
        kind = reason.split(":", 1)[0]
        self.rejections[kind] = self.rejections.get(kind, 0) + 1

    def round_side_messages(self, server_round: int) -> list[Message]:
        """Messages other than training that go out in the round's own exchange (after :meth:`configure_train`).

        They cost no extra exchange: each goes to a node that is not training this round, and the
        exchange waits for its training replies anyway. Their replies go to :meth:`on_side_replies`.
        """
        return []

    def on_side_replies(self, server_round: int, replies: list[Message]) -> None:
        """Replies to :meth:`round_side_messages` (none in FedAvg)."""
        for reply in replies:
            log.warning(
                "round %d: unexpected %s reply from node %s ignored",
                server_round,
                reply.metadata.message_type,
                reply.metadata.src_node_id,
            )

    def on_evaluate_reply(self, partition_id: int, accuracy: float) -> None:
        """Called for every successful federated-evaluation reply (TiFL's tier accuracy)."""

    def on_reply(self, server_round: int, partition_id: int, metrics: dict) -> None:
        """Called for every successful training reply (per-node bookkeeping in subclasses)."""

    def on_failure(self, server_round: int, partition_id: int) -> None:
        """Called for every sampled node whose training reply failed or never came."""

    def server_model(self) -> BlockModel:
        """The model the server evaluates on the test set (the full global model)."""
        load_numpy(self.model, self.arrays)
        return self.model

    # ------------------------------------------------------------------ Strategy API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled node, each with its own RecordDict.

        What a node receives comes from :meth:`train_payload` (``arrays`` is not used: the
        strategy owns the global state and may send each node a different part of it).
        """
        self._round_participants = self.sample(server_round)
        self._ever_eligible = self._ever_eligible or bool(self._round_participants)
        msgs: list[Message] = []
        self._round_bytes_down = 0
        cache: dict[tuple, ArrayRecord] = {}
        self._sent = {}
        self._sent_mb = {}
        for pid in self._round_participants:
            if self.deployed:  # what an OS memory limit may kill the node's worker on (modelled MB)
                self._sent_mb[pid] = self.node_required_mb(pid)
            payload = self.train_payload(server_round, pid)
            self._sent[pid] = payload  # kept alive: the cache key holds the arrays' ids
            key = (tuple(payload), tuple(id(v) for v in payload.values()))
            record = cache.get(key)
            if record is None:
                record = cache[key] = P.to_record(payload)
            node_arrays = ArrayRecord(dict(record.items()))
            node_config = ConfigRecord({**dict(config), **self.train_config(server_round, pid)})
            if pid in self._sent_mb:  # the node checks its budget against it instead of running the memory model
                node_config[P.REQUIRED_MB] = self._sent_mb[pid]
            self._round_bytes_down += node_arrays.count_bytes()
            msgs.append(
                Message(
                    RecordDict({P.ARRAYS: node_arrays, P.CONFIG: node_config}),
                    self.nodes[pid].node_id,
                    MessageType.TRAIN,
                )
            )
        return msgs

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted average of the replies that arrived; failures are logged and skipped."""
        updates: list[tuple[dict[str, np.ndarray], float]] = []
        bytes_up = 0
        losses: list[tuple[float, float]] = []
        peaks: dict[str, list[float]] = {}
        pre_eval: list[tuple[float, float, float]] = []
        replies = list(replies)
        by_node = {n.node_id: n for n in self.nodes.values()}
        succeeded: set[int] = set()
        candidates: dict[int, tuple[dict[str, np.ndarray], dict]] = {}
        self._round_rejections = []
        errors: list[tuple[int | str, str]] = []
        for reply in replies:
            node = by_node.get(reply.metadata.src_node_id)
            if node is None:
                if reply.has_error():  # the SuperLink answers for a node that is gone, under its own id
                    errors.append((f"node {reply.metadata.src_node_id}", reply.error.reason))
                else:
                    log.warning(
                        "round %d: reply from unknown node %s ignored", server_round, reply.metadata.src_node_id
                    )
                continue
            if reply.has_error():
                errors.append((node.partition_id, reply.error.reason))
                if P.OOM_KILLED in reply.error.reason and node.partition_id in self._sent_mb:
                    self.on_oom(server_round, node.partition_id, self._sent_mb[node.partition_id])
                continue
            pid = node.partition_id
            if pid not in self._sent:
                self.reject(server_round, pid, "unsolicited: node was not sampled this round")
                continue
            try:
                record = reply.content[P.ARRAYS]
                m = dict(reply.content[P.METRICS])
                arrays = P.from_record(record)
            except (KeyError, TypeError, ValueError) as exc:
                self.reject(server_round, pid, f"malformed: {exc}")
                continue
            bytes_up += record.count_bytes()
            reason = check_num_examples(m.get(P.NUM_EXAMPLES), node.num_examples)
            if reason is None and not math.isfinite(float(m.get(P.TRAIN_LOSS, math.nan))):
                reason = f"metrics: train-loss {m.get(P.TRAIN_LOSS)!r} is missing or not finite"
            reason = reason or check_arrays(arrays, self._sent[pid], self.expected_reply_keys(pid))
            if reason:
                self.reject(server_round, pid, reason)
                continue
            candidates[pid] = (arrays, m)
        for line in group_failures(errors):  # one line per cause, however many nodes share it
            log.warning("round %d: training failed on %s", server_round, line)
        norms = {pid: update_norm(arrays, self._sent[pid]) for pid, (arrays, _) in candidates.items()}
        if self.cfg.reject_norm_factor > 0:
            for pid, reason in norm_outliers(norms, self.cfg.reject_norm_factor).items():
                self.reject(server_round, pid, reason)
                del candidates[pid]
        for pid, (arrays, m) in sorted(candidates.items()):
            n = float(m[P.NUM_EXAMPLES])
            updates.append((arrays, n))
            losses.append((float(m[P.TRAIN_LOSS]), n))
            for key in PER_ROUND_MAXIMA:
                if key in m:
                    peaks.setdefault(key, []).append(float(m[key]))
            self.nodes[pid].observe_memory(server_round, self._sent_mb.get(pid), m)
            if P.PRE_EVAL_ACCURACY in m:
                keys = (P.PRE_EVAL_LOSS, P.PRE_EVAL_ACCURACY, P.PRE_EVAL_EXAMPLES)
                pre_eval.append(tuple(float(m[k]) for k in keys))  # type: ignore[arg-type]
            self.nodes[pid].rounds_trained.append(server_round)
            succeeded.add(pid)
            self.on_reply(server_round, pid, m)
        for pid in self._round_participants:
            if pid not in succeeded:
                self.on_failure(server_round, pid)
        self._round_failures = len(self._round_participants) - len(succeeded)
        self._round_succeeded = sorted(succeeded)
        metrics: dict[str, float] = {
            "bytes-down": float(self._round_bytes_down),
            "bytes-up": float(bytes_up),
            "failures": float(self._round_failures),
            "participants": float(len(updates)),
            "rejected": float(len(self._round_rejections)),
            "eligible": float(len(self.eligible(server_round))),
            "modelled-memory-mb": self.required_mb(),
        }
        metrics.update({f"max-{k}": max(v) for k, v in peaks.items()})
        if self.oom_kills:
            metrics["oom-kills"] = float(self.oom_kills)
        examples = sum(r[2] for r in pre_eval)
        if examples > 0:  # federated evaluation of the model the participants received (train replies)
            metrics["pre-train-client-loss"] = sum(r[0] * r[2] for r in pre_eval) / examples
            metrics["pre-train-client-accuracy"] = sum(r[1] * r[2] for r in pre_eval) / examples
        times = [self.completion_time(pid) for pid in succeeded]
        metrics["sim-round-seconds"] = round_time(times)
        self.sim_time += metrics["sim-round-seconds"]
        metrics["sim-time"] = self.sim_time
        if losses:
            total = sum(w for _, w in losses)
            metrics["train-loss"] = sum(loss * w for loss, w in losses) / total
        self._round_train_metrics = metrics
        self._round_aggregated = len(updates) >= self.cfg.min_replies
        if not self._round_aggregated:
            log.warning(
                "round %d: %d valid training replies, fewer than min-replies=%d; the global model is unchanged",
                server_round,
                len(updates),
                self.cfg.min_replies,
            )
            return None, MetricRecord(metrics)
        self.apply_updates(server_round, updates)
        return P.to_record(self.arrays), MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation on a seeded fraction-evaluate of nodes.

        What is evaluated comes from :meth:`eval_payload` (``arrays`` is not used: the strategy
        owns the global state).
        """
        if self.cfg.fraction_evaluate <= 0 or not self.nodes:
            return []
        pool = sorted(self.nodes)
        k = max(1, math.ceil(self.cfg.fraction_evaluate * len(pool)))
        rng = np.random.default_rng([self.cfg.seed, server_round, 1])
        chosen = sorted(int(p) for p in rng.choice(pool, size=min(k, len(pool)), replace=False))
        payload, extra = self.eval_payload(server_round)
        shared = P.to_record(payload)
        return [
            Message(
                RecordDict(
                    {
                        P.ARRAYS: ArrayRecord(dict(shared.items())),
                        P.CONFIG: ConfigRecord({**dict(config), **extra, P.ROUND: server_round}),
                    }
                ),
                self.nodes[pid].node_id,
                MessageType.EVALUATE,
            )
            for pid in chosen
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' local validation loss and accuracy."""
        rows = []
        for reply in replies:
            if reply.has_error():
                log.warning(
                    "round %d: evaluation failed on node %s: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
                continue
            m = reply.content[P.METRICS]
            if float(m[P.NUM_EXAMPLES]) > 0:
                pid = int(m[P.PARTITION_ID])
                rows.append((pid, float(m[P.EVAL_LOSS]), float(m[P.EVAL_ACCURACY]), float(m[P.NUM_EXAMPLES])))
        rows.sort()  # partition-id order, not arrival order: the float sums below are the same in every run
        for pid, _, accuracy, _ in rows:
            self.on_evaluate_reply(pid, accuracy)
        rows = [r[1:] for r in rows]
        if not rows:
            return None
        total = sum(r[2] for r in rows)
        return MetricRecord(
            {
                "client-loss": sum(r[0] * r[2] for r in rows) / total,
                "client-accuracy": sum(r[1] * r[2] for r in rows) / total,
            }
        )

    def summary(self) -> None:
        """Log the strategy's settings."""
        c = self.cfg
        log.info(
            "%s: %s width %s, %d rounds, fraction-train %s, local epochs %d, batch %d, lr %s, seed %d",
            self.name,
            c.model,
            c.width,
            c.num_rounds,
            c.fraction_train,
            c.local_epochs,
            c.batch_size,
            c.lr,
            c.seed,
        )

    # ------------------------------------------------------------------ evaluation and the loop
    def evaluate_server(self) -> tuple[float | None, float | None]:
        """Loss and accuracy of :meth:`server_model` on the held-out test set (None, None: not this round)."""
        return self._evaluate_on_test(self.server_model())

    def _evaluate_on_test(self, model: nn.Module) -> tuple[float, float]:
        """Loss and accuracy of ``model`` on the held-out test set."""
        x, y = held_out_set(self.cfg.data_spec())
        return evaluate(model, x, y, self.cfg.eval_batch_size)

    def server_evaluation(self) -> Callable[[], tuple[float | None, float | None]]:
        """:meth:`evaluate_server` to run later, on the model as it is now.

        The model is copied, so the evaluation can run while the next round is configured and trained
        (``overlap-server-work``) and still measure this round's model. A subclass that overrides
        :meth:`evaluate_server` is evaluated at once and its result returned later.
        """
        if type(self).evaluate_server is not FedAvgStrategy.evaluate_server:
            result = self.evaluate_server()
            return lambda: result
        model = copy.deepcopy(self.server_model())
        return lambda: self._evaluate_on_test(model)

    def overlaps_server_work(self) -> bool:
        """Whether the round loop pushes the next round before closing the last one (``overlap-server-work``)."""
        mode = self.cfg.overlap_server_work
        return mode == "on" or (mode == "auto" and self.deployed)

    def round_info(self, server_round: int) -> dict[str, float | int | str]:
        """Columns describing what this round trains (the stage, in subclasses); read before training."""
        return {}

    def end_round(self, server_round: int) -> dict[str, float | int | str | bool | None]:
        """Called once a round is trained and evaluated; returns extra columns (pace, freezing)."""
        return {}

    def summary_extras(self) -> dict[str, object]:
        """Run-level values subclasses add to metrics.json (stage schedule etc.)."""
        return {}

    def final_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of the final model saved as model.pt (the full network)."""
        return self.arrays

    def eval_payload(self, server_round: int) -> tuple[dict[str, np.ndarray], dict[str, int | float | str | bool]]:
        """Arrays and config for federated evaluation (the full global model for FedAvg)."""
        return self.arrays, {}

    def participation_rate(self) -> float:
        """Share of known nodes that trained at least once."""
        if not self.nodes:
            return 0.0
        return sum(1 for n in self.nodes.values() if n.rounds_trained) / len(self.nodes)

    def final_evaluation(self) -> tuple[float, float]:
        """Evaluation of the final full model (the last round's for FedAvg)."""
        last = self.recorder.rounds[-1]
        return float(last["server-loss"]), float(last["server-accuracy"])
