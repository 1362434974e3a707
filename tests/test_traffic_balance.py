"""Backend selection: pure decisions, checked without sockets."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shipyard.traffic.balance import Selector, SmoothWeighted


@dataclass
class Cand:
    id: str
    revision: str = "r1"
    weight: int = 1
    ready: bool = True
    active: int = 0


def test_smooth_weighted_is_exact_and_interleaved() -> None:
    sw = SmoothWeighted()
    picks = [sw.pick({"a": 5, "b": 1, "c": 1}) for _ in range(7)]
    assert Counter(picks) == {"a": 5, "b": 1, "c": 1}
    assert "".join(picks) == "aabacaa"  # never five in a row


@given(st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 50), min_size=1))
def test_smooth_weighted_gives_each_its_share_per_cycle(weights: dict[str, int]) -> None:
    sw = SmoothWeighted()
    total = sum(weights.values())
    picks = [sw.pick(weights) for _ in range(max(total, 1) * 2)]
    if total == 0:
        assert set(picks) == {None}
    else:
        assert Counter(picks) == {k: 2 * w for k, w in weights.items() if w}


def test_round_robin_skips_not_ready_and_excluded() -> None:
    cands = [Cand("a"), Cand("b", ready=False), Cand("c")]
    sel = Selector("round_robin")
    assert [sel.pick(cands, None).id for _ in range(4)] == ["a", "c", "a", "c"]  # type: ignore[union-attr]
    assert sel.pick(cands, None, exclude={"a"}).id == "c"  # type: ignore[union-attr]
    assert sel.pick(cands, None, exclude={"a", "c"}) is None


def test_revision_weights_then_round_robin_inside() -> None:
    cands = [Cand("s1", "stable"), Cand("s2", "stable"), Cand("c1", "canary")]
    sel = Selector()
    picks = [sel.pick(cands, {"stable": 9, "canary": 1}).id for _ in range(100)]  # type: ignore[union-attr]
    assert Counter(picks) == {"s1": 45, "s2": 45, "c1": 10}


def test_weights_fall_back_when_no_weighted_revision_can_serve() -> None:
    cands = [Cand("a", "old"), Cand("b", "new", ready=False)]
    assert Selector().pick(cands, {"new": 100}).id == "a"  # type: ignore[union-attr]


def test_zero_weight_revision_gets_nothing() -> None:
    cands = [Cand("a", "stable"), Cand("b", "canary")]
    sel = Selector()
    assert {sel.pick(cands, {"stable": 1, "canary": 0}).id for _ in range(10)} == {"a"}  # type: ignore[union-attr]


def test_least_conn_prefers_idle_then_least_recent() -> None:
    cands = [Cand("a", active=3), Cand("b", active=1), Cand("c", active=1)]
    sel = Selector("least_conn")
    first = sel.pick(cands, None)
    second = sel.pick(cands, None)
    assert {first.id, second.id} == {"b", "c"}  # type: ignore[union-attr]
    cands[0].active = 0
    assert sel.pick(cands, None).id == "a"  # type: ignore[union-attr]


def test_unknown_balance_is_refused() -> None:
    with pytest.raises(ValueError):
        Selector("random")  # type: ignore[arg-type]
