"""The monitor's batch under a memory budget: the largest batch the memory model fits."""

from __future__ import annotations

import pytest

from common.memory import stage_memory
from common.models import build_model
from common.monitor import largest_fitting_batch


@pytest.mark.parametrize("budget", [0.0, 5.0, 10.5, 11.0, 37.0, 139.0, 140.0, 1e9])
def test_largest_fitting_batch_is_the_last_batch_that_fits(budget: float) -> None:
    calls: list[int] = []

    def need(b: int) -> float:
        calls.append(b)
        return 10.0 + 0.5 * b  # fixed part + activations per example, MB

    got = largest_fitting_batch(need, budget, 260)
    fitting = [b for b in range(1, 261) if 10.0 + 0.5 * b <= budget]
    assert got == (max(fitting) if fitting else 1)
    assert len(calls) <= 10  # bisection: log2(260) + 1


def test_largest_fitting_batch_refuses_an_empty_range() -> None:
    with pytest.raises(ValueError, match="batch_size=0"):
        largest_fitting_batch(lambda b: 1.0, 10.0, 0)


def test_the_full_model_fits_a_budget_between_its_need_at_small_and_full_batch() -> None:
    model = build_model("resnet10", 10, 0.25)
    need = lambda b: stage_memory(model, None, b, (3, 32, 32)).total  # noqa: E731
    budget = (need(16) + need(17)) / 2
    assert largest_fitting_batch(need, budget, 256) == 16
