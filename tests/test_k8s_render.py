"""Rendering a stack to Kubernetes manifests, and strict validation of what is rendered
against the official schemas of several Kubernetes versions (offline, kubernetes-validate).
"""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shipyard.k8s import objects as o
from shipyard.k8s.objects import RenderError
from shipyard.k8s.render import Manifests, RenderOptions, canary_deployment, render_stack
from shipyard.k8s.validate import DEFAULT_VERSIONS, ManifestInvalid, bundled_versions, check
from shipyard.k8s.validate import problems as schema_problems
from shipyard.spec.loader import load_stack, parse_stack
from shipyard.spec.models import Stack

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "platform" / "shipyard.yaml"
IMAGE = RenderOptions(default_image="python:3.11-slim")


def kinds(manifests: Manifests, service: str) -> dict[str, dict[str, Any]]:
    return {obj["kind"]: obj for obj in manifests.services[service].objects}


def container(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]["containers"][0]


def env_of(workload: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(workload)["env"]}


def stack(text: str) -> Any:
    return parse_stack(text)


# -- the example platform -------------------------------------------------------------


def test_bundled_versions_include_the_defaults() -> None:
    versions = bundled_versions()
    assert set(DEFAULT_VERSIONS) <= set(versions)
    assert len(DEFAULT_VERSIONS) >= 2


@pytest.mark.parametrize("version", ["1.25.0", "1.31.0", "1.37.0"])
def test_example_platform_is_valid_for_each_version(version: str) -> None:
    manifests = render_stack(load_stack(EXAMPLE), IMAGE)
    objects = manifests.objects()
    assert schema_problems(objects, [version]) == []
    counts: dict[str, int] = {}
    for obj in objects:
        counts[obj["kind"]] = counts.get(obj["kind"], 0) + 1
    # 11 long-running services, the one-shot migrate as a Job, db's disk as a claim
    assert counts == {"Deployment": 11, "Job": 1, "Service": 11, "ConfigMap": 6,
                      "PersistentVolumeClaim": 1}


def test_example_platform_in_a_namespace_with_secrets_is_valid() -> None:
    options = RenderOptions(namespace="platform", default_image="python:3.11-slim",
                            images={"db": "ghcr.io/acme/db:2"},
                            secret_env=frozenset({"CACHE_CAPACITY", "api.API_CACHE_TTL"}),
                            expose_type="NodePort")
    manifests = render_stack(load_stack(EXAMPLE), options)
    assert check(manifests.objects()) == len(manifests.objects())
    assert all(obj["metadata"]["namespace"] == "platform" for obj in manifests.objects())
    assert container(manifests.services["db"].workload)["image"] == "ghcr.io/acme/db:2"
    api = env_of(manifests.services["api"].workload)
    assert api["DB_URL"] == "http://db.platform.svc:8080"
    assert kinds(manifests, "gateway")["Service"]["spec"]["type"] == "NodePort"


def test_example_dependencies_become_env_init_containers_and_a_job() -> None:
    manifests = render_stack(load_stack(EXAMPLE), IMAGE)
    api = manifests.services["api"].workload
    env = env_of(api)
    assert env["PORT"] == "8080" and env["PORT_HTTP"] == "8080"
    assert env["DB_HOST"] == "db" and env["DB_PORT"] == "8080"
    assert env["AUTH_URL"] == "http://auth:8080"
    assert env["SHIPYARD_INSTANCE"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "MIGRATE_HOST" not in env  # a Job has no Service
    init = {c["name"]: c for c in api["spec"]["template"]["spec"]["initContainers"]}
    assert set(init) == {"wait-db", "wait-cache", "wait-auth", "wait-queue"}
    assert init["wait-db"]["command"][-1].startswith("until nc -z -w 2 db 8080;")
    metrics = manifests.services["metrics"].workload["spec"]["template"]["spec"]
    assert "nslookup gateway" in {c["name"]: c for c in metrics["initContainers"]}[
        "wait-gateway"]["command"][-1]  # `started`: the name resolves
    migrate = manifests.services["migrate"]
    assert migrate.is_job
    assert migrate.workload["spec"]["backoffLimit"] == 5
    assert migrate.workload["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    assert manifests.phases.index(["migrate", "scheduler"]) < manifests.phases.index(["api"])
    # the command's ${PORT} is expanded by the kubelet from the container's env
    assert container(api)["command"] == ["python3"]
    assert container(api)["args"][-2:] == ["--port", "$(PORT)"]
    assert api["spec"]["replicas"] == 2
    assert kinds(manifests, "api")["Service"]["spec"]["ports"] == [
        {"name": "http", "port": 38081, "targetPort": "http", "protocol": "TCP"}]


def test_command_only_service_is_refused_in_one_line(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from shipyard.cli.main import run

    assert run(["k8s", "render", "-f", str(EXAMPLE)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: service config has only a command: the Kubernetes target needs an "
                   "image (add `image:` or pass --image-for config=IMAGE)"]


def test_cli_render_to_a_folder_with_check(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from shipyard.cli.main import run

    out = tmp_path / "manifests"
    code = run(["k8s", "render", "-f", str(EXAMPLE), "--default-image", "python:3.11",
                "--image-for", "db=postgres:16", "--check", "-o", str(out)])
    assert code == 0
    assert "30 objects valid for Kubernetes 1.25.0, 1.37.0" in capsys.readouterr().err
    files = sorted(p.name for p in out.iterdir())
    assert files[0] == "01-cache.yaml" and files[-1] == "12-web.yaml"
    db = list(yaml.safe_load_all((out / "03-db.yaml").read_text()))
    assert [d["kind"] for d in db] == ["PersistentVolumeClaim", "Service", "Deployment"]
    assert container(db[-1])["image"] == "postgres:16"
    assert run(["k8s", "render", "-f", str(EXAMPLE), "--image-for", "db"]) == 2


# -- field by field ---------------------------------------------------------------------

FULL = """
name: shop
deploy: {revision_history_limit: 4}
services:
  api:
    image: shop/api:1.4
    version: "1.4.2"
    command: [serve, --port, "${PORT}", --admin, "${PORT_ADMIN}", "cost=$(echo 1)"]
    replicas: 1
    env: {LOG_LEVEL: info, DB_PASSWORD: hunter2, SELF: "http://me:${PORT}"}
    ports: {http: auto, admin: 9000, metrics: auto}
    resources: {cpu: 500m, memory: 256Mi, disk: 2Gi, gpu: 1}
    health:
      readiness: {http: /ready, port: http, interval: 2s, timeout: 1500ms,
                  failure_threshold: 4, success_threshold: 2, initial_delay: 3s}
      liveness: {tcp: admin, interval: 5s}
    stop: {timeout: 20s}
    update: {strategy: rolling, max_surge: 25%, max_unavailable: 1, min_ready: 5s,
             progress_deadline: 3m}
    autoscale:
      min: 2
      max: 12
      up_cooldown: 30s
      down_cooldown: 5m
      metrics:
        - cpu: 70%
        - memory: 80%
        - requests_per_second: 50
        - latency_p99: 200ms
        - prometheus: {query: 'sum(rate(http_requests_total[1m]))', target: 100, name: rps}
        - custom: {name: backlog, url: 'http://queue:8080/depth', json_path: $.pending,
                   target: 12.5}
  worker:
    image: shop/worker:1
    command: "python -m worker"
    shell: true
    restart: always
    health: {liveness: {exec: [check, --quick]}}
"""


@pytest.fixture(scope="module")
def full() -> Manifests:
    return render_stack(stack(FULL), RenderOptions(secret_env=frozenset({"DB_PASSWORD"})))


def test_full_service_is_schema_valid(full: Manifests) -> None:
    assert schema_problems(full.objects(), ["1.25.0", "1.37.0"]) == []


def test_deployment_fields(full: Manifests) -> None:
    dep = full.services["api"].workload
    spec = dep["spec"]
    assert "replicas" not in spec  # the HPA owns the count
    assert spec["strategy"] == {"type": "RollingUpdate",
                                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1}}
    assert spec["minReadySeconds"] == 5 and spec["progressDeadlineSeconds"] == 180
    assert spec["revisionHistoryLimit"] == 4
    labels = dep["metadata"]["labels"]
    assert labels == {"app.kubernetes.io/name": "api", "app.kubernetes.io/part-of": "shop",
                      "app.kubernetes.io/managed-by": "shipyard",
                      "app.kubernetes.io/version": "1.4.2"}
    assert spec["selector"]["matchLabels"] == {"app.kubernetes.io/name": "api",
                                               "app.kubernetes.io/part-of": "shop"}
    c = container(dep)
    assert c["ports"] == [
        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        {"name": "admin", "containerPort": 9000, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 8081, "protocol": "TCP"}]
    assert c["command"] == ["serve"]
    assert c["args"] == ["--port", "$(PORT)", "--admin", "$(PORT_ADMIN)", "cost=$$(echo 1)"]
    assert c["resources"] == {"requests": {"cpu": "500m", "memory": "256Mi",
                                           "nvidia.com/gpu": "1"},
                              "limits": {"memory": "256Mi", "nvidia.com/gpu": "1"}}
    assert c["readinessProbe"] == {
        "httpGet": {"path": "/ready", "port": "http", "scheme": "HTTP"}, "periodSeconds": 2,
        "timeoutSeconds": 2, "failureThreshold": 4, "successThreshold": 2,
        "initialDelaySeconds": 3}
    assert c["livenessProbe"]["tcpSocket"] == {"port": "admin"}
    assert c["livenessProbe"]["periodSeconds"] == 5
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 20
    env = env_of(dep)
    assert env["PORT"] == "8080" and env["PORT_ADMIN"] == "9000"
    assert env["PORT_METRICS"] == "8081"
    assert env["SELF"] == "http://me:$(PORT)"  # refers to a variable: in the pod's env
    assert env["SHIPYARD_DATA"] == "/data"
    assert c["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    worker = container(full.services["worker"].workload)
    assert worker["command"] == ["/bin/sh"] and worker["args"] == ["-c", "python -m worker"]
    assert worker["livenessProbe"]["exec"] == {"command": ["check", "--quick"]}


def test_env_plain_in_configmap_secret_in_secret(full: Manifests) -> None:
    objs = kinds(full, "api")
    assert objs["ConfigMap"]["data"] == {"LOG_LEVEL": "info"}
    assert objs["Secret"]["data"] == {"DB_PASSWORD": base64.b64encode(b"hunter2").decode()}
    assert objs["Secret"]["type"] == "Opaque"
    assert "hunter2" not in json.dumps(full.objects())
    assert container(full.services["api"].workload)["envFrom"] == [
        {"configMapRef": {"name": "api-env"}}, {"secretRef": {"name": "api-secret"}}]


def test_secret_env_for_one_service_only() -> None:
    text = FULL.replace("command: \"python -m worker\"",
                        "command: \"python -m worker\"\n    env: {DB_PASSWORD: x}")
    manifests = render_stack(stack(text), RenderOptions(secret_env=frozenset(
        {"worker.DB_PASSWORD"})))
    assert "Secret" in kinds(manifests, "worker")
    assert "Secret" not in kinds(manifests, "api")
    assert kinds(manifests, "api")["ConfigMap"]["data"]["DB_PASSWORD"] == "hunter2"


def test_pvc_and_service(full: Manifests) -> None:
    objs = kinds(full, "api")
    assert objs["PersistentVolumeClaim"]["spec"] == {
        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}}
    assert objs["Service"]["spec"]["type"] == "ClusterIP"  # not exposed
    assert [p["name"] for p in objs["Service"]["spec"]["ports"]] == ["http", "admin", "metrics"]
    assert "Service" not in kinds(full, "worker")  # no ports


def test_hpa(full: Manifests) -> None:
    hpa = kinds(full, "api")["HorizontalPodAutoscaler"]
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": "api"}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 12)
    assert spec["behavior"] == {"scaleUp": {"stabilizationWindowSeconds": 30},
                                "scaleDown": {"stabilizationWindowSeconds": 300}}
    metrics = spec["metrics"]
    # 70% of one core with a 500m request is 140% of the request
    assert metrics[0] == {"type": "Resource", "resource": {"name": "cpu", "target": {
        "type": "Utilization", "averageUtilization": 140}}}
    assert metrics[1]["resource"] == {"name": "memory", "target": {
        "type": "Utilization", "averageUtilization": 80}}
    assert metrics[2] == {"type": "Pods", "pods": {"metric": {"name": "requests_per_second"},
                                                   "target": {"type": "AverageValue",
                                                              "averageValue": "50"}}}
    assert metrics[3]["pods"]["target"]["averageValue"] == "200m"
    assert metrics[4]["external"]["metric"] == {
        "name": "shipyard_rps", "selector": {"matchLabels": {"shipyard.dev/service": "api"}}}
    assert metrics[5]["external"]["target"]["averageValue"] == "12500m"
    annotation = json.loads(hpa["metadata"]["annotations"][o.ANNOTATION_METRICS])
    assert annotation["shipyard_rps"]["query"] == "sum(rate(http_requests_total[1m]))"
    assert annotation["shipyard_backlog"]["url"] == "http://queue:8080/depth"


def test_cpu_target_without_a_request_is_an_average_value() -> None:
    text = "name: s\nservices:\n  a:\n    image: x\n    autoscale: {max: 3, metrics: [cpu: 50%]}\n"
    hpa = kinds(render_stack(stack(text)), "a")["HorizontalPodAutoscaler"]
    assert hpa["spec"]["metrics"][0]["resource"]["target"] == {"type": "AverageValue",
                                                               "averageValue": "500m"}
    assert hpa["spec"]["minReplicas"] == 1


def test_memory_target_without_memory_is_refused() -> None:
    text = ("name: s\nservices:\n  a:\n    image: x\n"
            "    autoscale: {max: 3, metrics: [memory: 50%]}\n")
    with pytest.raises(RenderError, match="service a: autoscale on memory needs"):
        render_stack(stack(text))


def test_changed_one_shot_is_a_new_job() -> None:
    text = """
name: s
services:
  migrate: {image: "m:1", restart: "no"}
  app: {image: a, restart: always, depends_on: {migrate: completed}}
"""
    first = render_stack(stack(text)).services["migrate"].workload
    second = render_stack(stack(text.replace("m:1", "m:2"))).services["migrate"].workload
    assert first["metadata"]["name"] != second["metadata"]["name"]
    assert first["metadata"]["name"].startswith("migrate-")
    assert first["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    # the loader refuses this already; render does not rely on it
    raw = yaml.safe_load(text.replace('restart: "no"', "restart: always"))
    with pytest.raises(RenderError, match="app waits for migrate to complete, but migrate "
                       "restarts always"):
        render_stack(Stack.model_validate(raw))


def test_names_that_kubernetes_cannot_take_are_refused() -> None:
    long_port = "name: s\nservices:\n  a: {image: x, ports: {administration_port: 80}}\n"
    with pytest.raises(RenderError, match="port name 'administration_port' cannot be"):
        render_stack(stack(long_port))
    digit = "name: s\nservices:\n  9lives: {image: x}\n"
    with pytest.raises(RenderError, match="service 9lives: its name cannot be"):
        render_stack(stack(digit))
    clash = "name: s\nservices:\n  a_b: {image: x}\n  a-b: {image: y}\n"
    with pytest.raises(RenderError, match="same Kubernetes name 'a-b'"):
        render_stack(stack(clash))


def test_config_change_rolls_the_pods() -> None:
    text = "name: s\nservices:\n  a: {image: x, env: {A: '1'}}\n"
    one = render_stack(stack(text)).services["a"]
    two = render_stack(stack(text.replace("'1'", "'2'"))).services["a"]
    assert one.template_hash != two.template_hash


BG = """
name: s
services:
  web:
    image: w:1
    ports: {http: auto}
    expose: 8000
    replicas: 2
    update: {strategy: blue-green}
  feed:
    image: f:1
    ports: {http: auto}
    expose: 8001
    replicas: 10
    update: {strategy: canary, steps: [10, 50]}
"""


def test_blue_green_and_canary_rendering() -> None:
    manifests = render_stack(stack(BG))
    web = kinds(manifests, "web")
    assert web["Deployment"]["metadata"]["name"] == "web-blue"
    assert web["Deployment"]["spec"]["selector"]["matchLabels"][o.LABEL_COLOR] == "blue"
    assert web["Service"]["spec"]["selector"][o.LABEL_COLOR] == "blue"
    green = render_stack(stack(BG), RenderOptions(colors={"web": "green"},
                                                  selectors={"web": "blue"}))
    gweb = kinds(green, "web")
    assert gweb["Deployment"]["metadata"]["name"] == "web-green"
    assert gweb["Service"]["spec"]["selector"][o.LABEL_COLOR] == "blue"
    assert green.services["web"].template_hash == manifests.services["web"].template_hash
    feed = manifests.services["feed"].workload
    assert feed["spec"]["selector"]["matchLabels"][o.LABEL_TRACK] == "stable"
    assert o.LABEL_TRACK not in kinds(manifests, "feed")["Service"]["spec"]["selector"]
    canary = canary_deployment(feed, 3)
    assert canary["metadata"]["name"] == "feed-canary" and canary["spec"]["replicas"] == 3
    assert canary["spec"]["template"]["metadata"]["labels"][o.LABEL_TRACK] == "canary"
    assert feed["spec"]["template"]["metadata"]["labels"][o.LABEL_TRACK] == "stable"
    assert schema_problems([*green.objects(), canary]) == []


# -- the validator is not vacuous ---------------------------------------------------------


def test_validation_catches_unknown_fields_and_wrong_types(full: Manifests) -> None:
    dep = copy.deepcopy(full.services["api"].workload)
    dep["spec"]["replica"] = 3  # a typo: strict schemas refuse unknown fields
    container(dep)["ports"][0]["containerPort"] = "http"
    found = schema_problems([dep], ["1.37.0"])
    assert {p.path for p in found} >= {"spec", "spec.template.spec.containers.0.ports.0."
                                               "containerPort"}
    with pytest.raises(ManifestInvalid, match=r"Deployment/api\.spec: Additional properties"):
        check([dep])


# -- generated stacks -------------------------------------------------------------------

NAMES = st.from_regex(r"[a-z][a-z0-9]{0,6}(-[a-z0-9]{1,4})?", fullmatch=True)
PORT_NAMES = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)
DURATIONS = st.sampled_from(["500ms", "1s", "2s", "10s", "1m"])


@st.composite
def probes(draw: st.DrawFn, ports: list[str]) -> dict[str, Any]:
    kinds_ = ["exec"] + (["http", "tcp"] if ports else [])
    kind = draw(st.sampled_from(kinds_))
    probe: dict[str, Any] = {"interval": draw(DURATIONS), "timeout": draw(DURATIONS),
                             "failure_threshold": draw(st.integers(1, 5))}
    if kind == "http":
        probe["http"] = "/" + draw(st.from_regex(r"[a-z]{0,8}", fullmatch=True))
        probe["port"] = draw(st.sampled_from(ports))
    elif kind == "tcp":
        probe["tcp"] = draw(st.sampled_from(ports))
    else:
        probe["exec"] = ["check", draw(st.sampled_from(["-q", "--all"]))]
    return probe


@st.composite
def stacks(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(NAMES, min_size=1, max_size=6, unique=True))
    services: dict[str, Any] = {}
    for index, name in enumerate(names):
        svc: dict[str, Any] = {"image": f"registry.example/{name}:{index}",
                               "restart": "always"}
        replicas = draw(st.integers(0, 5))
        svc["replicas"] = replicas
        port_names = draw(st.lists(PORT_NAMES, max_size=3, unique=True))
        strategy = draw(st.sampled_from(["rolling", "recreate", "blue-green", "canary"]))
        two_sets = strategy in ("blue-green", "canary")
        if port_names:  # fixed ports: unique in the stack, one replica, one set
            svc["ports"] = {p: ("auto" if replicas > 1 or two_sets or draw(st.booleans())
                                else 1000 + 10 * index + j) for j, p in enumerate(port_names)}
        if port_names and (strategy in ("blue-green", "canary") or draw(st.booleans())):
            svc["expose"] = 20000 + index
        elif strategy in ("blue-green", "canary"):
            strategy = "rolling"
        svc["update"] = {"strategy": strategy}
        if strategy == "rolling":
            svc["update"]["max_surge"] = draw(st.sampled_from([1, 2, "25%", "100%"]))
            svc["update"]["max_unavailable"] = draw(st.sampled_from([0, 1, "25%"]))
        if draw(st.booleans()):
            svc["env"] = draw(st.dictionaries(st.from_regex(r"[A-Z][A-Z0-9_]{0,8}",
                                                            fullmatch=True),
                                              st.text(st.characters(codec="utf-8",
                                                                    exclude_characters="$"),
                                                      max_size=10), max_size=3))
        res = {"cpu": draw(st.sampled_from([0, "100m", "1", "2500m"])),
               "memory": draw(st.sampled_from([0, "64Mi", "1Gi", "1000000"])),
               "disk": draw(st.sampled_from([0, "1Gi"])), "gpu": draw(st.integers(0, 2))}
        svc["resources"] = res
        health: dict[str, Any] = {}
        if draw(st.booleans()):
            health["readiness"] = draw(probes(port_names))
        if draw(st.booleans()):
            health["liveness"] = draw(probes(port_names))
        svc["health"] = health
        if draw(st.booleans()):
            metric = draw(st.sampled_from(
                [{"cpu": "70%"}, {"requests_per_second": 20}, {"latency_p99": "150ms"},
                 {"prometheus": {"query": "up", "target": 3}},
                 {"custom": {"name": "q", "url": "http://x/q", "target": 1.5}}]
                + ([{"memory": "60%"}] if res["memory"] else [])))
            svc["autoscale"] = {"min": draw(st.integers(0, 2)), "max": 8,
                                "metrics": [metric]}
        earlier = names[:index]
        if earlier:
            deps = draw(st.lists(st.sampled_from(earlier), max_size=3, unique=True))
            svc["depends_on"] = {d: draw(st.sampled_from(["healthy", "started", "completed"]))
                                 for d in deps}
        services[name] = svc
    for svc in services.values():  # a `completed` dependency is a one-shot
        for dep, cond in (svc.get("depends_on") or {}).items():
            if cond == "completed":
                services[dep]["restart"] = "on-failure"
    return {"name": "gen", "services": services}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stacks(), st.sampled_from([None, "team-a"]))
def test_generated_stacks_render_schema_valid(data: dict[str, Any],
                                              namespace: str | None) -> None:
    parsed = parse_stack(yaml.safe_dump(data))
    manifests = render_stack(parsed, RenderOptions(namespace=namespace,
                                                   secret_env=frozenset({"SECRET"})))
    objects = manifests.objects()
    assert schema_problems(objects, DEFAULT_VERSIONS) == []
    names = [(obj["kind"], obj["metadata"]["name"]) for obj in objects]
    assert len(names) == len(set(names))
    phase_of = {name: i for i, phase in enumerate(manifests.phases) for name in phase}
    assert sorted(phase_of) == sorted(data["services"])
    for name, svc in data["services"].items():
        assert all(phase_of[dep] < phase_of[name] for dep in svc.get("depends_on", {}))
    for sm in manifests.services.values():
        for obj in sm.objects:
            assert obj["metadata"]["labels"][o.LABEL_MANAGED_BY] == "shipyard"
            assert obj["metadata"]["labels"][o.LABEL_PART_OF] == "gen"
