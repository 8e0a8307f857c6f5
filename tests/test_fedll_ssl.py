"""FedLL's self-supervised mode: what travels, labels never read, downstream evaluation, memory, config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import strategy_with_nodes
from flwr.app import ConfigRecord, Context, RecordDict

import client_app.handlers as client
from common import protocol as P
from common.config import ConfigError, parse_run_config
from common.data import client_data, held_out_set
from common.fedll import (
    SSL_HEAD_PREFIX,
    EndToEndModel,
    FedLLModel,
    build_ssl_heads,
    model_layers,
    num_layers,
    required_mb,
)
from common.memory_meter import measure_training_peak
from common.models import build_model
from common.preflight import app_defaults
from common.ssl import SSL_METHODS, nt_xent, train_ssl_local
from common.training import state_to_numpy
from server_app.fedll import FedLLStrategy

ROOT = Path(__file__).resolve().parents[1]
SSL = {"fedll-objective": "ssl", "num-rounds": 6, "ssl-eval-every": 3, "ssl-probe-fraction": 0.5, "ssl-knn-k": 5}


def _strategy(tmp_path: Path, **over: object) -> FedLLStrategy:
    return strategy_with_nodes(FedLLStrategy, tmp_path / "run", [1e6, 1e6], **{**SSL, **over})


def test_a_layerwise_ssl_stage_trains_its_layer_and_projection_head_only(tmp_path: Path) -> None:
    s = _strategy(tmp_path)
    layers = model_layers(s.model)
    assert not any(k.startswith("lhead.") for k in s.arrays)  # no classifier heads per layer in SSL
    for layer in range(len(layers)):
        s.machine.stage = layer
        active = set(s._active_keys())
        assert active == {k for k in s.arrays if k.startswith((*layers[layer].prefixes, f"{SSL_HEAD_PREFIX}.{layer}."))}
        assert not any(k.startswith("head.") for k in active)  # the classifier is the server's probe
    assert s.client_evaluation is False and not s.evaluates_in(6, 6)  # no evaluate message, no pre-eval


def test_the_end_to_end_reference_trains_every_layer_under_the_last_projection_head(tmp_path: Path) -> None:
    s = _strategy(tmp_path, **{"fedll-layerwise": False, "num-rounds": 2})
    last = num_layers("smallcnn") - 1
    active = set(s._active_keys())
    assert active == {k for k in s.arrays if k.startswith(("blocks.", f"{SSL_HEAD_PREFIX}.{last}."))}
    assert s.machine.num_blocks == 1 and isinstance(s.server_model(), EndToEndModel)
    layerwise = _strategy(tmp_path / "lw")
    assert s.required_mb() > max(layerwise.required_mb(k) for k in range(last + 1))
    sup = strategy_with_nodes(FedLLStrategy, tmp_path / "sup", [1e6], **{"num-rounds": 6})
    assert layerwise.required_mb(0) > sup.required_mb(0)  # two views: twice the activations


def _train(run_config: dict, corrupt_labels: bool, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    original = client_data

    def data(spec: object, pid: int, n: int) -> object:
        d = original(spec, pid, n)
        if not corrupt_labels:
            return d
        y = torch.randint(0, 10, d.y_train.shape, generator=torch.Generator().manual_seed(1))
        return dataclasses.replace(d, y_train=y, y_val=torch.full_like(d.y_val, 7))

    monkeypatch.setattr(client, "client_data", data)
    model = build_model("smallcnn", 10, 0.25, seed=0)
    heads = build_ssl_heads(model, "simclr", 64, seed=2)
    arrays = {**state_to_numpy(model), **{f"{SSL_HEAD_PREFIX}.{k}": v for k, v in state_to_numpy(heads).items()}}
    layers = model_layers(model)
    keys = (*layers[0].prefixes, f"{SSL_HEAD_PREFIX}.0.")
    content = RecordDict(
        {
            P.ARRAYS: P.to_record({k: v for k, v in arrays.items() if k.startswith(keys)}),
            P.CONFIG: ConfigRecord({P.ROUND: 1, P.SEED: 3, P.FEDLL_LAYER: 0, P.ENFORCE_BUDGET: False}),
        }
    )
    ctx = Context(1, 1, {"partition-id": 0, "num-partitions": 2}, RecordDict(), run_config)
    reply = client.train(content, ctx)
    return {**P.from_record(reply[P.ARRAYS]), "loss": np.array(reply[P.METRICS][P.TRAIN_LOSS])}


def test_an_ssl_client_step_never_reads_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Corrupted labels give the identical update: the self-supervised step does not read them."""
    run_config = {
        **app_defaults(ROOT),
        "strategy": "fedll",
        "model": "smallcnn",
        "synthetic-train-size": 120,
        "synthetic-test-size": 40,
        "fedll-objective": "ssl",
    }
    clean = _train(run_config, False, monkeypatch)
    corrupted = _train(run_config, True, monkeypatch)
    assert set(clean) == set(corrupted) and len(clean) > 2
    for key in clean:
        np.testing.assert_array_equal(clean[key], corrupted[key])
    assert np.isfinite(clean["loss"]) and clean["loss"] > 0
    sent = state_to_numpy(build_model("smallcnn", 10, 0.25, seed=0))
    trained = [k for k in clean if k in sent and k.endswith("weight")]
    assert trained and any(not np.array_equal(clean[k], sent[k]) for k in trained)  # the step did train


def test_downstream_evaluation_floor_schedule_and_the_probe_as_the_models_head(tmp_path: Path) -> None:
    s = _strategy(tmp_path, **{"num-rounds": 6})
    loss0, acc0 = s.evaluate_server()  # round 0: the random encoder's probe, the floor
    assert loss0 is not None and 0 <= acc0 <= 1 and "0" in s.ssl_results
    e2e = _strategy(tmp_path / "e2e", **{"num-rounds": 6, "fedll-layerwise": False})
    assert e2e.evaluate_server() == (loss0, acc0)  # the floor is the whole random encoder for both
    s.before_round(None, 1)
    assert s.evaluate_server() == (None, None) and s.end_round(1).get("knn-accuracy") is None
    s.before_round(None, 3)
    assert s.evaluate_server()[1] is not None and 0 <= s.end_round(3)["knn-accuracy"] <= 1
    s.machine.stage = num_layers("smallcnn") - 1  # the full encoder: its probe is a classifier for model.pt
    s.before_round(None, 6)
    _, acc = s.evaluate_server()
    final = s.final_arrays()
    assert not any(k.startswith((SSL_HEAD_PREFIX, "lhead")) for k in final)
    model = build_model("smallcnn", 10, 0.25)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in final.items()})
    x, y = held_out_set(s.cfg.data_spec())
    with torch.no_grad():
        model_acc = float((model.eval()(x).argmax(1) == y).float().mean())
    assert model_acc == pytest.approx(acc, abs=1e-6)  # model.pt's head is the fitted probe
    assert s.final_evaluation()[1] == acc
    summary = s.summary_extras()
    assert summary["ssl-probe-accuracy"] == acc and summary["ssl-floor-probe-accuracy"] == acc0
    assert summary["client-gflops-per-round"] >= 0


@pytest.mark.parametrize("method", sorted(SSL_METHODS))
def test_modelled_memory_of_an_ssl_step_within_15_percent(method: str) -> None:
    """The SSL step runs both views (2B) with the projection head: the memory model against the allocator."""
    model = build_model("vit", 10, 0.25, seed=0)
    layer = 3
    head = build_ssl_heads(model, method, 64, seed=1)[str(layer)]
    sub = FedLLModel(model, layer, head, ssl=True)
    loss = SSL_METHODS[method].loss

    def train_fn(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, **kw: object) -> object:
        return train_ssl_local(module, x, lambda b, s: (b, b.flip(3)), lambda a, b: loss(a, b, 0.5), **kw)

    measured = measure_training_peak(sub, 16, steps=2, train_fn=train_fn)["torch_peak_mb"]
    modelled = required_mb("vit", 10, 0.25, layer, 16, ssl_method=method)
    assert abs(modelled - measured) / measured < 0.15, (modelled, measured)
    assert modelled > required_mb("vit", 10, 0.25, layer, 16)


def test_nt_xent_runs_on_meta_tensors() -> None:
    z = torch.zeros(4, 8, device="meta")
    assert nt_xent(z, z).shape == (8,)


@pytest.mark.parametrize(
    ("over", "match"),
    [
        (
            {"strategy": "fedll", "fedll-objective": "contrastive"},
            r"fedll-objective='contrastive' is not valid; valid choices: supervised, ssl",
        ),
        (
            {"strategy": "fedll", "ssl-method": "moco"},
            r"ssl-method='moco' is not valid; valid choices: simclr, simsiam",
        ),
        ({"strategy": "fedavg", "fedll-objective": "ssl"}, r"fedll-objective='ssl' applies to strategy 'fedll' only"),
        ({"strategy": "fedavg", "fedll-layerwise": False}, r"fedll-layerwise=False applies to strategy 'fedll'"),
        ({"strategy": "fedll", "ssl-probe-fraction": 0.0}, r"ssl-probe-fraction"),
        ({"strategy": "fedll", "ssl-temperature": 0}, r"ssl-temperature"),
    ],
)
def test_bad_ssl_keys_name_the_key_and_the_valid_choices(over: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_run_config(over)


def test_the_config_choices_match_the_objectives() -> None:
    from typing import get_args

    from common.config import RunConfig

    assert set(get_args(RunConfig.model_fields["ssl_method"].annotation)) == set(SSL_METHODS)
    assert parse_run_config({"strategy": "fedll", "fedll-layerwise": False, "num-rounds": 1}).num_rounds == 1
