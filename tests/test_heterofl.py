"""HeteroFL: slicing, overlapping aggregation, rate choice, static BN / Scaler, client-server consistency."""

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import strategy_with_nodes
from flwr.app import ConfigRecord

from client_app.handlers import _build, _required_mb
from common import protocol as P
from common.config import parse_run_config
from common.heterofl import (
    RATES,
    Scaler,
    add_scaler,
    aggregate_nested,
    build_heterofl_model,
    choose_rate,
    required_mb,
    slice_arrays,
    submodel_shapes,
)
from common.memory import stage_memory
from common.models import MODEL_NAMES, build_model
from common.training import evaluate, state_to_numpy, train_local
from server_app.heterofl import HeteroFLStrategy
from server_app.registry import STRATEGIES


def make(tmp_path: Path, budgets: list[float], **over: object) -> HeteroFLStrategy:
    return strategy_with_nodes(HeteroFLStrategy, tmp_path / "heterofl", budgets, **over)


def test_slicing_takes_the_leading_block() -> None:
    w = np.arange(8 * 4 * 3 * 3, dtype=np.float32).reshape(8, 4, 3, 3)
    b = np.arange(8, dtype=np.float32)
    out = slice_arrays({"conv.weight": w, "conv.bias": b}, {"conv.weight": (4, 2, 3, 3), "conv.bias": (4,)})
    np.testing.assert_array_equal(out["conv.weight"], w[:4, :2])
    np.testing.assert_array_equal(out["conv.bias"], b[:4])
    assert out["conv.weight"].flags.c_contiguous and not np.shares_memory(out["conv.weight"], w)
    with pytest.raises(ValueError, match="does not nest"):
        slice_arrays({"conv.bias": b}, {"conv.bias": (9,)})
    with pytest.raises(KeyError, match="not part of the global model"):
        slice_arrays({"conv.bias": b}, {"other": (1,)})


def test_aggregation_averages_each_entry_over_the_clients_holding_it() -> None:
    old = {
        "w": np.full((4, 6), 7.0, dtype=np.float32),
        "only_half": np.full((4,), 7.0, dtype=np.float32),
        "untouched": np.full((3,), 5.0, dtype=np.float32),
        "steps": np.array(4, dtype=np.int64),
    }
    full = {"w": np.full((4, 6), 3.0, dtype=np.float32), "steps": np.array([8])}
    half = {"w": np.full((2, 3), 1.0, dtype=np.float32), "only_half": np.full((2,), 1.0, dtype=np.float32)}
    new = aggregate_nested(old, [full, half])
    expected = np.full((4, 6), 3.0)
    expected[:2, :3] = 2.0  # mean of both clients, unweighted
    np.testing.assert_array_equal(new["w"], expected)
    np.testing.assert_array_equal(new["only_half"], [1.0, 1.0, 7.0, 7.0])
    np.testing.assert_array_equal(new["untouched"], old["untouched"])
    assert new["steps"].shape == () and int(new["steps"]) == 8  # scalar sent as shape (1,)
    assert all(new[k].dtype == old[k].dtype and new[k].shape == old[k].shape for k in old)
    np.testing.assert_array_equal(old["w"], np.full((4, 6), 7.0))  # the input is not modified
    with pytest.raises(ValueError, match="does not nest"):
        aggregate_nested(old, [{"w": np.zeros((5, 6), dtype=np.float32)}])
    with pytest.raises(KeyError, match="not part of the global model"):
        aggregate_nested(old, [{"x": np.zeros(1)}])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_submodels_nest_in_the_global_model_for_every_width_and_rate(name: str) -> None:
    for width in (0.1, 0.25, 0.3, 1 / 3, 0.5, 0.7, 1.0):
        full = submodel_shapes(name, 10, width)
        for rate in RATES:
            sub = submodel_shapes(name, 10, width * rate)
            assert sub.keys() == full.keys()
            for key, shape in sub.items():
                assert len(shape) == len(full[key]) and all(s <= g for s, g in zip(shape, full[key], strict=True))
            assert sub["head.2.weight"][0] == 10  # classes stay whole
            first = next(k for k, s in sub.items() if len(s) == 4)
            assert sub[first][1] == 3  # input channels stay whole


def test_static_bn_and_scaler() -> None:
    model = build_heterofl_model("smallcnn", 10, 0.25, seed=0)
    assert not any("running" in k or "num_batches" in k for k in model.state_dict())
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        train_out = model.train()(x)
        eval_out = model.eval()(x)
    torch.testing.assert_close(train_out, eval_out)  # evaluation normalises by the batch's own statistics
    bn = torch.nn.BatchNorm2d(2)
    hook = Scaler(0.25)
    assert torch.equal(hook(bn.train(), (torch.ones(1, 2, 1, 1),))[0], torch.full((1, 2, 1, 1), 4.0))
    assert hook(bn.eval(), (torch.ones(1, 2, 1, 1),)) is None
    net = add_scaler(torch.nn.Sequential(torch.nn.Identity(), torch.nn.BatchNorm2d(2, affine=False)), 0.5)
    seen: list[torch.Tensor] = []
    net[1].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    net.train()(torch.ones(2, 2, 1, 1))
    assert torch.equal(seen[0], torch.full((2, 2, 1, 1), 2.0))
    with pytest.raises(ValueError, match="scaler rate"):
        Scaler(2.0)
    assert len(build_heterofl_model("smallcnn", 10, 0.25, scaler_rate=1.0).blocks[0][1]._forward_pre_hooks) == 0


def test_choose_rate_takes_the_largest_fitting_rate() -> None:
    assert choose_rate(lambda r: r <= 0.3) == 0.25
    assert choose_rate(lambda r: True) == 1.0
    assert choose_rate(lambda r: False) is None


def test_rate_per_budget_and_nodes_that_fit_nothing_are_not_selected(tmp_path: Path) -> None:
    probe = make(tmp_path, [])
    need = {r: probe.rate_required_mb(r) for r in RATES}
    assert all(need[a] > need[b] for a, b in pairwise(RATES))  # memory grows with the rate
    budgets = [float("inf"), need[1.0], need[0.5] + 0.01, need[0.25], need[0.0625], need[0.0625] - 0.01, 0.1]
    s = make(tmp_path, budgets)
    assert [s.rate_of(pid) for pid in range(len(budgets))] == [1.0, 1.0, 0.5, 0.25, 0.0625, None, None]
    assert s.eligible(1) == [0, 1, 2, 3, 4]
    for rnd in range(1, 6):
        assert set(s.sample(rnd)) <= {0, 1, 2, 3, 4}
    assert make(tmp_path, [0.1, 0.2]).sample(1) == []


def test_modelled_memory_matches_the_plain_model_up_to_bn_statistics() -> None:
    for rate in RATES:
        plain = stage_memory(build_model("resnet10", 10, 0.25 * rate), None, 32).total
        ours = required_mb("resnet10", 10, 0.25, rate, 32)
        assert ours <= plain and plain - ours < 0.01  # static BN drops only the running statistics


def test_strategy_never_sends_a_submodel_over_the_budget(tmp_path: Path) -> None:
    probe = make(tmp_path, [], model="resnet10")
    full = probe.rate_required_mb(1.0)
    budgets = [full * f for f in np.random.default_rng(3).uniform(0.05, 1.3, size=40)]
    s = make(tmp_path, budgets, model="resnet10", **{"fraction-train": 0.5})
    seen_rates: set[float] = set()
    for rnd in range(1, 8):
        s.before_round(None, rnd)  # type: ignore[arg-type]
        for pid in s.sample(rnd):
            config = s.train_config(rnd, pid)
            payload = s.train_payload(rnd, pid)
            width = float(config[P.WIDTH])
            sub = build_heterofl_model("resnet10", 10, width, scaler_rate=float(config[P.SCALER]))
            assert stage_memory(sub, None, 32).total <= budgets[pid]
            assert {k: v.shape for k, v in payload.items()} == {k: tuple(v.shape) for k, v in sub.state_dict().items()}
            assert config[P.STATIC_BN] is True and config[P.ENFORCE_BUDGET] is True
            seen_rates.add(float(config[P.SCALER]))
    assert len(seen_rates) > 1
    assert all(s.rate_of(p) is None for p in range(len(budgets)) if budgets[p] < s.rate_required_mb(RATES[-1]))


@pytest.mark.parametrize("name", ["resnet10", "vgg11bn", "smallcnn"])
def test_client_builds_the_submodel_and_loads_the_sliced_arrays(name: str, tmp_path: Path) -> None:
    s = make(tmp_path, [float("inf")], model=name)
    cfg = s.cfg
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for rate in RATES:
        s.nodes[0].memory_mb = s.rate_required_mb(rate)
        s.before_round(None, 1)  # type: ignore[arg-type]
        config = ConfigRecord(s.train_config(1, 0))
        payload = s.train_payload(1, 0)
        module, prefixes = _build(cfg, 10, config, payload, None)  # strict load
        assert prefixes is None and module.width == cfg.width * rate
        assert _required_mb(cfg, 10, None, (3, 32, 32), width=cfg.width * rate, variant=(True, rate)) == pytest.approx(
            s.rate_required_mb(rate)
        )
        for key, value in state_to_numpy(module).items():
            np.testing.assert_array_equal(value, payload[key])
        if rate == 0.5:  # one SGD step through the Scaler hooks, then aggregated into the global model
            train_local(module, x, y, epochs=1, batch_size=4, lr=0.01, seed=0)
            s.apply_updates(1, [(state_to_numpy(module), 4.0)])
    eval_arrays, eval_config = s.eval_payload(1)
    module, _ = _build(cfg, 10, ConfigRecord(eval_config), eval_arrays, None)  # the full-width global model
    loss, acc = evaluate(module, x, y)
    assert np.isfinite(loss) and 0 <= acc <= 1


def test_apply_updates_changes_only_the_entries_trained(tmp_path: Path) -> None:
    s = make(tmp_path, [1e9])
    before = {k: v.copy() for k, v in s.arrays.items()}
    shapes = submodel_shapes("smallcnn", 10, s.cfg.width * 0.5)
    update = {k: np.ones(v, dtype=np.float32) for k, v in shapes.items()}
    s.apply_updates(1, [(update, 10.0), ({k: 3 * v for k, v in update.items()}, 1000.0)])
    for key, shape in shapes.items():
        region = tuple(slice(0, n) for n in shape)
        np.testing.assert_array_equal(s.arrays[key][region], 2.0)  # unweighted mean of 1 and 3
        rest = np.ones(before[key].shape, dtype=bool)
        rest[region] = False
        np.testing.assert_array_equal(s.arrays[key][rest], before[key][rest])


def test_heterofl_is_registered() -> None:
    assert STRATEGIES["heterofl"] is HeteroFLStrategy
    assert parse_run_config({"strategy": "heterofl"}).strategy == "heterofl"


def test_end_round_scores_every_narrower_rate_in_use(tmp_path: Path) -> None:
    from common.data import held_out_set
    from common.training import evaluate, load_numpy

    probe = make(tmp_path, [])
    s = make(tmp_path, [float("inf"), probe.rate_required_mb(0.5) + 0.01, probe.rate_required_mb(0.25)])
    s._round_participants = [0, 1]
    row = s.end_round(1)
    assert row["mean-rate"] == 0.75
    rates = dict(part.split(":") for part in str(row["rate-accuracies"]).split(","))
    assert list(rates) == ["0.5", "0.25"]  # rates held by some node, narrower than the global model
    sub = build_heterofl_model(s.cfg.model, 10, s.cfg.width * 0.25)
    load_numpy(sub, slice_arrays(s.arrays, submodel_shapes(s.cfg.model, 10, s.cfg.width * 0.25)))
    x, y = held_out_set(s.cfg.data_spec())
    assert float(rates["0.25"]) == pytest.approx(evaluate(sub, x, y, 256)[1], abs=1e-4)
