"""Roles: verbs on resources, optionally limited to some stacks.

Three roles are built in — `viewer` (read), `operator` (day-2 operations) and `admin`
(everything) — and more can be defined in security.yaml. An identity (a local user, a
token, a client certificate) has one role, and may itself be limited to one stack (a token
made with `--stack`). `authorize` is the one place where a request is allowed or not.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from shipyard.security.errors import PermissionDenied, SecurityConfigError

RESOURCES = ("stacks", "services", "operations", "events", "secrets", "tokens", "audit",
             "system")
# Day-2 operations: what an operator may do besides reading.
# Not about any stack (health, metrics, who am I): a token limited to a stack may use them.
STACKLESS = frozenset({"system"})
DAY2 = ("restart", "recover", "rollback", "scale", "promote", "abort", "resume")
VERBS = ("read", "plan", "deploy", "delete", "create", *DAY2)
ANY = "*"


def _check_names(names: frozenset[str], known: tuple[str, ...], what: str, where: str) -> None:
    if not names:
        raise SecurityConfigError(f"{where}: no {what}s given")
    for name in sorted(names):
        if name != ANY and name not in known:
            raise SecurityConfigError(f"{where}: unknown {what} {name!r}",
                                      hint=f"known: {', '.join(known)}, or *")


@dataclass(frozen=True)
class Rule:
    """Some verbs on some resources, on every stack (`stacks` None) or on the stacks whose
    name matches one of `stacks` (shell patterns: `web`, `team-a-*`)."""

    resources: frozenset[str]
    verbs: frozenset[str]
    stacks: frozenset[str] | None = None

    @classmethod
    def of(cls, resources: Iterable[str], verbs: Iterable[str],
           stacks: Iterable[str] | None = None, *, where: str = "rule") -> Rule:
        res, vbs = frozenset(resources), frozenset(verbs)
        _check_names(res, RESOURCES, "resource", where)
        _check_names(vbs, VERBS, "verb", where)
        return cls(res, vbs, frozenset(stacks) if stacks is not None else None)

    def allows(self, resource: str, verb: str, stack: str | None) -> bool:
        if ANY not in self.resources and resource not in self.resources:
            return False
        if ANY not in self.verbs and verb not in self.verbs:
            return False
        if self.stacks is None:
            return True
        return stack is not None and any(fnmatch.fnmatchcase(stack, p) for p in self.stacks)

    def grants(self, resource: str, verb: str) -> bool:
        """Whether the rule allows `verb` on `resource` on at least one stack."""
        return self.allows(resource, verb, None) or (
            self.stacks is not None and (ANY in self.resources or resource in self.resources)
            and (ANY in self.verbs or verb in self.verbs))


@dataclass(frozen=True)
class Role:
    name: str
    rules: tuple[Rule, ...]
    description: str = ""

    def allows(self, resource: str, verb: str, stack: str | None) -> bool:
        return any(rule.allows(resource, verb, stack) for rule in self.rules)

    def grants(self, resource: str, verb: str) -> bool:
        return any(rule.grants(resource, verb) for rule in self.rules)

    def covers(self, other: Role, stack: str | None) -> bool:
        """Whether this role allows everything `other` allows (on `stack` only, if given):
        whoever creates a token may not hand out more than they have."""
        for rule in other.rules:
            for resource in _expand(rule.resources, RESOURCES):
                for verb in _expand(rule.verbs, VERBS):
                    if stack is not None:
                        if rule.allows(resource, verb, stack) and not self.allows(
                                resource, verb, stack):
                            return False
                    elif rule.stacks is None:
                        if not self.allows(resource, verb, None):
                            return False
                    elif not all(self._holds(resource, verb, p) for p in rule.stacks):
                        return False
        return True

    def _holds(self, resource: str, verb: str, pattern: str) -> bool:
        return any(r.allows(resource, verb, None) or (
            r.stacks is not None and pattern in r.stacks and r.grants(resource, verb))
            for r in self.rules)


def _expand(names: frozenset[str], every: tuple[str, ...]) -> tuple[str, ...]:
    return every if ANY in names else tuple(sorted(names))


_READABLE = ("stacks", "services", "operations", "events", "system")

BUILTIN: dict[str, Role] = {
    "viewer": Role("viewer", (Rule.of(_READABLE, ["read"]),),
                   "read stacks, services, operations, events and logs"),
    "operator": Role("operator", (Rule.of(_READABLE, ["read"]),
                                  Rule.of(["stacks", "services", "operations"],
                                          ["plan", *DAY2])),
                     "viewer, plus plan and day-2 operations: " + ", ".join(DAY2)),
    "admin": Role("admin", (Rule.of([ANY], [ANY]),), "everything"),
}


@dataclass
class RoleBook:
    """The built-in roles and those of security.yaml (which may not redefine a built-in)."""

    roles: dict[str, Role] = field(default_factory=lambda: dict(BUILTIN))

    @classmethod
    def from_config(cls, custom: Mapping[str, Role]) -> RoleBook:
        clash = sorted(set(custom) & set(BUILTIN))
        if clash:
            raise SecurityConfigError(f"security.yaml: role {clash[0]} is built in and "
                                      "cannot be redefined", hint="give it another name")
        return cls(dict(BUILTIN) | dict(custom))

    def get(self, name: str | None) -> Role | None:
        return self.roles.get(name) if name else None

    def require(self, name: str) -> Role:
        role = self.roles.get(name)
        if role is None:
            raise SecurityConfigError(f"no role named {name}",
                                      hint=f"known: {', '.join(sorted(self.roles))}")
        return role


@dataclass(frozen=True)
class Identity:
    """Who is asking: a local user (unix socket), a token, a client certificate, or the
    process itself (in-process ASGI, no server)."""

    kind: str  # "user" | "token" | "cert" | "local"
    name: str
    role: str | None
    stack: str | None = None  # limited to this one stack
    detail: str = ""

    @property
    def actor(self) -> str:
        return f"{self.kind}:{self.name}"

    def view(self) -> dict[str, str | None]:
        return {"actor": self.actor, "kind": self.kind, "name": self.name, "role": self.role,
                "stack": self.stack, "detail": self.detail}


@dataclass(frozen=True)
class Grant:
    """A request that was allowed: by whom, what, and on which stack."""

    identity: Identity
    role: Role
    resource: str
    verb: str
    stack: str | None

    @property
    def action(self) -> str:
        return f"{self.resource}.{self.verb}"

    def sees(self, stack: str) -> bool:
        """For listings: whether the identity may see this stack's entry."""
        if self.identity.stack is not None and stack != self.identity.stack:
            return False
        return self.role.allows(self.resource, self.verb, stack)


def authorize(book: RoleBook, identity: Identity, resource: str, verb: str,
              stack: str | None, *, listing: bool = False) -> Grant:
    """Allow the request or raise `PermissionDenied`. `listing`: a route that lists
    several stacks and filters its answer with `Grant.sees`."""
    role = book.get(identity.role)
    what = f"{verb} {resource}" + (f" of stack {stack}" if stack else "")
    if role is None:
        raise PermissionDenied(f"{identity.actor} may not {what}: it has no role"
                               + (f" (unknown role {identity.role})" if identity.role else ""),
                               hint="an admin can give it one in security.yaml")
    if resource in STACKLESS:
        if not role.grants(resource, verb):
            raise PermissionDenied(f"{identity.actor} (role {role.name}) may not {verb} "
                                   f"{resource}")
        return Grant(identity, role, resource, verb, None)
    if identity.stack is not None and stack is not None and stack != identity.stack:
        raise PermissionDenied(f"{identity.actor} may not {what}: it is limited to stack "
                               f"{identity.stack}")
    if stack is None and identity.stack is not None and not listing:
        raise PermissionDenied(f"{identity.actor} may not {what} across stacks: it is "
                               f"limited to stack {identity.stack}",
                               hint=f"name the stack ({identity.stack})")
    effective = stack if stack is not None else identity.stack
    allowed = (role.grants(resource, verb) if listing and effective is None
               else role.allows(resource, verb, effective))
    if not allowed:
        raise PermissionDenied(f"{identity.actor} (role {role.name}) may not {what}")
    return Grant(identity, role, resource, verb, effective)
