"""Whether an instance that exited is restarted, and after how long.

Pure: the caller passes the restart count and a random draw, so a decision can be
replayed exactly in a test and the supervisor owns the only clock and random source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shipyard.spec.models import RestartMode, RestartPolicy

__all__ = ["RestartDecision", "backoff_delay", "decide_restart"]

# Beyond this many doublings every realistic delay is far past its cap; stopping here keeps
# the arithmetic finite for policies with unlimited restarts.
_MAX_DOUBLINGS = 256


@dataclass(frozen=True)
class RestartDecision:
    restart: bool
    delay: float  # seconds to wait before restarting; 0 when not restarting
    reason: str
    final_state: Literal["completed", "failed"] | None  # set when not restarting


def decide_restart(
    policy: RestartPolicy,
    exit_code: int | None,
    restarts: int,
    *,
    one_shot_success_completes: bool = True,
    random: float = 0.5,
) -> RestartDecision:
    """Decide what follows an exit with `exit_code` (None: unknown, e.g. killed or it died
    while nobody watched) after `restarts` restarts so far.

    - `no`: never restart; exit 0 completes, anything else fails.
    - `on-failure`: exit 0 completes; anything else restarts.
    - `always`: every exit restarts.
    Restarting stops once `restarts` reaches `max_restarts` (None: never stops): the
    instance fails. `one_shot_success_completes=False` is for a service that must keep
    running: its exit 0 then counts as a failure. `random` is a draw from [0, 1) that
    spreads the delay by the policy's jitter. `reason` does not repeat the exit itself:
    the caller already says how the instance exited.
    """
    success = exit_code == 0 and one_shot_success_completes
    mode = policy.policy
    if mode is RestartMode.NO or (mode is RestartMode.ON_FAILURE and success):
        if success:
            return RestartDecision(False, 0.0, "completed", "completed")
        return RestartDecision(False, 0.0, "restart policy is 'no'", "failed")
    if policy.max_restarts is not None and restarts >= policy.max_restarts:
        return RestartDecision(False, 0.0, f"gave up after {restarts} restarts", "failed")
    delay = backoff_delay(policy, restarts, random=random)
    return RestartDecision(True, delay, f"restart policy is '{mode.value}'", None)


def backoff_delay(policy: RestartPolicy, restarts: int, *, random: float = 0.5) -> float:
    """The wait before restart number `restarts + 1`, always within [0, max]: `initial`
    (fixed), `initial * (1 + restarts)` (linear) or `initial * 2**restarts` (exponential)
    capped at `max` and spread by ±jitter; for exponential_jitter, a draw from the whole
    range [0, that cap] ("full jitter", which replaces `jitter`)."""
    n = min(max(restarts, 0), _MAX_DOUBLINGS)
    if policy.backoff == "fixed":
        base = policy.initial
    elif policy.backoff == "linear":
        base = policy.initial * (1.0 + n)
    else:
        base = policy.initial * 2.0 ** n
    base = min(base, policy.max)
    draw = min(max(random, 0.0), 1.0)
    if policy.backoff == "exponential_jitter":
        return base * draw
    spread = base * (1.0 - policy.jitter + 2.0 * policy.jitter * draw)
    return min(max(spread, 0.0), policy.max)
