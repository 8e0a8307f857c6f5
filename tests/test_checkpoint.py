"""Checkpoint format, validation and strategy state round trips (no Flower run)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_SYNTHETIC, strategy_with_nodes

from common import protocol as P
from common.config import STRATEGY_NAMES, ConfigError, parse_run_config
from common.pace import PaceConfig, PaceController
from common.selector import ParticipantSelector, SelectorConfig
from common.stages import StageMachine
from server_app import checkpoint as ck
from server_app.baselines import AllSmallStrategy
from server_app.smartfreeze import SmartFreezeStrategy
from server_app.strategy import FedAvgStrategy

SMALL = SMALL_SYNTHETIC


def make(cls: type, run_dir: Path, budgets: list[float], node_offset: int = 100, **over: object) -> FedAvgStrategy:
    """A strategy with fake nodes (partition ids 0..n-1, node ids ``node_offset + pid``, 50 + pid examples)."""
    return strategy_with_nodes(cls, run_dir, budgets, node_offset=node_offset, examples_step=1, **over)


def roundtrip(strategy: FedAvgStrategy, fresh: FedAvgStrategy, server_round: int = 3) -> ck.Checkpoint:
    """Save ``strategy``'s checkpoint, load it, restore it into ``fresh``; return the loaded checkpoint."""
    arrays, state = strategy.checkpoint_state()
    ck.save_checkpoint(strategy.recorder.run_dir, server_round, strategy.name, strategy.cfg.to_flat(), state, arrays)
    loaded = ck.load_checkpoint(strategy.recorder.run_dir)
    fresh.restore_state(loaded.decoded_state())
    return loaded


def assert_same_state(a: FedAvgStrategy, b: FedAvgStrategy) -> None:
    """Both strategies produce the same checkpoint (arrays bit for bit, JSON equal)."""
    arrays_a, state_a = a.checkpoint_state()
    arrays_b, state_b = b.checkpoint_state()
    assert sorted(arrays_a) == sorted(arrays_b)
    for key in arrays_a:
        assert arrays_a[key].dtype == arrays_b[key].dtype, key
        np.testing.assert_array_equal(arrays_a[key], arrays_b[key], err_msg=key)
    for nodes in (state_a["nodes"], state_b["nodes"]):
        for info in nodes.values():
            info.pop("node-id")  # node ids change when nodes reconnect; everything else must not
    assert json.dumps(state_a, sort_keys=True) == json.dumps(state_b, sort_keys=True)


# ---------------------------------------------------------------------------------------------- encode / decode
def test_encode_decode_round_trips_every_supported_type() -> None:
    machine = StageMachine(num_blocks=3, total_rounds=9)
    machine.end_of_round(converged=False)
    pace = PaceController(PaceConfig(window=2, regress=2))
    for r in range(4):
        pace.observe(r, np.arange(5, dtype=np.float32) * (r + 1))
    selector = ParticipantSelector(SelectorConfig(seed=3))
    selector.update_client(4, importance=2.0, completion_time=1.5)
    value = {
        "none": None,
        "flags": [True, False],
        "numbers": [0, -3, 1.25, math.inf, -math.inf],
        "np-scalars": [np.float32(0.1), np.int64(7)],
        "text": "x/y.z",
        "tuple": (1, "a"),
        "set": {3, 1, 2},
        "int-keys": {1: 0.5, 10: [1, 2]},
        "__ndarray__": "a str key that looks like a marker",
        "arrays": {"w": np.ones((2, 3), np.float32), "n": np.array(5, np.int64), "e": np.zeros(0, np.float64)},
        "objects": [machine, pace, selector],
    }
    arrays: dict[str, np.ndarray] = {}
    encoded = ck.encode(value, arrays, "root")
    text = json.dumps(encoded)  # JSON-ready
    back = ck.decode(json.loads(text), {k: v.copy() for k, v in arrays.items()})
    assert back["none"] is None and back["flags"] == [True, False]
    assert back["numbers"] == [0, -3, 1.25, math.inf, -math.inf]
    assert back["np-scalars"] == [float(np.float32(0.1)), 7]
    assert back["text"] == "x/y.z" and back["tuple"] == (1, "a") and back["set"] == {1, 2, 3}
    assert back["int-keys"] == {1: 0.5, 10: [1, 2]}
    assert back["__ndarray__"] == value["__ndarray__"]
    for key, arr in value["arrays"].items():
        assert back["arrays"][key].dtype == arr.dtype and back["arrays"][key].shape == arr.shape
        np.testing.assert_array_equal(back["arrays"][key], arr)
    m, p, s = (obj.build(orig, "x") for obj, orig in zip(back["objects"], value["objects"], strict=True))
    assert m.state_dict() == machine.state_dict()
    assert p.state_dict() == pace.state_dict() and isinstance(p, PaceController)
    assert s.state_dict() == selector.state_dict()
    assert len(arrays) == 5  # 3 model-like arrays + the pace controller's prev and buffer, not JSON lists
    assert [v.shape for k, v in arrays.items() if k.endswith("/buffer")] == [(2, 5)]


def test_encode_rejects_what_it_cannot_restore_naming_the_path() -> None:
    with pytest.raises(TypeError, match=r"root/bad: object .*state_dict"):
        ck.encode({"bad": object()}, {}, "root")
    with pytest.raises(TypeError, match="object arrays"):
        ck.encode(np.array([{}], dtype=object), {}, "root")
    with pytest.raises(TypeError, match="dict key"):
        ck.encode({(1, 2): 3}, {}, "root")


# ---------------------------------------------------------------------------------------------- file format
def _save_small(run_dir: Path, server_round: int = 2, **config: object) -> dict[str, np.ndarray]:
    arrays = {"attrs/arrays/w": np.arange(6, dtype=np.float32).reshape(2, 3), "attrs/x": np.array([1, 2], np.int64)}
    state = {"attrs": {"w": {"__ndarray__": "attrs/arrays/w"}, "x": {"__ndarray__": "attrs/x"}}, "nodes": {"0": {}}}
    ck.save_checkpoint(run_dir, server_round, "fedavg", {**parse_run_config(SMALL).to_flat(), **config}, state, arrays)
    return arrays


def test_save_load_round_trip_is_plain_npz_and_leaves_no_temp_files(tmp_path: Path) -> None:
    arrays = _save_small(tmp_path)
    path = tmp_path / ck.CHECKPOINT_NAME
    assert sorted(os.listdir(tmp_path)) == [ck.CHECKPOINT_NAME]
    with np.load(path, allow_pickle=False) as npz:  # nothing needs unpickling
        assert set(npz.files) == {"state", "a0", "a1"}
    loaded = ck.load_checkpoint(tmp_path)
    assert loaded.round == 2 and loaded.strategy == "fedavg" and loaded.config["model"] == "smallcnn"
    state = loaded.decoded_state()
    np.testing.assert_array_equal(state["attrs"]["w"], arrays["attrs/arrays/w"])
    assert state["attrs"]["x"].dtype == np.int64
    assert ck.load_checkpoint(tmp_path, arrays=False).arrays == {}


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save_small(tmp_path, server_round=2)

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        _save_small(tmp_path, server_round=3)
    monkeypatch.undo()
    assert ck.load_checkpoint(tmp_path).round == 2
    assert sorted(os.listdir(tmp_path)) == [ck.CHECKPOINT_NAME]  # the temp file is gone


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ck.CheckpointError, match="never completed a round"):
        ck.load_checkpoint(tmp_path)
    with pytest.raises(ck.CheckpointError, match="no such run folder"):
        ck.load_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "pickle", "version", "index"])
def test_damaged_checkpoint_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    _save_small(tmp_path)
    path = tmp_path / ck.CHECKPOINT_NAME
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # one byte inside an array's data: the zip CRC catches it
        pos = data.index(np.arange(6, dtype=np.float32).tobytes()) + 9
        path.write_bytes(data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :])
    elif damage == "garbage":
        path.write_bytes(b"not a zip file at all")
    elif damage == "pickle":
        np.savez(path.with_suffix(""), state=np.array([{"evil": 1}], dtype=object))
    elif damage == "version":
        doc = json.dumps({"format": 99, "round": 1}).encode()
        np.savez(path.with_suffix(""), state=np.frombuffer(doc, np.uint8))
    elif damage == "index":
        with np.load(path) as npz:
            members = {k: npz[k] for k in npz.files if k != "a1"}
        np.savez(path.with_suffix(""), **members)
    with pytest.raises(ck.CheckpointError, match=str(path)):
        ck.load_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------- config checks
def test_resume_config_must_match_except_resume_keys(tmp_path: Path) -> None:
    _save_small(tmp_path, **{"run-name": "r"})
    loaded = ck.load_checkpoint(tmp_path)
    ok = parse_run_config({**SMALL, "resume": True, "run-name": "other", "verbose": True, "output-dir": "/x"})
    ck.check_resume(loaded, ok)
    with pytest.raises(ck.CheckpointError, match=r"lr: 0\.05 in the checkpoint, 0\.1 now") as err:
        ck.check_resume(loaded, parse_run_config({**SMALL, "lr": 0.1, "seed": 4}))
    assert "seed: 0 in the checkpoint, 4 now" in str(err.value)
    with pytest.raises(ck.CheckpointError, match="num-rounds"):
        ck.check_resume(loaded, parse_run_config({**SMALL, "num-rounds": 1}))
    assert ck.config_mismatches({"no-such-key": 1}, {}) == ["no-such-key: 1 in the checkpoint, unknown to this version"]


def test_resume_needs_a_run_name() -> None:
    with pytest.raises(ConfigError, match="resume=true needs run-name"):
        parse_run_config({"resume": True})


def test_resume_overrides_take_the_checkpoint_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "myrun"
    _save_small(run_dir, **{"lr": 0.02, "run-name": "myrun", "stop-after-round": 2})
    out = ck.resume_overrides(run_dir, ["verbose=true"])
    assert out["lr"] == 0.02 and out["resume"] is True and out["verbose"] is True
    assert out["run-name"] == "myrun" and out["output-dir"] == str(tmp_path.resolve())
    assert out["stop-after-round"] == 0
    with pytest.raises(ConfigError, match=r"resume cannot change lr=0\.5 \(checkpoint: 0\.02\)"):
        ck.resume_overrides(run_dir, ["lr=0.5"])
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.resume_overrides(tmp_path / "other", [])


def test_cli_prints_overrides_and_node_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "cli"
    _save_small(run_dir)
    assert ck.main(["nodes", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == "1"
    assert ck.main(["overrides", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert 'run-name="cli"' in out and "resume=true" in out and 'model="smallcnn"' in out
    assert ck.main(["overrides", str(run_dir), "--run-config", "seed=9"]) == 2
    assert "seed" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- strategies


def test_every_registered_strategy_declares_every_attribute(tmp_path: Path) -> None:
    """A new attribute must be checkpointed or declared transient, else a resumed run silently differs."""
    from server_app.registry import STRATEGIES

    for name, cls in STRATEGIES.items():
        over = {"num-rounds": 20} if name != "fedavg" else {}
        strategy = make(cls, tmp_path / name, [100.0, 200.0], **over)
        assert strategy.undeclared_attrs() == [], f"{name}: add them to checkpoint_attrs or transient_attrs"
        declared = strategy.declared_attrs("checkpoint_attrs")
        assert not set(declared) & set(strategy.declared_attrs("transient_attrs")), name


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_strategy_state_round_trips(name: str, tmp_path: Path) -> None:
    from server_app.registry import STRATEGIES

    cls = STRATEGIES[name]
    budgets = [1e9, 1e9, 1e9, 1e9]
    a = make(cls, tmp_path / "a", budgets, num_rounds=20)
    if name != "smartfreeze":  # its start-up queries the nodes' monitors
        a.on_start(None)  # type: ignore[arg-type]
    rng = np.random.default_rng(5)
    a.arrays = {k: np.asarray(v + rng.standard_normal(v.shape)).astype(v.dtype) for k, v in a.arrays.items()}
    a.sim_time, a.rejections = 12.5, {"nan": 2}
    a.nodes[1].rounds_trained = [1, 3]
    a.recorder.add_round({"round": 1, "server-accuracy": 0.25, "participant-ids": [0, 2]})
    b = make(cls, tmp_path / "b", budgets, node_offset=900, num_rounds=20)
    roundtrip(a, b)
    assert_same_state(a, b)
    assert b.recorder.rounds == a.recorder.rounds and b.nodes[1].rounds_trained == [1, 3]
    assert b.nodes[1].node_id == 901  # the reconnected node keeps its new id


def test_allsmall_restores_its_narrowed_width(tmp_path: Path) -> None:
    probe = make(AllSmallStrategy, tmp_path / "p", [1.0])
    full = probe.required_mb()
    a = make(AllSmallStrategy, tmp_path / "a", [full * 0.5, full * 2])
    a.on_start(None)  # type: ignore[arg-type]
    assert a.width < a.cfg.width
    b = make(AllSmallStrategy, tmp_path / "b", [full * 0.5, full * 2])
    roundtrip(a, b)
    assert b.width == a.width and b.model.width == a.width and b.required_mb() == a.required_mb()
    assert_same_state(a, b)


def test_restore_rejects_a_different_model_or_data(tmp_path: Path) -> None:
    a = make(FedAvgStrategy, tmp_path / "a", [1e9, 1e9])
    with pytest.raises(ck.CheckpointError, match=r"checkpoint arrays\['blocks\.0\..*the model has"):
        roundtrip(a, make(FedAvgStrategy, tmp_path / "b", [1e9, 1e9], width=0.5))
    b = make(FedAvgStrategy, tmp_path / "c", [1e9, 1e9])
    b.nodes[1].num_examples = 7
    with pytest.raises(ck.CheckpointError, match="partition 1 now holds 7 examples, 51 in the checkpoint"):
        roundtrip(a, b)


# ---------------------------------------------------------------------------------------------- SmartFreeze replay
SF = {
    "num-rounds": 14,
    "fraction-train": 0.5,
    "min-stage-rounds": 2,
    "pace-window": 2,
    "pace-smooth": 1,
    "pace-regress": 2,
    "pace-consecutive": 1,
    "pace-tau": 0.5,
}


def fake_round(s: SmartFreezeStrategy, rnd: int) -> list[int]:
    """One SmartFreeze round without Flower: selection, replies derived from (round, node), aggregation, pace."""
    chosen = s.sample(rnd)
    s._round_participants = chosen
    updates = []
    for pid in chosen:
        rng = np.random.default_rng([rnd, pid])
        reply = {
            k: np.asarray(s.arrays[k] + 0.05 / rnd * rng.standard_normal(s.arrays[k].shape)).astype(s.arrays[k].dtype)
            for k in sorted(s.expected_reply_keys(pid))
        }
        updates.append((reply, 50.0 + pid))
        s.nodes[pid].rounds_trained.append(rnd)
        loss = 1.0 + float(rng.uniform())
        s.on_reply(rnd, pid, {P.NUM_EXAMPLES: 50 + pid, P.LOSS_SQ_MEAN: loss, P.FROZEN_HELD: []})
    failed = chosen[:1] if rnd % 4 == 0 else []  # a failure changes the selector's utilities
    for pid in failed:
        s.on_failure(rnd, pid)
    s._round_train_metrics = {"participants": float(len(chosen))}
    s._round_aggregated = bool(chosen)
    s.apply_updates(rnd, updates)
    row = {"round": rnd, "stage": s.stage + 1, "participant-ids": chosen, **s.end_round(rnd)}
    s.recorder.add_round(row)
    return chosen


def smartfreeze(run_dir: Path, node_offset: int = 100) -> SmartFreezeStrategy:
    probe = make(SmartFreezeStrategy, run_dir, [1.0], **SF)
    need = [probe.required_mb(k) for k in range(probe.model.num_blocks)]
    budgets = [need[0] * f for f in np.random.default_rng(2).uniform(1.0, 1.6 * max(need) / need[0], size=10)]
    s = make(SmartFreezeStrategy, run_dir, budgets, node_offset=node_offset, **SF)
    s.selector.set_communities([[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]])
    s.communities = [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
    for pid in range(0, 10, 3):
        s.selector.update_client(pid, importance=10.0 + pid, completion_time=s.completion_time(pid))
    return s


@pytest.mark.parametrize("stop", [3, 6])
def test_smartfreeze_resumed_from_a_checkpoint_replays_the_uninterrupted_run(tmp_path: Path, stop: int) -> None:
    ref = smartfreeze(tmp_path / "ref")
    ref_rounds = [fake_round(ref, rnd) for rnd in range(1, SF["num-rounds"] + 1)]

    first = smartfreeze(tmp_path / "run")
    for rnd in range(1, stop + 1):
        fake_round(first, rnd)
    arrays, state = first.checkpoint_state()
    ck.save_checkpoint(first.recorder.run_dir, stop, first.name, first.cfg.to_flat(), state, arrays)
    del first  # the server process is gone; only the run folder remains

    resumed = smartfreeze(tmp_path / "run", node_offset=500)  # nodes reconnect with new ids
    loaded = ck.load_checkpoint(tmp_path / "run")
    ck.check_resume(loaded, resumed.cfg)
    assert resumed.resume(loaded) == stop + 1
    rounds = [fake_round(resumed, rnd) for rnd in range(stop + 1, SF["num-rounds"] + 1)]

    assert rounds == ref_rounds[stop:]  # same participants in every round
    assert len({tuple(r) for r in ref_rounds}) > 3  # selection really varies between rounds
    assert resumed.machine.history == ref.machine.history  # same stage boundaries and reasons
    assert len(ref.machine.history) == 3 and ref.machine.history[1].reason == "converged"
    assert resumed.recorder.rounds == ref.recorder.rounds  # metrics history covers the whole run
    assert_same_state(ref, resumed)  # model, pace controller, selector: bit for bit
