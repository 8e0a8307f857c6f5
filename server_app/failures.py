"""Many nodes failing for one cause: one line per cause with a count, not one per node.

A partition that cannot be made, a bad data file on every device or a bug in the ClientApp fails
every node the same way; printed per node that is thousands of lines (and tracebacks) for one
cause. :func:`group_failures` folds ``(node, reason)`` pairs into one line per distinct cause
(the reason's last line: the exception and its message, without the traceback), with the number
of nodes and their ids abbreviated. Pure (no Flower).
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_IDS = 6
"""Node ids shown per cause (first and last ones; the rest counted)."""


def cause_of(reason: str) -> str:
    """The last non-empty line of a failure's reason (the exception line of a traceback)."""
    lines = [ln.strip() for ln in str(reason).splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


def abbreviate(ids: list[int | str], limit: int = MAX_IDS) -> str:
    """``0, 1, 2, ..., 1998, 1999`` for long lists (the first and last ``limit // 2``)."""
    shown = [str(i) for i in ids]
    if len(shown) <= limit:
        return ", ".join(shown)
    half = max(1, limit // 2)
    return ", ".join(shown[:half]) + f", ... ({len(shown) - 2 * half} more), " + ", ".join(shown[-half:])


def _order(node: int | str) -> tuple[int, int, str]:
    """Partition ids in numeric order, then other labels alphabetically."""
    return (0, node, "") if isinstance(node, int) else (1, 0, str(node))


def group_failures(failures: Iterable[tuple[int | str, str]]) -> list[str]:
    """One line per distinct cause, most frequent first: ``<count> node(s) (<ids>): <cause>``."""
    by_cause: dict[str, list[int | str]] = {}
    for node, reason in failures:
        by_cause.setdefault(cause_of(reason), []).append(node)
    ordered = sorted(by_cause.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return [
        f"{len(ids)} node{'s' if len(ids) != 1 else ''} ({abbreviate(sorted(ids, key=_order))}): {cause}"
        for cause, ids in ordered
    ]
