"""Push messages and collect their replies; in deployment at a fine interval instead of Flower's 3 s.

Flower 1.41's ``Grid.send_and_receive`` over a SuperLink (``HttpGrid``) pushes the messages, then
pulls replies and sleeps a fixed 3 s between pulls whenever one is missing: a round whose last reply
arrives just after a pull waits ~3 s more, twice per round with a separate evaluation. Here the
same push is followed by pulls every ``interval`` seconds (run config ``poll-interval``); each pull
is one request to the SuperLink on the ServerApp's own connection, so a short interval costs the
link a few requests per second and nothing else. In simulation (``InMemoryGrid``), whose
``send_and_receive`` already waits on the in-process message store, Flower's method is used as is.

Semantics match Flower's: replies in arrival order, messages that could not be pushed are dropped
with a warning, and the wait ends after ``timeout`` seconds with the replies that came. Between the
push and the first pull the caller may run its own work (``while_waiting``): the nodes are training.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from common import protocol as P

log = logging.getLogger("progfl")


def send_and_receive(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float | None,
    interval: float,
    while_waiting: Callable[[], None] | None = None,
) -> list[Message]:
    """Push ``messages``, then pull their replies every ``interval`` s until all came or ``timeout`` s passed.

    ``while_waiting`` runs once, right after the push and before the first pull: the server's own work
    that the nodes need not wait for (the previous round's evaluation, record and checkpoint). Its time
    counts towards ``timeout``. In simulation the pulls then come every ``grid.pull_interval`` s, as in
    Flower's own ``send_and_receive``.
    """
    if isinstance(grid, InMemoryGrid):
        if while_waiting is None:
            return list(grid.send_and_receive(messages, timeout=timeout))
        interval = grid.pull_interval
    msgs = list(messages)
    pushed = list(grid.push_messages(msgs))
    pending = {mid for mid in pushed if mid}
    if len(pending) < len(msgs):
        log.warning("%d of %d messages could not be pushed to the SuperLink", len(msgs) - len(pending), len(msgs))
    del msgs
    end = time.monotonic() + (timeout if timeout is not None else 0.0)
    if while_waiting is not None:
        while_waiting()
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(list(pending)))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or (timeout is not None and time.monotonic() >= end):
            break
        time.sleep(interval)
    return replies


def exchange_timing(seconds: float, replies: list[Message]) -> dict[str, float]:
    """One exchange's wall time and its slowest node's figures (s): node-side handler and ClientApp start-up."""
    node, startup = 0.0, 0.0
    for reply in replies:
        if reply.has_error() or P.METRICS not in reply.content:
            continue
        m = reply.content[P.METRICS]
        node = max(node, float(m.get(P.NODE_SECONDS, 0.0)))
        startup = max(startup, float(m.get(P.STARTUP_SECONDS, 0.0)))
    return {"seconds": seconds, "node": node, "startup": startup}


def round_timing(exchanges: list[dict[str, float]]) -> dict[str, float]:
    """A round's exchanges summed (s): ``exchange-seconds`` (push to last reply), ``node-seconds-critical``
    and ``startup-seconds-critical`` (per exchange its slowest node, summed), ``exchanges`` (count)."""
    return {
        "exchanges": float(len(exchanges)),
        "exchange-seconds": sum(e["seconds"] for e in exchanges),
        "node-seconds-critical": sum(e["node"] for e in exchanges),
        "startup-seconds-critical": sum(e["startup"] for e in exchanges),
    }


def final_timing(exchanges: list[dict[str, float]]) -> dict[str, float]:
    """The final federated evaluation's exchange (s): its slowest node's compute and start-up."""
    return {
        "final-evaluate-node-seconds": sum(e["node"] for e in exchanges),
        "final-evaluate-startup-seconds": sum(e["startup"] for e in exchanges),
    }
