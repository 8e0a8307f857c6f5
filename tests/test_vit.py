"""The small ViT: blocks contract, shapes, FLOPs, memory model, and every strategy's machinery on it."""

import pytest
import torch

from common.config import STRATEGY_NAMES, parse_run_config
from common.depthfl import build_depthfl
from common.depthfl import required_mb as depthfl_required_mb
from common.flops import stage_flops
from common.heterofl import build_heterofl_model, slice_arrays, submodel_shapes
from common.memory import stage_memory
from common.memory_meter import measure_training_peak
from common.models import AttentionCore, EncoderLayer, build_model, build_vit, count_parameters
from common.output_modules import StageModel, build_output_module, build_output_modules
from common.training import state_to_numpy


def test_vit_blocks_contract_and_grid_layout() -> None:
    model = build_model("vit", 10, 0.25, seed=0).eval()
    assert model.num_blocks == 4
    assert [s.stride for s in model.specs] == [4, 1, 1, 1]
    assert [s.out_channels for s in model.specs] == [64] * 4  # 4 heads x scaled(64, 0.25)
    assert sum(isinstance(m, EncoderLayer) for m in model.modules()) == 8
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = x
        for block in model.blocks:
            h = block(h)
            assert h.shape == (2, 64, 8, 8)
            assert h.is_contiguous(memory_format=torch.channels_last)  # tokens (N, T, D) in memory
        assert torch.equal(model.head(h), model(x))


def test_vit_depth_width_heads_are_configurable() -> None:
    deep = build_vit(10, 0.5, depth=5, heads=2, layers_per_block=2)
    assert deep.num_blocks == 3  # 2 + 2 + 1 layers
    assert sum(isinstance(m, EncoderLayer) for m in deep.modules()) == 5
    assert deep.specs[-1].out_channels == 2 * 32
    assert count_parameters(build_model("vit", 10, 1.0)) == 4_248_842
    with pytest.raises(ValueError, match="depth, heads and layers_per_block"):
        build_vit(depth=0)
    with pytest.raises(ValueError, match="built for 32x32"):
        build_model("vit", 10, 0.25)(torch.zeros(1, 3, 28, 28))


@pytest.mark.parametrize(("name", "layers", "blocks"), [("vit", 8, 4), ("vit-d4", 4, 2), ("vit-d12", 12, 4)])
def test_vit_depth_variants_are_selectable_by_model_name(name: str, layers: int, blocks: int) -> None:
    """The run config picks the depth through ``model``; every cache keyed by the name builds the same net."""
    model = build_model(name, 10, 0.25, seed=0)
    assert model.arch == name and model.num_blocks == blocks
    assert sum(isinstance(m, EncoderLayer) for m in model.modules()) == layers
    x = torch.randn(2, 3, 32, 32)
    out = x
    for block in model.blocks:
        out = block(out)
    torch.testing.assert_close(model.head(out), model(x))
    assert parse_run_config({"model": name}).model == name


def test_attention_core_matches_pytorch_sdpa_and_counts_its_flops() -> None:
    q, k, v = (torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out = AttentionCore()(q, k, v)
    assert torch.allclose(out, ref, atol=1e-5)
    assert AttentionCore.flops_per_sample(out) == 4 * (4 * 16 * 16 * 8 + 16 * 8 + 5 * 16 * 16)


def test_vit_flops_count_every_token() -> None:
    model = build_model("vit", 10, 1.0)
    full = stage_flops(model, None)
    dim, tokens = 256, 64
    per_layer_linear = 2 * tokens * (4 * dim * dim + 2 * dim * 2 * dim)  # q, k, v, proj + MLP (ratio 2)
    assert full.forward > 8 * per_layer_linear
    assert full.forward < 8 * per_layer_linear * 1.2
    for stage in range(model.num_blocks):
        assert stage_flops(model, stage).total > 0


def test_smartfreeze_output_modules_and_stage_models_on_vit() -> None:
    model = build_model("vit", 10, 0.25, seed=0)
    oms = build_output_modules(model, seed=1)
    x = torch.randn(4, 3, 32, 32)
    for stage in range(model.num_blocks):
        om = oms[str(stage)] if stage < model.num_blocks - 1 else None
        sub = StageModel(model, stage, om).train()
        out = sub(x)
        assert out.shape == (4, 10)
        out.sum().backward()
        for i, block in enumerate(model.blocks[: stage + 1]):
            assert all((p.grad is not None) == (i == stage) for p in block.parameters())
        model.zero_grad(set_to_none=True)
        oms.zero_grad(set_to_none=True)


@pytest.mark.parametrize("stage", [None, 0, 3])
def test_vit_memory_model_within_15_percent_of_measured(stage: int | None) -> None:
    model = build_model("vit", 10, 0.25, seed=0)
    modelled = stage_memory(model, stage, 16).total
    if stage is None:
        net: torch.nn.Module = model
    else:
        om = build_output_module(model, stage) if stage < model.num_blocks - 1 else None
        net = StageModel(model, stage, om)
    measured = measure_training_peak(net, 16, steps=2)["torch_peak_mb"]
    assert abs(modelled - measured) / measured < 0.15, (modelled, measured)


def test_heterofl_slices_of_the_vit_nest_and_train() -> None:
    full = build_heterofl_model("vit", 10, 0.5, seed=0)
    shapes = submodel_shapes("vit", 10, 0.5 * 0.25)
    arrays = slice_arrays(state_to_numpy(full), shapes)
    small = build_heterofl_model("vit", 10, 0.5 * 0.25, scaler_rate=0.25)
    small.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()})
    out = small.train()(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_depthfl_on_the_vit() -> None:
    module, model = build_depthfl("vit", 10, 0.25, 2, seed=0)
    outs = module.train()(torch.randn(4, 3, 32, 32))
    assert len(outs) == 2 and all(o.shape == (4, 10) for o in outs)
    assert depthfl_required_mb("vit", 10, 0.25, 2, 16) > 0


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_every_strategy_accepts_the_vit(strategy: str) -> None:
    cfg = parse_run_config({"strategy": strategy, "model": "vit", "num-rounds": 20})
    assert cfg.model == "vit"
