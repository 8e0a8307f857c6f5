"""The ClientApp's device budget: no memory model unless a finite budget needs it (simulation overhead)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

import client_app.handlers as client
from common.config import parse_run_config
from common.data import client_data
from common.devices import simulated_device
from common.node import node_identity

SMALL = {"model": "smallcnn", "synthetic-train-size": 200, "synthetic-test-size": 50}


def _context(pid: int, **node: object) -> Context:
    return Context(1, pid + 1, {"partition-id": pid, "num-partitions": 4, **node}, RecordDict(), {})


def test_profile_none_needs_no_memory_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_model(*args: object, **kwargs: object) -> float:
        raise AssertionError("the memory model was called for device-profile='none'")

    monkeypatch.setattr(client, "_required_mb", no_model)
    cfg = parse_run_config({**SMALL, "seed": 3})
    for pid in range(4):
        ctx = _context(pid)
        data = client_data(cfg.data_spec(), pid, 4)
        dev = client._device(cfg, node_identity(ctx.node_config), ctx, data)
        assert math.isinf(dev.memory_mb)
        assert dev.speed_flops == simulated_device("none", pid, 3, 1.0).speed_flops > 0  # same seeded speed
    declared = _context(0, **{"memory-mb": 300})
    dev = client._device(cfg, node_identity(declared.node_config), declared, client_data(cfg.data_spec(), 0, 4))
    assert dev.memory_mb == 300.0


def test_finite_budgets_still_use_the_memory_model() -> None:
    cfg = parse_run_config({**SMALL, "device-profile": "uniform"})
    ctx = _context(1)
    dev = client._device(cfg, node_identity(ctx.node_config), ctx, client_data(cfg.data_spec(), 1, 4))
    full = client._required_mb(cfg, 10, None, (3, 32, 32))
    assert math.isfinite(dev.memory_mb) and dev.memory_mb >= 0.3 * full


def _train_content(**config: object) -> RecordDict:
    from flwr.app import ConfigRecord

    from common import protocol as P
    from common.models import build_model
    from common.training import state_to_numpy

    arrays = state_to_numpy(build_model("smallcnn", 10, 0.25))
    return RecordDict({P.ARRAYS: P.to_record(arrays), P.CONFIG: ConfigRecord({P.ROUND: 1, P.SEED: 3, **config})})


def test_a_deployed_node_checks_its_budget_against_the_servers_modelled_need(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deployed, the server sends ``required-mb``: the node compares it with its budget and runs no memory model
    of its own (whose imports cost ~130 MB of the worker's memory); a value that is no size is refused."""
    from common import protocol as P
    from common.preflight import app_defaults

    def no_model(*args: object, **kwargs: object) -> float:
        raise AssertionError("the node ran the memory model although the server sent its need")

    monkeypatch.setattr(client, "_required_mb", no_model)
    run_config = {**app_defaults(Path(__file__).resolve().parents[1]), **SMALL, "synthetic-train-size": 100}

    def train(**config: object) -> RecordDict:
        ctx = Context(1, 1, {"partition-id": 0, "num-partitions": 2, "memory-mb": 300.0}, RecordDict(), run_config)
        return client.train(_train_content(**config), ctx)

    with pytest.raises(ValueError, match=r"needs 500\.0 MB \(modelled\), over this device's budget of 300\.0 MB"):
        train(**{P.ENFORCE_BUDGET: True, P.REQUIRED_MB: 500.0})
    for bad in ("lots", -1.0, math.inf):
        with pytest.raises(ValueError, match=f"config required-mb={bad!r}: the modelled need must be a positive"):
            train(**{P.ENFORCE_BUDGET: True, P.REQUIRED_MB: bad})
    assert P.TRAIN_LOSS in train(**{P.ENFORCE_BUDGET: True, P.REQUIRED_MB: 120.0})[P.METRICS]


def test_the_monitor_query_trains_at_the_batch_the_server_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deployed under an OS limit the full model may not fit at the training batch: the query's speed
    measurement and output-layer gradient run at ``query-batch-size``; a bad value is refused."""
    import numpy as np

    from common import protocol as P
    from common.preflight import app_defaults

    seen: list[tuple[str, int]] = []

    def throughput(module: object, x: object, y: object, batch_size: int, steps: int = 3) -> float:
        seen.append(("speed", batch_size))
        return 100.0

    def gradient(model: object, x: object, y: object, *, steps: int, batch_size: int, lr: float) -> np.ndarray:
        seen.append(("grad", batch_size))
        return np.zeros(4, dtype=np.float32)

    monkeypatch.setattr(client, "measure_throughput", throughput)
    monkeypatch.setattr(client, "output_layer_gradient", gradient)
    run_config = {**app_defaults(Path(__file__).resolve().parents[1]), **SMALL, "batch-size": 32}

    def query(**config: object) -> RecordDict:
        ctx = Context(1, 1, {"partition-id": 0, "num-partitions": 2}, RecordDict(), run_config)
        return client.query(_train_content(**{P.STAGE: -1, P.WANT_GRAD: True, **config}), ctx)

    assert P.GRAD in query()
    assert seen == [("speed", 32), ("grad", 32)]
    seen.clear()
    query(**{P.QUERY_BATCH: 7})
    assert seen == [("speed", 7), ("grad", 7)]
    for bad in (0, 33, 2.5, "8", True):
        with pytest.raises(ValueError, match=f"config query-batch-size={bad!r}: must be a whole number .* 1..32"):
            query(**{P.QUERY_BATCH: bad})
