"""`autoscale:` as a HorizontalPodAutoscaler (autoscaling/v2). Pure.

- `cpu: 70%` is 70% of one core per instance in the stack file; Kubernetes' utilization
  is a share of the CPU request, so it becomes 70 / request-in-cores (140% for a 500m
  request), or an average value of 700m when the service requests no CPU.
- `memory: 80%` is a share of the memory limit, which the target sets to the request:
  an 80% utilization of the request (a memory target needs `resources.memory`).
- The router's metrics (requests_per_second, latency_p50/p99, error_rate, connections,
  queue_length) become Pods metrics of those names, averaged per pod, for a metrics
  adapter to serve.
- `custom` and `prometheus` become External metrics named `shipyard_<name>`, selected by
  `shipyard.dev/service=<service>`; their URL / query are in the HPA's
  `shipyard.dev/external-metrics` annotation (JSON), for the adapter's configuration.
"""

from __future__ import annotations

import json
import re
from typing import Any

from shipyard.k8s import objects as o
from shipyard.k8s.objects import RenderError
from shipyard.spec.autoscale import MetricKind, MetricTarget
from shipyard.spec.models import Service

MAX_WINDOW = 3600  # the API's limit for a stabilization window


def _external_name(name: str) -> str:
    return "shipyard_" + re.sub(r"[^a-z0-9_]", "_", name.lower())


def _metric(service: str, svc: Service, metric: MetricTarget,
            external: dict[str, Any]) -> dict[str, Any]:
    kind = metric.kind
    if kind == MetricKind.CPU:
        cores = svc.resources.cpu
        if cores > 0:
            target = {"type": "Utilization",
                      "averageUtilization": max(1, round(metric.target / cores))}
        else:
            target = {"type": "AverageValue",
                      "averageValue": o.cpu_quantity(metric.target / 100)}
        return {"type": "Resource", "resource": {"name": "cpu", "target": target}}
    if kind == MetricKind.MEMORY:
        if svc.resources.memory <= 0:
            raise RenderError(f"service {service}: autoscale on memory needs "
                              "resources.memory on Kubernetes (utilization is of the request)")
        return {"type": "Resource", "resource": {"name": "memory", "target": {
            "type": "Utilization", "averageUtilization": max(1, round(metric.target))}}}
    value = {"type": "AverageValue", "averageValue": o.number_quantity(metric.target)}
    if kind in (MetricKind.CUSTOM, MetricKind.PROMETHEUS):
        name = _external_name(metric.name)
        spec = metric.custom if kind == MetricKind.CUSTOM else metric.prometheus
        assert spec is not None
        external[name] = {"kind": kind.value, **spec.model_dump(exclude={"name"})}
        return {"type": "External", "external": {
            "metric": {"name": name,
                       "selector": {"matchLabels": {o.ANNOTATION_SERVICE: service}}},
            "target": value}}
    return {"type": "Pods", "pods": {"metric": {"name": kind.value}, "target": value}}


def autoscaler(meta: dict[str, Any], service: str, svc: Service,
               deployment: str) -> dict[str, Any]:
    policy = svc.autoscale
    assert policy is not None
    external: dict[str, Any] = {}
    metrics = [_metric(service, svc, metric, external) for metric in policy.metrics]
    minimum = max(1, policy.min)  # 0 needs an alpha feature gate
    if external:
        meta["annotations"][o.ANNOTATION_METRICS] = json.dumps(external, sort_keys=True)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                               "name": deployment},
            "minReplicas": minimum,
            "maxReplicas": max(policy.max, minimum),
            "metrics": metrics,
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds":
                            min(MAX_WINDOW, o.seconds(policy.up_stabilization))},
                "scaleDown": {"stabilizationWindowSeconds":
                              min(MAX_WINDOW, o.seconds(policy.down_stabilization))},
            },
        },
    }
