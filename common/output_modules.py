"""SmartFreeze output modules and stage sub-models (Sec. IV-A of the paper).

For block k of B (0-based here), the *output module* stands in for blocks k+1..B-1: one 3x3
conv per later block j with block j's output channels and stride (plus BN and ReLU), then
global average pooling and a linear classifier, so that block k keeps its position in the
network (NeuLite/SmartFreeze). The last block has no output module: it uses the model's head.

The *stage sub-model* of stage k is frozen blocks 0..k-1 (run without autograd, BN in eval
mode, in micro-batches of ``frozen_chunk`` samples), the active block k, and output module k (or
the head for the last stage). Its state keys
are the global ones (``blocks.<i>.*``, ``head.*``) plus ``outmod.<k>.*`` for the output module,
so a sub-model's arrays drop straight into the server's global state.
"""

from __future__ import annotations

import torch
from torch import nn

from common.models import BlockModel, BlockSpec

OUTMOD_PREFIX = "outmod"
DEFAULT_FROZEN_CHUNK = 16
"""Samples per micro-batch of the frozen forward (:attr:`StageModel.frozen_chunk`); 0 = whole batch."""


LAYERS_PER_BLOCK = 3
"""Modules per replaced block in :attr:`OutputModule.convs` (conv, BN, ReLU)."""


def basic_layer(in_channels: int, spec: BlockSpec) -> list[nn.Module]:
    """The lightweight stand-in for one block (NeuLite/ProFL *basic layer*): a 3x3 conv with the
    block's output channels and stride, BN and ReLU (:data:`LAYERS_PER_BLOCK` modules)."""
    return [
        nn.Conv2d(in_channels, spec.out_channels, 3, spec.stride, 1, bias=False),
        nn.BatchNorm2d(spec.out_channels),
        nn.ReLU(inplace=True),
    ]


def classifier(in_channels: int, num_classes: int) -> nn.Sequential:
    """Global average pooling, flatten and a linear layer (the layout of the models' heads)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))


class OutputModule(nn.Module):
    """Convs standing in for the blocks after the active one, then pool + linear classifier."""

    def __init__(self, later: list[BlockSpec], in_channels: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for spec in later:
            layers += basic_layer(ch, spec)
            ch = spec.out_channels
        self.convs = nn.Sequential(*layers)
        self.classifier = classifier(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.convs(x))


def build_output_module(model: BlockModel, stage: int) -> OutputModule:
    """Output module for ``stage`` (0-based, < B-1) of ``model``."""
    if not 0 <= stage < model.num_blocks - 1:
        raise ValueError(f"output modules exist for stages 0..{model.num_blocks - 2}, got stage {stage}")
    return OutputModule(list(model.specs[stage + 1 :]), model.specs[stage].out_channels, model.num_classes)


def build_output_modules(model: BlockModel, seed: int | None = None) -> nn.ModuleDict:
    """All output modules of ``model``, keyed ``"0" .. str(B-2)`` (seeded init if ``seed``)."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return nn.ModuleDict({str(k): build_output_module(model, k) for k in range(model.num_blocks - 1)})


def stage_prefixes(stage: int, num_blocks: int) -> tuple[str, ...]:
    """State-key prefixes of what stage ``stage`` trains: block ``stage`` and its output module/head."""
    tail = "head." if stage == num_blocks - 1 else f"{OUTMOD_PREFIX}.{stage}."
    return (f"blocks.{stage}.", tail)


def frozen_prefixes(stage: int) -> tuple[str, ...]:
    """State-key prefixes of the frozen blocks before ``stage``."""
    return tuple(f"blocks.{i}." for i in range(stage))


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """``channels_last`` for a 4-D tensor laid out that way (and not also plainly contiguous), else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class StageModel(nn.Module):
    """Frozen blocks 0..k-1 + active block k + output module k (or the head at the last stage).

    Shares its modules with the ``BlockModel`` and output module given, so loading arrays into
    it updates them. The frozen prefix has ``requires_grad=False``, stays in eval mode and runs
    under ``torch.no_grad()``: no activations stored, no backward through it. It runs in
    micro-batches of :attr:`frozen_chunk` samples (see :meth:`frozen_forward`).
    """

    def __init__(
        self,
        model: BlockModel,
        stage: int,
        output_module: nn.Module | None,
        frozen_chunk: int = DEFAULT_FROZEN_CHUNK,
    ) -> None:
        super().__init__()
        self.frozen_chunk = frozen_chunk
        last = model.num_blocks - 1
        if not 0 <= stage <= last:
            raise ValueError(f"stage must be in 0..{last}, got {stage}")
        if (stage == last) != (output_module is None):
            raise ValueError("the last stage uses the model head; every other stage needs its output module")
        self.stage = stage
        self.num_blocks = model.num_blocks
        self.blocks = nn.ModuleList(list(model.blocks[: stage + 1]))
        if output_module is None:
            self.head = model.head
        else:
            setattr(self, OUTMOD_PREFIX, nn.ModuleDict({str(stage): output_module}))
        for block in self.blocks[:stage]:
            block.requires_grad_(False)
            for p in block.parameters():
                p.grad = None  # a skeleton reused across rounds keeps the gradients of earlier stages
        for module in self.trainable_modules():
            module.requires_grad_(True)

    def trainable_modules(self) -> list[nn.Module]:
        """The active block and the output module (or head)."""
        tail = self.head if self.stage == self.num_blocks - 1 else getattr(self, OUTMOD_PREFIX)
        return [self.blocks[self.stage], tail]

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """Output module (or head) applied to the active block's output."""
        if self.stage == self.num_blocks - 1:
            return self.head(x)
        return getattr(self, OUTMOD_PREFIX)[str(self.stage)](x)

    @property
    def frozen_chunk(self) -> int:
        """Samples per micro-batch of the frozen forward (0: the whole batch at once); settable."""
        return self._frozen_chunk

    @frozen_chunk.setter
    def frozen_chunk(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"frozen_chunk must be an int >= 0 (0 = no chunking), got {value!r}")
        self._frozen_chunk = value

    def _frozen_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks[: self.stage]:
            x = block(x)
        return x

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward through the frozen prefix without autograd, ``frozen_chunk`` samples at a time.

        The frozen prefix keeps nothing for backward and its BN layers use their running
        statistics (eval mode), so every sample's output depends on that sample alone: running it
        in micro-batches and writing each into the output tensor gives the same result as one
        batch, while the frozen blocks' intermediate activations and convolution buffers scale
        with the chunk instead of the batch (memory: the output plus one chunk's working set).
        """
        chunk = self.frozen_chunk
        with torch.no_grad():
            if self.stage == 0 or chunk == 0 or len(x) <= chunk:
                return self._frozen_blocks(x)
            out: torch.Tensor | None = None
            for start in range(0, len(x), chunk):
                part = self._frozen_blocks(x[start : start + chunk])
                if out is None:
                    out = torch.empty(
                        (len(x), *part.shape[1:]),
                        dtype=part.dtype,
                        device=part.device,
                        memory_format=_memory_format(part),
                    )
                out[start : start + len(part)] = part
                del part
        assert out is not None
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.frozen_forward(x)
        return self.tail(self.blocks[self.stage](x))

    def train(self, mode: bool = True) -> StageModel:
        super().train(mode)
        for block in self.blocks[: self.stage]:
            block.eval()
        return self

    def trainable_prefixes(self) -> tuple[str, ...]:
        """State-key prefixes of the trained part (what a client uploads)."""
        return stage_prefixes(self.stage, self.num_blocks)
