"""The model zoo's names and depths, without torch: what the run config validates against.

``common.config`` (and through it ``run.sh``'s preflight, which runs before anything starts) needs
each model's number of blocks (SmartFreeze/ProFL stages) and FedLL layers to check ``num-rounds``;
building the model for that would import torch (about 5 s and 480 MB in a process that exits at
once). :mod:`common.models` takes :data:`MODEL_NAMES` from here, and ``tests/test_models.py`` checks
that it builds exactly these models, with the blocks and layers listed here.
"""

from __future__ import annotations

MODEL_BLOCKS: dict[str, int] = {
    "smallcnn": 3,
    "resnet10": 4,
    "resnet18": 4,
    "resnet10-fine": 4,
    "resnet18-fine": 8,
    "vgg11bn": 5,
    "vgg16bn": 5,
    "vit": 4,
    "vit-d4": 2,
    "vit-d12": 4,
}
"""Model name -> number of blocks (``BlockModel.num_blocks``, independent of the width)."""

FEDLL_LAYERS: dict[str, int] = {
    "smallcnn": 3,
    "resnet10": 4,
    "resnet18": 8,
    "resnet10-fine": 4,
    "resnet18-fine": 8,
    "vgg11bn": 8,
    "vgg16bn": 13,
    "vit": 8,
    "vit-d4": 4,
    "vit-d12": 12,
}
"""Model name -> number of FedLL layers (``common.fedll.num_layers``)."""

MODEL_BASE_CHANNELS: dict[str, int] = {name: 32 if name == "smallcnn" else 64 for name in MODEL_BLOCKS}
"""Model name -> channels of its narrowest layer at width 1 (the first conv; the ViT's head dim)."""

MIN_CHANNELS = 4
"""Fewest channels the narrowest layer may have: below it a model trains at chance (``width`` too small)."""

MODEL_NAMES: tuple[str, ...] = tuple(MODEL_BLOCKS)


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels`` scaled by the width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))
