"""ResNets with one block per BasicBlock (``resnet10-fine``, ``resnet18-fine``).

Same network as ``resnet10`` / ``resnet18`` (same modules built in the same order, so with the
same seed the same parameters and forward), only the block boundaries differ; everything built
from the blocks and their :class:`BlockSpec` (output modules, ProFL basic layers and steps, the
memory and FLOPs models, FedLL layers, HeteroFL, DepthFL) must work on them.
"""

from __future__ import annotations

import re

import pytest
import torch

from common.config import MODEL_NAMES as CONFIG_MODEL_NAMES
from common.depthfl import build_depthfl, required_mb
from common.fedll import model_layers
from common.flops import stage_flops
from common.heterofl import build_heterofl_model, slice_arrays, submodel_shapes
from common.memory import stage_memory
from common.models import MODEL_NAMES, BasicBlock, BlockSpec, build_model, count_parameters
from common.output_modules import StageModel, build_output_module
from common.profl import ProFLSchedule, ShrinkModel, build_basic_layers, shrink_memory

PAIRS = [("resnet10", "resnet10-fine", 4), ("resnet18", "resnet18-fine", 8)]


def fine_to_coarse_key(key: str, layers_per_stage: int) -> str:
    """The plain ResNet's key of fine-block key ``key`` (BasicBlock b -> stage b // n, slot b % n)."""
    m = re.match(r"blocks\.(\d+)\.(\d+)\.(.*)", key)
    if m is None:
        return key
    b, slot, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    stage, j = divmod(b, layers_per_stage)
    stem = 3 if stage == 0 else 0
    if b == 0:
        return f"blocks.0.{slot}.{rest}"
    return f"blocks.{stage}.{stem + j}.{rest}"


def test_names_registered() -> None:
    for name in ("resnet10-fine", "resnet18-fine"):
        assert name in MODEL_NAMES
        assert name in CONFIG_MODEL_NAMES


@pytest.mark.parametrize(("coarse", "fine", "blocks"), PAIRS)
def test_same_network_finer_blocks(coarse: str, fine: str, blocks: int) -> None:
    a = build_model(coarse, width=0.25, seed=3)
    b = build_model(fine, width=0.25, seed=3)
    assert b.num_blocks == blocks and b.arch == fine
    assert count_parameters(a) == count_parameters(b)
    assert all(isinstance(blk[-1], BasicBlock) for blk in b.blocks)
    assert sum(isinstance(m, BasicBlock) for m in b.blocks[0]) == 1
    per_stage = blocks // 4
    sa, sb = a.state_dict(), b.state_dict()
    mapped = {fine_to_coarse_key(k, per_stage): v for k, v in sb.items()}
    assert set(mapped) == set(sa)
    for k, v in mapped.items():
        assert torch.equal(v, sa[k]), k
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a.eval()
    b.eval()
    with torch.no_grad():
        ya = a(x)
        yb = b(x)
        h = x
        for blk in b.blocks:
            h = blk(h)
        yh = b.head(h)
    assert torch.equal(ya, yb)
    assert torch.equal(yb, yh)


def test_specs_resnet18_fine() -> None:
    model = build_model("resnet18-fine", width=1.0)
    expected = [
        BlockSpec("layer1.0", 3, 64, 1),
        BlockSpec("layer1.1", 64, 64, 1),
        BlockSpec("layer2.0", 64, 128, 2),
        BlockSpec("layer2.1", 128, 128, 1),
        BlockSpec("layer3.0", 128, 256, 2),
        BlockSpec("layer3.1", 256, 256, 1),
        BlockSpec("layer4.0", 256, 512, 2),
        BlockSpec("layer4.1", 512, 512, 1),
    ]
    assert list(model.specs) == expected
    h = torch.zeros(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        for blk, spec in zip(model.blocks, model.specs, strict=True):
            out = blk(h)
            assert out.shape[1] == spec.out_channels and h.shape[1] == spec.in_channels
            assert h.shape[-1] // out.shape[-1] == spec.stride
            h = out


def test_output_modules_and_stage_models() -> None:
    model = build_model("resnet18-fine", width=0.125, seed=0)
    x = torch.randn(2, 3, 32, 32)
    for stage in range(model.num_blocks):
        if stage < model.num_blocks - 1:
            mod = build_output_module(model, stage)
            assert len(mod.convs) == 3 * (model.num_blocks - 1 - stage)
        sub = StageModel(model, stage, None if stage == model.num_blocks - 1 else build_output_module(model, stage))
        assert sub(x).shape == (2, 10)


def test_profl_on_fine_blocks() -> None:
    model = build_model("resnet18-fine", width=0.125, seed=0)
    basic = build_basic_layers(model, seed=1)
    x = torch.randn(2, 3, 32, 32)
    for k in range(model.num_blocks):
        assert ShrinkModel(model, k, basic)(x).shape == (2, 10)
    schedule = ProFLSchedule(model.num_blocks)
    assert len(schedule.steps()) == 2 * model.num_blocks
    for k in (0, 3, model.num_blocks - 1):
        shrink = ShrinkModel(model, k, basic)
        trained = sum(p.numel() for p in shrink.parameters() if p.requires_grad)
        others = sum(count_parameters(basic[str(j)]) for j in range(model.num_blocks) if j != k)
        assert trained == count_parameters(model.blocks[k]) + others + count_parameters(basic["head"])
    step0 = shrink_memory("resnet18-fine", 10, 1.0, 0, 64, (3, 32, 32))
    assert step0.total == pytest.approx(stage_memory(build_model("resnet18-fine", seed=0), 0, 64).total, rel=1e-6)


def test_memory_and_flops_models() -> None:
    coarse = build_model("resnet18", width=1.0, seed=0)
    fine = build_model("resnet18-fine", width=1.0, seed=0)
    full_c = stage_memory(coarse, None, 64).total
    full_f = stage_memory(fine, None, 64).total
    assert full_f == pytest.approx(full_c, rel=1e-9)
    stages_f = [stage_memory(fine, s, 64).total for s in range(fine.num_blocks)]
    assert max(stages_f) == stages_f[0] < full_f
    assert stages_f[-1] < stage_memory(coarse, coarse.num_blocks - 1, 64).total
    assert stage_flops(fine, None).total == pytest.approx(stage_flops(coarse, None).total)
    per_stage = [stage_flops(fine, s) for s in range(fine.num_blocks)]
    assert all(f.backward < stage_flops(fine, None).backward for f in per_stage)


def test_fedll_layers_are_the_basic_blocks() -> None:
    for coarse, fine, blocks in PAIRS:
        model = build_model(fine, width=0.0625)
        layers = model_layers(model)
        assert len(layers) == blocks == len(model_layers(build_model(coarse, width=0.0625)))
        assert layers[0].members == ((0, "0"), (0, "1"), (0, "2"), (0, "3"))
        assert [lay.members for lay in layers[1:]] == [((b, "0"),) for b in range(1, blocks)]


def test_heterofl_and_depthfl() -> None:
    glob = build_heterofl_model("resnet18-fine", 10, 0.25, seed=0)
    arrays = {k: v.detach().clone().numpy() for k, v in glob.state_dict().items()}
    shapes = submodel_shapes("resnet18-fine", 10, 0.125)
    sliced = slice_arrays(arrays, shapes)
    sub = build_heterofl_model("resnet18-fine", 10, 0.125, scaler_rate=0.5)
    sub.load_state_dict({k: torch.from_numpy(v) for k, v in sliced.items()})
    assert sub(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    depth_module, full = build_depthfl("resnet18-fine", 10, 0.125, 3, seed=0)
    assert full.num_blocks == 8
    outs = depth_module(torch.randn(2, 3, 32, 32))
    assert len(outs) == 3
    assert required_mb("resnet18-fine", 10, 1.0, 3, 64) < required_mb("resnet18-fine", 10, 1.0, 8, 64)
