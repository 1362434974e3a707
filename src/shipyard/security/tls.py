"""TLS for the TCP listener: a small CA of the home, the server's certificate, client
certificates carrying a role, and the SSL contexts of both ends (TLS 1.2 at least).

`shipyard tls init` writes `tls/ca.crt`, `tls/ca.key`, `tls/server.crt` (for 127.0.0.1,
::1 and localhost) and `tls/server.key`; `shipyard tls client NAME --role ROLE` signs a
client certificate whose subject is `CN=NAME, OU=ROLE`. Keys are ECDSA P-256, written 0600.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shipyard.security.errors import SecurityConfigError

DEFAULT_HOSTS = ("127.0.0.1", "::1", "localhost")
CA_DAYS = 3650
CERT_DAYS = 365


@dataclass(frozen=True)
class IssuedFiles:
    cert: Path
    key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common: str, unit: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Shipyard")]
    if unit:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common))
    return x509.Name(attrs)


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
             days: int) -> x509.CertificateBuilder:
    start = _now() - dt.timedelta(minutes=5)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False))


def create_ca(directory: Path, *, days: int = CA_DAYS, name: str = "Shipyard CA",
              force: bool = False) -> IssuedFiles:
    """A new CA in `directory` (ca.crt, ca.key); refuses to replace one unless `force`."""
    files = IssuedFiles(directory / "ca.crt", directory / "ca.key")
    if files.cert.exists() and not force:
        raise SecurityConfigError(f"a CA already exists at {files.cert}",
                                  hint="pass --force to replace it (every certificate it "
                                       "signed stops working)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name)
    cert = (_builder(subject, subject, key, days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(files.key, _key_pem(key), private=True)
    _write(files.cert, _cert_pem(cert), private=False)
    return files


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    if not cert_path.is_file() or not key_path.is_file():
        raise SecurityConfigError(f"no CA in {directory}",
                                  hint="create one with `shipyard tls init`")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecurityConfigError(f"{key_path} is not an ECDSA key")
    return cert, key


def _leaf(ca_dir: Path, subject: x509.Name, days: int, usage: x509.ObjectIdentifier,
          sans: list[x509.GeneralName] | None, out: IssuedFiles) -> IssuedFiles:
    ca_cert, ca_key = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (_builder(subject, ca_cert.subject, key, days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                              critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                            content_commitment=False, data_encipherment=False,
                                            key_agreement=True, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write(out.key, _key_pem(key), private=True)
    _write(out.cert, _cert_pem(cert), private=False)
    return out


def issue_server(ca_dir: Path, hosts: Iterable[str] = DEFAULT_HOSTS, *,
                 days: int = CERT_DAYS) -> IssuedFiles:
    """server.crt / server.key in `ca_dir`, valid for `hosts` (IP addresses or names)."""
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    out = IssuedFiles(ca_dir / "server.crt", ca_dir / "server.key")
    return _leaf(ca_dir, _name("shipyard-server"), days, ExtendedKeyUsageOID.SERVER_AUTH,
                 sans, out)


def issue_client(ca_dir: Path, name: str, role: str, out_dir: Path, *,
                 days: int = CERT_DAYS) -> IssuedFiles:
    """NAME.crt / NAME.key in `out_dir`: a client certificate `CN=name, OU=role`."""
    if not name or "/" in name or name.startswith("."):
        raise SecurityConfigError(f"invalid certificate name {name!r}")
    out = IssuedFiles(out_dir / f"{name}.crt", out_dir / f"{name}.key")
    return _leaf(ca_dir, _name(name, role), days, ExtendedKeyUsageOID.CLIENT_AUTH, None, out)


def server_context(cert: Path, key: Path, client_ca: Path | None = None,
                   require_client_cert: bool = False) -> ssl.SSLContext:
    """The TCP listener's context: TLS 1.2+, client certificates from `client_ca`
    verified when presented (required with `require_client_cert`)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    try:
        ctx.load_cert_chain(str(cert), str(key))
        if client_ca is not None:
            ctx.load_verify_locations(cafile=str(client_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as exc:
        raise SecurityConfigError(f"cannot load the TLS certificate {cert}: {exc}") from None
    return ctx


def client_context(ca: Path | None = None, *, insecure: bool = False,
                   cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """The client's context: verifies the server against `ca` (else the system's CAs),
    or not at all with `insecure`; presents `cert` when given."""
    try:
        if insecure:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        raise SecurityConfigError(f"cannot load TLS files: {exc}") from None
    return ctx


@dataclass(frozen=True)
class PeerCert:
    """A verified client certificate: its name, the role it carries, its fingerprint."""

    name: str
    role: str | None
    fingerprint: str


def peer_cert(ssl_object: Any) -> PeerCert | None:
    """The verified client certificate of a TLS connection, if it presented one."""
    if ssl_object is None:
        return None
    info = ssl_object.getpeercert()
    der = ssl_object.getpeercert(binary_form=True)
    if not info or not der:
        return None
    fields = {k: v for rdn in info.get("subject", ()) for k, v in rdn}
    name = fields.get("commonName")
    if not name:
        return None
    return PeerCert(name, fields.get("organizationalUnitName"),
                    hashlib.sha256(der).hexdigest()[:16])
