"""The etcd store's key layout and its JSON codecs.

Every key lives under `/shipyard/<cluster>/` (the cluster defaults to "default"), so several
Shipyard installations can share one etcd. Names are percent-encoded (`/` becomes `%2F`),
numbers are zero-padded so that key order is numeric order:

    meta                                      {"layout": 1}
    stacks/<stack>                            StackRecord
    services/<stack>/<service>                ServiceRecord (the current revision)
    revisions/<stack>/<service>/<rev:010>     RevisionRecord
    instances/<stack>/<instance>              InstanceRecord
    events/<seq:020>                          Event (its seq is the key)
    operations/<id:020>                       OperationRecord (its id is the key)
    counters/events, counters/operations      the last number handed out (decimal text)

A stack's children are under per-kind prefixes ending in `/`, so deleting a stack is one
point delete plus three prefix deletes, and no prefix of one name covers another name.
Values are compact JSON objects holding every field of the record (except the number
kept in the key), decoded leniently: unknown fields are ignored, missing ones default.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from shipyard.state.base import (
    Event,
    InstanceRecord,
    InstanceState,
    OperationRecord,
    OpState,
    RevisionRecord,
    ServiceRecord,
    StackRecord,
)

LAYOUT = 1  # bump when the layout changes; a store refuses a newer layout than it knows
CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_SEQ = 20  # digits of event seqs and operation ids
_REV = 10  # digits of revision numbers

R = TypeVar("R")
_encode = json.JSONEncoder(separators=(",", ":")).encode


def prefix_end(prefix: bytes) -> bytes:
    """The exclusive end of the range of keys starting with `prefix`."""
    for i in range(len(prefix) - 1, -1, -1):
        if prefix[i] < 0xFF:
            return prefix[:i] + bytes((prefix[i] + 1,))
    return b"\0"


@functools.lru_cache(maxsize=4096)
def _name(name: str) -> bytes:
    return quote(name, safe="").encode()


class Keys:
    """Every key of one cluster's namespace."""

    def __init__(self, cluster: str) -> None:
        self.root = f"/shipyard/{cluster}/".encode()
        root = self.root
        self.meta = root + b"meta"
        self.stacks = root + b"stacks/"
        self.events = root + b"events/"
        self.operations = root + b"operations/"
        self.event_counter = root + b"counters/events"
        self.op_counter = root + b"counters/operations"
        self._services = root + b"services/"
        self._revisions = root + b"revisions/"
        self._instances = root + b"instances/"

    def stack(self, stack: str) -> bytes:
        return self.stacks + _name(stack)

    def services(self, stack: str) -> bytes:
        return self._services + _name(stack) + b"/"

    def service(self, stack: str, service: str) -> bytes:
        return self.services(stack) + _name(service)

    def revisions(self, stack: str, service: str | None = None) -> bytes:
        prefix = self._revisions + _name(stack) + b"/"
        return prefix if service is None else prefix + _name(service) + b"/"

    def revision(self, stack: str, service: str, revision: int) -> bytes:
        return self.revisions(stack, service) + b"%0*d" % (_REV, revision)

    def instances(self, stack: str | None = None) -> bytes:
        return self._instances if stack is None else self._instances + _name(stack) + b"/"

    def instance(self, stack: str, instance: str) -> bytes:
        return self.instances(stack) + _name(instance)

    def event(self, seq: int) -> bytes:
        return self.events + b"%0*d" % (_SEQ, seq)

    def operation(self, op_id: int) -> bytes:
        return self.operations + b"%0*d" % (_SEQ, op_id)

    def stack_children(self, stack: str) -> list[bytes]:
        """The prefixes holding everything of `stack` but the stack key itself."""
        return [self.services(stack), self.revisions(stack), self.instances(stack)]

    @staticmethod
    def number(key: bytes) -> int:
        """The seq, id or revision at the end of `key`."""
        return int(key.rsplit(b"/", 1)[1])

    @staticmethod
    def last_name(key: bytes) -> str:
        return unquote(key.rsplit(b"/", 1)[1].decode())


# -- codecs ---------------------------------------------------------------------------------
def dumps(value: Any) -> bytes:
    return _encode(value).encode()


def _fields(cls: type[Any]) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


_KNOWN: dict[type[Any], frozenset[str]] = {
    cls: _fields(cls) for cls in (StackRecord, ServiceRecord, RevisionRecord, InstanceRecord,
                                  Event, OperationRecord)
}


def _build(cls: type[R], data: dict[str, Any]) -> R:
    known = _KNOWN[cls]
    if not known.issuperset(data):
        data = {k: v for k, v in data.items() if k in known}
    return cls(**data)


def encode(record: Any, *, without: str | None = None) -> bytes:
    """JSON of a record's fields (a shallow copy: nested values are JSON already)."""
    data = dict(vars(record))
    if without is not None:
        data.pop(without, None)
    return dumps(data)


def stack_record(value: bytes) -> StackRecord:
    return _build(StackRecord, json.loads(value))


def service_record(value: bytes) -> ServiceRecord:
    return _build(ServiceRecord, json.loads(value))


def revision_record(value: bytes) -> RevisionRecord:
    return _build(RevisionRecord, json.loads(value))


def instance_record(value: bytes) -> InstanceRecord:
    record = _build(InstanceRecord, json.loads(value))
    record.state = InstanceState(record.state)
    return record


def event_record(key: bytes, value: bytes) -> Event:
    event = _build(Event, json.loads(value))
    event.seq = Keys.number(key)
    return event


def operation_record(key: bytes, value: bytes) -> OperationRecord:
    op = _build(OperationRecord, json.loads(value))
    op.state = OpState(op.state)
    op.id = Keys.number(key)
    return op
