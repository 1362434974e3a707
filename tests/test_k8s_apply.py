"""`shipyard k8s apply/diff/status/scale/rollback/delete` against an emulated cluster.

Every test here uses the in-memory Kubernetes API emulator of tests/test_k8s_fakeapi.py
(an http.server on 127.0.0.1 speaking the API paths Shipyard calls), reached through the
official `kubernetes` client exactly as a real cluster would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shipyard.cli.main import run
from shipyard.k8s.apply import ApplyOptions, Deployer, plan
from shipyard.k8s.cluster import Cluster, ClusterError
from shipyard.k8s.render import RenderOptions, render_stack
from shipyard.spec.loader import load_stack
from tests.test_k8s_fakeapi import FakeKube, fake

__all__ = ["fake"]  # the fixture, re-exported for pytest

STACK = """
name: shop
services:
  db:
    image: postgres:16
    ports: {pg: 5432}
    resources: {disk: 1Gi, memory: 256Mi}
    health: {readiness: {tcp: pg}}
    restart: always
  migrate:
    image: shop/migrate:1
    depends_on: {db: healthy}
    restart: on-failure
  api:
    image: shop/api:1
    replicas: 2
    depends_on: {db: healthy, migrate: completed}
    ports: {http: auto}
    expose: 8000
    restart: always
    health: {readiness: {http: /ready}}
"""


def write(tmp_path: Path, text: str, name: str = "shipyard.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def kube(fake: FakeKube, tmp_path: Path) -> tuple[FakeKube, str]:
    return fake, str(fake.kubeconfig(tmp_path / "kubeconfig"))


def cli(*args: str) -> int:
    return run(["k8s", *args])


def test_apply_server_side_in_dependency_order(kube: tuple[FakeKube, str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Uses the emulator: every object is server-side applied with field manager shipyard
    (force), db before the migrate Job, the Job complete before api is applied."""
    fake, kc = kube
    assert cli("apply", "-f", write(tmp_path, STACK), "--kubeconfig", kc) == 0
    out = capsys.readouterr().out
    assert "applied 6 objects of stack shop to namespace shop" in out
    patches = fake.calls("PATCH")
    assert all(p["content_type"] == "application/apply-patch+yaml" for p in patches)
    assert all(p["query"] == {"fieldManager": "shipyard", "force": "true"} for p in patches)
    kinds = [(p["path"].split("/")[-2], p["path"].split("/")[-1]) for p in patches]
    job = next(n for k, n in kinds if k == "jobs")
    assert kinds.index(("deployments", "db")) < kinds.index(("jobs", job)) \
        < kinds.index(("deployments", "api"))
    # the Job was read (and found complete) before api was applied
    reads = [i for i, r in enumerate(fake.requests)
             if r["method"] == "GET" and r["path"].endswith(f"/jobs/{job}")]
    api_apply = next(i for i, r in enumerate(fake.requests)
                     if r["method"] == "PATCH" and r["path"].endswith("/deployments/api"))
    assert reads and reads[0] < api_apply
    assert fake.get("deployments", "api")["metadata"]["managedFields"][0]["manager"] \
        == "shipyard"
    assert fake.names("persistentvolumeclaims") == {"db-data"}
    assert fake.get("services", "api")["spec"]["type"] == "LoadBalancer"


def test_wait_reports_progress_until_rolled_out(kube: tuple[FakeKube, str],
                                                tmp_path: Path) -> None:
    """Uses the emulator: the rollout shows partial progress for a few reads; apply waits
    (observedGeneration, updated, available) and reports each change."""
    fake, kc = kube
    fake.lag = 3
    stack = load_stack(write(tmp_path, STACK))
    cluster = Cluster.connect(kc)
    lines: list[str] = []
    deployer = Deployer(cluster, stack, ApplyOptions(interval=0.01, report=lines.append))
    deployer.apply(plan(cluster, stack, RenderOptions(namespace=cluster.namespace)))
    api_lines = [line for line in lines if "Deployment/api" in line]
    assert api_lines == ["  Deployment/api: 1 of 2 updated, 0 available",
                         "  Deployment/api: 2 of 2 available"]
    assert any(line.startswith("phase 3: api") for line in lines)


def test_dry_run_server_persists_nothing(kube: tuple[FakeKube, str], tmp_path: Path) -> None:
    """Uses the emulator: --dry-run=server sends dryRun=All and nothing is stored."""
    fake, kc = kube
    assert cli("apply", "-f", write(tmp_path, STACK), "--kubeconfig", kc,
               "--dry-run=server") == 0
    assert all(p["query"].get("dryRun") == "All" for p in fake.calls("PATCH"))
    assert fake.objects == {}


def test_prune_deletes_what_the_stack_no_longer_declares(
        kube: tuple[FakeKube, str], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Uses the emulator: a removed service's objects go with --prune, not without."""
    fake, kc = kube
    extra = STACK + """
  cache:
    image: redis:7
    ports: {redis: 6379}
    restart: always
    env: {MAXMEM: 1gb}
"""
    assert cli("apply", "-f", write(tmp_path, extra), "--kubeconfig", kc) == 0
    assert "cache" in fake.names("deployments")
    assert cli("apply", "-f", write(tmp_path, STACK), "--kubeconfig", kc) == 0
    assert "cache" in fake.names("deployments")
    capsys.readouterr()
    assert cli("apply", "-f", write(tmp_path, STACK), "--kubeconfig", kc, "--prune") == 0
    # cache's Deployment, Service and ConfigMap
    assert "applied 6 objects of stack shop to namespace shop, pruned 3" \
        in capsys.readouterr().out
    assert "cache" not in fake.names("deployments")
    assert "cache" not in fake.names("services")
    assert "cache-env" not in fake.names("configmaps")
    assert fake.names("deployments") == {"db", "api"}


def test_diff_shows_new_changed_and_pruned(kube: tuple[FakeKube, str], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Uses the emulator: + for new objects, ~ with a unified diff, - for pruned ones."""
    _, kc = kube
    file = write(tmp_path, STACK)
    assert cli("diff", "-f", file, "--kubeconfig", kc) == 0
    assert "+ Deployment/api" in capsys.readouterr().out
    assert cli("apply", "-f", file, "--kubeconfig", kc) == 0
    capsys.readouterr()
    assert cli("diff", "-f", file, "--kubeconfig", kc) == 0
    assert "no changes" in capsys.readouterr().out
    changed = STACK.replace("shop/api:1", "shop/api:2").replace(
        "  migrate:\n    image: shop/migrate:1\n    depends_on: {db: healthy}\n"
        "    restart: on-failure\n", "").replace(", migrate: completed", "")
    assert cli("diff", "-f", write(tmp_path, changed), "--kubeconfig", kc) == 0
    out = capsys.readouterr().out
    assert "~ Deployment/api" in out
    assert "-        image: shop/api:1" in out and "+        image: shop/api:2" in out
    assert "- Job/migrate-" in out


def test_status_scale_rollback_delete(kube: tuple[FakeKube, str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Uses the emulator: day-2 operations on an applied stack."""
    fake, kc = kube
    v1 = write(tmp_path, STACK)
    assert cli("apply", "-f", v1, "--kubeconfig", kc) == 0
    assert cli("apply", "-f", write(tmp_path, STACK.replace("shop/api:1", "shop/api:2"),
                                    "v2.yaml"), "--kubeconfig", kc) == 0
    capsys.readouterr()

    assert cli("status", "-f", v1, "--kubeconfig", kc, "-o", "json") == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["api"]["revision"] == 2 and rows["api"]["image"] == "shop/api:2"
    assert rows["api"]["ready"] == 2 and rows["api"]["state"] == "done"
    assert any(r["kind"] == "Job" and r["state"] == "done" for r in rows.values())

    assert cli("scale", "api", "5", "-f", v1, "--kubeconfig", kc) == 0
    assert fake.get("deployments", "api")["spec"]["replicas"] == 5
    scale = fake.calls("PATCH")[-1]
    assert scale["path"].endswith("/deployments/api/scale")

    assert cli("rollback", "api", "-f", v1, "--kubeconfig", kc) == 0
    assert "rolled back Deployment/api to revision 1" in capsys.readouterr().out
    dep = fake.get("deployments", "api")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "shop/api:1"
    assert "pod-template-hash" not in dep["spec"]["template"]["metadata"]["labels"]
    assert dep["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "3"
    assert cli("rollback", "api", "--to", "2", "-f", v1, "--kubeconfig", kc) == 0
    dep = fake.get("deployments", "api")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "shop/api:2"
    assert cli("rollback", "api", "--to", "9", "-f", v1, "--kubeconfig", kc) == 2
    assert "revision 9 is not kept" in capsys.readouterr().err

    assert cli("delete", "-f", v1, "--kubeconfig", kc, "--keep-data") == 0
    assert fake.names("deployments") == set() and fake.names("jobs") == set()
    assert fake.names("persistentvolumeclaims") == {"db-data"}
    assert cli("delete", "-f", v1, "--kubeconfig", kc) == 0
    assert fake.names("persistentvolumeclaims") == set()


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_unreachable_cluster_is_one_line_exit_1(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Uses the emulator's kubeconfig format, pointed at a closed port on 127.0.0.1."""
    server = FakeKube().start()
    kc = str(server.kubeconfig(tmp_path / "kubeconfig"))
    server.stop()
    assert cli("status", "-f", write(tmp_path, STACK), "--kubeconfig", kc) == 1
    line = _one_error_line(capsys)
    assert line.startswith("error: cannot reach the cluster at http://127.0.0.1:")


def test_forbidden_is_one_line_exit_1(kube: tuple[FakeKube, str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Uses the emulator: a 403 on patching Deployments."""
    fake, kc = kube
    fake.forbidden.add(("patch", "deployments"))
    assert cli("apply", "-f", write(tmp_path, STACK), "--kubeconfig", kc) == 1
    line = _one_error_line(capsys)
    assert line.startswith("error: apply Deployment/db: forbidden: ")
    assert 'cannot patch resource "deployments"' in line


def test_invalid_object_is_one_line_exit_2(kube: tuple[FakeKube, str], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Uses the emulator: a 422 from the API server."""
    fake, kc = kube
    fake.invalid["Deployment/db"] = "spec.template.spec.containers[0].image: Required value"
    assert cli("apply", "-f", write(tmp_path, STACK), "--kubeconfig", kc) == 2
    line = _one_error_line(capsys)
    assert line == ('error: apply Deployment/db: the cluster refused it: Deployment "db" is '
                    "invalid: spec.template.spec.containers[0].image: Required value")


def test_bad_kubeconfig_and_context(tmp_path: Path, kube: tuple[FakeKube, str],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Uses the emulator's kubeconfig: a missing file and an unknown context exit 2."""
    _, kc = kube
    file = write(tmp_path, STACK)
    assert cli("status", "-f", file, "--kubeconfig", str(tmp_path / "nope")) == 2
    assert "no kubeconfig at" in _one_error_line(capsys)
    assert cli("status", "-f", file, "--kubeconfig", kc, "--context", "prod") == 2
    assert "has no context 'prod'" in _one_error_line(capsys)


def test_stuck_rollout_fails_and_rolls_back(kube: tuple[FakeKube, str], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Uses the emulator: a rollout past its progress deadline fails the apply (exit 1)
    and, with auto_rollback, the previous revision's template is put back."""
    fake, kc = kube
    assert cli("apply", "-f", write(tmp_path, STACK), "--kubeconfig", kc) == 0
    fake.stuck.add("api")
    capsys.readouterr()
    v2 = write(tmp_path, STACK.replace("shop/api:1", "shop/api:2"), "v2.yaml")
    assert cli("apply", "-f", v2, "--kubeconfig", kc) == 1
    captured = capsys.readouterr()
    assert "error: Deployment/api exceeded its progress deadline" in captured.err
    assert "api: rolled back to revision 1" in captured.out
    dep = fake.get("deployments", "api")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "shop/api:1"


def test_failed_job_stops_the_apply(kube: tuple[FakeKube, str], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Uses the emulator: a failed one-shot Job stops before its dependents."""
    fake, kc = kube
    stack = load_stack(write(tmp_path, STACK))
    job = render_stack(stack, RenderOptions(namespace="shop")).services["migrate"].workload
    fake.failing_jobs.add(job["metadata"]["name"])
    assert cli("apply", "-f", write(tmp_path, STACK), "--kubeconfig", kc) == 1
    assert "backoff limit" in capsys.readouterr().err
    assert "api" not in fake.names("deployments")


BLUE_GREEN = """
name: shop
services:
  web:
    image: shop/web:1
    replicas: 3
    ports: {http: auto}
    expose: 8000
    restart: always
    update: {strategy: blue-green}
"""


def test_blue_green_switches_the_selector_once_ready(
        kube: tuple[FakeKube, str], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Uses the emulator: v1 goes to blue; v2 to green while the Service still selects
    blue; once green is rolled out the selector switches and blue goes to zero."""
    fake, kc = kube
    assert cli("apply", "-f", write(tmp_path, BLUE_GREEN), "--kubeconfig", kc) == 0
    assert fake.get("services", "web")["spec"]["selector"]["shipyard.dev/color"] == "blue"
    assert fake.names("deployments") == {"web-blue"}
    fake.requests.clear()
    v2 = write(tmp_path, BLUE_GREEN.replace("web:1", "web:2"), "v2.yaml")
    assert cli("apply", "-f", v2, "--kubeconfig", kc) == 0
    service_patches = [r["body"]["spec"]["selector"]["shipyard.dev/color"]
                       for r in fake.calls("PATCH") if r["path"].endswith("/services/web")]
    assert service_patches == ["blue", "green"]
    green_ready = [i for i, r in enumerate(fake.requests)
                   if r["method"] == "GET" and r["path"].endswith("/deployments/web-green")]
    switch = max(i for i, r in enumerate(fake.requests)
                 if r["method"] == "PATCH" and r["path"].endswith("/services/web"))
    assert green_ready and green_ready[-1] < switch
    assert fake.get("deployments", "web-blue")["spec"]["replicas"] == 0
    green = fake.get("deployments", "web-green")
    assert green["spec"]["template"]["spec"]["containers"][0]["image"] == "shop/web:2"
    assert "traffic switched from blue to green" in capsys.readouterr().out
    # the same template again: no switch, nothing to retire
    fake.requests.clear()
    assert cli("apply", "-f", v2, "--kubeconfig", kc, "--prune") == 0
    assert fake.get("services", "web")["spec"]["selector"]["shipyard.dev/color"] == "green"
    assert fake.names("deployments") == {"web-blue", "web-green"}  # blue kept for a switch back
    assert not [r for r in fake.calls("PATCH") if r["path"].endswith("/scale")]


CANARY = """
name: shop
services:
  web:
    image: shop/web:1
    replicas: 10
    ports: {http: auto}
    expose: 8000
    restart: always
    update: {strategy: canary, steps: [10, 50]}
"""


def test_canary_scales_in_the_ratio_of_the_steps(kube: tuple[FakeKube, str],
                                                 tmp_path: Path) -> None:
    """Uses the emulator: 10 replicas, steps 10% and 50%: canary 1 / stable 9, then 5 / 5,
    then the stable Deployment takes the new template at 10 and the canary is removed."""
    fake, kc = kube
    assert cli("apply", "-f", write(tmp_path, CANARY), "--kubeconfig", kc) == 0
    assert fake.names("deployments") == {"web"}
    fake.requests.clear()
    v2 = write(tmp_path, CANARY.replace("web:1", "web:2"), "v2.yaml")
    assert cli("apply", "-f", v2, "--kubeconfig", kc) == 0
    steps = []
    for r in fake.calls("PATCH"):
        if r["path"].endswith("/deployments/web-canary"):
            steps.append(("canary", r["body"]["spec"]["replicas"]))
        elif r["path"].endswith("/deployments/web/scale"):
            steps.append(("stable", r["body"]["spec"]["replicas"]))
        elif r["path"].endswith("/deployments/web"):
            steps.append(("promote", r["body"]["spec"]["replicas"]))
    assert steps == [("canary", 1), ("stable", 9), ("canary", 5), ("stable", 5),
                     ("promote", 10)]
    assert fake.names("deployments") == {"web"}
    web = fake.get("deployments", "web")
    assert web["spec"]["template"]["spec"]["containers"][0]["image"] == "shop/web:2"
    assert fake.get("services", "web")["spec"]["selector"] == {
        "app.kubernetes.io/name": "web", "app.kubernetes.io/part-of": "shop"}


def test_failed_canary_is_removed(kube: tuple[FakeKube, str], tmp_path: Path) -> None:
    """Uses the emulator: a canary past its deadline is deleted, stable goes back to 10."""
    fake, kc = kube
    assert cli("apply", "-f", write(tmp_path, CANARY), "--kubeconfig", kc) == 0
    fake.stuck.add("web-canary")
    v2 = write(tmp_path, CANARY.replace("web:1", "web:2"), "v2.yaml")
    assert cli("apply", "-f", v2, "--kubeconfig", kc) == 1
    assert fake.names("deployments") == {"web"}
    web = fake.get("deployments", "web")
    assert web["spec"]["replicas"] == 10
    assert web["spec"]["template"]["spec"]["containers"][0]["image"] == "shop/web:1"


def test_wait_times_out(kube: tuple[FakeKube, str], tmp_path: Path) -> None:
    """Uses the emulator: a rollout that never completes within the timeout fails."""
    fake, kc = kube
    fake.lag = 10_000
    stack = load_stack(write(tmp_path, STACK))
    cluster = Cluster.connect(kc)
    deployer = Deployer(cluster, stack, ApplyOptions(interval=0.01))
    with pytest.raises(ClusterError, match="timed out after 0s waiting for Deployment/x"):
        deployer.wait([("Deployment", "x")], 0.05)


def test_diff_never_prints_a_secret_value(kube: tuple[FakeKube, str], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Uses the emulator: a changed Secret shows which keys changed, not their values."""
    _, kc = kube
    with_secret = STACK.replace("    image: shop/api:1\n",
                                "    image: shop/api:1\n    env: {PASSWORD: first-s3cret}\n")
    args = ["--kubeconfig", kc, "--secret-env", "api.PASSWORD"]
    assert cli("apply", "-f", write(tmp_path, with_secret), *args) == 0
    capsys.readouterr()
    changed = with_secret.replace("first-s3cret", "second-s3cret")
    assert cli("diff", "-f", write(tmp_path, changed), *args) == 0
    out = capsys.readouterr().out
    assert "~ Secret/" in out and "(hidden, changed)" in out, out
    assert "s3cret" not in out and "c2VjcmV0" not in out
