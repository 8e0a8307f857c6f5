"""Pace controller: decides when the active block has converged and can be frozen (pure numpy, no Flower).

SmartFreeze Sec. IV-B. After every aggregation the server hands :meth:`PaceController.observe` the
active block's trainable values flattened to 1-D. The controller forms round-to-round updates, keeps
the last ``W`` of them, and computes a block metric:

* ``perturbation`` (SmartFreeze): per scalar j, the effective update |sum of its last W updates| /
  (|w_j| + eps); the block perturbation (Eq. 2) aggregates it over the block's scalars. We use the
  MEAN, not the paper's sum: the sum is just the block size times the mean, so the mean keeps one
  scale comparable across blocks of very different sizes (and the freeze test below is relative
  to the curve's scale anyway, so it is unchanged).
* ``apf`` (APF's effective perturbation, Chen et al., ICDCS 2021): per scalar |sum of updates| /
  (sum of |updates| + eps), in [0, 1], averaged over the block. ``effective-movement`` (ProFL) is
  the same quantity, registered as an alias.

The metric is smoothed by a moving average over the last S values (Eq. 3), a least-squares line is
fitted to the last R smoothed values, and its slope is divided by the mean of those values. This
relative slope is the fractional change of the curve per round, so one threshold tau serves every
block and metric. When |relative slope| < tau for C consecutive rounds the block is frozen.

Defaults (W=5, S=3, R=5, tau=0.05, C=3): a curve decaying like exp(-t/T) has relative slope -1/T,
so tau=0.05 calls a curve flat once it changes by less than 5% per round (time constant above
20 rounds). A converging block's metric falls until it reaches the floor set by the conflicting
(cancelling) updates of SGD noise and then stays there, which this detects within a few rounds;
a block whose metric still drops by 10% or more per round, or whose level keeps drifting, is not
frozen. The earliest possible freeze is at observation W + R + C - 1 (the first observation yields
no update), i.e. 12 rounds after a block starts with the defaults.

Level condition (``level`` > 0, off by default): a round also needs the smoothed metric at or below
``level`` to count towards the C. A flat curve is not always a converged one: with ``apf`` /
``effective-movement`` a block whose scalars still drift steadily in one direction has a ratio that
sits flat near 1, which the slope test alone calls converged (ProFL uses this, see ``common/profl.py``).

Caveats: ``perturbation`` divides by |w_j|, so scalars near zero dominate the mean (eps bounds them);
the curve is noisier but its trend still decides. ``apf`` is scale-free: scalars that all move
consistently give a ratio flat near 1, which the slope test also calls flat, so it is meant for
SGD-noisy updates whose ratio falls towards the cancellation floor as the block converges.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

_TINY = 1e-12  # guards the division by the curve's mean in relative_slope


def _sums(updates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per scalar (sum of updates, sum of |updates|) in float64, one row at a time (no (W, n) float64 copy)."""
    updates = np.asarray(updates)
    if updates.ndim != 2 or updates.shape[0] < 1:
        raise ValueError(f"updates must have shape (W, n) with W >= 1, got {updates.shape}")
    total = np.zeros(updates.shape[1], dtype=np.float64)
    total_abs = np.zeros(updates.shape[1], dtype=np.float64)
    for row in updates:
        total += row
        total_abs += np.abs(row)
    return total, total_abs


def effective_update(updates: np.ndarray, current: np.ndarray, eps: float) -> np.ndarray:
    """SmartFreeze effective update per scalar (Sec. IV-B): |sum_k u_k| / (|w| + eps), dimensionless.

    ``updates`` has shape (W, n) (the last W round-to-round updates), ``current`` shape (n,).
    """
    total, _ = _sums(updates)
    current = np.asarray(current, dtype=np.float64)
    if current.shape != total.shape:
        raise ValueError(f"current must have shape {total.shape}, got {current.shape}")
    return np.abs(total) / (np.abs(current) + eps)


def apf_ratio(updates: np.ndarray, eps: float) -> np.ndarray:
    """APF effective perturbation per scalar: |sum_k u_k| / (sum_k |u_k| + eps), in [0, 1].

    1 means the W updates all point the same way, 0 that they cancel out. ``updates``: shape (W, n).
    """
    total, total_abs = _sums(updates)
    return np.abs(total) / (total_abs + eps)


MetricFn = Callable[[np.ndarray, np.ndarray, float], np.ndarray]

METRIC_FUNCTIONS: dict[str, MetricFn] = {
    "perturbation": effective_update,
    "apf": lambda updates, current, eps: apf_ratio(updates, eps),
    "effective-movement": lambda updates, current, eps: apf_ratio(updates, eps),
}
"""Registry name -> per-scalar metric f(updates (W, n), current (n,), eps) -> (n,); the block metric is its mean."""

PACE_METRICS: tuple[str, ...] = tuple(METRIC_FUNCTIONS)


def block_metric(name: str, updates: np.ndarray, current: np.ndarray, eps: float) -> float:
    """Block metric (SmartFreeze Eq. 2 with the mean over scalars instead of the sum): mean of metric ``name``."""
    if name not in METRIC_FUNCTIONS:
        raise ValueError(f"unknown pace metric {name!r}; choose one of {sorted(METRIC_FUNCTIONS)}")
    return float(np.mean(METRIC_FUNCTIONS[name](updates, current, eps)))


def moving_average(values: Sequence[float], window: int) -> float:
    """Smoothed value (SmartFreeze Eq. 3): mean of the last ``window`` values (of all of them if fewer)."""
    if window < 1 or len(values) == 0:
        raise ValueError(f"moving_average needs window >= 1 and at least one value, got {window} and {len(values)}")
    return float(np.mean(np.asarray(values[-window:], dtype=np.float64)))


def relative_slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` vs their index (Sec. IV-B fit) over mean(|values|): fraction per round.

    Returns 0.0 for fewer than 2 values.
    """
    y = np.asarray(values, dtype=np.float64)
    if y.size < 2:
        return 0.0
    x = np.arange(y.size, dtype=np.float64) - (y.size - 1) / 2.0
    slope = float(np.dot(x, y - y.mean()) / np.dot(x, x))
    return slope / (float(np.mean(np.abs(y))) + _TINY)


def _check(field: str, value: object, ok: bool, valid: str) -> None:
    if not ok:
        raise ValueError(f"PaceConfig.{field} must be {valid}, got {value!r}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_pos_float(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass(frozen=True)
class PaceConfig:
    """Pace controller options (SmartFreeze Sec. IV-B); see the module docstring for the defaults."""

    metric: str = "perturbation"  # a key of METRIC_FUNCTIONS
    window: int = 5  # W, round-to-round updates summed per scalar
    smooth: int = 3  # S, moving-average window over the block metric (Eq. 3)
    regress: int = 5  # R, smoothed values in the least-squares fit
    tau: float = 0.05  # threshold on |relative slope|, fraction per round
    consecutive: int = 3  # C, consecutive rounds under tau before freezing
    eps: float = 1e-8  # added to denominators (same units as the parameters)
    level: float = 0.0  # > 0: a round counts only if the smoothed metric is also <= level (0 = off)

    def __post_init__(self) -> None:
        _check("metric", self.metric, self.metric in METRIC_FUNCTIONS, f"one of {sorted(METRIC_FUNCTIONS)}")
        for name in ("window", "smooth", "consecutive"):
            value = getattr(self, name)
            _check(name, value, _is_int(value) and value >= 1, "an integer >= 1")
        _check("regress", self.regress, _is_int(self.regress) and self.regress >= 2, "an integer >= 2")
        _check("tau", self.tau, _is_pos_float(self.tau), "a finite number > 0")
        _check("eps", self.eps, _is_pos_float(self.eps), "a finite number > 0")
        _check("level", self.level, self.level == 0 or _is_pos_float(self.level), "0 (off) or a finite number > 0")


@dataclass(frozen=True)
class PaceStep:
    """Outcome of one observation; metric/smoothed/slope are None until enough rounds were seen."""

    block: int
    round: int
    metric: float | None
    smoothed: float | None
    slope: float | None
    streak: int
    freeze: bool


class PaceController:
    """Tracks one active block at a time.

    Memory: the previous parameters (their dtype) plus a (W, n) float32 ring buffer of updates.
    Once ``should_freeze`` is True it stays True until :meth:`reset`.
    """

    def __init__(self, config: PaceConfig) -> None:
        self.config = config
        self.history: list[dict] = []
        self.reset(0)

    def reset(self, block: int) -> None:
        """Start tracking ``block``: clears the update window, metrics and streak; keeps ``history``."""
        self.block = int(block)
        self._prev: np.ndarray | None = None
        self._buf: np.ndarray | None = None
        self._count = 0  # updates stored (at most W)
        self._pos = 0  # ring-buffer slot for the next update
        self._metrics: list[float] = []  # last S block metrics
        self._smoothed: list[float] = []  # last R smoothed values
        self._streak = 0
        self._frozen = False

    @property
    def should_freeze(self) -> bool:
        """True once |relative slope| stayed under tau for C consecutive observations of this block."""
        return self._frozen

    def observe(self, server_round: int, params: np.ndarray) -> PaceStep:
        """Record the active block's aggregated values after ``server_round`` and update the freeze decision."""
        cfg = self.config
        params = np.asarray(params)
        params = params.ravel() if np.issubdtype(params.dtype, np.floating) else params.astype(np.float64).ravel()
        if not np.all(np.isfinite(params)):
            raise ValueError(f"pace: block {self.block} has non-finite parameters at round {server_round}")
        if self._prev is not None and self._prev.shape != params.shape:
            raise ValueError(
                f"pace: block {self.block} had {self._prev.size} values, now {params.size}; call reset() on a new block"
            )
        metric = smoothed = slope = None
        if self._prev is not None:
            if self._buf is None:
                self._buf = np.zeros((cfg.window, params.size), dtype=np.float32)
            np.subtract(params, self._prev, out=self._buf[self._pos], casting="unsafe")
            self._pos = (self._pos + 1) % cfg.window
            self._count = min(self._count + 1, cfg.window)
        self._prev = params.copy()
        if self._count == cfg.window and self._buf is not None:
            metric = block_metric(cfg.metric, self._buf, params, cfg.eps)
            self._metrics = [*self._metrics, metric][-cfg.smooth :]
            smoothed = moving_average(self._metrics, cfg.smooth)
            self._smoothed = [*self._smoothed, smoothed][-cfg.regress :]
            if len(self._smoothed) == cfg.regress:
                slope = relative_slope(self._smoothed)
        under = slope is not None and abs(slope) < cfg.tau
        under = under and (cfg.level <= 0 or (smoothed is not None and smoothed <= cfg.level))
        self._streak = self._streak + 1 if under else 0
        self._frozen = self._frozen or self._streak >= cfg.consecutive
        step = PaceStep(self.block, int(server_round), metric, smoothed, slope, self._streak, self._frozen)
        self.history.append({**asdict(step), "under": under})
        return step

    def state_dict(self, arrays: bool = False) -> dict:
        """JSON-serialisable snapshot (lists, floats, ints) from which :meth:`from_state_dict` resumes exactly.

        With ``arrays=True`` the previous parameters and the update buffer (n and W x n values) stay
        numpy arrays (copies), for checkpoints that store arrays apart from the JSON state.
        """

        def out(a: np.ndarray | None) -> np.ndarray | list | None:
            return None if a is None else (a.copy() if arrays else a.tolist())

        return {
            "config": asdict(self.config),
            "block": self.block,
            "dtype": None if self._prev is None else self._prev.dtype.str,
            "prev": out(self._prev),
            "buffer": out(self._buf),
            "count": self._count,
            "pos": self._pos,
            "metrics": list(self._metrics),
            "smoothed": list(self._smoothed),
            "streak": self._streak,
            "frozen": self._frozen,
            "history": [dict(h) for h in self.history],
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> PaceController:
        """Rebuild a controller from :meth:`state_dict` output (also after a JSON round trip)."""
        ctrl = cls(PaceConfig(**state["config"]))
        ctrl.block = int(state["block"])
        if state["prev"] is not None:
            ctrl._prev = np.asarray(state["prev"], dtype=np.dtype(state["dtype"]))
        if state["buffer"] is not None:
            ctrl._buf = np.asarray(state["buffer"], dtype=np.float32)
        ctrl._count, ctrl._pos, ctrl._streak = int(state["count"]), int(state["pos"]), int(state["streak"])
        ctrl._metrics = [float(v) for v in state["metrics"]]
        ctrl._smoothed = [float(v) for v in state["smoothed"]]
        ctrl._frozen = bool(state["frozen"])
        ctrl.history = [dict(h) for h in state["history"]]
        return ctrl
