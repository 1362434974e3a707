"""`shipyard k8s ...`: the same stack file rendered, checked and applied to a cluster."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from shipyard.cli.commands_spec import FILE_OPTION, OUTPUT_OPTION
from shipyard.cli.context import Context, load_stack_file
from shipyard.errors import InputError


def _render_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("-n", "--namespace", default=None, help="the namespace (default: the "
                     "kubeconfig context's for cluster commands; none for render)"),
        click.option("--image-for", "images", multiple=True, metavar="SERVICE=IMAGE",
                     help="the image of a service (overrides `image:`); repeatable"),
        click.option("--default-image", default=None, metavar="IMAGE",
                     help="the image for services that have only a `command`"),
        click.option("--expose-type", type=click.Choice(["LoadBalancer", "NodePort",
                                                         "ClusterIP"]),
                     default="LoadBalancer", show_default=True,
                     help="the Service type of services with `expose:`"),
        click.option("--secret-env", "secret_env", multiple=True, metavar="[SERVICE.]NAME",
                     help="an env variable to put in a Secret, not the ConfigMap; repeatable"),
        click.option("--wait-image", default="busybox:1.36", show_default=True,
                     help="the image of the init containers that wait for dependencies"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _cluster_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--context", "kube_context", default=None,
                        help="the kubeconfig context (default: its current one)")(func)
    return click.option("--kubeconfig", default=None, metavar="FILE",
                        help="default: $KUBECONFIG, else ~/.kube/config")(func)


def _options(namespace: str | None, images: tuple[str, ...], default_image: str | None,
             expose_type: str, secret_env: tuple[str, ...], wait_image: str) -> Any:
    from shipyard.k8s.render import RenderOptions

    mapping: dict[str, str] = {}
    for item in images:
        service, sep, image = item.partition("=")
        if not sep or not service or not image:
            raise InputError(f"--image-for {item!r}: expected SERVICE=IMAGE")
        mapping[service] = image
    return RenderOptions(namespace=namespace, images=mapping, default_image=default_image,
                         expose_type=expose_type,  # type: ignore[arg-type]
                         secret_env=frozenset(secret_env), wait_image=wait_image)


def _pass_render(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the render options into one `options` argument."""

    @functools.wraps(func)
    def wrapper(*, namespace: str | None, images: tuple[str, ...], default_image: str | None,
                expose_type: str, secret_env: tuple[str, ...], wait_image: str,
                **kwargs: Any) -> Any:
        options = _options(namespace, images, default_image, expose_type, secret_env,
                           wait_image)
        return func(options=options, **kwargs)

    return wrapper


def _with_secrets(stack: Any, options: Any) -> Any:
    """The render options with the values of the secrets the stack's services use, read
    here (environment, files, the home's store): they become Secret objects only."""
    from dataclasses import replace

    from shipyard.security.secret_values import resolve

    names = {use.name for svc in stack.services.values()
             for use in getattr(svc, "secrets", None) or []}
    if not names:
        return options
    home = Context.of(click.get_current_context()).home
    return replace(options, secrets={name: resolve(stack, name, home) for name in sorted(names)})


def _need(module: str) -> None:
    """The Kubernetes target's packages are an extra: say how to get them, in one line."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise InputError(f"the Kubernetes target needs the {module} package",
                         hint="pip install 'shipyard[k8s]'")


def _connect(kubeconfig: str | None, kube_context: str | None, namespace: str | None) -> Any:
    _need("kubernetes")
    from shipyard.k8s.cluster import Cluster

    return Cluster.connect(kubeconfig, kube_context, namespace)


def _say(line: str) -> None:
    click.echo(line, err=line.startswith("warning:"))


@click.group()
def k8s() -> None:
    """Kubernetes: render the stack to manifests, check them, apply and operate them."""


@k8s.command("render")
@FILE_OPTION
@_render_options
@click.option("-o", "--output", "out", default="-", metavar="DIR|-", show_default=True,
              help="a folder (one file per service, named in apply order) or - for stdout")
@click.option("--check", is_flag=True,
              help="validate every manifest strictly against the Kubernetes schemas")
@click.option("--kube-version", "versions", multiple=True, metavar="X.Y.Z",
              help="versions to --check against (default: 1.25.0 and 1.37.0); repeatable")
@_pass_render
def render_cmd(file: str | None, options: Any, out: str, check: bool,
               versions: tuple[str, ...]) -> None:
    """Write the stack's manifests: per service a ConfigMap/Secret, a PVC, a Service, a
    Deployment (or a Job for a one-shot) and a HorizontalPodAutoscaler."""
    import yaml

    if check:
        _need("kubernetes_validate")
    from shipyard.k8s.render import render_stack

    stack = load_stack_file(file)
    manifests = render_stack(stack, _with_secrets(stack, options))
    if check:
        from shipyard.k8s.validate import DEFAULT_VERSIONS
        from shipyard.k8s.validate import check as validate

        count = validate(manifests.objects(), versions or DEFAULT_VERSIONS)
        click.echo(f"{count} objects valid for Kubernetes "
                   f"{', '.join(versions or DEFAULT_VERSIONS)}", err=True)
    if out == "-":
        click.echo(yaml.safe_dump_all(manifests.objects(), sort_keys=False), nl=False)
        return
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    index = 0
    for phase in manifests.phases:
        for name in phase:
            index += 1
            sm = manifests.services[name]
            path = folder / f"{index:02d}-{sm.name}.yaml"
            path.write_text(yaml.safe_dump_all(sm.objects, sort_keys=False))
    click.echo(f"wrote {index} files to {folder}", err=True)


@k8s.command("apply")
@FILE_OPTION
@_render_options
@_cluster_options
@click.option("--dry-run", type=click.Choice(["none", "server"]), default="none",
              show_default=True, help="server: the API server checks everything, "
              "nothing is persisted")
@click.option("--prune", is_flag=True,
              help="delete objects with this stack's labels that it no longer declares")
@click.option("--no-wait", is_flag=True, help="do not wait for rollouts")
@_pass_render
def apply_cmd(file: str | None, options: Any, kubeconfig: str | None,
              kube_context: str | None, dry_run: str, prune: bool, no_wait: bool) -> None:
    """Server-side apply (field manager `shipyard`) in dependency order, waiting for each
    phase's rollouts (and one-shot Jobs) before the next."""
    from dataclasses import replace

    from shipyard.k8s.apply import ApplyOptions, Deployer, plan

    stack = load_stack_file(file)
    cluster = _connect(kubeconfig, kube_context, options.namespace)
    options = replace(_with_secrets(stack, options), namespace=cluster.namespace)
    deployer = Deployer(cluster, stack, ApplyOptions(
        dry_run=dry_run == "server", prune=prune, wait=not no_wait, report=_say))
    planned = plan(cluster, stack, options)
    done = deployer.apply(planned)
    pruned = sum(1 for line in done if line.startswith("pruned "))
    what = f", pruned {pruned}" if prune else ""
    what += " (server dry run: nothing changed)" if dry_run == "server" else ""
    click.echo(f"applied {len(done) - pruned} objects of stack {stack.name} to namespace "
               f"{cluster.namespace}{what}")


@k8s.command("diff")
@FILE_OPTION
@_render_options
@_cluster_options
@_pass_render
def diff_cmd(file: str | None, options: Any, kubeconfig: str | None,
             kube_context: str | None) -> None:
    """What `apply --prune` would change: + new, ~ changed (with a diff), - pruned."""
    from dataclasses import replace

    from shipyard.k8s.apply import diff, plan

    stack = load_stack_file(file)
    cluster = _connect(kubeconfig, kube_context, options.namespace)
    options = replace(_with_secrets(stack, options), namespace=cluster.namespace)
    lines = diff(cluster, stack, plan(cluster, stack, options))
    for line in lines:
        click.echo(line)
    if not lines:
        click.echo(f"no changes: the cluster runs stack {stack.name} as declared")


@k8s.command("status")
@FILE_OPTION
@OUTPUT_OPTION
@_cluster_options
@click.option("-n", "--namespace", default=None)
def status_cmd(file: str | None, output: str, kubeconfig: str | None,
               kube_context: str | None, namespace: str | None) -> None:
    """The stack's Deployments and Jobs: ready, updated, available, revision, state."""
    from rich.console import Console
    from rich.table import Table

    from shipyard.k8s.apply import status

    stack = load_stack_file(file)
    rows = status(_connect(kubeconfig, kube_context, namespace), stack)
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"stack {stack.name} has nothing in this namespace")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("SERVICE", "KIND", "NAME", "READY", "UP-TO-DATE", "AVAILABLE", "REV",
                   "STATE"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["service"], r["kind"], r["name"], f"{r['ready']}/{r['desired']}",
                      str(r["updated"]), str(r["available"]), str(r["revision"]),
                      r["message"] if r["state"] != "done" else "ok")
    Console().print(table)


@k8s.command("scale")
@click.argument("service")
@click.argument("replicas", type=click.IntRange(min=0))
@FILE_OPTION
@_cluster_options
@click.option("-n", "--namespace", default=None)
def scale_cmd(service: str, replicas: int, file: str | None, kubeconfig: str | None,
              kube_context: str | None, namespace: str | None) -> None:
    """Set the replica count of SERVICE's Deployment (the active one for blue-green)."""
    from shipyard.k8s.apply import scale

    stack = load_stack_file(file)
    name = scale(_connect(kubeconfig, kube_context, namespace), stack, service, replicas,
                 _say)
    click.echo(f"scaled Deployment/{name} to {replicas}")


@k8s.command("rollback")
@click.argument("service")
@click.option("--to", "to", type=click.IntRange(min=1), default=None, metavar="REV",
              help="the revision (default: the one before the current)")
@FILE_OPTION
@_cluster_options
@click.option("-n", "--namespace", default=None)
def rollback_cmd(service: str, to: int | None, file: str | None, kubeconfig: str | None,
                 kube_context: str | None, namespace: str | None) -> None:
    """Put an earlier revision's pod template back (from the ReplicaSets' revisions)."""
    from shipyard.k8s.apply import rollback_deployment, workload_name

    stack = load_stack_file(file)
    cluster = _connect(kubeconfig, kube_context, namespace)
    cluster.version()
    name = workload_name(cluster, stack, service)
    try:
        rev = rollback_deployment(cluster, name, to)
    except LookupError as exc:
        raise InputError(f"cannot roll back {service}: {exc.args[0]}") from exc
    click.echo(f"rolled back Deployment/{name} to revision {rev}")


@k8s.command("delete")
@FILE_OPTION
@_cluster_options
@click.option("-n", "--namespace", default=None)
@click.option("--keep-data", is_flag=True, help="keep the PersistentVolumeClaims")
def delete_cmd(file: str | None, kubeconfig: str | None, kube_context: str | None,
               namespace: str | None, keep_data: bool) -> None:
    """Delete every object that carries this stack's labels."""
    from shipyard.k8s.apply import delete

    stack = load_stack_file(file)
    deleted = delete(_connect(kubeconfig, kube_context, namespace), stack,
                     keep_data=keep_data, report=_say)
    click.echo(f"deleted {len(deleted)} objects of stack {stack.name}")
