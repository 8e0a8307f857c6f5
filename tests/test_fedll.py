"""FedLL: layers, one layer trained per stage, depth dropout, schedule, client store, memory."""

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from client_app.handlers import _build
from common import protocol as P
from common.config import ConfigError, parse_run_config
from common.fedll import (
    FedLLModel,
    build_layer_heads,
    frozen_layer_prefixes,
    model_layers,
    num_layers,
    profile_layers,
    required_mb,
    stage_prefixes,
    warm_start_head,
)
from common.memory import stage_memory
from common.memory_meter import measure_training_peak
from common.models import MODEL_NAMES, BasicBlock, EncoderLayer, build_model
from common.training import state_to_numpy, train_local
from server_app.fedll import FedLLStrategy
from server_app.outputs import RunRecorder
from server_app.strategy import NodeInfo


def _sub(name: str, layer: int, width: float = 0.25, **kw: object) -> tuple[FedLLModel, torch.nn.Module]:
    model = build_model(name, 10, width, seed=0)
    heads = build_layer_heads(model, seed=1)
    head = heads[str(layer)] if layer < len(heads) else None
    return FedLLModel(model, layer, head, **kw), model  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "expected"),
    [("smallcnn", 3), ("resnet10", 4), ("resnet18", 8), ("vgg11bn", 8), ("vgg16bn", 13), ("vit", 8)],
)
def test_layers_cover_the_model_once(name: str, expected: int) -> None:
    model = build_model(name, 10, 0.25)
    layers = model_layers(model)
    assert len(layers) == expected == num_layers(name)
    block_keys = [k for k in model.state_dict() if k.startswith("blocks.")]
    owners = {k: [lay.index for lay in layers if k.startswith(lay.prefixes)] for k in block_keys}
    assert all(len(v) == 1 for v in owners.values())  # every block array in exactly one layer
    units = [m for lay in layers for m in lay.modules(model) if isinstance(m, (BasicBlock, EncoderLayer))]
    if name.startswith("resnet") or name == "vit":
        assert len(units) == expected  # one residual block / encoder layer per layer, stem folded into the first
    else:
        convs = [m for lay in layers for m in lay.modules(model) if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == expected


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_droppable_means_equal_shapes(name: str) -> None:
    profiles = profile_layers(build_model(name, 10, 0.25))
    assert not profiles[0].droppable  # the stem / patch embedding changes the shape
    for p in profiles:
        assert p.droppable == (p.in_shape == p.out_shape)
    if name == "resnet18":
        assert [p.droppable for p in profiles] == [False, True] * 4  # the stride-2 first block of a stage is not
    else:
        assert all(p.droppable for p in profiles[1:])


@pytest.mark.parametrize("name", ["smallcnn", "resnet18", "vit"])
def test_each_stage_trains_exactly_its_layer_and_head(name: str) -> None:
    for layer in range(num_layers(name)):
        sub, model = _sub(name, layer, dropout=0.5, seed=3)
        before = {k: v.clone() for k, v in sub.state_dict().items()}
        x, y = torch.randn(24, 3, 32, 32), torch.randint(0, 10, (24,))
        train_local(sub, x, y, epochs=1, batch_size=8, lr=0.1)
        trained = stage_prefixes(sub.layer_specs, layer)
        for key, value in sub.state_dict().items():
            changed = not torch.equal(before[key], value)
            if key.startswith(trained):
                if key.endswith(("weight", "bias")) and "." in key:
                    assert changed, f"layer {layer}: {key} did not train"
            else:
                assert not changed, f"layer {layer}: frozen {key} changed"
        for key, p in sub.named_parameters():
            assert (p.grad is not None) == key.startswith(trained), key
        later = [m for lay in sub.layer_specs[layer + 1 :] for m in lay.modules(model)]
        held = {id(p) for p in sub.parameters()}
        assert all(id(p) not in held for m in later for p in m.parameters())  # later layers are not in the sub-model


def test_a_reused_skeleton_holds_no_gradient_of_earlier_stages() -> None:
    model = build_model("vit", 10, 0.25, seed=0)
    heads = build_layer_heads(model, seed=1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    train_local(FedLLModel(model, 0, heads["0"]), x, y, epochs=1, batch_size=4, lr=0.1)
    assert all(p.grad is not None for p in model.blocks[0][0].parameters())  # layer 1 was trained
    sub = FedLLModel(model, 1, heads["1"])  # the client's next stage on the same skeleton
    assert all(p.grad is None for p in sub.parameters())  # frozen layer 1 keeps no stale gradient


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_depth_dropout_never_skips_the_active_or_a_shape_changing_layer(name: str) -> None:
    layer = num_layers(name) - 1
    sub, model = _sub(name, layer, dropout=0.9, seed=0, frozen_chunk=0)
    calls = {i: 0 for i in range(layer + 1)}
    for i, lay in enumerate(sub.layer_specs[: layer + 1]):
        lay.modules(model)[-1].register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
    sub.train()
    skipped_any: set[int] = set()
    for _ in range(40):
        sub(torch.randn(2, 3, 32, 32))
        assert layer not in sub.last_skipped
        assert set(sub.last_skipped) <= set(sub.droppable)
        skipped_any |= set(sub.last_skipped)
    for i in range(layer + 1):
        if i == layer or not sub.profiles[i].droppable:
            assert calls[i] == 40, f"layer {i} ran {calls[i]} of 40 batches"
    assert skipped_any == set(sub.droppable)  # with p=0.9 every droppable layer was skipped at some point
    droppable_share = sum(sub.profiles[i].flops for i in sub.droppable) / sum(p.flops for p in sub.profiles[:layer])
    assert 0.6 * droppable_share < sub.skipped_share <= droppable_share  # about p = 0.9 of what may be skipped


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_no_dropout_and_eval_are_exactly_the_plain_forward(name: str) -> None:
    last = num_layers(name) - 1
    x = torch.randn(6, 3, 32, 32)
    sub, model = _sub(name, last, dropout=0.0)
    model.eval()
    with torch.no_grad():
        plain = model(x)
        assert torch.equal(sub.eval()(x), plain)  # the last stage is the whole network
    dropped, _ = _sub(name, last, dropout=0.9)
    with torch.no_grad():
        assert torch.equal(dropped.eval()(x), plain)  # eval never drops
    for layer in (1, last):
        sub, _ = _sub(name, layer, dropout=0.0, frozen_chunk=4)  # chunked frozen forward (6 = 4 + 2)
        sub.train()
        with torch.no_grad():
            out = sub(x)
            assert sub.last_skipped == ()
            frozen = sub._run(range(layer), x)  # every frozen layer, whole batch, eval mode
            assert torch.equal(out, sub.tail_module(sub._run([layer], frozen)))


def test_depth_dropout_is_seeded_and_its_saving_counted() -> None:
    def skips(seed: int) -> list[tuple[int, ...]]:
        sub, _ = _sub("vit", 7, dropout=0.5, seed=seed)
        sub.train()
        out = []
        with torch.no_grad():
            for _ in range(10):
                sub(torch.randn(3, 3, 32, 32))
                out.append(sub.last_skipped)
        expected = sum(sub.profiles[i].flops for s in out for i in s) * 3
        assert sub.skipped_flops == pytest.approx(expected)
        assert sub.frozen_flops == pytest.approx(10 * 3 * sum(p.flops for p in sub.profiles[:7]))
        return out

    assert skips(1) == skips(1)
    assert skips(1) != skips(2)


def test_head_warm_start_copies_matching_shapes_only() -> None:
    model = build_model("resnet18", 10, 0.25, seed=0)
    arrays = {**state_to_numpy(model), **{f"lhead.{k}": v for k, v in state_to_numpy(build_layer_heads(model)).items()}}
    same = warm_start_head(arrays, 1, 8)  # layers 0 and 1 both output 16 channels
    assert set(same) == {"lhead.1.2.weight", "lhead.1.2.bias"}
    np.testing.assert_array_equal(same["lhead.1.2.weight"], arrays["lhead.0.2.weight"])
    assert set(warm_start_head(arrays, 2, 8)) == {"lhead.2.2.bias"}  # 16 -> 32 channels: only the bias fits
    assert set(warm_start_head(arrays, 7, 8)) == {"head.2.weight", "head.2.bias"}


def _strategy(tmp_path: Path, budgets: list[float], **over: object) -> FedLLStrategy:
    raw = {"strategy": "fedll", "model": "smallcnn", "synthetic-train-size": 200, "synthetic-test-size": 50}
    cfg = parse_run_config({**raw, **over})
    strategy = FedLLStrategy(cfg, RunRecorder(cfg, tmp_path / "fedll"), 10)
    for pid, mb in enumerate(budgets):
        strategy.nodes[pid] = NodeInfo(pid + 100, pid, 50, memory_mb=mb, speed_flops=1e9)
    return strategy


def test_strategy_schedule_payloads_and_frozen_store(tmp_path: Path) -> None:
    s = _strategy(tmp_path, [1e6, 1e6], **{"num-rounds": 7, "fedll-rounds-per-layer": 2})
    stages, payload_keys = [], []
    for rnd in range(1, 8):
        stages.append(s.round_info(rnd)["stage"])
        layer = s.layer
        payload = s.train_payload(rnd, 0)
        payload_keys.append(set(payload))
        assert set(s.expected_reply_keys(0)) == set(s._active_keys())
        assert s.train_config(rnd, 0)[P.FEDLL_LAYER] == layer
        update = {k: s.arrays[k] + 1.0 for k in s._active_keys()}
        s.apply_updates(rnd, [(update, 10.0)])
        s.on_reply(rnd, 0, {P.FEDLL_HELD: list(range(layer)), P.FEDLL_FROZEN_FLOPS: 100.0, P.FEDLL_SKIPPED_FLOPS: 25.0})
        s._round_train_metrics = {"participants": 1}
        row = s.end_round(rnd)
        assert row["fedll-skipped-share"] == 0.25
    assert stages == [1, 1, 2, 2, 3, 3, 3]  # 2 rounds per layer, the last layer runs the rest
    frozen_0 = frozen_layer_prefixes(s.layers, 1)
    assert any(k.startswith(frozen_0) for k in payload_keys[2])  # layer 1's first round: layer 0 is sent
    assert not any(k.startswith(frozen_0) for k in payload_keys[3])  # the node reported holding it
    summary = s.summary_extras()
    assert [st["stage"] for st in summary["stages"]] == [1, 2, 3]
    assert set(s.final_arrays()) == set(build_model("smallcnn", 10, 0.25).state_dict())


def test_strategy_compresses_a_short_budget_and_selects_by_memory(tmp_path: Path) -> None:
    s = _strategy(tmp_path, [1e6, 0.0], **{"num-rounds": 4, "fedll-rounds-per-layer": 3})
    stages = []
    for rnd in range(1, 5):
        stages.append(s.layer + 1)
        assert s.eligible(rnd) == [0]  # node 1's budget holds no stage
        s.end_round(rnd)
    assert stages == [1, 1, 2, 3]
    assert s.required_mb(0) == pytest.approx(required_mb("smallcnn", 10, 0.25, 0, 32, (3, 32, 32)))


def test_server_model_is_the_stage_sub_model(tmp_path: Path) -> None:
    s = _strategy(tmp_path, [1e6], **{"num-rounds": 6})
    sub = s.server_model()
    assert isinstance(sub, FedLLModel) and sub.layer == 0
    payload, extra = s.eval_payload(1)
    assert set(payload) == set(sub.state_dict()) and extra == {P.FEDLL_LAYER: 0}


def test_config_needs_a_round_per_layer() -> None:
    with pytest.raises(ConfigError, match="model 'vgg16bn' has 13 layers"):
        parse_run_config({"strategy": "fedll", "model": "vgg16bn", "num-rounds": 12})
    with pytest.raises(ConfigError, match="fedll-dropout"):
        parse_run_config({"strategy": "fedll", "fedll-dropout": 1.0})


def test_client_keeps_frozen_layers_between_rounds() -> None:
    cfg = parse_run_config({"strategy": "fedll", "model": "smallcnn", "width": 0.25})
    model = build_model("smallcnn", 10, 0.25, seed=0)
    heads = build_layer_heads(model, seed=1)
    arrays = {**state_to_numpy(model), **{f"lhead.{k}": v for k, v in state_to_numpy(heads).items()}}
    layers = model_layers(model)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    full = {
        k: v for k, v in arrays.items() if k.startswith(frozen_layer_prefixes(layers, 2) + stage_prefixes(layers, 2))
    }
    config = ConfigRecord({P.FEDLL_LAYER: 2, P.SEED: 5})
    sub, prefixes = _build(cfg, 10, config, full, context)
    assert isinstance(sub, FedLLModel) and prefixes == stage_prefixes(layers, 2)
    active_only = {k: v for k, v in arrays.items() if k.startswith(stage_prefixes(layers, 2))}
    sub2, _ = _build(cfg, 10, config, active_only, context)  # frozen layers come from the store
    for key, value in sub2.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), arrays[key].reshape(value.shape))
    with pytest.raises(KeyError, match="frozen layer"):
        _build(cfg, 10, config, active_only, Context(1, 2, {}, RecordDict(), {}))


@pytest.mark.parametrize("layer", [0, 7])
def test_modelled_memory_of_a_vit_stage_within_15_percent(layer: int) -> None:
    sub, _ = _sub("vit", layer)
    modelled = required_mb("vit", 10, 0.25, layer, 16)
    measured = measure_training_peak(sub, 16, steps=2)["torch_peak_mb"]
    assert abs(modelled - measured) / measured < 0.15, (modelled, measured)
    assert modelled < stage_memory(build_model("vit", 10, 0.25), None, 16).total


def test_every_model_has_a_fedll_stage_memory() -> None:
    for name in MODEL_NAMES:
        assert required_mb(name, 10, 0.25, num_layers(name) - 1, 8) > 0


def test_default_schedule_splits_the_rounds_evenly_over_the_layers(tmp_path: Path) -> None:
    cfg = parse_run_config({"strategy": "fedll", "model": "resnet10", "num-rounds": 62})
    assert cfg.fedll_rounds_per_layer == 0 and cfg.fedll_layer_rounds() == 15  # 4 layers
    assert (
        parse_run_config({"strategy": "fedll", "num-rounds": 62, "fedll-rounds-per-layer": 5}).fedll_layer_rounds() == 5
    )
    s = _strategy(tmp_path, [1e6], **{"num-rounds": 7})  # smallcnn: 3 layers -> 2, 2, the rest
    stages = []
    for rnd in range(1, 8):
        stages.append(s.layer + 1)
        s.end_round(rnd)
    assert stages == [1, 1, 2, 2, 3, 3, 3]
