"""db: a tiny key-value store over HTTP, persisted to a JSON file.

    GET    /kv/<key>            {"key", "value"} or 404
    PUT    /kv/<key>            body {"value": V, "ttl": seconds?, "if_absent": bool?}
                                → 200 {"key", "value", "created"}; 409 with the current
                                value when if_absent and the key exists
    DELETE /kv/<key>            {"key", "deleted"}
    POST   /incr/<key>          body {"by": n?} → {"key", "value"} (a missing key is 0)
    GET    /kv?prefix=p         {"keys": [...]} (sorted, at most ?limit=, default 1000)
    GET    /stats               {"keys", "writes", "file"}

The data lives in `<data dir>/db.json` (--data-dir, else $SHIPYARD_DATA/db, else ./data):
loaded at start, written atomically at most every --flush-interval seconds when something
changed, and once more on SIGTERM.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

from common import App, HttpError, Request, arguments, data_dir, reply


class Store:
    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.data: dict[str, tuple[Any, float | None]] = {}  # key → (value, expires at)
        self.dirty = False
        self.writes = 0

    def load(self) -> None:
        try:
            with open(self.path) as f:
                saved = json.load(f)
        except FileNotFoundError:
            return
        now = time.time()
        for key, (value, expires) in saved.get("data", {}).items():
            if expires is None or expires > now:
                self.data[key] = (value, expires)

    def flush(self) -> bool:
        """Write the data if it changed; True if it wrote."""
        with self.lock:
            if not self.dirty:
                return False
            snapshot = {"version": 1, "data": {k: list(v) for k, v in self.data.items()}}
            self.dirty = False
        directory = os.path.dirname(self.path)
        fd, tmp = tempfile.mkstemp(prefix=".db-", suffix=".json", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(snapshot, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with self.lock:
                self.dirty = True
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return True

    def _live(self, key: str) -> tuple[Any, float | None] | None:
        item = self.data.get(key)
        if item is not None and item[1] is not None and item[1] <= time.time():
            del self.data[key]
            self.dirty = True
            return None
        return item

    def get(self, key: str) -> tuple[bool, Any]:
        with self.lock:
            item = self._live(key)
        return (False, None) if item is None else (True, item[0])

    def put(self, key: str, value: Any, ttl: float | None, if_absent: bool
            ) -> tuple[bool, Any]:
        """(created or replaced, the value now stored)."""
        with self.lock:
            item = self._live(key)
            if if_absent and item is not None:
                return False, item[0]
            self.data[key] = (value, time.time() + ttl if ttl else None)
            self.dirty = True
            self.writes += 1
            return True, value

    def delete(self, key: str) -> bool:
        with self.lock:
            existed = self._live(key) is not None
            self.data.pop(key, None)
            self.dirty = self.dirty or existed
            self.writes += existed
            return existed

    def incr(self, key: str, by: float) -> float:
        with self.lock:
            item = self._live(key)
            current = item[0] if item is not None else 0
            if not isinstance(current, int | float) or isinstance(current, bool):
                raise HttpError(409, f"{key} holds a {type(current).__name__}, not a number")
            value = current + by
            self.data[key] = (value, item[1] if item is not None else None)
            self.dirty = True
            self.writes += 1
            return value

    def keys(self, prefix: str, limit: int) -> list[str]:
        now = time.time()
        with self.lock:
            found = sorted(k for k, (_, exp) in self.data.items()
                           if k.startswith(prefix) and (exp is None or exp > now))
        return found[:limit]

    def sweep(self) -> None:
        now = time.time()
        with self.lock:
            for key in [k for k, (_, exp) in self.data.items() if exp is not None and exp <= now]:
                del self.data[key]
                self.dirty = True


def main() -> int:
    parser = arguments("db: key-value store over HTTP")
    parser.add_argument("--data-dir", default=os.environ.get("DB_DATA_DIR"))
    parser.add_argument("--flush-interval", type=float, default=0.5)
    args = parser.parse_args()

    app = App("db", args.port, args.host)
    store = Store(os.path.join(data_dir("db", args.data_dir), "db.json"))
    store.load()
    app.log(f"loaded {len(store.data)} keys from {store.path}")

    @app.route("GET", "/kv/{key:path}")
    def get(request: Request) -> Any:
        found, value = store.get(request.params["key"])
        if not found:
            raise HttpError(404, f"no key {request.params['key']}")
        return {"key": request.params["key"], "value": value}

    @app.route("PUT", "/kv/{key:path}")
    def put(request: Request) -> Any:
        body = request.json()
        if not isinstance(body, dict) or "value" not in body:
            raise HttpError(400, 'body must be {"value": ..., "ttl"?: seconds}')
        ttl = body.get("ttl")
        if ttl is not None and (not isinstance(ttl, int | float) or ttl <= 0):
            raise HttpError(400, "ttl must be a positive number of seconds")
        key = request.params["key"]
        created, value = store.put(key, body["value"], ttl, bool(body.get("if_absent")))
        if not created:
            return reply({"key": key, "value": value, "error": "exists"}, 409)
        return {"key": key, "value": value, "created": True}

    @app.route("DELETE", "/kv/{key:path}")
    def delete(request: Request) -> Any:
        key = request.params["key"]
        return {"key": key, "deleted": store.delete(key)}

    @app.route("POST", "/incr/{key:path}")
    def incr(request: Request) -> Any:
        body = request.json({}) or {}
        by = body.get("by", 1) if isinstance(body, dict) else 1
        if not isinstance(by, int | float) or isinstance(by, bool):
            raise HttpError(400, "by must be a number")
        key = request.params["key"]
        return {"key": key, "value": store.incr(key, by)}

    @app.route("GET", "/kv")
    def list_keys(request: Request) -> Any:
        try:
            limit = int(request.query.get("limit", "1000"))
        except ValueError:
            raise HttpError(400, "limit must be a number") from None
        return {"keys": store.keys(request.query.get("prefix", ""), limit)}

    @app.route("GET", "/stats")
    def stats(request: Request) -> Any:
        return {"keys": len(store.data), "writes": store.writes, "file": store.path}

    app.metrics.gauge("platform_db_keys", "Keys stored", lambda: len(store.data))
    app.metrics.gauge("platform_db_writes_total", "Writes since start", lambda: store.writes)

    def flush() -> None:
        store.sweep()
        store.flush()

    app.every(args.flush_interval, flush, "flush")
    app.on_stop(flush)
    return app.run()


if __name__ == "__main__":
    sys.exit(main())
