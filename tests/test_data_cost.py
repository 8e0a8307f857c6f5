"""Cheap data paths (simulation overhead issue): exact histogram normaliser, chunked synthetic noise,
bounded per-process cache of client tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import arrays as A
from common import data as D


def test_channel_stats_equals_the_float64_formula() -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (37, 5, 7, 3), dtype=np.uint8)
    x[..., 1] //= 4  # channels with different distributions
    mean, std = D.channel_stats(x)
    flat = x.reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, flat.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(std, flat.std(axis=0), rtol=0, atol=1e-12)
    gray = rng.integers(0, 256, (4, 6, 6, 1), dtype=np.uint8)
    assert D.channel_stats(gray)[0].shape == (1,)
    with pytest.raises(ValueError, match="uint8 images, got dtype float32"):
        D.channel_stats(x.astype(np.float32))


def _synthetic_one_draw(num_train: int, num_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The noise of make_synthetic drawn in one call of the whole shape (the form before chunking)."""
    saved = A._SYNTHETIC_CHUNK
    A._SYNTHETIC_CHUNK = 10**9
    try:
        ds = D.make_synthetic(num_train, num_test, seed)
    finally:
        A._SYNTHETIC_CHUNK = saved
    return ds.x_train, ds.x_test


def test_synthetic_noise_in_chunks_is_the_same_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(A, "_SYNTHETIC_CHUNK", 7)  # 7 does not divide 50 or 20: a ragged last chunk
    chunked = D.make_synthetic(50, 20, seed=4)
    monkeypatch.undo()
    x_train, x_test = _synthetic_one_draw(50, 20, 4)
    assert np.array_equal(chunked.x_train, x_train) and np.array_equal(chunked.x_test, x_test)


def test_client_cache_is_bounded_and_rebuilds_identical_tensors() -> None:
    spec = D.DataSpec(synthetic_train_size=400, synthetic_test_size=40, seed=9)
    D.client_data.cache_clear()
    first = D.client_data(spec, 0, 20)
    for pid in range(1, 20):
        D.client_data(spec, pid, 20)
    info = D.client_data.cache_info()
    assert info.currsize == D.CLIENT_CACHE_SIZE < 20
    again = D.client_data(spec, 0, 20)  # evicted: rebuilt from the cached uint8 set and indices
    assert again is not first
    assert torch.equal(again.x_train, first.x_train) and torch.equal(again.y_val, first.y_val)
    mean, std = D._normaliser(spec)
    assert mean.dtype == np.float32 and std.dtype == np.float32
    whole = D.to_tensor(spec, D.load_dataset(spec).x_train)
    assert abs(float(whole.mean())) < 1e-4 and abs(float(whole.std()) - 1.0) < 1e-3  # normalised
