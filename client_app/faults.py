"""Fault injection for tests and the fault benchmark: make a share of training replies fail.

With ``fault-rate`` > 0 the ClientApp turns the reply of a seeded share of (round, partition)
pairs into a failure of kind ``fault-mode``: ``raise`` (the ClientApp raises), ``nan`` (NaN in
the arrays), ``huge`` (an update 1,000x too large), ``keys`` (an extra array), ``shape`` (an
array of the wrong shape), ``examples`` (an absurd ``num-examples``), or ``mixed`` (one of these
drawn per reply). Off by default; never used outside testing.
"""

from __future__ import annotations

import numpy as np

KINDS = ("raise", "nan", "huge", "keys", "shape", "examples")


class InjectedFault(RuntimeError):
    """The failure a ``raise`` fault makes the ClientApp raise."""


def fault_for(rate: float, mode: str, seed: int, server_round: int, partition_id: int) -> str | None:
    """The fault kind to inject into this reply, or None (deterministic for the run's seed)."""
    if rate <= 0:
        return None
    rng = np.random.default_rng([seed, server_round, partition_id, 4242])
    if rng.random() >= rate:
        return None
    return str(rng.choice(KINDS)) if mode == "mixed" else mode


def corrupt(
    kind: str, arrays: dict[str, np.ndarray], sent: dict[str, np.ndarray], num_examples: int
) -> tuple[dict[str, np.ndarray], int]:
    """Arrays and sample count of a faulty reply of ``kind`` (``raise`` raises InjectedFault)."""
    if kind == "raise":
        raise InjectedFault("injected fault: the client failed during training")
    out = {k: v.copy() for k, v in arrays.items()}
    key = next(k for k, v in out.items() if np.issubdtype(v.dtype, np.floating) and v.size > 1)
    if kind == "nan":
        out[key].flat[0] = np.nan
    elif kind == "huge":
        base = sent.get(key, np.zeros_like(out[key])).reshape(out[key].shape)
        out[key] = (base + 1000.0 * (out[key] - base) + 10.0).astype(out[key].dtype)
    elif kind == "keys":
        out["injected.extra"] = np.zeros(4, np.float32)
    elif kind == "shape":
        out[key] = np.zeros(out[key].size + 1, out[key].dtype)
    elif kind == "examples":
        num_examples = -num_examples
    return out, num_examples
