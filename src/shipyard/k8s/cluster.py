"""The cluster, through the official `kubernetes` client: typed API calls per kind,
plain dicts in and out, and every failure as one line (a `ShipyardError`).

Applies are server-side (`application/apply-patch+yaml`, field manager `shipyard`,
force: Shipyard owns the fields it renders). Unreachable cluster, unauthorized and
forbidden calls exit 1; an object the API server refuses as invalid exits 2.
"""

from __future__ import annotations

import json
import os
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from shipyard.errors import InputError, ShipyardError

FIELD_MANAGER = "shipyard"
TIMEOUT = 30.0

# kind → (API class, the snake-case part of its typed methods)
KINDS: dict[str, tuple[type, str]] = {
    "ConfigMap": (k8s.CoreV1Api, "config_map"),
    "Secret": (k8s.CoreV1Api, "secret"),
    "PersistentVolumeClaim": (k8s.CoreV1Api, "persistent_volume_claim"),
    "Service": (k8s.CoreV1Api, "service"),
    "Deployment": (k8s.AppsV1Api, "deployment"),
    "ReplicaSet": (k8s.AppsV1Api, "replica_set"),
    "Job": (k8s.BatchV1Api, "job"),
    "HorizontalPodAutoscaler": (k8s.AutoscalingV2Api, "horizontal_pod_autoscaler"),
}
# What Shipyard creates, in the order it deletes them (workloads before their config).
MANAGED_KINDS = ("HorizontalPodAutoscaler", "Deployment", "Job", "Service",
                 "PersistentVolumeClaim", "Secret", "ConfigMap")


class ClusterError(ShipyardError):
    """The cluster could not do what was asked (exit code 1)."""


class Unreachable(ClusterError):
    pass


class Forbidden(ClusterError):
    pass


class Refused(InputError):
    """The API server refused an object as invalid (exit code 2)."""


def _status_message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "{}")
        return str(body.get("message") or exc.reason or exc.status)
    except (ValueError, AttributeError):
        return str(exc.reason or exc.status)


class Cluster:
    """One namespace of one cluster."""

    def __init__(self, api: k8s.ApiClient, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.host = str(api.configuration.host)
        self._apis: dict[type, Any] = {}

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None,
                namespace: str | None = None) -> Cluster:
        """From a kubeconfig file (default: $KUBECONFIG, else ~/.kube/config) and context;
        the namespace defaults to the context's, else `default`."""
        path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
        path = os.path.expanduser(path or "~/.kube/config")
        if not os.path.exists(path):
            raise InputError(f"no kubeconfig at {path}", hint="pass --kubeconfig FILE")
        try:
            contexts, current = k8s_config.list_kube_config_contexts(path)
            chosen = next((c for c in contexts if c["name"] == context), None) \
                if context else current
            if context and chosen is None:
                names = ", ".join(c["name"] for c in contexts)
                raise InputError(f"kubeconfig {path} has no context {context!r} ({names})")
            configuration = k8s.Configuration()
            k8s_config.load_kube_config(config_file=path, context=context,
                                        client_configuration=configuration,
                                        persist_config=False)
        except (ConfigException, ValueError, TypeError, KeyError) as exc:
            raise InputError(f"kubeconfig {path}: {exc}") from exc
        configuration.retries = 1  # an unreachable cluster answers fast, not after 3 tries
        namespace = namespace or ((chosen or {}).get("context") or {}).get("namespace") \
            or "default"
        return cls(k8s.ApiClient(configuration), namespace)

    # -- calls -------------------------------------------------------------------------

    def _api(self, kind: str) -> tuple[Any, str]:
        if kind not in KINDS:
            raise ClusterError(f"Shipyard does not manage {kind} objects")
        cls, snake = KINDS[kind]
        if cls not in self._apis:
            self._apis[cls] = cls(self.api)
        return self._apis[cls], snake

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("_request_timeout", TIMEOUT)
        try:
            response = fn(*args, _preload_content=False, **kwargs)
        except ApiException as exc:
            if exc.status == 0 or exc.status is None:
                raise Unreachable(f"cannot reach the cluster at {self.host}: {exc.reason}") \
                    from exc
            raise self._error(what, exc) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise Unreachable(f"cannot reach the cluster at {self.host}: {reason}") from exc
        data = response.data
        return json.loads(data) if data else {}

    def _error(self, what: str, exc: ApiException) -> ShipyardError:
        message = _status_message(exc)
        if exc.status == 401:
            return ClusterError(f"{what}: the cluster at {self.host} did not accept our "
                                f"credentials ({message})")
        if exc.status == 403:
            return Forbidden(f"{what}: forbidden: {message}")
        if exc.status in (400, 422):
            return Refused(f"{what}: the cluster refused it: {message}")
        if exc.status == 404:
            return _NotFound(f"{what}: not found: {message}")
        return ClusterError(f"{what}: {exc.status} {exc.reason}: {message}")

    def version(self) -> str:
        """The server's version; the first call every command makes (fails fast)."""
        api = k8s.VersionApi(self.api)
        return str(self._call("version", api.get_code, _request_timeout=10).get(
            "gitVersion", "?"))

    def apply(self, obj: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        kind, name = obj["kind"], obj["metadata"]["name"]
        api, snake = self._api(kind)
        return self._call(
            f"apply {kind}/{name}", getattr(api, f"patch_namespaced_{snake}"), name,
            self.namespace, obj, field_manager=FIELD_MANAGER, force=True,
            dry_run="All" if dry_run else None, _content_type="application/apply-patch+yaml")

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        api, snake = self._api(kind)
        try:
            return self._call(f"read {kind}/{name}", getattr(api, f"read_namespaced_{snake}"),
                              name, self.namespace)
        except _NotFound:
            return None

    def list(self, kind: str, selector: str) -> list[dict[str, Any]]:
        api, snake = self._api(kind)
        data = self._call(f"list {kind}", getattr(api, f"list_namespaced_{snake}"),
                          self.namespace, label_selector=selector)
        items = data.get("items") or []
        for item in items:  # a list's items carry no kind
            item.setdefault("kind", kind)
        return items

    def delete(self, kind: str, name: str) -> bool:
        api, snake = self._api(kind)
        try:
            self._call(f"delete {kind}/{name}", getattr(api, f"delete_namespaced_{snake}"),
                       name, self.namespace, body={"propagationPolicy": "Background"})
        except _NotFound:
            return False
        return True

    def scale(self, name: str, replicas: int) -> dict[str, Any]:
        api, _ = self._api("Deployment")
        return self._call(f"scale Deployment/{name}", api.patch_namespaced_deployment_scale,
                          name, self.namespace, {"spec": {"replicas": replicas}},
                          _content_type="application/merge-patch+json")

    def replace_template(self, name: str, template: dict[str, Any]) -> dict[str, Any]:
        """Put `template` in a Deployment (a rollback), as `kubectl rollout undo` does."""
        api, _ = self._api("Deployment")
        ops = [{"op": "replace", "path": "/spec/template", "value": template}]
        return self._call(f"roll back Deployment/{name}", api.patch_namespaced_deployment,
                          name, self.namespace, ops,
                          _content_type="application/json-patch+json")


class _NotFound(ClusterError):
    pass
