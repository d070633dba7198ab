"""etcd access control for a deployment: who may write which keys.

The key layout under ``root = <prefix>/<deployment>`` and who writes it::

    <root>/ranks/<id>              rank <id> (its registration, under its lease)
    <root>/load/<id>               rank <id> (its expert load window)
    <root>/mirrors/<id>            rank <id> (its host-memory mirror's ready rows)
    <root>/acks/<id>               rank <id> (its ack of the newest plan, epoch inside)
    <root>/suspects/<id>/...       rank <id> (its reports on peers, under its lease)
    <root>/store/...               every rank (barrier keys, heartbeats, endpoints)
    <root>/leader, epoch, plan, plans/..., committed    controllers only

:func:`auth_layout` turns that into etcd roles and users (a pure function, so a test
and the operator doc can read it); :func:`setup_auth` applies it through etcd's v3
Auth API and enables auth. etcd 3.4 grants permissions on one key or on a key range
(a prefix), with no wildcard in the middle of a key; every key a rank writes is
therefore one key named by its id (an ack carries its epoch in the value), so each
rank role is granted exactly its own keys plus the shared ``store/`` scratch.

"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import grpc

from controller.etcd_client import call
from elastic_ep.errors import ConfigError

log = logging.getLogger(__name__)

Perm = Literal["read", "write", "readwrite"]


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
    rank <id>:  readwrite ``<root>/ranks/<id>``, ``<root>/load/<id>``, ``<root>/mirrors/<id>``
                and ``<root>/acks/<id>`` (single keys), readwrite ``<root>/store/`` (prefix),
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
            Grant("readwrite", f"{top}mirrors/{rid}"),
            Grant("readwrite", f"{top}acks/{rid}"),
            Grant("readwrite", f"{top}suspects/{rid}/", prefix=True),
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
    _apply_roles(client, roles)
    if not _apply_users(client, users):
        from etcd3 import etcdrpc

        _auth(client, "AuthEnable", etcdrpc.AuthEnableRequest())
    log.info("etcd auth enabled under %s: %d roles, users %s", root, len(roles) + 1, names)
    return roles


def _apply_roles(client: Any, roles: list[Role]) -> None:
    """Create ``root`` and every role that is missing, and (re)grant each role's keys."""
    from etcd3 import etcdrpc
    from etcd3.etcdrpc import auth_pb2

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


def _apply_users(client: Any, users: list[tuple[str, str, str]]) -> bool:
    """Create each ``(user, password, role)`` that is missing, grant its role and set its
    password. Returns True when etcd already has auth enabled."""
    from etcd3 import etcdrpc

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
    return auth_on
