"""Self-supervised objectives, views and downstream evaluation (common.ssl): pure PyTorch, no Flower."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common import ssl
from common.models import build_model
from common.sgd import SGD
from common.training import TrainResult

MEAN = torch.tensor([0.49, 0.48, 0.45])
STD = torch.tensor([0.25, 0.24, 0.26])


def _images(n: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.rand(n, 3, 32, 32, generator=gen)
    return (raw - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)


def test_views_are_a_function_of_the_seed_and_leave_the_global_rng_alone() -> None:
    x = _images()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a1, a2 = ssl.two_views(x, MEAN, STD, seed=5)
    assert torch.equal(torch.rand(1), before)  # the global stream did not move
    b1, b2 = ssl.two_views(x, MEAN, STD, seed=5)
    c1, _ = ssl.two_views(x, MEAN, STD, seed=6)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2) and not torch.equal(a1, c1)
    assert a1.shape == x.shape and a1.dtype == x.dtype
    per_image = [not torch.allclose(a1[i], x[i]) for i in range(len(x))]
    assert sum(per_image) >= len(x) - 1  # images are augmented one by one (v2 draws once per call)
    raw = a1 * STD.view(1, 3, 1, 1) + MEAN.view(1, 3, 1, 1)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5  # augmented in [0, 1], then normalised again


def test_nt_xent_is_low_for_matching_views_and_high_for_unrelated_ones() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(16, 32, generator=gen)
    matched = ssl.nt_xent(z, z + 0.01 * torch.randn(16, 32, generator=gen), temperature=0.5)
    unrelated = ssl.nt_xent(z, torch.randn(16, 32, generator=gen), temperature=0.5)
    assert matched.shape == (32,) and matched.mean() < unrelated.mean() - 1.0
    assert unrelated.mean() == pytest.approx(np.log(31), abs=0.5)  # ~uniform over the 31 other views
    with pytest.raises(ValueError, match="two \\(N >= 2, D\\) batches"):
        ssl.nt_xent(z[:1], z[:1])


def test_simsiam_loss_is_minus_one_for_aligned_predictions_and_stops_the_target_gradient() -> None:
    z = torch.randn(4, 8, requires_grad=True)
    out = torch.cat([z, z], dim=1)
    loss = ssl.simsiam_loss(out, out)
    assert torch.allclose(loss, torch.full((8,), -0.5))
    loss.sum().backward()
    assert z.grad is not None


@pytest.mark.parametrize("name", sorted(ssl.SSL_METHODS))
def test_the_objective_decreases_on_a_fixed_batch(name: str) -> None:
    """A few SGD steps on one batch with fixed views lower that batch's loss (each method)."""
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, 0.5)
    head = ssl.projection_head(name, _channels(model), 32, seed=1)
    net = nn.Sequential(*model.blocks, head)
    v1, v2 = ssl.two_views(_images(16), MEAN, STD, seed=0)
    loss_fn = ssl.method(name).loss
    opt = SGD([p for p in net.parameters()], lr=0.05, momentum=0.9)

    def loss() -> torch.Tensor:
        out = net(torch.cat([v1, v2]))
        return loss_fn(out[:16], out[16:], 0.5).mean()

    net.train()
    first = float(loss().detach())
    for _ in range(15):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float(loss()) < first - 0.05


def _channels(model: nn.Module) -> int:
    x = _images(2)
    for block in model.blocks:
        x = block(x)
    return int(x.shape[1])


def test_train_ssl_local_never_sees_labels_and_repeats_exactly() -> None:
    def run() -> tuple[TrainResult, list[torch.Tensor]]:
        model = build_model("smallcnn", 10, 0.25, seed=3)
        net = nn.Sequential(*model.blocks, ssl.projection_head("simclr", _channels(model), 16, seed=4))
        views = lambda b, s: ssl.two_views(b, MEAN, STD, s)  # noqa: E731
        loss = lambda a, b: ssl.nt_xent(a, b, 0.5)  # noqa: E731
        res = ssl.train_ssl_local(net, _images(20), views, loss, epochs=1, batch_size=8, lr=0.05, seed=9)
        return res, [p.detach().clone() for p in net.parameters()]

    (r1, p1), (r2, p2) = run(), run()
    assert r1.num_examples == 20 and r1.steps == 3 and np.isfinite(r1.loss)
    assert r1.loss == r2.loss and all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))


def test_linear_probe_and_knn_separate_separable_features() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = 5 * torch.randn(4, 6, generator=gen)
    y = torch.arange(200) % 4
    f = centres[y] + 0.3 * torch.randn(200, 6, generator=gen)
    loss, acc = ssl.linear_probe(f[:120], y[:120], f[120:], y[120:], 4)
    assert acc == 1.0 and loss < 0.1
    assert ssl.knn_accuracy(f[:120], y[:120], f[120:], y[120:], 4, k=5) == 1.0
    noise = torch.randn(200, 6, generator=gen)
    assert ssl.linear_probe(noise[:120], y[:120], noise[120:], y[120:], 4)[1] < 0.5
    with pytest.raises(ValueError, match="k must be at least 1"):
        ssl.knn_accuracy(f, y, f, y, 4, k=0)


def test_features_pool_the_encoders_grid() -> None:
    model = build_model("vit", 10, 0.25)
    encoder = nn.Sequential(*model.blocks)
    f = ssl.features(encoder, _images(3))
    assert f.shape == (3, _channels(model))


def test_probe_set_is_a_seeded_fraction_and_bad_values_are_named() -> None:
    a = ssl.probe_indices(1000, 0.1, seed=0)
    assert len(a) == 100 and np.array_equal(a, ssl.probe_indices(1000, 0.1, seed=0))
    assert not np.array_equal(a, ssl.probe_indices(1000, 0.1, seed=1))
    assert len(ssl.probe_indices(5, 0.01, seed=0)) == 1
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"ssl-probe-fraction={bad!r}"):
            ssl.probe_indices(10, bad, 0)
    with pytest.raises(ValueError, match=r"ssl-method='moco'; valid: \['simclr', 'simsiam'\]"):
        ssl.method("moco")
