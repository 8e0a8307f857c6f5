"""SGD with momentum and weight decay, without ``torch.optim`` (no ``torch._dynamo`` import).

``torch.optim.SGD`` imports the compiler stack on first use: ``Optimizer.add_param_group`` is
wrapped by ``torch._disable_dynamo``, which imports ``torch._dynamo`` and with it Triton. In this
torch build that costs every training process about 150 MB of resident memory and 3 s of start-up
(measured in ``BENCHMARKS.md``), paid by each simulated ClientApp actor and by every
``flwr-clientapp`` process a SuperNode starts for a train message on a device. :class:`SGD` performs
exactly the update of ``torch.optim.SGD``'s single-tensor path (the one PyTorch takes for CPU
tensors; ``dampening=0``, ``nesterov=False``, ``maximize=False``), operation for operation, so the
trained parameters are bit-identical (``tests/test_sgd.py``), and imports nothing beyond ``torch``.

After every step it calls the hooks of :func:`register_step_post_hook` (the counterpart of
``torch.optim.optimizer.register_optimizer_step_post_hook``, which :func:`common.memory_meter.track_peak`
listens to as well), so step counters see its steps like those of a ``torch.optim`` optimizer.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch

StepHook = Callable[[Any, tuple[Any, ...], dict[str, Any]], None]
_step_hooks: OrderedDict[int, StepHook] = OrderedDict()
_hook_ids = itertools.count()


class _HookHandle:
    """Removes a hook registered with :func:`register_step_post_hook`."""

    def __init__(self, key: int) -> None:
        self._key = key

    def remove(self) -> None:
        _step_hooks.pop(self._key, None)


def register_step_post_hook(hook: StepHook) -> _HookHandle:
    """Call ``hook(optimizer, args, kwargs)`` after every :meth:`SGD.step` in this process."""
    key = next(_hook_ids)
    _step_hooks[key] = hook
    return _HookHandle(key)


class SGD:
    """Stochastic gradient descent with (heavy-ball) momentum and L2 weight decay.

    Per parameter ``p`` with gradient ``g`` (PyTorch's SGD, ``dampening=0``, no Nesterov):
    ``d = g + weight_decay * p``; ``b = d`` at the first step, else ``b = momentum * b + d``;
    ``p -= lr * b`` (``b = d`` without momentum). Parameters whose gradient is ``None`` are skipped
    and keep their momentum buffer. Memory: one momentum buffer per parameter (with momentum) and,
    with weight decay, one gradient-sized temporary at a time, as ``common.memory`` models.
    """

    def __init__(
        self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        self.params: list[torch.Tensor] = list(params)
        if not self.params:
            raise ValueError("SGD: no parameters to optimise")
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not isinstance(value, int | float) or value < 0 or value != value:
                raise ValueError(f"SGD: {name} must be a number >= 0, got {value!r}")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (``set_to_none``) or zero every parameter's gradient."""
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient, then the step post hooks."""
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            if self.weight_decay != 0:
                grad = grad.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self.momentum_buffers[i]
                if buf is None:
                    buf = grad.detach().clone()
                    self.momentum_buffers[i] = buf
                else:
                    buf.mul_(self.momentum).add_(grad, alpha=1.0)
                grad = buf
            p.add_(grad, alpha=-self.lr)
        for hook in tuple(_step_hooks.values()):
            hook(self, (), {})
