"""Training-memory model of a progressive stage (SmartFreeze Eq. 4); the real peak is :mod:`common.memory_meter`.

All sizes are in MB = 2**20 bytes.

Model (:func:`stage_memory`)
    SmartFreeze (Sec. IV-C1, Eq. 4) models the memory of stage k as twice the activations generated
    within the active block (stored for backward, plus their gradients), the memory of the block
    parameters, the optimizer's memory, and the largest activation of the forward pass through the
    frozen blocks (which store nothing for backward). :func:`stage_memory` computes every term from
    real tensor shapes: it replays one training step of the stage sub-model (frozen forward,
    trained forward, loss, backward) on ``meta`` tensors (shapes only: no data, no compute, the
    caller's model untouched) under a dispatch mode that follows the lifetime of every tensor the
    step creates, with ``saved_tensors_hooks`` recording what autograd saves for backward.
    Measured against the CPU allocator (``bench/memory.py``), two terms of Eq. 4 had to be refined
    (see :class:`MemoryBreakdown`): the activation term is the simulated peak of saved activations
    plus the activation gradients and kernel buffers in flight (twice the saved bytes overestimates it: the
    gradients of early layers are produced only after the saved tensors of later layers are freed),
    and the frozen term is the frozen forward's working set (a block input kept for the shortcut,
    layer input and output and convolution reorder buffers are live at once, not one tensor), here
    of one micro-batch of :attr:`~common.output_modules.StageModel.frozen_chunk` samples plus the
    frozen output. The frozen forward ends before the trained part starts, so the two are combined
    by a maximum. The replay follows ``train_local``'s loop order: the previous step's gradients
    are freed before the forward pass, so the parameter gradients are not alive during either
    forward and are born during the backward pass (they count in the trained part's peak as they
    appear), then live through the optimizer step.
    ``MemoryBreakdown.eq4_total`` keeps the paper's literal form for comparison.

Measurement: :mod:`common.memory_meter`.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from common.models import BlockModel
from common.output_modules import DEFAULT_FROZEN_CHUNK, StageModel, build_output_module

__all__ = [
    "MB",
    "MemoryBreakdown",
    "replay_step",
    "stage_memory",
]

MB = float(2**20)
"""Bytes per MB (2**20) used throughout."""

_CACHE_SIZE = 256
_cache: dict[tuple, MemoryBreakdown] = {}


@dataclass(frozen=True)
class MemoryBreakdown:
    """Modelled training memory of one stage (SmartFreeze Eq. 4), every field in MB (2**20 bytes).

    ``total = params_trainable + optimizer + params_frozen + buffers
    + max(activations, frozen_peak_activation, grads + step_transient)``: parameters and momentum
    buffers live through the whole step; ``train_local`` frees the previous step's gradients before
    the forward pass, so the gradients are transient too, born during the backward pass (part of
    ``activations`` as far as they exist at its peak) and alive in the optimizer step. The three
    transient terms belong to phases that do not overlap (frozen forward, trained forward/backward,
    optimizer step).
    """

    activations: float
    """Peak of the trained part's transient memory (Eq. 4 first term, in the paper twice the
    block's activations): saved-for-backward tensors (the active block's input, the input batch when
    it is saved, the output module's or head's activations, logits), plus during backward the
    activation gradients in flight, the kernels' reorder buffers and the parameter gradients
    produced so far (``grads_at_activation_peak`` of them). The maximum over the forward pass and
    the backward pass."""
    params_trainable: float
    """Parameters of the active block and of its output module (or the head at the last stage); of
    every block and the head for full-model training (Eq. 4: memory of the block parameters)."""
    grads: float
    """Gradients of the trainable parameters (same size as ``params_trainable``); alive from the
    backward pass through the optimizer step, freed before the next forward pass."""
    optimizer: float
    """Optimizer state: SGD momentum, one buffer per trainable parameter (Eq. 4: optimizer memory)."""
    params_frozen: float
    """Parameters of the frozen blocks ``0 .. k-1`` (no gradient, no optimizer state)."""
    frozen_peak_activation: float
    """Peak of live activation bytes during the frozen forward (Eq. 4 last term, there the single
    largest activation): the input batch, the block input kept for a residual shortcut, the current
    layer's input and output and the convolution's reorder buffers. 0 without frozen blocks."""
    buffers: float = 0.0
    """Non-parameter state of the stage sub-model (BatchNorm running statistics)."""
    step_transient: float = 0.0
    """Optimizer step, beyond the gradients: with weight decay, CPU SGD (single-tensor path) adds it
    to one gradient at a time into a new tensor, so the largest trainable parameter's size. 0
    without weight decay."""
    saved_activations: float = 0.0
    """Eq. 4's activations of the block: bytes saved for backward by the trained part at the end of
    the forward pass (distinct storages, parameters excluded). Informational; part of ``activations``."""
    frozen_largest_activation: float = 0.0
    """Eq. 4 literal last term: the largest single tensor of the frozen forward. Informational."""
    output_module: float = 0.0
    """Parameters of the output module (or the head): included in ``params_trainable``."""
    grads_at_activation_peak: float = 0.0
    """Parameter gradients alive at the trained part's peak (0 when it is in the forward pass):
    included in ``activations``. Informational."""

    @property
    def total(self) -> float:
        """Modelled peak memory of a training step in MB (refined Eq. 4, see the class docstring)."""
        persistent = self.params_trainable + self.optimizer + self.params_frozen + self.buffers
        return persistent + max(self.activations, self.frozen_peak_activation, self.grads + self.step_transient)

    @property
    def eq4_total(self) -> float:
        """The paper's Eq. 4 taken literally, MB: twice the saved activations + parameters + gradients
        + optimizer + frozen parameters + buffers + the largest frozen activation. For comparison."""
        return (
            2 * self.saved_activations
            + self.params_trainable
            + self.grads
            + self.optimizer
            + self.params_frozen
            + self.buffers
            + self.frozen_largest_activation
        )

    def as_dict(self) -> dict[str, float]:
        """Fields plus ``total`` and ``eq4_total``, in MB."""
        return {**asdict(self), "total": self.total, "eq4_total": self.eq4_total}


def _storage_key(t: torch.Tensor) -> int:
    """Identity of ``t``'s storage (shared by views and in-place results), valid on every device."""
    return t.untyped_storage()._cdata


def _tensor_bytes(t: Any) -> int:
    """Bytes of ``t``'s elements (0 for non-tensors)."""
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen.setdefault(_storage_key(t), t.untyped_storage().nbytes())
    return sum(seen.values())


def _simd_block() -> int:
    """Channel block of oneDNN's blocked layouts for fp32: 16 with AVX-512, else 8."""
    return 16 if "AVX512" in torch.backends.cpu.get_cpu_capability() else 8


_BLOCK = _simd_block()


def _blocked_bytes(t: Any) -> int:
    """Bytes of ``t`` in a blocked layout, channels (dim 1) padded to a multiple of the SIMD block."""
    if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[1] == 0:
        return _tensor_bytes(t)
    channels = t.shape[1]
    return _tensor_bytes(t) // channels * (-(-channels // _BLOCK) * _BLOCK)


def _conv_workspace(func: Any, args: tuple, out: Any) -> int:
    """Transient bytes a CPU convolution allocates inside its kernel (invisible to dispatch), at most.

    oneDNN converts tensors to blocked layouts (channels padded to the SIMD block) and back. Fitted to
    allocation traces of torch 2.14.1 on x86 (AVX2/AVX-512), to within a few percent of a conv's own
    peak for the channel counts of the zoo (``bench/memory.py`` validates whole steps):

    * forward: the blocked output, or the reordered input (when its channels fill whole blocks)
      plus the reordered weight, whichever is larger;
    * backward, relative to its outputs (input and weight gradients), the larger of its two phases.
      Input gradient: the blocked grad-output, weight and grad-input, then the blocked grad-input
      next to its plain copy (strided convolutions make one more plain copy of it). Weight
      gradient, next to the input gradient: the blocked grad-output, the reordered input (none for
      the few-channel first layer) and the blocked weight gradient, then that next to its plain copy.
    """
    if func is torch.ops.aten.convolution.default:
        inp, weight = args[0], args[1]
        reordered_input = _tensor_bytes(inp) if inp.shape[1] % _BLOCK == 0 else 0
        return max(reordered_input + _tensor_bytes(weight), _blocked_bytes(out))
    if func is torch.ops.aten.convolution_backward.default:
        grad_out, inp, weight, stride, output_mask = args[0], args[1], args[2], args[4], args[-1]
        blocked_grad_out, blocked_weight = _blocked_bytes(grad_out), _blocked_bytes(weight)
        grad_in = _tensor_bytes(inp) if output_mask[0] else 0
        grad_weight = _tensor_bytes(weight) if output_mask[1] else 0
        peak = 0
        if output_mask[0]:
            blocked_grad_in = _blocked_bytes(inp)
            strided_copy = grad_in if any(s > 1 for s in stride) else 0
            peak = max(blocked_grad_out + blocked_weight + blocked_grad_in, blocked_grad_in + grad_in + strided_copy)
        if output_mask[1]:
            reordered_input = _blocked_bytes(inp) if inp.shape[1] > 4 else 0
            peak = max(peak, grad_in + blocked_weight + max(blocked_grad_out + reordered_input, grad_weight))
        return max(0, peak - grad_in - grad_weight)
    return 0


class _LiveBytes(TorchDispatchMode):
    """Follows the live bytes of every tensor created under it (storage-deduplicated) and their peak.

    Storages of ``external`` tensors (parameters, buffers) are not counted; a storage stops counting
    when it is freed (a weakref finalizer on the storage). The peak includes convolution workspace.
    Storages are numbered in allocation order, so that :meth:`born_by_peak` tells which of them
    existed when the peak was reached.
    """

    def __init__(self, external: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self._external = {_storage_key(t) for t in external}
        self._live: dict[int, int] = {}
        self._born: dict[int, int] = {}
        self._count = 0
        self.current = 0
        self.peak = 0
        self.peak_count = 0
        self.largest = 0

    def reset_peak(self) -> None:
        """Start a new phase: peak = current live bytes, largest single tensor = 0."""
        self.peak = self.current
        self.peak_count = self._count
        self.largest = 0

    def born_by_peak(self, tensors: Iterable[torch.Tensor]) -> int:
        """Bytes of the distinct storages behind ``tensors`` allocated under the mode by the current
        phase's peak (still alive at the peak if none of them was freed since)."""
        storages = {_storage_key(t): t.untyped_storage().nbytes() for t in tensors}
        return sum(n for k, n in storages.items() if 0 < self._born.get(k, 0) <= self.peak_count)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._external or key in self._live:
                continue
            nbytes = storage.nbytes()
            self._count += 1
            self._live[key] = nbytes
            self._born[key] = self._count
            self.current += nbytes
            self.largest = max(self.largest, nbytes)
            weakref.finalize(storage, self._release, key)
        live = self.current + _conv_workspace(func, args, out)
        if live > self.peak:
            self.peak = live
            self.peak_count = self._count
        return out


def _meta_copy(model: nn.Module) -> nn.Module:
    """Copy of ``model`` whose parameters and buffers are ``meta`` tensors (no data copied, no grads)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _cache_key(model: BlockModel, *args: Any) -> tuple:
    """Structure of ``model`` (every parameter/buffer name, shape, dtype) plus the call arguments."""
    state = tuple((k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items())
    return (type(model).__name__, getattr(model, "arch", ""), state, *args)


def stage_memory(
    model: BlockModel,
    stage: int | None,
    batch_size: int,
    input_shape: tuple[int, ...] = (3, 32, 32),
    momentum: bool = True,
    weight_decay: bool = True,
    *,
    frozen_chunk: int = DEFAULT_FROZEN_CHUNK,
) -> MemoryBreakdown:
    """Modelled memory (MB, 2**20 bytes) of one SGD step of ``stage`` (0-based) or of the full model.

    ``stage=None`` is full-model training (every block and the head trained, nothing frozen).
    Otherwise the stage sub-model is :class:`StageModel` with the output module of
    :func:`build_output_module` (the head at the last stage), as the client trains it. One step is
    replayed on ``meta`` tensors of a copy of ``model`` (see the module docstring), so the model's
    parameters, buffers, gradients and the global RNG are untouched. About 40 ms for ResNet18 (the
    first call in a process also pays PyTorch's one-time meta-kernel import, 1-2 s); results are
    cached by model structure and arguments.

    ``momentum``: SGD keeps one momentum buffer per parameter. ``weight_decay``: the optimizer step
    allocates a gradient-sized temporary for one parameter at a time (CPU single-tensor SGD).
    ``frozen_chunk``: :attr:`StageModel.frozen_chunk` of the stage sub-model (samples per
    micro-batch of the frozen forward, 0 = whole batch); the client's default unless it sets another.
    """
    if stage is not None and not 0 <= stage < model.num_blocks:
        raise ValueError(f"stage must be None or in 0..{model.num_blocks - 1}, got {stage}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if frozen_chunk < 0:
        raise ValueError(f"frozen_chunk must be >= 0 (0 = no chunking), got {frozen_chunk}")
    if stage is None or stage == 0:
        frozen_chunk = 0  # nothing frozen: the chunk size does not matter
    key = _cache_key(model, stage, batch_size, tuple(input_shape), momentum, weight_decay, frozen_chunk)
    if key not in _cache:
        if len(_cache) >= _CACHE_SIZE:
            _cache.pop(next(iter(_cache)))
        _cache[key] = _simulate(model, stage, batch_size, tuple(input_shape), momentum, weight_decay, frozen_chunk)
    return _cache[key]


def _simulate(
    model: BlockModel,
    stage: int | None,
    batch_size: int,
    input_shape: tuple[int, ...],
    momentum: bool,
    weight_decay: bool,
    frozen_chunk: int,
) -> MemoryBreakdown:
    """Replay one training step of the stage sub-model on meta tensors; see :func:`stage_memory`.

    As in ``train_local``, no gradient exists when the forward pass starts; the backward pass
    creates them, so its peak includes those produced by then.
    """
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        meta = _meta_copy(model)
        meta.requires_grad_(True)
        if stage is None:
            net: nn.Module = meta
            active: nn.Module = meta.blocks[0]
            tail: nn.Module | None = meta.head
            frozen: list[nn.Module] = []
        else:
            last = meta.num_blocks - 1
            outmod = None if stage == last else build_output_module(meta, stage)
            net = StageModel(meta, stage, outmod, frozen_chunk=frozen_chunk)
            active = meta.blocks[stage]
            tail = outmod if outmod is not None else meta.head
            frozen = list(meta.blocks[:stage])
    return replay_step(net, active, tail, frozen, batch_size, input_shape, momentum, weight_decay)


def replay_step(
    net: nn.Module,
    active: nn.Module,
    tail: nn.Module | None,
    frozen: list[nn.Module],
    batch_size: int,
    input_shape: tuple[int, ...],
    momentum: bool = True,
    weight_decay: bool = True,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> MemoryBreakdown:
    """Modelled memory (MB) of one SGD step of any sub-model ``net`` built on ``meta`` tensors.

    The generic part of :func:`stage_memory`, for sub-models other than SmartFreeze's (FedLL's
    layer-wise ones): ``net`` (parameters on the meta device; those with ``requires_grad`` are the
    trained ones, the frozen part running under ``no_grad``) is put in train mode and one step is
    replayed (see the module docstring). ``active`` is the first trained module the forward
    reaches: the frozen phase ends when its forward starts; ``tail`` the output module or head
    (its parameters are reported as ``output_module``); ``frozen`` the frozen modules (their
    parameters are ``params_frozen``; none: no frozen phase). ``loss_fn`` maps the output to the
    scalar loss (default: cross-entropy against class 0, the supervised step).
    """
    net.train()
    trainable = [p for p in net.parameters() if p.requires_grad]
    trainable_bytes = _unique_bytes(trainable)
    frozen_bytes = _unique_bytes(p for block in frozen for p in block.parameters())
    buffer_bytes = _unique_bytes(net.buffers())
    tail_bytes = _unique_bytes(tail.parameters()) if tail is not None else 0
    dtype = trainable[0].dtype

    external = [*net.parameters(), *net.buffers()]
    param_keys = {_storage_key(p) for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in param_keys:
            saved.setdefault(key, t.untyped_storage().nbytes())
        return t

    tracker = _LiveBytes(external)
    phase: dict[str, int] = {}

    def enter_active(module: nn.Module, args: Any) -> None:
        phase["frozen_peak"] = tracker.peak
        phase["frozen_largest"] = tracker.largest
        tracker.reset_peak()

    handle = active.register_forward_pre_hook(enter_active)
    try:
        with tracker:
            x = torch.zeros((batch_size, *input_shape), dtype=dtype, device="meta")
            y = torch.zeros(batch_size, dtype=torch.long, device="meta")
            with saved_tensors_hooks(pack, lambda t: t):
                out = net(x)
                del x
                loss = F.cross_entropy(out, y, reduction="none").mean() if loss_fn is None else loss_fn(out)
            forward_peak = tracker.peak
            saved_bytes = sum(saved.values())
            tracker.reset_peak()
            loss.backward()
            backward_peak = tracker.peak
            grads_at_peak = tracker.born_by_peak(p.grad for p in trainable if p.grad is not None)
            del out, loss, y
    finally:
        handle.remove()
    activations = max(forward_peak, backward_peak)
    if forward_peak >= backward_peak:
        grads_at_peak = 0
    has_frozen = bool(frozen)
    step = max((_tensor_bytes(p) for p in trainable), default=0) if weight_decay else 0
    return MemoryBreakdown(
        activations=activations / MB,
        params_trainable=trainable_bytes / MB,
        grads=trainable_bytes / MB,
        optimizer=(trainable_bytes if momentum else 0) / MB,
        params_frozen=frozen_bytes / MB,
        frozen_peak_activation=(phase["frozen_peak"] if has_frozen else 0) / MB,
        buffers=buffer_bytes / MB,
        step_transient=step / MB,
        saved_activations=saved_bytes / MB,
        frozen_largest_activation=(phase["frozen_largest"] if has_frozen else 0) / MB,
        output_module=tail_bytes / MB,
        grads_at_activation_peak=grads_at_peak / MB,
    )
