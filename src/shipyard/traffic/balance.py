"""Which backend gets the next connection: pure decisions over the current candidates.

Revision weights (canary) are applied first, with smooth weighted round robin so that a
90/10 split gives exactly 9 of every 10 connections to the first revision, interleaved,
and deterministically; then round robin or least-connections inside the revision.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Balance = Literal["round_robin", "least_conn"]


@dataclass(frozen=True, slots=True)
class Backend:
    """One instance behind the router: where it listens and which revision it runs."""

    id: str
    host: str
    port: int
    revision: str = ""
    weight: int = 1
    ready: bool = True

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


class Candidate(Protocol):
    """What selection looks at; the router's backend slots satisfy it."""

    @property
    def id(self) -> str: ...
    @property
    def revision(self) -> str: ...
    @property
    def weight(self) -> int: ...
    @property
    def ready(self) -> bool: ...
    @property
    def active(self) -> int: ...


class SmoothWeighted:
    """nginx's smooth weighted round robin: even interleaving, exact ratios, no randomness."""

    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def pick(self, weights: Mapping[str, int]) -> str | None:
        current = self._current
        total, best, best_value = 0, None, 0
        for key, weight in weights.items():
            if weight <= 0:
                continue
            value = current.get(key, 0) + weight
            current[key] = value
            total += weight
            if best is None or value > best_value:
                best, best_value = key, value
        if best is not None:
            current[best] -= total
        return best

    def reset(self) -> None:
        self._current.clear()


class Selector:
    """Picks among ready candidates, honouring revision weights, skipping `exclude`."""

    def __init__(self, balance: Balance = "round_robin") -> None:
        if balance not in ("round_robin", "least_conn"):
            raise ValueError(f"unknown balance {balance!r}: use round_robin or least_conn")
        self.balance = balance
        self._revisions = SmoothWeighted()
        self._within: dict[str, SmoothWeighted] = {}
        self._seq = 0
        self._last: dict[str, int] = {}

    def reset(self) -> None:
        """Forget rotation state (after the weights or the set change)."""
        self._revisions.reset()
        self._within.clear()

    def pick(
        self,
        candidates: Sequence[Candidate],
        weights: Mapping[str, int] | None,
        exclude: Collection[str] = (),
    ) -> Candidate | None:
        pool = [c for c in candidates if c.ready and c.weight > 0 and c.id not in exclude]
        if not pool:
            return None
        if weights:
            present = {c.revision for c in pool}
            revision = self._revisions.pick(
                {rev: w for rev, w in weights.items() if rev in present}
            )
            # No weighted revision can serve: any ready backend beats a refused client.
            if revision is not None:
                pool = [c for c in pool if c.revision == revision]
        key = pool[0].revision if weights else ""
        chosen = self._least_conn(pool) if self.balance == "least_conn" else self._rr(key, pool)
        self._seq += 1
        self._last[chosen.id] = self._seq
        return chosen

    def _rr(self, key: str, pool: list[Candidate]) -> Candidate:
        rotation = self._within.setdefault(key, SmoothWeighted())
        by_id = {c.id: c for c in pool}
        chosen = rotation.pick({c.id: c.weight for c in pool})
        return by_id[chosen] if chosen is not None else pool[0]

    def _least_conn(self, pool: list[Candidate]) -> Candidate:
        # Fewest active per unit of weight; ties go to the least recently picked.
        return min(pool, key=lambda c: (c.active / c.weight, self._last.get(c.id, 0)))

    def forget(self, ids: Collection[str]) -> None:
        """Drop state of backends that left the set."""
        for i in ids:
            self._last.pop(i, None)
