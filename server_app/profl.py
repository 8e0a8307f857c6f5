"""ProFL (KDD 2025): progressive model shrinking, then growing, frozen by effective movement.

The model logic, the interpretation of the paper and the freezing rule are in
:mod:`common.profl`; this is the server side. The stage machine (:class:`common.stages.StageMachine`)
runs over the steps of :class:`common.profl.ProFLSchedule`: with ``profl-shrinking=true`` stage
i < B is shrinking step B-1-i and stage B+k growing stage k; with ``false`` (ablation) stage k is
growing stage k. Logs and metrics show stages 1-based and name the step (``S4`` = shrinking with
real block 4, ``G1`` = growing block 1).

Global state: the model's blocks and head, SmartFreeze's output modules ``outmod.<k>.*`` (what
growing trains with block k), and in shrinking runs the basic layers ``basic.<j>.*`` and their
classifier ``basic.head.*``. Per round:

* Shrinking step k: sampled nodes get and return block k plus every basic layer but k's and
  the classifier (the whole sub-model, all trained); replies are averaged (Eq. 1). When the step
  ends, the basic layers after k and the classifier are copied into output module k (the head
  after step B-1), :func:`common.profl.outmod_from_basic`.
* Growing stage k: exactly SmartFreeze's stage k (frozen prefix sent once per node, block k and
  output module k trained and returned). After shrinking, output module k is shrinking's tail (no
  warm start between output modules); with ``profl-shrinking=false`` output module k starts from
  module k-1's as in SmartFreeze when ``outmod-warm-start=true`` (the default).

After every aggregation the pace controller observes block k's trainable parameters with the
effective-movement metric and the level ``profl-movement-threshold`` (``RunConfig.profl_pace_config``).
A step ends when it converges, by the stage machine's max-rounds/budget rules, or once it has run
its fair share of the rounds left (reason ``"share"``, see :func:`common.profl.fair_share`).
Nodes are sampled with the run's seed among those whose budget fits the step's modelled memory.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.serverapp import Grid
from torch import nn

from common import protocol as P
from common.config import RunConfig
from common.flops import completion_time
from common.output_modules import OUTMOD_PREFIX
from common.pace import PaceController
from common.profl import (
    BASIC_PREFIX,
    ProFLSchedule,
    ProFLStep,
    ShrinkModel,
    build_basic_layers,
    fair_share,
    outmod_from_basic,
    shrink_flops,
    shrink_keys,
    shrink_memory,
)
from common.stages import StageMachine
from common.training import load_numpy, state_to_numpy
from server_app.outputs import RunRecorder, atomic_write_bytes
from server_app.smartfreeze import SmartFreezeStrategy, warm_start_arrays
from server_app.strategy import FedAvgStrategy, log


class ProFLStrategy(SmartFreezeStrategy):
    """ProFL: shrinking B-1..0 then growing 0..B-1, with effective-movement freezing and memory-fit sampling."""

    name = "profl"
    enforces_budget = True
    checkpoint_attrs = ("freezes",)
    # schedule: from the run config; basic: the layers' container (their arrays are in ``arrays``).
    # machine and pace (over the steps) are checkpointed by SmartFreezeStrategy.
    transient_attrs = ("schedule", "basic")

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, num_classes: int) -> None:
        super().__init__(cfg, recorder, num_classes)
        self.schedule = ProFLSchedule(self.model.num_blocks, shrinking=cfg.profl_shrinking)
        self.machine = StageMachine(
            num_blocks=self.schedule.num_steps,
            total_rounds=cfg.num_rounds,
            min_rounds=cfg.min_stage_rounds,
            max_rounds=cfg.max_stage_rounds,
        )
        self.pace = PaceController(cfg.profl_pace_config())
        self.pace.reset(0)
        self.basic = build_basic_layers(self.model, seed=cfg.seed + 2) if cfg.profl_shrinking else None
        if self.basic is not None:
            self.arrays.update({f"{BASIC_PREFIX}.{k}": v for k, v in state_to_numpy(self.basic).items()})
        self.freezes: list[dict[str, int | str]] = []

    # ------------------------------------------------------------------ where we are
    @property
    def step(self) -> ProFLStep:
        """The current step (phase and 0-based block)."""
        return self.schedule.step(self.machine.stage)

    @property
    def stage(self) -> int:
        """The 0-based block the current step trains (SmartFreeze's stage in the growing phase)."""
        return self.step.block

    @property
    def shrinking(self) -> bool:
        """True during the shrinking phase."""
        return self.step.phase == "shrinking"

    def _active_keys(self) -> list[str]:
        if self.shrinking:
            return shrink_keys(self.arrays, self.stage)
        return super()._active_keys()

    # ------------------------------------------------------------------ resources
    def step_mb(self, step: ProFLStep) -> float:
        """Modelled training memory (MB) of ``step`` at the batch size.

        Shrinking: :func:`common.profl.shrink_memory`; growing: SmartFreeze's stage memory (Eq. 4).
        """
        if step.phase == "shrinking":
            c = self.cfg
            shape = tuple(self.input_shape())
            return shrink_memory(c.model, self.num_classes, c.width, step.block, c.batch_size, shape).total
        return super().required_mb(step.block)

    def required_mb(self, stage: int | None = None) -> float:
        """Modelled training memory (MB) of the current step (``stage`` is ignored: ProFL has steps)."""
        return self.step_mb(self.step)

    def completion_time(self, partition_id: int) -> float:
        """Simulated local training time (s, Eq. 6) of the current step; 0 if the node's speed is unknown."""
        if not self.shrinking:
            return super().completion_time(partition_id)
        node = self.nodes[partition_id]
        if node.speed_flops <= 0:
            return 0.0
        flops = shrink_flops(self.cfg.model, self.num_classes, self.cfg.width, self.stage, tuple(self.input_shape()))
        return completion_time(flops.total, node.num_examples, self.cfg.local_epochs, node.speed_flops)

    # ------------------------------------------------------------------ selection (memory fit, seeded)
    def on_start(self, grid: Grid) -> None:
        """Nothing beyond discovery: budgets and speeds come with the nodes' first query reply."""

    def before_round(self, grid: Grid, server_round: int) -> None:
        """No per-stage monitor query (ProFL has no community-based selector)."""

    def sample(self, server_round: int) -> list[int]:
        """A seeded draw among the nodes whose budget fits the current step (FedAvg's sampling rule)."""
        return FedAvgStrategy.sample(self, server_round)

    def on_reply(self, server_round: int, partition_id: int, metrics: dict) -> None:
        """Remember which frozen blocks the node holds (growing sends each frozen block once)."""
        held = metrics.get(P.FROZEN_HELD, [])
        self.frozen_held[partition_id] = {int(b) for b in held} if isinstance(held, list) else set()

    def on_failure(self, server_round: int, partition_id: int) -> None:
        """A failed node may have lost its frozen blocks: send them again next time."""
        self.frozen_held.pop(partition_id, None)

    # ------------------------------------------------------------------ payloads
    def train_payload(self, server_round: int, partition_id: int) -> dict[str, np.ndarray]:
        """Shrinking: the whole step sub-model; growing: SmartFreeze's payload."""
        if self.shrinking:
            return {k: self.arrays[k] for k in self._active_keys()}
        return super().train_payload(server_round, partition_id)

    def train_config(self, server_round: int, partition_id: int) -> dict[str, int | float | str | bool]:
        """Shrinking: FedAvg's config plus the shrinking block; growing: plus the stage."""
        if self.shrinking:
            return {**FedAvgStrategy.train_config(self, server_round, partition_id), P.SHRINK: self.stage}
        return super().train_config(server_round, partition_id)

    def eval_payload(self, server_round: int) -> tuple[dict[str, np.ndarray], dict[str, int | float | str | bool]]:
        """The current step's sub-model and the config key that builds it."""
        if self.shrinking:
            return {k: self.arrays[k] for k in self._active_keys()}, {P.SHRINK: self.stage}
        return super().eval_payload(server_round)

    def server_model(self) -> nn.Module:
        """The current step's sub-model with the global arrays loaded."""
        if not self.shrinking:
            return super().server_model()
        assert self.basic is not None
        sub = ShrinkModel(self.model, self.stage, self.basic)
        load_numpy(sub, {k: self.arrays[k] for k in sub.state_dict()})
        return sub

    def final_arrays(self) -> dict[str, np.ndarray]:
        """Blocks and head only (output modules and basic layers are training scaffolding)."""
        return {k: v for k, v in self.arrays.items() if not k.startswith((f"{OUTMOD_PREFIX}.", f"{BASIC_PREFIX}."))}

    # ------------------------------------------------------------------ steps
    def round_info(self, server_round: int) -> dict[str, float | int | str]:
        """The 1-based stage (step), its phase and its 1-based block."""
        step = self.step
        return {"stage": self.machine.stage + 1, "phase": step.phase, "block": step.block + 1}

    def end_round(self, server_round: int) -> dict[str, float | int | str | bool | None]:
        """Feed the pace controller with block k; at a step's end carry shrinking's tail into growing."""
        trained = self._round_aggregated  # a failed round (< min-replies) does not count
        step = self.step
        pace_step = None
        if trained:
            params = np.concatenate([self.arrays[k].ravel() for k in self._block_param_keys(step.block)])
            pace_step = self.pace.observe(server_round, params)
        reason = self.machine.end_of_round(converged=bool(pace_step and pace_step.freeze))
        if reason is None and self._share_used():
            self.machine.advance("share")
            reason = "share"
        if reason is not None:
            if step.phase == "shrinking":
                self.arrays.update(outmod_from_basic(self.arrays, step.block, self.model.num_blocks))
            elif not self.cfg.profl_shrinking and self.cfg.outmod_warm_start:
                # growing only (ablation): SmartFreeze's warm start, so that the ablation differs
                # from SmartFreeze in the freezing rule and the selector, not in the output modules
                self.arrays.update(warm_start_arrays(self.arrays, self.step.block, self.model.num_blocks))
            self.freezes.append(
                {
                    "round": server_round,
                    "step": step.label,
                    "phase": step.phase,
                    "block": step.block + 1,
                    "reason": reason,
                }
            )
            nxt = self.step
            log.info(
                "round %d: %s step of block %d ends (%s); %s step of block %d starts",
                server_round,
                step.phase,
                step.block + 1,
                reason,
                nxt.phase,
                nxt.block + 1,
            )
            self.pace.reset(self.machine.stage)
        self._write_pace()
        return {
            "pace-metric": None if pace_step is None else pace_step.metric,
            "pace-smoothed": None if pace_step is None else pace_step.smoothed,
            "pace-slope": None if pace_step is None else pace_step.slope,
            "pace-streak": None if pace_step is None else pace_step.streak,
            "froze-block": step.block + 1 if reason else None,
            "freeze-reason": reason,
            "froze-step": step.label if reason else None,
        }

    def _share_used(self) -> bool:
        """True if the current step has run its fair share of the rounds (:func:`common.profl.fair_share`)."""
        m = self.machine
        if m.is_last or m.rounds_left <= 0:
            return False
        return m.rounds_in_stage >= fair_share(m.total_rounds, m.history[-1].start_round, m.num_blocks - m.stage)

    def _write_pace(self) -> None:
        doc = {
            "stages": self.machine.state_dict(),
            "profl": {"schedule": self.schedule.state_dict(), "steps": [s.label for s in self.schedule.steps()]},
            "pace": self.pace.history,
        }
        atomic_write_bytes(self.recorder.run_dir / "pace.json", json.dumps(doc, indent=1).encode())

    def summary_extras(self) -> dict[str, object]:
        """Step schedule (phase, block, rounds, why each ended) and the modelled memory of every step."""
        self.machine.finish()
        self._write_pace()
        memory = {step.label: self.step_mb(step) for step in self.schedule.steps()}
        return {
            "monitor-bytes": 0,
            "profl-schedule": self.schedule.state_dict(),
            "profl-step-memory-mb": memory,
            "profl-freezes": self.freezes,
            "stages": [
                {
                    "stage": h.stage + 1,
                    "step": self.schedule.step(h.stage).label,
                    "phase": self.schedule.step(h.stage).phase,
                    "block": self.schedule.step(h.stage).block + 1,
                    "start-round": h.start_round,
                    "end-round": h.end_round,
                    "reason": h.reason,
                }
                for h in self.machine.history
            ],
        }
