"""queue: named FIFO job queues over HTTP. (The file is jobqueue.py: a queue.py in this
folder would hide the standard library's `queue` module from the services run from it.)

    POST /queues/<name>/push        body: the job (any JSON) → 201 {"id", "length"}
    POST /queues/<name>/pop?wait=s  the oldest job {"id", "queue", "payload",
                                    "enqueued_at"}, or 204 when none came within
                                    `wait` seconds (long poll, at most 5)
    GET  /queues/<name>/len         {"queue", "length"}
    GET  /queues                    {"queues": {name: length}}

A queue holds at most --max-length jobs (default $QUEUE_MAX_LENGTH or 10000); a push
beyond that is refused with 429. Jobs live in memory only: a restart drops them.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

from common import App, HttpError, Request, Response, arguments, reply

MAX_WAIT = 5.0


def main() -> int:
    parser = arguments("queue: job queues over HTTP")
    parser.add_argument("--max-length", type=int,
                        default=int(os.environ.get("QUEUE_MAX_LENGTH") or 10000))
    args = parser.parse_args()
    app = App("queue", args.port, args.host)
    queues: dict[str, deque[dict[str, Any]]] = {}
    changed = threading.Condition()

    def wake_all() -> None:
        with changed:
            changed.notify_all()

    app.on_stop(wake_all)

    @app.route("POST", "/queues/{name}/push")
    def push(request: Request) -> Any:
        payload = request.json()
        name = request.params["name"]
        job = {"id": uuid.uuid4().hex[:12], "queue": name, "payload": payload,
               "enqueued_at": time.time()}
        with changed:
            queue = queues.setdefault(name, deque())
            if len(queue) >= args.max_length:
                raise HttpError(429, f"queue {name} is full ({args.max_length} jobs)")
            queue.append(job)
            length = len(queue)
            changed.notify()
        app.metrics.inc("platform_queue_pushed_total", queue=name)
        return reply({"id": job["id"], "length": length}, 201)

    @app.route("POST", "/queues/{name}/pop", quiet=True)
    def pop(request: Request) -> Any:
        try:
            wait = min(MAX_WAIT, max(0.0, float(request.query.get("wait", "0"))))
        except ValueError:
            raise HttpError(400, "wait must be a number of seconds") from None
        name = request.params["name"]
        deadline = time.monotonic() + wait
        with changed:
            while True:
                queue = queues.get(name)
                if queue:
                    job = queue.popleft()
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or app.stopping.is_set():
                    return Response(204)
                changed.wait(min(remaining, 0.2))
        app.metrics.inc("platform_queue_popped_total", queue=name)
        return job

    @app.route("GET", "/queues/{name}/len")
    def length(request: Request) -> Any:
        name = request.params["name"]
        with changed:
            return {"queue": name, "length": len(queues.get(name, ()))}

    @app.route("GET", "/queues")
    def lengths(request: Request) -> Any:
        with changed:
            return {"queues": {name: len(queue) for name, queue in queues.items()}}

    app.metrics.describe("platform_queue_pushed_total", "counter", "Jobs pushed")
    app.metrics.describe("platform_queue_popped_total", "counter", "Jobs popped")
    app.metrics.gauge("platform_queue_length", "Jobs waiting",
                      lambda: [({"queue": n}, len(q)) for n, q in list(queues.items())])
    return app.run()


if __name__ == "__main__":
    sys.exit(main())
