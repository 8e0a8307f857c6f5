"""Local training and evaluation loops, and model-state conversion (no Flower).

Used by the ClientApp for local training/evaluation and by the ServerApp for centralised
evaluation; the plain-PyTorch reference loop in ``bench/`` calls the same functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.sgd import SGD


@dataclass(frozen=True)
class TrainResult:
    """What one local training run produced: mean loss, sample count, wall time (s)."""

    loss: float
    num_examples: int
    steps: int
    seconds: float
    per_sample_sq_loss_mean: float

    @property
    def samples_per_second(self) -> float:
        """Training throughput in samples per second."""
        return self.num_examples / self.seconds if self.seconds > 0 else 0.0


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
) -> TrainResult:
    """SGD on ``(x, y)`` for ``epochs`` epochs with seeded shuffling.

    The optimiser is :class:`common.sgd.SGD` (``torch.optim.SGD``'s update, bit for bit, without its
    import of ``torch._dynamo``). Only parameters with ``requires_grad`` are optimised. A model with a
    ``training_loss(outputs, targets) -> per-sample losses`` method (e.g. DepthFL's multi-exit model)
    trains on that loss; otherwise cross-entropy. Returns the mean training loss over
    all steps (per sample) and the mean of squared per-sample losses (input of SmartFreeze
    Eq. 9, data importance).

    Each step frees the previous step's gradients (``zero_grad(set_to_none=True)``) before the
    forward pass, so that they are not alive while the forward's activations are allocated: the
    new gradients are born in the backward pass, as the activations are being released. The update
    is the same as zeroing them between forward and backward (``common.memory`` models this order).
    """
    loss_fn = getattr(model, "training_loss", None)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_local: the model has no trainable parameters")
    opt = SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = len(y)
    model.train()
    total_loss = 0.0
    total_sq = 0.0
    seen = 0
    steps = 0
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2 and n >= 2:
                continue
            opt.zero_grad(set_to_none=True)
            out = model(x[idx])
            losses = loss_fn(out, y[idx]) if loss_fn is not None else F.cross_entropy(out, y[idx], reduction="none")
            loss = losses.mean()
            loss.backward()
            opt.step()
            with torch.no_grad():
                total_loss += float(losses.sum())
                total_sq += float((losses**2).sum())
            seen += len(idx)
            steps += 1
    seconds = time.perf_counter() - start
    if seen == 0:
        raise ValueError(f"train_local: no training step ran ({n} samples, batch size {batch_size})")
    return TrainResult(total_loss / seen, seen, steps, seconds, total_sq / seen)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy (fraction in [0, 1]) of ``model`` on ``(x, y)``."""
    if len(y) == 0:
        return float("nan"), float("nan")
    model.eval()
    loss_sum = 0.0
    correct = 0
    for i in range(0, len(y), batch_size):
        out = model(x[i : i + batch_size])
        loss_sum += float(F.cross_entropy(out, y[i : i + batch_size], reduction="sum"))
        correct += int((out.argmax(dim=1) == y[i : i + batch_size]).sum())
    return loss_sum / len(y), correct / len(y)


def state_to_numpy(module: nn.Module, prefixes: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Copy of ``module``'s state (parameters and buffers) as numpy arrays.

    The arrays are copies, never views of live tensors, so that training another client in
    the same process cannot change them. With ``prefixes`` only keys starting with one of them.
    """
    return {
        k: v.detach().cpu().numpy().copy()
        for k, v in module.state_dict().items()
        if prefixes is None or k.startswith(prefixes)
    }


def load_numpy(module: nn.Module, arrays: dict[str, np.ndarray], strict: bool = True) -> None:
    """Load numpy ``arrays`` into ``module``'s state, checking keys and shapes.

    With ``strict=False`` the arrays may cover a subset of the state; unknown keys and shape
    mismatches are always errors naming the key.
    """
    state = module.state_dict()
    unknown = sorted(set(arrays) - set(state))
    if unknown:
        raise KeyError(f"arrays hold keys the model does not have: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    if strict:
        missing = sorted(set(state) - set(arrays))
        if missing:
            raise KeyError(f"arrays miss model keys: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for k, a in arrays.items():
        if a.size == 1 and state[k].numel() == 1:
            a = a.reshape(tuple(state[k].shape))  # scalar buffers may arrive as shape (1,)
        if tuple(a.shape) != tuple(state[k].shape):
            raise ValueError(f"array {k!r} has shape {tuple(a.shape)}, model expects {tuple(state[k].shape)}")
        state[k].copy_(torch.as_tensor(a, dtype=state[k].dtype))


def set_torch_threads(num_threads: int) -> None:
    """Match torch's intra-op threads to the CPUs given to this process (at least 1)."""
    num_threads = max(1, int(num_threads))
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
