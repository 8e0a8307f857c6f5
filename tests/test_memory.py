"""Memory model (SmartFreeze Eq. 4) and peak measurement: small models, fast."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.memory import MB, MemoryBreakdown, stage_memory
from common.memory_meter import measure_training_peak, track_peak
from common.models import BlockModel, build_model
from common.output_modules import DEFAULT_FROZEN_CHUNK, StageModel, build_output_module
from common.training import train_local


def _param_mb(modules: list[nn.Module]) -> float:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / MB


def _stage_module(model: BlockModel, stage: int | None, frozen_chunk: int = DEFAULT_FROZEN_CHUNK) -> nn.Module:
    if stage is None:
        return model
    last = model.num_blocks - 1
    return StageModel(model, stage, None if stage == last else build_output_module(model, stage), frozen_chunk)


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
        assert 0 <= mem.grads_at_activation_peak <= mem.grads  # gradients are born during backward
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
    persistent = mem.params_trainable + mem.optimizer + mem.params_frozen + mem.buffers
    transient = max(mem.activations, mem.frozen_peak_activation, mem.grads + mem.step_transient)
    assert mem.total == pytest.approx(persistent + transient)  # gradients freed before the forward pass
    eq4 = 2 * mem.saved_activations + persistent + mem.grads + mem.frozen_largest_activation
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


def test_frozen_term_follows_the_micro_batches(resnet18: BlockModel) -> None:
    stage = 2
    whole = stage_memory(resnet18, stage, batch_size=32, frozen_chunk=0)
    default = stage_memory(resnet18, stage, batch_size=32)
    chunked = stage_memory(resnet18, stage, batch_size=32, frozen_chunk=8)
    assert default == stage_memory(resnet18, stage, batch_size=32, frozen_chunk=DEFAULT_FROZEN_CHUNK)
    assert chunked.frozen_peak_activation < whole.frozen_peak_activation
    assert chunked.frozen_largest_activation <= whole.frozen_largest_activation
    # the frozen output is whole-batch either way: at least the last frozen block's output
    side = 32 // math.prod(spec.stride for spec in resnet18.specs[:stage])
    out_mb = 32 * resnet18.specs[stage - 1].out_channels * side * side * 4 / MB
    assert chunked.frozen_peak_activation >= out_mb
    assert chunked.activations == whole.activations and chunked.params_frozen == whole.params_frozen
    assert stage_memory(resnet18, 0, batch_size=32, frozen_chunk=4) == stage_memory(resnet18, 0, batch_size=32)
    assert stage_memory(resnet18, stage, batch_size=8, frozen_chunk=8) == stage_memory(
        resnet18, stage, batch_size=8, frozen_chunk=0
    )  # a chunk as large as the batch is one batch
    with pytest.raises(ValueError, match="frozen_chunk"):
        stage_memory(resnet18, None, batch_size=8, frozen_chunk=-1)


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


@pytest.mark.parametrize("frozen_chunk", [0, 4])
def test_model_close_to_measurement_with_micro_batched_frozen_forward(frozen_chunk: int) -> None:
    model = build_model("resnet10", width=0.5, seed=0)
    modelled = stage_memory(model, 3, batch_size=16, frozen_chunk=frozen_chunk).total
    module = _stage_module(model, 3, frozen_chunk)
    measured = measure_training_peak(module, batch_size=16, steps=2)["torch_peak_mb"]
    assert abs(modelled / measured - 1) < 0.15, (modelled, measured)


def _reference_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, lr: float) -> None:
    """The previous loop order (gradients zeroed between forward and backward), same shuffling."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    model.train()
    for i in range(0, len(y), batch_size):
        idx = order[i : i + batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("stage", [None, 1])
def test_train_local_zeroing_gradients_first_gives_the_same_update(stage: int | None) -> None:
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 3, 32, 32, generator=gen), torch.randint(0, 10, (24,), generator=gen)
    trained = _stage_module(build_model("resnet10", width=0.25, seed=0), stage)
    reference = copy.deepcopy(trained)
    train_local(trained, x, y, epochs=1, batch_size=8, lr=0.05, seed=0)
    _reference_sgd(reference, x, y, batch_size=8, lr=0.05)
    after, expected = trained.state_dict(), reference.state_dict()
    assert set(after) == set(expected)
    for key, value in after.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_train_local_still_learns() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32, generator=gen)
    y = torch.arange(64) % 4
    x[:, 0] += y.view(-1, 1, 1).float()  # a learnable class signal in the first channel
    model = StageModel(build_model("resnet10", num_classes=4, width=0.25, seed=0), 3, None, frozen_chunk=8)
    losses = [train_local(model, x, y, epochs=1, batch_size=16, lr=0.05, seed=e).loss for e in range(6)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # the last step's gradients
