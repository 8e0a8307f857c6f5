"""Full-model baselines on the same device population: ExclusiveFL, AllSmall, TiFL, Oort.

All share FedAvg's machinery (seeded sampling by partition id, per-node messages, accounting)
and the same memory-feasibility rule: a client is never given a model whose modelled training
memory (Eq. 4) exceeds its budget.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.serverapp import Grid

from common import protocol as P
from common.community import data_importance
from common.config import RunConfig
from common.models import build_model
from common.selector import ParticipantSelector
from common.tiers import WIDTH_LADDER, assign_tiers, choose_width, tier_probabilities
from common.training import state_to_numpy
from server_app.outputs import RunRecorder
from server_app.strategy import FedAvgStrategy, log


class ExclusiveFLStrategy(FedAvgStrategy):
    """ExclusiveFL (Liu et al., KDD 2022): the full model, trained only by clients whose budget fits it."""

    name = "exclusivefl"
    enforces_budget = True


class AllSmallStrategy(FedAvgStrategy):
    """AllSmall (Liu et al., KDD 2022): one model for everyone, narrowed until it fits the smallest budget.

    Once every node's budget is known (the start-up query), the width is the widest of
    ``configured width x r`` (r in :data:`common.tiers.WIDTH_LADDER`) whose modelled full-model
    training memory fits the smallest budget; the server rebuilds the model at that width and
    every message tells the client the width to build.
    """

    name = "allsmall"
    enforces_budget = True
    checkpoint_attrs = ("width",)

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, num_classes: int) -> None:
        super().__init__(cfg, recorder, num_classes)
        self.width = cfg.width

    def on_start(self, grid: Grid) -> None:
        """Pick the width from the smallest budget and rebuild the global model at it."""
        smallest = min(n.memory_mb for n in self.nodes.values())
        if math.isinf(smallest):
            return

        def fits(width: float) -> bool:
            model = build_model(self.cfg.model, self.num_classes, width)
            return self._memory_of(model) <= smallest

        try:
            self.width = choose_width(self.cfg.width, fits)
        except ValueError as exc:
            self.width = self.cfg.width * min(WIDTH_LADDER)
            log.warning("allsmall: %s; using width %g, trained only by the nodes it fits", exc, self.width)
            print(f"[{self.name}] no width fits every budget; width {self.width:g} for those it fits", flush=True)
        self.model = build_model(self.cfg.model, self.num_classes, self.width, seed=self.cfg.seed)
        self.arrays = state_to_numpy(self.model)
        self._required_cache.clear()
        log.info("allsmall: width %g fits the smallest budget %.1f MB", self.width, smallest)
        self.recorder.set_summary(**{"allsmall-width": self.width})

    def restore_state(self, state: dict) -> None:
        """Rebuild the model at the checkpoint's width (chosen at start-up), then restore the arrays."""
        self.width = float(state["attrs"]["width"])
        self.model = build_model(self.cfg.model, self.num_classes, self.width, seed=self.cfg.seed)
        self.arrays = state_to_numpy(self.model)
        self._required_cache.clear()
        super().restore_state(state)

    def _memory_of(self, model: object) -> float:
        from common.memory import stage_memory

        shape = self.input_shape()
        return stage_memory(model, None, self.cfg.batch_size, shape).total  # type: ignore[arg-type]

    def train_config(self, server_round: int, partition_id: int) -> dict[str, int | float | str | bool]:
        """FedAvg's config plus the width to build."""
        return {**super().train_config(server_round, partition_id), P.WIDTH: self.width}

    def eval_payload(self, server_round: int) -> tuple[dict[str, np.ndarray], dict[str, int | float | str | bool]]:
        """The global model at the chosen width."""
        return self.arrays, {P.WIDTH: self.width}


class OortStrategy(FedAvgStrategy):
    """Oort (Lai et al., OSDI 2021) guided participant selection among clients that fit the full model.

    Utility = statistical utility |B_i| sqrt(mean l^2) (refreshed from every training reply) times
    the straggler penalty (T / t_i)^alpha when the completion time t_i exceeds the deadline T;
    exploitation of the best (1 - eps), exploration of the least recently seen eps, eps decaying
    from 0.9 by 0.98 per round to 0.3 (FedScale's defaults). It is :class:`ParticipantSelector`
    without communities.
    """

    name = "oort"
    enforces_budget = True
    checkpoint_attrs = ("selector",)

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, num_classes: int) -> None:
        super().__init__(cfg, recorder, num_classes)
        self.selector = ParticipantSelector(cfg.selector_config())

    def on_start(self, grid: Grid) -> None:
        """Completion-time estimates of every node (Eq. 6) for the straggler penalty."""
        for pid in self.nodes:
            self.selector.update_client(pid, completion_time=self.completion_time(pid))

    def sample(self, server_round: int) -> list[int]:
        """Oort's exploit/explore choice among the nodes that fit."""
        pool = self.eligible(server_round)
        k = max(self.cfg.min_train_nodes, math.ceil(self.cfg.fraction_train * len(self.nodes)))
        return sorted(self.selector.select(server_round, pool, k, self.cfg.min_train_nodes)) if pool else []

    def on_reply(self, server_round: int, partition_id: int, metrics: dict) -> None:
        """Refresh the statistical utility from the training loss."""
        importance = data_importance(int(metrics[P.NUM_EXAMPLES]), float(metrics.get(P.LOSS_SQ_MEAN, 0.0)))
        self.selector.record_success(partition_id, server_round, importance, self.completion_time(partition_id))

    def on_failure(self, server_round: int, partition_id: int) -> None:
        """Failures lower the node's utility."""
        self.selector.record_failure(partition_id, server_round)


class TiFLStrategy(FedAvgStrategy):
    """TiFL (Chai et al., HPDC 2020): tier-based selection among clients that fit the full model.

    Clients are grouped into ``tifl-tiers`` tiers by their round time (Eq. 6: simulated from the
    device speed, or measured in deployment). Each round one tier is drawn (seeded) with TiFL's
    adaptive probabilities (Algorithm 2: tiers ranked by their clients' latest evaluation
    accuracy, the least accurate most likely; each tier at most ``credits`` times, the original
    code's default of an equal share of the rounds, times two here so that adaptation can act),
    and ``fraction-train`` x all clients are drawn uniformly from that tier.
    """

    needs_every_evaluation = True  # the tier probabilities read every round's federated evaluation
    name = "tifl"
    enforces_budget = True
    checkpoint_attrs = ("tiers", "credits", "client_accuracy", "chosen_tiers")

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, num_classes: int) -> None:
        super().__init__(cfg, recorder, num_classes)
        self.tiers: list[list[int]] = []
        self.credits: list[int] = []
        self.client_accuracy: dict[int, float] = {}
        self.chosen_tiers: list[int] = []

    def on_start(self, grid: Grid) -> None:
        """Tiers from the completion times of the nodes that fit the full model."""
        fit = self.eligible(0)
        k = max(self.cfg.min_train_nodes, math.ceil(self.cfg.fraction_train * len(self.nodes)))
        num_tiers = max(1, min(self.cfg.tifl_tiers, len(fit) // k))  # every tier holds a round's worth
        if num_tiers < self.cfg.tifl_tiers:
            log.warning(
                "tifl: %d nodes fit the model and %d train per round: %d tier(s) instead of tifl-tiers=%d",
                len(fit),
                k,
                num_tiers,
                self.cfg.tifl_tiers,
            )
        self.tiers = assign_tiers({pid: self.completion_time(pid) for pid in fit}, num_tiers)
        share = math.ceil(self.cfg.num_rounds / max(1, len(self.tiers)))
        self.credits = [2 * share] * len(self.tiers)
        self.recorder.set_summary(**{"tifl-tiers": self.tiers})

    def tier_accuracy(self) -> list[float | None]:
        """Mean latest evaluation accuracy of each tier's clients (None before any is evaluated)."""
        out: list[float | None] = []
        for tier in self.tiers:
            accs = [self.client_accuracy[c] for c in tier if c in self.client_accuracy]
            out.append(float(np.mean(accs)) if accs else None)
        return out

    def sample(self, server_round: int) -> list[int]:
        """One tier drawn by TiFL's probabilities, then a seeded uniform draw inside it."""
        if not self.tiers:
            return []
        rng = np.random.default_rng([self.cfg.seed, server_round, 2])
        probs = tier_probabilities(self.tier_accuracy(), self.credits)
        if probs.sum() == 0:
            self.credits = [1] * len(self.tiers)
            probs = tier_probabilities(self.tier_accuracy(), self.credits)
        tier = int(rng.choice(len(self.tiers), p=probs))
        self.credits[tier] -= 1
        self.chosen_tiers.append(tier)
        online = set(self.available())
        pool = [pid for pid in self.tiers[tier] if pid in online]
        if not pool:
            return []
        k = min(len(pool), max(self.cfg.min_train_nodes, math.ceil(self.cfg.fraction_train * len(self.nodes))))
        return sorted(int(c) for c in rng.choice(pool, size=k, replace=False))

    def on_evaluate_reply(self, partition_id: int, accuracy: float) -> None:
        """Keep each client's latest evaluation accuracy for the tier ranking."""
        self.client_accuracy[partition_id] = accuracy

    def end_round(self, server_round: int) -> dict[str, float | int | str | bool | None]:
        """The tier trained in this round (1 = fastest)."""
        return {"tier": self.chosen_tiers[-1] + 1} if self.chosen_tiers else {}
