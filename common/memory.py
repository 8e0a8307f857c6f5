"""Training-memory model of a progressive stage (SmartFreeze Eq. 4) and measurement of the real peak.

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

Measurement (:func:`track_peak`, :func:`measure_training_peak`)
    On CUDA the allocator's own peak (``torch.cuda.max_memory_allocated`` after a reset). On CPU,
    PyTorch keeps no allocation statistics, so the peak of live bytes comes from the allocator's
    memory events reported to the profiler (``torch.autograd.profiler.profile(profile_memory=True)``: one
    event per allocation/free of PyTorch's CPU allocator, kernels' internal buffers included), walked
    in time order. The process RSS peak comes from the kernel's high-water mark (``VmHWM``, reset
    through ``/proc/self/clear_refs``), or from a 5 ms sampling thread where that is unavailable.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from common.models import BlockModel
from common.output_modules import DEFAULT_FROZEN_CHUNK, StageModel, build_output_module
from common.sgd import register_step_post_hook
from common.training import train_local

__all__ = [
    "MB",
    "MemoryBreakdown",
    "PeakMeter",
    "measure_training_peak",
    "replay_step",
    "stage_memory",
    "track_peak",
]

MB = float(2**20)
"""Bytes per MB (2**20) used throughout."""

_CACHE_SIZE = 256
_CPU = torch._C._autograd.DeviceType.CPU
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
) -> MemoryBreakdown:
    """Modelled memory (MB) of one SGD step of any sub-model ``net`` built on ``meta`` tensors.

    The generic part of :func:`stage_memory`, for sub-models other than SmartFreeze's (FedLL's
    layer-wise ones): ``net`` (parameters on the meta device; those with ``requires_grad`` are the
    trained ones, the frozen part running under ``no_grad``) is put in train mode and one step is
    replayed (see the module docstring). ``active`` is the first trained module the forward
    reaches: the frozen phase ends when its forward starts; ``tail`` the output module or head
    (its parameters are reported as ``output_module``); ``frozen`` the frozen modules (their
    parameters are ``params_frozen``; none: no frozen phase).
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
                loss = F.cross_entropy(out, y, reduction="none").mean()
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


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


@dataclass
class PeakMeter:
    """What :func:`track_peak` measured (MB = 2**20 bytes); filled in when the block exits.

    ``torch_peak_mb``: peak of bytes allocated by PyTorch and alive at once during the block,
    plus ``torch_baseline_mb`` (the tracked module's parameters, buffers and existing gradients,
    allocated before the block); tensors the caller allocated before the block (e.g. the whole
    local dataset) are not included. ``nan`` when it could not be measured (``method`` says why).
    ``rss_*_mb``: the whole process's resident set (Python, libraries, data included).
    """

    torch_peak_mb: float = math.nan
    torch_baseline_mb: float = 0.0
    rss_start_mb: float = math.nan
    rss_peak_mb: float = math.nan
    steps_measured: int = 0
    method: str = ""
    seconds: float = 0.0

    @property
    def rss_delta_mb(self) -> float:
        """Growth of the resident set during the block: RSS peak minus RSS at entry, MB."""
        return self.rss_peak_mb - self.rss_start_mb

    def as_dict(self) -> dict[str, float | int | str]:
        """Fields plus ``rss_delta_mb``."""
        return {**asdict(self), "rss_delta_mb": self.rss_delta_mb}


_hwm_lock = threading.Lock()
_hwm_users = 0


def _read_status_kb(field: str) -> float:
    """Value of ``field`` (e.g. ``VmHWM``) in /proc/self/status, kB; nan if unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return math.nan


class _RssPeak:
    """Peak RSS over a block: the kernel's high-water mark after a reset, else a sampling thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self._proc = psutil.Process()
        self._interval = interval
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled = 0
        self._use_hwm = False
        self.start_mb = math.nan

    def start(self) -> None:
        global _hwm_users
        with _hwm_lock:
            if _hwm_users == 0:
                try:
                    with open("/proc/self/clear_refs", "w") as f:
                        f.write("5")  # reset VmHWM (and ru_maxrss) to the current RSS
                    self._use_hwm = not math.isnan(_read_status_kb("VmHWM"))
                except OSError:
                    self._use_hwm = False
            if self._use_hwm:
                _hwm_users += 1
        rss = self._proc.memory_info().rss
        self.start_mb = rss / MB
        if not self._use_hwm:
            self._sampled = rss
            self._thread = threading.Thread(target=self._sample, name="rss-peak", daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._sampled = max(self._sampled, self._proc.memory_info().rss)

    def stop(self) -> float:
        """Stop and return the peak RSS in MB."""
        global _hwm_users
        rss = self._proc.memory_info().rss
        if self._use_hwm:
            peak = max(rss, _read_status_kb("VmHWM") * 1024)
            with _hwm_lock:
                _hwm_users -= 1
            return peak / MB
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return max(self._sampled, rss) / MB


def _cpu_memory_profiler() -> torch.autograd.profiler.profile:
    """A CPU profiler that records the allocator's memory events, not yet started.

    The autograd-level profiler that ``torch.profiler.profile`` wraps: the wrapper's start checks
    ``hasattr(torch, "_inductor")``, which imports the compiler stack (sympy, triton; 3-4 s and
    about 150 MB of RSS per process, in every simulated client's process) for a CUDA-graph flag.
    """
    return torch.autograd.profiler.profile(use_cpu=True, profile_memory=True)


def _peak_from_profiler(prof: torch.autograd.profiler.profile) -> int:
    """Peak of the running sum of the CPU allocator's memory events (bytes above the start)."""
    events = [e for e in prof.kineto_results.events() if e.name() == "[memory]" and e.device_type() == _CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


_profiler_ready = False


def _warm_up_profiler() -> None:
    """Start and stop the CPU profiler once per process: kineto's one-time initialisation (a few MB
    of RSS; ``torch.profiler.profile`` also imported the compiler stack, see :func:`_cpu_memory_profiler`)
    must not count as training."""
    global _profiler_ready
    if _profiler_ready or torch._C._autograd._profiler_enabled():
        return
    # kineto reads its level when the profiler first starts: 6 silences its GPU probe on CPU-only
    # hosts and the "USDT: profiler_start/stop" line it prints for every profiled block (5 keeps those);
    # run.sh sets 3 (errors and up) with verbose=true, and a value already in the environment wins.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    prof = _cpu_memory_profiler()
    prof.__enter__()
    prof.__exit__(None, None, None)
    _profiler_ready = True


class _TorchPeak:
    """Peak of PyTorch's live bytes: CUDA allocator statistics, or CPU allocator profiler events.

    On CPU the profiler can stop itself after ``max_steps`` optimizer steps (global step hooks of
    ``torch.optim`` optimizers and of :class:`common.sgd.SGD`), so that a long loop pays its small
    per-op cost only for the first steps.
    """

    def __init__(self, device: torch.device, max_steps: int | None) -> None:
        self._device = device
        self._max_steps = max_steps
        self._prof: torch.autograd.profiler.profile | None = None
        self._hooks: list[Any] = []
        self._peak = 0
        self.steps = 0
        self.method = ""

    def start(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            torch.cuda.reset_peak_memory_stats(self._device)
            self.method = "cuda-allocator"
        elif self._device.type != "cpu":
            self.method = f"unavailable: no allocator statistics for device {self._device.type}"
            return
        elif torch._C._autograd._profiler_enabled():
            self.method = "unavailable: another torch profiler is running"
            return
        else:
            self._prof = _cpu_memory_profiler()
            self._prof.__enter__()
            self.method = "cpu-profiler-memory-events"
        self._hooks = [register_optimizer_step_post_hook(self._on_step), register_step_post_hook(self._on_step)]

    def _on_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.method == "cpu-profiler-memory-events" and self._prof is None:
            return  # stopped after max_steps; the hook is removed on exit, not while the optimizer iterates
        self.steps += 1
        if self._max_steps is not None and self.steps >= self._max_steps:
            self._stop_profiler()

    def _stop_profiler(self) -> None:
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._peak = _peak_from_profiler(self._prof)
            self._prof = None

    def stop(self) -> float:
        """Stop and return the peak in bytes: above the start on CPU, absolute on CUDA; nan if unmeasured."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._stop_profiler()
        if self.method == "cuda-allocator":
            torch.cuda.synchronize(self._device)
            return float(torch.cuda.max_memory_allocated(self._device))
        if self.method.startswith("unavailable"):
            return math.nan
        return float(self._peak)


def _module_device(module: nn.Module | None) -> torch.device:
    if module is None:
        return torch.device("cpu")
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


@contextmanager
def track_peak(module: nn.Module | None = None, max_steps: int | None = 3) -> Iterator[PeakMeter]:
    """Measure the peak memory of the code in the block; the yielded :class:`PeakMeter` is filled on exit.

    ``torch_peak_mb`` is the peak of bytes allocated by PyTorch and alive at once (MB, 2**20 bytes):
    on CPU, ``module``'s parameters, buffers and existing gradients (the baseline, allocated before
    the block) plus the peak of the running sum of the CPU allocator's allocation/free events inside
    the block (activations, gradients, optimizer state, batches, kernel workspaces); on CUDA
    ``torch.cuda.max_memory_allocated`` (absolute, everything on the device). Set gradients to
    ``None`` before the block: frees of tensors allocated before it are invisible to the profiler,
    so gradients freed inside the block would stay counted. ``rss_peak_mb`` is the process's peak
    resident set in the block, ``rss_delta_mb`` its growth.

    ``max_steps``: on CPU the profiler stops after that many optimizer steps (any optimizer in the
    process) and the torch peak covers those steps only; an SGD loop repeats the same allocation
    pattern from its second step on, so 3 steps see the loop's peak. ``None`` profiles the whole block.

    Overhead (timed by ``bench/memory.py``): while it runs, the profiler records every operator and
    allocation (about a microsecond each), nothing after ``max_steps``; stopping it and walking the
    events takes a few milliseconds per profiled step. On a 30-step ResNet10 (width 0.25, batch 32,
    one thread) loop, 1 s plain: +20-80 ms (+2-8 %) with ``max_steps=3``, +18-23 % profiling every
    step (ranges over runs on a shared 2-core machine). The RSS peak
    costs two reads of /proc/self. The first block in a process also starts and stops the profiler
    once before taking the RSS baseline (kineto's one-time initialisation). Only one profiler can
    run per process: nested blocks or a running user profiler give ``torch_peak_mb = nan``
    (``method`` says so). Allocations made by PyTorch's intra-op worker threads are not reported to
    the profiler (small scratch buffers of some kernels).
    """
    meter = PeakMeter()
    device = _module_device(module)
    if module is not None:
        tensors = [*module.parameters(), *module.buffers()]
        tensors += [p.grad for p in module.parameters() if p.grad is not None]
        meter.torch_baseline_mb = _unique_bytes(tensors) / MB if device.type != "cuda" else 0.0
    if device.type == "cpu":
        _warm_up_profiler()
    rss = _RssPeak()
    torch_peak = _TorchPeak(device, max_steps)
    rss.start()
    meter.rss_start_mb = rss.start_mb
    start = time.perf_counter()
    torch_peak.start()
    try:
        yield meter
    finally:
        peak = torch_peak.stop()
        meter.seconds = time.perf_counter() - start
        meter.rss_peak_mb = rss.stop()
        meter.steps_measured = torch_peak.steps
        meter.method = torch_peak.method
        meter.torch_peak_mb = meter.torch_baseline_mb + peak / MB


def measure_training_peak(
    model_or_stage_module: nn.Module,
    batch_size: int,
    input_shape: tuple[int, ...] = (3, 32, 32),
    steps: int = 2,
    num_classes: int = 10,
    *,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    train_fn: Callable[..., Any] = train_local,
) -> dict[str, float]:
    """Measured peak memory (MB, 2**20 bytes) of ``steps`` real SGD-with-momentum training steps.

    Runs the client's own loop (:func:`common.training.train_local`, or ``train_fn`` with the same
    signature) for one epoch over ``steps * batch_size`` random samples, inside :func:`track_peak`
    profiling every step. Trains the module in place (parameters, BN statistics and gradients change)
    and sets its gradients to ``None`` first. Returns:

    * ``torch_peak_mb``: peak of live bytes allocated by PyTorch: the module's parameters and
      buffers (baseline, ``torch_baseline_mb``) plus everything allocated during the steps
      (batches, activations, gradients, momentum buffers, kernel workspaces). The random dataset
      is allocated before and not counted.
    * ``rss_peak_mb`` / ``rss_start_mb`` / ``rss_delta_mb``: the process's resident set.
    * ``seconds``: wall time of the steps (profiler running).
    """
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model_or_stage_module.parameters()).dtype
    x = torch.randn((steps * batch_size, *input_shape), generator=gen, dtype=dtype)
    y = torch.randint(0, num_classes, (steps * batch_size,), generator=gen)
    model_or_stage_module.zero_grad(set_to_none=True)
    gc.collect()
    with track_peak(model_or_stage_module, max_steps=None) as meter:
        train_fn(
            model_or_stage_module,
            x,
            y,
            epochs=1,
            batch_size=batch_size,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            seed=seed,
        )
    return {
        "torch_peak_mb": meter.torch_peak_mb,
        "torch_baseline_mb": meter.torch_baseline_mb,
        "rss_peak_mb": meter.rss_peak_mb,
        "rss_start_mb": meter.rss_start_mb,
        "rss_delta_mb": meter.rss_delta_mb,
        "seconds": meter.seconds,
    }
