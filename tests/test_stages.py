"""Stage state machine: advances on convergence, caps, budget; ends in the last stage; JSON state."""

import json

import pytest

from common.stages import StageMachine


def run(machine: StageMachine, converged_at: dict[int, int]) -> list[int]:
    """Stage per round, with the pace signal true from round converged_at[stage] of that stage on."""
    stages = []
    while machine.rounds_left > 0:
        stages.append(machine.stage)
        signal = machine.rounds_in_stage + 1 >= converged_at.get(machine.stage, 10**9)
        machine.end_of_round(signal)
    machine.finish()
    return stages


def test_advances_through_all_stages_on_convergence_and_ends_in_last() -> None:
    m = StageMachine(num_blocks=4, total_rounds=20, min_rounds=2)
    stages = run(m, {0: 3, 1: 2, 2: 4})
    assert stages == [0] * 3 + [1] * 2 + [2] * 4 + [3] * 11
    assert m.is_last and [h.reason for h in m.history] == ["converged", "converged", "converged", "end"]
    assert m.history[1].start_round == 4 and m.history[1].end_round == 5


def test_min_rounds_holds_back_an_early_signal() -> None:
    m = StageMachine(num_blocks=2, total_rounds=10, min_rounds=3)
    assert run(m, {0: 1}) == [0, 0, 0] + [1] * 7


def test_max_rounds_caps_a_stage() -> None:
    m = StageMachine(num_blocks=3, total_rounds=30, min_rounds=1, max_rounds=4)
    assert run(m, {}) == [0] * 4 + [1] * 4 + [2] * 22
    assert [h.reason for h in m.history[:2]] == ["max-rounds", "max-rounds"]


def test_budget_forces_progress_so_every_stage_gets_min_rounds() -> None:
    m = StageMachine(num_blocks=4, total_rounds=12, min_rounds=2)
    stages = run(m, {})  # never converges
    assert stages == [0] * 6 + [1] * 2 + [2] * 2 + [3] * 2
    assert [h.reason for h in m.history] == ["budget", "budget", "budget", "end"]


def test_rejects_impossible_budget_and_bad_bounds() -> None:
    with pytest.raises(ValueError, match="need at least 8"):
        StageMachine(num_blocks=4, total_rounds=7, min_rounds=2)
    with pytest.raises(ValueError, match="max-stage-rounds=1 is below min-stage-rounds=2"):
        StageMachine(num_blocks=2, total_rounds=10, min_rounds=2, max_rounds=1)


def test_state_round_trips_through_json_and_continues_identically() -> None:
    a = StageMachine(num_blocks=4, total_rounds=20, min_rounds=2)
    for signal in [False, False, True, False]:
        a.end_of_round(signal)
    b = StageMachine.from_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b == a
    signals = [True, False, False, True, True, False]
    assert [a.end_of_round(s) for s in signals] == [b.end_of_round(s) for s in signals]
    assert a.state_dict() == b.state_dict()
