"""Participant selection per round (SmartFreeze Sec. IV-C6), Oort-style exploit/explore (pure Python/numpy).

The caller passes the clients whose memory fits the current stage (Eq. 12); among them
:meth:`ParticipantSelector.select` picks ``max(k, min_participants)`` clients (all of them if fewer fit):

* Utility (Sec. IV-C4, with Oort's straggler penalty for Eq. 13): U_i = I_i * (T / t_i) ** alpha if
  t_i > T else I_i, where I_i is the data importance (Eq. 9), t_i the client's estimated completion
  time (s) and T the round deadline (s): ``config.deadline`` if given, else the
  ``deadline_percentile``-th percentile of the feasible clients' known completion times. A client
  with no known time gets no penalty. Every consecutive failure multiplies U_i by ``failure_penalty``
  (a success resets the count).
* Exploit/explore (multi-armed bandit, Sec. IV-C6): floor(eps * n) slots explore, the rest exploit.
  eps starts at ``exploration`` and after every selection becomes max(floor, eps * decay)
  (Oort/FedScale defaults 0.9, 0.98, 0.3).
* Exploit slots go to clients with a known importance, round-robin across communities (Sec. IV-C5,
  data diversity): communities are ordered by their best utility, each turn takes the best remaining
  client of the next community, so k >= #communities puts every community in the round and the best
  communities get the extra slots. Round-robin was chosen over slots proportional to community size
  because diversity (Eq. 10) rewards dissimilar clients, not the size of a community. A client in no
  community counts as a community of its own. Slots no known client can fill go to exploration.
* Explore slots go to the least recently selected clients, never-selected first, so over a stage every
  client (hence every community) is seen.

Ties are broken by a random permutation drawn from ``numpy.random.default_rng((seed, server_round))``,
so a selection depends only on the seed, the round and the state, which :meth:`state_dict` saves.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def _check(field: str, value: object, ok: bool, valid: str) -> None:
    if not ok:
        raise ValueError(f"SelectorConfig.{field} must be {valid}, got {value!r}")


def _is_real(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: object) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


@dataclass(frozen=True)
class SelectorConfig:
    """Participant-selector options (module docstring); errors name the offending field."""

    exploration: float = 0.9  # initial exploration share eps, in [0, 1]
    decay: float = 0.98  # eps <- max(floor, eps * decay) after every selection, in (0, 1]
    floor: float = 0.3  # smallest eps, in [0, exploration]
    alpha: float = 2.0  # straggler penalty exponent (0 = no time penalty)
    deadline_percentile: float = 80.0  # round deadline = this percentile of feasible completion times, in [0, 100]
    deadline: float | None = None  # explicit round deadline (s), overrides deadline_percentile
    failure_penalty: float = 0.5  # utility multiplier per consecutive failure, in (0, 1]
    seed: int = 0

    def __post_init__(self) -> None:
        _check("exploration", self.exploration, _is_real(self.exploration) and 0 <= self.exploration <= 1, "in [0, 1]")
        _check("decay", self.decay, _is_real(self.decay) and 0 < self.decay <= 1, "in (0, 1]")
        _check("floor", self.floor, _is_real(self.floor) and 0 <= self.floor <= self.exploration, "in [0, exploration]")
        _check("alpha", self.alpha, _is_real(self.alpha) and self.alpha >= 0, "a finite number >= 0")
        _check(
            "deadline_percentile",
            self.deadline_percentile,
            _is_real(self.deadline_percentile) and 0 <= self.deadline_percentile <= 100,
            "in [0, 100]",
        )
        _check(
            "deadline", self.deadline, self.deadline is None or (_is_real(self.deadline) and self.deadline > 0), "> 0"
        )
        _check(
            "failure_penalty",
            self.failure_penalty,
            _is_real(self.failure_penalty) and 0 < self.failure_penalty <= 1,
            "in (0, 1]",
        )
        _check("seed", self.seed, _is_int(self.seed) and self.seed >= 0, "an integer >= 0")


@dataclass
class ClientState:
    """What the selector knows about one client."""

    importance: float | None = None  # data importance (Eq. 9), sample-nats
    completion_time: float | None = None  # estimated or last measured local round time (s)
    last_seen: int | None = None  # last round it was selected or reported
    times_selected: int = 0
    failures: int = 0  # consecutive failures


def _client_id(client: object) -> int:
    if not _is_int(client) or int(client) < 0:
        raise ValueError(f"client ids must be integers >= 0, got {client!r}")
    return int(client)


def _check_value(name: str, value: float, positive: bool) -> float:
    ok = _is_real(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def straggler_utility(importance: float, completion_time: float | None, deadline: float, alpha: float) -> float:
    """Oort utility with straggler penalty: I * (T / t) ** alpha if t > T else I (Sec. IV-C4, Eq. 13)."""
    if completion_time is None or completion_time <= deadline:
        return importance
    return importance * (deadline / completion_time) ** alpha


class ParticipantSelector:
    """Chooses each round's participants among the feasible clients; see the module docstring."""

    def __init__(self, config: SelectorConfig) -> None:
        self.config = config
        self.eps = float(config.exploration)
        self.rounds = 0  # selections made
        self.clients: dict[int, ClientState] = {}
        self.communities: list[list[int]] = []
        self._community_of: dict[int, int] = {}

    def set_communities(self, communities: list[list[int]]) -> None:
        """Use these client communities (e.g. from RL-CD) for diversity; each client in at most one."""
        seen: set[int] = set()
        clean: list[list[int]] = []
        for members in communities:
            ids = sorted({_client_id(c) for c in members})
            if seen.intersection(ids):
                raise ValueError(f"clients {sorted(seen.intersection(ids))} are in more than one community")
            seen.update(ids)
            if ids:
                clean.append(ids)
        self.communities = clean
        self._community_of = {c: i for i, members in enumerate(clean) for c in members}

    def _state(self, client: object) -> ClientState:
        return self.clients.setdefault(_client_id(client), ClientState())

    def update_client(
        self, client: int, *, importance: float | None = None, completion_time: float | None = None
    ) -> None:
        """Set a client's data importance (sample-nats) and/or estimated completion time (s), e.g. at a stage start."""
        state = self._state(client)
        if importance is not None:
            state.importance = _check_value("importance", importance, positive=False)
        if completion_time is not None:
            state.completion_time = _check_value("completion_time", completion_time, positive=True)

    def record_success(self, client: int, server_round: int, importance: float, completion_time: float | None) -> None:
        """A client finished ``server_round``: refresh its importance and completion time (s; None: unknown, kept)."""
        self.update_client(client, importance=importance, completion_time=completion_time)
        state = self._state(client)
        state.failures = 0
        state.last_seen = max(state.last_seen or 0, int(server_round))

    def record_failure(self, client: int, server_round: int) -> None:
        """A client failed ``server_round``: its utility is multiplied by ``failure_penalty`` once more."""
        state = self._state(client)
        state.failures += 1
        state.last_seen = max(state.last_seen or 0, int(server_round))

    def round_deadline(self, feasible: Sequence[int]) -> float:
        """Round deadline T (s): the configured one, else the percentile of the feasible clients' known times.

        ``math.inf`` when no feasible client has a known completion time (no penalty).
        """
        if self.config.deadline is not None:
            return float(self.config.deadline)
        times = [
            s.completion_time
            for c in {_client_id(c) for c in feasible}
            if (s := self.clients.get(c)) is not None and s.completion_time is not None
        ]
        if not times:
            return math.inf
        return float(np.percentile(np.asarray(times, dtype=np.float64), self.config.deadline_percentile))

    def utility(self, client: int, deadline: float) -> float | None:
        """Client utility (module docstring) for round deadline ``deadline`` (s); None if its importance is unknown."""
        state = self.clients.get(_client_id(client))
        if state is None or state.importance is None:
            return None
        base = straggler_utility(state.importance, state.completion_time, deadline, self.config.alpha)
        return base * self.config.failure_penalty**state.failures

    def select(self, server_round: int, feasible: Sequence[int], k: int, min_participants: int = 1) -> list[int]:
        """Participants of ``server_round``: max(k, min_participants) feasible clients (all if fewer fit), sorted.

        Marks them as seen and decays eps. Logs a warning when fewer than ``min_participants`` clients fit.
        """
        if not _is_int(server_round) or server_round < 0:
            raise ValueError(f"server_round must be an integer >= 0, got {server_round!r}")
        if not _is_int(k) or k < 0:
            raise ValueError(f"k must be an integer >= 0, got {k!r}")
        if not _is_int(min_participants) or min_participants < 0:
            raise ValueError(f"min_participants must be an integer >= 0, got {min_participants!r}")
        pool = sorted({_client_id(c) for c in feasible})
        if len(pool) < min_participants:
            logger.warning(
                "round %d: only %d clients fit the stage, fewer than min_participants=%d; selecting all of them",
                server_round,
                len(pool),
                min_participants,
            )
        n = min(max(int(k), int(min_participants)), len(pool))
        rng = np.random.default_rng([self.config.seed, int(server_round)])
        tiebreak = dict(zip(pool, rng.permutation(len(pool)).tolist(), strict=True))
        n_explore = min(n, int(self.eps * n + 1e-9))
        chosen = self._exploit(pool, n - n_explore, self.round_deadline(pool), tiebreak)
        taken = set(chosen)
        chosen += self._explore([c for c in pool if c not in taken], n - len(chosen), tiebreak)
        for c in chosen:
            state = self._state(c)
            state.last_seen = int(server_round)
            state.times_selected += 1
        self.rounds += 1
        self.eps = max(self.config.floor, self.eps * self.config.decay)
        return sorted(chosen)

    def _exploit(self, pool: list[int], slots: int, deadline: float, tiebreak: dict[int, int]) -> list[int]:
        """Up to ``slots`` known clients, round-robin over communities ordered by best utility."""
        groups: dict[tuple[str, int], list[tuple[float, int, int]]] = {}
        for c in pool:
            u = self.utility(c, deadline)
            if u is not None:
                key = ("community", self._community_of[c]) if c in self._community_of else ("client", c)
                groups.setdefault(key, []).append((-u, tiebreak[c], c))
        ranked = sorted((sorted(members) for members in groups.values()), key=lambda m: m[0][:2])
        chosen: list[int] = []
        turn = 0
        while len(chosen) < slots and ranked:
            ranked = [m for m in ranked if len(m) > turn]
            for members in ranked:
                if len(chosen) == slots:
                    break
                chosen.append(members[turn][2])
            turn += 1
        return chosen

    def _explore(self, candidates: list[int], slots: int, tiebreak: dict[int, int]) -> list[int]:
        """``slots`` least recently selected candidates, never-selected first."""

        def key(c: int) -> tuple[int, int, int]:
            last = self.clients[c].last_seen if c in self.clients else None
            return (0, 0, tiebreak[c]) if last is None else (1, last, tiebreak[c])

        return sorted(candidates, key=key)[: max(slots, 0)]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable selection state (config, eps, rounds, communities, per-client state)."""
        return {
            "version": STATE_VERSION,
            "config": asdict(self.config),
            "eps": self.eps,
            "rounds": self.rounds,
            "communities": [list(m) for m in self.communities],
            "clients": [{"client": c, **asdict(s)} for c, s in sorted(self.clients.items())],
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> ParticipantSelector:
        """Rebuild a selector from :meth:`state_dict` output (also after a JSON round trip)."""
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported selector state version {d.get('version')!r}; expected {STATE_VERSION}")
        selector = cls(SelectorConfig(**d["config"]))
        selector.eps = float(d["eps"])
        selector.rounds = int(d["rounds"])
        selector.set_communities(d["communities"])
        for row in d["clients"]:
            fields = {key: value for key, value in row.items() if key != "client"}
            selector.clients[_client_id(row["client"])] = ClientState(**fields)
        return selector
