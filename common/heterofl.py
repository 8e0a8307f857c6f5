"""HeteroFL's width-scaled sub-models: building, slicing and overlapping aggregation (no Flower).

Follows Diao, Ding and Tarokh, "HeteroFL: Computation and Communication Efficient Federated
Learning for Heterogeneous Clients" (ICLR 2021) and its public code
(github.com/diaoenmao/HeteroFL-Computation-and-Communication-Efficient-Federated-Learning-for-Heterogeneous-Clients,
``src/fed.py``, ``src/models/*.py``, ``src/modules/modules.py``):

* **Sub-models.** A client of model rate ``r`` (one of :data:`RATES`) trains the global model
  narrowed to ``r`` of its hidden channels, and it takes the *leading* channels of every layer:
  the server sends ``w[0:s0, 0:s1, ...]`` of every global array ``w`` (:func:`slice_arrays`), the
  shapes ``s`` being those of the project's own model built at width ``configured width x r``
  (:func:`submodel_shapes`). Input channels (3) and the classes stay whole. The project scales
  channels with :func:`common.zoo.scaled` (``max(1, round(C * width))``), which is monotone in
  the width, so the sub-model's shapes never exceed the global ones on any dimension (checked for
  every model in the tests); the original code's ``ceil(C_global * r)`` can differ from it by one
  channel, never in a way that breaks the nesting, so the project's builder is used as is and the
  client needs nothing but the width.
* **Aggregation** (:func:`aggregate_nested`): every entry of every array is the plain mean of the
  values sent by the clients that hold it; entries no client holds keep their value. As in the
  original ``Federation.combine``, each client counts once (no weighting by example count).
* **Static batch normalisation** (sBN, :func:`make_static_bn`): BN layers track no running
  statistics (``track_running_stats=False``, as the original builds them for training), so the
  aggregated model holds no BN statistics that would mix sub-models of different widths. The
  original re-estimates global statistics after training by a pass over the (centrally held)
  training data; the server here holds none, so the global model keeps ``track_running_stats=False``
  in evaluation as well and normalises by each evaluated batch's own statistics (so evaluation
  results depend a little on ``eval-batch-size`` and on the batch's composition).
* **Scaler** (:func:`add_scaler`): during training, the input of every normalisation layer is
  divided by the rate (the original's ``Scaler`` module sits immediately before each norm layer;
  it is the identity in evaluation). Implemented as forward pre-hooks, so the state-dict keys are
  the plain model's. In front of a BN layer that normalises by batch statistics it changes only
  the effect of BN's ``eps``; it is kept for fidelity.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from common.memory import stage_memory
from common.models import BlockModel, build_model

__all__ = [
    "RATES",
    "Scaler",
    "add_scaler",
    "aggregate_nested",
    "build_heterofl_model",
    "choose_rate",
    "make_static_bn",
    "required_mb",
    "slice_arrays",
    "submodel_shapes",
]

RATES: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125, 0.0625)
"""HeteroFL's model rates (levels a..e of the paper: the global width times 1, 1/2, ..., 1/16)."""


class Scaler:
    """HeteroFL's Scaler as a forward pre-hook: divides a layer's input by ``rate`` in training mode."""

    def __init__(self, rate: float) -> None:
        if not 0 < rate <= 1:
            raise ValueError(f"scaler rate must be in (0, 1], got {rate!r}")
        self.rate = rate

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        """Replace the input by ``input / rate`` while ``module`` trains; leave it untouched otherwise."""
        if not module.training:
            return None
        return (args[0] / self.rate, *args[1:])


def make_static_bn(model: nn.Module) -> nn.Module:
    """Turn every BatchNorm layer of ``model`` (in place) into HeteroFL's static BN; returns ``model``.

    The layers keep their affine parameters and drop their running statistics, exactly as if
    built with ``track_running_stats=False``: they normalise by the current batch's statistics
    in training and in evaluation alike, and their state dict holds only ``weight`` and ``bias``.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            module.num_batches_tracked = None
    return model


def add_scaler(model: nn.Module, rate: float) -> nn.Module:
    """Put a :class:`Scaler` of ``rate`` in front of every normalisation layer of ``model`` (in place).

    Rate 1 adds nothing. Returns ``model``.
    """
    if rate == 1.0:
        return model
    hook = Scaler(rate)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.GroupNorm | nn.LayerNorm):
            module.register_forward_pre_hook(hook)
    return model


def build_heterofl_model(
    name: str,
    num_classes: int,
    width: float,
    *,
    static_bn: bool = True,
    scaler_rate: float = 1.0,
    seed: int | None = None,
) -> BlockModel:
    """Model ``name`` at ``width`` as HeteroFL trains it: static BN and a Scaler of ``scaler_rate``.

    ``width`` is the sub-model's own width (configured width x rate); ``scaler_rate`` is its rate
    relative to the global model (1 for the global model). Parameter keys and shapes are those of
    :func:`common.models.build_model` at ``width``, minus the BN statistics when ``static_bn``.
    """
    model = build_model(name, num_classes, width, seed=seed)
    if static_bn:
        make_static_bn(model)
    return add_scaler(model, scaler_rate)  # type: ignore[return-value]


@functools.lru_cache(maxsize=64)
def submodel_shapes(name: str, num_classes: int, width: float, static_bn: bool = True) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every array of model ``name`` built at ``width`` (a skeleton on the meta device)."""
    with torch.device("meta"):
        model = build_heterofl_model(name, num_classes, width, static_bn=static_bn)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _leading(shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(0, s) for s in shape)


def slice_arrays(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The leading block ``a[0:s0, 0:s1, ...]`` of every global array, for the sub-model's ``shapes``.

    Every key of ``shapes`` must be in ``arrays`` with at least as many entries on every dimension.
    The results are copies (C-contiguous), never views of the global state.
    """
    out: dict[str, np.ndarray] = {}
    for key, shape in shapes.items():
        if key not in arrays:
            raise KeyError(f"sub-model key {key!r} is not part of the global model")
        a = np.asarray(arrays[key])
        if a.ndim != len(shape) or any(s > g for s, g in zip(shape, a.shape, strict=True)):
            raise ValueError(f"sub-model {key!r} of shape {tuple(shape)} does not nest in the global {a.shape}")
        out[key] = np.ascontiguousarray(a[_leading(shape)]).copy()
    return out


def aggregate_nested(
    global_arrays: Mapping[str, np.ndarray], updates: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """HeteroFL aggregation: each entry is the mean over the clients whose sub-model holds it.

    ``updates`` are the clients' trained arrays, each the leading block of the global array of
    the same key (any subset of keys). Every client counts once, as in the original
    ``Federation.combine`` (no example weighting). Entries that no update covers keep their
    global value. Returns the new global arrays (all keys, global shapes and dtypes); scalars
    sent as shape (1,) are accepted for 0-d arrays.
    """
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for update in updates:
        for key, value in update.items():
            if key not in global_arrays:
                raise KeyError(f"update key {key!r} is not part of the global model")
            ref = np.asarray(global_arrays[key])
            value = np.asarray(value)
            if ref.ndim == 0 and value.size == 1:
                value = value.reshape(())
            if value.ndim != ref.ndim or any(s > g for s, g in zip(value.shape, ref.shape, strict=True)):
                raise ValueError(f"update {key!r} of shape {value.shape} does not nest in the global {ref.shape}")
            if key not in sums:
                sums[key] = np.zeros(ref.shape, dtype=np.float64)
                counts[key] = np.zeros(ref.shape, dtype=np.int64)
            region = _leading(value.shape)
            sums[key][region] += value
            counts[key][region] += 1
    out: dict[str, np.ndarray] = {}
    for key, ref in global_arrays.items():
        ref = np.asarray(ref)
        if key not in sums:
            out[key] = ref.copy()
            continue
        held = counts[key] > 0
        mean = np.divide(sums[key], counts[key], out=np.zeros_like(sums[key]), where=held)
        if np.issubdtype(ref.dtype, np.integer):
            mean = np.rint(mean)
        out[key] = np.where(held, mean, ref).astype(ref.dtype)
    return out


def choose_rate(fits: Callable[[float], bool], rates: Sequence[float] = RATES) -> float | None:
    """The largest rate for which ``fits(rate)`` holds, or None if none does."""
    for rate in sorted(rates, reverse=True):
        if fits(rate):
            return rate
    return None


def required_mb(
    name: str,
    num_classes: int,
    width: float,
    rate: float,
    batch_size: int,
    input_shape: tuple[int, ...] = (3, 32, 32),
) -> float:
    """Modelled full-model training memory (MB, :func:`common.memory.stage_memory`) of the rate-``rate`` sub-model.

    The sub-model is the one the client trains: width ``width x rate``, static BN, Scaler of ``rate``.
    Against the plain model at the same width it lacks only the BN running statistics (a few KB
    less); the Scaler's division replaces the layer input it divides, so it adds nothing.
    """
    model = build_heterofl_model(name, num_classes, width * rate, scaler_rate=rate)
    return stage_memory(model, None, batch_size, input_shape).total
