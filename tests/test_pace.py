"""Pace controller (SmartFreeze Sec. IV-B, Eqs. 2-3): metrics, smoothing, slope and freeze decision."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from common.pace import (
    PACE_METRICS,
    PaceConfig,
    PaceController,
    PaceStep,
    apf_ratio,
    block_metric,
    effective_update,
    moving_average,
    relative_slope,
)

N = 1000  # scalars per synthetic block
ROUNDS = 60
DEFAULT = PaceConfig()
EARLIEST = DEFAULT.window + DEFAULT.regress + DEFAULT.consecutive - 1  # first observation yields no update


def _signed_magnitudes(rng: np.random.Generator) -> np.ndarray:
    """Parameter values of magnitude in [0.5, 1.5] with random signs (away from zero)."""
    return rng.uniform(0.5, 1.5, N) * rng.choice([-1.0, 1.0], N)


def converging(seed: int = 0, noise: float = 1e-3) -> Iterator[np.ndarray]:
    """w_t = w* + (w0 - w*) exp(-t/5) + tiny noise: the metric decays to the noise floor, then stays flat."""
    rng = np.random.default_rng(seed)
    w_star = _signed_magnitudes(rng)
    w0 = w_star + rng.normal(0.0, 0.5, N)
    for t in range(ROUNDS):
        yield w_star + (w0 - w_star) * np.exp(-t / 5.0) + noise * rng.normal(size=N)


def descending(seed: int = 0) -> Iterator[np.ndarray]:
    """Parameters moving steadily with updates shrinking like exp(-t/8): the metric keeps falling ~12% per round.

    The freeze test is relative (slope / level), so "still descending" means losing more than tau of
    its level per round: a linear decline reaching zero at round T has relative slope 1/(T - t), which is
    under tau = 0.05 until the last 20 rounds, whereas exp(-t/8) keeps |relative slope| near 1/8. No
    noise floor is reached within 60 rounds (the updates stay far above the 1e-9 noise).
    """
    rng = np.random.default_rng(seed)
    w0 = _signed_magnitudes(rng)
    direction = _signed_magnitudes(rng)
    for t in range(ROUNDS):
        yield w0 + 0.05 * direction * (1.0 - np.exp(-t / 8.0)) + 1e-9 * rng.normal(size=N)


def flat_noise(scale: Callable[[int], float], seed: int = 0) -> Iterator[np.ndarray]:
    """Parameters flat on average, w_t = w* + scale(t) * noise: the metric's level follows scale(t)."""
    rng = np.random.default_rng(seed)
    w_star = _signed_magnitudes(rng)
    for t in range(ROUNDS):
        yield w_star + scale(t) * rng.normal(size=N)


def run(series: Iterator[np.ndarray], config: PaceConfig = DEFAULT) -> tuple[PaceController, list[PaceStep]]:
    ctrl = PaceController(config)
    return ctrl, [ctrl.observe(r, p) for r, p in enumerate(series, start=1)]


def first_freeze(steps: list[PaceStep]) -> int | None:
    return next((s.round for s in steps if s.freeze), None)


# ---- pure functions -------------------------------------------------------------------------


def test_effective_update_exact_values_and_cancellation() -> None:
    updates = np.array([[1.0, 2.0, -1.0], [1.0, -2.0, 0.5]])  # sums 2, 0 (cancelling), -0.5
    np.testing.assert_allclose(effective_update(updates, np.array([2.0, 4.0, -0.5]), 0.0), [1.0, 0.0, 1.0])
    assert effective_update(np.array([[1.0], [-1.0]]), np.array([3.0]), 1e-8)[0] == 0.0
    np.testing.assert_allclose(effective_update(np.array([[1e-8]]), np.array([0.0]), 1e-8), [1.0])  # eps guards 0
    with pytest.raises(ValueError, match="shape"):
        effective_update(updates, np.zeros(2), 1e-8)
    with pytest.raises(ValueError, match="shape"):
        effective_update(np.zeros(3), np.zeros(3), 1e-8)


def test_apf_ratio_exact_values() -> None:
    updates = np.array([[1.0, 1.0, 3.0, 0.0], [-1.0, 1.0, -1.0, 0.0]])  # cancelling, consistent, mixed, still
    np.testing.assert_allclose(apf_ratio(updates[:, :3], 0.0), [0.0, 1.0, 0.5])
    np.testing.assert_allclose(apf_ratio(updates, 1e-8), [0.0, 1.0, 0.5, 0.0], atol=1e-8)  # eps guards 0/0
    consistent = np.array([[0.1, -2.0], [0.3, -1.0], [0.2, -0.5]])
    np.testing.assert_allclose(apf_ratio(consistent, 1e-12), [1.0, 1.0])


def test_block_metric_is_the_mean_and_effective_movement_aliases_apf() -> None:
    updates = np.array([[1.0, 2.0, -1.0], [1.0, -2.0, 0.5]])
    current = np.array([2.0, 4.0, -0.5])
    assert block_metric("perturbation", updates, current, 0.0) == pytest.approx(2.0 / 3.0)
    assert block_metric("apf", updates, current, 0.0) == pytest.approx((1.0 + 0.0 + 0.5 / 1.5) / 3.0)
    assert block_metric("effective-movement", updates, current, 0.0) == block_metric("apf", updates, current, 0.0)
    assert PACE_METRICS == ("perturbation", "apf", "effective-movement")
    with pytest.raises(ValueError, match="apf"):
        block_metric("nope", updates, current, 0.0)


def test_moving_average() -> None:
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == 3.5
    assert moving_average([1.0, 2.0], 3) == 1.5  # fewer values than the window
    assert moving_average([5.0], 1) == 5.0
    with pytest.raises(ValueError):
        moving_average([], 3)


def test_relative_slope() -> None:
    assert relative_slope([10.0, 9.0, 8.0, 7.0, 6.0]) == pytest.approx(-1.0 / 8.0)
    assert relative_slope([2.0, 4.0]) == pytest.approx(2.0 / 3.0)
    assert relative_slope([3.0, 3.0, 3.0]) == 0.0
    assert relative_slope([0.0, 0.0]) == 0.0
    assert relative_slope([7.0]) == 0.0 and relative_slope([]) == 0.0
    decay = [float(np.exp(-t / 20.0)) for t in range(5)]  # exp(-t/T) has relative slope about -1/T
    assert relative_slope(decay) == pytest.approx(-1.0 / 20.0, rel=0.01)


# ---- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 0}, r"window must be an integer >= 1, got 0"),
        ({"smooth": 2.5}, r"smooth must be an integer >= 1, got 2.5"),
        ({"regress": 1}, r"regress must be an integer >= 2, got 1"),
        ({"consecutive": True}, r"consecutive must be an integer >= 1, got True"),
        ({"tau": 0.0}, r"tau must be a finite number > 0, got 0.0"),
        ({"tau": -0.1}, r"tau must be a finite number > 0, got -0.1"),
        ({"eps": float("nan")}, r"eps must be a finite number > 0, got nan"),
        ({"metric": "nope"}, r"metric must be one of \['apf', 'effective-movement', 'perturbation'\], got 'nope'"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PaceConfig(**kwargs)


def test_config_defaults() -> None:
    assert PaceConfig() == PaceConfig("perturbation", 5, 3, 5, 0.05, 3, 1e-8)
    for name in PACE_METRICS:
        assert PaceConfig(metric=name).metric == name


# ---- controller -------------------------------------------------------------------------------


def test_timeline_on_still_parameters() -> None:
    """Unchanged parameters: metric from observation W+1, slope from W+R, freeze exactly at W+R+C-1."""
    ctrl, steps = run(iter([np.ones(N, dtype=np.float32)] * 20))
    w, r = DEFAULT.window, DEFAULT.regress
    assert all(s.metric is None for s in steps[:w]) and steps[w].metric == 0.0
    assert all(s.slope is None for s in steps[: w + r - 1]) and steps[w + r - 1].slope == 0.0
    assert first_freeze(steps) == EARLIEST and ctrl.should_freeze
    assert all(s.freeze for s in steps[EARLIEST - 1 :])  # sticky until reset
    assert len(ctrl.history) == 20
    json.dumps(ctrl.history)
    assert set(ctrl.history[-1]) == {"block", "round", "metric", "smoothed", "slope", "under", "streak", "freeze"}
    assert len(ctrl.state_dict()["buffer"]) == w  # only W update vectors are kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_freezes_on_converging_series(seed: int) -> None:
    ctrl, steps = run(converging(seed))
    frozen_at = first_freeze(steps)
    assert frozen_at is not None and 10 <= frozen_at <= ROUNDS
    assert frozen_at >= EARLIEST > DEFAULT.window + DEFAULT.regress
    assert steps[frozen_at - 1].streak == DEFAULT.consecutive
    assert steps[frozen_at - 1].smoothed < 0.01 * steps[DEFAULT.window].smoothed  # it waited for the floor


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_does_not_freeze_while_still_descending(seed: int) -> None:
    ctrl, steps = run(descending(seed))
    assert not ctrl.should_freeze
    slopes = [s.slope for s in steps if s.slope is not None]
    assert len(slopes) == ROUNDS - DEFAULT.window - DEFAULT.regress + 1
    assert max(slopes) < -DEFAULT.tau


@pytest.mark.parametrize(
    "scale",
    [
        pytest.param(lambda t: 1e-6 * 1.15**t, id="level-grows-15%-per-round"),
        pytest.param(lambda t: 1e-3 * (1.0 + 0.8 * np.sin(2.0 * np.pi * t / 7.0)), id="level-oscillates"),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_does_not_freeze_on_flat_but_drifting_series(scale: Callable[[int], float], seed: int) -> None:
    """Parameters hover around w* but the noise level drifts, so the perturbation curve never levels off."""
    ctrl, steps = run(flat_noise(scale, seed))
    assert not ctrl.should_freeze
    assert max(s.streak for s in steps) < DEFAULT.consecutive


@pytest.mark.parametrize("metric", ["apf", "effective-movement"])
def test_apf_metric_end_to_end(metric: str) -> None:
    ctrl, steps = run(converging(0), PaceConfig(metric=metric))
    frozen_at = first_freeze(steps)
    assert frozen_at is not None and EARLIEST <= frozen_at <= ROUNDS
    assert all(s.metric is None or 0.0 <= s.metric <= 1.0 for s in steps)
    assert ctrl.history[-1]["metric"] == pytest.approx(steps[-1].metric)


@pytest.mark.parametrize("split", [0, 3, 14])
def test_state_dict_json_round_trip_continues_identically(split: int) -> None:
    series = list(converging(3))
    series[:split] = [p.astype(np.float32) for p in series[:split]]  # dtype of the kept params survives too
    ctrl = PaceController(PaceConfig(smooth=2))
    for r, p in enumerate(series[:split], start=1):
        ctrl.observe(r, p)
    clone = PaceController.from_state_dict(json.loads(json.dumps(ctrl.state_dict())))
    assert clone.config == ctrl.config and clone.history == ctrl.history
    for r, p in enumerate(series[split:], start=split + 1):
        assert clone.observe(r, p) == ctrl.observe(r, p)
    assert clone.state_dict() == ctrl.state_dict()


def test_reset_clears_window_and_streak_but_keeps_history() -> None:
    ctrl, steps = run(iter([np.ones(N)] * 15))
    assert ctrl.should_freeze and steps[-1].streak > 0
    ctrl.reset(1)
    assert not ctrl.should_freeze
    first = ctrl.observe(16, np.zeros(7))  # new block, different size
    assert (first.block, first.metric, first.slope, first.streak, first.freeze) == (1, None, None, 0, False)
    assert len(ctrl.history) == 16 and ctrl.history[0]["block"] == 0 and ctrl.history[-1]["block"] == 1


def test_fresh_block_never_freezes_on_its_first_observation() -> None:
    config = PaceConfig(window=1, smooth=1, regress=2, consecutive=1)
    ctrl = PaceController(config)
    for block in range(3):
        ctrl.reset(block)
        steps = [ctrl.observe(r, np.full(4, 2.0)) for r in range(1, 4)]
        assert [s.freeze for s in steps] == [False, False, True]  # earliest: W + R + C - 1 = 3


def test_observe_rejects_size_change_and_non_finite_values() -> None:
    ctrl = PaceController(DEFAULT)
    ctrl.observe(1, np.ones(3))
    with pytest.raises(ValueError, match="reset"):
        ctrl.observe(2, np.ones(4))
    with pytest.raises(ValueError, match="non-finite"):
        ctrl.observe(2, np.array([1.0, np.nan, 1.0]))
