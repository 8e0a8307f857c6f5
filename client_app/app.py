"""The ClientApp shared by every strategy: answers query, train and evaluate messages.

The client finds its data partition from ``context.node_config`` (``partition-id``,
``num-partitions``), in simulation and in deployment alike, and reads everything else from
the validated run config. Datasets, partitions and the model skeleton are cached per process.
"""

from __future__ import annotations

import functools

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import protocol as P
from common.config import RunConfig, parse_run_config
from common.data import client_data
from common.models import BlockModel, build_model
from common.node import NodeIdentity, node_identity
from common.training import evaluate, load_numpy, set_torch_threads, state_to_numpy, train_local

app = ClientApp()


@functools.lru_cache(maxsize=8)
def _config(items: tuple[tuple[str, object], ...]) -> RunConfig:
    return parse_run_config(dict(items))


def _setup(context: Context) -> tuple[RunConfig, NodeIdentity]:
    cfg = _config(tuple(sorted(context.run_config.items())))
    set_torch_threads(cfg.client_threads)
    return cfg, node_identity(context.node_config)


@functools.lru_cache(maxsize=4)
def _model(name: str, num_classes: int, width: float) -> BlockModel:
    """One model skeleton per process; every use overwrites its whole state first."""
    return build_model(name, num_classes, width)


def _load_global(cfg: RunConfig, num_classes: int, msg: Message) -> BlockModel:
    model = _model(cfg.model, num_classes, cfg.width)
    load_numpy(model, P.from_record(msg.content[P.ARRAYS]), strict=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's partition and local data size."""
    cfg, ident = _setup(context)
    data = client_data(cfg.data_spec(), ident.partition_id, ident.num_partitions)
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
    """Train the received model on the local partition; reply with its new state and metrics."""
    cfg, ident = _setup(context)
    data = client_data(cfg.data_spec(), ident.partition_id, ident.num_partitions)
    model = _load_global(cfg, data.num_classes, msg)
    config: ConfigRecord = msg.content[P.CONFIG]
    result = train_local(
        model,
        data.x_train,
        data.y_train,
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        seed=int(config[P.SEED]),
    )
    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: len(data.y_train),
            P.PARTITION_ID: ident.partition_id,
            P.TRAIN_LOSS: result.loss,
            P.TRAIN_SECONDS: result.seconds,
            P.SAMPLES_PER_SECOND: result.samples_per_second,
        }
    )
    content = RecordDict({P.ARRAYS: P.to_record(state_to_numpy(model)), P.METRICS: metrics})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the local validation split."""
    cfg, ident = _setup(context)
    data = client_data(cfg.data_spec(), ident.partition_id, ident.num_partitions)
    model = _load_global(cfg, data.num_classes, msg)
    with torch.no_grad():
        loss, acc = evaluate(model, data.x_val, data.y_val, cfg.eval_batch_size)
    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: len(data.y_val),
            P.PARTITION_ID: ident.partition_id,
            P.EVAL_LOSS: 0.0 if len(data.y_val) == 0 else loss,
            P.EVAL_ACCURACY: 0.0 if len(data.y_val) == 0 else acc,
        }
    )
    return Message(RecordDict({P.METRICS: metrics}), reply_to=msg)
