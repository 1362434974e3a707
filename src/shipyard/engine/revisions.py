"""Revision history and rollback of one service: every change of a service's spec is a new
numbered revision stored with its full spec; rolling back deploys an earlier revision's
spec again (as a new revision, the way Kubernetes does)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shipyard.errors import InputError, NotFoundError
from shipyard.plan.diff import diff_service
from shipyard.spec.models import Service, Stack

if TYPE_CHECKING:
    from shipyard.engine.engine import Engine


async def history(engine: Engine, stack: str, service: str) -> list[dict[str, Any]]:
    """Oldest first: when, what changed against the revision before, the outcome, and which
    one is current."""
    revisions = await engine.store.list_revisions(stack, service)
    current = {s.name: s.revision for s in await engine.store.list_services(stack)}
    out: list[dict[str, Any]] = []
    previous: dict[str, Any] | None = None
    for rev in revisions:
        if previous is None:
            changed = ["(first revision)" if rev.revision == 1 else "(oldest kept)"]
        else:
            try:
                changed = list(diff_service(Service.model_validate(rev.spec), previous))
            except ValueError:  # recorded by an older Shipyard, no longer valid
                changed = ["(spec no longer valid)"]
        out.append({"revision": rev.revision, "created_at": rev.created_at,
                     "outcome": rev.outcome, "changed": changed,
                     "current": current.get(service) == rev.revision})
        previous = rev.spec
    return out


async def rollback_stack(engine: Engine, stack: str, service: str,
                         to: int | None) -> tuple[Stack, int]:
    """The stack as applied, with `service` back at revision `to` (default: the newest
    deployed revision before the current one)."""
    state = engine.stacks_state.get(stack)
    if state is None or service not in state.stack.services:
        raise NotFoundError(f"stack {stack} has no service {service}")
    revisions = await engine.store.list_revisions(stack, service)
    current = next((s.revision for s in await engine.store.list_services(stack)
                    if s.name == service), None)
    if to is None:
        earlier = [r for r in revisions if current is not None and r.revision < current
                   and r.outcome in ("deployed", "rolled-back")]
        if not earlier:
            raise InputError(f"service {service} has no earlier deployed revision to roll "
                             f"back to", hint="see `shipyard history " + service + "`")
        target = earlier[-1]
    else:
        target = next((r for r in revisions if r.revision == to), None)
        if target is None:
            known = ", ".join(str(r.revision) for r in revisions)
            raise InputError(f"service {service} has no revision {to}",
                             hint=f"revisions: {known}")
    if target.revision == current:
        raise InputError(f"service {service} already runs revision {current}")
    services = dict(state.stack.services)
    services[service] = Service.model_validate(target.spec)
    return state.stack.model_copy(update={"services": services}), target.revision
