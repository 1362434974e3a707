"""The state store interface: the one source of truth for what was applied and what runs.

Records are plain dataclasses. Every method is async so that a networked store (etcd) can
implement the same interface; the SQLite store answers from a local file.
Writes that belong together go through `transaction()`: all of them land, or none.
"""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class InstanceState(StrEnum):
    """An instance's lifecycle. Transitions (each recorded as an event):

    pending → starting → running → (ready ⇄ running) → stopping → stopped
    running/ready → exited → (backoff → starting) | failed | completed
    """

    PENDING = "pending"  # recorded intent, not started yet
    STARTING = "starting"  # being launched
    RUNNING = "running"  # process alive, not (yet) ready
    READY = "ready"  # alive and passing readiness (or alive with no readiness probe)
    PAUSED = "paused"  # frozen (SIGSTOP) while a dependency it needs is lost
    BACKOFF = "backoff"  # exited, waiting to be restarted
    STOPPING = "stopping"
    STOPPED = "stopped"  # stopped on purpose
    COMPLETED = "completed"  # a run-to-completion instance exited 0
    FAILED = "failed"  # gave up: restarts exhausted, or could not start

    @property
    def alive(self) -> bool:
        return self in (InstanceState.STARTING, InstanceState.RUNNING, InstanceState.READY,
                        InstanceState.PAUSED, InstanceState.STOPPING)


@dataclass
class StackRecord:
    name: str
    spec: dict[str, Any]  # Stack.model_dump(mode="json") plus source/base_dir
    status: str = "applied"  # applied | deploying | failed | down
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)


@dataclass
class RevisionRecord:
    """A service's applied spec; a change of any field is a new revision."""

    stack: str
    service: str
    revision: int
    spec: dict[str, Any]
    spec_hash: str
    created_at: float = field(default_factory=time.time)
    outcome: str = "pending"  # pending | deployed | failed | rolled-back


@dataclass
class ServiceRecord:
    stack: str
    name: str
    revision: int  # the current revision
    spec_hash: str


@dataclass
class InstanceRecord:
    stack: str
    service: str
    instance: str  # e.g. "api-1"
    index: int
    revision: int
    state: InstanceState = InstanceState.PENDING
    ready: bool = False
    pid: int | None = None
    pgid: int | None = None
    proc_start: float | None = None  # process create time, to tell a reused pid apart
    cgroup: str | None = None
    runtime: dict[str, str] = field(default_factory=dict)  # the runtime's Handle.extra
    ports: dict[str, int] = field(default_factory=dict)
    restarts: int = 0
    exit_code: int | None = None
    health: str = "unknown"  # unknown | passing | failing
    message: str = ""  # why it is in this state, e.g. "exited 1; restarting in 2s"
    started_at: float | None = None
    updated_at: float = field(default_factory=time.time)


@dataclass
class Event:
    kind: str  # e.g. "deploy.started", "instance.ready", "instance.exited"
    message: str
    stack: str | None = None
    service: str | None = None
    instance: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)
    seq: int | None = None  # assigned by the store, strictly increasing


class OpState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (OpState.SUCCEEDED, OpState.FAILED, OpState.CANCELLED)


@dataclass
class OperationRecord:
    """A mutating request (apply, down, restart...), persisted before it runs so that a
    control plane that dies resumes it or fails it cleanly, never loses or repeats it."""

    kind: str  # apply | down | restart | rollback | scale | stop
    stack: str
    service: str | None = None  # None: the whole stack
    priority: int = 2  # 0 critical, 1 high, 2 normal, 3 low; FIFO within a priority
    state: OpState = OpState.QUEUED
    payload: dict[str, Any] = field(default_factory=dict)  # what to do
    checkpoint: dict[str, Any] = field(default_factory=dict)  # progress, for resuming
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    timeout: float = 600.0
    attempts: int = 0  # how many control planes started running it
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    id: int | None = None  # assigned by the store, strictly increasing


class StateStore(abc.ABC):
    """Durable state: stacks, services and their revisions, instances, the event log."""

    async def __aenter__(self) -> StateStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[None]:
        """Group the writes made inside into one atomic commit."""

    # stacks
    @abc.abstractmethod
    async def put_stack(self, record: StackRecord) -> None: ...

    @abc.abstractmethod
    async def get_stack(self, name: str) -> StackRecord | None: ...

    @abc.abstractmethod
    async def list_stacks(self) -> list[StackRecord]: ...

    @abc.abstractmethod
    async def delete_stack(self, name: str) -> None:
        """Remove the stack, its services, revisions and instances (events stay)."""

    # services and revisions
    @abc.abstractmethod
    async def record_revision(
        self, stack: str, service: str, spec: dict[str, Any], spec_hash: str
    ) -> RevisionRecord:
        """Make `spec` the service's current revision: a new numbered revision if its hash
        differs from the current one, else the current revision unchanged."""

    @abc.abstractmethod
    async def list_services(self, stack: str) -> list[ServiceRecord]: ...

    @abc.abstractmethod
    async def delete_service(self, stack: str, service: str) -> None: ...

    @abc.abstractmethod
    async def get_revision(self, stack: str, service: str, revision: int) -> RevisionRecord | None:
        ...

    @abc.abstractmethod
    async def list_revisions(self, stack: str, service: str) -> list[RevisionRecord]: ...

    @abc.abstractmethod
    async def prune_revisions(self, stack: str, service: str, keep: int) -> int:
        """Keep the newest `keep` revisions of the service (and always its current one);
        returns how many were deleted."""

    @abc.abstractmethod
    async def set_revision_outcome(
        self, stack: str, service: str, revision: int, outcome: str
    ) -> None: ...

    # instances
    @abc.abstractmethod
    async def put_instance(self, record: InstanceRecord) -> None:
        """Insert or replace, keyed by (stack, instance)."""

    @abc.abstractmethod
    async def get_instance(self, stack: str, instance: str) -> InstanceRecord | None: ...

    @abc.abstractmethod
    async def list_instances(
        self, stack: str | None = None, service: str | None = None
    ) -> list[InstanceRecord]: ...

    @abc.abstractmethod
    async def delete_instance(self, stack: str, instance: str) -> None: ...

    async def record_instances(
        self, changes: Sequence[tuple[InstanceRecord, Event | None]]
    ) -> None:
        """Put each record and append its event (None: no event), in order: many
        instances' transitions at the cost of about one write (a `down` of a hundred
        instances, engine/transitions.py). Atomic like `transaction()`, where the store
        can hold them all in one (etcd splits them into transactions of what one may
        hold, each atomic); NotFoundError (nothing of the failing one written) when a
        record's stack is not in the store. Stores may do it cheaper than this."""
        async with self.transaction():
            for record, event in changes:
                await self.put_instance(record)
                if event is not None:
                    await self.append_event(event)

    # events
    @abc.abstractmethod
    async def append_event(self, event: Event) -> Event:
        """Append to the log; returns the event with its `seq` set."""

    @abc.abstractmethod
    async def list_events(
        self, *, after: int = 0, limit: int = 1000, stack: str | None = None,
        service: str | None = None,
    ) -> list[Event]:
        """Events with seq > after, oldest first."""

    # operations
    @abc.abstractmethod
    async def put_operation(self, op: OperationRecord) -> OperationRecord:
        """Insert (assigning `op.id` when it is None) or replace by id; returns `op`."""

    @abc.abstractmethod
    async def get_operation(self, op_id: int) -> OperationRecord | None: ...

    @abc.abstractmethod
    async def list_operations(
        self, *, states: tuple[OpState, ...] | None = None, stack: str | None = None,
        limit: int = 1000,
    ) -> list[OperationRecord]:
        """Oldest first (by id); the newest `limit` of those that match."""

    @abc.abstractmethod
    async def last_event_seq(self) -> int:
        """The seq of the newest event, 0 when there is none."""

    @abc.abstractmethod
    def watch_events(self, *, after: int = 0, stack: str | None = None) -> AsyncIterator[Event]:
        """Every event with seq > after, then each new one as it is appended (forever)."""
