"""Suspicions -> confirmed deaths: the pure judgement, the short settle window it buys
in ``decide``, and the controller's probe against real sockets."""

from __future__ import annotations

import socket
import threading

from controller.decide import Kind, Memory, decide
from controller.probe import probe
from controller.records import RankRecord, SuspectRecord
from controller.suspicion import judge
from controller.view import ClusterView

from tests.test_decide import CFG, OLD, SETTLE, T0, rank, steady_view, tok


def _view(*suspects: SuspectRecord, liveness: str = "127.0.0.1:9") -> ClusterView:
    rs = [RankRecord(f"r{i}", "h", "cpu", "n0", "active", {"liveness": liveness} if i == 2 else {}, 0, "a")
          for i in range(4)]
    return ClusterView(ranks={r.id: r for r in rs}, suspects=list(suspects))


def test_a_self_report_or_a_quorum_confirms_and_a_lone_reporter_needs_a_probe() -> None:
    assert judge(_view(SuspectRecord(tok("r2"), tok("r2"), "self"))).confirmed == {tok("r2"): "reported itself broken"}
    two = judge(_view(SuspectRecord(tok("r0"), tok("r2"), "closed"), SuspectRecord(tok("r1"), tok("r2"), "silent")))
    assert list(two.confirmed) == [tok("r2")] and "2 ranks (r0, r1)" in two.confirmed[tok("r2")] and not two.probe
    assert two.how == {tok("r2"): "quorum"}
    assert judge(_view(SuspectRecord(tok("r2"), tok("r2"), "self"))).how == {tok("r2"): "self"}
    lone = judge(_view(SuspectRecord(tok("r0"), tok("r2"), "closed")))
    assert lone.confirmed == {} and lone.how == {} and lone.probe == {tok("r2"): "127.0.0.1:9"}
    # The same reporter twice is one reporter; a target without a liveness endpoint is the lease's.
    again = judge(_view(SuspectRecord(tok("r0"), tok("r2"), "closed"), SuspectRecord(tok("r0"), tok("r2"), "silent")))
    assert again.confirmed == {}
    assert judge(_view(SuspectRecord(tok("r0"), tok("r1"), "silent"))).probe == {}
    assert judge(_view(SuspectRecord(tok("r0"), tok("r2"), "closed")), quorum=1).confirmed


def test_a_confirmed_death_settles_in_the_short_window() -> None:
    view = steady_view(rank("r0"), rank("r2"), members=OLD)  # r1 confirmed and fenced
    quick = Memory(last_rebalance=0.0, confirmed=frozenset({tok("r1")}))
    a = decide(view, quick, CFG, T0)
    assert a.kind is Kind.SETTLING
    a = decide(view, a.memory, CFG, T0 + 2 * CFG.confirm_settle_s)
    assert a.kind is Kind.PUBLISH and a.memory.confirmed == frozenset()
    # A death the lease found waits the membership settle window.
    a = decide(view, Memory(last_rebalance=0.0), CFG, T0)
    a = decide(view, a.memory, CFG, T0 + 2 * CFG.confirm_settle_s)
    assert a.kind is Kind.SETTLING
    assert decide(view, a.memory, CFG, T0 + SETTLE).kind is Kind.PUBLISH


def _server(send: bool) -> tuple[socket.socket, threading.Event]:
    srv = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        conn, _ = srv.accept()
        if send:
            conn.sendall(b".")
        done.wait(5)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv, done


def test_the_probe_tells_a_live_endpoint_from_a_closed_or_silent_one() -> None:
    live, done = _server(send=True)
    assert probe("127.0.0.1:%d" % live.getsockname()[1], 1.0) == (True, "")
    silent, done2 = _server(send=False)
    ok, why = probe("127.0.0.1:%d" % silent.getsockname()[1], 0.2)
    assert not ok and "no heartbeat" in why
    done.set(), done2.set()
    port = live.getsockname()[1]
    live.close(), silent.close()
    ok, why = probe(f"127.0.0.1:{port}", 0.5)
    assert not ok and why, why
    assert probe("not-an-address", 0.1)[0] is False
