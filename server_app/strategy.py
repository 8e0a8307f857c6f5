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
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from common import protocol as P
from common.aggregate import weighted_average
from common.config import RunConfig
from common.data import held_out_set
from common.flops import completion_time, round_time, stage_flops
from common.memory import stage_memory
from common.models import BlockModel, build_model
from common.monitor import largest_fitting_batch
from common.training import evaluate, load_numpy, state_to_numpy
from server_app import checkpoint as ckpt
from server_app.exchange import exchange_timing, final_timing, round_timing, send_and_receive
from server_app.failures import group_failures
from server_app.outputs import RunRecorder
from server_app.validation import check_arrays, check_num_examples, norm_outliers, update_norm

log = logging.getLogger("progfl")

QUERY_CHUNK = 50
"""Nodes queried at once at start-up in simulation (see :meth:`FedAvgStrategy._query_all`)."""
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


@dataclass
class NodeInfo:
    """What the server knows about one node (keyed by its partition id)."""

    node_id: int
    partition_id: int
    num_examples: int
    memory_mb: float = float("inf")
    speed_flops: float = 0.0
    rounds_trained: list[int] = field(default_factory=list)
    oom_cap_mb: float = float("inf")  # below the modelled need of what the OS killed this node's worker on
    memory_seen: list[dict[str, float]] = field(default_factory=list)
    """Deployed under an OS limit, per reply: round, modelled need sent (MB), peak charged to the limit (MB),
    limit hit (0/1), or ``oom`` = 1 for a reply the OS killed (:meth:`observe_memory`)."""

    def update(self, metrics: dict) -> None:
        """Take the monitor's memory budget (MB; -1 = unlimited) and speed (FLOP/s) from a reply.

        The budget never exceeds :attr:`oom_cap_mb`: a node whose worker was killed at its OS memory
        limit keeps the lowered budget whatever it reports afterwards.
        """
        if P.MEMORY_MB in metrics:
            mb = float(metrics[P.MEMORY_MB])
            self.memory_mb = min(float("inf") if mb < 0 else mb, self.oom_cap_mb)
        if float(metrics.get(P.SPEED_FLOPS, 0.0)) > 0:
            self.speed_flops = float(metrics[P.SPEED_FLOPS])

    def observe_memory(self, server_round: int, modelled_mb: float | None, metrics: dict | None) -> None:
        """Record what the node's OS limit measured on a train reply (``metrics``), or an OOM kill (None).

        Nothing is recorded for a reply without the limit's figures (no OS limit on that node)."""
        row = {"round": float(server_round), "modelled-mb": float(modelled_mb) if modelled_mb is not None else -1.0}
        if metrics is None:
            self.memory_seen.append({**row, "oom": 1.0})
        elif P.OS_PEAK_MB in metrics:
            row["os-peak-mb"] = float(metrics[P.OS_PEAK_MB])
            row["os-limit-hit"] = float(metrics.get(P.OS_LIMIT_HIT, 0.0))
            self.memory_seen.append(row)


def _as_arrays(value: Any) -> Any:
    """A dict of numpy values (model arrays) with every value an array: 0-d entries may be numpy scalars."""
    if isinstance(value, dict) and value and all(isinstance(v, np.ndarray | np.generic) for v in value.values()):
        return {k: np.asarray(v) for k, v in value.items()}
    return value


def _check_like(name: str, current: Any, value: Any) -> None:
    """A restored array (or dict of arrays) must match the freshly built one in keys, shapes and dtypes."""
    if isinstance(current, np.ndarray):
        if not isinstance(value, np.ndarray) or value.shape != current.shape or value.dtype != current.dtype:
            got = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
            raise ckpt.CheckpointError(f"checkpoint {name}: {got}, the model has {current.dtype} {current.shape}")
    elif isinstance(current, dict) and current and all(isinstance(v, np.ndarray) for v in current.values()):
        if not isinstance(value, dict) or set(value) != set(current):
            extra = sorted(set(value) - set(current)) if isinstance(value, dict) else []
            missing = sorted(set(current) - set(value)) if isinstance(value, dict) else sorted(current)
            raise ckpt.CheckpointError(
                f"checkpoint {name}: keys differ from the model (extra {extra[:3]}, missing {missing[:3]})"
            )
        for key in current:
            _check_like(f"{name}[{key!r}]", current[key], value[key])


def derive_seed(*parts: int) -> int:
    """A 31-bit seed derived from integers (run seed, round, partition, ...)."""
    return int(np.random.default_rng([abs(int(p)) for p in parts]).integers(0, 2**31 - 1))


class FedAvgStrategy(Strategy):
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

    # ------------------------------------------------------------------ nodes and sampling
    def discover(self, grid: Grid) -> None:
        """Learn the partition id of every new node and which known nodes are still connected.

        The first call (start of the run) waits up to ``node-wait-seconds`` for
        ``min-available-nodes``. Later calls (every round) do not wait: a device that dropped out is
        no longer sampled (see :meth:`available`) and the round goes on with the others; a node
        that (re)connects is queried and sampled again.
        """
        deadline = time.monotonic() + self.cfg.node_wait_seconds
        first = self._connected is None
        while True:
            node_ids = sorted(grid.get_node_ids())
            if len(node_ids) >= self.cfg.min_available_nodes or not first:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(node_ids)} nodes connected after node-wait-seconds={self.cfg.node_wait_seconds}; "
                    f"min-available-nodes={self.cfg.min_available_nodes}"
                )
            time.sleep(1.0)
        connected = set(node_ids)
        lost = sorted(n.partition_id for n in self.nodes.values() if n.node_id not in connected)
        was_lost = set() if first else {n.partition_id for n in self.nodes.values() if n.node_id not in self._connected}
        if lost and set(lost) != was_lost:
            log.warning("partition(s) %s no longer connected: not sampled until they reconnect", lost)
        self._connected = connected
        known = {n.node_id for n in self.nodes.values()}
        new = [nid for nid in node_ids if nid not in known]
        if not new:
            return
        failed: list[tuple[int | str, str]] = []
        for reply in self._query_all(grid, new):
            src = reply.metadata.src_node_id
            if reply.has_error():
                failed.append((src, reply.error.reason))
                continue
            m = reply.content[P.METRICS]
            pid = int(m[P.PARTITION_ID])
            if pid in self.nodes and self.nodes[pid].node_id != src:
                log.warning(
                    "partition-id %d claimed by node %s and node %s; keeping the first",
                    pid,
                    self.nodes[pid].node_id,
                    src,
                )
                continue
            self.nodes[pid] = NodeInfo(src, pid, int(m[P.NUM_EXAMPLES]))
            self.nodes[pid].update(dict(m))
        causes = group_failures(failed)
        for line in causes:
            log.warning("start-up query failed on %s", line)
        if first and len(self.nodes) < self.cfg.min_available_nodes:
            why = f"; the others failed: {causes[0]}" + (f" (and {len(causes) - 1} other causes)" if causes[1:] else "")
            raise RuntimeError(
                f"{len(self.nodes)} nodes answered the start-up query, min-available-nodes="
                f"{self.cfg.min_available_nodes}" + (why if causes else "")
            )

    def _query_all(self, grid: Grid, node_ids: list[int]) -> list[Message]:
        """Replies to the start-up ``query`` of ``node_ids``; in simulation in chunks of :data:`QUERY_CHUNK`.

        Flower's simulation engine looks for work by asking its message store, for every node, every
        0.1 s, for that node's next message, each time walking all stored messages (and checking each):
        the cost of one pass grows with nodes x messages in flight, and it holds the GIL of the process
        that also runs this ServerApp (one pass over 1,000 nodes: 5.3 s with 1,000 messages stored, 0.33 s
        with 50). Chunks keep few messages in flight (1,000 nodes: 37 % less ServerApp CPU during the
        discovery, BENCHMARKS.md). In deployment every ``send_and_receive`` waits for the SuperNodes'
        polling (seconds), so all nodes are asked at once.
        """
        chunk = QUERY_CHUNK if isinstance(grid, InMemoryGrid) else len(node_ids)
        replies: list[Message] = []
        for start in range(0, len(node_ids), max(1, chunk)):
            msgs = [
                Message(RecordDict({P.CONFIG: ConfigRecord({P.ROUND: 0})}), nid, MessageType.QUERY)
                for nid in node_ids[start : start + chunk]
            ]
            replies.extend(self.exchange(grid, msgs))
        return replies

    def exchange(self, grid: Grid, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        """Push messages, collect replies (deployment: pulled every ``poll-interval`` s, :mod:`server_app.exchange`)."""
        timeout = self.cfg.round_timeout if timeout is None else timeout
        start = time.monotonic()
        replies = send_and_receive(grid, messages, timeout, self.cfg.poll_interval)
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
        if self.needs_every_evaluation:
            return True
        if server_round == num_rounds:
            return True
        every = self.cfg.evaluate_every or (0 if self.deployed else 1)
        return every > 0 and server_round % every == 0

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

        The configured batch if the node's budget (and any OOM cap) holds it in the memory model,
        else the largest smaller batch that does (:func:`common.monitor.largest_fitting_batch`).
        """
        node = self.nodes[partition_id]
        budget = min(node.memory_mb, node.oom_cap_mb)
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

    # ------------------------------------------------------------------ checkpoint and resume
    @classmethod
    def declared_attrs(cls, kind: str) -> list[str]:
        """``checkpoint_attrs`` or ``transient_attrs`` of every class in the MRO, base classes first."""
        out: list[str] = []
        for klass in reversed(cls.__mro__):
            out += [a for a in klass.__dict__.get(kind, ()) if a not in out]
        return out

    def undeclared_attrs(self) -> list[str]:
        """Instance attributes neither checkpointed nor declared transient (a resume would lose them)."""
        known = set(self.declared_attrs("checkpoint_attrs")) | set(self.declared_attrs("transient_attrs"))
        return sorted(set(vars(self)) - known)

    def checkpoint_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, JSON-ready state) that, with the run config, determine every later round.

        The state holds every attribute of :attr:`checkpoint_attrs` (encoded by
        :func:`server_app.checkpoint.encode`), the node table by partition id (examples, budget,
        speed, rounds trained) and the metrics recorded so far (rows and summary). Subclasses with
        extra state list it in ``checkpoint_attrs``; override this (calling ``super()``) only for
        state that is not an attribute.
        """
        arrays: dict[str, np.ndarray] = {}
        state = {
            "attrs": {
                name: ckpt.encode(_as_arrays(getattr(self, name)), arrays, f"attrs/{name}")
                for name in self.declared_attrs("checkpoint_attrs")
            },
            "nodes": {
                str(pid): {
                    "node-id": n.node_id,
                    "num-examples": n.num_examples,
                    "memory-mb": n.memory_mb,
                    "speed-flops": n.speed_flops,
                    "rounds-trained": list(n.rounds_trained),
                    "oom-cap-mb": n.oom_cap_mb if math.isfinite(n.oom_cap_mb) else -1.0,
                    "memory-seen": [dict(row) for row in n.memory_seen],
                }
                for pid, n in sorted(self.nodes.items())
            },
            "recorder": ckpt.encode(
                {"rounds": self.recorder.rounds, "summary": self.recorder.summary}, arrays, "recorder"
            ),
        }
        return arrays, state

    def restore_state(self, state: dict[str, Any]) -> None:
        """Set the state of :meth:`checkpoint_state` (decoded) on this freshly built strategy.

        Called after :meth:`discover`, instead of :meth:`on_start`. Arrays must match the freshly
        built ones in keys, shapes and dtypes; nodes are matched by partition id and keep the
        checkpoint's budget, speed and rounds trained (what the uninterrupted run would use).
        """
        attrs = state["attrs"]
        missing = [name for name in self.declared_attrs("checkpoint_attrs") if name not in attrs]
        if missing:
            raise ckpt.CheckpointError(f"checkpoint of strategy {self.name!r} lacks {missing}")
        for name in self.declared_attrs("checkpoint_attrs"):
            current, value = getattr(self, name), attrs[name]
            if isinstance(value, ckpt.ObjectState):
                value = value.build(current, name)
            _check_like(name, current, value)
            setattr(self, name, value)
        saved = {int(pid): info for pid, info in state["nodes"].items()}
        for pid, info in sorted(saved.items()):
            node = self.nodes.get(pid)
            if node is None:
                log.warning("resume: partition %d is in the checkpoint but has not reconnected", pid)
                continue
            if node.num_examples != int(info["num-examples"]):
                raise ckpt.CheckpointError(
                    f"partition {pid} now holds {node.num_examples} examples, {info['num-examples']} in the checkpoint"
                )
            if node.memory_mb != float(info["memory-mb"]):
                log.warning(
                    "resume: partition %d reports %.1f MB now, %.1f MB in the checkpoint; using the checkpoint's",
                    pid,
                    node.memory_mb,
                    float(info["memory-mb"]),
                )
            node.memory_mb = float(info["memory-mb"])
            node.speed_flops = float(info["speed-flops"])
            node.rounds_trained = [int(r) for r in info["rounds-trained"]]
            cap = float(info.get("oom-cap-mb", -1.0))  # absent in checkpoints before the OS limits
            node.oom_cap_mb = cap if cap >= 0 else float("inf")
            node.memory_seen = [{k: float(v) for k, v in row.items()} for row in info.get("memory-seen", [])]
        new = sorted(set(self.nodes) - set(saved))
        if new:
            log.warning("resume: partitions %s were not in the checkpoint; sampling may differ from the original", new)
        self.recorder.rounds = list(state["recorder"]["rounds"])
        self.recorder.summary.update(state["recorder"]["summary"])
        self.recorder.write_metrics()

    def save_checkpoint(self, server_round: int) -> None:
        """Write ``<run-dir>/checkpoint.npz`` after ``server_round`` (atomically)."""
        arrays, state = self.checkpoint_state()
        ckpt.save_checkpoint(self.recorder.run_dir, server_round, self.name, self.cfg.to_flat(), state, arrays)

    def resume(self, checkpoint: ckpt.Checkpoint) -> int:
        """Restore ``checkpoint`` (after :meth:`discover`); return the first round still to run."""
        self.restore_state(checkpoint.decoded_state())
        log.info("resumed %s after round %d from %s", self.name, checkpoint.round, checkpoint.path)
        print(f"[{self.name}] resumed after round {checkpoint.round} from {checkpoint.path}", flush=True)
        return checkpoint.round + 1

    # ------------------------------------------------------------------ evaluation and the loop
    def evaluate_server(self) -> tuple[float, float]:
        """Loss and accuracy of :meth:`server_model` on the held-out test set."""
        x, y = held_out_set(self.cfg.data_spec())
        return evaluate(self.server_model(), x, y, self.cfg.eval_batch_size)

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

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        checkpoint: ckpt.Checkpoint | None = None,
    ) -> Result:
        """Run all rounds: train, federated evaluation, server evaluation, record, checkpoint, print progress.

        With ``checkpoint`` (validated by :func:`server_app.checkpoint.check_resume`), the state is
        restored instead of :meth:`on_start` and the run continues after the checkpoint's round.
        """
        if initial_arrays is not None:
            self.arrays = P.from_record(initial_arrays)
        num_rounds = num_rounds or self.cfg.num_rounds
        timeout = timeout or self.cfg.round_timeout
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        result = Result()
        self.deployed = not isinstance(grid, InMemoryGrid)
        self.summary()
        self.discover(grid)
        undeclared = self.undeclared_attrs()
        if undeclared:
            log.warning("%s: attributes %s are not checkpointed; a resumed run may differ", self.name, undeclared)
        if checkpoint is None:
            self.on_start(grid)
            loss0, acc0 = self.evaluate_server()
            log.info("initial server evaluation: accuracy %.2f%% loss %.4f", 100 * acc0, loss0)
            self.recorder.add_round({"round": 0, **self.round_info(1), "server-accuracy": acc0, "server-loss": loss0})
            first, elapsed = 1, 0.0
        else:
            first = self.resume(checkpoint)
            elapsed = float(self.recorder.rounds[-1].get("wall-seconds") or 0.0) if self.recorder.rounds else 0.0
        t_start = time.monotonic() - elapsed
        for rnd in range(first, num_rounds + 1):
            t_round = time.monotonic()
            self._exchanges = []
            self.discover(grid)
            self.before_round(grid, rnd)
            info = self.round_info(rnd)
            evaluates = self.evaluates_in(rnd, num_rounds)
            round_config = train_config if evaluates else ConfigRecord({**dict(train_config), P.PRE_EVAL: True})
            for attempt in range(self.cfg.round_retries + 1):
                msgs = list(self.configure_train(rnd, ArrayRecord(), round_config, grid))
                replies = self.exchange(grid, msgs + (self.round_side_messages(rnd) if attempt == 0 else []), timeout)
                side = [r for r in replies if r.metadata.message_type != MessageType.TRAIN]
                if side:
                    self.on_side_replies(rnd, side)
                replies = [r for r in replies if r.metadata.message_type == MessageType.TRAIN]
                agg_arrays, train_metrics = self.aggregate_train(rnd, replies)
                if agg_arrays is not None or not self._round_participants:
                    break
                if attempt < self.cfg.round_retries:
                    retries = self.cfg.round_retries
                    log.warning("round %d: too few valid replies; retrying (%d/%d)", rnd, attempt + 1, retries)
            self._round_train_metrics["attempts"] = attempt + 1
            if agg_arrays is not None:
                result.arrays = agg_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[rnd] = train_metrics
            loss, acc = self.evaluate_server()
            result.evaluate_metrics_serverapp[rnd] = MetricRecord({"server-loss": loss, "server-accuracy": acc})
            eval_msgs = list(self.configure_evaluate(rnd, ArrayRecord(), evaluate_config, grid)) if evaluates else []
            t_eval, train_exchanges = time.monotonic(), len(self._exchanges)
            client_metrics = None
            if eval_msgs:
                client_metrics = self.aggregate_evaluate(rnd, self.exchange(grid, eval_msgs, timeout))
            if client_metrics is not None:
                result.evaluate_metrics_clientapp[rnd] = client_metrics
            now = time.monotonic()
            final_eval: dict[str, float] = {}
            if eval_msgs and rnd == num_rounds:  # the run's final federated evaluation, timed apart from the round
                final_eval = {"final-evaluate-seconds": now - t_eval, **final_timing(self._exchanges[train_exchanges:])}
                self._exchanges = self._exchanges[:train_exchanges]
            round_end = t_eval if final_eval else now
            row = {
                "round": rnd,
                **info,
                "server-accuracy": acc,
                "server-loss": loss,
                **(dict(client_metrics) if client_metrics else {}),
                **self._round_train_metrics,
                "participant-ids": list(self._round_succeeded),
                "round-seconds": round_end - t_round,
                **round_timing(self._exchanges),
                **final_eval,
                "wall-seconds": now - t_start,
            }
            row.update(self.end_round(rnd))
            self.recorder.add_round(row)
            self.save_checkpoint(rnd)
            eta = (now - t_start) / rnd * (num_rounds - rnd)
            self.progress(rnd, num_rounds, row, eta)
            if rnd == self.cfg.stop_after_round and rnd < num_rounds:
                raise ckpt.StopAfterRound(
                    f"stopped after round {rnd} as asked by stop-after-round={rnd} (testing an interruption); "
                    f"continue with: ./run.sh resume {self.recorder.run_dir}"
                )
        if not any(n.rounds_trained for n in self.nodes.values()):
            if self._ever_eligible:
                raise RuntimeError(f"no client trained successfully in {num_rounds} rounds; see the node errors above")
            log.warning("%s: no device's budget fits the model in any round; the model was never trained", self.name)
            print(f"[{self.name}] no device fits the model: participation 0 %, the model is untrained", flush=True)
        final_loss, final_acc = self.final_evaluation()
        self.recorder.save_model(self.final_arrays())
        self.recorder.set_summary(
            strategy=self.name,
            rounds=num_rounds,
            **{"final-accuracy": final_acc, "final-loss": final_loss},
            **{
                "best-accuracy": max(
                    r["server-accuracy"] for r in self.recorder.rounds if r.get("server-accuracy") is not None
                )
            },
            **{"participation-rate": self.participation_rate(), "num-nodes": len(self.nodes)},
            **{
                "node-memory-mb": {
                    str(pid): n.memory_mb if math.isfinite(n.memory_mb) else -1.0
                    for pid, n in sorted(self.nodes.items())
                }
            },
            **{"node-memory-seen": {str(pid): n.memory_seen for pid, n in sorted(self.nodes.items()) if n.memory_seen}},
            **{
                "bytes-down": sum(r.get("bytes-down", 0) for r in self.recorder.rounds),
                "bytes-up": sum(r.get("bytes-up", 0) for r in self.recorder.rounds),
            },
            **{"wall-seconds": time.monotonic() - t_start, "rejections": self.rejections},
            **self.summary_extras(),
        )
        self.recorder.plot_accuracy()
        try:
            from server_app.report import write_report

            write_report(self.recorder.run_dir)
        except Exception as exc:  # the report is a convenience: it must never fail the run
            log.warning("could not write report.html in %s: %s", self.recorder.run_dir, exc, exc_info=True)
        return result

    def final_evaluation(self) -> tuple[float, float]:
        """Evaluation of the final full model (the last round's for FedAvg)."""
        last = self.recorder.rounds[-1]
        return float(last["server-loss"]), float(last["server-accuracy"])

    def progress(self, rnd: int, num_rounds: int, row: dict, eta: float) -> None:
        """Print one progress line for the round."""
        extra = f" stage {row['stage']}" if "stage" in row else ""
        client = f" client-acc {100 * row['client-accuracy']:5.1f}%" if row.get("client-accuracy") is not None else ""
        line = (
            f"[{self.name}] round {rnd}/{num_rounds}{extra}"
            f" | acc {100 * row['server-accuracy']:5.1f}% loss {row['server-loss']:.3f}"
            f"{client} | {int(row.get('participants', 0))} clients ({int(row.get('failures', 0))} failed)"
            f" | {row['round-seconds']:.1f}s, elapsed {row['wall-seconds']:.0f}s, eta {eta:.0f}s"
        )
        if row.get("froze-step"):  # ProFL: a shrinking step ends without freezing its block
            line += f" | step {row['froze-step']} ended ({row['freeze-reason']})"
        elif row.get("froze-block"):
            line += f" | block {row['froze-block']} frozen ({row['freeze-reason']})"
        print(line, flush=True)
