"""Model zoo expressed as ordered blocks plus a classifier head.

Every model is a :class:`BlockModel`: ``forward(x) == head(blocks[-1](...blocks[0](x)))``.
The blocks follow each architecture's own structure (ResNet: its four residual stages, the
stem folded into the first, or with ``-fine`` one block per BasicBlock; VGG: the conv groups
between poolings, each ending with its pool),
and each block carries a :class:`BlockSpec` (channels in/out, spatial stride) so that the
progressive strategies can build output modules and sub-models without knowing the model.

The ViT (``vit``, :func:`build_vit`) keeps the same contract: its blocks pass a (N, D, H/4, W/4)
grid of patch tokens between them (laid out in memory as (N, T, D) tokens, ``channels_last``), so
that a block's output is image-like and everything built from :class:`BlockSpec` (output modules,
DepthFL's classifiers, HeteroFL's width slicing) applies unchanged.

Parameter keys are ``blocks.<k>.*`` and ``head.*``, so the arrays of one block are the keys
with prefix ``blocks.<k>.``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from common.zoo import MODEL_NAMES, scaled

__all__ = [
    "MODEL_NAMES",
    "BlockModel",
    "BlockSpec",
    "BasicBlock",
    "EncoderLayer",
    "build_model",
    "build_vit",
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


def _resnet(arch: str, layers: list[int], num_classes: int, width: float, fine: bool = False) -> BlockModel:
    """CIFAR ResNet: 3x3 stride-1 stem, four stages of BasicBlocks, avgpool + fc.

    Blocks: the four residual stages (``fine=False``), or one block per BasicBlock (``fine=True``:
    ``sum(layers)`` blocks, ``Sequential(BasicBlock)`` each); the stem is folded into the first block
    either way. Both partitions build the same modules in the same order, so with the same seed
    they are the same network (same parameters, same forward); only the block boundaries differ.
    """
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
            if fine:
                blocks.append(nn.Sequential(*stage))
                specs.append(BlockSpec(f"layer{i + 1}.{j}", block_in, p, s if j == 0 else 1))
                stage, block_in = [], p
        if not fine:
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


VIT_DEPTH = 8
"""Encoder layers of the zoo's ``vit``."""
VIT_HEADS = 4
"""Attention heads of the zoo's ``vit`` (head dim 64 x width, embedding dim heads x head dim)."""
VIT_PATCH = 4
"""Patch size of the zoo's ``vit`` (32x32 inputs -> an 8x8 grid of 64 tokens)."""
VIT_LAYERS_PER_BLOCK = 2
"""Encoder layers per block of the zoo's ``vit`` (depth 8 -> 4 blocks, like the ResNets' 4 stages)."""


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(N, D, H, W) grid -> (N, H*W, D) tokens (a view for a ``channels_last`` grid, else one copy)."""
    return x.flatten(2).transpose(1, 2).contiguous()


def _grid(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, H*W, D) contiguous tokens -> (N, D, H, W) grid view (``channels_last`` in memory)."""
    return t.transpose(1, 2).unflatten(2, (h, w))


class PositionEmbedding(nn.Module):
    """A learnt embedding per cell of a (dim, grid, grid) token grid, added to the input."""

    def __init__(self, dim: int, grid: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, dim, grid, grid))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


class PatchEmbedding(nn.Module):
    """Non-overlapping ``patch`` x ``patch`` patches projected to ``dim`` channels, plus a learnt
    position embedding per grid cell: (N, C, H, W) -> (N, dim, H/patch, W/patch)."""

    def __init__(self, in_channels: int, dim: int, patch: int, image_size: int) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        self.patch = patch
        self.image_size = image_size
        self.proj = nn.Conv2d(in_channels, dim, patch, patch)
        self.pos = PositionEmbedding(dim, image_size // patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"vit: input of {tuple(x.shape[-2:])} pixels; this model is built for "
                f"{self.image_size}x{self.image_size} images"
            )
        return self.pos(self.proj(x))


class AttentionCore(nn.Module):
    """``softmax(q k^T / sqrt(d_h)) v`` per head, written out (no fused kernel) so that the memory
    replay (:mod:`common.memory`) sees every tensor; q, k, v and the output are (N, heads, T, d_h)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        return scores.softmax(dim=-1) @ v

    @staticmethod
    def flops_per_sample(out: torch.Tensor) -> float:
        """Forward FLOPs per sample from the output (N, heads, T, d_h): q k^T and the product with v
        (2 T^2 d_h each per head), the scaling of q (T d_h per head) and the softmax (5 per score)."""
        heads, tokens, dh = out.shape[1:]
        return heads * (4.0 * tokens * tokens * dh + tokens * dh + 5.0 * tokens * tokens)


class SelfAttention(nn.Module):
    """Multi-head self-attention on (N, T, D) tokens with separate q, k, v projections (so that
    HeteroFL's leading-channel slices of each are again a q, a k and a v projection)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.core = AttentionCore()
        self.proj = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = t.shape
        dh = dim // self.heads

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.unflatten(2, (self.heads, dh)).transpose(1, 2)

        out = self.core(split(self.q(t)), split(self.k(t)), split(self.v(t)))
        return self.proj(out.transpose(1, 2).reshape(n, tokens, dim))


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer on a (N, D, H, W) grid of tokens (output: same shape).

    ``t = t + attn(LN(t)); t = t + MLP(LN(t))`` with the MLP ``Linear(D, r D), GELU, Linear(r D, D)``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding dim {dim} is not a multiple of the {heads} heads")
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        t = _tokens(x)
        t = t + self.attn(self.norm1(t))
        t = t + self.mlp(self.norm2(t))
        return _grid(t, h, w)


class GridLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (N, D, H, W) token grid (the ViT's final norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return _grid(super().forward(_tokens(x)), h, w)


def build_vit(
    num_classes: int = 10,
    width: float = 1.0,
    depth: int = VIT_DEPTH,
    heads: int = VIT_HEADS,
    patch: int = VIT_PATCH,
    image_size: int = 32,
    layers_per_block: int = VIT_LAYERS_PER_BLOCK,
    mlp_ratio: float = 2.0,
    arch: str = "vit",
) -> BlockModel:
    """A small ViT for ``image_size`` x ``image_size`` inputs as a :class:`BlockModel`.

    Patch embedding (``patch`` x ``patch``, stride ``patch``) with a learnt position embedding,
    ``depth`` pre-norm encoder layers of dim ``heads x scaled(64, width)`` (so every width keeps
    ``heads`` whole heads; 256 at width 1), a final LayerNorm and the zoo's head (global average
    pooling over the tokens, linear). Blocks: ``layers_per_block`` encoder layers each, the patch
    embedding folded into the first block (like the ResNet stem) and the final LayerNorm into the
    last; their :class:`BlockSpec` read the token grid as an image (D channels, stride ``patch``
    for the first block, 1 after). ``arch`` is the zoo name (``vit``: 8 layers in 4 blocks;
    ``vit-d4``: 4 layers in 2 blocks; ``vit-d12``: 12 layers in 4 blocks of 3), so every cache keyed by
    the model name builds the same network.
    """
    if depth < 1 or heads < 1 or layers_per_block < 1:
        raise ValueError(f"vit needs depth, heads and layers_per_block >= 1, got {depth}, {heads}, {layers_per_block}")
    dim = heads * scaled(64, width)
    layers = [EncoderLayer(dim, heads, mlp_ratio) for _ in range(depth)]
    blocks: list[nn.Module] = []
    specs: list[BlockSpec] = []
    for i, start in enumerate(range(0, depth, layers_per_block)):
        modules: list[nn.Module] = [PatchEmbedding(3, dim, patch, image_size)] if i == 0 else []
        modules += layers[start : start + layers_per_block]
        if start + layers_per_block >= depth:
            modules.append(GridLayerNorm(dim))
        blocks.append(nn.Sequential(*modules))
        specs.append(BlockSpec(f"encoder{i + 1}", 3 if i == 0 else dim, dim, patch if i == 0 else 1))
    return BlockModel(blocks, _classifier(dim, num_classes), specs, arch, num_classes, width)


_BUILDERS: dict[str, Callable[[int, float], BlockModel]] = {
    "smallcnn": _small_cnn,
    "resnet10": lambda n, w: _resnet("resnet10", [1, 1, 1, 1], n, w),
    "resnet18": lambda n, w: _resnet("resnet18", [2, 2, 2, 2], n, w),
    "resnet10-fine": lambda n, w: _resnet("resnet10-fine", [1, 1, 1, 1], n, w, fine=True),
    "resnet18-fine": lambda n, w: _resnet("resnet18-fine", [2, 2, 2, 2], n, w, fine=True),
    "vgg11bn": lambda n, w: _vgg("vgg11bn", n, w),
    "vgg16bn": lambda n, w: _vgg("vgg16bn", n, w),
    "vit": lambda n, w: build_vit(n, w),
    "vit-d4": lambda n, w: build_vit(n, w, depth=4, arch="vit-d4"),
    "vit-d12": lambda n, w: build_vit(n, w, depth=12, layers_per_block=3, arch="vit-d12"),
}


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
