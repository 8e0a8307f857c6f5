"""common.sgd.SGD: torch.optim.SGD's update bit for bit, step hooks, and no torch._dynamo import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.sgd import SGD, register_step_post_hook

ROOT = Path(__file__).resolve().parents[1]


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _train(net: nn.Module, make_opt, steps: int, frozen_bias: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    opt = make_opt([p for p in net.parameters() if p.requires_grad])
    for step in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=gen)
        y = torch.randint(0, 5, (8,), generator=gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        if frozen_bias and step % 2:
            net[4].bias.grad = None  # a parameter without gradient in this step
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.9, 5e-4), (0.9, 0.0), (0.0, 5e-4), (0.0, 0.0)])
def test_updates_are_bit_identical_to_torch_optim_sgd(momentum: float, weight_decay: float) -> None:
    ours = _train(_net(0), lambda ps: SGD(ps, lr=0.05, momentum=momentum, weight_decay=weight_decay), steps=6)
    ref = _train(
        _net(0), lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=momentum, weight_decay=weight_decay), steps=6
    )
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))
    start = [p.detach() for p in _net(0).parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(ours, start, strict=True))  # it did train


def test_parameters_without_gradient_are_skipped_like_torch() -> None:
    ours = _train(_net(2), lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3), steps=5, frozen_bias=True)
    ref = _train(
        _net(2), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3), steps=5, frozen_bias=True
    )
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))


def test_step_hooks_see_every_step_until_removed() -> None:
    seen: list[object] = []
    handle = register_step_post_hook(lambda opt, args, kwargs: seen.append(opt))
    try:
        opt = _train(_net(3), lambda ps: SGD(ps, lr=0.01), steps=3)
    finally:
        handle.remove()
    assert len(seen) == 3 and all(isinstance(o, SGD) for o in seen)
    _train(_net(3), lambda ps: SGD(ps, lr=0.01), steps=2)
    assert len(seen) == 3
    assert opt  # parameters came back


@pytest.mark.parametrize(("kwargs", "name"), [({"lr": -0.1}, "lr"), ({"lr": 0.1, "momentum": -1}, "momentum")])
def test_bad_hyperparameters_are_named(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SGD(_net(0).parameters(), **kwargs)
    with pytest.raises(ValueError, match="no parameters"):
        SGD([], lr=0.1)


def test_local_training_does_not_import_the_compiler_stack() -> None:
    """train_local in a fresh process leaves torch._dynamo (and Triton) unimported: ~150 MB per process."""
    code = (
        "import sys, torch\n"
        "from common.models import build_model\n"
        "from common.training import train_local\n"
        "m = build_model('smallcnn', 10, 0.25)\n"
        "x = torch.randn(16, 3, 32, 32); y = torch.randint(0, 10, (16,))\n"
        "train_local(m, x, y, epochs=1, batch_size=8, lr=0.05)\n"
        "print(sorted(k for k in ('torch._dynamo', 'triton', 'torch._inductor') if k in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"
