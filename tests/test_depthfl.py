"""DepthFL: module keys, per-holder aggregation, self-distillation loss, ensemble, depth per budget."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import strategy_with_nodes
from flwr.app import ConfigRecord

from client_app.handlers import _build, _required_mb
from common import protocol as P
from common.config import parse_run_config
from common.depthfl import (
    TEACHER_EPS,
    DepthFLModel,
    aggregate_by_holder,
    build_depthfl,
    choose_depth,
    client_module,
    depth_prefixes,
    distillation_loss,
    ensemble_logits,
    holder_counts,
    required_mb,
    select_depth_arrays,
)
from common.memory import stage_memory
from common.memory_meter import measure_training_peak
from common.models import build_model
from common.training import evaluate, state_to_numpy, train_local
from server_app.depthfl import DepthFLStrategy
from server_app.registry import STRATEGIES


def make(tmp_path: Path, budgets: list[float], **over: object) -> DepthFLStrategy:
    return strategy_with_nodes(DepthFLStrategy, tmp_path / "depthfl", budgets, **over)


@pytest.mark.parametrize("name", ["smallcnn", "resnet10", "vgg11bn"])
def test_client_module_holds_its_blocks_and_classifiers_with_global_keys(name: str) -> None:
    full, model = build_depthfl(name, 10, 0.25, build_model(name, 10, 0.25).num_blocks, seed=0)
    b = model.num_blocks
    global_state = state_to_numpy(full)
    assert {k.split(".")[0] for k in global_state} == {"blocks", "aux", "head"}
    for depth in range(1, b + 1):
        keys = set(client_module(name, 10, 0.25, depth).state_dict())
        expected = {f"blocks.{i}" for i in range(depth)} | {f"aux.{k}" for k in range(min(depth, b - 1))}
        if depth == b:
            expected.add("head")
        assert {".".join(k.split(".")[:2]) if not k.startswith("head.") else "head" for k in keys} == expected
        payload = select_depth_arrays(global_state, depth, b)
        assert set(payload) == keys
        shapes = {k: tuple(v.shape) for k, v in client_module(name, 10, 0.25, depth).state_dict().items()}
        assert {k: v.shape for k, v in payload.items()} == shapes
    assert set(select_depth_arrays(global_state, b, b)) == set(global_state)
    with pytest.raises(ValueError, match="depth"):
        depth_prefixes(0, b)
    with pytest.raises(ValueError, match="depth"):
        client_module(name, 10, 0.25, b + 1)


def test_aggregation_over_the_holders_of_each_block_and_classifier() -> None:
    full, model = build_depthfl("resnet10", 10, 0.25, 4, seed=0)
    g = state_to_numpy(full)
    depths, values, sizes = (1, 2, 4), (1.0, 2.0, 4.0), (10.0, 20.0, 30.0)
    updates = []
    for depth, value, n in zip(depths, values, sizes, strict=True):
        arrays = {
            k: np.full(v.shape, value, dtype=v.dtype) if v.dtype.kind == "f" else np.full(v.shape, int(value), v.dtype)
            for k, v in select_depth_arrays(g, depth, 4).items()
        }
        updates.append((arrays, n))
    blocks, classifiers = holder_counts([list(a) for a, _ in updates], 4)
    assert blocks == [3, 2, 1, 1] and classifiers == [3, 2, 1, 1]
    out = aggregate_by_holder(g, updates)
    over3 = (1 * 10 + 2 * 20 + 4 * 30) / 60
    over2 = (2 * 20 + 4 * 30) / 50
    expected = {"blocks.0.": over3, "aux.0.": over3, "blocks.1.": over2, "aux.1.": over2}
    expected |= {"blocks.2.": 4.0, "blocks.3.": 4.0, "aux.2.": 4.0, "head.": 4.0}
    for key, value in out.items():
        assert value.shape == g[key].shape and value.dtype == g[key].dtype
        target = next(v for p, v in expected.items() if key.startswith(p))
        if value.dtype.kind == "f":
            np.testing.assert_allclose(value, target, rtol=1e-6)
        else:
            np.testing.assert_array_equal(value, round(target))  # num_batches_tracked: rounded mean
    shallow = aggregate_by_holder(g, updates[:2])  # nobody held blocks 2-3, aux 2 or the head: unchanged
    for key in g:
        if key.startswith(("blocks.2.", "blocks.3.", "aux.2.", "head.")):
            np.testing.assert_array_equal(shallow[key], g[key])
    with pytest.raises(KeyError, match="not part of the global model"):
        aggregate_by_holder(g, [({"nope": np.zeros(1)}, 1.0)])


def _hand_loss(z: list[np.ndarray], y: np.ndarray) -> np.ndarray:
    """DepthFL's per-sample loss written out in numpy (T = 1, weight 1, teacher + 1e-7)."""

    def softmax(a: np.ndarray) -> np.ndarray:
        e = np.exp(a - a.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    n = len(z)
    rows = np.arange(len(y))
    total = np.zeros(len(y))
    for i in range(n):
        p_i = softmax(z[i])
        total += -np.log(p_i[rows, y])
        for j in range(n):
            if j != i:
                t = softmax(z[j]) + TEACHER_EPS
                total += (t * (np.log(t) - np.log(p_i))).sum(axis=1) / (n - 1)
    return total


def test_training_loss_is_cross_entropy_at_depth_one_and_adds_distillation_deeper() -> None:
    gen = torch.Generator().manual_seed(0)
    z = [torch.randn(2, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    y = torch.tensor([0, 2])
    one = client_module("smallcnn", 3, 0.25, 1).training_loss([z[0]], y)
    torch.testing.assert_close(one, F.cross_entropy(z[0], y, reduction="none"))
    for n in (2, 3):
        ours = client_module("smallcnn", 3, 0.25, n).training_loss(z[:n], y)
        hand = _hand_loss([t.numpy() for t in z[:n]], y.numpy())
        np.testing.assert_allclose(ours.numpy(), hand, rtol=1e-10)
        ce = sum(F.cross_entropy(t, y, reduction="none") for t in z[:n])
        assert (ours > ce).all()  # KL >= 0 and the logits differ
    zs = [t.clone().requires_grad_(True) for t in z[:2]]  # teachers detached: dz_0 sees z_1 only as a constant
    distillation_loss(zs, y).sum().backward()
    p0, t1 = F.softmax(z[0], dim=1), F.softmax(z[1], dim=1) + TEACHER_EPS
    hand_grad = p0 - F.one_hot(y, 3) + (p0 * t1.sum(dim=1, keepdim=True) - t1)
    torch.testing.assert_close(zs[0].grad, hand_grad)
    same = distillation_loss([z[0], z[0].clone()], y)
    torch.testing.assert_close(same, 2 * F.cross_entropy(z[0], y, reduction="none"), atol=1e-6, rtol=0)


def test_forward_returns_every_exit_in_training_and_the_ensemble_in_eval() -> None:
    torch.manual_seed(0)
    module = client_module("resnet10", 10, 0.25, 3)
    x = torch.randn(4, 3, 32, 32)
    module.train()
    outs = module(x)
    assert isinstance(outs, list) and len(outs) == 3 and all(o.shape == (4, 10) for o in outs)
    module.eval()
    with torch.no_grad():
        exits = module.exits(x)
        got = module(x)
    expected = torch.log(torch.stack([F.softmax(e, dim=1) for e in exits]).mean(dim=0))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ensemble_logits(exits).exp().sum(dim=1), torch.ones(4))
    loss, acc = evaluate(module, x, torch.randint(0, 10, (4,)))
    assert math.isfinite(loss) and 0 <= acc <= 1


def test_local_training_on_the_depthfl_loss_keeps_the_keys() -> None:
    torch.manual_seed(0)
    module = client_module("smallcnn", 10, 0.25, 2)
    before = state_to_numpy(module)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    result = train_local(module, x, y, epochs=1, batch_size=8, lr=0.05, seed=0)
    after = state_to_numpy(module)
    assert math.isfinite(result.loss) and set(after) == set(before)
    assert all(not np.array_equal(after[k], before[k]) for k in before if k.endswith("weight"))


def test_choose_depth_takes_the_deepest_that_fits() -> None:
    assert choose_depth(lambda d: d <= 2, 4) == 2
    assert choose_depth(lambda d: True, 4) == 4
    assert choose_depth(lambda d: d in (1, 3), 4) == 3
    assert choose_depth(lambda d: False, 4) is None


def test_modelled_memory_grows_with_depth_and_exceeds_the_plain_model_at_full_depth() -> None:
    mb = [required_mb("resnet10", 10, 0.25, d, 32) for d in range(1, 5)]
    assert all(a < b for a, b in zip(mb, mb[1:], strict=False))
    assert mb[-1] > stage_memory(build_model("resnet10", 10, 0.25), None, 32).total  # plus three classifiers


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_modelled_memory_bounds_the_measured_peak_of_real_training(depth: int) -> None:
    torch.manual_seed(0)
    measured = measure_training_peak(client_module("smallcnn", 10, 0.25, depth), 32, steps=2)["torch_peak_mb"]
    modelled = required_mb("smallcnn", 10, 0.25, depth, 32)
    assert measured <= modelled <= 1.03 * measured


def test_depth_per_budget_and_nodes_that_fit_nothing_are_not_selected(tmp_path: Path) -> None:
    probe = make(tmp_path, [])
    mb = {d: probe.depth_required_mb(d) for d in (1, 2, 3)}
    budgets = [float("inf"), mb[3] + 0.01, (mb[2] + mb[3]) / 2, mb[1] + 1e-3, mb[1] * 0.99, 0.5]
    s = make(tmp_path, budgets, **{"fraction-train": 1.0})
    assert [s.depth_of(p) for p in range(len(budgets))] == [3, 3, 2, 1, None, None]
    assert s.eligible(1) == [0, 1, 2, 3]
    for rnd in range(1, 4):
        assert set(s.sample(rnd)) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="fits no DepthFL depth"):
        s.train_config(1, 4)


def test_strategy_never_sends_a_depth_over_the_budget(tmp_path: Path) -> None:
    probe = make(tmp_path, [], model="resnet10", width=0.25)
    full = probe.depth_required_mb(4)
    budgets = [full * f for f in np.random.default_rng(3).uniform(0.05, 1.3, size=40)]
    s = make(tmp_path, budgets, model="resnet10", width=0.25, **{"fraction-train": 0.5})
    cfg = s.cfg
    seen: set[int] = set()
    for rnd in range(1, 8):
        s.before_round(None, rnd)  # type: ignore[arg-type]
        for pid in s.sample(rnd):
            config = s.train_config(rnd, pid)
            depth = int(config[P.DEPTH])
            need = _required_mb(cfg, 10, None, (3, 32, 32), width=float(config[P.WIDTH]), depth=depth)
            assert need <= budgets[pid] and need == pytest.approx(s.depth_required_mb(depth))
            assert config[P.ENFORCE_BUDGET] is True and float(config[P.WIDTH]) == cfg.width
            assert set(s.train_payload(rnd, pid)) == set(client_module("resnet10", 10, 0.25, depth).state_dict())
            seen.add(depth)
    assert len(seen) > 1


def test_client_builds_each_depth_and_the_round_trip_updates_the_global_model(tmp_path: Path) -> None:
    s = make(tmp_path, [float("inf")] * 3)
    cfg = s.cfg
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    updates = []
    for pid, depth in enumerate((1, 2, 3)):
        s.nodes[pid].memory_mb = s.depth_required_mb(depth)
        assert s.depth_of(pid) == depth
        config = ConfigRecord(s.train_config(1, pid))
        payload = s.train_payload(1, pid)
        module, prefixes = _build(cfg, 10, config, payload, None)  # strict load
        assert prefixes is None and isinstance(module, DepthFLModel) and module.depth == depth
        for key, value in state_to_numpy(module).items():
            np.testing.assert_array_equal(value, payload[key])
        train_local(module, x, y, epochs=1, batch_size=4, lr=0.01, seed=pid)
        updates.append((state_to_numpy(module), 8.0))
    s._round_succeeded = [0, 1, 2]
    before = {k: v.copy() for k, v in s.arrays.items()}
    s.apply_updates(1, updates)
    row = s.end_round(1)
    exits = [float(a) for a in row.pop("exit-accuracies").split(",")]
    assert row == {"block-counts": "3,2,1", "classifier-counts": "3,2,1", "mean-depth": 2.0}
    assert len(exits) == 3 and all(0.0 <= a <= 1.0 for a in exits)
    assert all(not np.array_equal(s.arrays[k], before[k]) for k in before if k.endswith("weight"))
    eval_arrays, eval_config = s.eval_payload(1)
    module, _ = _build(cfg, 10, ConfigRecord(eval_config), eval_arrays, None)  # the full-depth global model
    assert module.depth == 3
    loss, acc = evaluate(module, x, y)
    assert (loss, acc) == pytest.approx(evaluate(s.server_model(), x, y))


def test_depthfl_is_registered() -> None:
    assert STRATEGIES["depthfl"] is DepthFLStrategy
    assert parse_run_config({"strategy": "depthfl"}).strategy == "depthfl"


def test_distillation_weight_ramps_up_over_the_share_of_rounds() -> None:
    from common.depthfl import consistency_weight

    assert consistency_weight(1, 60) == pytest.approx(math.exp(-5))  # the reference's start
    assert consistency_weight(10, 60) == pytest.approx(math.exp(-5 * (1 - 9 / 18) ** 2))
    assert consistency_weight(19, 60) == 1.0 and consistency_weight(60, 60) == 1.0
    assert consistency_weight(1, 60, share=0.0) == 1.0  # no ramp
    weights = [consistency_weight(r, 60) for r in range(1, 61)]
    assert weights == sorted(weights)


def test_exit_accuracies_score_each_classifier_on_its_own() -> None:
    from common.depthfl import build_depthfl, exit_accuracies

    net, _ = build_depthfl("smallcnn", 10, 0.25, 3, seed=0)
    x, y = torch.randn(20, 3, 32, 32), torch.randint(0, 10, (20,))
    net.eval()
    with torch.no_grad():
        expected = [float((z.argmax(1) == y).float().mean()) for z in net.exits(x)]
    net.train()
    assert exit_accuracies(net, x, y, batch_size=7) == pytest.approx(expected)
    assert net.training  # mode restored
