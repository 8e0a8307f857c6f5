"""The nodes a strategy knows: what it records per node (:class:`NodeInfo`) and how it finds them (discovery).

Node IDs are random per run, so at start-up (and whenever new nodes appear) every node is asked,
with a ``query`` message, for its ``partition-id``, data size and budget; seeded sampling then
draws partition ids. :class:`NodeDiscovery` is a part of :class:`server_app.strategy.FedAvgStrategy`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from common import protocol as P
from server_app.failures import group_failures

log = logging.getLogger("progfl")

QUERY_CHUNK = 50
"""Nodes queried at once at start-up in simulation (see :meth:`FedAvgStrategy._query_all`)."""


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


class NodeDiscovery:
    """Discovery of nodes for :class:`server_app.strategy.FedAvgStrategy` (its ``cfg``, ``nodes``, ``exchange``)."""

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
