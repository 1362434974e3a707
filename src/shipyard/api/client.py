"""A synchronous client of the control plane, over its unix socket (or a base URL: https
with TLS verified against `ca`, or not at all with `insecure`; a bearer `token` and a client
certificate `cert`/`key` authenticate it).

Methods mirror the routes; followed streams are iterators. Errors the server reports come
back as the same `ShipyardError` subclasses the engine raised; no server at all is
`ServerNotRunning`.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from shipyard.api.models import (
    Submitted,
    deploy_from_dict,
    error_from_body,
    plan_from_dict,
    submitted_from_dict,
)
from shipyard.engine.results import DeployResult, PlanReport
from shipyard.errors import InputError, ShipyardError
from shipyard.spec.models import Stack

UDS_BASE = "http://shipyard"
TIMEOUT = httpx.Timeout(30.0, connect=5.0)
NO_READ_TIMEOUT = httpx.Timeout(30.0, connect=5.0, read=None)


class ServerNotRunning(ShipyardError):
    """Nothing answers on the control plane's socket."""

    def __init__(self, where: str) -> None:
        super().__init__(f"no Shipyard server is running at {where}",
                         hint="start one with `shipyard server`, or `shipyard up -d`")
        self.where = where


class ConnectionLost(ShipyardError):
    """The server went away in the middle of an answer."""


def stack_document(stack: Stack) -> dict[str, Any]:
    """The stack as it travels to the server: its JSON plus where it was read from."""
    return stack.model_dump(mode="json") | {"source": stack.source, "base_dir": stack.base_dir}


def _document(stack: Stack | dict[str, Any]) -> dict[str, Any]:
    return stack if isinstance(stack, dict) else stack_document(stack)


class TLSFailure(ShipyardError):
    """The server's certificate (or ours) was not accepted."""


class Client:
    def __init__(self, socket_path: Path | None = None, base_url: str | None = None, *,
                 timeout: httpx.Timeout = TIMEOUT, token: str | None = None,
                 ca: Path | None = None, insecure: bool = False, cert: Path | None = None,
                 key: Path | None = None) -> None:
        if (socket_path is None) == (base_url is None):
            raise ValueError("give exactly one of socket_path and base_url")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        if socket_path is not None:
            self.where = str(socket_path)
            transport = httpx.HTTPTransport(uds=str(socket_path))
            self._http = httpx.Client(transport=transport, base_url=UDS_BASE, timeout=timeout,
                                      headers=headers)
        else:
            assert base_url is not None
            if not base_url.startswith(("https://", "http://")):
                raise InputError(f"invalid server URL {base_url!r}",
                                 hint="expected https://HOST:PORT")
            self.where = base_url
            verify: ssl.SSLContext | bool = True
            if base_url.startswith("https://"):
                from shipyard.security.tls import client_context

                verify = client_context(ca, insecure=insecure, cert=cert, key=key)
            self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers,
                                      verify=verify)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- meta -------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/healthz", timeout=httpx.Timeout(5.0))
        return result

    def is_running(self) -> bool:
        try:
            self.health()
        except ServerNotRunning:
            return False
        return True

    def leader(self) -> dict[str, Any]:
        """Who leads the control planes sharing this server's store, and its own role."""
        result: dict[str, Any] = self._json("GET", "/v1/leader")
        return result

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text

    # -- stacks -----------------------------------------------------------------------
    def stacks(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", "/v1/stacks")
        return result

    def stack(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/v1/stacks/{name}")
        return result

    def apply(self, stack: Stack | dict[str, Any]) -> DeployResult:
        """Deploy and wait until the deploy is over (however long that takes)."""
        body = {"stack": _document(stack), "wait": True}
        return deploy_from_dict(self._json("POST", "/v1/stacks", json=body,
                                           timeout=NO_READ_TIMEOUT))

    def submit(self, stack: Stack | dict[str, Any]) -> Submitted:
        """Check the stack and start deploying it in the background."""
        body = {"stack": _document(stack), "wait": False}
        return submitted_from_dict(self._json("POST", "/v1/stacks", json=body))

    def wait_deploy(self, name: str) -> DeployResult:
        return deploy_from_dict(self._json("GET", f"/v1/stacks/{name}/deploy",
                                           timeout=NO_READ_TIMEOUT))

    def plan(self, stack: Stack | dict[str, Any]) -> PlanReport:
        return plan_from_dict(self._json("POST", "/v1/plan", json={"stack": _document(stack)}))

    def operations(self, *, stack: str | None = None, states: list[str] | None = None,
                   limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if stack:
            params["stack"] = stack
        if states:
            params["state"] = states
        result: list[dict[str, Any]] = self._json("GET", "/v1/operations", params=params)
        return result

    def restart(self, stack: str, service: str, *, rolling: bool = False,
                priority: str = "normal") -> dict[str, Any]:
        result: dict[str, Any] = self._json(
            "POST", f"/v1/stacks/{stack}/services/{service}/restart",
            json={"rolling": rolling, "priority": priority}, timeout=NO_READ_TIMEOUT)
        return result

    def history(self, stack: str, service: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json(
            "GET", f"/v1/stacks/{stack}/services/{service}/revisions")
        return result

    def rollback(self, stack: str, service: str, to: int | None = None) -> DeployResult:
        return deploy_from_dict(self._json(
            "POST", f"/v1/stacks/{stack}/services/{service}/rollback", json={"to": to},
            timeout=NO_READ_TIMEOUT))

    def recover(self, stack: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("POST", f"/v1/stacks/{stack}/recover",
                                            timeout=NO_READ_TIMEOUT)
        return result

    def promote(self, stack: str, service: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json(
            "POST", f"/v1/stacks/{stack}/services/{service}/promote")
        return result

    def abort(self, stack: str, service: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json(
            "POST", f"/v1/stacks/{stack}/services/{service}/abort")
        return result

    def scale(self, stack: str, service: str, replicas: int) -> dict[str, Any]:
        result: dict[str, Any] = self._json(
            "POST", f"/v1/stacks/{stack}/services/{service}/scale",
            json={"replicas": replicas}, timeout=NO_READ_TIMEOUT)
        return result

    def resume_autoscale(self, stack: str, service: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json(
            "POST", f"/v1/stacks/{stack}/services/{service}/autoscale/resume",
            timeout=NO_READ_TIMEOUT)
        return result

    def top(self, stack: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/v1/stacks/{stack}/top")
        return result

    def down(self, name: str) -> None:
        self._json("DELETE", f"/v1/stacks/{name}", timeout=NO_READ_TIMEOUT)

    # -- security ---------------------------------------------------------------------
    def whoami(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/v1/whoami")
        return result

    def tokens(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", "/v1/tokens")
        return result

    def create_token(self, role: str, *, stack: str | None = None, ttl: str | None = "30d",
                     name: str = "") -> dict[str, Any]:
        """A new token; the answer's `token` is its secret, shown this once."""
        result: dict[str, Any] = self._json("POST", "/v1/tokens", json={
            "role": role, "stack": stack, "ttl": ttl, "name": name})
        return result

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("DELETE", f"/v1/tokens/{token_id}")
        return result

    def audit(self, *, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", "/v1/audit",
                                                  params=_params(after=after, limit=limit))
        return result

    def audit_verify(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/v1/audit/verify")
        return result

    # -- instances, events, logs ------------------------------------------------------
    def instances(self, stack: str | None = None,
                  service: str | None = None) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json(
            "GET", "/v1/instances", params=_params(stack=stack, service=service))
        return result

    def events(self, *, after: int = 0, limit: int = 1000, stack: str | None = None,
               service: str | None = None) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json(
            "GET", "/v1/events",
            params=_params(after=after, limit=limit, stack=stack, service=service))
        return result

    def all_events(self, *, after: int = 0, stack: str | None = None,
                   service: str | None = None) -> Iterator[dict[str, Any]]:
        """Every recorded event after `after`, page by page."""
        while True:
            page = self.events(after=after, limit=1000, stack=stack, service=service)
            yield from page
            if len(page) < 1000:
                return
            after = page[-1]["seq"]

    def latest_event(self) -> int:
        return int(self._json("GET", "/v1/events/latest")["seq"])

    def follow_events(self, *, after: int = 0, stack: str | None = None,
                      service: str | None = None) -> Iterator[dict[str, Any]]:
        """Every event after `after`, then each new one, until the server goes away."""
        params = _params(after=after, stack=stack, service=service, follow="true")
        with self._stream("/v1/events", params) as response:
            for line in self._lines(response):
                if line.strip():
                    yield json.loads(line)

    def logs(self, stack: str, service: str | None = None,
             tail: int | None = None) -> list[str]:
        text = self._request("GET", f"/v1/stacks/{stack}/logs",
                             params=_params(service=service, tail=tail)).text
        return text.splitlines()

    def follow_logs(self, stack: str, service: str | None = None,
                    tail: int | None = None) -> Iterator[str]:
        params = _params(service=service, tail=tail, follow="true")
        with self._stream(f"/v1/stacks/{stack}/logs", params) as response:
            yield from self._lines(response)

    # -- plumbing ---------------------------------------------------------------------
    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        return self._request(method, url, **kwargs).json()

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._not_connected(exc) from exc
        except httpx.TransportError as exc:
            raise ConnectionLost(f"lost the connection to the Shipyard server at "
                                 f"{self.where}: {exc}") from exc
        _raise_for_error(response)
        return response

    @contextmanager
    def _stream(self, url: str, params: dict[str, str]) -> Iterator[httpx.Response]:
        try:
            with self._http.stream("GET", url, params=params,
                                   timeout=NO_READ_TIMEOUT) as response:
                if response.is_error:
                    response.read()
                    _raise_for_error(response)
                yield response
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._not_connected(exc) from exc

    def _not_connected(self, exc: httpx.TransportError) -> ShipyardError:
        """No server, or a TLS handshake that failed (which is not the same thing)."""
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, ssl.SSLError):
            cause = cause.__cause__ or cause.__context__
        text = str(exc)
        if isinstance(cause, ssl.SSLError) or "SSL" in text or "certificate" in text:
            reason = getattr(cause, "reason", None) or text
            return TLSFailure(f"TLS with the Shipyard server at {self.where} failed: {reason}",
                              hint="pass its CA with --ca FILE (SHIPYARD_CA), or --insecure "
                                   "to skip verification")
        return ServerNotRunning(self.where)

    def _lines(self, response: httpx.Response) -> Iterator[str]:
        try:
            yield from response.iter_lines()
        except httpx.TransportError as exc:
            raise ConnectionLost(f"lost the connection to the Shipyard server at "
                                 f"{self.where}") from exc


def _params(**values: object) -> dict[str, str]:
    return {k: str(v) for k, v in values.items() if v is not None}


def _raise_for_error(response: httpx.Response) -> None:
    if not response.is_error:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"error": f"the server answered HTTP {response.status_code}: "
                         f"{response.text[:200]}"}
    if not isinstance(body, dict):
        body = {"error": f"the server answered HTTP {response.status_code}"}
    raise error_from_body(body, response.status_code)
