"""cache: an in-memory LRU cache over HTTP.

    GET    /cache/<key>   {"key", "value"} or 404 (a miss)
    PUT    /cache/<key>   body {"value": V, "ttl": seconds?} → {"key", "evicted"}
    DELETE /cache/<key>   {"key", "deleted"}
    POST   /flush         drop everything
    GET    /stats         {"size", "capacity", "hits", "misses", "evictions"}

At most --capacity entries (default $CACHE_CAPACITY or 1024); the least recently used
goes first. Nothing is persisted: a restart starts cold.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

from common import App, HttpError, Request, arguments


class LRU:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[str, tuple[Any, float | None]] = OrderedDict()
        self.lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str) -> tuple[bool, Any]:
        with self.lock:
            item = self.items.get(key)
            if item is not None and item[1] is not None and item[1] <= time.monotonic():
                del self.items[key]
                item = None
            if item is None:
                self.misses += 1
                return False, None
            self.items.move_to_end(key)
            self.hits += 1
            return True, item[0]

    def put(self, key: str, value: Any, ttl: float | None) -> int:
        """Store; returns how many entries were evicted to make room."""
        with self.lock:
            self.items[key] = (value, time.monotonic() + ttl if ttl else None)
            self.items.move_to_end(key)
            evicted = 0
            while len(self.items) > self.capacity:
                self.items.popitem(last=False)
                evicted += 1
            self.evictions += evicted
            return evicted

    def delete(self, key: str) -> bool:
        with self.lock:
            return self.items.pop(key, None) is not None

    def clear(self) -> int:
        with self.lock:
            count = len(self.items)
            self.items.clear()
            return count


def main() -> int:
    parser = arguments("cache: LRU cache over HTTP")
    parser.add_argument("--capacity", type=int,
                        default=int(os.environ.get("CACHE_CAPACITY") or 1024))
    args = parser.parse_args()
    app = App("cache", args.port, args.host)
    lru = LRU(max(1, args.capacity))

    @app.route("GET", "/cache/{key:path}")
    def get(request: Request) -> Any:
        found, value = lru.get(request.params["key"])
        if not found:
            raise HttpError(404, "miss")
        return {"key": request.params["key"], "value": value}

    @app.route("PUT", "/cache/{key:path}")
    def put(request: Request) -> Any:
        body = request.json()
        if not isinstance(body, dict) or "value" not in body:
            raise HttpError(400, 'body must be {"value": ..., "ttl"?: seconds}')
        ttl = body.get("ttl")
        if ttl is not None and (not isinstance(ttl, int | float) or ttl <= 0):
            raise HttpError(400, "ttl must be a positive number of seconds")
        return {"key": request.params["key"],
                "evicted": lru.put(request.params["key"], body["value"], ttl)}

    @app.route("DELETE", "/cache/{key:path}")
    def delete(request: Request) -> Any:
        return {"key": request.params["key"], "deleted": lru.delete(request.params["key"])}

    @app.route("POST", "/flush")
    def flush(request: Request) -> Any:
        return {"dropped": lru.clear()}

    @app.route("GET", "/stats")
    def stats(request: Request) -> Any:
        return {"size": len(lru.items), "capacity": lru.capacity, "hits": lru.hits,
                "misses": lru.misses, "evictions": lru.evictions}

    app.metrics.gauge("platform_cache_entries", "Entries held", lambda: len(lru.items))
    app.metrics.gauge("platform_cache_hits_total", "Lookups that hit", lambda: lru.hits)
    app.metrics.gauge("platform_cache_misses_total", "Lookups that missed", lambda: lru.misses)
    app.metrics.gauge("platform_cache_evictions_total", "Entries evicted",
                      lambda: lru.evictions)
    return app.run()


if __name__ == "__main__":
    sys.exit(main())
