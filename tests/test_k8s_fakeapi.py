"""An in-memory Kubernetes API emulator for the `shipyard k8s` tests, and its own tests.

No real API server can run here, and `kmock`'s emulator (checked: 0.8) answers a
server-side apply of a new object with 404 and has no label selectors, generations,
subresources or Deployment controller. So this is a small `http.server` emulator of just
what Shipyard calls, served on 127.0.0.1 only:

- GET /version; GET, LIST (with equality label selectors), DELETE per object;
- PATCH as server-side apply (`application/apply-patch+yaml`, field manager required,
  `dryRun=All` honoured, immutable Job templates and Deployment selectors refused with
  422), JSON patch (`replace`/`add`), merge patch, and the Deployment `scale`
  subresource;
- a Deployment controller: a ReplicaSet per distinct pod template with the
  `deployment.kubernetes.io/revision` annotation (an old template brought back takes the
  next revision, as in Kubernetes), and a status that reaches "rolled out" after
  `lag` reads (or never, with ProgressDeadlineExceeded, for names in `stuck`);
- a Job controller: completes at once (or fails, for names in `failing_jobs`);
- faults: `forbidden` (verb, resource) pairs answer 403, `invalid` Kind/name answer 422.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

KINDS = {
    "configmaps": "ConfigMap", "secrets": "Secret", "services": "Service",
    "persistentvolumeclaims": "PersistentVolumeClaim", "deployments": "Deployment",
    "replicasets": "ReplicaSet", "jobs": "Job",
    "horizontalpodautoscalers": "HorizontalPodAutoscaler",
}
REVISION = "deployment.kubernetes.io/revision"


def _merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = _merge(base.get(key), value)
        return out
    return copy.deepcopy(patch)


def _json_patch(obj: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    for op in ops:
        if op["op"] not in ("replace", "add"):
            raise ValueError(f"unsupported op {op['op']}")
        *parents, last = [p.replace("~1", "/").replace("~0", "~")
                          for p in op["path"].lstrip("/").split("/")]
        node = obj
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = op["value"]
    return obj


class FakeKube:
    """The emulator; `url` once started. Thread-safe; state in `objects`."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.forbidden: set[tuple[str, str]] = set()
        self.invalid: dict[str, str] = {}
        self.stuck: set[str] = set()
        self.failing_jobs: set[str] = set()
        self.lag = 0  # reads of a Deployment before its rollout shows as complete
        self._pending: dict[tuple[str, str, str], tuple[int, dict[str, Any]]] = {}
        self._lock = threading.RLock()
        self._rv = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> FakeKube:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, payload = fake.handle(self.command, self.path,
                                              self.headers.get("Content-Type", ""), body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = do_DELETE = do_POST = do_PUT = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def kubeconfig(self, path: Path, namespace: str = "shop") -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "test-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                      "namespace": namespace}}],
        }))
        return path

    # -- helpers for tests -------------------------------------------------------------

    def get(self, plural: str, name: str, namespace: str = "shop") -> dict[str, Any] | None:
        with self._lock:
            return copy.deepcopy(self.objects.get((plural, namespace, name)))

    def names(self, plural: str, namespace: str = "shop") -> set[str]:
        with self._lock:
            return {n for (p, ns, n) in self.objects if p == plural and ns == namespace}

    def calls(self, method: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method]

    # -- the API -----------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, content_type: str,
               body: bytes) -> tuple[int, dict[str, Any]]:
        url = urlparse(raw_path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with self._lock:
            self.requests.append({"method": method, "path": url.path, "query": query,
                                  "content_type": content_type,
                                  "body": json.loads(body) if body else None})
            if url.path.rstrip("/") == "/version":
                return 200, {"major": "1", "minor": "37", "gitVersion": "v1.37.0-fake"}
            parts = url.path.strip("/").split("/")
            if parts[0] == "api":
                group, rest = "", parts[2:]
            elif parts[0] == "apis":
                group, rest = parts[1], parts[3:]
            else:
                return self._status(404, "NotFound", f"no route {url.path}")
            if len(rest) < 3 or rest[0] != "namespaces" or rest[2] not in KINDS:
                return self._status(404, "NotFound", f"no route {url.path}")
            ns, plural = rest[1], rest[2]
            name = rest[3] if len(rest) > 3 else None
            sub = rest[4] if len(rest) > 4 else None
            verb = {"GET": "get" if name else "list", "PATCH": "patch",
                    "DELETE": "delete"}.get(method, method.lower())
            if (verb, plural) in self.forbidden:
                return self._status(403, "Forbidden", (
                    f'{plural} "{name or ""}" is forbidden: User "system:serviceaccount:ci" '
                    f'cannot {verb} resource "{plural}" in API group "{group}" in the '
                    f'namespace "{ns}"'))
            if method == "GET" and name is None:
                return 200, self._list(plural, ns, query.get("labelSelector", ""))
            key = (plural, ns, name or "")
            if method == "GET":
                return self._read(key)
            if method == "DELETE":
                return self._delete(key)
            if method == "PATCH":
                return self._patch(key, sub, content_type, body, query)
            return self._status(405, "MethodNotAllowed", method)

    def _status(self, code: int, reason: str, message: str) -> tuple[int, dict[str, Any]]:
        return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                      "reason": reason, "message": message, "code": code}

    def _list(self, plural: str, ns: str, selector: str) -> dict[str, Any]:
        want = dict(item.split("=", 1) for item in selector.split(",") if "=" in item)
        items = []
        for (p, n, _), obj in sorted(self.objects.items()):
            labels = obj.get("metadata", {}).get("labels") or {}
            if p == plural and n == ns and all(labels.get(k) == v for k, v in want.items()):
                item = copy.deepcopy(obj)
                item.pop("kind", None)
                item.pop("apiVersion", None)
                items.append(item)
        return {"kind": KINDS[plural] + "List", "apiVersion": "v1",
                "metadata": {"resourceVersion": str(next(self._rv))}, "items": items}

    def _read(self, key: tuple[str, str, str]) -> tuple[int, dict[str, Any]]:
        obj = self.objects.get(key)
        if obj is None:
            return self._status(404, "NotFound", f'{key[0]} "{key[2]}" not found')
        if key in self._pending:
            reads, final = self._pending[key]
            if reads <= 1:
                del self._pending[key]
                obj["status"] = final
            else:
                self._pending[key] = (reads - 1, final)
        return 200, copy.deepcopy(obj)

    def _delete(self, key: tuple[str, str, str]) -> tuple[int, dict[str, Any]]:
        obj = self.objects.pop(key, None)
        if obj is None:
            return self._status(404, "NotFound", f'{key[0]} "{key[2]}" not found')
        if key[0] == "deployments":
            for rs_key in [k for k, v in self.objects.items() if k[0] == "replicasets"
                           and self._owner(v) == key[2] and k[1] == key[1]]:
                del self.objects[rs_key]
        self._pending.pop(key, None)
        return 200, {"kind": "Status", "status": "Success"}

    def _patch(self, key: tuple[str, str, str], sub: str | None, content_type: str,
               body: bytes, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        plural, ns, name = key
        existing = self.objects.get(key)
        if "apply-patch" in content_type:
            if not query.get("fieldManager"):
                return self._status(400, "BadRequest", "fieldManager is required for apply")
            intent = yaml.safe_load(body)
            if (ref := f'{intent.get("kind")}/{name}') in self.invalid:
                return self._status(422, "Invalid", (
                    f'{intent.get("kind")} "{name}" is invalid: {self.invalid[ref]}'))
            if intent.get("metadata", {}).get("name") != name:
                return self._status(400, "BadRequest", "name in body and URL differ")
            obj = self._applied(existing, intent, query["fieldManager"])
            if existing is not None:
                error = self._immutable(plural, existing, obj)
                if error:
                    return self._status(422, "Invalid", error)
        else:
            if existing is None:
                return self._status(404, "NotFound", f'{plural} "{name}" not found')
            patch = json.loads(body)
            if sub == "scale":
                obj = _merge(existing, {"spec": {"replicas": patch["spec"]["replicas"]}})
            elif "json-patch" in content_type:
                obj = _json_patch(existing, patch)
            else:
                obj = _merge(existing, patch)
            if obj.get("spec") != existing.get("spec"):
                obj["metadata"]["generation"] = existing["metadata"].get("generation", 1) + 1
        if query.get("dryRun") == "All":
            return 200, obj
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        obj["metadata"]["namespace"] = ns
        self.objects[key] = obj
        if plural == "deployments":
            self._reconcile_deployment(key)
        elif plural == "jobs":
            self._reconcile_job(key)
        if sub == "scale":
            return 200, {"kind": "Scale", "spec": {"replicas": obj["spec"]["replicas"]}}
        return 200, copy.deepcopy(self.objects[key])

    def _applied(self, existing: dict[str, Any] | None, intent: dict[str, Any],
                 manager: str) -> dict[str, Any]:
        obj = copy.deepcopy(intent)
        meta = obj.setdefault("metadata", {})
        if existing is None:
            meta.update(uid=str(uuid.uuid4()), generation=1,
                        creationTimestamp="2026-01-01T00:00:00Z")
        else:
            old = existing["metadata"]
            meta.update(uid=old["uid"], creationTimestamp=old["creationTimestamp"],
                        generation=old.get("generation", 1))
            annotations = {k: v for k, v in (old.get("annotations") or {}).items()
                           if k == REVISION}
            meta["annotations"] = {**annotations, **(meta.get("annotations") or {})}
            if "status" in existing:
                obj["status"] = existing["status"]
            spec = obj.get("spec") or {}
            if intent["kind"] == "Deployment" and "replicas" not in spec:
                spec["replicas"] = existing["spec"].get("replicas", 1)
            if obj.get("spec") != existing.get("spec"):
                meta["generation"] = meta["generation"] + 1
        if intent["kind"] == "Deployment":
            obj["spec"].setdefault("replicas", 1)
        meta["managedFields"] = [{"manager": manager, "operation": "Apply"}]
        return obj

    def _immutable(self, plural: str, old: dict[str, Any], new: dict[str, Any]) -> str | None:
        if plural == "jobs" and old["spec"].get("template") != new["spec"].get("template"):
            return f'Job.batch "{new["metadata"]["name"]}" is invalid: spec.template: ' \
                   "field is immutable"
        if plural == "deployments" and old["spec"]["selector"] != new["spec"]["selector"]:
            return f'Deployment.apps "{new["metadata"]["name"]}" is invalid: ' \
                   "spec.selector: field is immutable"
        return None

    # -- controllers -------------------------------------------------------------------

    @staticmethod
    def _owner(obj: dict[str, Any]) -> str | None:
        refs = obj.get("metadata", {}).get("ownerReferences") or [{}]
        return refs[0].get("name")

    def _reconcile_deployment(self, key: tuple[str, str, str]) -> None:
        dep = self.objects[key]
        _, ns, name = key
        template = dep["spec"]["template"]
        digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
        owned = {k: v for k, v in self.objects.items()
                 if k[0] == "replicasets" and k[1] == ns and self._owner(v) == name}
        revisions = [int(v["metadata"]["annotations"][REVISION]) for v in owned.values()]
        rs_key = ("replicasets", ns, f"{name}-{digest}")
        current = self.objects.get(rs_key)
        if current is None or int(current["metadata"]["annotations"][REVISION]) \
                != max(revisions, default=0):
            rs_template = copy.deepcopy(template)
            rs_template["metadata"].setdefault("labels", {})["pod-template-hash"] = digest
            self.objects[rs_key] = {
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {"name": f"{name}-{digest}", "namespace": ns,
                             "labels": rs_template["metadata"]["labels"],
                             "annotations": {REVISION: str(max(revisions, default=0) + 1)},
                             "ownerReferences": [{"apiVersion": "apps/v1",
                                                  "kind": "Deployment", "name": name,
                                                  "uid": dep["metadata"]["uid"]}]},
                "spec": {"replicas": 0, "template": rs_template,
                         "selector": dep["spec"]["selector"]},
            }
        replicas = int(dep["spec"].get("replicas", 1))
        for k in owned | {rs_key: None}:
            self.objects[k]["spec"]["replicas"] = replicas if k == rs_key else 0
        dep["metadata"].setdefault("annotations", {})[REVISION] = \
            self.objects[rs_key]["metadata"]["annotations"][REVISION]
        generation = dep["metadata"]["generation"]
        if name in self.stuck:
            dep["status"] = {"observedGeneration": generation, "replicas": replicas,
                             "updatedReplicas": 0, "availableReplicas": 0, "conditions": [
                                 {"type": "Progressing", "status": "False",
                                  "reason": "ProgressDeadlineExceeded"}]}
            return
        final = {"observedGeneration": generation, "replicas": replicas,
                 "updatedReplicas": replicas, "readyReplicas": replicas,
                 "availableReplicas": replicas, "conditions": [
                     {"type": "Progressing", "status": "True",
                      "reason": "NewReplicaSetAvailable"}]}
        if self.lag:
            dep["status"] = {"observedGeneration": generation, "replicas": replicas,
                             "updatedReplicas": max(0, replicas - 1), "availableReplicas": 0}
            self._pending[key] = (self.lag, final)
        else:
            dep["status"] = final

    def _reconcile_job(self, key: tuple[str, str, str]) -> None:
        job = self.objects[key]
        if key[2] in self.failing_jobs:
            job["status"] = {"failed": 1, "conditions": [
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                 "message": "Job has reached the specified backoff limit"}]}
        else:
            job["status"] = {"succeeded": int(job["spec"].get("completions") or 1),
                             "conditions": [{"type": "Complete", "status": "True"}]}


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    server = FakeKube().start()
    yield server
    server.stop()


# -- the emulator's own tests: it must behave like the API server for what we use --------


def test_apply_creates_then_updates_and_counts_generations(fake: FakeKube) -> None:
    """Uses the emulator: server-side apply creates, a changed spec bumps generation and
    makes a new ReplicaSet revision; an old template brought back takes the next one."""
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
           "spec": {"replicas": 2, "selector": {"matchLabels": {"a": "b"}},
                    "template": {"metadata": {"labels": {"a": "b"}},
                                 "spec": {"containers": [{"name": "c", "image": "v1"}]}}}}
    key = ("deployments", "shop", "web")
    apply = "application/apply-patch+yaml"
    path = "/apis/apps/v1/namespaces/shop/deployments/web?fieldManager=shipyard"
    assert fake.handle("PATCH", path, apply, json.dumps(dep).encode())[0] == 200
    assert fake.objects[key]["metadata"]["generation"] == 1
    v2 = copy.deepcopy(dep)
    v2["spec"]["template"]["spec"]["containers"][0]["image"] = "v2"
    fake.handle("PATCH", path, apply, json.dumps(v2).encode())
    assert fake.objects[key]["metadata"]["generation"] == 2
    assert fake.objects[key]["metadata"]["annotations"][REVISION] == "2"
    fake.handle("PATCH", path, apply, json.dumps(dep).encode())
    assert fake.objects[key]["metadata"]["annotations"][REVISION] == "3"
    assert len(fake.names("replicasets")) == 2


def test_apply_needs_a_field_manager_and_honours_dry_run(fake: FakeKube) -> None:
    """Uses the emulator: as the API server, no fieldManager is a 400; dryRun stores
    nothing."""
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {}}
    path = "/api/v1/namespaces/shop/configmaps/x"
    status, _ = fake.handle("PATCH", path, "application/apply-patch+yaml",
                            json.dumps(cm).encode())
    assert status == 400
    status, _ = fake.handle("PATCH", path + "?fieldManager=m&dryRun=All",
                            "application/apply-patch+yaml", json.dumps(cm).encode())
    assert status == 200 and fake.names("configmaps") == set()


def test_list_filters_by_label_selector(fake: FakeKube) -> None:
    """Uses the emulator: equality selectors pick objects; items carry no kind."""
    for name, label in (("a", "x"), ("b", "y")):
        obj = {"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": name, "labels": {"k": label}}}
        fake.handle("PATCH", f"/api/v1/namespaces/shop/configmaps/{name}?fieldManager=m",
                    "application/apply-patch+yaml", json.dumps(obj).encode())
    _, listed = fake.handle("GET", "/api/v1/namespaces/shop/configmaps?labelSelector=k%3Dy",
                            "", b"")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["b"]
    assert "kind" not in listed["items"][0]
