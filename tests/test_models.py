"""Models in blocks: blocks + head reproduce forward exactly; known parameter counts."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.models import MODEL_NAMES, build_model, count_parameters, scaled


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("width", [1.0, 0.25])
def test_blocks_then_head_equals_forward(name: str, width: float) -> None:
    if width == 1.0 and name in ("vgg16bn", "resnet18", "resnet18-fine"):
        width = 0.5  # same code path, faster
    model = build_model(name, num_classes=10, width=width, seed=1).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
        h = x
        for block in model.blocks:
            h = block(h)
        staged = model.head(h)
    assert full.shape == (3, 10)
    assert torch.equal(full, staged)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_block_specs_match_real_shapes(name: str) -> None:
    model = build_model(name, num_classes=7, width=0.25, seed=0).eval()
    h = torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        for block, spec in zip(model.blocks, model.specs, strict=True):
            out = block(h)
            assert spec.in_channels == h.shape[1]
            assert spec.out_channels == out.shape[1]
            assert h.shape[-1] // spec.stride == out.shape[-1]
            h = out
        assert model.head(h).shape == (2, 7)
    assert model.feature_dim == model.specs[-1].out_channels


@pytest.mark.parametrize(
    ("name", "expected", "blocks"),
    [
        ("resnet18", 11_173_962, 4),  # CIFAR ResNet18 (BasicBlock, 3x3 stem): ~11.17 M
        ("resnet10", 4_903_242, 4),
        ("vgg11bn", 9_231_114, 5),
        ("vgg16bn", 14_728_266, 5),
    ],
)
def test_parameter_counts_match_known_architectures(name: str, expected: int, blocks: int) -> None:
    model = build_model(name, num_classes=10, width=1.0)
    assert count_parameters(model) == expected
    assert model.num_blocks == blocks


def test_width_scales_channels_and_parameters() -> None:
    full = build_model("resnet10", width=1.0)
    quarter = build_model("resnet10", width=0.25)
    assert [s.out_channels for s in quarter.specs] == [16, 32, 64, 128]
    assert count_parameters(quarter) < count_parameters(full) / 10
    assert scaled(3, 0.1) == 1


def test_seeded_init_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("smallcnn", seed=5)
    after = torch.rand(1)
    b = build_model("smallcnn", seed=5)
    c = build_model("smallcnn", seed=6)
    assert torch.equal(before, after)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_block_keys_are_prefixed_by_block_index() -> None:
    model = build_model("resnet10", width=0.25)
    keys = list(model.state_dict())
    assert all(k.startswith(("blocks.0.", "blocks.1.", "blocks.2.", "blocks.3.", "head.")) for k in keys)
    assert any(k.startswith("blocks.3.") for k in keys)


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(ValueError, match="valid choices: smallcnn, resnet10"):
        build_model("resnet50")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_torch_free_zoo_lists_every_model_with_its_blocks_and_fedll_layers(name: str) -> None:
    from common.fedll import num_layers
    from common.models import _BUILDERS
    from common.zoo import FEDLL_LAYERS, MODEL_BLOCKS

    assert tuple(_BUILDERS) == MODEL_NAMES  # the torch-free list names exactly the models built
    assert MODEL_BLOCKS[name] == build_model(name, width=0.25).num_blocks
    assert FEDLL_LAYERS[name] == num_layers(name)


def test_config_validation_imports_no_torch() -> None:
    """run.sh's preflight validates the config before anything starts: without torch (~5 s, ~480 MB)."""
    code = "import sys, common.preflight; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"
