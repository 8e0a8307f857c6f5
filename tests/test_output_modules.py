"""Output modules and stage sub-models: shapes, freezing, what is uploaded."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from client_app.handlers import _build
from common.config import parse_run_config
from common.models import MODEL_NAMES, build_model
from common.output_modules import StageModel, build_output_module, build_output_modules, stage_prefixes
from common.training import state_to_numpy


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_module_shapes_for_every_block(name: str) -> None:
    model = build_model(name, num_classes=10, width=0.25, seed=0).eval()
    h = torch.randn(2, 3, 32, 32)
    feats = []
    with torch.no_grad():
        for block in model.blocks:
            h = block(h)
            feats.append(h)
        for k in range(model.num_blocks - 1):
            om = build_output_module(model, k).eval()
            convs = [m for m in om.convs if isinstance(m, torch.nn.Conv2d)]
            later = model.specs[k + 1 :]
            assert len(convs) == len(later)  # one conv per later block
            assert [c.out_channels for c in convs] == [s.out_channels for s in later]
            assert [c.stride[0] for c in convs] == [s.stride for s in later]
            assert om.convs(feats[k]).shape == feats[-1].shape  # stands in for the later blocks
            assert om(feats[k]).shape == (2, 10)
    with pytest.raises(ValueError, match="output modules exist for stages"):
        build_output_module(model, model.num_blocks - 1)


def _stage(name: str, stage: int) -> StageModel:
    model = build_model(name, num_classes=10, width=0.25, seed=0)
    oms = build_output_modules(model, seed=1)
    return StageModel(model, stage, oms[str(stage)] if stage < model.num_blocks - 1 else None)


@pytest.mark.parametrize("name", ["resnet10", "vgg11bn", "smallcnn"])
def test_frozen_blocks_get_no_gradient_and_record_no_graph(name: str) -> None:
    for stage in range(build_model(name, width=0.25).num_blocks):
        sub = _stage(name, stage).train()
        x = torch.randn(4, 3, 32, 32)
        frozen_out = sub.frozen_forward(x)
        assert frozen_out.grad_fn is None and not frozen_out.requires_grad  # no autograd graph
        loss = sub(x).sum()
        loss.backward()
        for i, block in enumerate(sub.blocks):
            for p in block.parameters():
                if i < stage:
                    assert p.grad is None and not p.requires_grad
                else:
                    assert p.grad is not None
        for block in sub.blocks[:stage]:
            assert not block.training  # BN of the frozen prefix in eval mode


def test_frozen_bn_statistics_do_not_change_in_training() -> None:
    sub = _stage("resnet10", 2).train()
    before = {k: v.clone() for k, v in sub.state_dict().items() if k.startswith(("blocks.0.", "blocks.1."))}
    sub(torch.randn(8, 3, 32, 32) * 3 + 1)
    after = sub.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_stage_keys_are_global_keys() -> None:
    model = build_model("resnet10", width=0.25)
    global_keys = set(model.state_dict())
    for stage in range(4):
        keys = set(_stage("resnet10", stage).state_dict())
        assert {k for k in keys if not k.startswith("outmod.")} <= global_keys
    assert stage_prefixes(1, 4) == ("blocks.1.", "outmod.1.")
    assert stage_prefixes(3, 4) == ("blocks.3.", "head.")


def test_client_uploads_only_active_block_and_output_module() -> None:
    cfg = parse_run_config({"model": "resnet10"})
    model = build_model("resnet10", 10, 0.25, seed=0)
    oms = build_output_modules(model, seed=1)
    full = {**state_to_numpy(model), **{f"outmod.{k}": v for k, v in state_to_numpy(oms).items()}}
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    stage = 2
    sent = {k: v for k, v in full.items() if k.startswith(("blocks.0.", "blocks.1.", *stage_prefixes(stage, 4)))}
    module, prefixes = _build(cfg, 10, ConfigRecord({"stage": stage}), sent, context)
    upload = state_to_numpy(module, prefixes)
    assert upload and all(k.startswith(("blocks.2.", "outmod.2.")) for k in upload)
    assert {k for k in full if k.startswith(("blocks.2.", "outmod.2."))} == set(upload)
    # next round the frozen blocks come from the node's store: the message carries only the active part
    active_only = {k: v for k, v in full.items() if k.startswith(stage_prefixes(stage, 4))}
    module, _ = _build(cfg, 10, ConfigRecord({"stage": stage}), active_only, context)
    np.testing.assert_array_equal(state_to_numpy(module)["blocks.0.0.weight"], full["blocks.0.0.weight"])
    # a node that holds nothing cannot build the stage from the active part alone
    with pytest.raises(KeyError, match=r"frozen block\(s\) \['0', '1'\]"):
        _build(cfg, 10, ConfigRecord({"stage": stage}), active_only, Context(1, 2, {}, RecordDict(), {}))


@pytest.mark.parametrize("name", ["resnet10", "vgg11bn", "smallcnn"])
def test_micro_batched_frozen_forward_equals_the_single_batch_one(name: str) -> None:
    model = build_model(name, num_classes=10, width=0.25, seed=0)
    x = torch.randn(11, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for stage in range(1, model.num_blocks):
        sub = _stage(name, stage).train()
        sub.frozen_chunk = 0
        whole = sub.frozen_forward(x)
        for chunk in (1, 4, 10, 11):
            sub.frozen_chunk = chunk
            parts = sub.frozen_forward(x)
            assert parts.shape == whole.shape and parts.is_contiguous()
            assert parts.grad_fn is None and not parts.requires_grad
            torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-6)
        assert all(not block.training for block in sub.blocks[:stage])  # running statistics, not batch ones
        x_cl = x.contiguous(memory_format=torch.channels_last)
        sub.frozen_chunk = 4
        parts = sub.frozen_forward(x_cl)
        sub.frozen_chunk = 0
        assert parts.stride() == sub.frozen_forward(x_cl).stride()  # the layout of the single-batch output
        torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-6)


def test_frozen_chunk_default_setter_and_training_with_it() -> None:
    from common.output_modules import DEFAULT_FROZEN_CHUNK
    from common.training import train_local

    assert DEFAULT_FROZEN_CHUNK == 16
    assert _stage("resnet10", 2).frozen_chunk == DEFAULT_FROZEN_CHUNK
    model = build_model("resnet10", num_classes=10, width=0.25, seed=0)
    assert StageModel(model, 3, None, frozen_chunk=0).frozen_chunk == 0
    sub = _stage("resnet10", 2)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="frozen_chunk"):
            sub.frozen_chunk = bad
    assert sub.frozen_chunk == DEFAULT_FROZEN_CHUNK
    assert "frozen_chunk" not in "".join(sub.state_dict())  # not part of the uploaded state
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 3, 32, 32, generator=gen), torch.randint(0, 10, (24,), generator=gen)
    results = {}
    for chunk in (0, 5):
        sub = _stage("resnet10", 2)
        sub.frozen_chunk = chunk
        results[chunk] = (train_local(sub, x, y, epochs=2, batch_size=12, lr=0.05).loss, sub.state_dict())
    assert results[0][0] == pytest.approx(results[5][0], rel=1e-5)
    for key, value in results[0][1].items():
        torch.testing.assert_close(results[5][1][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_stage_model_drops_stale_gradients_of_blocks_trained_in_earlier_stages() -> None:
    """A client reuses one model skeleton: block 0's gradients from stage 1 must not stay alive in stage 2."""
    model = build_model("smallcnn", 10, 0.25, seed=0)
    first = StageModel(model, 0, build_output_module(model, 0))
    first(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.blocks[0].parameters())
    StageModel(model, 1, build_output_module(model, 1))
    assert all(p.grad is None for p in model.blocks[0].parameters())
