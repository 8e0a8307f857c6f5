"""DepthFL (Kim et al., ICLR 2023, "DepthFL: Depthwise Federated Learning for Heterogeneous Clients").

The global model is the project's :class:`~common.models.BlockModel` (blocks ``0..B-1`` and the
head) plus one auxiliary classifier after every non-final block. A client of depth ``d`` trains
the prefix of ``d`` blocks with the ``d`` classifiers it holds (after blocks ``0..d-1``; after
the last block the classifier is the model's own head), all parameters trained.

Classifiers
    The classifier after block ``k < B-1`` is :func:`common.output_modules.build_output_module`
    ``(model, k)``: one 3x3 conv (+BN, ReLU) per later block with that block's channels and
    stride, then global average pooling and a linear layer. It plays the role of DepthFL's
    bottleneck classifiers (the authors' ResNet has, after layer ``k``, one ``SepConv`` per later
    stage before pooling and the linear layer, so that shallow exits get enough depth); the
    authors' attention modules in front of those exits are not reproduced. State keys are the
    global ones: ``blocks.<i>.*``, ``head.*`` and ``aux.<k>.*``, so a client's arrays drop
    straight into the global state.

Training loss (:meth:`DepthFLModel.training_loss`)
    Mutual self-distillation as in the public implementation (Flower baseline
    ``baselines/depthfl``, ``models.py``: ``_train_one_epoch`` and ``KLLoss``, by the paper's
    authors): for every held classifier ``i``, cross-entropy plus
    ``w / (n - 1) * sum_{j != i} KL(softmax(z_j / T) || softmax(z_i / T)) * T**2`` with the
    teacher ``z_j`` detached, ``T = 1``, and ``1e-7`` added to the teacher's probabilities before
    the logarithm (the reference's guard, not renormalised); the terms of all classifiers are
    summed (not averaged). With one classifier the loss is plain cross-entropy. The reference
    ramps the weight ``w`` (``consistency_weight``) as ``exp(-5 (1 - min(r, 300) / 300)^2)`` over
    the first 300 of its 1000 rounds; :func:`consistency_weight` does the same over the first
    ``depthfl-ramp-share`` of the run's rounds (default 0.3, the reference's 300 / 1000; runs here
    last tens of rounds, not a thousand), from the round every training message carries;
    ``depthfl-ramp-share=0`` keeps the ramp's final value :data:`DISTILL_WEIGHT` = 1 throughout
    (the paper's Eq. as written, and this project's behaviour before the fidelity audit).

Prediction
    In eval mode the forward returns the ensemble of the classifiers as logits: the log of the
    mean of their softmax (the reference averages the logits instead). The global prediction is
    this ensemble over all ``B`` classifiers of the full-depth model.

Aggregation (:func:`aggregate_by_holder`)
    Every array is averaged over the clients that hold it, weighted by their example counts
    (DepthFL aggregates each block over the clients whose depth includes it; the reference
    weights every such client equally, which is the same with equal partition sizes). Arrays
    nobody trained keep their value.

Memory (:func:`required_mb`)
    A depth-``d`` client trains every parameter of its prefix and classifiers, so its modelled
    memory is full-model training of that module: :func:`common.memory.stage_memory` with
    ``stage=None`` of the module presented as a :class:`BlockModel` whose forward runs every exit
    (see :func:`required_mb` for the approximation of the loss).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.memory import MB, stage_memory
from common.models import BlockModel, build_model
from common.output_modules import build_output_module, build_output_modules

AUX_PREFIX = "aux"
"""State-key prefix of the auxiliary classifiers: ``aux.<k>.*`` is the classifier after block k."""
DISTILL_TEMPERATURE = 1.0
"""Softmax temperature T of the self-distillation (the reference's ``KLLoss``: T = 1)."""
DISTILL_WEIGHT = 1.0
"""Weight of the self-distillation term (the reference's ramp-up ends at 1; see the module docstring)."""
RAMP_SHARE = 0.3
"""Default share of the rounds over which the distillation weight ramps up (the reference: 300 of 1000)."""
TEACHER_EPS = 1e-7
"""Added to the teacher's probabilities before the logarithm, as the reference's ``KLLoss``."""

__all__ = [
    "AUX_PREFIX",
    "DepthFLModel",
    "aggregate_by_holder",
    "build_depthfl",
    "choose_depth",
    "client_module",
    "consistency_weight",
    "depth_prefixes",
    "distillation_loss",
    "ensemble_logits",
    "exit_accuracies",
    "holder_counts",
    "required_mb",
    "select_depth_arrays",
]


def consistency_weight(server_round: int, num_rounds: int, share: float = RAMP_SHARE) -> float:
    """Distillation weight of round ``server_round`` (1-based): ``exp(-5 (1 - min(r - 1, R) / R)^2)``.

    ``R = share x num_rounds`` (at least 1).
    The reference's sigmoid-shaped ramp-up (``consistency_weight`` in Flower's DepthFL baseline),
    with its 300-of-1000-round length scaled to the run; ``share = 0`` means no ramp (weight 1).
    """
    if share <= 0:
        return DISTILL_WEIGHT
    ramp = max(1.0, share * num_rounds)
    phase = 1.0 - min(max(server_round - 1, 0), ramp) / ramp
    return DISTILL_WEIGHT * math.exp(-5.0 * phase * phase)


def ensemble_logits(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Log of the mean of the classifiers' softmax, shape (batch, classes): logits of the ensemble."""
    log_probs = torch.stack([F.log_softmax(z, dim=1) for z in outputs])
    return torch.logsumexp(log_probs, dim=0) - math.log(len(outputs))


def distillation_loss(
    outputs: Sequence[torch.Tensor],
    targets: torch.Tensor,
    weight: float = DISTILL_WEIGHT,
    temperature: float = DISTILL_TEMPERATURE,
) -> torch.Tensor:
    """DepthFL's per-sample training loss of the classifiers' logits ``outputs`` (see the module docstring).

    ``sum_i [CE(z_i, y) + weight / (n - 1) * sum_{j != i} T^2 KL(softmax(z_j/T) + eps || softmax(z_i/T))]``,
    teachers ``z_j`` detached; shape (batch,). Cross-entropy only when ``n == 1`` or ``weight == 0``.
    """
    n = len(outputs)
    if n == 0:
        raise ValueError("distillation_loss: no classifier outputs")
    loss = sum(F.cross_entropy(z, targets, reduction="none") for z in outputs)
    if n == 1 or weight == 0:
        return loss  # type: ignore[return-value]
    t = temperature
    students = [F.log_softmax(z / t, dim=1) for z in outputs]
    teachers = [F.softmax(z.detach() / t, dim=1) + TEACHER_EPS for z in outputs]
    log_teachers = [p.log() for p in teachers]
    for i in range(n):
        for j in range(n):
            if j != i:
                kl = (teachers[j] * (log_teachers[j] - students[i])).sum(dim=1)
                loss = loss + weight * t * t * kl / (n - 1)
    return loss  # type: ignore[return-value]


class DepthFLModel(nn.Module):
    """The first ``depth`` blocks of a :class:`BlockModel` with a classifier after each of them.

    Shares its modules with ``model`` and ``aux`` (loading arrays into it updates them). The
    classifier after block ``k < B-1`` is ``aux[str(k)]``, after block ``B-1`` the model's head.
    Train mode: the forward returns the list of the classifiers' logits (shallowest first) and
    :meth:`training_loss` is DepthFL's loss; eval mode: the ensemble's logits (one tensor).
    """

    def __init__(self, model: BlockModel, depth: int, aux: Mapping[str, nn.Module]) -> None:
        super().__init__()
        last = model.num_blocks
        if not 1 <= depth <= last:
            raise ValueError(f"depth must be in 1..{last} for {model.arch}, got {depth}")
        needed = [str(k) for k in range(min(depth, last - 1))]
        missing = [k for k in needed if k not in aux]
        if missing:
            raise KeyError(f"depth {depth} needs auxiliary classifiers {needed}; missing {missing}")
        self.depth = depth
        self.num_blocks = last
        self.distill_weight = DISTILL_WEIGHT
        self.temperature = DISTILL_TEMPERATURE
        self.blocks = nn.ModuleList(list(model.blocks[:depth]))
        setattr(self, AUX_PREFIX, nn.ModuleDict({k: aux[k] for k in needed}))
        if depth == last:
            self.head = model.head
        self.requires_grad_(True)

    def classifier(self, k: int) -> nn.Module:
        """The classifier after block ``k`` (auxiliary, or the head after the last block)."""
        return self.head if k == self.num_blocks - 1 else getattr(self, AUX_PREFIX)[str(k)]

    def exits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every held classifier, shallowest first."""
        outs: list[torch.Tensor] = []
        for k, block in enumerate(self.blocks):
            x = block(x)
            outs.append(self.classifier(k)(x))
        return outs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        outs = self.exits(x)
        return outs if self.training else ensemble_logits(outs)

    def training_loss(self, outputs: list[torch.Tensor] | torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample DepthFL loss (:func:`distillation_loss`); a single tensor is treated as one classifier."""
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        return distillation_loss(outputs, targets, self.distill_weight, self.temperature)


@torch.no_grad()
def exit_accuracies(net: DepthFLModel, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[float]:
    """Test accuracy of every classifier on its own, shallowest first (the reference's ``accuracy_single``).

    A diagnostic beside the ensemble's accuracy: an ensemble below its best single exit says the
    other exits pull it down (e.g. exits trained by few, skewed clients).
    """
    was_training = net.training
    net.eval()
    hits = [0] * len(net.blocks)
    for i in range(0, len(y), batch_size):
        for k, logits in enumerate(net.exits(x[i : i + batch_size])):
            hits[k] += int((logits.argmax(1) == y[i : i + batch_size]).sum())
    net.train(was_training)
    return [h / max(1, len(y)) for h in hits]


def build_depthfl(
    name: str, num_classes: int, width: float, depth: int, seed: int | None = None
) -> tuple[DepthFLModel, BlockModel]:
    """A depth-``depth`` DepthFL module of model ``name`` and the full :class:`BlockModel` it shares.

    With ``seed`` the initialisation is deterministic (blocks and head as ``build_model(seed=seed)``,
    the classifiers from ``seed + 1``) and leaves the global RNG untouched.
    """
    model = build_model(name, num_classes, width, seed=seed)
    if seed is None:
        aux: Mapping[str, nn.Module] = {
            str(k): build_output_module(model, k) for k in range(min(depth, model.num_blocks - 1))
        }
    else:
        aux = build_output_modules(model, seed=seed + 1)
    return DepthFLModel(model, depth, aux), model


def client_module(name: str, num_classes: int, width: float, depth: int) -> DepthFLModel:
    """The module a depth-``depth`` client trains (untrained weights: the caller loads the global arrays)."""
    return build_depthfl(name, num_classes, width, depth)[0]


def depth_prefixes(depth: int, num_blocks: int) -> tuple[str, ...]:
    """State-key prefixes of the depth-``depth`` module: its blocks, its auxiliary classifiers, the head."""
    if not 1 <= depth <= num_blocks:
        raise ValueError(f"depth must be in 1..{num_blocks}, got {depth}")
    prefixes = [f"blocks.{i}." for i in range(depth)]
    prefixes += [f"{AUX_PREFIX}.{k}." for k in range(min(depth, num_blocks - 1))]
    if depth == num_blocks:
        prefixes.append("head.")
    return tuple(prefixes)


def select_depth_arrays(arrays: Mapping[str, np.ndarray], depth: int, num_blocks: int) -> dict[str, np.ndarray]:
    """The global arrays a depth-``depth`` client receives (the keys of its module, global order)."""
    prefixes = depth_prefixes(depth, num_blocks)
    return {k: v for k, v in arrays.items() if k.startswith(prefixes)}


def aggregate_by_holder(
    global_arrays: Mapping[str, np.ndarray], updates: Sequence[tuple[Mapping[str, np.ndarray], float]]
) -> dict[str, np.ndarray]:
    """DepthFL aggregation: every array averaged over the updates holding it, weighted by example count.

    ``updates`` are (arrays, num_examples) of clients of any depth (each a subset of the global
    keys, global shapes; scalars may arrive as shape (1,)). Sums run in float64; integer arrays
    (BN's ``num_batches_tracked``) are rounded. Arrays no update holds keep their global value.
    Returns the new global arrays (all keys, global shapes and dtypes).
    """
    sums: dict[str, np.ndarray] = {}
    weights: dict[str, float] = {}
    for arrays, n in updates:
        if not n > 0:
            raise ValueError(f"aggregate_by_holder: weights must be > 0, got {n}")
        for key, value in arrays.items():
            if key not in global_arrays:
                raise KeyError(f"update key {key!r} is not part of the global model")
            ref = np.asarray(global_arrays[key])
            value = np.asarray(value)
            if value.size != ref.size:
                raise ValueError(f"update {key!r} has {value.size} values, the global array {ref.size}")
            acc = sums.setdefault(key, np.zeros(ref.shape, dtype=np.float64))
            acc += value.reshape(ref.shape).astype(np.float64) * n
            weights[key] = weights.get(key, 0.0) + float(n)
    out: dict[str, np.ndarray] = {}
    for key, ref in global_arrays.items():
        ref = np.asarray(ref)
        if key not in sums:
            out[key] = ref.copy()
            continue
        mean = sums[key] / weights[key]
        out[key] = np.rint(mean).astype(ref.dtype) if np.issubdtype(ref.dtype, np.integer) else mean.astype(ref.dtype)
    return out


def holder_counts(key_sets: Sequence[Sequence[str]], num_blocks: int) -> tuple[list[int], list[int]]:
    """How many updates held each block and each classifier (aux 0..B-2, then the head).

    ``key_sets`` are the array keys of each update. Returns (per block, per classifier), each of length B.
    """
    blocks = [0] * num_blocks
    classifiers = [0] * num_blocks
    for keys in key_sets:
        for i in range(num_blocks):
            if any(k.startswith(f"blocks.{i}.") for k in keys):
                blocks[i] += 1
            prefix = "head." if i == num_blocks - 1 else f"{AUX_PREFIX}.{i}."
            if any(k.startswith(prefix) for k in keys):
                classifiers[i] += 1
    return blocks, classifiers


def choose_depth(fits: Callable[[int], bool], num_blocks: int) -> int | None:
    """The deepest depth ``d`` in ``num_blocks .. 1`` with ``fits(d)``, or None if none fits."""
    for depth in range(num_blocks, 0, -1):
        if fits(depth):
            return depth
    return None


class _MemoryProxy(BlockModel):
    """A depth-``d`` DepthFL module dressed as a :class:`BlockModel` for :func:`stage_memory` (full training).

    Blocks: the prefix; head: the last held classifier; the other classifiers are registered too,
    so every parameter is trained. The forward runs every exit and returns their ensemble, so the
    replayed step keeps every exit's activations until the backward pass and back-propagates
    through every classifier, as DepthFL's training does.
    """

    def __init__(self, module: DepthFLModel, model: BlockModel) -> None:
        depth = module.depth
        super().__init__(
            list(module.blocks),
            module.classifier(depth - 1),
            list(model.specs[:depth]),
            model.arch,
            model.num_classes,
            model.width,
        )
        self.exits = nn.ModuleList([module.classifier(k) for k in range(depth - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        for k, block in enumerate(self.blocks):
            x = block(x)
            outs.append((self.exits[k] if k < len(self.exits) else self.head)(x))
        return ensemble_logits(outs)


def _loss_margin_bytes(depth: int, batch_size: int, num_classes: int) -> int:
    """Upper bound (bytes, float32) of the (batch, classes) tensors DepthFL's loss adds over the ensemble's.

    Per exit: softmax, teacher + eps, its log, log-softmax and cross-entropy's (6); per ordered pair of
    exits: the log difference, the product and the per-sample sum (3, the sum counted as a full row).
    """
    return (6 * depth + 3 * depth * (depth - 1)) * batch_size * num_classes * 4


@functools.lru_cache(maxsize=64)
def required_mb(
    name: str,
    num_classes: int,
    width: float,
    depth: int,
    batch_size: int,
    input_shape: tuple[int, ...] = (3, 32, 32),
) -> float:
    """Modelled training memory (MB, 2**20 bytes) of a depth-``depth`` client at ``batch_size``.

    Every parameter of the prefix and its classifiers is trained with DepthFL's loss, so the memory
    is full-model training of that module: :func:`common.memory.stage_memory` (``stage=None``, SGD
    with momentum and weight decay, replayed on meta tensors) of :class:`_MemoryProxy`, which has
    the module's parameters and runs all its exits, plus :func:`_loss_margin_bytes`. Approximation:
    the replayed loss is cross-entropy of the exits' ensemble instead of DepthFL's sum of
    cross-entropies and distillation terms; the two differ only in small (batch, classes) tensors,
    which the margin covers (0.07 MB for depth 4, batch 32, 10 classes). Within 1 % above the
    measured peak of real DepthFL training for the depths of smallcnn and resnet10 (tests and
    ``measure_training_peak``). Cached per process.
    """
    with torch.device("meta"):
        module, model = build_depthfl(name, num_classes, width, depth)
    proxy = _MemoryProxy(module, model)
    total = stage_memory(proxy, None, batch_size, tuple(input_shape)).total
    return total + _loss_margin_bytes(depth, batch_size, num_classes) / MB
