"""etcd access control for a deployment: who may write which keys.

The key layout under ``root = <prefix>/<deployment>`` and who writes it::

    <root>/ranks/<id>              rank <id> (its registration, under its lease)
    <root>/load/<id>               rank <id> (its expert load window)
    <root>/acks/<id>               rank <id> (its ack of the newest plan, epoch inside)
    <root>/store/...               every rank (barrier keys, heartbeats, endpoints)
    <root>/leader, epoch, plan, committed, election...   controllers only

:func:`auth_layout` turns that into etcd roles and users (a pure function, so a test
and the operator doc can read it); :func:`setup_auth` applies it through etcd's v3
Auth API and enables auth. etcd 3.4 grants permissions on one key or on a key range
(a prefix), with no wildcard in the middle of a key; every key a rank writes is
therefore one key named by its id (an ack carries its epoch in the value), so each
rank role is granted exactly its own keys plus the shared ``store/`` scratch.

:func:`make_test_pki` writes a throwaway CA and certificates for tests and the demo.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import grpc

from controller.etcd_client import call
from controller.etcd_server import TLSFiles
from elastic_ep.errors import ConfigError

log = logging.getLogger(__name__)

Perm = Literal["read", "write", "readwrite"]


# -- test PKI ---------------------------------------------------------------------------

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
        """What :class:`controller.etcd_server.EtcdServer` takes as ``tls=``."""
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


# -- roles and users ----------------------------------------------------------------------

@dataclass(frozen=True)
class Grant:
    """One etcd permission: ``perm`` on the key ``key`` alone, or with ``prefix`` on
    every key that starts with ``key``."""

    perm: Perm
    key: str
    prefix: bool = False

    def range_end(self) -> bytes:
        """etcd's ``range_end``: empty for one key, ``key`` with its last byte + 1 for a prefix."""
        from etcd3.utils import prefix_range_end

        return prefix_range_end(self.key.encode()) if self.prefix else b""


@dataclass(frozen=True)
class Role:
    """An etcd role, e.g. ``Role("elastic-ep-rank-3", (Grant("readwrite", "/elastic-ep/default/ranks/3"), ...))``."""

    name: str
    grants: tuple[Grant, ...]


def controller_role_name(role_prefix: str = "elastic-ep") -> str:
    return f"{role_prefix}-controller"


def rank_user(rank_id: str, role_prefix: str = "elastic-ep") -> str:
    """The etcd user (and role) of rank ``rank_id``: ``elastic-ep-rank-<id>``. With
    ``--client-cert-auth``, a certificate whose CN is this name acts as this user."""
    return f"{role_prefix}-rank-{rank_id}"


def auth_layout(root: str, rank_ids: list[str], role_prefix: str = "elastic-ep") -> list[Role]:
    """The roles of a deployment under ``root``: the controller's first, then one per rank.

    controller: readwrite ``<root>/`` (prefix).
    rank <id>:  readwrite ``<root>/ranks/<id>``, ``<root>/load/<id>`` and
                ``<root>/acks/<id>`` (single keys), readwrite ``<root>/store/`` (prefix),
                read ``<root>/`` (prefix).
    """
    if not root.startswith("/") or root.endswith("/"):
        raise ConfigError(f"root {root!r} must start and not end with '/'")
    for rid in rank_ids:
        if not rid or "/" in rid:
            raise ConfigError(f"rank id {rid!r} must be non-empty and without '/'")
    if len(set(rank_ids)) != len(rank_ids):
        raise ConfigError(f"rank ids {rank_ids} repeat")
    top = root + "/"
    roles = [Role(controller_role_name(role_prefix), (Grant("readwrite", top, prefix=True),))]
    for rid in rank_ids:
        roles.append(Role(rank_user(rid, role_prefix), (
            Grant("read", top, prefix=True),
            Grant("readwrite", f"{top}ranks/{rid}"),
            Grant("readwrite", f"{top}load/{rid}"),
            Grant("readwrite", f"{top}acks/{rid}"),
            Grant("readwrite", f"{top}store/", prefix=True),
        )))
    return roles


def _auth(client: Any, method: str, request: Any) -> Any:
    """One Auth RPC with the client's token (if it has one), errors translated."""
    stub_call = getattr(client.authstub, method)
    return call(stub_call, f"etcd auth {method}", request, client.timeout,
                credentials=client.call_credentials, metadata=client.metadata)


def _password_state(client: Any, user: str, password: str) -> str:
    """``"ok"`` or ``"wrong"`` (auth is on), or ``"auth-off"``: asks etcd to
    authenticate ``user``, which it answers only while auth is enabled."""
    from etcd3 import etcdrpc

    try:
        client.authstub.Authenticate(etcdrpc.AuthenticateRequest(name=user, password=password), client.timeout)
        return "ok"
    except grpc.RpcError as e:
        details = (e.details() if hasattr(e, "details") else None) or ""
        if "authentication is not enabled" in details:
            return "auth-off"
        if "authentication failed" in details:
            return "wrong"
        raise


def setup_auth(
    client: Any,
    root: str,
    controller_user: str,
    controller_password: str,
    ranks: dict[str, str],
    *,
    root_password: str,
    role_prefix: str = "elastic-ep",
) -> list[Role]:
    """Create the roles of :func:`auth_layout`, their users and etcd's ``root`` user,
    then enable auth. Returns the roles.

    ``client``: an ``etcd3`` client, authenticated as ``root`` if auth is already on.
    ``ranks``: rank id -> password of its user :func:`rank_user` (``{"0": pw0, "1": pw1}``).
    Passwords are arguments: read them from files or the environment, never from code.
    Role names do not contain ``root``: deployments sharing one etcd cluster each pass
    their own ``role_prefix`` (``"elastic-ep-prod"``), else their rank roles merge and
    rank 0 of one may write rank 0's keys of the other.

    Idempotent: existing roles and users are kept, grants are re-applied (etcd replaces
    a grant on the same key range), role memberships added. An existing user whose
    password differs from the given one gets the given one; etcd then drops that user's
    tokens, so its connected clients must reconnect. Grants that the layout no longer
    holds, and users or roles of removed ranks, are left in place (remove them with
    ``etcdctl role revoke-permission`` / ``user delete``).
    """
    from etcd3 import etcdrpc
    from etcd3.etcdrpc import auth_pb2

    roles = auth_layout(root, list(ranks), role_prefix)
    users: list[tuple[str, str, str]] = [(controller_user, controller_password, roles[0].name)]  # name, pw, role
    users += [(rank_user(rid, role_prefix), pw, rank_user(rid, role_prefix)) for rid, pw in ranks.items()]
    # root last: if this client is root, a password change ends its token.
    users.append(("root", root_password, "root"))
    names = [u for u, _, _ in users]
    if len(set(names)) != len(names):
        raise ConfigError(f"etcd user names collide: {names}")
    for user, pw, _ in users:
        if not user or not pw:
            raise ConfigError(f"etcd user {user!r} needs a non-empty name and password")

    perm_type = {"read": auth_pb2.Permission.READ, "write": auth_pb2.Permission.WRITE,
                 "readwrite": auth_pb2.Permission.READWRITE}
    have_roles = set(_auth(client, "RoleList", etcdrpc.AuthRoleListRequest()).roles)
    for name in ["root"] + [r.name for r in roles]:
        if name not in have_roles:
            _auth(client, "RoleAdd", etcdrpc.AuthRoleAddRequest(name=name))
    for role in roles:
        for g in role.grants:
            perm = auth_pb2.Permission(permType=perm_type[g.perm], key=g.key.encode(), range_end=g.range_end())
            _auth(client, "RoleGrantPermission", etcdrpc.AuthRoleGrantPermissionRequest(name=role.name, perm=perm))

    have_users = set(_auth(client, "UserList", etcdrpc.AuthUserListRequest()).users)
    auth_on = False
    for user, pw, role_name in users:
        state = "new"
        if user not in have_users:
            _auth(client, "UserAdd", etcdrpc.AuthUserAddRequest(name=user, password=pw))
        else:
            state = call(_password_state, f"etcd auth check {user!r}", client, user, pw)
            auth_on = auth_on or state != "auth-off"
        _auth(client, "UserGrantRole", etcdrpc.AuthUserGrantRoleRequest(user=user, role=role_name))
        if state in ("wrong", "auth-off"):
            # With auth off no token exists to drop; with auth on the old password is replaced.
            _auth(client, "UserChangePassword", etcdrpc.AuthUserChangePasswordRequest(name=user, password=pw))
            if state == "wrong":
                log.warning("etcd user %s: password changed; its clients must reconnect", user)
    if not auth_on:
        _auth(client, "AuthEnable", etcdrpc.AuthEnableRequest())
    log.info("etcd auth enabled under %s: %d roles, users %s", root, len(roles) + 1, names)
    return roles
