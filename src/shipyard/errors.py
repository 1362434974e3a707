"""One exception type per layer, each carrying a location and a hint.

They are rendered once, at the CLI/API boundary: one line each, never a traceback.
Exit codes follow the CLI contract: 2 for bad input or usage, 1 for a failed operation.
"""

from __future__ import annotations

from dataclasses import dataclass


class ShipyardError(Exception):
    """Base of every error Shipyard raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InputError(ShipyardError):
    """The user gave us something we cannot use (exit code 2)."""

    exit_code = 2


@dataclass(frozen=True)
class Issue:
    """One problem found in a stack file, with where it is."""

    path: str  # dotted field path, e.g. "services.api.ports.http"
    message: str
    file: str | None = None
    line: int | None = None

    def render(self) -> str:
        where = self.file or "<stack>"
        if self.line is not None:
            where += f":{self.line}"
        field = f" {self.path}:" if self.path else ""
        return f"{where}:{field} {self.message}"


class SpecError(InputError):
    """A stack file is invalid; carries every issue found, not only the first."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(i.render() for i in self.issues) or "invalid stack")


class PlanError(InputError):
    """The stack cannot be planned: a cycle, a missing dependency, it does not fit."""


class ResourceError(InputError):
    """A port or a resource request cannot be satisfied."""


class RuntimeLaunchError(ShipyardError):
    """An instance could not be started (command not found, missing workdir...)."""


class TransientLaunchError(RuntimeLaunchError):
    """An instance could not be started now, for a reason that may pass: the system is out
    of processes, memory or file descriptors, or the container engine does not answer.
    Retried with backoff behind the service's runtime circuit breaker; a permanent launch
    error (command not found) is not retried."""


class StoreError(ShipyardError):
    """The state store is locked, unreadable or inconsistent."""


class NotFoundError(InputError):
    """A named stack, service or instance does not exist."""


class Busy(ShipyardError):
    """The control plane refuses new work of this priority for now: retry later."""
