"""migrate: a one-shot job that brings the db's schema to the current version, then exits.

It waits for db ($DB_URL) to answer, takes a lock key (so two runs never interleave),
reads `schema/version`, applies each newer migration (seed keys are written only if
absent, so a run that died half-way can simply be run again), records
`schema/history/<n>`, sets `schema/version`, and exits 0. Exit 1 when db never answered
within --wait seconds or refused a write; 143 when stopped by SIGTERM before finishing.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

from common import (
    SCHEMA_VERSION,
    Unavailable,
    Upstream,
    arguments,
    install_stop_signals,
    log,
)


def _user(name: str, password: str, roles: list[str]) -> dict[str, Any]:
    salt = hashlib.sha256(f"platform-example:{name}".encode()).hexdigest()[:16]
    digest = hashlib.sha256((salt + password).encode()).hexdigest()
    return {"name": name, "roles": roles, "salt": salt, "password_sha256": digest}


# (version, description, keys written if absent)
MIGRATIONS: list[tuple[int, str, dict[str, Any]]] = [
    (1, "schema metadata", {"meta/created_by": "migrate", "meta/app": "platform"}),
    (2, "seed users (demo only: well-known passwords)", {
        "users/admin": _user("admin", "admin", ["admin", "writer"]),
        "users/demo": _user("demo", "demo", ["writer"]),
    }),
    (3, "job counters and a welcome item", {
        "stats/jobs_done": 0,
        "stats/jobs_failed": 0,
        "items/welcome": {"text": "hello from the platform example"},
    }),
]
assert MIGRATIONS[-1][0] == SCHEMA_VERSION


class Interrupted(Exception):
    pass


def main() -> int:
    parser = arguments("migrate: bring the db schema up to date", port=False)
    parser.add_argument("--db-url", default=None, help="default: $DB_URL")
    parser.add_argument("--wait", type=float, default=30.0,
                        help="seconds to wait for db to answer")
    args = parser.parse_args()
    name = os.environ.get("SHIPYARD_INSTANCE") or "migrate"
    stop = threading.Event()
    install_stop_signals(stop)

    db = Upstream("db", [args.db_url] if args.db_url else None, attempts=3)
    if not db.configured:
        log(name, "no db address: set DB_URL (or --db-url)")
        return 2
    log(name, f"started: migrating {db.urls[0]} to schema version {SCHEMA_VERSION}")
    try:
        wait_for(db, args.wait, stop)
        with SchemaLock(db, name, stop):
            version = current_version(db)
            if version >= SCHEMA_VERSION:
                log(name, f"schema is at version {version}: nothing to do")
            for number, description, keys in MIGRATIONS:
                if number <= version:
                    continue
                if stop.is_set():
                    raise Interrupted
                for key, value in keys.items():
                    status, body = db.put(f"/kv/{key}", {"value": value, "if_absent": True})
                    if status not in (200, 409):
                        raise RuntimeError(f"PUT {key} → {status} {body}")
                history = {"description": description, "applied_at": time.time(), "by": name}
                write(db, f"schema/history/{number}", history)
                write(db, "schema/version", number)
                log(name, f"applied migration {number}: {description} ({len(keys)} keys)")
    except Interrupted:
        log(name, "stopped by signal before finishing")
        return 143
    except (Unavailable, RuntimeError, TimeoutError) as exc:
        log(name, f"failed: {exc}")
        return 1
    log(name, f"done: schema version {SCHEMA_VERSION}")
    return 0


def wait_for(db: Upstream, seconds: float, stop: threading.Event) -> None:
    deadline = time.monotonic() + seconds
    while True:
        ok, message = db.check()
        if ok:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"db did not answer within {seconds:g}s: {message}")
        if stop.wait(0.1):
            raise Interrupted


def current_version(db: Upstream) -> int:
    status, body = db.get("/kv/schema/version")
    if status == 404:
        return 0
    if status != 200:
        raise RuntimeError(f"GET schema/version → {status} {body}")
    return int(body["value"])


def write(db: Upstream, key: str, value: Any) -> None:
    status, body = db.put(f"/kv/{key}", {"value": value})
    if status != 200:
        raise RuntimeError(f"PUT {key} → {status} {body}")


class SchemaLock:
    """The `schema/lock` key, held with a ttl so a crashed run does not block forever."""

    def __init__(self, db: Upstream, owner: str, stop: threading.Event) -> None:
        self.db, self.owner, self.stop = db, owner, stop
        self.token = f"{owner}:{os.getpid()}:{time.time()}"

    def __enter__(self) -> None:
        while True:
            status, body = self.db.put("/kv/schema/lock",
                                       {"value": self.token, "ttl": 30, "if_absent": True})
            if status == 200:
                return
            if status != 409:
                raise RuntimeError(f"taking schema/lock → {status} {body}")
            log(self.owner, f"waiting for schema/lock held by {body.get('value')}")
            if self.stop.wait(0.5):
                raise Interrupted

    def __exit__(self, *exc: object) -> None:
        try:
            status, body = self.db.get("/kv/schema/lock", attempts=1)
            if status == 200 and body.get("value") == self.token:
                self.db.delete("/kv/schema/lock", attempts=1)
        except Unavailable:
            pass  # the ttl releases it


if __name__ == "__main__":
    sys.exit(main())
