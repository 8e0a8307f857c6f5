"""Repeated failures fold into one line per cause (server_app/failures.py)."""

from __future__ import annotations

from server_app.failures import abbreviate, cause_of, group_failures

TRACE = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: no draw in 1000 tries\n'


def test_two_thousand_identical_failures_are_one_line() -> None:
    lines = group_failures([(pid, TRACE) for pid in range(2000)] + [(7, "TimeoutError: node lost")])
    assert lines == [
        "2000 nodes (0, 1, 2, ... (1994 more), 1997, 1998, 1999): ValueError: no draw in 1000 tries",
        "1 node (7): TimeoutError: node lost",
    ]


def test_cause_and_abbreviation() -> None:
    assert cause_of(TRACE) == "ValueError: no draw in 1000 tries"
    assert cause_of("") == "unknown error"
    assert abbreviate([1, 2, 3]) == "1, 2, 3"
