"""Federated self-supervised learning: views, objectives, projection heads, downstream evaluation (no Flower).

FedLL's headline result (arXiv 2309.05213) is layer-wise federated *self-supervised* learning: 5x
less training memory at downstream performance comparable to end-to-end federated SSL. Its exact
set-up (method, ViT size, probe protocol) is not in the part of the paper we could read (the
abstract), so every choice below is **ours**, written down with its reason; the objective is
pluggable (:data:`SSL_METHODS`).

Objective (``ssl-method``)
    ``'simclr'`` (default): SimCLR's NT-Xent (Chen et al., 2020): two augmented views of each
    image, both through the same encoder and projection head; for the 2B projections z (L2
    normalised), the loss of view i is ``-log exp(s_ij / t) / sum_{k != i} exp(s_ik / t)`` with j
    its other view and s the cosine similarity, temperature t = ``ssl-temperature``. Chosen because
    it keeps no second encoder: MoCo v3 and BYOL (LW-FedSSL, Tun et al. 2024, uses MoCo v3) hold a
    momentum copy of the encoder on every client, which doubles the parameters a device keeps and
    is state the federation would have to carry; on a device that trains one layer to save memory,
    that copy is exactly what we want to avoid. ``'simsiam'`` (Chen & He, 2021) is the second
    method: no negatives, a predictor on top of the projector and a stop-gradient,
    ``-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2``; it works at the small batches of edge devices,
    where NT-Xent has few negatives.

Views (:func:`two_views`)
    SimCLR's CIFAR recipe without blur (32x32 images): random resized crop (scale 0.2-1, ratio
    3/4-4/3), horizontal flip (p 0.5), colour jitter (brightness, contrast, saturation 0.4, hue
    0.1; p 0.8), grayscale (p 0.2), from ``torchvision.transforms.v2`` on tensors. The images
    arrive normalised by the training set's channel statistics; they are mapped back to [0, 1],
    augmented one by one (v2 draws one set of parameters per call, so a batch call would give
    every image the same crop) and normalised again. The draws come from torch's RNG forked and
    seeded with (round seed of the node, step), so a client's views are a function of the run's
    seed, its partition and the round.

Projection head (:func:`projection_head`)
    Global average pooling of the layer's (C, H, W) output (the ViT's token grid included),
    then ``Linear(C, H) - ReLU - Linear(H, D)`` with H = max(C, D) and D = ``ssl-proj-dim``
    (SimCLR's two-layer MLP, without batch norm: a BN head would carry running statistics that
    federated averaging mixes across clients' views); SimSiam adds a predictor
    ``Linear(D, D/2) - ReLU - Linear(D/2, D)``. Layer-wise, every layer has its own head (the last
    one too: without labels the model's classifier is not trained); end to end, one head on the
    encoder's output.

Downstream evaluation (:func:`linear_probe`, :func:`knn_accuracy`)
    Features: the frozen encoder's globally pooled output (what the model's classifier reads).
    Linear probe: multinomial logistic regression on standardised features, fitted by L-BFGS
    (full batch, a fixed number of iterations, L2 weight 1e-4) on the labelled probe set, accuracy
    on the test split. k-NN: cosine similarity to the probe set's features, the k nearest vote with
    weight exp(s / 0.07) (the InstDisc protocol, Wu et al. 2018), k = ``ssl-knn-k``. The probe set
    is the server's labelled data: a seeded ``ssl-probe-fraction`` of the dataset's training split
    (the clients train on the same images without their labels; the test split is never fitted).
    A probe of the randomly initialised encoder is the floor the training must beat.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.sgd import SGD
from common.training import TrainResult

OBJECTIVES = ("supervised", "ssl")
"""``fedll-objective`` values: the classifier on labels, or self-supervised on two views."""
KNN_TEMPERATURE = 0.07
"""Temperature of the k-NN vote weights exp(s / t) (InstDisc's protocol)."""
PROBE_ITERATIONS = 100
"""L-BFGS iterations of the linear probe (full batch)."""
PROBE_L2 = 1e-4
"""L2 weight of the linear probe's weights."""


# ---------------------------------------------------------------- views
def _augmenter(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(0.2),
        ]
    )


def two_views(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmented views of the normalised images ``x`` (N, C, H, W); see the module docstring.

    ``mean`` and ``std`` are the per-channel statistics ``x`` was normalised with. The same
    ``seed`` gives the same views; torch's global RNG is left as it was.
    """
    if x.dim() != 4:
        raise ValueError(f"two_views: images must be (N, C, H, W), got shape {tuple(x.shape)}")
    m, s = mean.view(1, -1, 1, 1).to(x), std.view(1, -1, 1, 1).to(x)
    raw = (x * s + m).clamp_(0.0, 1.0)
    augment = _augmenter(int(x.shape[-1]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) % (2**63))
        views = [torch.stack([augment(img) for img in raw]) for _ in range(2)]
    return (views[0] - m) / s, (views[1] - m) / s


# ---------------------------------------------------------------- objectives
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Per-view NT-Xent losses (2N,) of the projections of two views (N, D) each (SimCLR Eq. 1)."""
    if z1.shape != z2.shape or z1.dim() != 2 or len(z1) < 2:
        raise ValueError(
            f"nt_xent: two (N >= 2, D) batches of the same shape, got {tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    n = len(z1)
    sim.fill_diagonal_(-math.inf)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target, reduction="none")


def simsiam_loss(out1: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
    """Per-view SimSiam losses (2N,): ``out`` = predictor output and projection concatenated (N, 2D)."""
    p1, z1 = out1.chunk(2, dim=1)
    p2, z2 = out2.chunk(2, dim=1)
    loss1 = -F.cosine_similarity(p1, z2.detach(), dim=1)
    loss2 = -F.cosine_similarity(p2, z1.detach(), dim=1)
    return torch.cat([loss1, loss2]) / 2


class _SimSiamHead(nn.Module):
    """Projector then predictor; the output is [prediction, projection] (the loss splits them)."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        hidden = max(channels, dim)
        self.project = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, dim)
        )
        self.predict = nn.Sequential(nn.Linear(dim, max(1, dim // 2)), nn.ReLU(), nn.Linear(max(1, dim // 2), dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.project(x)
        return torch.cat([self.predict(z), z], dim=1)


def _simclr_head(channels: int, dim: int) -> nn.Module:
    hidden = max(channels, dim)
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, dim)
    )


@dataclass(frozen=True)
class SSLMethod:
    """A self-supervised objective: its head on a (C, H, W) feature map and its per-view loss of two outputs."""

    head: Callable[[int, int], nn.Module]
    loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


SSL_METHODS: dict[str, SSLMethod] = {
    "simclr": SSLMethod(_simclr_head, nt_xent),
    "simsiam": SSLMethod(_SimSiamHead, lambda a, b, _t: simsiam_loss(a, b)),
}
"""``ssl-method`` values. A new objective is one entry: a head builder and a per-view loss."""


def method(name: str) -> SSLMethod:
    """The objective ``name``; a clear error naming the valid ones otherwise."""
    if name not in SSL_METHODS:
        raise ValueError(f"ssl-method={name!r}; valid: {sorted(SSL_METHODS)}")
    return SSL_METHODS[name]


def projection_head(name: str, channels: int, dim: int, seed: int | None = None) -> nn.Module:
    """The head of objective ``name`` on ``channels`` input channels, output dim ``dim`` (seeded init)."""
    build = method(name).head
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return build(channels, dim)


# ---------------------------------------------------------------- local training
def train_ssl_local(
    model: nn.Module,
    x: torch.Tensor,
    views: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
) -> TrainResult:
    """SGD on the self-supervised ``loss`` of two ``views`` of the images ``x``: labels are never an input.

    ``model`` maps images to the objective's output (encoder part + head); ``views(batch, seed)``
    gives the two views of a batch, seeded with (``seed``, step). Both views go through the model
    as one batch of 2B (the memory model's assumption). Shuffling, optimiser and gradient release
    as in :func:`common.training.train_local`. Returns the mean per-view loss.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_ssl_local: the model has no trainable parameters")
    opt = SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    model.train()
    total = total_sq = 0.0
    seen = steps = 0
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:
                continue
            v1, v2 = views(x[idx], int(np.random.default_rng([abs(int(seed)), steps]).integers(0, 2**62)))
            opt.zero_grad(set_to_none=True)
            out = model(torch.cat([v1, v2]))
            losses = loss(out[: len(idx)], out[len(idx) :])
            losses.mean().backward()
            opt.step()
            with torch.no_grad():
                per_image = losses.view(2, -1).mean(0)
                total += float(per_image.sum())
                total_sq += float((per_image**2).sum())
            seen += len(idx)
            steps += 1
    if seen == 0:
        raise ValueError(f"train_ssl_local: no training step ran ({n} samples, batch size {batch_size})")
    return TrainResult(total / seen, seen, steps, time.perf_counter() - start, total_sq / seen)


# ---------------------------------------------------------------- downstream evaluation
@torch.no_grad()
def features(encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Globally pooled encoder outputs (N, C) of ``x`` (a module is put in eval mode first)."""
    if isinstance(encoder, nn.Module):
        encoder.eval()
    out = [encoder(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    f = torch.cat(out)
    return f.mean(dim=(2, 3)) if f.dim() == 4 else f.flatten(1)


@dataclass(frozen=True)
class ProbeResult:
    """A fitted linear probe: test loss and accuracy, and the classifier on *raw* features (C, K) and (K,).

    The standardisation is folded into ``weight`` and ``bias``, so ``features @ weight + bias`` are
    the probe's logits: the model's own head (pool, flatten, linear) can hold it.
    """

    loss: float
    accuracy: float
    weight: torch.Tensor
    bias: torch.Tensor


def fit_linear_probe(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    iterations: int = PROBE_ITERATIONS,
    l2: float = PROBE_L2,
) -> ProbeResult:
    """A logistic regression fitted on frozen features and its test figures (see the module doc).

    Deterministic: zero initialisation, full-batch L-BFGS (float64), features standardised by the
    probe set's statistics.
    """
    if len(train_y) == 0 or len(test_y) == 0:
        raise ValueError("linear_probe: the probe and test sets must not be empty")
    mu, sd = train_f.double().mean(0), train_f.double().std(0, unbiased=False) + 1e-6
    a = (train_f.double() - mu) / sd
    w = torch.zeros(a.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, train_y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        weight = w / sd[:, None]
        folded = bias - mu @ weight
        logits = test_f.double() @ weight + folded
        loss = float(F.cross_entropy(logits, test_y))
        accuracy = float((logits.argmax(1) == test_y).double().mean())
    return ProbeResult(loss, accuracy, weight.detach(), folded.detach())


def linear_probe(
    train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor, num_classes: int
) -> tuple[float, float]:
    """Test cross-entropy and accuracy of :func:`fit_linear_probe`."""
    res = fit_linear_probe(train_f, train_y, test_f, test_y, num_classes)
    return res.loss, res.accuracy


def knn_accuracy(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> float:
    """Weighted k-NN accuracy: cosine similarity to the probe features, the k nearest vote with exp(s / t)."""
    if k < 1:
        raise ValueError(f"knn_accuracy: k must be at least 1, got {k}")
    bank = F.normalize(train_f.double(), dim=1)
    k = min(k, len(bank))
    correct = 0
    for i in range(0, len(test_f), chunk):
        q = F.normalize(test_f[i : i + chunk].double(), dim=1)
        sim, idx = (q @ bank.t()).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, dtype=torch.float64)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += int((votes.argmax(1) == test_y[i : i + chunk]).sum())
    return correct / len(test_f)


def probe_indices(num_train: int, fraction: float, seed: int) -> np.ndarray:
    """The labelled probe set: a seeded ``fraction`` of the training split's indices (sorted), at least 1."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"ssl-probe-fraction={fraction!r}; must be in (0, 1]")
    n = max(1, int(round(num_train * fraction)))
    return np.sort(np.random.default_rng([abs(int(seed)), 0x55E]).permutation(num_train)[:n])
