"""The client's local monitor (SmartFreeze Sec. IV-C): loss statistics, output-layer gradient, speed.

Pure PyTorch, no Flower: the ClientApp calls these when it answers a ``query`` message.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.models import BlockModel
from common.sgd import SGD


@torch.no_grad()
def loss_statistics(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> tuple[float, float]:
    """Mean per-sample loss and mean of squared per-sample losses of ``module`` on ``(x, y)``.

    The second is the input of data importance |D_i| * sqrt(mean l^2) (Eq. 9).
    """
    if len(y) == 0:
        return 0.0, 0.0
    module.eval()
    total = 0.0
    total_sq = 0.0
    for i in range(0, len(y), batch_size):
        losses = F.cross_entropy(module(x[i : i + batch_size]), y[i : i + batch_size], reduction="none")
        total += float(losses.sum())
        total_sq += float((losses**2).sum())
    return total / len(y), total_sq / len(y)


def output_layer_gradient(
    model: BlockModel,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = 5,
    batch_size: int = 64,
    lr: float = 0.05,
    seed: int = 0,
) -> np.ndarray:
    """Gradient of the output layer after briefly training only that layer (input of Eq. 8).

    Features come from the frozen blocks (no autograd); a copy of the head's linear layer is
    trained for ``steps`` SGD steps on local batches and the summed gradient (the update divided
    by the learning rate) is returned flattened (weight then bias). The model is not modified.
    """
    linear = next(m for m in reversed(list(model.head.modules())) if isinstance(m, nn.Linear))
    layer = nn.Linear(linear.in_features, linear.out_features)
    layer.load_state_dict(linear.state_dict())
    pre_linear = nn.Sequential(*[m for m in model.head.children() if m is not linear])
    start = torch.cat([layer.weight.detach().flatten(), layer.bias.detach().flatten()]).clone()
    opt = SGD(layer.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (min(batch_size, len(y)),), generator=gen)
        with torch.no_grad():
            h = x[idx]
            for block in model.blocks:
                h = block(h)
            feats = pre_linear(h)
        loss = F.cross_entropy(layer(feats), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = torch.cat([layer.weight.detach().flatten(), layer.bias.detach().flatten()])
    return ((start - end) / lr).numpy().astype(np.float32)


def measure_throughput(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int = 3) -> float:
    """Measured training throughput in samples per second (a few real SGD steps; state restored)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params or len(y) == 0:
        return 0.0
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    opt = SGD(params, lr=0.0)
    module.train()
    n = min(batch_size, len(y))
    seen = 0
    start = time.perf_counter()
    for step in range(steps + 1):
        if step == 1:  # the first step warms up allocators and kernels
            start = time.perf_counter()
            seen = 0
        loss = F.cross_entropy(module(x[:n]), y[:n])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += n
    seconds = time.perf_counter() - start
    module.load_state_dict(saved)
    return seen / seconds if seconds > 0 else 0.0


def largest_fitting_batch(need_mb: Callable[[int], float], budget_mb: float, batch_size: int) -> int:
    """The largest batch b in [1, ``batch_size``] with ``need_mb(b)`` <= ``budget_mb`` (MB); 1 if none fits.

    ``need_mb`` is the memory model at batch b (Eq. 4: parameters and optimiser state are fixed,
    activations grow with b), non-decreasing in b, so a bisection finds it in log2(batch_size)
    evaluations. The monitor's query trains the full model to measure speed and the output-layer
    gradient (Eq. 8); under an OS memory limit that the full model exceeds at the training batch,
    it runs at this batch instead of being killed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    if need_mb(batch_size) <= budget_mb:
        return batch_size
    lo, hi = 1, batch_size  # invariant: need_mb(hi) > budget_mb
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need_mb(mid) <= budget_mb else (lo, mid)
    return lo
