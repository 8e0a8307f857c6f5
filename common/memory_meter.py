"""Measurement of the real training-memory peak (the memory model is :mod:`common.memory`).

All sizes are in MB = 2**20 bytes.

Measurement (:func:`track_peak`, :func:`measure_training_peak`)
    On CUDA the allocator's own peak (``torch.cuda.max_memory_allocated`` after a reset). On CPU,
    PyTorch keeps no allocation statistics, so the peak of live bytes comes from the allocator's
    memory events reported to the profiler (``torch.autograd.profiler.profile(profile_memory=True)``: one
    event per allocation/free of PyTorch's CPU allocator, kernels' internal buffers included), walked
    in time order. The process RSS peak comes from the kernel's high-water mark (``VmHWM``, reset
    through ``/proc/self/clear_refs``), or from a 5 ms sampling thread where that is unavailable.
"""

from __future__ import annotations

import gc
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from common.memory import MB, _unique_bytes
from common.sgd import register_step_post_hook
from common.training import train_local

_CPU = torch._C._autograd.DeviceType.CPU


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
