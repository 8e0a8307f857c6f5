"""Memory model (SmartFreeze Eq. 4) and peak measurement: small models, fast."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.memory import MB, MemoryBreakdown, measure_training_peak, stage_memory, track_peak
from common.models import BlockModel, build_model
from common.output_modules import StageModel, build_output_module


def _param_mb(modules: list[nn.Module]) -> float:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / MB


def _stage_module(model: BlockModel, stage: int | None) -> nn.Module:
    if stage is None:
        return model
    last = model.num_blocks - 1
    return StageModel(model, stage, None if stage == last else build_output_module(model, stage))


@pytest.fixture(scope="module")
def resnet18() -> BlockModel:
    return build_model("resnet18", width=0.25, seed=0)


def test_stage_terms_are_the_right_sizes(resnet18: BlockModel) -> None:
    model = resnet18
    last = model.num_blocks - 1
    for stage in range(model.num_blocks):
        mem = stage_memory(model, stage, batch_size=8)
        tail = [model.head] if stage == last else [build_output_module(model, stage)]
        assert mem.params_frozen == pytest.approx(_param_mb(list(model.blocks[:stage])))
        assert mem.params_trainable == pytest.approx(_param_mb([model.blocks[stage], *tail]))
        assert mem.output_module == pytest.approx(_param_mb(tail))
        assert mem.grads == mem.params_trainable
        assert mem.optimizer == mem.params_trainable  # SGD momentum: one buffer per parameter
        assert mem.activations > 0 and mem.saved_activations > 0
        assert mem.activations >= mem.saved_activations
        if stage == 0:
            assert mem.frozen_peak_activation == 0 and mem.frozen_largest_activation == 0
        else:
            assert mem.frozen_peak_activation >= mem.frozen_largest_activation > 0
        assert mem.total > mem.params_trainable + mem.grads + mem.optimizer + mem.params_frozen


def test_full_model_has_nothing_frozen(resnet18: BlockModel) -> None:
    full = stage_memory(resnet18, None, batch_size=8)
    assert full.params_frozen == 0 and full.frozen_peak_activation == 0
    assert full.params_trainable == pytest.approx(_param_mb([resnet18]))
    assert full.output_module == pytest.approx(_param_mb([resnet18.head]))


def test_every_stage_needs_less_than_full_training(resnet18: BlockModel) -> None:
    full = stage_memory(resnet18, None, batch_size=8).total
    for stage in range(resnet18.num_blocks):
        assert stage_memory(resnet18, stage, batch_size=8).total < full


def test_totals_and_options() -> None:
    model = build_model("smallcnn", width=0.25, seed=0)
    mem = stage_memory(model, 1, batch_size=8)
    persistent = mem.params_trainable + mem.grads + mem.optimizer + mem.params_frozen + mem.buffers
    transient = max(mem.activations, mem.frozen_peak_activation, mem.step_transient)
    assert mem.total == pytest.approx(persistent + transient)
    eq4 = 2 * mem.saved_activations + persistent + mem.frozen_largest_activation
    assert mem.eq4_total == pytest.approx(eq4)
    assert set(mem.as_dict()) >= {"activations", "total", "eq4_total"}
    plain = stage_memory(model, 1, batch_size=8, momentum=False, weight_decay=False)
    assert plain.optimizer == 0 and plain.step_transient == 0
    assert plain.activations == mem.activations
    bigger = stage_memory(model, 1, batch_size=16)
    assert bigger.activations > mem.activations and bigger.params_trainable == mem.params_trainable
    assert isinstance(mem, MemoryBreakdown)
    with pytest.raises(ValueError, match="stage"):
        stage_memory(model, 3, batch_size=8)


def test_stage_memory_does_not_touch_the_model() -> None:
    model = build_model("resnet10", width=0.25, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    for stage in [None, *range(model.num_blocks)]:
        stage_memory(model, stage, batch_size=4, input_shape=(3, 16, 16))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training


def test_track_peak_counts_live_bytes() -> None:
    with track_peak() as meter:
        a = torch.ones(2**20)  # 4 MB
        b = torch.ones(2 * 2**20)  # 8 MB, 12 MB live
        del a
        c = torch.ones(2**19)  # 2 MB, 10 MB live
        del b, c
    assert meter.method == "cpu-profiler-memory-events"
    assert meter.torch_peak_mb == pytest.approx(12.0, abs=0.1)
    assert meter.rss_peak_mb >= meter.rss_start_mb > 0
    assert math.isfinite(meter.rss_delta_mb)


def test_track_peak_stops_after_max_steps_and_refuses_nesting() -> None:
    model = build_model("smallcnn", width=0.25, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    with track_peak(model, max_steps=2) as meter:
        with track_peak() as inner:
            pass
        for _ in range(4):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert meter.steps_measured == 2
    assert meter.torch_peak_mb > meter.torch_baseline_mb > 0
    assert math.isnan(inner.torch_peak_mb) and inner.method.startswith("unavailable")


def test_measured_stage_peak_below_full_training() -> None:
    peaks = {}
    for stage in (0, None):
        module = _stage_module(build_model("resnet10", width=0.5, seed=0), stage)
        result = measure_training_peak(module, batch_size=32, steps=2)
        assert all(math.isfinite(v) for v in result.values())
        assert result["torch_peak_mb"] > result["torch_baseline_mb"] > 0
        assert result["rss_peak_mb"] > 0 and result["rss_delta_mb"] >= 0
        peaks[stage] = result["torch_peak_mb"]
    assert peaks[0] < peaks[None]


@pytest.mark.parametrize("stage", [0, 1, 2, 3, None])
def test_model_close_to_measurement(stage: int | None) -> None:
    model = build_model("resnet10", width=0.25, seed=0)
    modelled = stage_memory(model, stage, batch_size=8).total
    measured = measure_training_peak(_stage_module(model, stage), batch_size=8, steps=2)["torch_peak_mb"]
    assert abs(modelled / measured - 1) < 0.25, (modelled, measured)
