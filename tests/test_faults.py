"""Fault injection used by the fault tests and benchmark."""

import numpy as np
import pytest

from client_app.faults import KINDS, InjectedFault, corrupt, fault_for
from server_app.validation import check_arrays, check_num_examples

SENT = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}


def test_fault_draw_is_seeded_and_respects_the_rate() -> None:
    draws = [fault_for(0.2, "mixed", 0, r, p) for r in range(50) for p in range(20)]
    share = sum(d is not None for d in draws) / len(draws)
    assert 0.15 < share < 0.25
    assert {d for d in draws if d} == set(KINDS)
    assert draws == [fault_for(0.2, "mixed", 0, r, p) for r in range(50) for p in range(20)]
    assert fault_for(0.0, "raise", 0, 1, 1) is None


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "raise"])
def test_every_corruption_is_caught_by_validation(kind: str) -> None:
    arrays = {k: v + 0.01 for k, v in SENT.items()}
    bad, n = corrupt(kind, arrays, SENT, 50)
    reasons = [check_num_examples(n, 50), check_arrays(bad, SENT, set(SENT))]
    if kind == "huge":
        from server_app.validation import norm_outliers, update_norm

        norms = {0: update_norm(arrays, SENT), 1: update_norm(arrays, SENT), 2: update_norm(bad, SENT)}
        assert 2 in norm_outliers(norms, 10.0)
    else:
        assert any(reasons), kind


def test_raise_kind_raises() -> None:
    with pytest.raises(InjectedFault):
        corrupt("raise", dict(SENT), SENT, 5)
