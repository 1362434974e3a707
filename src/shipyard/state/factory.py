"""Choose a state store from a path or a URL."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from shipyard.errors import InputError
from shipyard.state.base import StateStore

_SQLITE = "sqlite://"
_ETCD = "etcd://"
_ETCD_OPTIONS = {"timeout": float, "max_txn_ops": int, "max_txn_bytes": int}
_ETCD_TLS = ("ca", "cert", "key", "server_name")  # TLS: PEM file paths, and a name


def open_store(url_or_path: str | Path) -> StateStore:
    """The store for `url_or_path`, not opened yet (`await store.open()` or `async with`).

    Accepted: a file path (`~/.shipyard/state.db`), `sqlite:///abs/path/state.db`, or
    `etcd://host1:2379,host2:2379[/cluster][?timeout=5&max_txn_ops=128&max_txn_bytes=N]`
    (the cluster names a namespace in etcd, "default" when omitted), with TLS when the
    options name its files: `?ca=/etc/etcd/ca.crt&cert=client.crt&key=client.key`
    (`server_name=` to check the certificate against another name than the host's).
    """
    from shipyard.state.sqlite import SQLiteStore

    if isinstance(url_or_path, Path):
        return SQLiteStore(url_or_path)
    text = url_or_path.strip()
    if not text:
        raise InputError("the state store location is empty",
                         hint="give a file path or sqlite:///abs/path/state.db")
    if text.startswith(_SQLITE):
        path = text[len(_SQLITE):]
        if not path.startswith("/"):
            raise InputError(f"state store URL {text!r} must hold an absolute path",
                             hint="write it as sqlite:///abs/path/state.db")
        return SQLiteStore(path)
    scheme, sep, _ = text.partition("://")
    if sep and scheme.replace("+", "").isalnum():
        if scheme == "etcd":
            return _etcd_store(text)
        raise InputError(f"state store {text!r}: unknown store type {scheme!r}",
                         hint="use a file path or sqlite:///abs/path/state.db")
    return SQLiteStore(text)


def _etcd_store(url: str) -> StateStore:
    """`etcd://h1:2379,h2:2379[/cluster][?options]` -> an EtcdStore (not opened)."""
    from shipyard.state.etcd import EtcdStore

    rest, _, query = url[len(_ETCD):].partition("?")
    hosts, _, cluster = rest.partition("/")
    cluster = cluster.strip("/") or "default"
    if not hosts:
        raise InputError(f"state store {url!r} names no etcd endpoint",
                         hint="write it as etcd://host1:2379,host2:2379[/cluster]")
    options: dict[str, Any] = {}
    tls: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in _ETCD_TLS:
            if not value:
                raise InputError(f"state store {url!r}: option {name} is empty")
            tls[name] = value if name == "server_name" else Path(value)
            continue
        kind = _ETCD_OPTIONS.get(name)
        if kind is None:
            raise InputError(f"state store {url!r}: unknown option {name!r}",
                             hint="known options: "
                             + ", ".join([*_ETCD_OPTIONS, *_ETCD_TLS]))
        try:
            options[name] = kind(value)
            if options[name] <= 0:
                raise ValueError
        except ValueError:
            raise InputError(f"state store {url!r}: option {name}={value!r} must be a "
                             f"positive {kind.__name__}") from None
    if tls:
        from shipyard.state.etcd_conn import EtcdTls

        options["tls"] = EtcdTls(**tls)
    return EtcdStore([h for h in hosts.split(",") if h.strip()], cluster, **options)
