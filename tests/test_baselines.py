"""Baseline strategies' selection and width rules, without a Flower run."""

from pathlib import Path

import numpy as np
import pytest

from common.config import parse_run_config
from common.memory import stage_memory
from common.models import build_model
from common.tiers import WIDTH_LADDER, assign_tiers, choose_width, tier_probabilities
from server_app.baselines import AllSmallStrategy, ExclusiveFLStrategy, OortStrategy, TiFLStrategy
from server_app.outputs import RunRecorder
from server_app.strategy import NodeInfo

SMALL = {"model": "smallcnn", "synthetic-train-size": 200, "synthetic-test-size": 50, "fraction-train": 0.3}


def make(cls: type, tmp_path: Path, budgets: list[float], **over: object):  # noqa: ANN201
    cfg = parse_run_config({**SMALL, **over})
    strategy = cls(cfg, RunRecorder(cfg, tmp_path / cls.name), 10)
    rng = np.random.default_rng(0)
    for pid, mb in enumerate(budgets):
        strategy.nodes[pid] = NodeInfo(pid + 100, pid, 50, memory_mb=mb, speed_flops=float(rng.uniform(1e9, 5e9)))
    return strategy


def test_allsmall_width_fits_smallest_budget_and_next_width_up_does_not(tmp_path: Path) -> None:
    full = stage_memory(build_model("resnet10", 10, 0.5), None, 32).total
    budgets = [full * f for f in (0.9, 0.45, 2.0, 0.6)]
    s = make(AllSmallStrategy, tmp_path, budgets, model="resnet10", width=0.5)
    s.on_start(None)  # type: ignore[arg-type]

    def mem(width: float) -> float:
        return stage_memory(build_model("resnet10", 10, width), None, 32).total

    assert mem(s.width) <= min(budgets)
    ladder = sorted(WIDTH_LADDER, reverse=True)
    up = 0.5 * ladder[ladder.index(s.width / 0.5) - 1]
    assert mem(up) > min(budgets)
    assert s.model.width == s.width and s.required_mb() <= min(budgets)
    assert s.train_config(1, 0)["width"] == s.width


@pytest.mark.parametrize("cls", [ExclusiveFLStrategy, TiFLStrategy, OortStrategy])
def test_full_model_baselines_never_select_a_client_that_does_not_fit(cls: type, tmp_path: Path) -> None:
    probe = make(cls, tmp_path, [1.0])
    need = probe.required_mb()
    budgets = [need * f for f in np.random.default_rng(1).uniform(0.3, 1.6, size=30)]
    s = make(cls, tmp_path, budgets)
    s.on_start(None)  # type: ignore[arg-type]
    fitting = {pid for pid, mb in enumerate(budgets) if mb >= need}
    seen: set[int] = set()
    for rnd in range(1, 40):
        chosen = s.sample(rnd)
        assert chosen and set(chosen) <= fitting
        seen |= set(chosen)
        for pid in chosen:
            s.on_reply(rnd, pid, {"num-examples": 50, "loss-sq-mean": 1.0})
    assert len(seen) > 1


def test_exclusivefl_with_no_fitting_device_selects_nobody(tmp_path: Path) -> None:
    s = make(ExclusiveFLStrategy, tmp_path, [0.001, 0.002])
    assert s.sample(1) == []


def test_tiers_and_tifl_probabilities() -> None:
    tiers = assign_tiers({0: 5.0, 1: 1.0, 2: 3.0, 3: 2.0, 4: 4.0, 5: 6.0}, 3)
    assert tiers == [[1, 3], [2, 4], [0, 5]]  # by time 1,2 | 3,4 | 5,6
    p = tier_probabilities([0.8, 0.2, None], [1, 1, 1])
    assert p[2] > p[1] > p[0] and p.sum() == pytest.approx(1.0)  # unseen, then least accurate first
    assert tier_probabilities([0.1, 0.9], [0, 3]).tolist() == [0.0, 1.0]  # no credits left
    assert tier_probabilities([None, None, None], [1, 0, 2]).tolist() == [0.5, 0.0, 0.5]  # uniform start
    with pytest.raises(ValueError, match="tifl-tiers must be >= 1"):
        assign_tiers({0: 1.0}, 0)


def test_choose_width_walks_the_ladder() -> None:
    assert choose_width(1.0, lambda w: w <= 0.3) == 0.25
    with pytest.raises(ValueError, match="no width down to 0.0625"):
        choose_width(1.0, lambda w: False)


def test_allsmall_falls_back_to_the_narrowest_width_when_nothing_fits(tmp_path: Path) -> None:
    s = make(AllSmallStrategy, tmp_path, [0.01, 0.02], model="resnet10", width=0.5)
    s.on_start(None)  # type: ignore[arg-type]
    assert s.width == 0.5 * min(WIDTH_LADDER)
    assert s.sample(1) == []  # nobody fits even that: nobody is sent a model over budget


def test_tifl_tiers_each_hold_a_rounds_worth_of_clients(tmp_path: Path) -> None:
    probe = make(TiFLStrategy, tmp_path, [1.0])
    need = probe.required_mb()
    budgets = [need * 2] * 6 + [need * 0.1] * 34  # 6 of 40 fit; fraction-train 0.25 wants 10 per round
    s = make(TiFLStrategy, tmp_path, budgets, **{"fraction-train": 0.25, "tifl-tiers": 5})
    s.on_start(None)  # type: ignore[arg-type]
    assert len(s.tiers) == 1 and sorted(s.tiers[0]) == list(range(6))
    assert s.sample(1) == list(range(6))
    many = make(TiFLStrategy, tmp_path, [need * 2] * 40, **{"fraction-train": 0.1, "tifl-tiers": 5})
    many.on_start(None)  # type: ignore[arg-type]
    assert [len(t) for t in many.tiers] == [8] * 5 and len(many.sample(1)) == 4
