"""Model zoo expressed as ordered blocks plus a classifier head.

Every model is a :class:`BlockModel`: ``forward(x) == head(blocks[-1](...blocks[0](x)))``.
The blocks follow each architecture's own structure (ResNet: its four residual stages, the
stem folded into the first; VGG: the conv groups between poolings, each ending with its pool),
and each block carries a :class:`BlockSpec` (channels in/out, spatial stride) so that the
progressive strategies can build output modules and sub-models without knowing the model.

Parameter keys are ``blocks.<k>.*`` and ``head.*``, so the arrays of one block are the keys
with prefix ``blocks.<k>.``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "MODEL_NAMES",
    "BlockModel",
    "BlockSpec",
    "BasicBlock",
    "build_model",
    "count_parameters",
    "scaled",
]


@dataclass(frozen=True)
class BlockSpec:
    """Shape contract of one block: input/output channels and spatial downsampling factor."""

    name: str
    in_channels: int
    out_channels: int
    stride: int


class BlockModel(nn.Module):
    """A classifier made of ordered blocks and a head; forward runs them in order."""

    def __init__(
        self,
        blocks: list[nn.Module],
        head: nn.Module,
        specs: list[BlockSpec],
        arch: str,
        num_classes: int,
        width: float,
    ) -> None:
        super().__init__()
        if len(blocks) != len(specs):
            raise ValueError(f"{len(blocks)} blocks but {len(specs)} block specs")
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.specs: tuple[BlockSpec, ...] = tuple(specs)
        self.arch = arch
        self.num_classes = num_classes
        self.width = width

    @property
    def num_blocks(self) -> int:
        """Number of blocks B (the head is not a block)."""
        return len(self.blocks)

    @property
    def feature_dim(self) -> int:
        """Channels entering the head (output channels of the last block)."""
        return self.specs[-1].out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels`` scaled by the width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


def _classifier(in_features: int, num_classes: int) -> nn.Sequential:
    """Global average pooling, flatten and a linear layer."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_features, num_classes))


class BasicBlock(nn.Module):
    """ResNet BasicBlock (two 3x3 convs with BN, identity or 1x1-conv shortcut)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _resnet(arch: str, layers: list[int], num_classes: int, width: float) -> BlockModel:
    """CIFAR ResNet: 3x3 stride-1 stem, four stages of BasicBlocks, avgpool + fc."""
    stem_ch = scaled(64, width)
    planes = [scaled(c, width) for c in (64, 128, 256, 512)]
    strides = [1, 2, 2, 2]
    blocks: list[nn.Module] = []
    specs: list[BlockSpec] = []
    in_planes = stem_ch
    for i, (p, s, n) in enumerate(zip(planes, strides, layers, strict=True)):
        stage: list[nn.Module] = []
        if i == 0:
            stage += [nn.Conv2d(3, stem_ch, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_ch), nn.ReLU(inplace=True)]
        block_in = 3 if i == 0 else in_planes
        for j in range(n):
            stage.append(BasicBlock(in_planes, p, s if j == 0 else 1))
            in_planes = p
        blocks.append(nn.Sequential(*stage))
        specs.append(BlockSpec(f"layer{i + 1}", block_in, p, s))
    return BlockModel(blocks, _classifier(in_planes, num_classes), specs, arch, num_classes, width)


_VGG_CFG: dict[str, list[list[int]]] = {
    "vgg11bn": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg16bn": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
}


def _vgg(arch: str, num_classes: int, width: float) -> BlockModel:
    """CIFAR VGG with BN: conv groups, each closed by a 2x2 max-pool, then a linear classifier."""
    blocks: list[nn.Module] = []
    specs: list[BlockSpec] = []
    in_ch = 3
    for i, group in enumerate(_VGG_CFG[arch]):
        layers: list[nn.Module] = []
        block_in = in_ch
        for c in group:
            out = scaled(c, width)
            layers += [nn.Conv2d(in_ch, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            in_ch = out
        layers.append(nn.MaxPool2d(2))
        blocks.append(nn.Sequential(*layers))
        specs.append(BlockSpec(f"group{i + 1}", block_in, in_ch, 2))
    return BlockModel(blocks, _classifier(in_ch, num_classes), specs, arch, num_classes, width)


def _small_cnn(num_classes: int, width: float) -> BlockModel:
    """Three conv-BN-ReLU-pool blocks (32/64/128 channels at width 1): fast model for tests."""
    blocks: list[nn.Module] = []
    specs: list[BlockSpec] = []
    in_ch = 3
    for i, c in enumerate((32, 64, 128)):
        out = scaled(c, width)
        blocks.append(
            nn.Sequential(
                nn.Conv2d(in_ch, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True), nn.MaxPool2d(2)
            )
        )
        specs.append(BlockSpec(f"conv{i + 1}", in_ch, out, 2))
        in_ch = out
    return BlockModel(blocks, _classifier(in_ch, num_classes), specs, "smallcnn", num_classes, width)


_BUILDERS: dict[str, Callable[[int, float], BlockModel]] = {
    "smallcnn": _small_cnn,
    "resnet10": lambda n, w: _resnet("resnet10", [1, 1, 1, 1], n, w),
    "resnet18": lambda n, w: _resnet("resnet18", [2, 2, 2, 2], n, w),
    "vgg11bn": lambda n, w: _vgg("vgg11bn", n, w),
    "vgg16bn": lambda n, w: _vgg("vgg16bn", n, w),
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, num_classes: int = 10, width: float = 1.0, seed: int | None = None) -> BlockModel:
    """Build model ``name`` with ``num_classes`` outputs and width multiplier ``width``.

    With ``seed`` the initialisation is deterministic and leaves the global RNG untouched.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(MODEL_NAMES)}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    if seed is None:
        return _BUILDERS[name](num_classes, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _BUILDERS[name](num_classes, width)


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters in ``module``."""
    return sum(p.numel() for p in module.parameters())
