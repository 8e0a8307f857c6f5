"""FLOPs and time model (Eq. 5-7)."""

import pytest
import torch
from torch import nn

from common.flops import completion_time, forward_flops, round_time, stage_flops
from common.models import build_model


def test_conv_and_linear_flops_from_shapes() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    f, y = forward_flops(conv, torch.zeros(1, 3, 16, 16))
    assert y.shape == (1, 8, 16, 16)
    assert f == 2 * 3 * 9 * 8 * 16 * 16
    f, _ = forward_flops(nn.Linear(10, 4), torch.zeros(1, 10))
    assert f == 80


def test_resnet18_forward_is_about_0_56_gmacs() -> None:
    full = stage_flops(build_model("resnet18", 10, 1.0), None)
    assert 1.05e9 < full.forward < 1.2e9  # ~0.56 GMACs for CIFAR ResNet18, + BN/ReLU
    assert full.backward == pytest.approx(2 * full.forward)


@pytest.mark.parametrize("name", ["resnet10", "vgg11bn", "smallcnn"])
def test_every_stage_is_cheaper_than_full_training(name: str) -> None:
    model = build_model(name, 10, 0.25)
    full = stage_flops(model, None).total
    stages = [stage_flops(model, k) for k in range(model.num_blocks)]
    assert all(0 < s.total < full for s in stages)
    assert all(s.backward < 2 * s.forward for s in stages[1:])  # frozen prefix has no backward
    assert stage_flops(model, 0).total == stages[0].total  # cached, deterministic


def test_completion_and_round_time() -> None:
    assert completion_time(1e6, 500, 2, 1e9) == pytest.approx(1.0)
    assert round_time([0.5, 2.0, 1.0]) == 2.0 and round_time([]) == 0.0
    with pytest.raises(ValueError, match="speed must be > 0"):
        completion_time(1e6, 1, 1, 0.0)
