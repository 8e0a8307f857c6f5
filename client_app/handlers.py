"""What the ClientApp does with a query, train or evaluate message: ``content, context -> reply content``.

Flower-free apart from its record types: the same functions run inside the ``flwr-clientapp``
process (:mod:`client_app.app`, when no worker is configured) and in the node's warm worker
(:mod:`client_app.worker`), which keeps their caches between messages.

The client finds its data partition from ``context.node_config`` (``partition-id``,
``num-partitions``), in simulation and in deployment alike, and reads everything else from
the validated run config. Datasets, partitions and model skeletons are cached per process.

A train message says what to build through its config:

* ``stage`` absent or < 0: the full model; every array of the model is in the message and
  every array is sent back.
* ``stage`` = k >= 0: the SmartFreeze stage sub-model (frozen blocks 0..k-1, active block k,
  output module k or the head). The message carries the active block, the output module and
  only those frozen blocks this node does not hold yet; frozen blocks are kept in the node's
  ``context.state`` between rounds. The reply carries only the active block and output module.
* ``profl-shrink-block`` = k >= 0: ProFL's shrinking sub-model (basic layers for every block but
  k, the real block k, the basic classifier; :class:`common.profl.ShrinkModel`), all of it in the
  message, all of it trained and sent back.
* ``fedll-layer`` = k >= 0: FedLL's layer-wise sub-model (frozen layers 0..k-1 with depth dropout,
  layer k, its head; :class:`common.fedll.FedLLModel`). As for SmartFreeze, the message carries
  layer k, its head and the frozen layers this node does not hold (kept in ``context.state``);
  the reply carries layer k and its head, the frozen layers held and the depth-dropout FLOP counts.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import psutil
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from torch import nn

from client_app.faults import corrupt, fault_for
from common import protocol as P
from common.config import RunConfig, parse_run_config
from common.data import ClientData, client_data
from common.devices import Device, simulated_device
from common.flops import stage_flops
from common.heterofl import build_heterofl_model
from common.memory import MB, stage_memory
from common.memory_meter import track_peak
from common.models import BlockModel, build_model
from common.monitor import loss_statistics, measure_throughput, output_layer_gradient
from common.node import NodeIdentity, node_data_path, node_identity, node_memory_mb
from common.output_modules import OutputModule, StageModel, build_output_module, frozen_prefixes
from common.training import TrainResult, evaluate, load_numpy, set_torch_threads, state_to_numpy, train_local

FROZEN_STATE = "progfl-frozen-blocks"


@functools.lru_cache(maxsize=8)
def _config(items: tuple[tuple[str, object], ...]) -> RunConfig:
    return parse_run_config(dict(items))


def _setup(context: Context) -> tuple[RunConfig, NodeIdentity, ClientData]:
    run_config = dict(context.run_config)
    local_data = node_data_path(context.node_config)
    if local_data is not None:  # this device's copy of the dataset file (same partitioning)
        run_config["data-path"] = local_data
    cfg = _config(tuple(sorted(run_config.items())))
    set_torch_threads(cfg.client_threads)
    ident = node_identity(context.node_config)
    return cfg, ident, client_data(cfg.data_spec(), ident.partition_id, ident.num_partitions)


def prepare(context: Context) -> None:
    """Load what every message of the run needs (config, the node's data partition) into the caches."""
    _setup(context)


@functools.lru_cache(maxsize=4)
def _model(name: str, num_classes: int, width: float, static_bn: bool = False, scaler_rate: float = 1.0) -> BlockModel:
    """One model skeleton per process; every use overwrites the state it uses first.

    ``static_bn`` / ``scaler_rate`` build HeteroFL's variant (BN without running statistics, Scaler).
    """
    if static_bn or scaler_rate != 1.0:
        return build_heterofl_model(name, num_classes, width, static_bn=static_bn, scaler_rate=scaler_rate)
    return build_model(name, num_classes, width)


def _variant(config: ConfigRecord) -> tuple[bool, float]:
    """HeteroFL's model variant a message asks for: (static BN, Scaler rate); (False, 1.0) otherwise."""
    return bool(config.get(P.STATIC_BN, False)), float(config.get(P.SCALER, 1.0))


@functools.lru_cache(maxsize=16)
def _output_module(name: str, num_classes: int, width: float, stage: int) -> OutputModule:
    return build_output_module(_model(name, num_classes, width), stage)


@functools.lru_cache(maxsize=4)
def _basic_layers(name: str, num_classes: int, width: float) -> nn.ModuleDict:
    """ProFL's basic layers and classifier, one skeleton per process (every use loads its arrays first)."""
    from common.profl import build_basic_layers

    return build_basic_layers(_model(name, num_classes, width))


def _frozen_store(context: Context, key: str = FROZEN_STATE) -> dict[str, np.ndarray]:
    if key in context.state:
        return P.from_record(context.state[key])
    return {}


FEDLL_STATE = "progfl-fedll-frozen-layers"


@functools.lru_cache(maxsize=16)
def _fedll_head(name: str, num_classes: int, width: float, layer: int) -> nn.Module:
    """FedLL's head of ``layer`` (its channels do not depend on the image size), one skeleton per process."""
    from common.fedll import build_layer_heads

    return build_layer_heads(_model(name, num_classes, width))[str(layer)]


@functools.lru_cache(maxsize=16)
def _ssl_head(name: str, num_classes: int, width: float, layer: int, method: str, dim: int) -> nn.Module:
    """FedLL's self-supervised projection head of ``layer`` (:func:`common.fedll.build_ssl_heads`), one per process."""
    from common.fedll import build_ssl_heads

    return build_ssl_heads(_model(name, num_classes, width), method, dim)[str(layer)]


def _build_fedll(
    cfg: RunConfig,
    num_classes: int,
    width: float,
    layer: int,
    config: ConfigRecord,
    arrays: dict[str, np.ndarray],
    context: Context | None,
) -> tuple[nn.Module, tuple[str, ...]]:
    """FedLL's stage sub-model for ``layer``; frozen layers merged into / read from the node's store.

    In SSL (``fedll-objective='ssl'``) the head is the layer's projection head; with
    ``fedll-layerwise=false`` the end-to-end reference (every layer, the last layer's head).
    """
    from common.fedll import EndToEndModel, FedLLModel, dropout_seed, frozen_layer_prefixes, model_layers

    model = _model(cfg.model, num_classes, width)
    layers = model_layers(model)
    if layer >= len(layers):
        raise ValueError(f"fedll-layer {layer} out of range: model {cfg.model} has {len(layers)} layers")
    ssl, last = cfg.self_supervised, len(layers) - 1
    if not cfg.fedll_layerwise:
        head = _ssl_head(cfg.model, num_classes, width, last, cfg.ssl_method, cfg.ssl_proj_dim) if ssl else None
        e2e = EndToEndModel(model, head, ssl)
        load_numpy(e2e, arrays, strict=True)
        return e2e, e2e.trainable_prefixes()
    frozen_keys = frozen_layer_prefixes(layers, layer)
    if context is not None and frozen_keys:
        store = _frozen_store(context, FEDLL_STATE)
        fresh = {k: v for k, v in arrays.items() if k.startswith(frozen_keys)}
        if fresh:
            store.update(fresh)
            context.state[FEDLL_STATE] = ArrayRecord({k: Array(v) for k, v in store.items()})
        arrays = {**{k: v for k, v in store.items() if k.startswith(frozen_keys)}, **arrays}
    if ssl:
        head = _ssl_head(cfg.model, num_classes, width, layer, cfg.ssl_method, cfg.ssl_proj_dim)
    else:
        head = _fedll_head(cfg.model, num_classes, width, layer) if layer < last else None
    seed = dropout_seed(int(config.get(P.SEED, 0)))
    sub = FedLLModel(model, layer, head, dropout=cfg.fedll_dropout, seed=seed, ssl=ssl)
    missing = sorted({i for i, lay in enumerate(layers[:layer]) if not any(k.startswith(lay.prefixes) for k in arrays)})
    if missing:
        raise KeyError(f"fedll layer {layer}: frozen layer(s) {missing} neither in the message nor held by this node")
    load_numpy(sub, arrays, strict=True)
    return sub, sub.trainable_prefixes()


def _build(
    cfg: RunConfig, num_classes: int, config: ConfigRecord, arrays: dict[str, np.ndarray], context: Context | None
) -> tuple[nn.Module, tuple[str, ...] | None]:
    """The module a message asks for, loaded with its arrays, and the prefixes it trains.

    With ``context`` (training), frozen blocks in the message are merged into the node's frozen
    store and missing ones are read from it; without (evaluation) the message must carry all.
    """
    width = float(config.get(P.WIDTH, cfg.width))
    fedll_layer = int(config.get(P.FEDLL_LAYER, -1))
    if fedll_layer >= 0:
        return _build_fedll(cfg, num_classes, width, fedll_layer, config, arrays, context)
    depth = int(config.get(P.DEPTH, 0))
    if depth > 0:
        from common.depthfl import client_module, consistency_weight

        module = client_module(cfg.model, num_classes, width, depth)
        load_numpy(module, arrays, strict=True)
        if P.ROUND in config:  # training: the round sets the distillation ramp
            ramp = cfg.depthfl_ramp_share
            module.distill_weight = consistency_weight(int(config[P.ROUND]), cfg.num_rounds, ramp)
        return module, None
    shrink = int(config.get(P.SHRINK, -1))
    if shrink >= 0:  # ProFL shrinking step: basic layers + real block `shrink`, all trained
        from common.profl import ShrinkModel

        sub = ShrinkModel(_model(cfg.model, num_classes, width), shrink, _basic_layers(cfg.model, num_classes, width))
        load_numpy(sub, arrays, strict=True)
        return sub, sub.trainable_prefixes()
    model = _model(cfg.model, num_classes, width, *_variant(config))
    stage = int(config.get(P.STAGE, -1))
    if stage < 0:
        load_numpy(model, arrays, strict=True)
        model.requires_grad_(True)
        return model, None
    if stage >= model.num_blocks:
        raise ValueError(f"stage {stage} out of range: model {cfg.model} has {model.num_blocks} blocks")
    frozen_keys = frozen_prefixes(stage)
    if context is not None:
        store = _frozen_store(context)
        fresh = {k: v for k, v in arrays.items() if k.startswith(frozen_keys)} if frozen_keys else {}
        if fresh:
            store.update(fresh)
            context.state[FROZEN_STATE] = ArrayRecord({k: Array(v) for k, v in store.items()})
        arrays = {**{k: v for k, v in store.items() if frozen_keys and k.startswith(frozen_keys)}, **arrays}
    om = _output_module(cfg.model, num_classes, width, stage) if stage < model.num_blocks - 1 else None
    sub = StageModel(model, stage, om)
    missing = sorted({k.split(".")[1] for k in sub.state_dict() if k not in arrays and k.startswith("blocks.")})
    if missing:
        raise KeyError(f"stage {stage}: frozen block(s) {missing} neither in the message nor held by this node")
    load_numpy(sub, arrays, strict=True)
    return sub, sub.trainable_prefixes()


def _required_mb(
    cfg: RunConfig,
    num_classes: int,
    stage: int | None,
    input_shape: tuple[int, ...],
    width: float | None = None,
    depth: int = 0,
    variant: tuple[bool, float] = (False, 1.0),
    shrink: int = -1,
    fedll_layer: int = -1,
) -> float:
    """Modelled training memory (MB) of what a message asks for, at the configured batch size.

    ``stage`` (None = full model) of the model at ``width`` (default: the configured width), or
    with ``depth`` > 0 DepthFL's prefix of ``depth`` blocks with its classifiers; ``variant`` is
    HeteroFL's (static BN, Scaler rate), see :func:`_variant`; ``shrink`` >= 0 ProFL's shrinking
    step with that real block (:func:`common.profl.shrink_memory`); ``fedll_layer`` >= 0 FedLL's
    sub-model training that layer (:func:`common.fedll.required_mb`).
    """
    width = cfg.width if width is None else width
    if fedll_layer >= 0:
        from common.fedll import required_mb as fedll_required_mb
        from common.output_modules import DEFAULT_FROZEN_CHUNK

        method, dim = (cfg.ssl_method, cfg.ssl_proj_dim) if cfg.self_supervised else ("", 64)
        shape = tuple(input_shape)
        return fedll_required_mb(
            cfg.model,
            num_classes,
            width,
            fedll_layer,
            cfg.batch_size,
            shape,
            DEFAULT_FROZEN_CHUNK,
            method,
            dim,
            not cfg.fedll_layerwise,
        )
    if shrink >= 0:
        from common.profl import shrink_memory

        return shrink_memory(cfg.model, num_classes, width, shrink, cfg.batch_size, tuple(input_shape)).total
    if depth > 0:
        from common.depthfl import required_mb

        return required_mb(cfg.model, num_classes, width, depth, cfg.batch_size, input_shape)
    model = _model(cfg.model, num_classes, width, *variant)
    return stage_memory(model, stage, cfg.batch_size, input_shape).total


def _device(cfg: RunConfig, ident: NodeIdentity, context: Context, data: ClientData) -> Device:
    """This node's memory budget (MB) and speed (FLOP/s; 0 = to be measured).

    ``memory-mb`` in the node config always wins. ``device-profile='measured'`` (deployment)
    takes the memory the OS reports available; any other profile derives the simulated device
    from (seed, partition-id), scaled to the modelled full-model memory.
    """
    declared = node_memory_mb(context.node_config)
    if cfg.device_profile == "measured":
        return Device(declared or psutil.virtual_memory().available / MB, 0.0)
    if cfg.device_profile == "none":  # unlimited budget: no memory model needed (it costs 2-3 s per process)
        dev = simulated_device("none", ident.partition_id, cfg.seed, math.inf)
        return Device(declared, dev.speed_flops) if declared else dev
    shape = tuple(data.x_train.shape[1:])
    full_mb = _required_mb(cfg, data.num_classes, None, shape)
    blocks = _model(cfg.model, data.num_classes, cfg.width).num_blocks
    cheapest = min(_required_mb(cfg, data.num_classes, k, shape) for k in range(blocks))
    dev = simulated_device(
        cfg.device_profile,
        ident.partition_id,
        cfg.seed,
        full_mb,
        cfg.device_min_fraction,
        cfg.device_memory_mb,
        floor_mb=cheapest,
    )
    return Device(declared, dev.speed_flops) if declared else dev


def _held_blocks(context: Context) -> list[int]:
    return sorted({int(k.split(".")[1]) for k in _frozen_store(context)})


def _fedll_metrics(module: nn.Module, context: Context, values: dict[str, int | float | list[int]]) -> None:
    """FedLL's reply metrics: frozen layers held by this node, frozen forward FLOPs run and skipped."""
    from common.fedll import EndToEndModel, FedLLModel, layer_keys

    if isinstance(module, EndToEndModel):  # the end-to-end reference: nothing frozen, nothing skipped
        values[P.FEDLL_HELD], values[P.FEDLL_FROZEN_FLOPS], values[P.FEDLL_SKIPPED_FLOPS] = [], 0.0, 0.0
        return
    if not isinstance(module, FedLLModel):
        raise TypeError(f"a FedLL message built {type(module).__name__}, not FedLLModel")
    values[P.FEDLL_HELD] = sorted(layer_keys(list(_frozen_store(context, FEDLL_STATE)), module.layer_specs))
    values[P.FEDLL_FROZEN_FLOPS] = float(module.frozen_flops)
    values[P.FEDLL_SKIPPED_FLOPS] = float(module.skipped_flops)


def _what(config: ConfigRecord) -> str:
    """What a train message asks for, in words (error messages)."""
    stage, shrink = int(config.get(P.STAGE, -1)), int(config.get(P.SHRINK, -1))
    if shrink >= 0:
        return f"ProFL shrinking step of block {shrink + 1}"
    if int(config.get(P.FEDLL_LAYER, -1)) >= 0:
        return f"FedLL layer {int(config[P.FEDLL_LAYER]) + 1}"
    return "the model" if stage < 0 else f"stage {stage + 1}"


def _query_batch(config: ConfigRecord, batch_size: int) -> int:
    """The monitor query's training batch: ``query-batch-size`` if sent (1..batch-size), else ``batch_size``."""
    raw = config.get(P.QUERY_BATCH, batch_size)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= batch_size:
        raise ValueError(f"config {P.QUERY_BATCH}={raw!r}: must be a whole number of examples in 1..{batch_size}")
    return raw


def query(content_in: RecordDict, context: Context) -> RecordDict:
    """The local monitor: partition, data size, memory budget and speed; with a model, more.

    A query that carries arrays (full model or a stage sub-model, as in training) is also
    answered with the local loss statistics (Eq. 9 inputs) and the measured throughput, and, if
    the config asks ``want-grad``, with the output-layer gradient (Eq. 8 input) of the full model.
    Both train at the configured batch size, or at ``query-batch-size`` where the server sends it
    (deployed: the largest batch the node's budget fits, so that an OS memory limit below the full
    model's need does not kill the query; the speed measured at a smaller batch is then a lower
    bound).
    """
    cfg, ident, data = _setup(context)
    device = _device(cfg, ident, context, data)
    values: dict[str, int | float] = {
        P.PARTITION_ID: ident.partition_id,
        P.NUM_PARTITIONS: ident.num_partitions,
        P.NUM_EXAMPLES: len(data.y_train),
        P.MEMORY_MB: device.memory_mb if math.isfinite(device.memory_mb) else -1.0,
        P.SPEED_FLOPS: device.speed_flops,
    }
    content = RecordDict()
    if P.ARRAYS in content_in:
        config: ConfigRecord = content_in[P.CONFIG]
        module, _ = _build(cfg, data.num_classes, config, P.from_record(content_in[P.ARRAYS]), None)
        loss_mean, loss_sq = loss_statistics(module, data.x_train, data.y_train, cfg.eval_batch_size)
        batch = _query_batch(config, cfg.batch_size)
        throughput = measure_throughput(module, data.x_train, data.y_train, batch)
        values.update({P.LOSS_MEAN: loss_mean, P.LOSS_SQ_MEAN: loss_sq, P.SAMPLES_PER_SECOND: throughput})
        if device.speed_flops <= 0:
            stage = int(config.get(P.STAGE, -1))
            model = _model(cfg.model, data.num_classes, cfg.width)
            values[P.SPEED_FLOPS] = throughput * stage_flops(model, None if stage < 0 else stage).total
        if bool(config.get(P.WANT_GRAD, False)):
            if not isinstance(module, BlockModel):
                raise ValueError("want-grad needs the full model in the query (stage < 0)")
            grad = output_layer_gradient(
                module, data.x_train, data.y_train, steps=cfg.monitor_steps, batch_size=batch, lr=cfg.lr
            )
            content[P.GRAD] = ArrayRecord({P.GRAD: Array(grad)})
    content[P.METRICS] = MetricRecord(values)
    return content


def train(content_in: RecordDict, context: Context) -> RecordDict:
    """Train what the message asks for on the local partition; reply with the trained arrays.

    With ``pre-eval`` in the config, the received (sub-)model is first evaluated on the local
    validation split and the reply carries ``pre-eval-loss`` / ``pre-eval-accuracy`` /
    ``pre-eval-examples``: the federated evaluation of the model the node received, without a
    separate evaluate message (one round trip per round in deployment).
    """
    cfg, ident, data = _setup(context)
    config: ConfigRecord = content_in[P.CONFIG]
    stage = int(config.get(P.STAGE, -1))
    device = _device(cfg, ident, context, data)
    enforce = bool(config.get(P.ENFORCE_BUDGET, True)) and math.isfinite(device.memory_mb)
    required = math.nan  # modelled only when a finite budget is enforced (the memory model costs seconds)
    if enforce and P.REQUIRED_MB in config:  # deployed: the server sends its modelled need (saves ~130 MB here)
        raw = config[P.REQUIRED_MB]
        required = float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else math.nan
        if not 0 < required < math.inf:
            raise ValueError(f"config {P.REQUIRED_MB}={raw!r}: the modelled need must be a positive number of MB")
    elif enforce:
        required = _required_mb(
            cfg,
            data.num_classes,
            None if stage < 0 else stage,
            tuple(data.x_train.shape[1:]),
            width=float(config.get(P.WIDTH, cfg.width)),
            depth=int(config.get(P.DEPTH, 0)),
            variant=_variant(config),
            shrink=int(config.get(P.SHRINK, -1)),
            fedll_layer=int(config.get(P.FEDLL_LAYER, -1)),
        )
    if enforce and not device.fits(required):
        raise ValueError(
            f"partition {ident.partition_id}: {_what(config)} needs "
            f"{required:.1f} MB (modelled), over this device's budget of {device.memory_mb:.1f} MB"
        )
    module, prefixes = _build(cfg, data.num_classes, config, P.from_record(content_in[P.ARRAYS]), context)
    pre_eval: dict[str, float] = {}
    if bool(config.get(P.PRE_EVAL, False)):
        n, loss, acc = _validate(module, data, cfg)
        pre_eval = {P.PRE_EVAL_EXAMPLES: n, P.PRE_EVAL_LOSS: loss, P.PRE_EVAL_ACCURACY: acc}
    with track_peak(module) as peak:
        sgd = _sgd(cfg, int(config[P.SEED]))
        if cfg.self_supervised:
            result = _train_ssl(module, data.x_train, cfg, sgd)
        else:
            result = train_local(module, data.x_train, data.y_train, **sgd)
    values: dict[str, int | float | list[int]] = {
        P.NUM_EXAMPLES: len(data.y_train),
        P.PARTITION_ID: ident.partition_id,
        P.TRAIN_LOSS: result.loss,
        P.LOSS_SQ_MEAN: result.per_sample_sq_loss_mean,
        P.TRAIN_SECONDS: result.seconds,
        P.SAMPLES_PER_SECOND: result.samples_per_second,
        **pre_eval,
    }
    if math.isfinite(peak.torch_peak_mb):
        values[P.PEAK_MB] = peak.torch_peak_mb
    if math.isfinite(peak.rss_peak_mb):
        values[P.RSS_PEAK_MB] = peak.rss_peak_mb
    held = _held_blocks(context)
    if held:
        values[P.FROZEN_HELD] = held
    if P.FEDLL_LAYER in config:
        _fedll_metrics(module, context, values)
    upload = state_to_numpy(module, prefixes)
    fault = fault_for(cfg.fault_rate, cfg.fault_mode, cfg.seed, int(config[P.ROUND]), ident.partition_id)
    if fault is not None:
        sent = P.from_record(content_in[P.ARRAYS])
        upload, values[P.NUM_EXAMPLES] = corrupt(fault, upload, sent, len(data.y_train))
    return RecordDict({P.ARRAYS: P.to_record(upload), P.METRICS: MetricRecord(values)})


def _sgd(cfg: RunConfig, seed: int) -> dict[str, Any]:
    """The local training loop's settings from the run config (epochs, batch, SGD) and the round's seed."""
    return {
        "epochs": cfg.local_epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "weight_decay": cfg.weight_decay,
        "seed": seed,
    }


def _train_ssl(module: nn.Module, x: torch.Tensor, cfg: RunConfig, sgd: dict[str, Any]) -> TrainResult:
    """FedLL's self-supervised local training on the images ``x`` (the labels are not passed)."""
    from common.data import normalisation
    from common.ssl import method, train_ssl_local, two_views

    mean, std = normalisation(cfg.data_spec())
    objective, temperature = method(cfg.ssl_method).loss, cfg.ssl_temperature
    views = lambda batch, s: two_views(batch, mean, std, s)  # noqa: E731
    return train_ssl_local(module, x, views, lambda a, b: objective(a, b, temperature), **sgd)


def _validate(module: nn.Module, data: ClientData, cfg: RunConfig) -> tuple[int, float, float]:
    """(examples, loss, accuracy) of ``module`` on the local validation split; 0, 0 for an empty split."""
    if cfg.self_supervised:
        raise ValueError(
            "a self-supervised FedLL model (fedll-objective='ssl') has no classifier to evaluate on labels: "
            "the server evaluates it with a linear probe and k-NN"
        )
    loss, acc = evaluate(module, data.x_val, data.y_val, cfg.eval_batch_size)
    n = len(data.y_val)
    return n, (loss if n else 0.0), (acc if n else 0.0)


def evaluate_local(content_in: RecordDict, context: Context) -> RecordDict:
    """Evaluate the received model (full or stage sub-model) on the local validation split."""
    cfg, ident, data = _setup(context)
    module, _ = _build(cfg, data.num_classes, content_in[P.CONFIG], P.from_record(content_in[P.ARRAYS]), None)
    n, loss, acc = _validate(module, data, cfg)
    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: n,
            P.PARTITION_ID: ident.partition_id,
            P.EVAL_LOSS: loss,
            P.EVAL_ACCURACY: acc,
        }
    )
    return RecordDict({P.METRICS: metrics})


HANDLERS = {"query": query, "train": train, "evaluate": evaluate_local}
"""The handler of each Flower message type (``MessageType`` values)."""
