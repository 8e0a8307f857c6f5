"""ProFL: schedule, sub-models, shrinking -> growing hand-over, effective movement, selection, memory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client_app.handlers import _build, _required_mb
from common import protocol as P
from common.config import ConfigError, parse_run_config
from common.memory import stage_memory
from common.memory_meter import measure_training_peak
from common.models import build_model
from common.output_modules import build_output_module, build_output_modules
from common.pace import PaceConfig, PaceController, block_metric
from common.profl import (
    ProFLSchedule,
    ShrinkModel,
    build_basic_layers,
    outmod_from_basic,
    shrink_flops,
    shrink_keys,
    shrink_memory,
)
from common.training import load_numpy, state_to_numpy, train_local
from server_app.outputs import RunRecorder
from server_app.profl import ProFLStrategy
from server_app.strategy import NodeInfo

SMALL = {"model": "smallcnn", "synthetic-train-size": 200, "synthetic-test-size": 50, "strategy": "profl"}


def make(tmp_path: Path, budgets: list[float], **over: object) -> ProFLStrategy:
    cfg = parse_run_config({**SMALL, **over})
    strategy = ProFLStrategy(cfg, RunRecorder(cfg, tmp_path / "profl"), 10)
    for pid, mb in enumerate(budgets):
        strategy.nodes[pid] = NodeInfo(pid + 100, pid, 40, memory_mb=mb, speed_flops=1e9)
    return strategy


def run_round(strategy: ProFLStrategy, rnd: int, seed: int = 0) -> list[dict]:
    """One round without Flower: sample, build each client's module as the ClientApp does, train, aggregate.

    Returns what each sampled node was sent ({"arrays", "config"}).
    """
    gen = torch.Generator().manual_seed(seed + rnd)
    x = torch.randn(24, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (24,), generator=gen)
    sent, updates = [], []
    pids = strategy.sample(rnd)
    for pid in pids:
        arrays = dict(strategy.train_payload(rnd, pid))
        config = strategy.train_config(rnd, pid)
        sent.append({"arrays": {k: v.copy() for k, v in arrays.items()}, "config": config})
        module, prefixes = _build(strategy.cfg, 10, config, arrays, None)
        train_local(module, x, y, epochs=1, batch_size=8, lr=0.05, seed=int(config[P.SEED]))
        updates.append((state_to_numpy(module, prefixes), 24.0))
    strategy.apply_updates(rnd, updates)
    strategy._round_train_metrics = {"participants": float(len(pids))}
    strategy.end_round(rnd)
    return sent


# ---------------------------------------------------------------------------------------------- schedule


def test_schedule_is_shrinking_back_to_front_then_growing_front_to_back() -> None:
    sched = ProFLSchedule(4)
    assert [s.label for s in sched.steps()] == ["S4", "S3", "S2", "S1", "G1", "G2", "G3", "G4"]
    assert [(s.phase, s.block) for s in sched.steps()][:2] == [("shrinking", 3), ("shrinking", 2)]
    assert [s.label for s in ProFLSchedule(4, shrinking=False).steps()] == ["G1", "G2", "G3", "G4"]
    assert ProFLSchedule.from_state_dict(json.loads(json.dumps(sched.state_dict()))) == sched
    with pytest.raises(ValueError, match=r"step index must be an int in 0..7, got 8"):
        sched.step(8)
    with pytest.raises(ValueError, match="num_blocks must be an int >= 1"):
        ProFLSchedule(0)


def test_config_needs_rounds_for_both_phases_and_the_ablation_half() -> None:
    with pytest.raises(ConfigError, match=r"3 blocks x 2 phases .* use num-rounds >= 12"):
        parse_run_config({**SMALL, "num-rounds": 8})
    assert parse_run_config({**SMALL, "num-rounds": 6, "profl-shrinking": False}).profl_shrinking is False
    with pytest.raises(ConfigError, match="profl-movement-threshold"):
        parse_run_config({**SMALL, "num-rounds": 12, "profl-movement-threshold": 1.5})
    pace = parse_run_config({**SMALL, "num-rounds": 12}).profl_pace_config()
    assert pace.metric == "effective-movement" and pace.level == 0.6


def test_strategy_runs_the_phases_in_order(tmp_path: Path) -> None:
    s = make(tmp_path, [1e9] * 3, **{"num-rounds": 6, "min-stage-rounds": 1, "max-stage-rounds": 1})
    seen = []
    for rnd in range(1, 7):
        info = s.round_info(rnd)
        sent = run_round(s, rnd)
        config = sent[0]["config"]
        seen.append((info["phase"], info["block"]))
        if info["phase"] == "shrinking":
            k = info["block"] - 1
            assert config[P.SHRINK] == k and P.STAGE not in config
            keys = set(sent[0]["arrays"])
            assert any(key.startswith(f"blocks.{k}.") for key in keys)
            assert not any(key.startswith(f"basic.{k}.") for key in keys)  # its stand-in is replaced by the block
            assert {int(key.split(".")[1]) for key in keys if key.startswith("blocks.")} == {k}
            assert not any(key.startswith("outmod.") for key in keys)
        else:
            assert config[P.STAGE] == info["block"] - 1 and P.SHRINK not in config
            assert not any(key.startswith("basic.") for key in sent[0]["arrays"])
    assert seen == [
        ("shrinking", 3),
        ("shrinking", 2),
        ("shrinking", 1),
        ("growing", 1),
        ("growing", 2),
        ("growing", 3),
    ]
    extras = s.summary_extras()
    assert [st["step"] for st in extras["stages"]] == ["S3", "S2", "S1", "G1", "G2", "G3"]
    assert set(extras["profl-step-memory-mb"]) == {"S3", "S2", "S1", "G1", "G2", "G3"}
    final = s.final_arrays()
    assert set(final) == set(state_to_numpy(build_model("smallcnn", 10, 0.25)))  # no scaffolding in model.pt
    pace = json.loads((tmp_path / "profl" / "pace.json").read_text())
    assert pace["profl"]["steps"] == ["S3", "S2", "S1", "G1", "G2", "G3"]


def test_shrinking_false_skips_the_phase_with_fresh_output_modules(tmp_path: Path) -> None:
    s = make(
        tmp_path, [1e9] * 2, **{"num-rounds": 3, "min-stage-rounds": 1, "max-stage-rounds": 1, "profl-shrinking": False}
    )
    assert not any(k.startswith("basic.") for k in s.arrays)
    fresh = state_to_numpy(build_output_modules(build_model("smallcnn", 10, 0.25, seed=0), seed=s.cfg.seed + 1))
    sent = run_round(s, 1)
    assert sent[0]["config"][P.STAGE] == 0 and P.SHRINK not in sent[0]["config"]
    for key, value in fresh.items():
        if key.startswith("0."):
            np.testing.assert_array_equal(sent[0]["arrays"][f"outmod.{key}"], value)
    for rnd in (2, 3):
        assert s.round_info(rnd)["phase"] == "growing" and s.round_info(rnd)["block"] == rnd
        run_round(s, rnd)


# ---------------------------------------------------------------------------------------------- hand-over


def test_growing_reuses_shrinkings_basic_layers_and_block_parameters(tmp_path: Path) -> None:
    s = make(tmp_path, [1e9] * 2, **{"num-rounds": 6, "min-stage-rounds": 1, "max-stage-rounds": 1})
    blocks = s.model.num_blocks
    fresh_outmods = {k: v.copy() for k, v in s.arrays.items() if k.startswith("outmod.")}
    after_step: dict[int, dict[str, np.ndarray]] = {}
    rnd = 0
    for k in range(blocks - 1, -1, -1):  # shrinking: capture what step k ends with
        rnd += 1
        assert s.step.phase == "shrinking" and s.stage == k
        gen = torch.Generator().manual_seed(rnd)
        x, y = torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        module, prefixes = _build(s.cfg, 10, s.train_config(rnd, 0), dict(s.train_payload(rnd, 0)), None)
        train_local(module, x, y, epochs=1, batch_size=8, lr=0.05, seed=rnd)
        s.apply_updates(rnd, [(state_to_numpy(module, prefixes), 1.0)])
        after_step[k] = {key: v.copy() for key, v in s.arrays.items() if key.startswith(("basic.", f"blocks.{k}."))}
        s._round_train_metrics = {"participants": 1.0}
        s.end_round(rnd)
    for k in range(blocks):  # growing stage k receives exactly what shrinking step k trained
        rnd += 1
        assert s.step.phase == "growing" and s.stage == k
        payload = s.train_payload(rnd, 0)
        snap = after_step[k]
        for key, value in snap.items():
            if key.startswith(f"blocks.{k}."):
                np.testing.assert_array_equal(payload[key], value)
        tail = {key: v for key, v in payload.items() if key.startswith(("outmod.", "head."))}
        assert tail, "growing stage has no tail"
        expected = outmod_from_basic(snap, k, blocks)
        assert set(tail) == set(expected)
        for key, value in expected.items():
            np.testing.assert_array_equal(tail[key], value)
            if key in fresh_outmods:
                assert not np.array_equal(tail[key], fresh_outmods[key]) or value.dtype.kind == "i"
        if k == blocks - 1:
            np.testing.assert_array_equal(payload["head.2.weight"], snap["basic.head.2.weight"])
        else:
            np.testing.assert_array_equal(payload[f"outmod.{k}.classifier.2.weight"], snap["basic.head.2.weight"])
            np.testing.assert_array_equal(payload[f"outmod.{k}.convs.0.weight"], snap[f"basic.{k + 1}.0.weight"])
        run_round(s, rnd)


@pytest.mark.parametrize("name", ["smallcnn", "resnet10", "vgg11bn"])
def test_output_module_from_basic_layers_computes_the_same_function(name: str) -> None:
    model = build_model(name, 10, 0.25, seed=0)
    basic = build_basic_layers(model, seed=3)
    arrays = {f"basic.{k}": v for k, v in state_to_numpy(basic).items()}
    x = torch.randn(2, model.specs[0].in_channels, 32, 32)
    blocks = model.num_blocks
    for k in range(blocks - 1):
        om = build_output_module(model, k)
        carried = outmod_from_basic(arrays, k, blocks)
        load_numpy(om, {key.removeprefix(f"outmod.{k}."): v for key, v in carried.items()}, strict=True)
        om.eval(), basic.eval(), model.eval()
        with torch.no_grad():
            h = x
            for block in model.blocks[: k + 1]:
                h = block(h)
            ref = h
            for j in range(k + 1, blocks):
                ref = basic[str(j)](ref)
            ref = basic["head"](ref)
            np.testing.assert_allclose(om(h).numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    head = outmod_from_basic(arrays, blocks - 1, blocks)
    assert set(head) == {"head.2.weight", "head.2.bias"}
    with pytest.raises(KeyError, match="basic layers"):
        outmod_from_basic({k: v for k, v in arrays.items() if not k.startswith("basic.1.")}, 0, blocks)


def test_shrink_model_keys_forward_and_shared_modules() -> None:
    model = build_model("resnet10", 10, 0.25, seed=0)
    basic = build_basic_layers(model, seed=1)
    sub = ShrinkModel(model, 2, basic)
    keys = set(sub.state_dict())
    assert {k.split(".")[1] for k in keys if k.startswith("blocks.")} == {"2"}
    assert {k.split(".")[1] for k in keys if k.startswith("basic.")} == {"0", "1", "3", "head"}
    assert sorted(shrink_keys([*keys, "basic.2.0.weight", "blocks.1.0.weight"], 2)) == sorted(keys)
    assert sub(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert all(p.requires_grad for p in sub.parameters())
    assert sub.blocks["2"] is model.blocks[2] and sub.basic["0"] is basic["0"]
    with pytest.raises(ValueError, match=r"block must be an int in 0..3, got 4"):
        ShrinkModel(model, 4, basic)


# ---------------------------------------------------------------------------------------------- effective movement


def test_effective_movement_on_known_update_sequences() -> None:
    steady = np.full((5, 3), 0.1)  # every update the same way: ratio 1
    assert block_metric("effective-movement", steady, np.zeros(3), 1e-12) == pytest.approx(1.0)
    flip = np.array([[1.0], [-1.0], [1.0], [-1.0]])  # cancel out exactly: 0
    assert block_metric("effective-movement", flip, np.zeros(1), 1e-12) == pytest.approx(0.0)
    five = np.array([[2.0], [-2.0], [2.0], [-2.0], [2.0]])  # |2| / 10
    assert block_metric("effective-movement", five, np.zeros(1), 1e-12) == pytest.approx(0.2)
    mixed = np.array([[1.0, 3.0], [1.0, -1.0], [1.0, 0.0]])  # scalar 0: 1; scalar 1: 2/4 -> block mean 0.75
    assert block_metric("effective-movement", mixed, np.zeros(2), 1e-12) == pytest.approx(0.75)


def _freeze_round(config: PaceConfig, params: list[np.ndarray]) -> int | None:
    ctrl = PaceController(config)
    for rnd, p in enumerate(params, start=1):
        if ctrl.observe(rnd, p).freeze:
            return rnd
    return None


def test_movement_threshold_stops_a_steady_drift_from_freezing() -> None:
    rng = np.random.default_rng(0)
    drift = [np.full(50, 0.01 * t) for t in range(40)]  # flat ratio at 1: the slope rule alone freezes
    walk = np.cumsum(rng.normal(0, 0.01, (40, 50)), axis=0)  # pure SGD-like noise: ratio ~0.4, flat
    base = PaceConfig(metric="effective-movement", eps=1e-12)
    assert _freeze_round(base, drift) == base.window + base.regress + base.consecutive - 1  # earliest possible
    with_level = PaceConfig(metric="effective-movement", eps=1e-12, level=0.6)
    assert _freeze_round(with_level, drift) is None
    assert _freeze_round(with_level, list(walk)) is not None
    with pytest.raises(ValueError, match="PaceConfig.level must be 0 .off. or a finite number > 0"):
        PaceConfig(level=-1.0)


# ---------------------------------------------------------------------------------------------- selection and memory


def test_selection_is_memory_fit_and_seeded(tmp_path: Path) -> None:
    s = make(tmp_path, [0.0], **{"num-rounds": 12})
    need = s.required_mb()
    budgets = [need * f for f in (0.5, 1.0, 2.0, 0.99, 3.0, 1.5)]
    s = make(tmp_path, budgets, **{"num-rounds": 12, "fraction-train": 0.5})
    assert s.eligible(1) == [1, 2, 4, 5]
    first = s.sample(1)
    assert set(first) <= {1, 2, 4, 5} and len(first) == 3
    assert make(tmp_path, budgets, **{"num-rounds": 12, "fraction-train": 0.5}).sample(1) == first
    assert s.required_mb() == pytest.approx(shrink_memory("smallcnn", 10, 0.25, 2, 32, (3, 32, 32)).total)


def test_client_builds_and_models_the_shrinking_step() -> None:
    cfg = parse_run_config({**SMALL, "num-rounds": 12})
    model = build_model("smallcnn", 10, 0.25, seed=0)
    sub = ShrinkModel(model, 1, build_basic_layers(model, seed=1))
    arrays = state_to_numpy(sub)
    module, prefixes = _build(cfg, 10, {P.SHRINK: 1}, arrays, None)  # type: ignore[arg-type]
    assert isinstance(module, ShrinkModel) and module.block == 1
    assert set(state_to_numpy(module, prefixes)) == set(arrays)
    mb = _required_mb(cfg, 10, None, (3, 32, 32), shrink=1)
    assert mb == pytest.approx(shrink_memory("smallcnn", 10, 0.25, 1, cfg.batch_size, (3, 32, 32)).total)
    assert mb != pytest.approx(stage_memory(model, 1, cfg.batch_size).total)
    flops = shrink_flops("smallcnn", 10, 0.25, 1, (3, 32, 32))
    assert flops.backward == pytest.approx(2 * flops.forward) and flops.forward > 0


@pytest.mark.parametrize("block", [0, 2])
def test_shrink_memory_model_matches_the_measured_peak(block: int) -> None:
    model = build_model("smallcnn", 10, 0.5, seed=0)
    sub = ShrinkModel(model, block, build_basic_layers(model, seed=1))
    measured = measure_training_peak(sub, 16, steps=2)["torch_peak_mb"]
    modelled = shrink_memory("smallcnn", 10, 0.5, block, 16).total
    assert abs(modelled - measured) / measured < 0.05, (modelled, measured)


def test_fair_share_splits_the_rounds_left_and_steps_end_by_it(tmp_path: Path) -> None:
    from common.profl import fair_share

    assert fair_share(60, 1, 8) == 8 and fair_share(60, 9, 7) == 8 and fair_share(60, 57, 1) == 4
    assert fair_share(13, 1, 6) == 3
    with pytest.raises(ValueError, match="steps_left >= 1"):
        fair_share(10, 1, 0)
    s = make(tmp_path, [1e9] * 2, **{"num-rounds": 14, "min-stage-rounds": 1})
    for rnd in range(1, 15):
        run_round(s, rnd)
    s.machine.finish()
    lengths = [h.end_round - h.start_round + 1 for h in s.machine.history]
    assert lengths == [3, 3, 2, 2, 2, 2]  # ceil(14/6), ceil(11/5), ceil(8/4), ceil(6/3), ceil(4/2), the rest
    assert [h.reason for h in s.machine.history] == ["share"] * 5 + ["end"]
    assert s.undeclared_attrs() == []


@pytest.mark.parametrize("warm", [True, False])
def test_growing_only_ablation_warm_starts_output_modules_like_smartfreeze(tmp_path: Path, warm: bool) -> None:
    over = {"num-rounds": 3, "min-stage-rounds": 1, "max-stage-rounds": 1, "profl-shrinking": False}
    s = make(tmp_path, [1e9] * 2, **over, **{"outmod-warm-start": warm})
    fresh = {k: v.copy() for k, v in s.arrays.items() if k.startswith("outmod.1.classifier.")}
    run_round(s, 1)  # stage 1 ends after its one round: output module 2 is prepared
    for key, before in fresh.items():
        trained = s.arrays[key.replace("outmod.1.", "outmod.0.")]
        if warm:
            np.testing.assert_array_equal(s.arrays[key], trained)
        else:
            np.testing.assert_array_equal(s.arrays[key], before)
