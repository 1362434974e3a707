"""The etcd store's connection: the etcd3aio client, its calls, and their errors.

etcd3aio (grpc.aio, current protobuf; works against etcd 3.4's v3 API) balances calls
round-robin over the endpoints. Reads may be retried on UNAVAILABLE (they are idempotent);
writes are sent once, never retried here: a write whose answer was lost may have been
applied, and only the caller's next read can tell. Every failure becomes one StoreError
line naming the endpoints.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from etcd3aio import Etcd3Client, EtcdError, SortOrder, SortTarget, WatchFilter
from etcd3aio._protobuf import (  # the message types; etcd3aio exposes no public path
    Compare,
    DeleteRangeRequest,
    DeleteRangeResponse,
    PutRequest,
    RangeRequest,
    RangeResponse,
    RequestOp,
    TxnResponse,
    WatchResponse,
)
from etcd3aio.errors import EtcdConnectionError, EtcdTransientError

from shipyard.errors import InputError, StoreError
from shipyard.state.etcd_keys import prefix_end

__all__ = ["Compare", "Connection", "EtcdTls", "RangeRequest", "RequestOp", "TxnResponse"]

PAGE = 256  # keys per range read: keeps answers far below gRPC's 4 MiB message limit


def parse_endpoint(text: str) -> tuple[str, int]:
    """`host:port` (port defaults to 2379) -> (host, port); InputError if malformed."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = text.strip(), "2379"
    if host.startswith("["):
        raise InputError(f"etcd endpoint {text!r}: IPv6 addresses are not supported",
                         hint="give an IPv4 address or a host name")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"etcd endpoint {text!r} is not host:port",
                         hint="write the endpoints as etcd://host1:2379,host2:2379")
    return host, int(port)


@dataclass(frozen=True)
class EtcdTls:
    """TLS to etcd: the CA that signed its certificate, and a client certificate and key
    when etcd asks for one (`--client-cert-auth`). PEM files. `server_name`: the name to
    check the certificate against (default: the first endpoint's host)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def client_args(self, default_name: str) -> dict[str, Any]:
        def read(path: Path | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).expanduser().read_bytes()
            except OSError as exc:
                raise InputError(f"etcd TLS: cannot read the {what} {path}: "
                                 f"{exc.strerror or exc}") from None

        if (self.cert is None) != (self.key is None):
            raise InputError("etcd TLS: a client certificate needs its key (cert= and key=)")
        return {"ca_cert": read(self.ca, "CA certificate"),
                "cert_chain": read(self.cert, "client certificate"),
                "cert_key": read(self.key, "client key"),
                "tls_server_name": self.server_name or default_name}


class Connection:
    """One etcd client for a list of endpoints; `timeout` bounds every call; `tls` makes
    it speak TLS (with a client certificate, when given)."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 5.0,
                 tls: EtcdTls | None = None) -> None:
        self.tls = tls
        self.endpoints = [f"{h}:{p}" for h, p in map(parse_endpoint, endpoints)]
        if not self.endpoints:
            raise InputError("no etcd endpoint given",
                             hint="write the store as etcd://host1:2379,host2:2379")
        self.timeout = timeout
        self.where = ",".join(self.endpoints)
        self._client: Etcd3Client | None = None

    @property
    def is_open(self) -> bool:
        return self._client is not None

    async def open(self) -> None:
        """Resolve the host names (the client takes addresses) and open the channel."""
        addresses = [await self._resolve(e) for e in self.endpoints]
        tls = {} if self.tls is None else self.tls.client_args(
            parse_endpoint(self.endpoints[0])[0])
        client = Etcd3Client(addresses, rpc_max_attempts=3, **tls)
        await client.connect()
        self._client = client

    async def _resolve(self, endpoint: str) -> str:
        host, port = parse_endpoint(endpoint)
        try:
            ipaddress.IPv4Address(host)
            return endpoint
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_STREAM),
                self.timeout)
        except (OSError, TimeoutError) as exc:
            raise StoreError(f"etcd at {self.where}: cannot resolve {host!r} ({exc})",
                             hint="check the host names of the etcd endpoints") from None
        return f"{infos[0][4][0]}:{port}"

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def _kv(self, what: str) -> Etcd3Client:
        client = self._client
        if client is None or client.kv is None:
            raise StoreError(f"state store etcd://{self.where} is not open",
                             hint="call `await store.open()` first")
        return client

    def error(self, exc: BaseException, what: str) -> StoreError:
        """One line saying what failed, where, and why."""
        if isinstance(exc, StoreError):
            return exc
        where = f"etcd at {self.where}"
        if isinstance(exc, TimeoutError | EtcdTransientError):
            return StoreError(f"{where} did not answer within {self.timeout:g}s "
                              f"while {what}", hint="is the etcd cluster up and has quorum?")
        if isinstance(exc, EtcdConnectionError):
            return StoreError(f"{where} is unreachable while {what} ({_detail(exc)})",
                              hint="check that etcd runs and listens on these endpoints")
        if isinstance(exc, grpc.aio.AioRpcError):
            detail = (exc.details() or exc.code().name).removeprefix("etcdserver: ")
            hint = None
            if "too many operations" in detail or "too large" in detail:
                hint = ("make the transaction smaller, or raise etcd's --max-txn-ops / "
                        "--max-request-bytes (and ?max_txn_ops= in the store URL)")
            return StoreError(f"{where} refused {what}: {detail}", hint=hint)
        return StoreError(f"{where}: {_detail(exc)} while {what}")

    # -- calls ----------------------------------------------------------------------------
    async def txn(self, compare: Sequence[Compare], success: Sequence[RequestOp],
                  failure: Sequence[RequestOp] = (), *, what: str,
                  write: bool = True) -> TxnResponse:
        client = self._kv(what)
        assert client.kv is not None
        try:
            return await client.kv.txn(compare, success, failure, timeout=self.timeout,
                                       max_attempts=1 if write else None)
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
            raise self.error(exc, what) from None

    async def get(self, key: bytes, *, what: str) -> RangeResponse:
        return await self.range(key, None, what=what)

    async def range(self, key: bytes, end: bytes | None, *, what: str, limit: int = 0,
                    revision: int = 0, keys_only: bool = False, count_only: bool = False,
                    descending: bool = False) -> RangeResponse:
        client = self._kv(what)
        assert client.kv is not None
        try:
            return await client.kv.get(
                key, end, revision=revision, limit=limit, keys_only=keys_only,
                count_only=count_only, timeout=self.timeout,
                sort_order=SortOrder.DESCEND if descending else SortOrder.NONE,
                sort_target=SortTarget.KEY)
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
            raise self.error(exc, what) from None

    async def range_all(self, start: bytes, end: bytes, *, what: str,
                        keys_only: bool = False) -> tuple[list[Any], int]:
        """Every key-value in [start, end) in key order, read page by page at one etcd
        revision (a consistent snapshot), and that revision."""
        out: list[Any] = []
        revision = 0
        while True:
            resp = await self.range(start, end, what=what, limit=PAGE, revision=revision,
                                    keys_only=keys_only)
            revision = revision or resp.header.revision
            out.extend(resp.kvs)
            if not resp.more or not resp.kvs:
                return out, revision
            start = resp.kvs[-1].key + b"\0"

    async def delete_range(self, start: bytes, end: bytes, *, what: str
                           ) -> DeleteRangeResponse:
        client = self._kv(what)
        assert client.kv is not None
        try:
            return await client.kv.delete(start, end, timeout=self.timeout, max_attempts=1)
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
            raise self.error(exc, what) from None

    # -- leases (the leader election, state/election.py) ----------------------------------
    async def lease_grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: (its id, the TTL etcd granted)."""
        client = self._kv("granting a lease")
        assert client.lease is not None
        try:
            resp = await client.lease.grant(ttl, timeout=self.timeout)
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
            raise self.error(exc, "granting a lease") from None
        return int(resp.ID), int(resp.TTL)

    async def lease_keepalive(self, lease: int) -> int:
        """Renew `lease` once; the TTL it has again (0 or less: it has expired)."""
        client = self._kv("renewing a lease")
        assert client.lease is not None
        call = client.lease.keep_alive(lease)
        try:
            async with asyncio.timeout(self.timeout):
                async for resp in call:
                    return int(resp.TTL)
            return 0
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
            raise self.error(exc, "renewing a lease") from None
        finally:
            call.cancel()

    async def lease_revoke(self, lease: int) -> None:
        """Revoke `lease`: the keys attached to it are deleted at once."""
        client = self._kv("revoking a lease")
        assert client.lease is not None
        try:
            await client.lease.revoke(lease, timeout=self.timeout, max_attempts=1)
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
            raise self.error(exc, "revoking a lease") from None

    def watch_key(self, key: bytes, start_revision: int) -> AsyncIterator[WatchResponse]:
        """Puts and deletes of one key from `start_revision` on."""
        client = self._kv("watching")
        assert client.watch is not None
        return client.watch.watch(key, start_revision=start_revision)

    def watch_prefix(self, prefix: bytes, start_revision: int, *,
                     prev_kv: bool = False) -> AsyncIterator[WatchResponse]:
        """Puts and deletes of every key under `prefix` from `start_revision` on (the
        nodes and assignments of agent/; issue 10)."""
        client = self._kv("watching")
        assert client.watch is not None
        return client.watch.watch(prefix, prefix_end(prefix), start_revision=start_revision,
                                  prev_kv=prev_kv)

    def watch(self, prefix: bytes) -> AsyncIterator[WatchResponse]:
        """New puts under `prefix` from now on (the client reconnects by itself)."""
        client = self._kv("watching")
        assert client.watch is not None
        return client.watch.watch(prefix, prefix_end(prefix), filters=[WatchFilter.NODELETE])


def _detail(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, EtcdError) and isinstance(exc.__cause__, grpc.aio.AioRpcError):
        cause = exc.__cause__
        text = f"{cause.code().name}: {cause.details() or ''}".rstrip(": ")
    return " ".join(text.split())


def range_op(key: bytes, end: bytes | None = None, *, count_only: bool = False,
             keys_only: bool = False, min_create_revision: int = 0) -> RequestOp:
    """A read inside a transaction (used to learn why its comparisons failed)."""
    return RequestOp(request_range=RangeRequest(
        key=key, range_end=end or b"", count_only=count_only, keys_only=keys_only,
        min_create_revision=min_create_revision))


def put_op(key: bytes, value: bytes, lease: int = 0) -> RequestOp:
    return RequestOp(request_put=PutRequest(key=key, value=value, lease=lease))


def delete_op(key: bytes, end: bytes | None = None) -> RequestOp:
    return RequestOp(request_delete_range=DeleteRangeRequest(key=key, range_end=end or b""))
