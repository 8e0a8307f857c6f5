"""Checkpoint and resume of a strategy: its declared state out to ``checkpoint.npz`` and back (validated).

:class:`CheckpointState` is a part of :class:`server_app.strategy.FedAvgStrategy`: after every round
its :meth:`~CheckpointState.checkpoint_state` is written to ``<run-dir>/checkpoint.npz``
(:mod:`server_app.checkpoint`); ``start(checkpoint=...)`` restores it and the run continues with the
next round. Each class lists its own ``checkpoint_attrs`` and ``transient_attrs``; the lists along
the MRO are joined.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from server_app import checkpoint as ckpt

log = logging.getLogger("progfl")

_RECORDER = "recorder"
"""The checkpoint state's entry (and array-name prefix) for the recorded rows and summary."""


def _as_arrays(value: Any) -> Any:
    """A dict of numpy values (model arrays) with every value an array: 0-d entries may be numpy scalars."""
    if isinstance(value, dict) and value and all(isinstance(v, np.ndarray | np.generic) for v in value.values()):
        return {k: np.asarray(v) for k, v in value.items()}
    return value


def _check_like(name: str, current: Any, value: Any) -> None:
    """A restored array (or dict of arrays) must match the freshly built one in keys, shapes and dtypes."""
    if isinstance(current, np.ndarray):
        if not isinstance(value, np.ndarray) or value.shape != current.shape or value.dtype != current.dtype:
            got = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
            raise ckpt.CheckpointError(f"checkpoint {name}: {got}, the model has {current.dtype} {current.shape}")
    elif isinstance(current, dict) and current and all(isinstance(v, np.ndarray) for v in current.values()):
        if not isinstance(value, dict) or set(value) != set(current):
            extra = sorted(set(value) - set(current)) if isinstance(value, dict) else []
            missing = sorted(set(current) - set(value)) if isinstance(value, dict) else sorted(current)
            raise ckpt.CheckpointError(
                f"checkpoint {name}: keys differ from the model (extra {extra[:3]}, missing {missing[:3]})"
            )
        for key in current:
            _check_like(f"{name}[{key!r}]", current[key], value[key])


class CheckpointState:
    """Checkpoint and resume for :class:`server_app.strategy.FedAvgStrategy`."""

    @classmethod
    def declared_attrs(cls, kind: str) -> list[str]:
        """``checkpoint_attrs`` or ``transient_attrs`` of every class in the MRO, base classes first."""
        out: list[str] = []
        for klass in reversed(cls.__mro__):
            out += [a for a in klass.__dict__.get(kind, ()) if a not in out]
        return out

    def undeclared_attrs(self) -> list[str]:
        """Instance attributes neither checkpointed nor declared transient (a resume would lose them)."""
        known = set(self.declared_attrs("checkpoint_attrs")) | set(self.declared_attrs("transient_attrs"))
        return sorted(set(vars(self)) - known)

    def checkpoint_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, JSON-ready state) that, with the run config, determine every later round:
        :meth:`strategy_state` and the metrics recorded so far (rows and summary)."""
        arrays, state = self.strategy_state()
        state[_RECORDER] = self._encode_recorder(arrays)
        return arrays, state

    def _encode_recorder(self, arrays: dict[str, np.ndarray]) -> Any:
        """The recorder's rows and summary, JSON-ready (their arrays, if any, go to ``arrays``)."""
        return ckpt.encode({"rounds": self.recorder.rounds, "summary": self.recorder.summary}, arrays, _RECORDER)

    def strategy_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The strategy's part of :meth:`checkpoint_state` (arrays, JSON-ready state).

        Every attribute of :attr:`checkpoint_attrs` (encoded by :func:`server_app.checkpoint.encode`)
        and the node table by partition id (examples, budget, speed, rounds trained). Subclasses with
        extra state list it in ``checkpoint_attrs``; override this (calling ``super()``) only for
        state that is not an attribute.
        """
        arrays: dict[str, np.ndarray] = {}
        state = {
            "attrs": {
                name: ckpt.encode(_as_arrays(getattr(self, name)), arrays, f"attrs/{name}")
                for name in self.declared_attrs("checkpoint_attrs")
            },
            "nodes": {
                str(pid): {
                    "node-id": n.node_id,
                    "num-examples": n.num_examples,
                    "memory-mb": n.memory_mb,
                    "speed-flops": n.speed_flops,
                    "rounds-trained": list(n.rounds_trained),
                    "oom-cap-mb": n.oom_cap_mb if math.isfinite(n.oom_cap_mb) else -1.0,
                    "memory-seen": [dict(row) for row in n.memory_seen],
                }
                for pid, n in sorted(self.nodes.items())
            },
        }
        return arrays, state

    def restore_state(self, state: dict[str, Any]) -> None:
        """Set the state of :meth:`checkpoint_state` (decoded) on this freshly built strategy.

        Called after :meth:`discover`, instead of :meth:`on_start`. Arrays must match the freshly
        built ones in keys, shapes and dtypes; nodes are matched by partition id and keep the
        checkpoint's budget, speed and rounds trained (what the uninterrupted run would use).
        """
        attrs = state["attrs"]
        missing = [name for name in self.declared_attrs("checkpoint_attrs") if name not in attrs]
        if missing:
            raise ckpt.CheckpointError(f"checkpoint of strategy {self.name!r} lacks {missing}")
        for name in self.declared_attrs("checkpoint_attrs"):
            current, value = getattr(self, name), attrs[name]
            if isinstance(value, ckpt.ObjectState):
                value = value.build(current, name)
            _check_like(name, current, value)
            setattr(self, name, value)
        saved = {int(pid): info for pid, info in state["nodes"].items()}
        for pid, info in sorted(saved.items()):
            node = self.nodes.get(pid)
            if node is None:
                log.warning("resume: partition %d is in the checkpoint but has not reconnected", pid)
                continue
            if node.num_examples != int(info["num-examples"]):
                raise ckpt.CheckpointError(
                    f"partition {pid} now holds {node.num_examples} examples, {info['num-examples']} in the checkpoint"
                )
            if node.memory_mb != float(info["memory-mb"]):
                log.warning(
                    "resume: partition %d reports %.1f MB now, %.1f MB in the checkpoint; using the checkpoint's",
                    pid,
                    node.memory_mb,
                    float(info["memory-mb"]),
                )
            node.memory_mb = float(info["memory-mb"])
            node.speed_flops = float(info["speed-flops"])
            node.rounds_trained = [int(r) for r in info["rounds-trained"]]
            cap = float(info.get("oom-cap-mb", -1.0))  # absent in checkpoints before the OS limits
            node.oom_cap_mb = cap if cap >= 0 else float("inf")
            node.memory_seen = [{k: float(v) for k, v in row.items()} for row in info.get("memory-seen", [])]
        new = sorted(set(self.nodes) - set(saved))
        if new:
            log.warning("resume: partitions %s were not in the checkpoint; sampling may differ from the original", new)
        self.recorder.rounds = list(state["recorder"]["rounds"])
        self.recorder.summary.update(state["recorder"]["summary"])
        self.recorder.write_metrics()

    def checkpoint_snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """:meth:`strategy_state` now, its arrays copied: still this round's state once the next round has
        started changing the strategy (``overlap-server-work``). :meth:`save_checkpoint` adds the recorder."""
        arrays, state = self.strategy_state()
        return {k: v.copy() for k, v in arrays.items()}, state

    def save_checkpoint(
        self, server_round: int, snapshot: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None
    ) -> None:
        """Write ``<run-dir>/checkpoint.npz`` after ``server_round`` (atomically).

        With ``snapshot`` (:meth:`checkpoint_snapshot`, taken when the round's decisions were made), the
        strategy's state is the snapshot's and the recorder's rows are the current ones.
        """
        if snapshot is None:
            arrays, state = self.checkpoint_state()
        else:
            arrays, state = dict(snapshot[0]), dict(snapshot[1])
            state[_RECORDER] = self._encode_recorder(arrays)
        ckpt.save_checkpoint(self.recorder.run_dir, server_round, self.name, self.cfg.to_flat(), state, arrays)

    def resume(self, checkpoint: ckpt.Checkpoint) -> int:
        """Restore ``checkpoint`` (after :meth:`discover`); return the first round still to run."""
        self.restore_state(checkpoint.decoded_state())
        log.info("resumed %s after round %d from %s", self.name, checkpoint.round, checkpoint.path)
        print(f"[{self.name}] resumed after round {checkpoint.round} from {checkpoint.path}", flush=True)
        return checkpoint.round + 1
