"""etcd with TLS client certificates and per-rank roles, against real etcd servers:
who can connect, who can write which keys, and what the failures look like."""

from __future__ import annotations

import os
import secrets
import shutil
from datetime import timedelta
from typing import Any, Iterator

import pytest

pytest.importorskip("cryptography")
if shutil.which("etcd") is None:
    pytest.skip("no etcd binary on PATH", allow_module_level=True)

from controller.etcd_client import EtcdConfig, call, connect  # noqa: E402
from controller.store import EtcdStore  # noqa: E402
from controller.security import auth_layout, rank_user, setup_auth  # noqa: E402
from elastic_ep.tools.pki import PKI, make_test_pki  # noqa: E402
from elastic_ep.tools.etcd_server import EtcdServer  # noqa: E402
from elastic_ep.errors import EtcdUnavailableError  # noqa: E402

ROOT = "/elastic-ep/default"
TIMEOUT_S = 3.0


def _close(srv: EtcdServer) -> None:
    pid = srv.proc.pid if srv.proc is not None else None
    srv.close()
    if pid is not None:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    # "client": a certificate whose CN is no etcd user; the rank-1 one acts as that rank.
    return make_test_pki(str(tmp_path_factory.mktemp("pki")), ["client", rank_user("1")])


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory) -> PKI:
    return make_test_pki(str(tmp_path_factory.mktemp("foreign-pki")), ["client"])


def _cfg(srv: EtcdServer, pki: PKI, who: str = "client", **kw: Any) -> EtcdConfig:
    ck = pki.clients[who]
    return EtcdConfig(srv.endpoint, ca=pki.ca, cert=ck.cert, key=ck.key, timeout_s=TIMEOUT_S, **kw)


@pytest.fixture(scope="module")
def tls_etcd(pki) -> Iterator[EtcdServer]:
    srv = EtcdServer(tls=pki.server_tls()).start()
    yield srv
    _close(srv)


class Auth:
    """A TLS etcd server after setup_auth; passwords are drawn per run."""

    def __init__(self, srv: EtcdServer, pki: PKI) -> None:
        self.srv, self.pki = srv, pki
        self.root_pw = secrets.token_urlsafe(16)
        self.ctl_pw = secrets.token_urlsafe(16)
        self.rank_pw = {rid: secrets.token_urlsafe(16) for rid in ("0", "1")}

    def setup(self, client: Any, ranks: dict[str, str] | None = None) -> None:
        setup_auth(client, ROOT, "ctl", self.ctl_pw, ranks or self.rank_pw, root_password=self.root_pw)

    def root(self) -> Any:
        return connect(_cfg(self.srv, self.pki, user="root", password=self.root_pw))

    def ctl(self) -> Any:
        return connect(_cfg(self.srv, self.pki, user="ctl", password=self.ctl_pw))

    def rank(self, rid: str, password: str | None = None) -> Any:
        return connect(_cfg(self.srv, self.pki, user=rank_user(rid), password=password or self.rank_pw[rid]))


@pytest.fixture(scope="module")
def auth(pki) -> Iterator[Auth]:
    srv = EtcdServer(tls=pki.server_tls()).start()
    a = Auth(srv, pki)
    a.setup(connect(_cfg(srv, pki)))
    yield a
    _close(srv)


# -- TLS with client certificates -------------------------------------------------------

def test_client_certificate_round_trip(tls_etcd, pki):
    c = connect(_cfg(tls_etcd, pki))
    c.put(f"{ROOT}/store/tls", b"ok")
    assert c.get(f"{ROOT}/store/tls")[0] == b"ok"


@pytest.mark.parametrize("case, cause", [
    ("no client cert", "no client certificate"),
    ("client cert of another CA", "not signed by the CA the server trusts"),
    ("wrong CA file", "wrong CA file"),
    ("plaintext client", "needs ca="),
])
def test_tls_failures_are_typed_and_name_the_cause(tls_etcd, pki, foreign_pki, case, cause):
    ep, mine, theirs = tls_etcd.endpoint, pki.clients["client"], foreign_pki.clients["client"]
    cfg = {
        "no client cert": EtcdConfig(ep, ca=pki.ca, timeout_s=TIMEOUT_S),
        "client cert of another CA": EtcdConfig(ep, ca=pki.ca, cert=theirs.cert, key=theirs.key, timeout_s=TIMEOUT_S),
        "wrong CA file": EtcdConfig(ep, ca=foreign_pki.ca, cert=mine.cert, key=mine.key, timeout_s=TIMEOUT_S),
        "plaintext client": EtcdConfig(ep, timeout_s=TIMEOUT_S),
    }[case]
    with pytest.raises(EtcdUnavailableError, match=cause) as info:
        connect(cfg)
    assert ep in str(info.value)


def test_tls_client_to_plaintext_server_names_the_cause(pki):
    with EtcdServer() as srv:
        with pytest.raises(EtcdUnavailableError, match="did not answer the TLS handshake"):
            connect(_cfg(srv, pki))


# -- users and roles --------------------------------------------------------------------

def test_layout_gives_ranks_single_keys_and_shared_prefixes():
    ctl, r0 = auth_layout(ROOT, ["0"])
    assert [(g.perm, g.key, g.prefix) for g in ctl.grants] == [("readwrite", f"{ROOT}/", True)]
    assert {(g.perm, g.key, g.prefix) for g in r0.grants} == {
        ("read", f"{ROOT}/", True), ("readwrite", f"{ROOT}/ranks/0", False), ("readwrite", f"{ROOT}/load/0", False),
        ("readwrite", f"{ROOT}/mirrors/0", False), ("readwrite", f"{ROOT}/acks/0", False),
        ("readwrite", f"{ROOT}/suspects/0/", True),
        ("readwrite", f"{ROOT}/store/", True),
    }
    assert r0.grants[0].range_end() == f"{ROOT}0".encode()


def test_rank_writes_its_own_keys_and_reads_the_plan(auth):
    auth.ctl().put(f"{ROOT}/plan", b'{"epoch": 1}')
    r0 = auth.rank("0")
    lease = r0.lease(5)
    r0.put(f"{ROOT}/ranks/0", b"registered", lease=lease)
    r0.put(f"{ROOT}/load/0", b"[1, 2]")
    r0.put(f"{ROOT}/acks/0", b"ack")
    r0.put(f"{ROOT}/suspects/0/1", b"suspect", lease=lease)
    r0.put(f"{ROOT}/store/barrier/1/0", b"1")
    assert r0.get(f"{ROOT}/plan")[0] == b'{"epoch": 1}'
    assert r0.get(f"{ROOT}/ranks/0")[0] == b"registered"
    lease.revoke()  # needs write on every key under the lease
    assert r0.get(f"{ROOT}/ranks/0")[0] is None


@pytest.mark.parametrize("key", [
    "ranks/1", "load/1", "acks/1", "suspects/1/0", "suspects/0", "plan", "plans/00000000000000000002/x/old",
    "epoch", "leader", "committed", "routing", "election/x", "../other/ranks/0",
])
def test_rank_cannot_write_other_ranks_or_controller_keys(auth, key):
    r0 = auth.rank("0")
    k = os.path.normpath(f"{ROOT}/{key}")
    with pytest.raises(PermissionError, match="PERMISSION_DENIED"):
        call(r0.put, f"put {k}", k, b"x")
    with pytest.raises(PermissionError):
        call(r0.delete, f"delete {k}", k)


def test_rank_cannot_manage_users(auth):
    from etcd3 import etcdrpc

    r0 = auth.rank("0")
    with pytest.raises(PermissionError):
        call(r0.authstub.UserList, "user list", etcdrpc.AuthUserListRequest(), TIMEOUT_S,
             credentials=r0.call_credentials, metadata=r0.metadata)


def test_controller_writes_the_plan_and_every_key(auth):
    ctl = auth.ctl()
    ctl.put(f"{ROOT}/epoch", b"2")
    ctl.put(f"{ROOT}/plan", b'{"epoch": 2}')
    ctl.put(f"{ROOT}/ranks/0", b"cleanup")
    assert ctl.delete_prefix(f"{ROOT}/store/") is not None
    assert auth.rank("1").get(f"{ROOT}/epoch")[0] == b"2"
    with pytest.raises(PermissionError):
        call(ctl.put, "outside root", "/elastic-ep/other/plan", b"x")


@pytest.mark.parametrize("user", ["elastic-ep-rank-0", "nobody"])
def test_wrong_password_is_permission_error(auth, user):
    with pytest.raises(PermissionError, match="authentication failed"):
        connect(_cfg(auth.srv, auth.pki, user=user, password="not-" + auth.rank_pw["0"]))


def test_certificate_cn_acts_as_that_user(auth):
    """With --client-cert-auth, a client that sends no password is its certificate's CN."""
    r1 = connect(_cfg(auth.srv, auth.pki, who=rank_user("1")))
    r1.put(f"{ROOT}/ranks/1", b"by-cert")
    with pytest.raises(PermissionError):
        call(r1.put, "put ranks/0", f"{ROOT}/ranks/0", b"x")
    anonymous = connect(_cfg(auth.srv, auth.pki))  # CN "client" is no user
    with pytest.raises(PermissionError):
        call(anonymous.put, "put store", f"{ROOT}/store/x", b"x")


def test_setup_auth_again_adds_ranks_and_keeps_sessions(auth):
    r0 = auth.rank("0")
    first, second = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    auth.setup(auth.root(), {**auth.rank_pw, "2": first})
    r2 = auth.rank("2", first)
    r2.put(f"{ROOT}/ranks/2", b"new")
    r0.put(f"{ROOT}/ranks/0", b"still-valid")  # unchanged password: token kept
    auth.setup(auth.root(), {"2": second})
    with pytest.raises(PermissionError, match="invalid auth token.*connect again"):
        call(r2.put, "put ranks/2", f"{ROOT}/ranks/2", b"old-token")
    with pytest.raises(PermissionError):
        auth.rank("2", first)
    auth.rank("2", second).put(f"{ROOT}/load/2", b"[]")


def test_password_auth_over_plaintext_is_refused_with_a_hint():
    root_pw = secrets.token_urlsafe(8)
    with EtcdServer() as srv:
        setup_auth(connect(EtcdConfig(srv.endpoint, timeout_s=TIMEOUT_S)), ROOT, "ctl", secrets.token_urlsafe(8),
                   {}, root_password=root_pw)
        with pytest.raises(PermissionError, match="needs TLS"):
            connect(EtcdConfig(srv.endpoint, user="root", password=root_pw, timeout_s=TIMEOUT_S))


# -- the torch Store over etcd, as a rank user -------------------------------------------

def test_etcd_store_works_for_a_rank_user(auth):
    r0 = EtcdStore(auth.rank("0"), ROOT, timeout_s=TIMEOUT_S)
    r1 = EtcdStore(auth.rank("1"), ROOT, timeout_s=TIMEOUT_S)
    r0.set("ep/0", b"tcp://10.0.0.1:5000")
    assert r1.get("ep/0") == b"tcp://10.0.0.1:5000"
    assert r0.add("arrived", 1) == 1 and r1.add("arrived", 1) == 2 and r0.add("arrived", 0) == 2
    assert r1.check(["ep/0", "arrived"]) and not r1.check(["ep/1"])
    assert r0.compare_set("owner", "", "r0") == b"r0"
    assert r1.compare_set("owner", "", "r1") == b"r0"
    assert r1.delete_key("ep/0") and not r0.check(["ep/0"])
    with pytest.raises(TimeoutError, match="ep/1"):
        r0.wait(["ep/1"], timedelta(seconds=0.2))
