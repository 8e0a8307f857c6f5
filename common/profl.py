"""ProFL (Wu et al., KDD 2025; arXiv 2404.13349): progressive model shrinking, then growing.

Pure model logic (no Flower): the *basic layers*, the sub-models of both phases, the mapping that
carries shrinking's trained basic layers into growing's output modules, the phase schedule, and
the memory and FLOPs models of a shrinking step.

Blocks are 0-based here (B = ``model.num_blocks``); logs and metrics show them 1-based.

Basic layers
    One lightweight stand-in per block j: a 3x3 conv with block j's output channels and stride,
    BN and ReLU (:func:`common.output_modules.basic_layer`, the same triplet SmartFreeze's output
    modules use), plus one classifier (pool, flatten, linear: the model head's layout). Server keys
    ``basic.<j>.<0|1>.*`` (conv, BN) and ``basic.head.2.*`` (linear).

Phase 1, shrinking (back to front, k = B-1 .. 0)
    Step k trains :class:`ShrinkModel`: basic layers 0..k-1, the real block k, basic layers
    k+1..B-1 and the basic classifier. It yields block k's initial parameters and the trained
    basic layers behind it. At the end of step k, basic layers k+1..B-1 and the classifier, as
    trained together with block k, are copied (not re-initialised) into growing's output module k
    (``outmod.<k>.*``, the SmartFreeze layout, :func:`outmod_from_basic`); after step B-1 the
    classifier becomes the model's head.

Phase 2, growing (front to back, k = 0 .. B-1)
    Stage k is SmartFreeze's stage sub-model (:class:`common.output_modules.StageModel`): blocks
    0..k-1 frozen (forward without autograd, BN in eval mode, micro-batched), block k starting from
    its shrinking parameters, and output module k = the basic layers k+1..B-1 + classifier saved
    at the end of shrinking step k (the head at k = B-1). Block k and its output module are
    trained; the output module is scaffolding and is dropped from the final model.

Interpretation of what the published text leaves open (the issue asks to write it down):

* In shrinking step k *every* module of the sub-model is trained: the basic layers before k too
  (they are the only thing feeding block k a representation; freezing them at their random
  initialisation would starve block k), and those after k (they become growing's output module).
  No block other than k is real in a shrinking step: the sub-model is the lightweight model with
  one block swapped in, which is what bounds its memory.
* The basic layers are one shared set across shrinking steps (basic layer j keeps learning in
  every step that uses it), but growing's output module k is the snapshot taken at the end of
  step k, i.e. the tail that was trained *together with* block k's parameters, so that growing
  stage k starts from a matching (block, output module) pair.
* Shrinking step 0 and growing stage 0 have the same structure (real block 0, basic layers
  1..B-1, classifier); growing stage 0 simply continues from shrinking step 0.
* No warm start between growing's output modules (SmartFreeze's ``outmod-warm-start``): they
  come from shrinking. With ``profl-shrinking=false`` (ablation) growing starts from the model's
  own initialisation and freshly initialised output modules.
* Every step (both phases) ends when effective movement says block k's parameters have settled
  (below), or by the stage machine's max-rounds/budget rules; both phases share ``num-rounds``.
  With 2B steps, the machine's budget rule alone would let a step whose block never settles run
  until only ``min-stage-rounds`` per later step remain. So a step also ends once it has run its
  *fair share*, the rounds left at its start divided by the steps left (rounded up,
  :func:`fair_share`; reason ``"share"``): a step that settles early leaves its rounds to the later
  ones. With the pace defaults a freeze needs at least 12 rounds of a step (W + R + C - 1), so
  below about 12 x 2B rounds the schedule is in effect the fair split.

Freezing by effective movement
    Per scalar, |sum of its last W round-to-round updates| / sum of their |updates|, averaged
    over block k's trainable scalars (``effective-movement`` in :mod:`common.pace`, APF's ratio),
    then the pace controller's moving average, relative slope and tau/C rule. A ratio near 1
    means the scalars still move consistently (steady drift), about 1/sqrt(W) (0.45 for W=5) that
    their updates are SGD noise cancelling out. A flat curve near 1 would satisfy the slope rule
    without the block having settled, so ProFL's reading (a block is trained once its parameters
    stop making effective progress) adds a level: the smoothed movement must also be at or below
    ``profl-movement-threshold`` (default 0.6, between pure noise 0.45 and drift 1.0).

Device selection: clients whose budget fits the current step's modelled memory
(:func:`shrink_memory` in shrinking, :func:`common.memory.stage_memory` in growing), sampled
with the run's seed among them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from common.flops import StageFlops, forward_flops
from common.memory import MemoryBreakdown, stage_memory
from common.models import BlockModel, build_model
from common.output_modules import LAYERS_PER_BLOCK, OUTMOD_PREFIX, basic_layer, classifier

BASIC_PREFIX = "basic"
HEAD = "head"
PHASES: tuple[str, ...] = ("shrinking", "growing")


# ----------------------------------------------------------------------------------------------
# Basic layers and the shrinking sub-model
# ----------------------------------------------------------------------------------------------


def build_basic_layers(model: BlockModel, seed: int | None = None) -> nn.ModuleDict:
    """Basic layers of every block (``"0" .. str(B-1)``) and the classifier (``"head"``); seeded if ``seed``."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        layers: dict[str, nn.Module] = {
            str(j): nn.Sequential(*basic_layer(spec.in_channels, spec)) for j, spec in enumerate(model.specs)
        }
        layers[HEAD] = classifier(model.specs[-1].out_channels, model.num_classes)
        return nn.ModuleDict(layers)


def _check_block(block: int, num_blocks: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < num_blocks:
        raise ValueError(f"block must be an int in 0..{num_blocks - 1}, got {block!r}")


class ShrinkModel(nn.Module):
    """Shrinking step ``block``: basic layers for every block but ``block``, which is real, then the classifier.

    Shares its modules with ``model`` and ``basic`` (loading arrays into it updates them). State
    keys: ``blocks.<block>.*`` and ``basic.<j>.*`` (j != block), ``basic.head.*``. Everything is
    trained (see the module docstring).
    """

    def __init__(self, model: BlockModel, block: int, basic: nn.ModuleDict) -> None:
        super().__init__()
        _check_block(block, model.num_blocks)
        expected = {str(j) for j in range(model.num_blocks)} | {HEAD}
        if set(basic.keys()) != expected:
            raise ValueError(f"basic layers must have keys {sorted(expected)}, got {sorted(basic.keys())}")
        self.block = block
        self.num_blocks = model.num_blocks
        self.blocks = nn.ModuleDict({str(block): model.blocks[block]})
        setattr(self, BASIC_PREFIX, nn.ModuleDict({k: m for k, m in basic.items() if k != str(block)}))
        self.requires_grad_(True)

    def layers(self) -> list[nn.Module]:
        """The B modules run in order (basic layer or the real block), before the classifier."""
        basic = getattr(self, BASIC_PREFIX)
        return [self.blocks[str(j)] if j == self.block else basic[str(j)] for j in range(self.num_blocks)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers():
            x = layer(x)
        return getattr(self, BASIC_PREFIX)[HEAD](x)

    def trainable_prefixes(self) -> tuple[str, ...]:
        """State-key prefixes of what a client trains and uploads (everything in the sub-model)."""
        return shrink_prefixes(self.block)


def shrink_prefixes(block: int) -> tuple[str, ...]:
    """State-key prefixes of shrinking step ``block``'s sub-model (select with :func:`shrink_keys`)."""
    return (f"blocks.{block}.", f"{BASIC_PREFIX}.")


def shrink_keys(keys: Any, block: int) -> list[str]:
    """The keys of shrinking step ``block`` among ``keys``: real block ``block``, every basic layer but its own."""
    own = f"{BASIC_PREFIX}.{block}."
    return [k for k in keys if k.startswith(shrink_prefixes(block)) and not k.startswith(own)]


# ----------------------------------------------------------------------------------------------
# Shrinking -> growing: basic layers become output modules
# ----------------------------------------------------------------------------------------------


def outmod_from_basic(arrays: Mapping[str, np.ndarray], block: int, num_blocks: int) -> dict[str, np.ndarray]:
    """Growing's tail of ``block`` from the basic layers in ``arrays`` (copies, keys renamed).

    For ``block`` < B-1, output module ``block`` (:class:`common.output_modules.OutputModule`
    layout): ``outmod.<block>.convs.<3 (j - block - 1) + i>.*`` <- ``basic.<j>.<i>.*`` for the
    blocks j after ``block`` and ``outmod.<block>.classifier.*`` <- ``basic.head.*``. For the last
    block, ``head.*`` <- ``basic.head.*``. Every key of the tail is produced; missing basic keys raise.
    """
    _check_block(block, num_blocks)
    out: dict[str, np.ndarray] = {}
    head_src = f"{BASIC_PREFIX}.{HEAD}."
    for key, value in arrays.items():
        if not key.startswith(f"{BASIC_PREFIX}."):
            continue
        if key.startswith(head_src):
            rest = key[len(head_src) :]
            new = f"head.{rest}" if block == num_blocks - 1 else f"{OUTMOD_PREFIX}.{block}.classifier.{rest}"
        else:
            j_str, index, name = key[len(BASIC_PREFIX) + 1 :].split(".", 2)
            j = int(j_str)
            if j <= block:
                continue
            position = LAYERS_PER_BLOCK * (j - block - 1) + int(index)
            new = f"{OUTMOD_PREFIX}.{block}.convs.{position}.{name}"
        out[new] = np.array(value, copy=True)
    if not any(k.startswith(("head.", f"{OUTMOD_PREFIX}.{block}.classifier.")) for k in out):
        raise KeyError(f"outmod_from_basic: no {head_src}* arrays to carry into block {block}'s tail")
    later = {int(k.split(".")[1]) for k in arrays if k.startswith(f"{BASIC_PREFIX}.") and not k.startswith(head_src)}
    missing = sorted(set(range(block + 1, num_blocks)) - later)
    if missing:
        raise KeyError(f"outmod_from_basic: basic layers {missing} missing for block {block}'s output module")
    return out


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProFLStep:
    """One step of the schedule: the phase and the 0-based block it trains."""

    phase: str
    block: int

    @property
    def label(self) -> str:
        """``S<k>`` (shrinking) or ``G<k>`` (growing), 1-based block."""
        return f"{self.phase[0].upper()}{self.block + 1}"


@dataclass(frozen=True)
class ProFLSchedule:
    """Order of ProFL's steps: shrinking B-1..0 then growing 0..B-1 (growing only without shrinking).

    Step ``i`` is the stage machine's stage ``i`` (:class:`common.stages.StageMachine` with
    ``num_blocks = num_steps``); JSON-serialisable through :meth:`state_dict`.
    """

    num_blocks: int
    shrinking: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or self.num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {self.num_blocks!r}")

    @property
    def num_steps(self) -> int:
        """2B with shrinking, B without."""
        return self.num_blocks * (2 if self.shrinking else 1)

    def step(self, index: int) -> ProFLStep:
        """The step at 0-based position ``index``."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_steps:
            raise ValueError(f"step index must be an int in 0..{self.num_steps - 1}, got {index!r}")
        shrink_steps = self.num_blocks if self.shrinking else 0
        if index < shrink_steps:
            return ProFLStep("shrinking", self.num_blocks - 1 - index)
        return ProFLStep("growing", index - shrink_steps)

    def steps(self) -> list[ProFLStep]:
        """Every step in order."""
        return [self.step(i) for i in range(self.num_steps)]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> ProFLSchedule:
        """Rebuild from :meth:`state_dict` output."""
        return cls(**dict(state))


def fair_share(total_rounds: int, start_round: int, steps_left: int) -> int:
    """Most rounds a step starting at ``start_round`` (1-based) may run: ceil(rounds left / steps left).

    ``steps_left`` counts the step itself. The rounds left are ``total_rounds - start_round + 1``.
    """
    left = total_rounds - start_round + 1
    if steps_left < 1 or left < 1:
        raise ValueError(f"fair_share needs steps_left >= 1 and rounds left >= 1, got {steps_left} and {left}")
    return -(-left // steps_left)


# ----------------------------------------------------------------------------------------------
# Memory and FLOPs of a shrinking step
# ----------------------------------------------------------------------------------------------


def _shrink_proxy(model: BlockModel, block: int) -> BlockModel:
    """Shrinking step ``block`` as a :class:`BlockModel` (its layers as blocks, the classifier as head).

    Same modules, same forward as :class:`ShrinkModel`, so full-model training of it is the step.
    """
    _check_block(block, model.num_blocks)
    basic = build_basic_layers(model)
    layers = ShrinkModel(model, block, basic).layers()
    return BlockModel(
        layers, basic[HEAD], list(model.specs), f"{model.arch}-profl-shrink{block}", model.num_classes, model.width
    )


@functools.lru_cache(maxsize=64)
def shrink_memory(
    name: str, num_classes: int, width: float, block: int, batch_size: int, input_shape: tuple[int, ...] = (3, 32, 32)
) -> MemoryBreakdown:
    """Modelled training memory (MB, 2**20 bytes) of shrinking step ``block`` at ``batch_size``.

    Every parameter of :class:`ShrinkModel` is trained, so this is full-model training of it:
    :func:`common.memory.stage_memory` (``stage=None``: one SGD step with momentum and weight
    decay replayed on meta tensors) of a :class:`BlockModel` made of its layers. Cached per process.
    """
    with torch.device("meta"):
        model = build_model(name, num_classes, width)
        proxy = _shrink_proxy(model, block)
    return stage_memory(proxy, None, batch_size, tuple(input_shape))


@functools.lru_cache(maxsize=64)
def shrink_flops(
    name: str, num_classes: int, width: float, block: int, input_shape: tuple[int, ...] = (3, 32, 32)
) -> StageFlops:
    """FLOPs per training sample of shrinking step ``block``: forward of the sub-model, backward twice that
    (everything is trained; the same counting as :func:`common.flops.stage_flops`)."""
    model = build_model(name, num_classes, width, seed=0)
    sub = ShrinkModel(model, block, build_basic_layers(model, seed=0))
    fwd, _ = forward_flops(sub, torch.zeros(1, *input_shape))
    return StageFlops(fwd, 2.0 * fwd)
