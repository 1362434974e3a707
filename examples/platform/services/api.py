"""api: the platform's HTTP API; runs as several replicas.

    GET    /api                  what this is and which instance answered
    GET    /api/items            {"items": [key, ...]}
    GET    /api/items/<key>      {"key", "value", "source": "cache" | "db"} (read-through)
    PUT    /api/items/<key>      body {"value": V} → {"key", "value"}        (writer)
    DELETE /api/items/<key>      {"key", "deleted"}                          (writer)
    POST   /api/jobs             body {"kind": ..., ...} → 202 {"id", "status"} (writer)
    GET    /api/jobs/<id>        the job's record: queued, then done or failed
    GET    /api/stats            job counters, queue length, item count
    GET    /api/whoami           the token's user and roles

Items live in db under `items/<key>` and are cached in cache for `$API_CACHE_TTL` seconds
(default 30); a write invalidates the cached copy. Without `$CACHE_URL` (or while cache is
down) reads go straight to db. With `$AUTH_URL` set, writes need a token from auth
(`Authorization: Bearer ...`) whose roles include `writer`; `API_REQUIRE_AUTH=false`
turns that off. `/ready` answers 200 once db answers and its schema is at the version
migrate writes.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

from common import (
    SCHEMA_VERSION,
    App,
    HttpError,
    Request,
    Unavailable,
    Upstream,
    arguments,
    quote,
    reply,
)

TOKEN_CACHE_SECONDS = 5.0
JOB_RECORD_TTL = 600


def main() -> int:
    parser = arguments("api: the platform API")
    args = parser.parse_args()
    app = App("api", args.port, args.host)
    db = Upstream("db")
    cache = Upstream("cache", timeout=0.5, attempts=1)
    auth = Upstream("auth", timeout=1.0)
    queue = Upstream("queue", timeout=1.0)
    cache_ttl = float(os.environ.get("API_CACHE_TTL") or 30)
    require_auth = auth.configured and (
        os.environ.get("API_REQUIRE_AUTH", "true").lower() not in ("0", "false", "no"))
    tokens: dict[str, tuple[dict[str, Any], float]] = {}
    tokens_lock = threading.Lock()

    if not db.configured:
        app.log("no db address: set DB_URL")
        return 2

    migrated = [False]  # once the schema is there, readiness only asks db /health

    def schema_ready() -> tuple[bool, str]:
        if migrated[0]:
            return db.check()
        try:
            status, body = db.get("/kv/schema/version", attempts=1, timeout=0.5)
        except Unavailable as exc:
            return False, str(exc)
        version = body["value"] if status == 200 else 0
        if version < SCHEMA_VERSION:
            return False, f"db schema at version {version}, waiting for {SCHEMA_VERSION}"
        migrated[0] = True
        return True, f"db reachable, schema version {version}"

    app.ready_when("db", schema_ready)

    # -- helpers -------------------------------------------------------------------------

    def identify(request: Request) -> dict[str, Any]:
        token = request.bearer()
        if not token:
            raise HttpError(401, "this needs a token: POST /auth/token through the gateway")
        now = time.monotonic()
        with tokens_lock:
            cached = tokens.get(token)
        if cached and cached[1] > now:
            return cached[0]
        status, body = auth.get("/validate", headers={"Authorization": f"Bearer {token}"})
        if status == 401:
            raise HttpError(401, (body or {}).get("error", "invalid token"))
        if status != 200:
            raise HttpError(503, f"auth answered {status}")
        with tokens_lock:
            if len(tokens) > 10000:
                tokens.clear()
            tokens[token] = (body, now + TOKEN_CACHE_SECONDS)
        return body

    def writer(request: Request) -> str:
        if not require_auth:
            return "anonymous"
        claims = identify(request)
        if "writer" not in claims.get("roles", []):
            raise HttpError(403, f"{claims.get('user')} may not write")
        return claims["user"]

    def cache_call(method: str, key: str, body: Any = None) -> tuple[int, Any] | None:
        if not cache.configured:
            return None
        try:
            return cache.request(method, f"/cache/{quote(key)}", body)
        except Unavailable:
            app.metrics.inc("platform_api_cache_errors_total")
            return None

    def item_key(request: Request) -> str:
        return "items/" + request.params["key"]

    # -- routes --------------------------------------------------------------------------

    @app.route("GET", "/api")
    def index(request: Request) -> Any:
        return {"service": "api", "instance": app.instance,
                "auth": "required for writes" if require_auth else "off",
                "cache": "on" if cache.configured else "off",
                "jobs": "on" if queue.configured else "off"}

    @app.route("GET", "/api/items")
    def list_items(request: Request) -> Any:
        status, body = db.get("/kv?prefix=items/")
        if status != 200:
            raise HttpError(502, f"db answered {status}")
        return {"items": [key.removeprefix("items/") for key in body["keys"]]}

    @app.route("GET", "/api/items/{key:path}")
    def get_item(request: Request) -> Any:
        key = item_key(request)
        hit = cache_call("GET", key)
        if hit and hit[0] == 200:
            app.metrics.inc("platform_api_reads_total", source="cache")
            return {"key": request.params["key"], "value": hit[1]["value"], "source": "cache",
                    "instance": app.instance}
        status, body = db.get(f"/kv/{quote(key)}")
        if status == 404:
            raise HttpError(404, f"no item {request.params['key']}")
        if status != 200:
            raise HttpError(502, f"db answered {status}")
        cache_call("PUT", key, {"value": body["value"], "ttl": cache_ttl})
        app.metrics.inc("platform_api_reads_total", source="db")
        return {"key": request.params["key"], "value": body["value"], "source": "db",
                "instance": app.instance}

    @app.route("PUT", "/api/items/{key:path}")
    def put_item(request: Request) -> Any:
        user = writer(request)
        body = request.json()
        if not isinstance(body, dict) or "value" not in body:
            raise HttpError(400, 'body must be {"value": ...}')
        key = item_key(request)
        status, stored = db.put(f"/kv/{quote(key)}", {"value": body["value"]})
        if status != 200:
            raise HttpError(502, f"db answered {status}: {stored}")
        cache_call("DELETE", key)
        app.metrics.inc("platform_api_writes_total")
        app.log(f"{user} wrote {key}")
        return {"key": request.params["key"], "value": stored["value"],
                "instance": app.instance}

    @app.route("DELETE", "/api/items/{key:path}")
    def delete_item(request: Request) -> Any:
        writer(request)
        key = item_key(request)
        status, body = db.delete(f"/kv/{quote(key)}")
        if status != 200:
            raise HttpError(502, f"db answered {status}")
        cache_call("DELETE", key)
        return {"key": request.params["key"], "deleted": body["deleted"]}

    @app.route("POST", "/api/jobs")
    def submit_job(request: Request) -> Any:
        user = writer(request)
        if not queue.configured:
            raise HttpError(503, "jobs are off: no queue (set QUEUE_URL)")
        job = request.json()
        if not isinstance(job, dict) or not isinstance(job.get("kind"), str):
            raise HttpError(400, 'body must be {"kind": ..., ...}')
        job_id = uuid.uuid4().hex[:12]
        record = {"id": job_id, "status": "queued", "job": job, "by": user,
                  "submitted_at": time.time()}
        db.put(f"/kv/jobs/{job_id}", {"value": record, "ttl": JOB_RECORD_TTL})
        status, body = queue.post("/queues/jobs/push", {**job, "job_id": job_id})
        if status != 201:
            raise HttpError(502, f"queue answered {status}: {body}")
        app.metrics.inc("platform_api_jobs_submitted_total")
        return reply({"id": job_id, "status": "queued"}, 202)

    @app.route("GET", "/api/jobs/{id}")
    def get_job(request: Request) -> Any:
        status, body = db.get(f"/kv/jobs/{quote(request.params['id'])}")
        if status == 404:
            raise HttpError(404, f"no job {request.params['id']} (records last "
                                 f"{JOB_RECORD_TTL}s)")
        if status != 200:
            raise HttpError(502, f"db answered {status}")
        return body["value"]

    @app.route("GET", "/api/stats")
    def stats(request: Request) -> Any:
        out: dict[str, Any] = {"instance": app.instance}
        for name in ("jobs_done", "jobs_failed"):
            status, body = db.get(f"/kv/stats/{name}")
            out[name] = body["value"] if status == 200 else 0
        status, body = db.get("/kv?prefix=items/")
        out["items"] = len(body["keys"]) if status == 200 else None
        out["queue_length"] = None
        if queue.configured:
            try:
                status, body = queue.get("/queues/jobs/len", attempts=1, timeout=0.5)
                out["queue_length"] = body["length"] if status == 200 else None
            except Unavailable:
                pass
        status, body = db.get("/kv/reports/latest")
        out["last_report"] = body["value"] if status == 200 else None
        return out

    @app.route("GET", "/api/whoami")
    def whoami(request: Request) -> Any:
        if not auth.configured:
            return {"user": "anonymous", "roles": [], "auth": "off"}
        return identify(request)

    app.metrics.describe("platform_api_reads_total", "counter", "Item reads by source")
    app.metrics.describe("platform_api_writes_total", "counter", "Item writes")
    app.metrics.describe("platform_api_jobs_submitted_total", "counter", "Jobs submitted")
    app.metrics.describe("platform_api_cache_errors_total", "counter",
                         "Cache calls that failed (served from db instead)")
    return app.run()


if __name__ == "__main__":
    sys.exit(main())
