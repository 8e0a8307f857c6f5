"""FedAvg aggregation (Eq. 1)."""

import numpy as np
import pytest

from common.aggregate import weighted_average


def test_weighted_average_weights_by_examples_and_keeps_dtypes() -> None:
    a = {"w": np.array([1.0, 2.0], dtype=np.float32), "n": np.array(10, dtype=np.int64)}
    b = {"w": np.array([3.0, 6.0], dtype=np.float32), "n": np.array(20, dtype=np.int64)}
    out = weighted_average([(a, 1.0), (b, 3.0)])
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    assert out["w"].dtype == np.float32
    assert out["n"].dtype == np.int64 and int(out["n"]) == 18  # rint(17.5) -> 18 (round half to even)


def test_weighted_average_rejects_mismatches() -> None:
    with pytest.raises(ValueError, match="no updates"):
        weighted_average([])
    with pytest.raises(ValueError, match="shape"):
        weighted_average([({"w": np.zeros(2)}, 1.0), ({"w": np.zeros(3)}, 1.0)])
    with pytest.raises(ValueError, match="different keys"):
        weighted_average([({"w": np.zeros(2)}, 1.0), ({"w": np.zeros(2), "v": np.zeros(1)}, 1.0)])
    with pytest.raises(ValueError, match="total weight"):
        weighted_average([({"w": np.zeros(2)}, 0.0)])
