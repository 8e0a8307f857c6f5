"""Participant selector (SmartFreeze Sec. IV-C6): feasibility, counts, diversity, time penalty, eps, failures, state."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from common.selector import ParticipantSelector, SelectorConfig, straggler_utility

COMMUNITIES = [list(range(5 * c, 5 * c + 5)) for c in range(8)]  # 40 clients in 8 communities of 5


def populated(config: SelectorConfig, importance: np.ndarray, times: np.ndarray) -> ParticipantSelector:
    """A selector knowing every client's importance (sample-nats) and completion time (s), with COMMUNITIES."""
    selector = ParticipantSelector(config)
    selector.set_communities(COMMUNITIES)
    for c, (imp, t) in enumerate(zip(importance, times, strict=True)):
        selector.update_client(c, importance=float(imp), completion_time=float(t))
    return selector


def test_never_selects_outside_the_feasible_set_and_returns_the_right_count() -> None:
    rng = np.random.default_rng(0)
    selector = populated(SelectorConfig(seed=1), rng.uniform(1, 100, 40), rng.uniform(1, 20, 40))
    for server_round in range(1, 301):
        feasible = sorted(rng.choice(40, size=int(rng.integers(0, 41)), replace=False).tolist())
        k, min_participants = int(rng.integers(0, 15)), int(rng.integers(0, 6))
        chosen = selector.select(server_round, feasible, k, min_participants)
        assert set(chosen) <= set(feasible)
        assert chosen == sorted(set(chosen))
        assert len(chosen) == min(max(k, min_participants), len(feasible))
        if len(feasible) >= min_participants:
            assert len(chosen) >= min_participants
        for c in chosen:
            if rng.random() < 0.2:
                selector.record_failure(c, server_round)
            else:
                selector.record_success(c, server_round, float(rng.uniform(1, 100)), float(rng.uniform(1, 20)))


def test_fewer_feasible_than_minimum_selects_all_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    selector = ParticipantSelector(SelectorConfig())
    with caplog.at_level(logging.WARNING, logger="common.selector"):
        chosen = selector.select(3, [7, 2, 9], k=10, min_participants=5)
    assert chosen == [2, 7, 9]
    assert "fewer than min_participants=5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="common.selector"):
        assert len(selector.select(4, range(20), k=3, min_participants=5)) == 5
    assert caplog.text == ""


def test_every_community_is_picked_over_a_stage() -> None:
    importance = np.ones(40)
    importance[:5] = 0.01  # community 0 is never worth exploiting
    selector = populated(SelectorConfig(seed=2), importance, np.full(40, 5.0))
    picked = [selector.select(r, range(40), k=5) for r in range(1, 21)]
    hit = {c for chosen in picked for client in chosen for c, m in enumerate(COMMUNITIES) if client in m}
    assert hit == set(range(8))


def test_exploit_slots_are_spread_round_robin_across_communities() -> None:
    importance = np.arange(40, dtype=float)  # community 7 holds the 5 best clients
    selector = populated(SelectorConfig(exploration=0.0, floor=0.0), importance, np.full(40, 5.0))
    chosen = selector.select(1, range(40), k=8)
    assert chosen == [4, 9, 14, 19, 24, 29, 34, 39]  # the best client of every community
    chosen = selector.select(2, range(40), k=10)
    assert chosen == [4, 9, 14, 19, 24, 29, 33, 34, 38, 39]  # extra slots: communities with the best utility


def mean_round_time(alpha: float, seed: int) -> float:
    """Mean over rounds 11-40 of the max completion time (s) of the selected when the important clients are slow.

    A straggler tail: 6 of 40 clients take 40-80 s and hold the most important data, the others 2-8 s.
    """
    rng = np.random.default_rng(seed)
    slow = rng.permutation(40)[:6]
    importance = rng.uniform(10, 50, 40)
    times = rng.uniform(2, 8, 40)
    importance[slow] = rng.uniform(60, 100, slow.size)
    times[slow] = rng.uniform(40, 80, slow.size)
    selector = populated(SelectorConfig(alpha=alpha, seed=seed), importance, times)
    per_round = []
    for server_round in range(1, 41):
        chosen = selector.select(server_round, range(40), k=8)
        per_round.append(max(times[chosen]))
        for c in chosen:
            selector.record_success(c, server_round, float(importance[c]), float(times[c]))
    return float(np.mean(per_round[10:]))  # once eps has decayed


def test_time_penalty_shortens_rounds_when_important_clients_are_slow() -> None:
    penalised = np.mean([mean_round_time(2.0, seed) for seed in range(5)])
    unpenalised = np.mean([mean_round_time(0.0, seed) for seed in range(5)])
    assert penalised < 0.7 * unpenalised, (penalised, unpenalised)


def test_eps_decays_to_the_floor() -> None:
    selector = ParticipantSelector(SelectorConfig())
    assert selector.eps == 0.9
    selector.select(1, range(10), k=3)
    assert selector.eps == pytest.approx(0.9 * 0.98)
    for r in range(2, 200):
        selector.select(r, range(10), k=3)
    assert selector.eps == 0.3  # 0.9 * 0.98**55 < 0.3


def test_explore_takes_never_seen_clients_first() -> None:
    selector = ParticipantSelector(SelectorConfig(exploration=1.0, floor=1.0))
    seen: list[int] = []
    for r in range(1, 5):
        seen += selector.select(r, range(20), k=5)
    assert sorted(seen) == list(range(20))  # four rounds of 5 cover all 20 clients once


def test_failures_lower_selection_frequency() -> None:
    importance = np.linspace(50, 100, 40)
    times = np.full(40, 5.0)
    failing = set(range(0, 40, 4))
    counts = {}
    for fail in (False, True):
        selector = populated(SelectorConfig(seed=5), importance, times)
        count = 0
        for server_round in range(1, 61):
            for c in selector.select(server_round, range(40), k=8):
                count += c in failing
                if fail and c in failing:
                    selector.record_failure(c, server_round)
                else:
                    selector.record_success(c, server_round, float(importance[c]), 5.0)
        counts[fail] = count
    assert counts[True] < 0.75 * counts[False], counts


def test_state_dict_json_round_trip_continues_identically() -> None:
    rng = np.random.default_rng(6)
    selector = populated(SelectorConfig(seed=7), rng.uniform(1, 100, 40), rng.uniform(1, 20, 40))

    def play(sel: ParticipantSelector, rounds: range, outcome_seed: int) -> list[list[int]]:
        outcomes = np.random.default_rng(outcome_seed)
        history = []
        for r in rounds:
            chosen = sel.select(r, range(0, 40, 1 + r % 2), k=6, min_participants=3)
            history.append(chosen)
            for c in chosen:
                if outcomes.random() < 0.25:
                    sel.record_failure(c, r)
                else:
                    sel.record_success(c, r, float(outcomes.uniform(1, 100)), float(outcomes.uniform(1, 20)))
        return history

    play(selector, range(1, 8), 0)
    restored = ParticipantSelector.from_state_dict(json.loads(json.dumps(selector.state_dict())))
    assert restored.state_dict() == selector.state_dict()
    assert play(restored, range(8, 30), 1) == play(selector, range(8, 30), 1)
    assert restored.state_dict() == selector.state_dict()


def test_selection_is_deterministic_for_a_seed() -> None:
    def run(seed: int) -> list[list[int]]:
        sel = populated(SelectorConfig(seed=seed), np.arange(1, 41, dtype=float), np.full(40, 3.0))
        return [sel.select(r, range(40), k=7) for r in range(1, 15)]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_round_deadline_and_utility() -> None:
    selector = ParticipantSelector(SelectorConfig(deadline_percentile=50.0))
    assert selector.round_deadline([0, 1]) == math.inf  # nothing known yet
    for c, t in enumerate([1.0, 2.0, 3.0, 4.0, 100.0]):
        selector.update_client(c, importance=10.0, completion_time=t)
    assert selector.round_deadline(range(5)) == 3.0
    assert selector.round_deadline([0, 1, 9]) == 1.5  # only feasible clients with known times count
    assert selector.utility(1, 3.0) == 10.0  # on time: no penalty
    assert selector.utility(4, 3.0) == pytest.approx(10.0 * (3.0 / 100.0) ** 2)
    selector.record_failure(4, 1)
    selector.record_failure(4, 2)
    assert selector.utility(4, 3.0) == pytest.approx(10.0 * (3.0 / 100.0) ** 2 * 0.25)
    selector.record_success(4, 3, importance=8.0, completion_time=2.0)
    assert selector.utility(4, 3.0) == 8.0
    assert selector.utility(39, 3.0) is None
    assert ParticipantSelector(SelectorConfig(deadline=7.5)).round_deadline([0]) == 7.5
    assert straggler_utility(4.0, 8.0, 4.0, 0.0) == 4.0


def test_config_errors_name_the_field() -> None:
    for field, value in [
        ("exploration", 1.5),
        ("decay", 0.0),
        ("floor", 0.95),
        ("alpha", -1.0),
        ("deadline_percentile", 101.0),
        ("deadline", 0.0),
        ("failure_penalty", 0.0),
        ("seed", -1),
    ]:
        with pytest.raises(ValueError, match=f"SelectorConfig.{field}"):
            SelectorConfig(**{field: value})


def test_bad_inputs_are_rejected() -> None:
    selector = ParticipantSelector(SelectorConfig())
    with pytest.raises(ValueError, match="more than one community"):
        selector.set_communities([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="client ids"):
        selector.select(1, [0, -1], k=1)
    with pytest.raises(ValueError, match="k must be"):
        selector.select(1, [0], k=-1)
    with pytest.raises(ValueError, match="completion_time"):
        selector.update_client(0, completion_time=0.0)
    with pytest.raises(ValueError, match="importance"):
        selector.record_success(0, 1, importance=float("inf"), completion_time=1.0)
