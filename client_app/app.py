"""The ClientApp shared by every strategy: answers query, train and evaluate messages.

What each message does is in :mod:`client_app.handlers`. Where the message is handled depends on
the node:

* **with a warm worker** (``worker-socket`` in the node config, set by ``run.sh deploy supernode``
  and ``deploy-local``): this module imports no torch; it relays the message's records to the
  node's long-lived worker (:mod:`client_app.relay`, :mod:`client_app.worker`), which keeps torch,
  the data partition, the model skeletons and the frozen blocks loaded between messages;
* **without** (simulation, or a SuperNode started by hand without a worker): the handlers run in
  this process, as Flower intends, with ``context.state`` holding the frozen blocks.

Every reply's metrics carry ``clientapp-startup-seconds`` (from the start of this process to the
import of this module: Flower's runtime start-up, the pull of the message and the FAB's install)
and ``node-seconds`` (the handler's own time); through a worker also ``relay-seconds``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flwr.app import Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from common import protocol as P
from common.node import node_worker_socket

app = ClientApp()


def _process_age() -> float:
    """Seconds since this process started (Linux ``/proc/self/stat``; 0 where it cannot be read)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5): start time after boot, clock ticks
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


_startup = [_process_age()]
"""Seconds from this process's start to this module's import (Flower's start-up, the message's pull,
the FAB's install), reported with the first message only: a process that handles more (simulation)
has no start-up per message."""


def _handle(kind: str, msg: Message, context: Context) -> Message:
    startup = _startup.pop() if _startup else 0.0
    t0 = time.perf_counter()
    socket_path = node_worker_socket(context.node_config)
    timing: dict[str, Any]
    if socket_path is None:
        from client_app.handlers import HANDLERS

        content = HANDLERS[kind](msg.content, context)
        timing = {P.NODE_SECONDS: time.perf_counter() - t0}
    else:
        from client_app.relay import forward

        content, timing = forward(
            socket_path,
            kind,
            msg.metadata.message_id,
            msg.content,
            context.run_id,
            context.node_config,
            context.run_config,
        )
    timing[P.STARTUP_SECONDS] = startup
    if P.METRICS in content:
        metrics = content[P.METRICS]
        content[P.METRICS] = MetricRecord({**dict(metrics), **{k: float(v) for k, v in timing.items()}})
    return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Partition, data size, memory budget and speed; with a model, loss statistics and gradients."""
    return _handle("query", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train what the message asks for on the local partition; reply with the trained arrays."""
    return _handle("train", msg, context)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received model (full or stage sub-model) on the local validation split."""
    return _handle("evaluate", msg, context)
