"""Stage FLOPs and completion-time model (SmartFreeze Eq. 5-7), from real layer shapes.

FLOPs are counted per sample with forward hooks on the layers that do the arithmetic: a conv
costs 2 * C_in/groups * k_h * k_w * C_out * H_out * W_out (multiply and add), a linear layer
2 * in * out per token (once per sample on (N, D) inputs), BatchNorm 4 per output element
(normalise, scale, shift), ReLU/pooling 1 per output element; a layer with a
``flops_per_sample(out)`` method (the ViT's attention products) states its own. Backward of a
trained layer costs twice its forward (gradient with respect to the input and to the weights,
the usual estimate); frozen layers have no backward (Eq. 5).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from common.models import BlockModel, build_model
from common.output_modules import build_output_module


def _layer_flops(module: nn.Module, out: torch.Tensor) -> float:
    custom = getattr(module, "flops_per_sample", None)
    if callable(custom):  # a parameter-free leaf that states its own cost (the ViT's attention core)
        return float(custom(out))
    per_sample = out[0].numel() if out.dim() > 0 else 1
    if isinstance(module, nn.Conv2d):
        k_h, k_w = module.kernel_size
        return 2.0 * module.in_channels / module.groups * k_h * k_w * per_sample
    if isinstance(module, nn.Linear):  # once per token on (N, T, D) inputs (the ViT), once on (N, D)
        return 2.0 * module.in_features * per_sample
    if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm)):
        return 4.0 * per_sample
    if isinstance(module, (nn.ReLU, nn.GELU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return 1.0 * per_sample
    return 0.0


def forward_flops(module: nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Forward FLOPs per sample of ``module`` on input ``x`` (batch of 1), and its output."""
    total = 0.0

    def hook(mod: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += _layer_flops(mod, out)

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        was_training = module.training
        module.eval()
        with torch.no_grad():
            y = module(x)
        module.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return total, y


@dataclass(frozen=True)
class StageFlops:
    """Per-sample FLOPs of one training step: forward of everything, backward of the trained part."""

    forward: float
    backward: float

    @property
    def total(self) -> float:
        """Forward + backward FLOPs per training sample (Eq. 5)."""
        return self.forward + self.backward


def stage_flops(model: BlockModel, stage: int | None, input_shape: Sequence[int] = (3, 32, 32)) -> StageFlops:
    """FLOPs per training sample of stage ``stage`` (0-based), or of the full model if ``None``.

    Stage k: forward through blocks 0..k and output module k (the head at the last stage);
    backward through block k and the output module only (Eq. 5).
    """
    return _stage_flops(model.arch, model.num_classes, model.width, stage, tuple(input_shape))


@functools.lru_cache(maxsize=128)
def _stage_flops(
    arch: str, num_classes: int, width: float, stage: int | None, input_shape: tuple[int, ...]
) -> StageFlops:

    model = build_model(arch, num_classes, width, seed=0)
    h = torch.zeros(1, *input_shape)
    block_flops = []
    for block in model.blocks:
        f, h = forward_flops(block, h)
        block_flops.append(f)
    head_flops, _ = forward_flops(model.head, h)
    last = model.num_blocks - 1
    if stage is None:
        fwd = sum(block_flops) + head_flops
        return StageFlops(fwd, 2.0 * fwd)
    if not 0 <= stage <= last:
        raise ValueError(f"stage must be in 0..{last} or None, got {stage}")
    if stage == last:
        tail = head_flops
    else:
        h = torch.zeros(1, *input_shape)
        with torch.no_grad():
            for block in model.blocks[: stage + 1]:
                h = block.eval()(h)
        tail, _ = forward_flops(build_output_module(model, stage), h)
    fwd = sum(block_flops[: stage + 1]) + tail
    return StageFlops(fwd, 2.0 * (block_flops[stage] + tail))


def completion_time(flops_per_sample: float, num_samples: int, epochs: int, speed_flops: float) -> float:
    """Local training time in seconds (Eq. 6): FLOPs per sample x samples x epochs / speed (FLOP/s)."""
    if speed_flops <= 0:
        raise ValueError(f"device speed must be > 0 FLOP/s, got {speed_flops}")
    return flops_per_sample * num_samples * epochs / speed_flops


def round_time(times: Sequence[float]) -> float:
    """Synchronous round time in seconds (Eq. 7): the slowest selected client's completion time."""
    return max(times, default=0.0)
