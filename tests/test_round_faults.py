"""Server-side fault handling without Flower: lost nodes are not sampled, failed rounds do not feed the pace."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import parse_run_config
from server_app.baselines import TiFLStrategy
from server_app.outputs import RunRecorder
from server_app.smartfreeze import SmartFreezeStrategy
from server_app.strategy import FedAvgStrategy, NodeInfo

SMALL = {
    "model": "smallcnn",
    "synthetic-train-size": 200,
    "synthetic-test-size": 50,
    "fraction-train": 0.5,
    "num-rounds": 20,
}


class FakeGrid:
    """Just enough of a Flower Grid for :meth:`FedAvgStrategy.discover` on already known nodes."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: list, timeout: float | None = None) -> list:
        raise AssertionError("no query expected: every connected node is known")


def make(cls: type, run_dir: Path, n: int = 6, **over: object) -> FedAvgStrategy:
    cfg = parse_run_config({**SMALL, "strategy": cls.name, **over})
    strategy = cls(cfg, RunRecorder(cfg, run_dir), 10)
    for pid in range(n):
        strategy.nodes[pid] = NodeInfo(100 + pid, pid, 50, speed_flops=1e9 * (pid + 1))
    return strategy


@pytest.mark.parametrize("cls", [FedAvgStrategy, SmartFreezeStrategy])
def test_a_node_that_left_is_not_sampled_and_the_run_does_not_wait_for_it(cls: type, tmp_path: Path) -> None:
    s = make(cls, tmp_path, min_available_nodes=6, node_wait_seconds=0.01, selector="random")
    s.discover(FakeGrid([100 + p for p in range(6)]))
    assert s.available() == list(range(6))
    s.discover(FakeGrid([100, 101, 103, 104, 105]))  # partition 2 dropped out: below min-available-nodes
    assert s.available() == [0, 1, 3, 4, 5]
    for rnd in range(1, 20):
        assert 2 not in s.sample(rnd)
    s.discover(FakeGrid([100 + p for p in range(6)]))  # it reconnected
    assert any(2 in s.sample(rnd) for rnd in range(1, 20))


def test_first_discovery_still_waits_for_min_available_nodes(tmp_path: Path) -> None:
    s = make(FedAvgStrategy, tmp_path, min_available_nodes=6, node_wait_seconds=0.01)
    with pytest.raises(RuntimeError, match="min-available-nodes=6"):
        s.discover(FakeGrid([100, 101]))


def test_tifl_skips_lost_nodes_of_its_tier(tmp_path: Path) -> None:
    s = make(TiFLStrategy, tmp_path, tifl_tiers=2)
    s.on_start(None)
    s.discover(FakeGrid([100 + p for p in range(6)]))
    s.discover(FakeGrid([103, 104, 105]))
    for rnd in range(1, 10):
        assert set(s.sample(rnd)) <= {3, 4, 5}


def test_a_failed_round_is_not_counted_by_the_pace_controller(tmp_path: Path) -> None:
    s = make(SmartFreezeStrategy, tmp_path, selector="random")
    s._round_train_metrics = {"participants": 1.0}  # one valid reply arrived ...
    s._round_aggregated = False  # ... but fewer than min-replies: the model did not change
    row = s.end_round(1)
    assert row["pace-metric"] is None and s.pace.history == []
    s._round_aggregated = True
    s.end_round(2)
    assert len(s.pace.history) == 1
    assert s.pace.history[0]["round"] == 2
