"""Peer liveness over real sockets on 127.0.0.1, against real server processes that are
SIGKILLed, SIGSTOPped and resumed. Waits are bounded; the bounds are timeouts only,
never timing assertions. Detection latencies and idle CPU are printed (run with -s)."""

from __future__ import annotations

import os
import queue
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from elastic_ep.errors import ConfigError
from elastic_ep.runtime.liveness import LivenessServer, PeerMonitor, monitored_peers, probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERVAL = 0.05
WAIT_S = 5.0
"""Upper bound on any one detection; a timeout, not a latency target."""

SERVER = """
import sys, time
from elastic_ep.runtime.liveness import LivenessServer
s = LivenessServer(interval_s=float(sys.argv[1])).start()
print(s.address, flush=True)
time.sleep(300)
"""


class ServerProc:
    """A ``python -c`` process running a LivenessServer; kill/stop/cont by signal."""

    def __init__(self, interval_s: float = INTERVAL) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(interval_s)], cwd=ROOT,
                                     stdout=subprocess.PIPE, text=True)
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], 30)
            assert ready, "the server process printed no address within 30 s"
            self.address = self.proc.stdout.readline().strip()
            assert self.address, f"the server process exited early with {self.proc.poll()}"
        except BaseException:
            self.cleanup()
            raise

    def signal(self, sig: int) -> float:
        os.kill(self.proc.pid, sig)
        return time.monotonic()

    def stop(self) -> float:
        """SIGSTOP, then wait until the kernel shows it stopped (signals are asynchronous)."""
        t = self.signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while self._state() not in ("T", "t"):
            assert time.monotonic() < deadline, f"process {self.proc.pid} not stopped after 10 s"
            time.sleep(0.001)
        return t

    def _state(self) -> str:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    def kill(self) -> float:
        """SIGKILL and reap; asserts the process is gone (a chaos test that never fires is no test)."""
        t = self.signal(signal.SIGKILL)
        assert self.proc.wait(timeout=10) == -signal.SIGKILL
        return t

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc.stdout.close()


class Events:
    """Collects ``on_suspect`` calls with their arrival time."""

    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()

    def __call__(self, token: str, kind: str, detail: str) -> None:
        self.q.put((time.monotonic(), token, kind, detail))

    def next(self, timeout: float = WAIT_S) -> tuple[float, str, str, str]:
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no suspicion reported within {timeout} s") from None

    def none_within(self, seconds: float) -> list:
        time.sleep(seconds)
        out = []
        while not self.q.empty():
            out.append(self.q.get_nowait())
        return out


@pytest.fixture
def procs():
    started: list[ServerProc] = []

    def start(interval_s: float = INTERVAL) -> ServerProc:
        started.append(ServerProc(interval_s))
        return started[-1]

    try:
        yield start
    finally:
        for p in started:
            p.cleanup()


@pytest.fixture
def monitors():
    made: list[PeerMonitor] = []

    def make(events: Events, **kw) -> PeerMonitor:
        made.append(PeerMonitor(events, interval_s=INTERVAL, **kw))
        return made[-1]

    try:
        yield make
    finally:
        for m in made:
            m.close()


def settle() -> None:
    """Let the monitor connect and hear a few beats (loopback: milliseconds)."""
    time.sleep(0.5)


@pytest.mark.parametrize("kernel_age", [True, False], ids=["kernel-age", "per-byte"])
def test_sigkill_is_reported_closed_once(procs, monitors, kernel_age):
    ev, srv = Events(), procs()
    mon = monitors(ev, misses=4, kernel_age=kernel_age)
    mon.watch({"r1": srv.address})
    settle()
    t_kill = srv.kill()
    t, token, kind, detail = ev.next()
    assert (token, kind) == ("r1", "closed")
    assert "EOF" in detail or "Reset" in detail, detail  # it was connected before the kill
    print(f"\n[{kernel_age=}] SIGKILL -> closed in {1000 * (t - t_kill):.1f} ms ({detail})")
    assert ev.none_within(1.0) == []
    mon.watch({"r1": srv.address})  # kept as is: still suspected, not reported again
    assert ev.none_within(0.3) == []


@pytest.mark.parametrize("kernel_age", [True, False], ids=["kernel-age", "per-byte"])
def test_sigstop_is_reported_silent(procs, monitors, kernel_age):
    ev, srv = Events(), procs()
    monitors(ev, misses=4, kernel_age=kernel_age).watch({"r1": srv.address})
    settle()
    t_stop = srv.stop()
    t, token, kind, detail = ev.next()
    assert (token, kind) == ("r1", "silent"), detail
    print(f"\n[{kernel_age=}] SIGSTOP -> silent in {1000 * (t - t_stop):.1f} ms (limit {4 * INTERVAL} s; {detail})")
    assert ev.none_within(0.5) == []


@pytest.mark.parametrize("kernel_age", [True, False], ids=["kernel-age", "per-byte"])
def test_short_stop_within_tolerance_is_not_suspected(procs, monitors, kernel_age):
    ev, srv = Events(), procs()
    monitors(ev, misses=20, kernel_age=kernel_age).watch({"r1": srv.address})  # 1 s of tolerance
    settle()
    srv.stop()
    time.sleep(0.3)
    srv.signal(signal.SIGCONT)
    assert ev.none_within(1.5) == []
    srv.kill()  # still watched and connected: its death is seen
    assert ev.next()[1:3] == ("r1", "closed")


@pytest.mark.parametrize("kernel_age", [True, False], ids=["kernel-age", "per-byte"])
def test_drop_cuts_one_peer_only(procs, monitors, kernel_age):
    ev, cut, ok = Events(), procs(), procs()
    monitors(ev, misses=4, kernel_age=kernel_age, drop=lambda token: token == "cut").watch(
        {"cut": cut.address, "ok": ok.address})
    _, token, kind, detail = ev.next()
    assert (token, kind) == ("cut", "silent"), detail
    assert ev.none_within(1.0) == []


def test_probe(procs):
    live, stopped, dead = procs(), procs(), procs()
    assert probe(live.address) == (True, "")
    stopped.stop()
    ok, why = probe(stopped.address)
    assert not ok and why.startswith("silent"), why
    dead.kill()
    ok, why = probe(dead.address)
    assert not ok and why.startswith("closed"), why


def test_watch_replacing_peers(procs, monitors):
    ev, a, b = Events(), procs(), procs()
    mon = monitors(ev, misses=4)
    mon.watch({"a": a.address, "b": b.address})
    settle()
    mon.watch({"b": b.address})
    a.kill()
    assert ev.none_within(0.5) == []  # a removed: its death is not reported
    mon.watch({"a": a.address, "b": b.address})  # re-added: a new watch, refused at once
    assert ev.next()[1:3] == ("a", "closed")
    b.kill()
    assert ev.next()[1:3] == ("b", "closed")
    assert ev.none_within(0.3) == []


def test_callback_exception_does_not_stop_the_monitor(procs, monitors):
    seen = Events()

    def boom(token: str, kind: str, detail: str) -> None:
        seen(token, kind, detail)
        raise RuntimeError("a buggy callback")

    a, b = procs(), procs()
    mon = monitors(boom, misses=4)
    mon.watch({"a": a.address, "b": b.address})
    settle()
    a.kill()
    assert seen.next()[1] == "a"
    b.kill()
    assert seen.next()[1] == "b"


def test_server_ignores_client_bytes_and_bounds_connections():
    srv = LivenessServer(interval_s=INTERVAL, max_connections=2).start()
    socks: list[socket.socket] = []
    try:
        host, port = srv.address.rsplit(":", 1)
        for _ in range(3):
            socks.append(socket.create_connection((host, int(port)), timeout=2))
        socks[0].sendall(b"hello rank 3\n" * 100)
        time.sleep(0.2)
        assert socks[0].recv(64) and socks[1].recv(64)  # the beats so far
        assert socks[0].recv(1) == b"\x00"  # and still beating after the client's bytes
        socks[2].settimeout(2)
        assert socks[2].recv(1) == b""  # the third was closed at once
        ok, why = probe(srv.address, timeout_s=2)
        assert not ok and why.startswith("closed"), why  # full: accepted and closed
    finally:
        for s in socks:
            s.close()
        srv.close()
    assert probe(srv.address)[0] is False  # closed: nothing listens


def test_monitored_peers_properties():
    for n in (1, 2, 3, 5, 8, 17):
        members = [f"r{i}" for i in range(n)]
        for ring in (0, 1, 2, 3):
            own_nodes = {m: f"n{i}" for i, m in enumerate(members)}  # one rank per node
            watchers = {m: 0 for m in members}
            for me in members:
                peers = monitored_peers(members, me, own_nodes, ring=ring)
                assert me not in peers and len(set(peers)) == len(peers)
                assert peers == monitored_peers(members, me, own_nodes, ring=ring)  # deterministic
                for p in peers:
                    watchers[p] += 1
            assert all(c >= min(ring, n - 1) for c in watchers.values()), (n, ring, watchers)

    members = [f"r{i}" for i in range(16)]
    nodes = {m: f"n{i // 8}" for i, m in enumerate(members)}  # two nodes of 8
    peers = monitored_peers(members, "r3", nodes, ring=2)
    assert peers[:2] == ["r4", "r5"]
    assert set(peers[2:]) == {"r6", "r7", "r0", "r1", "r2"}  # the rest of node n0
    capped = monitored_peers(members, "r3", nodes, ring=2, node_cap=2)
    assert capped == ["r4", "r5", "r6", "r7"]
    wrap = monitored_peers(members, "r15", nodes, ring=2, node_cap=0)
    assert wrap == ["r0", "r1"]
    assert monitored_peers(members, "r3", {}, ring=2) == ["r4", "r5"]  # no labels: ring only
    blank = {m: "" for m in members}
    assert monitored_peers(members, "r3", blank, ring=1) == ["r4"]  # empty label is no node
    with pytest.raises(ConfigError):
        monitored_peers(members, "stranger", nodes)
    with pytest.raises(ConfigError):
        monitored_peers(["a", "a", "b"], "a", {})


IDLE = """
import time
from elastic_ep.runtime.liveness import LivenessServer, PeerMonitor
srv = LivenessServer(interval_s={interval}).start()
mon = PeerMonitor(lambda *a: print("SUSPECT", *a, flush=True), interval_s={interval})
mon.watch({{"self": srv.address}})
time.sleep(0.5)
c0, t0 = time.process_time(), time.monotonic()
time.sleep(5)
print(f"CPU {{100 * (time.process_time() - c0) / (time.monotonic() - t0):.3f}}")
"""


def test_idle_cpu_of_a_monitor_server_pair():
    out = subprocess.run([sys.executable, "-c", IDLE.format(interval=INTERVAL)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "SUSPECT" not in out.stdout, out.stdout
    print(f"\nidle monitor+server pair, interval {INTERVAL} s: {out.stdout.split()[-1]} % of one core")
