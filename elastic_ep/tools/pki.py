"""A throwaway PKI for tests and the demo: a CA, a server certificate for 127.0.0.1 and
client certificates, written as PEM files. Production certificates come from the
operator's CA (see docs/etcd-security.md)."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from typing import Any, Mapping

from elastic_ep.errors import ConfigError
from elastic_ep.tools.etcd_server import TLSFiles


@dataclass(frozen=True)
class CertKey:
    """PEM paths of one certificate and its private key."""

    cert: str
    key: str


@dataclass(frozen=True)
class PKI:
    """PEM files written by :func:`make_test_pki`.

    ``ca``: the CA certificate (clients and the server trust it); ``server``: the
    server's certificate (SAN IP 127.0.0.1, DNS localhost) and key; ``clients``: one
    certificate per client name, ``{"rank-0": CertKey("<dir>/rank-0.pem",
    "<dir>/rank-0-key.pem")}``, whose subject CN is the name.
    """

    directory: str
    ca: str
    server: CertKey
    clients: Mapping[str, CertKey]

    def server_tls(self) -> TLSFiles:
        """What :class:`elastic_ep.tools.etcd_server.EtcdServer` takes as ``tls=``."""
        return TLSFiles(ca=self.ca, cert=self.server.cert, key=self.server.key)


def make_test_pki(directory: str, client_names: list[str], days: int = 7) -> PKI:
    """A fresh CA, a server certificate for 127.0.0.1 / localhost and one client
    certificate per name (CN = the name), written as PEM files into ``directory``.

    FOR TESTS AND THE DEMO ONLY: the CA key lies unencrypted next to the certificates,
    the certificates expire after ``days`` days and nothing can revoke them. Production
    certificates come from the operator's CA (cert-manager, Vault, ...); see
    docs/etcd-security.md.

    Needs the ``cryptography`` package (not a runtime dependency of elastic-ep).
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as e:
        raise ConfigError("make_test_pki needs the 'cryptography' package: pip install cryptography") from e
    for name in client_names:
        if not name or "/" in name or name.startswith(".") or name in ("ca", "server"):
            raise ConfigError(f"client name {name!r} must be a file name other than 'ca' and 'server'")
    if len(set(client_names)) != len(client_names):
        raise ConfigError(f"client names {client_names} repeat")
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)

    def write(path: str, data: bytes, private: bool) -> str:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    def write_key(key: Any, stem: str) -> str:
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        return write(os.path.join(directory, f"{stem}-key.pem"), pem, private=True)

    def write_cert(cert: Any, stem: str) -> str:
        return write(os.path.join(directory, f"{stem}.pem"), cert.public_bytes(serialization.Encoding.PEM), private=False)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"elastic-ep test CA {os.path.basename(directory)}")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_key(ca_key, "ca")

    def issue(cn: str, usages: list[Any], san: list[Any] | None) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(ca_key, hashes.SHA256()), key

    # clientAuth too: with --client-cert-auth, etcd 3.4's HTTP gateway dials the gRPC port
    # with the server's own certificate, and logs "incompatible key usage" without it.
    server_cert, server_key = issue(
        "localhost", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
    )
    clients: dict[str, CertKey] = {}
    for name in client_names:
        cert, key = issue(name, [ExtendedKeyUsageOID.CLIENT_AUTH], None)
        clients[name] = CertKey(write_cert(cert, name), write_key(key, name))
    return PKI(
        directory=directory,
        ca=write_cert(ca_cert, "ca"),
        server=CertKey(write_cert(server_cert, "server"), write_key(server_key, "server")),
        clients=clients,
    )
