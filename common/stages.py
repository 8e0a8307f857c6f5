"""The stage state machine of progressive training (pure Python, JSON-serialisable).

Stage k (0-based) trains block k with its output module; blocks before k are frozen. The
machine advances from stage k to k+1 when

* the pace controller says block k converged and the stage has run ``min_rounds``
  (reason ``"converged"``), or
* the stage has run ``max_rounds`` (reason ``"max-rounds"``), or
* the remaining round budget is only just enough to give every later stage ``min_rounds``
  (reason ``"budget"``),

so a run always reaches the last stage (the full network: every block plus the model's head)
within ``total_rounds``. The last stage runs until the budget ends.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class StageRecord:
    """One finished or running stage: first and last round, and why it ended."""

    stage: int
    start_round: int
    end_round: int | None = None
    reason: str | None = None


@dataclass
class StageMachine:
    """Which block is trained in which round, and when to move to the next one."""

    num_blocks: int
    total_rounds: int
    min_rounds: int = 1
    max_rounds: int = 0
    stage: int = 0
    rounds_in_stage: int = 0
    completed_rounds: int = 0
    history: list[StageRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.min_rounds < 1:
            raise ValueError(f"min-stage-rounds must be >= 1, got {self.min_rounds}")
        if self.max_rounds and self.max_rounds < self.min_rounds:
            raise ValueError(f"max-stage-rounds={self.max_rounds} is below min-stage-rounds={self.min_rounds}")
        if self.total_rounds < self.num_blocks * self.min_rounds:
            raise ValueError(
                f"num-rounds={self.total_rounds} cannot give each of the {self.num_blocks} stages "
                f"min-stage-rounds={self.min_rounds} rounds; need at least {self.num_blocks * self.min_rounds}"
            )
        if not self.history:
            self.history.append(StageRecord(self.stage, self.completed_rounds + 1))

    @property
    def is_last(self) -> bool:
        """True in the last stage (the whole network with the model's own head)."""
        return self.stage == self.num_blocks - 1

    @property
    def rounds_left(self) -> int:
        """Rounds of the budget not yet run."""
        return self.total_rounds - self.completed_rounds

    def end_of_round(self, converged: bool) -> str | None:
        """Record a completed round; advance if due. Returns the reason it advanced, or None."""
        self.completed_rounds += 1
        self.rounds_in_stage += 1
        if self.is_last or self.rounds_left <= 0:
            return None
        reason: str | None = None
        later_stages = self.num_blocks - 1 - self.stage
        if converged and self.rounds_in_stage >= self.min_rounds:
            reason = "converged"
        elif self.max_rounds and self.rounds_in_stage >= self.max_rounds:
            reason = "max-rounds"
        elif self.rounds_left <= later_stages * self.min_rounds:
            reason = "budget"
        if reason is not None:
            self.advance(reason)
        return reason

    def advance(self, reason: str) -> None:
        """Close the current stage with ``reason`` and start the next one."""
        if self.is_last:
            raise RuntimeError("already in the last stage")
        self.history[-1].end_round = self.completed_rounds
        self.history[-1].reason = reason
        self.stage += 1
        self.rounds_in_stage = 0
        self.history.append(StageRecord(self.stage, self.completed_rounds + 1))

    def finish(self) -> None:
        """Close the last record when the run ends."""
        if self.history[-1].end_round is None:
            self.history[-1].end_round = self.completed_rounds
            self.history[-1].reason = "end"

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (for checkpoints and metrics.json)."""
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> StageMachine:
        """Rebuild a machine from :meth:`state_dict` output."""
        state = dict(state)
        history = [StageRecord(**h) for h in state.pop("history")]
        return cls(**state, history=history)
