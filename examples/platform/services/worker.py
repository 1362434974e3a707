"""worker: takes jobs from the queue, runs them, records the outcome in db.

Job kinds (the payload pushed to queue `jobs`):

    {"kind": "sum", "numbers": [1, 2, 3]}   → {"sum": 6}
    {"kind": "square", "n": 12}             → {"square": 144}
    {"kind": "sleep", "seconds": 0.3}       → simulated work (at most 0.5 s)
    {"kind": "report"}                      → counts items and jobs, writes reports/latest
    {"kind": "fail"}                        → fails on purpose

The outcome goes to `jobs/<id>` (status done or failed, kept 10 minutes) and the counters
`stats/jobs_done` / `stats/jobs_failed`. A job popped but not finished when the worker
dies is lost (the queue has no acknowledgements). --concurrency threads pull in parallel.

The worker serves its own /health, /ready (200 once queue and db answer) and /metrics.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

from common import App, Request, Unavailable, Upstream, arguments

RECORD_TTL = 600
POP_WAIT = 0.5


def run_job(payload: dict[str, Any], db: Upstream, stop: threading.Event) -> dict[str, Any]:
    kind = payload.get("kind")
    if kind == "sum":
        return {"sum": sum(float(n) for n in payload.get("numbers", []))}
    if kind == "square":
        n = float(payload["n"])
        return {"square": n * n}
    if kind == "sleep":
        stop.wait(min(0.5, max(0.0, float(payload.get("seconds", 0.1)))))
        return {"slept": True}
    if kind == "report":
        _, items = db.get("/kv?prefix=items/")
        counts = {}
        for name in ("jobs_done", "jobs_failed"):
            status, body = db.get(f"/kv/stats/{name}")
            counts[name] = body["value"] if status == 200 else 0
        report = {"items": len(items["keys"]), **counts, "at": time.time()}
        db.put("/kv/reports/latest", {"value": report})
        return report
    if kind == "fail":
        raise ValueError("failed on purpose")
    raise ValueError(f"unknown job kind {kind!r}")


def main() -> int:
    parser = arguments("worker: runs jobs from the queue")
    parser.add_argument("--queue", default=os.environ.get("WORKER_QUEUE") or "jobs")
    parser.add_argument("--concurrency", type=int,
                        default=int(os.environ.get("WORKER_CONCURRENCY") or 1))
    args = parser.parse_args()
    app = App("worker", args.port, args.host)
    queue = Upstream("queue", timeout=POP_WAIT + 1.0, attempts=1)
    db = Upstream("db")
    busy = [0]
    busy_lock = threading.Lock()
    if not queue.configured or not db.configured:
        app.log("needs QUEUE_URL and DB_URL")
        return 2
    app.ready_when_up(queue, db)

    def handle(job: dict[str, Any]) -> None:
        payload = job.get("payload") if isinstance(job.get("payload"), dict) else {}
        job_id = payload.get("job_id") or job["id"]
        started = time.monotonic()
        try:
            result = run_job(payload, db, app.stopping)
            status, error = "done", None
        except Unavailable:
            raise
        except Exception as exc:
            result, status, error = None, "failed", str(exc)
        elapsed = time.monotonic() - started
        record = {"id": job_id, "status": status, "job": payload, "result": result,
                  "error": error, "worker": app.instance, "seconds": round(elapsed, 4),
                  "finished_at": time.time()}
        db.put(f"/kv/jobs/{job_id}", {"value": record, "ttl": RECORD_TTL})
        db.post(f"/incr/stats/jobs_{status}")
        app.metrics.inc("platform_worker_jobs_total", kind=str(payload.get("kind")),
                        status=status)
        app.log(f"job {job_id} {payload.get('kind')} {status} in {elapsed * 1000:.1f}ms"
                + (f": {error}" if error else ""))

    def pull() -> None:
        while not app.stopping.is_set():
            try:
                status, job = queue.post(f"/queues/{args.queue}/pop?wait={POP_WAIT}")
            except Unavailable:
                app.stopping.wait(0.5)  # queue down or restarting: try again shortly
                continue
            if status == 204 or not isinstance(job, dict):
                continue
            with busy_lock:
                busy[0] += 1
            try:
                handle(job)
            except Unavailable as exc:
                app.log(f"lost job {job.get('id')}: db unavailable: {exc}")
                app.stopping.wait(0.5)
            finally:
                with busy_lock:
                    busy[0] -= 1

    for index in range(max(1, args.concurrency)):
        app.background(pull, f"pull-{index}")

    @app.route("GET", "/status")
    def status(request: Request) -> Any:
        return {"instance": app.instance, "busy": busy[0], "queue": args.queue,
                "concurrency": args.concurrency}

    app.metrics.describe("platform_worker_jobs_total", "counter", "Jobs run, by outcome")
    app.metrics.gauge("platform_worker_busy", "Jobs running now", lambda: busy[0])
    return app.run()


if __name__ == "__main__":
    sys.exit(main())
