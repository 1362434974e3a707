"""The etcd store over TLS with client certificates: a real etcd started with
`--client-cert-auth` and certificates from Shipyard's own CA (`shipyard tls init`'s
code); a client with a certificate of that CA works, one without or from another CA is
refused with one clear error."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard.errors import StoreError
from shipyard.security.tls import create_ca, issue_client, issue_server
from shipyard.state.base import StackRecord
from shipyard.state.factory import open_store
from tests.etcd_cluster import _free_port, require_etcd


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """One etcd member speaking TLS only, requiring client certificates of our CA."""
    etcd = require_etcd()
    ca = tmp_path / "ca"
    create_ca(ca)
    server = issue_server(ca, ("127.0.0.1", "localhost"))
    client_port, peer_port = _free_port(), _free_port()
    endpoint = f"127.0.0.1:{client_port}"
    proc = subprocess.Popen(
        [etcd, "--name", "tls", "--data-dir", str(tmp_path / "data"),
         "--listen-client-urls", f"https://{endpoint}",
         "--advertise-client-urls", f"https://{endpoint}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
         "--initial-cluster", f"tls=http://127.0.0.1:{peer_port}",
         "--cert-file", str(server.cert), "--key-file", str(server.key),
         "--trusted-ca-file", str(ca / "ca.crt"), "--client-cert-auth",
         "--log-level", "error", "--logger", "zap"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield endpoint, ca
    finally:
        proc.kill()
        proc.wait(10)


def store_url(endpoint: str, cluster: str, **tls: Path) -> str:
    query = "&".join(f"{k}={v}" for k, v in tls.items())
    return f"etcd://{endpoint}/{cluster}?timeout=2" + (f"&{query}" if query else "")


async def open_when_up(url: str, deadline: float = 20.0):  # type: ignore[no-untyped-def]
    end = time.monotonic() + deadline
    while True:
        store = open_store(url)
        try:
            await store.open()
            await store.list_stacks()
            return store
        except StoreError:
            await store.close()
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.2)


async def test_store_over_tls_with_a_client_certificate(tls_etcd: tuple[str, Path],
                                                        tmp_path: Path) -> None:
    endpoint, ca = tls_etcd
    mine = issue_client(ca, "control-plane", "admin", tmp_path / "client")
    url = store_url(endpoint, "tls", ca=ca / "ca.crt", cert=mine.cert, key=mine.key)
    store = await open_when_up(url)
    try:
        await store.put_stack(StackRecord("demo", {"name": "demo", "services": {}}))
        assert [s.name for s in await store.list_stacks()] == ["demo"]
    finally:
        await store.close()
    # without a client certificate, and with one from another CA: refused, one line
    other = tmp_path / "other-ca"
    create_ca(other, name="Someone else's CA")
    theirs = issue_client(other, "intruder", "admin", tmp_path / "intruder")
    for url in (store_url(endpoint, "tls", ca=ca / "ca.crt"),
                store_url(endpoint, "tls", ca=ca / "ca.crt", cert=theirs.cert,
                          key=theirs.key)):
        store = open_store(url)
        with pytest.raises(StoreError) as refused:
            await store.open()
            await store.list_stacks()
        await store.close()
        assert endpoint in str(refused.value) and "\n" not in str(refused.value)


def test_tls_options_are_checked() -> None:
    from shipyard.errors import InputError

    with pytest.raises(InputError, match="needs its key"):
        asyncio.run(open_store("etcd://127.0.0.1:1/x?cert=/tmp/c.pem").open())
    with pytest.raises(InputError, match="cannot read the CA certificate"):
        asyncio.run(open_store("etcd://127.0.0.1:1/x?ca=/nonexistent/ca.pem").open())
