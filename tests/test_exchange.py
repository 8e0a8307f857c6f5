"""Deployment's message path on the ServerApp side, without Flower's runtime.

Fine-interval pulls, packed arrays, which rounds evaluate, the round's timing record, an OOM kill
lowering a node's budget, and the deployment benchmark's arithmetic.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from bench.deploy import breakdown, compare_rounds, final_step, job, node_report, warm_summary
from common import protocol as P
from common.config import parse_run_config
from server_app import strategy as S
from server_app.baselines import TiFLStrategy
from server_app.exchange import exchange_timing, round_timing, send_and_receive
from server_app.outputs import RunRecorder

SMALL = {"model": "smallcnn", "synthetic-train-size": 200, "synthetic-test-size": 50}


class SlowGrid:
    """A deployment grid whose replies become available one per pull (records when it was pulled)."""

    def __init__(self, delays: list[int]) -> None:
        self.delays = delays  # reply i is ready after this many pulls
        self.pulls = 0
        self.pushed: list[str] = []

    def push_messages(self, messages: list[Message]) -> list[str]:
        self.msgs = {}
        for i, msg in enumerate(messages):
            mid = f"m{i}" if i != 1 or len(messages) < 3 else ""  # the 2nd of 3+ "could not be pushed"
            msg.metadata.__dict__["_message_id"] = mid or "unpushed"
            self.msgs[mid] = msg
            self.pushed.append(mid)
        return self.pushed

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        self.pulls += 1
        out = []
        for i, mid in enumerate(self.pushed):
            if mid and mid in message_ids and self.delays[i] == self.pulls:
                metrics = {P.NODE_SECONDS: 0.5 * (i + 1), P.STARTUP_SECONDS: 0.1}
                out.append(Message(RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=self.msgs[mid]))
        return out


def _msgs(n: int) -> list[Message]:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    return [Message(RecordDict(), 100 + i, "train") for i in range(n)]


def test_replies_are_pulled_until_all_came_at_the_interval() -> None:
    grid = SlowGrid([1, 3])
    replies = send_and_receive(grid, _msgs(2), timeout=10.0, interval=0.001)
    assert grid.pulls == 3 and len(replies) == 2
    timing = exchange_timing(0.8, replies)
    assert timing == {"seconds": 0.8, "node": 1.0, "startup": 0.1}


def test_unpushed_messages_are_not_waited_for_and_the_timeout_ends_the_wait() -> None:
    grid = SlowGrid([1, 99, 2])
    replies = send_and_receive(grid, _msgs(3), timeout=10.0, interval=0.001)
    assert grid.pulls == 2 and len(replies) == 2  # the message that was not pushed has no reply to wait for
    late = SlowGrid([10**6, 10**6])
    assert send_and_receive(late, _msgs(2), timeout=0.05, interval=0.01) == []
    assert 2 <= late.pulls <= 10


def test_the_servers_own_work_runs_once_between_the_push_and_the_first_pull() -> None:
    grid = SlowGrid([1, 2])
    seen: list[tuple[int, int]] = []  # (messages pushed, pulls done) when the work ran
    replies = send_and_receive(
        grid, _msgs(2), timeout=10.0, interval=0.001, while_waiting=lambda: seen.append((len(grid.pushed), grid.pulls))
    )
    assert seen == [(2, 0)] and len(replies) == 2 and grid.pulls == 2


def test_a_checkpoint_snapshot_keeps_the_rounds_state_while_the_next_round_changes_it(tmp_path: Path) -> None:
    from conftest import strategy_with_nodes

    from server_app.checkpoint import load_checkpoint

    s = strategy_with_nodes(S.FedAvgStrategy, tmp_path / "run", [1e6] * 3, **SMALL)
    s.recorder.add_round({"round": 1, "server-accuracy": 0.5})
    key = sorted(s.arrays)[0]
    before = s.arrays[key].copy()
    snapshot = s.checkpoint_snapshot()
    s.arrays[key] += 1.0  # the next round changes the model in place, trains a node and is recorded
    s.nodes[0].rounds_trained.append(2)
    s.recorder.add_round({"round": 2, "server-accuracy": 0.6})
    s.save_checkpoint(1, snapshot)
    ck = load_checkpoint(s.recorder.run_dir)
    state = ck.decoded_state()
    assert np.array_equal(state["attrs"]["arrays"][key], before)
    assert state["nodes"]["0"]["rounds-trained"] == []
    assert [r["round"] for r in state["recorder"]["rounds"]] == [1, 2]  # the recorder is written as it is


def test_round_timing_sums_each_exchange_critical_path() -> None:
    exchanges = [{"seconds": 5.0, "node": 3.0, "startup": 0.2}, {"seconds": 1.0, "node": 0.4, "startup": 0.1}]
    assert round_timing(exchanges) == pytest.approx(
        {"exchanges": 2.0, "exchange-seconds": 6.0, "node-seconds-critical": 3.4, "startup-seconds-critical": 0.3}
    )
    assert round_timing([])["exchanges"] == 0.0


def test_packed_arrays_round_trip_and_a_bad_index_is_refused() -> None:
    arrays = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "n": np.int64(7),
        "m": np.array([True, False, True]),
        "e": np.zeros((0, 5), np.float64),
    }
    record = P.to_record(arrays)
    assert list(record.keys()) == [P.PACKED, P.PACKED_INDEX]  # two Flower objects, not one per array
    back = P.from_record(record)
    assert list(back) == ["w", "n", "m", "e"]
    assert np.array_equal(back["w"], arrays["w"]) and back["w"].dtype == np.float32
    assert back["n"].shape == (1,) and int(back["n"][0]) == 7  # 0-d arrays travel as shape (1,), as before
    assert back["m"].dtype == np.bool_ and back["e"].shape == (0, 5)
    index = json.loads(record[P.PACKED_INDEX].numpy().tobytes())
    assert all(offset % P.PACK_ALIGN == 0 for _, _, _, offset in index)
    legacy = ArrayRecord({"a": Array(np.ones(2, np.float32))})
    assert list(P.from_record(legacy)) == ["a"]  # one-array-per-key records (the node's frozen store) still read

    def with_index(entries: object) -> ArrayRecord:
        table = np.frombuffer(json.dumps(entries).encode(), np.uint8).copy()
        return ArrayRecord({P.PACKED: record[P.PACKED], P.PACKED_INDEX: Array(table)})

    with pytest.raises(ValueError, match="outside the buffer"):
        P.from_record(with_index([["w", "<f4", [1000], 0]]))
    with pytest.raises(ValueError, match="has dtype '|O'"):
        P.from_record(with_index([["w", "|O", [1], 0]]))
    with pytest.raises(ValueError, match="repeats"):
        P.from_record(with_index([["w", "<f4", [1], 0], ["w", "<f4", [1], 0]]))
    with pytest.raises(TypeError, match="does not carry"):
        P.to_record({"s": np.array(["a"])})


@pytest.mark.parametrize(
    ("every", "deployed", "tifl", "rounds"),
    [
        (0, False, False, list(range(1, 13))),  # auto in simulation: every round
        (0, True, False, [12]),  # auto deployed: only the final evaluation (train replies carry pre-eval)
        (5, True, False, [5, 10, 12]),
        (3, False, False, [3, 6, 9, 12]),
        (0, True, True, list(range(1, 13))),  # TiFL reads every round's evaluation
    ],
)
def test_which_rounds_have_a_separate_evaluation(
    tmp_path: Path, every: int, deployed: bool, tifl: bool, rounds: list[int]
) -> None:
    cfg = parse_run_config({**SMALL, "evaluate-every": every, "strategy": "tifl" if tifl else "fedavg"})
    cls = TiFLStrategy if tifl else S.FedAvgStrategy
    strategy = cls(cfg, RunRecorder(cfg, tmp_path / "run"), 10)
    strategy.deployed = deployed
    assert [r for r in range(1, 13) if strategy.evaluates_in(r, 12)] == rounds


def test_an_oom_kill_caps_the_budget_below_what_was_sent_and_fedavg_stops_sampling_it(tmp_path: Path) -> None:
    cfg = parse_run_config(SMALL)
    strategy = S.FedAvgStrategy(cfg, RunRecorder(cfg, tmp_path / "run"), 10)
    strategy.nodes = {pid: S.NodeInfo(pid + 1, pid, 20) for pid in range(3)}
    need = strategy.node_required_mb(0)
    assert strategy.eligible(1) == [0, 1, 2]
    strategy.on_oom(1, 0, need)
    node = strategy.nodes[0]
    assert node.oom_cap_mb < need and node.memory_mb < need and strategy.oom_kills == 1
    assert strategy.eligible(2) == [1, 2]  # FedAvg ignores budgets, not OOM kills
    node.update({P.MEMORY_MB: 4096.0})  # a later report cannot lift the budget over the cap
    assert node.memory_mb == node.oom_cap_mb
    node.update({P.MEMORY_MB: -1.0})
    assert node.memory_mb == node.oom_cap_mb
    assert math.isinf(strategy.nodes[1].oom_cap_mb)


def test_a_node_records_what_its_os_limit_measured_per_reply_and_its_oom_kills() -> None:
    node = S.NodeInfo(1, 0, 20)
    node.observe_memory(1, 120.0, {P.TRAIN_LOSS: 1.0})  # no OS limit on the node: nothing to record
    assert node.memory_seen == []
    node.observe_memory(2, 120.0, {P.OS_PEAK_MB: 610.5, P.OS_LIMIT_HIT: 0.0})
    node.observe_memory(3, 200.0, None)
    assert node.memory_seen == [
        {"round": 2.0, "modelled-mb": 120.0, "os-peak-mb": 610.5, "os-limit-hit": 0.0},
        {"round": 3.0, "modelled-mb": 200.0, "oom": 1.0},
    ]


def test_deploy_benchmark_reports_a_limited_nodes_stages_peaks_and_oom_rounds() -> None:
    rounds = [
        {"round": 0},
        {"round": 1, "stage": 1, "participant-ids": [0, 1], "failures": 0.0},
        {"round": 2, "stage": 1, "participant-ids": [0, 1], "failures": 0.0},
        {"round": 3, "stage": 2, "participant-ids": [1], "failures": 1.0, "oom-kills": 1.0},
    ]
    seen = [
        {"round": 1.0, "modelled-mb": 140.0, "os-peak-mb": 600.0},
        {"round": 2.0, "modelled-mb": 140.0, "os-peak-mb": 620.0},
        {"round": 3.0, "modelled-mb": 90.0, "oom": 1.0},
    ]
    doc = {"rounds": rounds, "summary": {"final-accuracy": 0.4, "node-memory-seen": {"0": seen}}}
    rep = node_report(doc, 0)
    assert rep["rounds-trained"] == [1, 2] and rep["stages-trained"] == [1]
    assert rep["oom-rounds"] == [3] and rep["oom-kills"] == 1.0 and rep["failures"] == 1.0
    assert rep["peak-mb-by-stage"] == {"stage 1": 620.0}
    assert node_report({"rounds": rounds[:1]}, 0)["peak-mb-by-stage"] == {}


def test_deploy_benchmark_splits_a_round_and_summarises_the_warm_ones() -> None:
    row = {
        "round": 2,
        "round-seconds": 10.0,
        "exchange-seconds": 8.0,
        "node-seconds-critical": 5.0,
        "startup-seconds-critical": 0.5,
    }
    b = breakdown(row)
    assert b == pytest.approx(
        {"wall": 10.0, "node": 5.0, "startup": 0.5, "transport": 2.5, "server": 2.0, "overhead": 5.0}
    )
    sim = [{"round": 0}, {"round": 1, "round-seconds": 20.0}, {"round": 2, "round-seconds": 8.0}]
    dep = [{"round": 0}, {**row, "round": 1, "round-seconds": 30.0}, row]
    rows = compare_rounds(sim, dep)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["ratio"] == pytest.approx(1.5) and rows[1]["ratio"] == pytest.approx(1.25)
    warm = warm_summary(rows)
    assert warm["rounds"] == 1.0 and warm["mean-ratio"] == pytest.approx(1.25) and warm["max-overhead"] == 5.0
    assert warm_summary(rows[:1]) == {}


def test_a_deployed_monitor_query_trains_at_the_batch_each_nodes_budget_fits(tmp_path: Path) -> None:
    from conftest import strategy_with_nodes

    from common.memory import stage_memory
    from server_app.smartfreeze import SmartFreezeStrategy

    over = {"batch-size": 64, "num-rounds": 6}
    probe = strategy_with_nodes(SmartFreezeStrategy, tmp_path / "probe", [1.0], **over)
    need = lambda b: stage_memory(probe.model, None, b, probe.input_shape()).total  # noqa: E731
    m = S.QUERY_MEMORY_MARGIN  # the query takes a third of the budget: real memory runs ~2.5x the model here
    budgets = [math.inf, m * need(64), m * (need(9) + need(10)) / 2, need(1) / 2]
    strategy = strategy_with_nodes(SmartFreezeStrategy, tmp_path / "run", budgets, **over)
    config = {P.STAGE: -1, P.WANT_GRAD: True, P.ROUND: 0}
    assert [strategy._query_config(config, pid) for pid in range(4)] == [config] * 4  # simulation: as configured
    strategy.deployed = True
    assert [strategy._query_config(config, pid)[P.QUERY_BATCH] for pid in range(4)] == [64, 64, 9, 1]
    strategy.on_oom(1, 0, m * need(20))  # the OS killed node 0 at the margin times the need of batch 20
    assert strategy.query_batch_size(0, None) == 19
    stage = {**config, P.STAGE: 0}
    assert strategy._query_config(stage, 1)[P.QUERY_BATCH] == 64  # stage 1 needs less than the full model


@pytest.mark.parametrize("mode", ["query", "with-round"])
def test_a_new_stages_monitor_query_goes_out_before_selection_or_with_the_rounds_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """'query' (the paper): an exchange of its own before the round; 'with-round' (auto when deployed):
    to the fitting nodes that are not training, in the round's exchange, once per stage."""
    from conftest import strategy_with_nodes
    from flwr.app import ConfigRecord

    from server_app.smartfreeze import SmartFreezeStrategy

    over = {"num-rounds": 6, "stage-monitor": mode, "fraction-train": 0.5, "min-train-nodes": 1}
    s = strategy_with_nodes(SmartFreezeStrategy, tmp_path / "run", [1e6] * 6, **over)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    exchanged: list[list[Message]] = []

    def answer(grid: object, msgs: list[Message], timeout: float | None = None) -> list[Message]:
        exchanged.append(msgs)
        return replies(msgs)

    def replies(msgs: list[Message]) -> list[Message]:
        out = []
        for i, m in enumerate(msgs):
            m.metadata.__dict__["_message_id"] = f"q{i}"
            metrics = {P.NUM_EXAMPLES: 50, P.LOSS_SQ_MEAN: 4.0 + i, P.MEMORY_MB: 5e5}
            out.append(Message(RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=m))
        return out

    monkeypatch.setattr(s, "exchange", answer)
    s.before_round(None, 1)
    train = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), None))
    side = s.round_side_messages(1)
    trained = {m.metadata.dst_node_id for m in train}
    if mode == "query":
        assert [len(x) for x in exchanged] == [6] and side == []  # every fitting node, before selection
        assert all(m.metadata.message_type == "query" for m in exchanged[0])
        return
    assert exchanged == [] and 0 < len(trained) < 6
    assert {m.metadata.dst_node_id for m in side} == {100 + p for p in range(6)} - trained
    assert all(m.metadata.message_type == "query" and int(m.content[P.CONFIG][P.STAGE]) == 0 for m in side)
    assert s.monitored_stage == 0 and s.round_side_messages(1) == []  # once per stage
    s.on_side_replies(1, replies(side))
    assert all(s.nodes[m.metadata.dst_node_id - 100].memory_mb == 5e5 for m in side)


def test_deploy_benchmark_runs_the_same_work_in_both_and_reports_the_final_evaluation_apart(tmp_path: Path) -> None:
    cfg = job(tmp_path / "d.npz", 7, "smartfreeze", "seed=3")
    assert cfg["evaluate-every"] == 7 and cfg["stage-monitor"] == "with-round" and cfg["seed"] == 3
    assert job(tmp_path / "d.npz", 7, "fedavg", "evaluate-every=2")["evaluate-every"] == 2  # overrides win
    assert final_step([{"round": 1}, {"round": 2, "final-evaluate-seconds": 3.5}]) == 3.5
    assert math.isnan(final_step([])) and math.isnan(final_step([{"round": 1}]))


def test_a_node_whose_monitor_query_failed_still_trains_without_crashing_the_selector(tmp_path: Path) -> None:
    """Deployed, a node's speed comes from its monitor query; if that failed (OOM kill), the speed is
    unknown (0) and its completion time is not yet known: its training reply must not crash the run."""
    from conftest import strategy_with_nodes

    from server_app.smartfreeze import SmartFreezeStrategy

    s = strategy_with_nodes(SmartFreezeStrategy, tmp_path / "run", [1e6, 1e6], **{"num-rounds": 6})
    s.nodes[0].speed_flops = 0.0
    s.on_reply(1, 0, {P.NUM_EXAMPLES: 50, P.LOSS_SQ_MEAN: 2.0})
    s.on_reply(1, 1, {P.NUM_EXAMPLES: 50, P.LOSS_SQ_MEAN: 2.0})
    assert s.selector._state(0).completion_time is None and s.selector._state(1).completion_time > 0
