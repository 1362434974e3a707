"""Shipyard's own secret store: values encrypted at rest in $SHIPYARD_HOME.

`secrets.db` (SQLite, mode 0600) keeps per secret a random 96-bit nonce and the AES-256-GCM
ciphertext of its value, authenticated with the secret's name as associated data (a row
copied under another name does not decrypt). The 256-bit key is `secrets.key`, created on
the first `set` with mode 0600; a key file that others may read or that belongs to someone
else is refused, as ssh refuses such a private key. Whoever can read the key and the
database can read the secrets: the store protects copies of the database (backups, a
state directory shared by mistake), not against the home's owner or root.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from shipyard.errors import InputError, NotFoundError
from shipyard.security.errors import SecurityConfigError
from shipyard.spec.base import NAME_RE

KEY_FILE = "secrets.key"
DB_FILE = "secrets.db"
MAX_VALUE = 64 * 1024  # bytes of UTF-8
_AAD = b"shipyard-secret:"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT PRIMARY KEY,
    nonce BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class StoredSecret:
    """What may be shown of a stored secret: never its value."""

    name: str
    created_at: float
    updated_at: float

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "created_at": self.created_at,
                "updated_at": self.updated_at}


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InputError(f"invalid secret name {name!r}",
                         hint="lowercase letters, digits, - or _, at most 63")
    return name


def check_value(value: str) -> str:
    """A value an environment variable can carry: not empty, no NUL, at most 64 KiB."""
    if not value:
        raise InputError("a secret's value must not be empty")
    if "\0" in value:
        raise InputError("a secret's value must not contain a NUL character")
    if len(value.encode("utf-8", "surrogateescape")) > MAX_VALUE:
        raise InputError(f"a secret's value must be at most {MAX_VALUE} bytes")
    return value


class SecretStore:
    """The stored secrets of one home. Each call opens the database afresh: the CLI (with
    no server running) and the server may both use it."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.key_path = self.home / KEY_FILE
        self.db_path = self.home / DB_FILE
        self._lock = threading.Lock()

    # -- the key ----------------------------------------------------------------------
    def _key(self, *, create: bool) -> bytes | None:
        try:
            fd = os.open(self.key_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if not create:
                return None
            return self._new_key()
        except OSError as exc:
            raise SecurityConfigError(f"cannot read the secret key {self.key_path}: "
                                      f"{exc.strerror or exc}") from None
        try:
            info = os.fstat(fd)
            if info.st_mode & 0o077:
                raise SecurityConfigError(
                    f"the secret key {self.key_path} has mode "
                    f"{stat.S_IMODE(info.st_mode):04o}: others may read it",
                    hint=f"chmod 600 {self.key_path}")
            if info.st_uid != os.geteuid():
                raise SecurityConfigError(f"the secret key {self.key_path} belongs to uid "
                                          f"{info.st_uid}, not to this user ({os.geteuid()})")
            key = os.read(fd, 64)
        finally:
            os.close(fd)
        if len(key) != 32:
            raise SecurityConfigError(f"the secret key {self.key_path} is damaged "
                                      f"({len(key)} bytes, expected 32)")
        return key

    def _new_key(self) -> bytes:
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = secrets.token_bytes(32)  # what AESGCM.generate_key(256) does
        try:
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # made meanwhile by another process: use that one
            found = self._key(create=False)
            assert found is not None
            return found
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        return key

    # -- the database -----------------------------------------------------------------
    @contextlib.contextmanager
    def _db(self, *, create: bool) -> Iterator[sqlite3.Connection | None]:
        if not create and not self.db_path.exists():
            yield None
            return
        if create:
            self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(FileExistsError):
                self.db_path.touch(mode=0o600, exist_ok=False)
        db = sqlite3.connect(self.db_path, timeout=10, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout=10000")
            db.executescript(_SCHEMA)
            yield db
        finally:
            db.close()

    # -- operations -------------------------------------------------------------------
    def set(self, name: str, value: SecretStr | str) -> bool:
        """Store `value` under `name`; True if it is new, False if it replaced one."""
        check_name(name)
        plain = value.get_secret_value() if isinstance(value, SecretStr) else value
        check_value(plain)
        with self._lock, self._db(create=True) as db:
            assert db is not None
            key = self._key(create=True)
            assert key is not None
            nonce = secrets.token_bytes(12)
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # on use only

            sealed = AESGCM(key).encrypt(nonce, plain.encode("utf-8", "surrogateescape"),
                                         _AAD + name.encode())
            now = time.time()
            db.execute("BEGIN IMMEDIATE")
            try:
                old = db.execute("SELECT 1 FROM secrets WHERE name = ?", (name,)).fetchone()
                db.execute(
                    "INSERT INTO secrets (name, nonce, ciphertext, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                    "nonce = excluded.nonce, ciphertext = excluded.ciphertext, "
                    "updated_at = excluded.updated_at", (name, nonce, sealed, now, now))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return old is None

    def get(self, name: str) -> SecretStr | None:
        """The value stored under `name`, or None."""
        with self._lock, self._db(create=False) as db:
            if db is None:
                return None
            row = db.execute("SELECT nonce, ciphertext FROM secrets WHERE name = ?",
                             (name,)).fetchone()
        if row is None:
            return None
        key = self._key(create=False)
        if key is None:
            raise SecurityConfigError(f"stored secret {name} cannot be decrypted: the key "
                                      f"file {self.key_path} is missing")
        from cryptography.exceptions import InvalidTag  # imported on use: the control
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # plane's RSS

        try:
            plain = AESGCM(key).decrypt(row[0], row[1], _AAD + name.encode())
        except InvalidTag:
            raise SecurityConfigError(f"stored secret {name} cannot be decrypted: the key "
                                      "file was replaced, or the store altered") from None
        return SecretStr(plain.decode("utf-8", "surrogateescape"))

    def require(self, name: str) -> SecretStr:
        value = self.get(name)
        if value is None:
            raise NotFoundError(f"no stored secret {name}",
                                hint=f"set it with `shipyard secret set {name}`")
        return value

    def list(self) -> list[StoredSecret]:
        """Every stored secret's name and times, by name."""
        with self._lock, self._db(create=False) as db:
            if db is None:
                return []
            rows = db.execute("SELECT name, created_at, updated_at FROM secrets "
                              "ORDER BY name").fetchall()
        return [StoredSecret(*row) for row in rows]

    def delete(self, name: str) -> bool:
        """Forget `name`; False if there was no such secret."""
        with self._lock, self._db(create=False) as db:
            if db is None:
                return False
            gone = db.execute("DELETE FROM secrets WHERE name = ?", (name,)).rowcount
        return bool(gone)
