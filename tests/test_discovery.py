"""Start-up discovery of many nodes: chunked queries in simulation, one batch in deployment."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from common import protocol as P
from common.config import parse_run_config
from server_app import nodes as N
from server_app import strategy as S
from server_app.outputs import RunRecorder


class FakeGrid:
    """A grid whose nodes answer the query at once with partition id = node id - 1000."""

    def __init__(self, num_nodes: int) -> None:
        self.ids = list(range(1000, 1000 + num_nodes))
        self.batches: list[int] = []

    def get_node_ids(self) -> list[int]:
        return self.ids

    def push_messages(self, messages: list[Message]) -> list[str]:
        """Deployment's push: every message gets its reply at once (pulled by :meth:`pull_messages`)."""
        self.batches.append(len(messages))
        self.replies: dict[str, Message] = getattr(self, "replies", {})
        ids = []
        for i, msg in enumerate(messages):
            mid = f"m{len(self.batches)}-{i}"
            msg.metadata.__dict__["_message_id"] = mid
            nid = msg.metadata.dst_node_id
            metrics = {P.PARTITION_ID: nid - 1000, P.NUM_EXAMPLES: 5, P.MEMORY_MB: -1.0, P.SPEED_FLOPS: 1e9}
            reply = Message(RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = nid
            self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        return [self.replies.pop(mid) for mid in list(message_ids) if mid in self.replies]

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


class FakeSimulationGrid(FakeGrid, InMemoryGrid):
    """The same, seen by the strategy as the simulation's in-memory grid."""

    def __init__(self, num_nodes: int) -> None:  # InMemoryGrid's own state is not needed
        FakeGrid.__init__(self, num_nodes)


@pytest.mark.parametrize(("grid_cls", "expected"), [(FakeSimulationGrid, [50, 50, 20]), (FakeGrid, [120])])
def test_discovery_queries_in_chunks_only_in_simulation(tmp_path: Path, grid_cls: type, expected: list[int]) -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    assert N.QUERY_CHUNK == 50
    cfg = parse_run_config({"model": "smallcnn", "synthetic-train-size": 200, "synthetic-test-size": 50})
    strategy = S.FedAvgStrategy(cfg, RunRecorder(cfg, tmp_path / "run"), 10)
    grid = grid_cls(120)
    strategy.discover(grid)
    assert grid.batches == expected
    assert sorted(strategy.nodes) == list(range(120))
    assert all(strategy.nodes[pid].node_id == 1000 + pid for pid in range(120))
    strategy.discover(grid)  # nothing new: no query
    assert grid.batches == expected
