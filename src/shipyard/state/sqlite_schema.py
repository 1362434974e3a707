"""The SQLite store's schema, its numbered migrations, and the row <-> record codecs.

The schema version lives in `shipyard_schema` (one row). Migrations are applied in order,
each exactly once, inside the same transaction that bumps the version, so a crash half-way
through an upgrade leaves the previous version intact. To change the schema, append a new
numbered entry to `MIGRATIONS`; never edit an entry that has shipped.
"""

from __future__ import annotations

import json
from typing import Any

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

# (version, statements). Version N brings a database from N-1 to N.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE stacks (
            name TEXT PRIMARY KEY,
            spec TEXT NOT NULL,
            status TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE services (
            stack TEXT NOT NULL REFERENCES stacks(name) ON DELETE CASCADE,
            name TEXT NOT NULL,
            revision INTEGER NOT NULL,
            spec_hash TEXT NOT NULL,
            PRIMARY KEY (stack, name)
        ) WITHOUT ROWID""",
        """CREATE TABLE revisions (
            stack TEXT NOT NULL,
            service TEXT NOT NULL,
            revision INTEGER NOT NULL,
            spec TEXT NOT NULL,
            spec_hash TEXT NOT NULL,
            outcome TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (stack, service, revision),
            FOREIGN KEY (stack, service) REFERENCES services(stack, name) ON DELETE CASCADE
        ) WITHOUT ROWID""",
        """CREATE TABLE instances (
            stack TEXT NOT NULL REFERENCES stacks(name) ON DELETE CASCADE,
            instance TEXT NOT NULL,
            service TEXT NOT NULL,
            idx INTEGER NOT NULL,
            revision INTEGER NOT NULL,
            state TEXT NOT NULL,
            ready INTEGER NOT NULL,
            pid INTEGER,
            pgid INTEGER,
            proc_start REAL,
            cgroup TEXT,
            runtime TEXT NOT NULL,
            ports TEXT NOT NULL,
            restarts INTEGER NOT NULL,
            exit_code INTEGER,
            health TEXT NOT NULL,
            message TEXT NOT NULL,
            started_at REAL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (stack, instance)
        ) WITHOUT ROWID""",
        "CREATE INDEX instances_by_service ON instances (stack, service, idx)",
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            stack TEXT,
            service TEXT,
            instance TEXT,
            message TEXT NOT NULL,
            data TEXT NOT NULL
        )""",
        "CREATE INDEX events_by_stack ON events (stack, seq)",
        "CREATE INDEX events_by_service ON events (stack, service, seq)",
    ]),
]

MIGRATIONS.append((2, [
    """CREATE TABLE operations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        stack TEXT NOT NULL,
        service TEXT,
        priority INTEGER NOT NULL,
        state TEXT NOT NULL,
        payload TEXT NOT NULL,
        checkpoint TEXT NOT NULL,
        result TEXT NOT NULL,
        error TEXT NOT NULL,
        timeout REAL NOT NULL,
        attempts INTEGER NOT NULL,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    )""",
    "CREATE INDEX operations_by_state ON operations (state, priority, id)",
]))
SCHEMA_VERSION = MIGRATIONS[-1][0]

# -- SQL ------------------------------------------------------------------------------------
STACK_COLS = "name, spec, status, created_at, updated_at"
PUT_STACK = (
    f"INSERT INTO stacks ({STACK_COLS}) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, status = excluded.status, "
    "updated_at = excluded.updated_at"
)
GET_STACK = f"SELECT {STACK_COLS} FROM stacks WHERE name = ?"
LIST_STACKS = f"SELECT {STACK_COLS} FROM stacks ORDER BY name"
DELETE_STACK = "DELETE FROM stacks WHERE name = ?"
STACK_EXISTS = "SELECT 1 FROM stacks WHERE name = ?"

SERVICE_COLS = "stack, name, revision, spec_hash"
LIST_SERVICES = f"SELECT {SERVICE_COLS} FROM services WHERE stack = ? ORDER BY name"
GET_SERVICE = f"SELECT {SERVICE_COLS} FROM services WHERE stack = ? AND name = ?"
PUT_SERVICE = (
    f"INSERT INTO services ({SERVICE_COLS}) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (stack, name) DO UPDATE SET revision = excluded.revision, "
    "spec_hash = excluded.spec_hash"
)
DELETE_SERVICE = "DELETE FROM services WHERE stack = ? AND name = ?"
DELETE_SERVICE_INSTANCES = "DELETE FROM instances WHERE stack = ? AND service = ?"

REVISION_COLS = "stack, service, revision, spec, spec_hash, created_at, outcome"
GET_REVISION = (
    f"SELECT {REVISION_COLS} FROM revisions WHERE stack = ? AND service = ? AND revision = ?"
)
LIST_REVISIONS = (
    f"SELECT {REVISION_COLS} FROM revisions WHERE stack = ? AND service = ? ORDER BY revision"
)
MAX_REVISION = "SELECT max(revision) FROM revisions WHERE stack = ? AND service = ?"
INSERT_REVISION = f"INSERT INTO revisions ({REVISION_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
SET_OUTCOME = (
    "UPDATE revisions SET outcome = ? WHERE stack = ? AND service = ? AND revision = ?"
)

INSTANCE_COLS = (
    "stack, service, instance, idx, revision, state, ready, pid, pgid, proc_start, cgroup, "
    "runtime, ports, restarts, exit_code, health, message, started_at, updated_at"
)
PUT_INSTANCE = (
    f"INSERT OR REPLACE INTO instances ({INSTANCE_COLS}) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
GET_INSTANCE = f"SELECT {INSTANCE_COLS} FROM instances WHERE stack = ? AND instance = ?"
LIST_INSTANCES = f"SELECT {INSTANCE_COLS} FROM instances"
INSTANCES_ORDER = " ORDER BY stack, service, idx, instance"
DELETE_INSTANCE = "DELETE FROM instances WHERE stack = ? AND instance = ?"

OP_COLS = ("id, kind, stack, service, priority, state, payload, checkpoint, result, error, "
           "timeout, attempts, created_at, started_at, finished_at")
PUT_OP = f"INSERT OR REPLACE INTO operations ({OP_COLS}) VALUES ({', '.join('?' * 15)})"
GET_OP = f"SELECT {OP_COLS} FROM operations WHERE id = ?"
LIST_OPS = f"SELECT {OP_COLS} FROM operations WHERE 1 = 1"

EVENT_COLS = "seq, ts, kind, stack, service, instance, message, data"
INSERT_EVENT = (
    "INSERT INTO events (ts, kind, stack, service, instance, message, data) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
LIST_EVENTS = f"SELECT {EVENT_COLS} FROM events WHERE seq > ?"
PRUNE_EVENTS = (
    "DELETE FROM events WHERE seq < "
    "(SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET ?)"
)


# -- codecs ---------------------------------------------------------------------------------
_encode = json.JSONEncoder(separators=(",", ":")).encode  # one encoder: 3x cheaper per call


def dumps(value: Any) -> str:
    return _encode(value)


def stack_row(r: StackRecord) -> tuple[Any, ...]:
    return (r.name, dumps(r.spec), r.status, r.created_at, r.updated_at)


def stack_record(row: tuple[Any, ...]) -> StackRecord:
    name, spec, status, created_at, updated_at = row
    return StackRecord(name=name, spec=json.loads(spec), status=status,
                       created_at=created_at, updated_at=updated_at)


def service_record(row: tuple[Any, ...]) -> ServiceRecord:
    stack, name, revision, spec_hash = row
    return ServiceRecord(stack=stack, name=name, revision=revision, spec_hash=spec_hash)


def revision_row(r: RevisionRecord) -> tuple[Any, ...]:
    return (r.stack, r.service, r.revision, dumps(r.spec), r.spec_hash, r.created_at,
            r.outcome)


def revision_record(row: tuple[Any, ...]) -> RevisionRecord:
    stack, service, revision, spec, spec_hash, created_at, outcome = row
    return RevisionRecord(stack=stack, service=service, revision=revision,
                          spec=json.loads(spec), spec_hash=spec_hash,
                          created_at=created_at, outcome=outcome)


def instance_row(r: InstanceRecord) -> tuple[Any, ...]:
    return (r.stack, r.service, r.instance, r.index, r.revision, str(r.state), int(r.ready),
            r.pid, r.pgid, r.proc_start, r.cgroup, dumps(r.runtime), dumps(r.ports), r.restarts,
            r.exit_code, r.health, r.message, r.started_at, r.updated_at)


def instance_record(row: tuple[Any, ...]) -> InstanceRecord:
    (stack, service, instance, index, revision, state, ready, pid, pgid, proc_start, cgroup,
     runtime, ports, restarts, exit_code, health, message, started_at, updated_at) = row
    return InstanceRecord(
        stack=stack, service=service, instance=instance, index=index, revision=revision,
        state=InstanceState(state), ready=bool(ready), pid=pid, pgid=pgid,
        proc_start=proc_start, cgroup=cgroup, runtime=json.loads(runtime),
        ports=json.loads(ports), restarts=restarts,
        exit_code=exit_code, health=health, message=message, started_at=started_at,
        updated_at=updated_at)


def op_row(o: OperationRecord) -> tuple[Any, ...]:
    return (o.id, o.kind, o.stack, o.service, o.priority, str(o.state), dumps(o.payload),
            dumps(o.checkpoint), dumps(o.result), o.error, o.timeout, o.attempts,
            o.created_at, o.started_at, o.finished_at)


def op_record(row: tuple[Any, ...]) -> OperationRecord:
    (id_, kind, stack, service, priority, state, payload, checkpoint, result, error,
     timeout, attempts, created_at, started_at, finished_at) = row
    return OperationRecord(
        id=id_, kind=kind, stack=stack, service=service, priority=priority,
        state=OpState(state), payload=json.loads(payload), checkpoint=json.loads(checkpoint),
        result=json.loads(result), error=error, timeout=timeout, attempts=attempts,
        created_at=created_at, started_at=started_at, finished_at=finished_at)


def event_row(e: Event) -> tuple[Any, ...]:
    return (e.ts, e.kind, e.stack, e.service, e.instance, e.message, dumps(e.data))


def event_record(row: tuple[Any, ...]) -> Event:
    seq, ts, kind, stack, service, instance, message, data = row
    return Event(kind=kind, message=message, stack=stack, service=service, instance=instance,
                 data=json.loads(data), ts=ts, seq=seq)
