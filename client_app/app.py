"""The ClientApp shared by every strategy: answers query, train and evaluate messages.

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
"""

from __future__ import annotations

import functools

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from common import protocol as P
from common.config import RunConfig, parse_run_config
from common.data import ClientData, client_data
from common.models import BlockModel, build_model
from common.node import NodeIdentity, node_identity
from common.output_modules import OutputModule, StageModel, build_output_module, frozen_prefixes
from common.training import evaluate, load_numpy, set_torch_threads, state_to_numpy, train_local

app = ClientApp()

FROZEN_STATE = "progfl-frozen-blocks"


@functools.lru_cache(maxsize=8)
def _config(items: tuple[tuple[str, object], ...]) -> RunConfig:
    return parse_run_config(dict(items))


def _setup(context: Context) -> tuple[RunConfig, NodeIdentity, ClientData]:
    cfg = _config(tuple(sorted(context.run_config.items())))
    set_torch_threads(cfg.client_threads)
    ident = node_identity(context.node_config)
    return cfg, ident, client_data(cfg.data_spec(), ident.partition_id, ident.num_partitions)


@functools.lru_cache(maxsize=4)
def _model(name: str, num_classes: int, width: float) -> BlockModel:
    """One model skeleton per process; every use overwrites the state it uses first."""
    return build_model(name, num_classes, width)


@functools.lru_cache(maxsize=16)
def _output_module(name: str, num_classes: int, width: float, stage: int) -> OutputModule:
    return build_output_module(_model(name, num_classes, width), stage)


def _frozen_store(context: Context) -> dict[str, np.ndarray]:
    if FROZEN_STATE in context.state:
        return P.from_record(context.state[FROZEN_STATE])
    return {}


def _build(
    cfg: RunConfig, num_classes: int, config: ConfigRecord, arrays: dict[str, np.ndarray], context: Context | None
) -> tuple[nn.Module, tuple[str, ...] | None]:
    """The module a message asks for, loaded with its arrays, and the prefixes it trains.

    With ``context`` (training), frozen blocks in the message are merged into the node's frozen
    store and missing ones are read from it; without (evaluation) the message must carry all.
    """
    model = _model(cfg.model, num_classes, cfg.width)
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
    om = _output_module(cfg.model, num_classes, cfg.width, stage) if stage < model.num_blocks - 1 else None
    sub = StageModel(model, stage, om)
    missing = sorted({k.split(".")[1] for k in sub.state_dict() if k not in arrays and k.startswith("blocks.")})
    if missing:
        raise KeyError(f"stage {stage}: frozen block(s) {missing} neither in the message nor held by this node")
    load_numpy(sub, arrays, strict=True)
    return sub, sub.trainable_prefixes()


def _held_blocks(context: Context) -> list[int]:
    return sorted({int(k.split(".")[1]) for k in _frozen_store(context)})


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's partition and local data size."""
    _, ident, data = _setup(context)
    metrics = MetricRecord(
        {
            P.PARTITION_ID: ident.partition_id,
            P.NUM_PARTITIONS: ident.num_partitions,
            P.NUM_EXAMPLES: len(data.y_train),
        }
    )
    return Message(RecordDict({P.METRICS: metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train what the message asks for on the local partition; reply with the trained arrays."""
    cfg, ident, data = _setup(context)
    config: ConfigRecord = msg.content[P.CONFIG]
    module, prefixes = _build(cfg, data.num_classes, config, P.from_record(msg.content[P.ARRAYS]), context)
    result = train_local(
        module,
        data.x_train,
        data.y_train,
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        seed=int(config[P.SEED]),
    )
    values: dict[str, int | float | list[int]] = {
        P.NUM_EXAMPLES: len(data.y_train),
        P.PARTITION_ID: ident.partition_id,
        P.TRAIN_LOSS: result.loss,
        P.LOSS_SQ_MEAN: result.per_sample_sq_loss_mean,
        P.TRAIN_SECONDS: result.seconds,
        P.SAMPLES_PER_SECOND: result.samples_per_second,
    }
    held = _held_blocks(context)
    if held:
        values[P.FROZEN_HELD] = held
    content = RecordDict({P.ARRAYS: P.to_record(state_to_numpy(module, prefixes)), P.METRICS: MetricRecord(values)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received model (full or stage sub-model) on the local validation split."""
    cfg, ident, data = _setup(context)
    module, _ = _build(cfg, data.num_classes, msg.content[P.CONFIG], P.from_record(msg.content[P.ARRAYS]), None)
    loss, acc = evaluate(module, data.x_val, data.y_val, cfg.eval_batch_size)
    empty = len(data.y_val) == 0
    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: len(data.y_val),
            P.PARTITION_ID: ident.partition_id,
            P.EVAL_LOSS: 0.0 if empty else loss,
            P.EVAL_ACCURACY: 0.0 if empty else acc,
        }
    )
    return Message(RecordDict({P.METRICS: metrics}), reply_to=msg)
