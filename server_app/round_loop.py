"""The round loop of a strategy: train, federated and server evaluation, record, checkpoint, progress.

:class:`RoundLoop` is a part of :class:`server_app.strategy.FedAvgStrategy` (Flower's ``Strategy.start``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from common import protocol as P
from server_app import checkpoint as ckpt
from server_app.exchange import final_timing, round_timing

log = logging.getLogger("progfl")


class RoundLoop:
    """``start`` and the progress line for :class:`server_app.strategy.FedAvgStrategy`."""

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        checkpoint: ckpt.Checkpoint | None = None,
    ) -> Result:
        """Run all rounds: train, federated evaluation, server evaluation, record, checkpoint, print progress.

        With ``checkpoint`` (validated by :func:`server_app.checkpoint.check_resume`), the state is
        restored instead of :meth:`on_start` and the run continues after the checkpoint's round.
        """
        if initial_arrays is not None:
            self.arrays = P.from_record(initial_arrays)
        num_rounds = num_rounds or self.cfg.num_rounds
        timeout = timeout or self.cfg.round_timeout
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        result = Result()
        self.deployed = not isinstance(grid, InMemoryGrid)
        self.summary()
        self.discover(grid)
        undeclared = self.undeclared_attrs()
        if undeclared:
            log.warning("%s: attributes %s are not checkpointed; a resumed run may differ", self.name, undeclared)
        if checkpoint is None:
            self.on_start(grid)
            loss0, acc0 = self.evaluate_server()
            log.info("initial server evaluation: accuracy %.2f%% loss %.4f", 100 * acc0, loss0)
            self.recorder.add_round({"round": 0, **self.round_info(1), "server-accuracy": acc0, "server-loss": loss0})
            first, elapsed = 1, 0.0
        else:
            first = self.resume(checkpoint)
            elapsed = float(self.recorder.rounds[-1].get("wall-seconds") or 0.0) if self.recorder.rounds else 0.0
        t_start = time.monotonic() - elapsed
        overlap = self.overlaps_server_work()
        closing: list[Callable[[], None]] = []  # the last round's closing work, run while the next one trains
        try:
            for rnd in range(first, num_rounds + 1):
                self._train_and_close(
                    grid, rnd, num_rounds, t_start, timeout, train_config, evaluate_config, result, overlap, closing
                )
        finally:
            # the last round's evaluation, record and checkpoint are never lost (an interrupt, a failure)
            while closing:
                closing.pop()()
        if not any(n.rounds_trained for n in self.nodes.values()):
            if self._ever_eligible:
                raise RuntimeError(f"no client trained successfully in {num_rounds} rounds; see the node errors above")
            log.warning("%s: no device's budget fits the model in any round; the model was never trained", self.name)
            print(f"[{self.name}] no device fits the model: participation 0 %, the model is untrained", flush=True)
        final_loss, final_acc = self.final_evaluation()
        self.recorder.save_model(self.final_arrays())
        self.recorder.set_summary(
            strategy=self.name,
            rounds=num_rounds,
            **{"final-accuracy": final_acc, "final-loss": final_loss},
            **{
                "best-accuracy": max(
                    r["server-accuracy"] for r in self.recorder.rounds if r.get("server-accuracy") is not None
                )
            },
            **{"participation-rate": self.participation_rate(), "num-nodes": len(self.nodes)},
            **{
                "node-memory-mb": {
                    str(pid): n.memory_mb if math.isfinite(n.memory_mb) else -1.0
                    for pid, n in sorted(self.nodes.items())
                }
            },
            **{"node-memory-seen": {str(pid): n.memory_seen for pid, n in sorted(self.nodes.items()) if n.memory_seen}},
            **{
                "bytes-down": sum(r.get("bytes-down", 0) for r in self.recorder.rounds),
                "bytes-up": sum(r.get("bytes-up", 0) for r in self.recorder.rounds),
            },
            **{"wall-seconds": time.monotonic() - t_start, "rejections": self.rejections},
            **self.summary_extras(),
        )
        self.recorder.plot_accuracy()
        try:
            from server_app.report import write_report

            write_report(self.recorder.run_dir)
        except Exception as exc:  # the report is a convenience: it must never fail the run
            log.warning("could not write report.html in %s: %s", self.recorder.run_dir, exc, exc_info=True)
        return result

    def _train_and_close(
        self,
        grid: Grid,
        rnd: int,
        num_rounds: int,
        t_start: float,
        timeout: float,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
        result: Result,
        overlap: bool,
        closing: list[Callable[[], None]],
    ) -> None:
        """One round: train, then either close it now or (``overlap``) leave its closing work in ``closing``.

        Closing is the server's evaluation of the round's model, the recorded row, the checkpoint and the
        progress line. With ``overlap``, the next round's exchange runs it right after its push, while the
        nodes train: the round's decisions (aggregation, :meth:`end_round`) are made first, the model is
        copied for the evaluation (:meth:`server_evaluation`) and the state for the checkpoint
        (:meth:`checkpoint_snapshot`). A round with a federated evaluation exchange (deployed: the last),
        the last round and the round ``stop-after-round`` names close at once; with ``overlap``, the
        server's evaluation then runs inside the federated evaluation's exchange.
        """
        t_round = time.monotonic()
        self._exchanges = []
        self.discover(grid)
        self.before_round(grid, rnd)
        info = self.round_info(rnd)
        evaluates = self.evaluates_in(rnd, num_rounds)
        pre_eval = not evaluates and self.client_evaluation
        round_config = ConfigRecord({**dict(train_config), P.PRE_EVAL: True}) if pre_eval else train_config
        for attempt in range(self.cfg.round_retries + 1):
            msgs = list(self.configure_train(rnd, ArrayRecord(), round_config, grid))
            side_msgs = self.round_side_messages(rnd) if attempt == 0 else []
            replies = self.exchange(grid, msgs + side_msgs, timeout, closing.pop() if closing else None)
            side = [r for r in replies if r.metadata.message_type != MessageType.TRAIN]
            if side:
                self.on_side_replies(rnd, side)
            replies = [r for r in replies if r.metadata.message_type == MessageType.TRAIN]
            agg_arrays, train_metrics = self.aggregate_train(rnd, replies)
            if agg_arrays is not None or not self._round_participants:
                break
            if attempt < self.cfg.round_retries:
                retries = self.cfg.round_retries
                log.warning("round %d: too few valid replies; retrying (%d/%d)", rnd, attempt + 1, retries)
        self._round_train_metrics["attempts"] = attempt + 1
        if agg_arrays is not None:
            result.arrays = agg_arrays
        if train_metrics is not None:
            result.train_metrics_clientapp[rnd] = train_metrics
        train_row = {
            **self._round_train_metrics,
            "participant-ids": list(self._round_succeeded),
        }
        if overlap and not evaluates and rnd < num_rounds and rnd != self.cfg.stop_after_round:
            evaluation = self.server_evaluation()
            extra = self.end_round(rnd)
            snapshot = self.checkpoint_snapshot()
            round_end = time.monotonic()
            timing = {"round-seconds": round_end - t_round, **round_timing(self._exchanges)}

            def close() -> None:
                loss, acc = evaluation()
                self._record(
                    rnd, num_rounds, t_start, round_end, result, info, loss, acc, None, train_row, timing, extra
                )
                self.save_checkpoint(rnd, snapshot)

            closing.append(close)
            return
        # With overlap, a round with a federated evaluation runs the server's evaluation inside that exchange
        evaluation = self.server_evaluation() if overlap and evaluates else None
        loss, acc = (None, None) if evaluation else self.evaluate_server()
        eval_msgs = list(self.configure_evaluate(rnd, ArrayRecord(), evaluate_config, grid)) if evaluates else []
        t_eval, train_exchanges = time.monotonic(), len(self._exchanges)
        client_metrics = None
        scores: list[tuple[float | None, float | None]] = []
        if eval_msgs:
            work = (lambda: scores.append(evaluation())) if evaluation else None
            client_metrics = self.aggregate_evaluate(rnd, self.exchange(grid, eval_msgs, timeout, work))
        if evaluation:
            loss, acc = scores[0] if scores else evaluation()
        now = time.monotonic()
        final_eval: dict[str, float] = {}
        if eval_msgs and rnd == num_rounds:  # the run's final federated evaluation, timed apart from the round
            final_eval = {"final-evaluate-seconds": now - t_eval, **final_timing(self._exchanges[train_exchanges:])}
            self._exchanges = self._exchanges[:train_exchanges]
        round_end = t_eval if final_eval else now
        timing = {"round-seconds": round_end - t_round, **round_timing(self._exchanges), **final_eval}
        extra = self.end_round(rnd)
        self._record(rnd, num_rounds, t_start, now, result, info, loss, acc, client_metrics, train_row, timing, extra)
        self.save_checkpoint(rnd)
        if rnd == self.cfg.stop_after_round and rnd < num_rounds:
            raise ckpt.StopAfterRound(
                f"stopped after round {rnd} as asked by stop-after-round={rnd} (testing an interruption); "
                f"continue with: ./run.sh resume {self.recorder.run_dir}"
            )

    def _record(
        self,
        rnd: int,
        num_rounds: int,
        t_start: float,
        now: float,
        result: Result,
        info: dict,
        loss: float | None,
        acc: float | None,
        client_metrics: MetricRecord | None,
        train_row: dict,
        timing: dict,
        extra: dict,
    ) -> None:
        """The round's row into the recorder and ``result``, and its progress line."""
        if acc is not None:  # None: no server evaluation this round (FedLL's SSL between probes)
            result.evaluate_metrics_serverapp[rnd] = MetricRecord({"server-loss": loss, "server-accuracy": acc})
        if client_metrics is not None:
            result.evaluate_metrics_clientapp[rnd] = client_metrics
        row = {
            "round": rnd,
            **info,
            "server-accuracy": acc,
            "server-loss": loss,
            **(dict(client_metrics) if client_metrics else {}),
            **train_row,
            **timing,
            "wall-seconds": now - t_start,
        }
        row.update(extra)
        self.recorder.add_round(row)
        eta = (now - t_start) / rnd * (num_rounds - rnd)
        self.progress(rnd, num_rounds, row, eta)

    def progress(self, rnd: int, num_rounds: int, row: dict, eta: float) -> None:
        """Print one progress line for the round."""
        extra = f" stage {row['stage']}" if "stage" in row else ""
        client = f" client-acc {100 * row['client-accuracy']:5.1f}%" if row.get("client-accuracy") is not None else ""
        line = (
            f"[{self.name}] round {rnd}/{num_rounds}{extra}"
            f" | {_accuracy(row)}"
            f"{client} | {int(row.get('participants', 0))} clients ({int(row.get('failures', 0))} failed)"
            f" | {row['round-seconds']:.1f}s, elapsed {row['wall-seconds']:.0f}s, eta {eta:.0f}s"
        )
        if row.get("froze-step"):  # ProFL: a shrinking step ends without freezing its block
            line += f" | step {row['froze-step']} ended ({row['freeze-reason']})"
        elif row.get("froze-block"):
            line += f" | block {row['froze-block']} frozen ({row['freeze-reason']})"
        print(line, flush=True)


def _accuracy(row: dict) -> str:
    """The progress line's server accuracy and loss ("acc —" in a round without a server evaluation)."""
    if row.get("server-accuracy") is None:
        return "acc    —"
    return f"acc {100 * row['server-accuracy']:5.1f}% loss {row['server-loss']:.3f}"
