"""Rejecting broken or hostile training replies before aggregation."""

import numpy as np
import pytest

from server_app.validation import check_arrays, check_num_examples, norm_outliers, update_norm

SENT = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32), "n": np.array(5, np.int64)}
KEYS = set(SENT)


def reply(**over: np.ndarray) -> dict[str, np.ndarray]:
    arrays = {k: v.copy() for k, v in SENT.items()}
    arrays["n"] = arrays["n"].reshape(1)  # scalars arrive as shape (1,)
    arrays.update(over)
    return arrays


def test_a_faithful_reply_passes() -> None:
    assert check_arrays(reply(w=np.full((2, 3), 1.1, np.float32)), SENT, KEYS) is None


@pytest.mark.parametrize(
    ("arrays", "reason"),
    [
        ({k: v for k, v in reply().items() if k != "b"}, "keys: missing ['b']"),
        ({**reply(), "evil": np.zeros(10**3)}, "unexpected ['evil']"),
        (reply(w=np.ones((3, 2), np.float32)), "shape: w is (3, 2)"),
        (reply(w=np.ones((2, 4), np.float32)), "shape: w is (2, 4)"),
        (reply(w=np.ones((2, 3), np.int32)), "dtype: w is int32"),
        (reply(n=np.array([5.0])), "dtype: n is float64"),
        (reply(b=np.array([0.0, np.nan, 0.0], np.float32)), "non-finite: b"),
        (reply(b=np.array([0.0, np.inf, 0.0], np.float32)), "non-finite: b"),
    ],
)
def test_broken_arrays_are_rejected_with_a_reason(arrays: dict, reason: str) -> None:
    got = check_arrays(arrays, SENT, KEYS)
    assert got is not None and reason in got


@pytest.mark.parametrize(
    ("value", "known", "reason"),
    [
        (-3, 100, "not a positive integer"),
        (0, 100, "not a positive integer"),
        (2.5, 100, "not a positive integer"),
        (float("nan"), 100, "not a positive integer"),
        ("many", 100, "not a number"),
        (10**6, 100, "exceeds the 100 samples"),
        (10**9, None, "exceeds the 100000000"),
    ],
)
def test_absurd_num_examples_are_rejected(value: object, known: int | None, reason: str) -> None:
    got = check_num_examples(value, known)
    assert got is not None and reason in got
    assert check_num_examples(100, 100) is None and check_num_examples(7.0, None) is None


def test_update_norm_outlier_is_flagged_against_the_round() -> None:
    norms = {0: 1.0, 1: 1.2, 2: 0.9, 3: 50.0}
    flagged = norm_outliers(norms, 10.0)
    assert set(flagged) == {3} and "median" in flagged[3]
    assert norm_outliers({0: 1.0, 1: 100.0}, 10.0) == {}  # too few to compare
    # root-mean-square over the 9 float values: six moved by 1, three unchanged
    assert update_norm(reply(w=np.full((2, 3), 2.0, np.float32)), SENT) == pytest.approx(np.sqrt(6.0 / 9.0))
