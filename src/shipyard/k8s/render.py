"""A stack as Kubernetes manifests: pure, no I/O.

Per service, in the order they are applied: a ConfigMap (plain env), a Secret (env named
secret), a PersistentVolumeClaim (`resources.disk`), a Service (its ports), the workload
(a Deployment; a Job for a one-shot that a dependent waits on with `completed`) and a
HorizontalPodAutoscaler (`autoscale`). docs/kubernetes.md maps every stack field.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import SecretStr

from shipyard.errors import PlanError
from shipyard.k8s import objects as o
from shipyard.k8s.hpa import autoscaler
from shipyard.k8s.objects import RenderError
from shipyard.k8s.strategies import Color
from shipyard.plan.graph import DependencyGraph
from shipyard.spec.models import Condition, RestartMode, Service, Stack
from shipyard.spec.update import UpdateStrategy

ExposeType = Literal["LoadBalancer", "NodePort", "ClusterIP"]


@dataclass(frozen=True)
class RenderOptions:
    """What the stack file does not say about a cluster.

    `images`: an image per service (overrides `image:`); `default_image`: for services
    with only a `command` (run in that image). `secret_env`: env names rendered into a
    Secret instead of the ConfigMap, `NAME` for any service or `service.NAME` for one.
    `colors`: blue-green — the colour that gets the Deployment (default blue);
    `selectors`: the colour the Service selects (default: the one deployed).
    `secrets`: the values of the stack's `secrets:` (by name), resolved by the caller:
    what a service's `secrets:` uses goes into its Secret, never into a ConfigMap."""

    namespace: str | None = None
    images: Mapping[str, str] = field(default_factory=dict)
    default_image: str | None = None
    expose_type: ExposeType = "LoadBalancer"
    secret_env: frozenset[str] = frozenset()
    wait_image: str = "busybox:1.36"
    auto_port_base: int = 8080
    data_path: str = "/data"
    colors: Mapping[str, Color] = field(default_factory=dict)
    selectors: Mapping[str, Color] = field(default_factory=dict)
    secrets: Mapping[str, SecretStr] = field(default_factory=dict)


@dataclass(frozen=True)
class ServiceManifests:
    """One service's objects in apply order; `workload` is its Deployment or Job."""

    service: str
    name: str  # the Kubernetes name (`user_db` → `user-db`)
    strategy: UpdateStrategy
    workload: dict[str, Any]
    objects: list[dict[str, Any]]
    template_hash: str

    @property
    def is_job(self) -> bool:
        return self.workload["kind"] == "Job"

    def of_kind(self, kind: str) -> dict[str, Any] | None:
        return next((obj for obj in self.objects if obj["kind"] == kind), None)


@dataclass(frozen=True)
class Manifests:
    stack: str
    namespace: str | None
    phases: list[list[str]]  # service names, in dependency order
    services: dict[str, ServiceManifests]

    def objects(self) -> list[dict[str, Any]]:
        """Every object, in dependency order (phase by phase)."""
        return [obj for phase in self.phases for name in phase
                for obj in self.services[name].objects]


@dataclass(frozen=True)
class _Endpoint:
    host: str
    port: int | None  # the Service port of its first port


def render_stack(stack: Stack, options: RenderOptions | None = None) -> Manifests:
    """Every object of `stack`. Raises RenderError (one line, naming the service and the
    field) for what this target cannot express, PlanError for a bad dependency graph."""
    options = options or RenderOptions()
    graph = DependencyGraph.from_stack(stack)
    jobs = _job_services(stack)
    ports = {name: o.assign_ports(svc.ports, options.auto_port_base)
             for name, svc in stack.services.items()}
    names = {name: o.k8s_name(name) for name in stack.services}
    clash = _first_clash(names)
    if clash:
        raise RenderError(f"services {clash[0]} and {clash[1]} have the same Kubernetes "
                          f"name {names[clash[0]]!r}")
    endpoints: dict[str, _Endpoint] = {}
    for name, svc in stack.services.items():
        if name in jobs or not svc.ports:
            continue
        host = names[name] if options.namespace is None else \
            f"{names[name]}.{options.namespace}.svc"
        first = next(iter(ports[name].values()))
        endpoints[name] = _Endpoint(host, svc.expose or first)
    services = {
        name: _render_service(stack, name, options, ports[name], endpoints, name in jobs)
        for name in stack.services
    }
    return Manifests(stack.name, options.namespace, graph.phases(), services)


def _first_clash(names: Mapping[str, str]) -> tuple[str, str] | None:
    seen: dict[str, str] = {}
    for service, name in names.items():
        if name in seen:
            return seen[name], service
        seen[name] = service
    return None


def _job_services(stack: Stack) -> set[str]:
    """Services something waits on with `completed`: they run as Jobs."""
    jobs: set[str] = set()
    for name, svc in stack.services.items():
        for dep, condition in svc.conditions.items():
            if condition != Condition.COMPLETED:
                continue
            target = stack.services.get(dep)
            if target is None:
                raise PlanError(f"service {name} depends on unknown service {dep}")
            if target.restart.policy == RestartMode.ALWAYS:
                raise RenderError(f"service {name} waits for {dep} to complete, but {dep} "
                                  "restarts always: it cannot run as a Kubernetes Job")
            jobs.add(dep)
    return jobs


def _meta(stack: Stack, service: str, name: str, options: RenderOptions,
          svc: Service | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": o.labels(stack.name, service, svc),
                            "annotations": {o.ANNOTATION_SERVICE: service}}
    if options.namespace is not None:
        meta["namespace"] = options.namespace
    return meta


def _image(service: str, svc: Service, options: RenderOptions) -> str:
    image = options.images.get(service) or svc.image or options.default_image
    if not image:
        raise RenderError(f"service {service} has only a command: the Kubernetes target needs "
                          f"an image (add `image:` or pass --image-for {service}=IMAGE)")
    return image


def _is_secret(service: str, key: str, options: RenderOptions) -> bool:
    return key in options.secret_env or f"{service}.{key}" in options.secret_env


def _render_service(stack: Stack, service: str, options: RenderOptions,
                    ports: dict[str, int], endpoints: Mapping[str, _Endpoint],
                    is_job: bool) -> ServiceManifests:
    svc = stack.services[service]
    name = o.k8s_name(service)
    port_names = {p: o.port_name(service, p) for p in ports}
    out: list[dict[str, Any]] = []

    # env: what the runtime injects, then the user's (plain → ConfigMap, secret → Secret,
    # values that refer to other variables → the container's own env, in order)
    injected: list[dict[str, Any]] = []
    if ports:
        injected.append({"name": "PORT", "value": str(next(iter(ports.values())))})
    injected += [{"name": f"PORT_{o.env_name(p)}", "value": str(n)} for p, n in ports.items()]
    injected += [{"name": "SHIPYARD_STACK", "value": stack.name},
                 {"name": "SHIPYARD_SERVICE", "value": service},
                 {"name": "SHIPYARD_INSTANCE",
                  "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    for dep in svc.depends_on:
        if (endpoint := endpoints.get(dep)) is None:
            continue
        key = o.env_name(dep)
        injected.append({"name": f"{key}_HOST", "value": endpoint.host})
        if endpoint.port is not None:
            injected.append({"name": f"{key}_PORT", "value": str(endpoint.port)})
            injected.append({"name": f"{key}_URL",
                             "value": f"http://{endpoint.host}:{endpoint.port}"})
    if svc.resources.disk > 0:
        injected.append({"name": "SHIPYARD_DATA", "value": options.data_path})
    plain: dict[str, str] = {}
    secret: dict[str, str] = {}
    direct: list[dict[str, Any]] = []
    injected_names = {item["name"] for item in injected}
    for key, value in svc.env.items():
        o.check_env_name(service, key)
        if _is_secret(service, key, options):
            secret[key] = value
        elif o.has_vars(value) or key in injected_names:
            direct.append({"name": key, "value": value})
        else:
            plain[key] = value
    files: dict[str, str] = {}
    mounts = _secret_uses(service, svc, options, secret, files, injected)
    overridden = {item["name"] for item in direct}
    env = [item for item in injected if item["name"] not in overridden]
    known = {item["name"] for item in env} | set(plain) | set(secret)
    for item in direct:
        item["value"] = o.to_k8s_vars(service, f"env.{item['name']}", item["value"], known)
        env.append(item)
        known.add(item["name"])
    env_from: list[dict[str, Any]] = []
    if plain:
        out.append({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": _meta(stack, service, f"{name}-env", options), "data": plain})
        env_from.append({"configMapRef": {"name": f"{name}-env"}})
    if secret:
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in secret.items()}
        out.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": _meta(stack, service, f"{name}-secret", options),
                    "data": encoded})
        env_from.append({"secretRef": {"name": f"{name}-secret"}})

    container: dict[str, Any] = {"name": name, "image": _image(service, svc, options)}
    if svc.command is not None:
        argv = [o.to_k8s_vars(service, "command", arg, known) for arg in svc.command]
        if svc.shell:
            argv = ["/bin/sh", "-c", " ".join(argv)]
        container["command"] = argv[:1]
        if argv[1:]:
            container["args"] = argv[1:]
    if svc.workdir and svc.workdir.startswith("/"):
        container["workingDir"] = svc.workdir
    if ports:
        container["ports"] = [{"name": port_names[p], "containerPort": n, "protocol": "TCP"}
                              for p, n in ports.items()]
    if env:
        container["env"] = env
    if env_from:
        container["envFrom"] = env_from
    if resources := o.resources(svc):
        container["resources"] = resources
    if svc.health.readiness is not None:
        container["readinessProbe"] = o.probe(service, "readiness", svc.health.readiness,
                                              port_names)
    if svc.health.liveness is not None:
        container["livenessProbe"] = o.probe(service, "liveness", svc.health.liveness,
                                             port_names)
    pod: dict[str, Any] = {"containers": [container],
                           "terminationGracePeriodSeconds": o.seconds(svc.stop.timeout)}
    if files:  # file secrets: a Secret of their own, each key mounted at its path
        out.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": _meta(stack, service, f"{name}-secret-files", options),
                    "data": {k: base64.b64encode(v.encode()).decode()
                             for k, v in files.items()}})
        container["volumeMounts"] = mounts
        pod["volumes"] = [{"name": "shipyard-secrets",
                           "secret": {"secretName": f"{name}-secret-files",
                                      "defaultMode": 0o400}}]
    if svc.resources.disk > 0:
        out.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "metadata": _meta(stack, service, f"{name}-data", options),
                    "spec": {"accessModes": ["ReadWriteOnce"],
                             "resources": {"requests": {
                                 "storage": o.size_quantity(svc.resources.disk)}}}})
        container.setdefault("volumeMounts", []).append(
            {"name": "data", "mountPath": options.data_path})
        pod.setdefault("volumes", []).append(
            {"name": "data", "persistentVolumeClaim": {"claimName": f"{name}-data"}})
    if init := _wait_containers(svc, endpoints, options):
        pod["initContainers"] = init

    config_hash = o.content_hash([plain, secret, *([files] if files else [])])
    if is_job:
        workload = _job(stack, service, name, svc, pod, config_hash, options)
        return ServiceManifests(service, name, svc.update.strategy, workload, [*out, workload],
                                workload["metadata"]["annotations"][o.ANNOTATION_HASH])

    if ports:
        out.append(_service_object(stack, service, name, svc, ports, port_names, options))
    workload = _deployment(stack, service, name, svc, pod, config_hash, options)
    out.append(workload)
    if svc.autoscale is not None:
        out.append(autoscaler(_meta(stack, service, name, options), service, svc,
                              workload["metadata"]["name"]))
    return ServiceManifests(service, name, svc.update.strategy, workload, out,
                            workload["metadata"]["annotations"][o.ANNOTATION_HASH])


def _secret_uses(service: str, svc: Service, options: RenderOptions, secret: dict[str, str],
                 files: dict[str, str], injected: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A service's `secrets:`: env uses become keys of its env Secret (`secret`); file
    uses keys of its file Secret (`files`), each mounted read-only at its path, with the
    path in its variable (added to `injected`). Returns the volumeMounts."""
    mounts: list[dict[str, Any]] = []
    for use in getattr(svc, "secrets", None) or []:
        value = options.secrets.get(use.name)
        if value is None:
            raise RenderError(f"service {service}: secret {use.name} has no value to render "
                              "(its source cannot be read here)")
        if use.env is not None:
            secret[use.env] = value.get_secret_value()
            continue
        files[use.name] = value.get_secret_value()
        mounts.append({"name": "shipyard-secrets", "mountPath": use.file,
                       "subPath": use.name, "readOnly": True})
        injected.append({"name": use.path_variable, "value": use.file})
    return mounts


def _wait_containers(svc: Service, endpoints: Mapping[str, _Endpoint],
                     options: RenderOptions) -> list[dict[str, Any]]:
    """`healthy`: wait until the dependency's Service accepts a connection (a ClusterIP
    only forwards to ready pods); `started`: until its Service name resolves."""
    out = []
    for dep, condition in svc.conditions.items():
        endpoint = endpoints.get(dep)
        if endpoint is None or condition == Condition.COMPLETED:
            continue  # Jobs and port-less services: ordered by `k8s apply` instead
        if condition == Condition.HEALTHY:
            check = f"nc -z -w 2 {endpoint.host} {endpoint.port}"
        else:
            check = f"nslookup {endpoint.host} >/dev/null 2>&1"
        script = f"until {check}; do echo waiting for {dep}; sleep 2; done"
        out.append({"name": f"wait-{o.k8s_name(dep)}"[:63], "image": options.wait_image,
                    "command": ["sh", "-c", script]})
    return out


def _pod_template(stack: Stack, service: str, svc: Service, pod: dict[str, Any],
                  config_hash: str, extra: Mapping[str, str]) -> dict[str, Any]:
    return {"metadata": {"labels": {**o.labels(stack.name, service, svc), **extra},
                         # a changed ConfigMap/Secret rolls the pods too
                         "annotations": {"shipyard.dev/config-hash": config_hash}},
            "spec": pod}


def _deployment(stack: Stack, service: str, name: str, svc: Service, pod: dict[str, Any],
                config_hash: str, options: RenderOptions) -> dict[str, Any]:
    update = svc.update
    extra: dict[str, str] = {}
    deploy_name = name
    if update.strategy == UpdateStrategy.BLUE_GREEN:
        color = options.colors.get(service, "blue")
        extra[o.LABEL_COLOR] = color
        deploy_name = f"{name}-{color}"
    elif update.strategy == UpdateStrategy.CANARY:
        extra[o.LABEL_TRACK] = "stable"
    template = _pod_template(stack, service, svc, pod, config_hash, extra)
    # the hash of what runs, whatever colour or track it runs as
    unmarked = copy.deepcopy(template)
    for key in (o.LABEL_COLOR, o.LABEL_TRACK):
        unmarked["metadata"]["labels"].pop(key, None)
    meta = _meta(stack, service, deploy_name, options, svc)
    meta["annotations"][o.ANNOTATION_HASH] = o.content_hash(unmarked)
    min_ready = o.seconds(update.min_ready)
    spec: dict[str, Any] = {
        "selector": {"matchLabels": {**o.selector(stack.name, service), **extra}},
        "template": template,
        "minReadySeconds": min_ready,
        "progressDeadlineSeconds": max(o.seconds(update.progress_deadline), min_ready + 1),
        "revisionHistoryLimit": stack.deploy.revision_history_limit,
    }
    if svc.autoscale is None:  # else the HPA owns the count: apply must not reset it
        spec["replicas"] = svc.replicas
    if update.strategy == UpdateStrategy.RECREATE:
        spec["strategy"] = {"type": "Recreate"}
    else:
        spec["strategy"] = {"type": "RollingUpdate", "rollingUpdate": {
            "maxSurge": update.max_surge, "maxUnavailable": update.max_unavailable}}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}


def _job(stack: Stack, service: str, name: str, svc: Service, pod: dict[str, Any],
         config_hash: str, options: RenderOptions) -> dict[str, Any]:
    """A one-shot as a Job named after its template's hash: a Job's template cannot
    change, so a changed one-shot is a new Job (the old one is pruned)."""
    pod = {**pod, "restartPolicy": "Never" if svc.restart.policy == RestartMode.NO
           else "OnFailure"}
    template = _pod_template(stack, service, svc, pod, config_hash, {})
    digest = o.content_hash(template)
    if len(name) > 52:
        raise RenderError(f"service {service}: a one-shot's name must be at most 52 "
                          "characters on Kubernetes (its Job adds a hash)")
    meta = _meta(stack, service, f"{name}-{digest}", options, svc)
    meta["annotations"][o.ANNOTATION_HASH] = digest
    limit = svc.restart.max_restarts
    spec: dict[str, Any] = {"backoffLimit": 6 if limit is None else limit,
                            "template": template}
    if svc.replicas > 1:
        spec["completions"] = spec["parallelism"] = svc.replicas
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def _service_object(stack: Stack, service: str, name: str, svc: Service,
                    ports: dict[str, int], port_names: dict[str, str],
                    options: RenderOptions) -> dict[str, Any]:
    items = []
    for index, (port, number) in enumerate(ports.items()):
        public = svc.expose if index == 0 and svc.expose else number
        items.append({"name": port_names[port], "port": public,
                      "targetPort": port_names[port], "protocol": "TCP"})
    select = o.selector(stack.name, service)
    if svc.update.strategy == UpdateStrategy.BLUE_GREEN:
        select[o.LABEL_COLOR] = options.selectors.get(
            service, options.colors.get(service, "blue"))
    spec: dict[str, Any] = {"selector": select, "ports": items}
    spec["type"] = options.expose_type if svc.expose else "ClusterIP"
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(stack, service, name, options), "spec": spec}


def canary_deployment(stable: dict[str, Any], replicas: int) -> dict[str, Any]:
    """The canary Deployment beside a canary-strategy service's stable one: the same
    (new) template, `<name>-canary`, its pods marked track=canary, `replicas` of them."""
    out = copy.deepcopy(stable)
    out["metadata"]["name"] = f"{stable['metadata']['name']}-canary"
    out["spec"]["selector"]["matchLabels"][o.LABEL_TRACK] = "canary"
    out["spec"]["template"]["metadata"]["labels"][o.LABEL_TRACK] = "canary"
    out["spec"]["replicas"] = replicas
    return out
