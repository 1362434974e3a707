"""Blue-green and canary without a service mesh: pure decisions, no I/O.

- Canary: the stable and the canary Deployment sit behind one Service (its selector
  matches both), so the share of traffic the canary gets is its share of the ready pods.
  `canary_split` turns a step weight into replica counts in that ratio.
- Blue-green: two Deployments, `<svc>-blue` and `<svc>-green`; the Service selects one
  colour. `blue_green_plan` says which colour the new pod template goes to, and where
  the selector points before and after the new set is ready.

Small and pure so they can join the local rollouts' step machines in `plan/` later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Color = Literal["blue", "green"]
COLORS: tuple[Color, Color] = ("blue", "green")


def canary_split(total: int, weight: int) -> tuple[int, int]:
    """(stable, canary) replicas for `weight`% of `total` pods on the canary.

    The canary gets round(total * weight / 100) pods, at least one (a step must put the
    new revision in front of some traffic) and, below 100%, at most total - 1 while total
    allows a stable pod (the stable revision keeps serving until promotion). The two add
    up to `total`, except for total = 1 where a canary pod runs beside the stable one
    (and total = 0, where nothing runs)."""
    if total < 0 or not 0 <= weight <= 100:
        raise ValueError(f"need total >= 0 and 0 <= weight <= 100, got {total}, {weight}")
    if weight == 0 or total == 0:  # nothing runs: nothing to compare against
        return total, 0
    if weight == 100:
        return 0, max(total, 1)
    if total <= 1:
        return total, 1
    canary = min(max(1, round(total * weight / 100)), total - 1)
    return total - canary, canary


def canary_steps(total: int, weights: list[int]) -> list[tuple[int, int]]:
    """The (stable, canary) replica counts of each step, then promotion: the stable
    Deployment takes the new template at `total` and the canary goes to zero."""
    return [canary_split(total, weight) for weight in weights] + [(total, 0)]


def effective_weight(stable: int, canary: int) -> float:
    """The share of traffic (in %) the canary gets with these ready pods."""
    return 0.0 if stable + canary == 0 else 100.0 * canary / (stable + canary)


def other_color(color: Color) -> Color:
    return "green" if color == "blue" else "blue"


@dataclass(frozen=True)
class BlueGreenPlan:
    """`deploy`: the colour whose Deployment gets the new template; `selector_before` /
    `selector_after`: where the Service points while it rolls out / once it is ready;
    `retire`: the colour scaled to zero after the switch (kept for a quick switch back),
    or None when nothing switches."""

    deploy: Color
    selector_before: Color
    selector_after: Color
    retire: Color | None

    @property
    def switches(self) -> bool:
        return self.selector_before != self.selector_after


def blue_green_plan(
    active: Color | None, active_hash: str | None, new_hash: str
) -> BlueGreenPlan:
    """What to do given the live active colour (None: nothing deployed yet) and the
    template hash its Deployment carries, for a new template hashed `new_hash`.

    - Nothing live: the new template goes to blue and the Service selects blue at once.
    - The live active set already runs this template: re-apply it in place, no switch.
    - Otherwise: the new template goes to the other colour; the Service keeps pointing at
      the active one until the new set is ready, then switches; the old set retires."""
    if active is None:
        return BlueGreenPlan("blue", "blue", "blue", None)
    if active_hash == new_hash:
        return BlueGreenPlan(active, active, active, None)
    target = other_color(active)
    return BlueGreenPlan(target, active, target, active)
