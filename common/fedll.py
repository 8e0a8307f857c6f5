"""FedLL: layer-wise federated training with depth dropout (pure model logic, no Flower).

Layers
    The unit of training is one *layer* of the model (:func:`model_layers`): a residual
    BasicBlock for the ResNets, a conv layer (conv + BN + ReLU, with the max-pool that follows it)
    for the VGGs and the small CNN, an encoder layer for the ViT. Modules of a block that are not
    such a unit join a neighbour: those before a block's first unit (the ResNet stem, the ViT's
    patch embedding) join that unit, those after one (BN, ReLU, pooling, the ViT's final
    LayerNorm) join it. So layer 0 of a ResNet is stem + first BasicBlock; ResNet10 has 4 layers,
    ResNet18 8, VGG11-BN 8, VGG16-BN 13, the small CNN 3, the zoo's ViT 8. A layer's modules keep
    their global names (``blocks.<b>.<i>.*``), so a sub-model's arrays drop into the global state.

Stage sub-model (:class:`FedLLModel`)
    Stage k trains layer k with a head on top; layers 0..k-1 are frozen (``requires_grad=False``,
    BN in eval mode, run under ``no_grad`` in micro-batches of ``frozen_chunk`` samples, as
    SmartFreeze's frozen prefix); layers after k do not exist in the sub-model. The head of stage
    k < L-1 is a fresh classifier on layer k's output (global average pooling, flatten, linear:
    the layout of every model's head in the zoo, the ViT's included), state keys
    ``lhead.<k>.*``; the last stage uses the model's own head, so the last stage is the full
    network with everything but the last layer frozen.

Depth dropout
    During local training (train mode) each *frozen* layer whose per-sample input and output
    shapes are equal (:attr:`LayerProfile.droppable`: a stride-1 BasicBlock without channel
    change, a conv layer without pooling or channel change, a ViT encoder layer after the first)
    is skipped, i.e. replaced by the identity, with probability ``p`` independently for every
    batch, from a generator seeded by the caller (the round's per-node seed). The active layer
    and shape-changing layers are never skipped; ``p = 0`` and eval mode are exactly the plain
    forward. A skip saves the layer's forward compute; :attr:`FedLLModel.skipped_flops` over
    :attr:`FedLLModel.frozen_flops` is the saved share of the frozen forward FLOPs
    (:func:`common.flops.forward_flops` per layer, times the batch size).

Self-supervised mode (``fedll-objective='ssl'``, :mod:`common.ssl`)
    Every layer k, the last included, trains with its own projection head (state keys
    ``sslhead.<k>.*``) on two augmented views of the local images; labels are not read. The
    model's classifier ``head.*`` is not trained by the federation: the downstream linear probe
    is fitted on the server. :class:`EndToEndModel` is the end-to-end reference
    (``fedll-layerwise=false``): every layer trained every round, under the last layer's head (the
    projection head of layer L-1 in SSL, the model's classifier when supervised).

Memory (:func:`required_mb`)
    One SGD step of the stage sub-model replayed on meta tensors by :func:`common.memory.replay_step`
    (the machinery of SmartFreeze's Eq. 4 model), without dropout: skips happen in the frozen
    forward only, which stores nothing for backward, so the plain forward is the upper bound.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.flops import StageFlops, forward_flops
from common.memory import replay_step
from common.models import BasicBlock, BlockModel, EncoderLayer, build_model
from common.output_modules import DEFAULT_FROZEN_CHUNK

__all__ = [
    "HEAD_PREFIX",
    "SSL_HEAD_PREFIX",
    "EndToEndModel",
    "FedLLModel",
    "Layer",
    "LayerProfile",
    "build_layer_head",
    "build_layer_heads",
    "build_ssl_heads",
    "dropout_seed",
    "frozen_layer_prefixes",
    "layer_keys",
    "model_layers",
    "num_layers",
    "profile_layers",
    "required_mb",
    "stage_flops",
    "stage_prefixes",
    "warm_start_head",
]

HEAD_PREFIX = "lhead"
"""State-key prefix of the per-layer heads: ``lhead.<k>.*`` is the head of stage k < L-1."""

SSL_HEAD_PREFIX = "sslhead"
"""State-key prefix of the self-supervised projection heads: ``sslhead.<k>.*`` for every layer k."""

_UNIT_TYPES: tuple[type[nn.Module], ...] = (BasicBlock, EncoderLayer)
"""Module types that are one layer each; models without any use their convolutions as layers."""


@dataclass(frozen=True)
class Layer:
    """One FedLL layer: its modules as (block index, child name) of ``model.blocks[b]``."""

    index: int
    members: tuple[tuple[int, str], ...]

    @property
    def prefixes(self) -> tuple[str, ...]:
        """State-key prefixes of the layer's modules (``blocks.<b>.<i>.``)."""
        return tuple(f"blocks.{b}.{name}." for b, name in self.members)

    def modules(self, model: BlockModel) -> list[nn.Module]:
        """The layer's modules of ``model``, in forward order (shared, not copied)."""
        return [model.blocks[b].get_submodule(name) for b, name in self.members]


@dataclass(frozen=True)
class LayerProfile:
    """Per-sample input/output shapes and forward FLOPs of one layer."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    flops: float

    @property
    def droppable(self) -> bool:
        """True if input and output shapes match: depth dropout may replace the layer by the identity."""
        return self.in_shape == self.out_shape


def model_layers(model: BlockModel) -> list[Layer]:
    """The FedLL layers of ``model`` in forward order (see the module docstring)."""
    unit_types = _UNIT_TYPES if any(isinstance(m, _UNIT_TYPES) for m in model.modules()) else (nn.Conv2d,)
    layers: list[list[tuple[int, str]]] = []
    for b, block in enumerate(model.blocks):
        children = list(block.named_children()) if isinstance(block, nn.Sequential) else [("", block)]
        pending: list[tuple[int, str]] = []
        current: list[tuple[int, str]] | None = None
        for name, child in children:
            if not name:
                raise ValueError(f"{model.arch}: block {b} is not a Sequential; cannot split it into layers")
            if isinstance(child, unit_types):
                current = [*pending, (b, name)]
                pending = []
                layers.append(current)
            elif current is None:
                pending.append((b, name))
            else:
                current.append((b, name))
        if pending:
            kinds = ", ".join(t.__name__ for t in unit_types)
            raise ValueError(f"{model.arch}: block {b} ends with modules that belong to no layer (layers: {kinds})")
    return [Layer(i, tuple(members)) for i, members in enumerate(layers)]


def _profile(layers: Sequence[Sequence[nn.Module]], input_shape: Sequence[int]) -> list[LayerProfile]:
    """:func:`profile_layers` of the given layers' modules, in order from the input."""
    device = next(p for mods in layers for mod in mods for p in mod.parameters()).device
    x = torch.zeros((1, *input_shape), device=device)
    modes = [(m, m.training) for mods in layers for mod in mods for m in mod.modules()]
    out: list[LayerProfile] = []
    try:
        for mods in layers:
            flops, y = forward_flops(nn.Sequential(*mods), x)
            out.append(LayerProfile(tuple(x.shape[1:]), tuple(y.shape[1:]), flops))
            x = y
    finally:
        for m, mode in modes:
            m.training = mode
    return out


def profile_layers(model: BlockModel, input_shape: Sequence[int] = (3, 32, 32)) -> list[LayerProfile]:
    """Shapes and forward FLOPs per sample of every layer (one forward of a single zero sample).

    Runs in eval mode without autograd on the model's device (``meta`` works) and leaves every
    module's train/eval mode and all state as it was.
    """
    return _profile([lay.modules(model) for lay in model_layers(model)], input_shape)


@functools.lru_cache(maxsize=32)
def num_layers(arch: str) -> int:
    """Number of FedLL layers of zoo model ``arch`` (independent of the width)."""
    with torch.device("meta"):
        return len(model_layers(build_model(arch, width=0.0625)))


def build_layer_head(channels: int, num_classes: int) -> nn.Sequential:
    """Head of a FedLL stage: global average pooling, flatten, linear (the zoo's head layout)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def build_layer_heads(
    model: BlockModel, input_shape: Sequence[int] = (3, 32, 32), seed: int | None = None
) -> nn.ModuleDict:
    """Heads of stages ``0 .. L-2`` keyed ``"0" .. str(L-2)`` (seeded init with ``seed``, global RNG untouched)."""
    profiles = profile_layers(model, input_shape)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return nn.ModuleDict(
            {str(k): build_layer_head(p.out_shape[0], model.num_classes) for k, p in enumerate(profiles[:-1])}
        )


def build_ssl_heads(
    model: BlockModel, method: str, dim: int, input_shape: Sequence[int] = (3, 32, 32), seed: int | None = None
) -> nn.ModuleDict:
    """Projection heads of objective ``method`` (:func:`common.ssl.projection_head`) for every layer, keyed ``"0"``.."""
    from common.ssl import projection_head

    profiles = profile_layers(model, input_shape)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return nn.ModuleDict({str(k): projection_head(method, p.out_shape[0], dim) for k, p in enumerate(profiles)})


def head_prefix(layers: Sequence[Layer], layer: int, ssl: bool = False) -> str:
    """State-key prefix of stage ``layer``'s head: ``sslhead.<k>.`` in SSL, else ``lhead.<k>.`` (``head.`` last)."""
    if ssl:
        return f"{SSL_HEAD_PREFIX}.{layer}."
    return "head." if layer == len(layers) - 1 else f"{HEAD_PREFIX}.{layer}."


def stage_prefixes(layers: Sequence[Layer], layer: int, ssl: bool = False) -> tuple[str, ...]:
    """State-key prefixes of what stage ``layer`` trains: the layer and its head (see :func:`head_prefix`)."""
    return (*layers[layer].prefixes, head_prefix(layers, layer, ssl))


def end_to_end_prefixes(layers: Sequence[Layer], ssl: bool = False) -> tuple[str, ...]:
    """State-key prefixes of what the end-to-end reference trains: every layer and the last layer's head."""
    return (*(p for lay in layers for p in lay.prefixes), head_prefix(layers, len(layers) - 1, ssl))


def frozen_layer_prefixes(layers: Sequence[Layer], layer: int) -> tuple[str, ...]:
    """State-key prefixes of the frozen layers ``0 .. layer-1``."""
    return tuple(p for lay in layers[:layer] for p in lay.prefixes)


def layer_keys(keys: Sequence[str], layers: Sequence[Layer]) -> dict[int, list[str]]:
    """Which of ``keys`` belong to which layer (layers without keys are left out)."""
    out: dict[int, list[str]] = {}
    for lay in layers:
        held = [k for k in keys if k.startswith(lay.prefixes)]
        if held:
            out[lay.index] = held
    return out


def dropout_seed(seed: int) -> int:
    """Seed of the depth-dropout generator derived from a node's round seed (a stream distinct from
    the one ``train_local`` shuffles with)."""
    return int(np.random.default_rng([abs(int(seed)), 0xFED11]).integers(0, 2**31 - 1))


class _Holder(nn.Module):
    """Container that registers some children of a block under their original names."""


class FedLLModel(nn.Module):
    """Frozen layers ``0..k-1`` + active layer ``k`` + head (``lhead.<k>`` or the model's), with depth dropout.

    Shares its modules with ``model`` and ``head`` (loading arrays into it updates them); its state
    keys are the global ones. ``dropout`` is the skip probability p of every droppable frozen layer
    per training batch, drawn from a generator seeded with ``seed``. After training,
    :attr:`frozen_flops` and :attr:`skipped_flops` hold the frozen forward FLOPs the batches would
    have cost and those the skips saved; :attr:`last_skipped` the layers skipped in the last batch.
    """

    def __init__(
        self,
        model: BlockModel,
        layer: int,
        head: nn.Module | None,
        *,
        dropout: float = 0.0,
        seed: int = 0,
        frozen_chunk: int = DEFAULT_FROZEN_CHUNK,
        input_shape: Sequence[int] = (3, 32, 32),
        ssl: bool = False,
    ) -> None:
        super().__init__()
        layers = model_layers(model)
        last = len(layers) - 1
        if not 0 <= layer <= last:
            raise ValueError(f"layer must be in 0..{last} for {model.arch} ({last + 1} layers), got {layer}")
        if ssl and head is None:
            raise ValueError("a self-supervised stage needs its projection head (every layer has one)")
        if not ssl and (layer == last) != (head is None):
            raise ValueError("the last layer uses the model head; every other layer needs its own head")
        self.ssl = ssl
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"depth dropout probability must be in [0, 1), got {dropout!r}")
        if isinstance(frozen_chunk, bool) or not isinstance(frozen_chunk, int) or frozen_chunk < 0:
            raise ValueError(f"frozen_chunk must be an int >= 0 (0 = no chunking), got {frozen_chunk!r}")
        self.layer = layer
        self.num_layers = last + 1
        self.dropout = float(dropout)
        self.frozen_chunk = frozen_chunk
        self.layer_specs: tuple[Layer, ...] = tuple(layers)
        self._layers: list[list[nn.Module]] = [lay.modules(model) for lay in layers[: layer + 1]]
        self._set_profiles(tuple(input_shape))
        self._prefixes = stage_prefixes(layers, layer, ssl)
        holders: dict[str, nn.Module] = {}
        for lay in layers[: layer + 1]:
            for (b, name), module in zip(lay.members, lay.modules(model), strict=True):
                holders.setdefault(str(b), _Holder()).add_module(name, module)
        self.blocks = nn.ModuleDict(holders)
        if head is None:
            self.head = model.head
        else:
            setattr(self, SSL_HEAD_PREFIX if ssl else HEAD_PREFIX, nn.ModuleDict({str(layer): head}))
        for modules in self._layers[:layer]:
            for m in modules:
                m.requires_grad_(False)
        for m in self.trainable_modules():
            m.requires_grad_(True)
        for p in self.parameters():
            p.grad = None  # a skeleton reused across rounds keeps the gradients of the layer trained last
        self._gen = torch.Generator().manual_seed(int(seed))
        self.frozen_flops = 0.0
        self.skipped_flops = 0.0
        self.last_skipped: tuple[int, ...] = ()
        self.train(self.training)

    def _set_profiles(self, input_shape: tuple[int, ...]) -> None:
        """Per-layer shapes and FLOPs for samples of ``input_shape``, and the droppable frozen layers."""
        self.input_shape = input_shape
        self.profiles = _profile(self._layers, input_shape)
        self.droppable: tuple[int, ...] = tuple(i for i in range(self.layer) if self.profiles[i].droppable)

    def trainable_modules(self) -> list[nn.Module]:
        """The active layer's modules and the head."""
        return [*self._layers[self.layer], self.tail_module]

    @property
    def tail_module(self) -> nn.Module:
        """The head of this stage (``lhead.<k>``, ``sslhead.<k>``, or the model's head at the last layer)."""
        if self.ssl:
            return getattr(self, SSL_HEAD_PREFIX)[str(self.layer)]
        return self.head if self.layer == self.num_layers - 1 else getattr(self, HEAD_PREFIX)[str(self.layer)]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's encoder output (frozen layers and layer k, no head): downstream features."""
        return self._run([self.layer], self.frozen_forward(x))

    @property
    def skipped_share(self) -> float:
        """Share of the frozen forward FLOPs saved by depth dropout so far (0 without frozen work)."""
        return self.skipped_flops / self.frozen_flops if self.frozen_flops > 0 else 0.0

    def trainable_prefixes(self) -> tuple[str, ...]:
        """State-key prefixes of the trained part (what a client uploads)."""
        return self._prefixes

    def _draw_skips(self) -> tuple[int, ...]:
        if not self.training or self.dropout <= 0 or not self.droppable:
            return ()
        u = torch.rand(len(self.droppable), generator=self._gen)
        return tuple(i for i, ui in zip(self.droppable, u.tolist(), strict=True) if ui < self.dropout)

    def _run(self, layers: Sequence[int], x: torch.Tensor) -> torch.Tensor:
        for i in layers:
            for m in self._layers[i]:
                x = m(x)
        return x

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen layers without autograd, ``frozen_chunk`` samples at a time, minus the skipped ones.

        In train mode the skips of this batch are drawn first (one draw per droppable frozen
        layer) and the FLOP counters advance; in eval mode every layer runs. Samples of another
        shape than the profiled one are profiled again first.
        """
        if self.training and tuple(x.shape[1:]) != self.input_shape:
            self._set_profiles(tuple(x.shape[1:]))
        skipped = self._draw_skips()
        self.last_skipped = skipped
        run = [i for i in range(self.layer) if i not in skipped]
        if self.training and self.layer > 0:
            self.frozen_flops += len(x) * sum(p.flops for p in self.profiles[: self.layer])
            self.skipped_flops += len(x) * sum(self.profiles[i].flops for i in skipped)
        chunk = self.frozen_chunk
        with torch.no_grad():
            if not run or chunk == 0 or len(x) <= chunk:
                return self._run(run, x)
            out: torch.Tensor | None = None
            for start in range(0, len(x), chunk):
                part = self._run(run, x[start : start + chunk])
                if out is None:
                    channels_last = part.dim() == 4 and not part.is_contiguous()
                    channels_last = channels_last and part.is_contiguous(memory_format=torch.channels_last)
                    out = torch.empty(
                        (len(x), *part.shape[1:]),
                        dtype=part.dtype,
                        device=part.device,
                        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
                    )
                out[start : start + len(part)] = part
                del part
        assert out is not None
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.frozen_forward(x)
        return self.tail_module(self._run([self.layer], x))

    def train(self, mode: bool = True) -> FedLLModel:
        super().train(mode)
        for modules in self._layers[: self.layer]:
            for m in modules:
                m.eval()
        return self


class EndToEndModel(nn.Module):
    """The end-to-end reference of FedLL (``fedll-layerwise=false``): every layer trained, the last layer's head.

    Shares the model's blocks (keys ``blocks.<b>.*``, as the global state) and its head: the
    projection head ``sslhead.<L-1>`` in SSL, the model's classifier ``head`` otherwise.
    """

    def __init__(self, model: BlockModel, head: nn.Module | None, ssl: bool = False) -> None:
        super().__init__()
        if ssl == (head is None):
            raise ValueError("end to end: a projection head in SSL, the model's head (None) when supervised")
        self.layer_specs: tuple[Layer, ...] = tuple(model_layers(model))
        self.ssl = ssl
        self.blocks = model.blocks
        last = len(self.layer_specs) - 1
        if head is None:
            self.head = model.head
        else:
            setattr(self, SSL_HEAD_PREFIX, nn.ModuleDict({str(last): head}))
        self._prefixes = end_to_end_prefixes(self.layer_specs, ssl)
        self.requires_grad_(True)
        for p in self.parameters():
            p.grad = None

    @property
    def tail_module(self) -> nn.Module:
        """The head trained with the encoder."""
        return getattr(self, SSL_HEAD_PREFIX)[str(len(self.layer_specs) - 1)] if self.ssl else self.head

    def trainable_prefixes(self) -> tuple[str, ...]:
        """Every layer and the head (what a client uploads)."""
        return self._prefixes

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's output (no head): downstream features."""
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail_module(self.encode(x))


def stage_flops(
    model: BlockModel, layer: int | None, dropout: float = 0.0, input_shape: Sequence[int] = (3, 32, 32)
) -> StageFlops:
    """FLOPs per training sample of stage ``layer`` (None: full-model training), Eq. 5 of SmartFreeze.

    Forward: the frozen layers (droppable ones weighted by ``1 - dropout``, the expected share that
    runs), the active layer and the head; backward: twice the active layer's and the head's forward.
    """
    profiles = profile_layers(model, input_shape)
    last = len(profiles) - 1
    if layer is not None and not 0 <= layer <= last:
        raise ValueError(f"layer must be in 0..{last} or None, got {layer}")
    if layer is None:
        fwd = sum(p.flops for p in profiles) + _head_flops(model.num_classes, profiles[-1].out_shape)
        return StageFlops(fwd, 2.0 * fwd)
    frozen = sum(p.flops * ((1.0 - dropout) if p.droppable else 1.0) for p in profiles[:layer])
    trained = profiles[layer].flops + _head_flops(model.num_classes, profiles[layer].out_shape)
    return StageFlops(frozen + trained, 2.0 * trained)


def _head_flops(num_classes: int, shape: tuple[int, ...]) -> float:
    """Forward FLOPs per sample of a pool + linear head on a (C, H, W) feature map."""
    c = shape[0]
    spatial = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return float(c * spatial + 2 * c * num_classes)


@functools.lru_cache(maxsize=128)
def required_mb(
    arch: str,
    num_classes: int,
    width: float,
    layer: int,
    batch_size: int,
    input_shape: tuple[int, ...] = (3, 32, 32),
    frozen_chunk: int = DEFAULT_FROZEN_CHUNK,
    ssl_method: str = "",
    proj_dim: int = 64,
    end_to_end: bool = False,
) -> float:
    """Modelled training memory (MB, 2**20 bytes) of FedLL stage ``layer`` at ``batch_size``.

    The stage sub-model (:class:`FedLLModel` without dropout, SGD with momentum and weight decay)
    built on meta tensors and replayed by :func:`common.memory.replay_step`; with ``end_to_end``
    the reference that trains every layer (:class:`EndToEndModel`, ``layer`` ignored). With
    ``ssl_method`` (``ssl-method``) the self-supervised step: both views, a batch of 2 x
    ``batch_size``, through the sub-model with that objective's projection head of ``proj_dim``
    and its loss. Cached per process.
    """
    from common.ssl import method

    ssl = bool(ssl_method)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_model(arch, num_classes, width)
        layers = model_layers(model)
        last = len(layers) - 1
        if ssl:
            head = build_ssl_heads(model, ssl_method, proj_dim, input_shape)[str(last if end_to_end else layer)]
        else:
            head = None if end_to_end or layer == last else build_layer_heads(model, input_shape)[str(layer)]
        if end_to_end:
            net: nn.Module = EndToEndModel(model, head, ssl)
        else:
            net = FedLLModel(model, layer, head, frozen_chunk=frozen_chunk, input_shape=input_shape, ssl=ssl)
    loss_fn = None
    batch = batch_size
    if ssl:
        objective = method(ssl_method).loss
        batch = 2 * batch_size

        def loss_fn(out: torch.Tensor) -> torch.Tensor:
            return objective(out[:batch_size], out[batch_size:], 0.5).mean()

    if end_to_end:
        first = net.blocks[0]
        breakdown = replay_step(net, first, net.tail_module, [], batch, tuple(input_shape), True, True, loss_fn)
        return breakdown.total
    frozen = [m for modules in net._layers[:layer] for m in modules]
    breakdown = replay_step(
        net, net._layers[layer][0], net.tail_module, frozen, batch, tuple(input_shape), True, True, loss_fn
    )
    return breakdown.total


def warm_start_head(arrays: Mapping[str, np.ndarray], layer: int, num_layers: int) -> dict[str, np.ndarray]:
    """Initial arrays of stage ``layer``'s head copied from stage ``layer - 1``'s trained head.

    Every array of head ``layer - 1`` whose counterpart in head ``layer`` (``head.*`` at the last
    stage) has the same shape is copied (the linear layer when the two layers have the same output
    channels); the others keep their initialisation. Returns only the copied arrays.
    """
    if not 1 <= layer < num_layers:
        raise ValueError(f"warm start needs a layer in 1..{num_layers - 1}, got {layer}")
    prev = f"{HEAD_PREFIX}.{layer - 1}."
    new = "head." if layer == num_layers - 1 else f"{HEAD_PREFIX}.{layer}."
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if key.startswith(prev):
            target = new + key[len(prev) :]
            if target in arrays and np.shape(arrays[target]) == np.shape(value):
                out[target] = np.array(value, copy=True)
    return out
