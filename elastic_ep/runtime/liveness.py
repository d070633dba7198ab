"""Peer liveness between rank agents: a crash is seen in milliseconds, a silence after a
few missed heartbeats. Pure stdlib, threads, no etcd.

The lease in etcd is the membership backstop, but its TTL is seconds. This channel is
the fast path:

- every agent runs a :class:`LivenessServer`; each connection to it receives one
  heartbeat byte every ``interval_s``, sent by the server's own thread;
- every agent runs a :class:`PeerMonitor` over the peers :func:`monitored_peers`
  chooses, and reports a *suspicion* through ``on_suspect(token, kind, detail)``:

  ``closed``  connection refused, reset or EOF: the process is gone. A process that
              dies, however it dies, has its sockets closed by its kernel at once.
  ``silent``  no byte for ``misses * interval_s``: a hang, SIGSTOP, a lost node or link.

- the controller confirms a suspicion with :func:`probe` before acting on it: a missed
  heartbeat is a suspicion, not a membership change; one coordinator decides.

Example, with the defaults ``interval_s=0.05`` and ``misses=4``::

    server = LivenessServer().start()            # publish server.address, "127.0.0.1:41234"
    mon = PeerMonitor(report)                    # report(token, kind, detail)
    mon.watch({"rank-3": "127.0.0.1:41235"})
    # rank 3 SIGKILLed  -> report("rank-3", "closed", "EOF from 127.0.0.1:41235"), in ~1 ms
    # rank 3 SIGSTOPped -> report("rank-3", "silent", "no heartbeat ... for 0.201 s ..."), in ~0.2 s

Cost. The server wakes once per interval, whatever its number of watchers. On Linux the
monitor is not woken by heartbeats at all: it asks for a wake-up on a peer's close only
(``POLLRDHUP``), and at each peer's deadline reads the age of the last byte the kernel
received (``TCP_INFO``): it wakes about once per ``misses * interval_s`` (the peers' checks
merge), and its own thread being late cannot make a peer look silent. Elsewhere it
wakes on every byte. Measured on a loaded 2-vCPU VM, an idle agent serving one watcher
and watching one peer used ~0.3% of a core, mostly the server's 20 beats a second.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from controller.probe import parse_address, probe  # noqa: F401  (part of this module's API)
from elastic_ep.errors import ConfigError

log = logging.getLogger(__name__)

HEARTBEAT = b"\x00"
MAX_CONNECTIONS = 256
"""Connections a server keeps; more are closed at once (a rank has a handful of watchers
and the controller's probes, so this only bounds a runaway client)."""
_RECV = 4096
_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL
_RDHUP = getattr(select, "POLLRDHUP", 0)
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_LAST_DATA_RECV = 52
"""Offset of ``tcpi_last_data_recv`` (u32, ms since the last data segment) in Linux's
``struct tcp_info``; stable since Linux 2.6."""
KERNEL_AGE = bool(_RDHUP and _TCP_INFO is not None)
"""Linux: wake on close only and take heartbeat ages from the kernel (see the module doc)."""

SuspectCallback = Callable[[str, str, str], None]
"""``on_suspect(token, kind, detail)``; kind is ``"closed"`` or ``"silent"``."""


def _check_interval(interval_s: float, misses: int = 1) -> None:
    if not interval_s > 0 or misses < 1:
        raise ConfigError(f"liveness interval_s={interval_s} must be > 0 and misses={misses} >= 1")


def _drain(sock: socket.socket) -> tuple[bool, str | None]:
    """Read everything queued: ``(got_bytes, why_ended)``, ``why_ended`` None while open."""
    got = False
    while True:
        try:
            data = sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return got, None
        except OSError as e:
            return got, e.__class__.__name__
        if not data:
            return got, "EOF"
        got = True


class _Loop:
    """One daemon thread around ``select.poll`` with a socket pair to wake it (a stop, a
    new peer set), so it blocks until its next deadline instead of polling."""

    def __init__(self, name: str) -> None:
        self.poll = select.poll()
        self.fds: dict[int, object] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self.add(self._wake_r, select.POLLIN, self)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def add(self, sock: socket.socket, mask: int, obj: object) -> None:
        self.fds[sock.fileno()] = obj
        self.poll.register(sock, mask)

    def remove(self, sock: socket.socket) -> None:
        if self.fds.pop(sock.fileno(), None) is not None:
            self.poll.unregister(sock)
        sock.close()

    def wake(self) -> None:
        try:
            self._wake_w.send(b"w")
        except OSError:  # already pending (buffer full) or closed: it wakes either way
            pass

    def stop(self) -> None:
        self.stopped.set()
        self.wake()
        if self.thread.ident is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=5)  # not when closed from its own callback
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                timeout = self.before_wait()
                for fd, revents in self.poll.poll(None if timeout is None else 1000 * timeout):
                    obj = self.fds.get(fd)
                    if obj is self:
                        _drain(self._wake_r)
                    elif obj is not None:
                        self.event(obj, revents)
                self.tick(time.monotonic())
            except Exception:  # the thread must outlive any one bad peer or bug
                log.exception("%s: loop step failed; going on", self.thread.name)
                time.sleep(0.05)

    def before_wait(self) -> float | None:
        """Runs before each wait; returns the seconds to wait at most (None: until woken)."""
        raise NotImplementedError

    def event(self, obj: object, revents: int) -> None:
        raise NotImplementedError

    def tick(self, now: float) -> None:
        raise NotImplementedError


class LivenessServer(_Loop):
    """Sends one heartbeat byte every ``interval_s`` to every connection, from one daemon
    thread. Anything a client sends (e.g. a greeting line) is read and dropped.

    The beats come from this process's own thread on purpose: if the process is stopped
    or hung the beats stop, and if it dies its kernel closes the sockets.

    >>> server = LivenessServer().start()     # doctest: +SKIP
    >>> server.address                        # doctest: +SKIP
    '127.0.0.1:41234'
    >>> server.close()                        # doctest: +SKIP
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, interval_s: float = 0.05,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        _check_interval(interval_s)
        super().__init__("liveness-server")
        self.host, self.port, self.interval_s = host, port, interval_s
        self.max_connections = max_connections
        self._listener: socket.socket | None = None
        self._address = ""
        self._conns: list[socket.socket] = []
        self._next_beat = 0.0

    @property
    def address(self) -> str:
        """``"host:port"`` to publish in the rank's registration (after :meth:`start`)."""
        if not self._address:
            raise ConfigError("LivenessServer.address read before start()")
        return self._address

    def start(self) -> "LivenessServer":
        """Bind, listen and start the heartbeat thread; returns self."""
        lst = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((self.host, self.port))
        lst.listen(64)
        lst.setblocking(False)
        host, port = lst.getsockname()[:2]
        self._address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._listener = lst
        self.add(lst, select.POLLIN, lst)
        self._next_beat = time.monotonic() + self.interval_s
        self.thread.start()
        return self

    def close(self) -> None:
        """Stop the thread and close the listener and every connection."""
        self.stop()
        for s in [*self._conns, *([self._listener] if self._listener else [])]:
            self.remove(s)
        self._conns.clear()

    def before_wait(self) -> float:
        return max(0.0, self._next_beat - time.monotonic())

    def event(self, sock: socket.socket, revents: int) -> None:
        if sock is self._listener:
            return self._accept()
        _, ended = _drain(sock)  # one-way protocol: client bytes are dropped
        if ended is not None or revents & _GONE:
            self._close(sock)

    def tick(self, now: float) -> None:
        if now < self._next_beat:
            return
        for s in list(self._conns):
            self._send(s)
        # After a pause (SIGSTOP) one beat, not a burst to catch up.
        self._next_beat = max(self._next_beat + self.interval_s, now)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. EMFILE: keep serving the connections there are
                log.warning("liveness server %s: accept failed: %s", self._address, e)
                return
            if len(self._conns) >= self.max_connections:
                conn.close()
                continue
            conn.setblocking(False)
            # Each beat leaves at once: Nagle would hold a byte until the previous one is acked.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns.append(conn)
            self.add(conn, select.POLLIN, conn)
            self._send(conn)  # a first beat at once, so a probe needs no full interval

    def _send(self, conn: socket.socket) -> None:
        try:
            conn.send(HEARTBEAT)
        except (BlockingIOError, InterruptedError):
            pass  # a client that does not read fills its buffer; it only misses beats
        except OSError:
            self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        if conn in self._conns:
            self._conns.remove(conn)
        self.remove(conn)


class _Phase(Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    SUSPECTED = "suspected"


@dataclass
class _Peer:
    """One watched peer; only the monitor thread touches it."""

    token: str
    address: str
    incarnation: int
    """Set by the ``watch`` that (re)added the token: a report is for one incarnation."""
    phase: _Phase = _Phase.CONNECTING
    sock: socket.socket | None = None
    deadline: float = 0.0
    """When to look next: the connect deadline, then when the last byte known will be
    ``misses * interval_s`` old."""
    heard: float = field(default_factory=time.monotonic)
    """Monotonic time of the last byte read (connect time before any), off the kernel path."""


class PeerMonitor(_Loop):
    """Watches peers' :class:`LivenessServer` s from one daemon thread and calls
    ``on_suspect(token, kind, detail)`` once per token until a ``watch`` drops and
    re-adds it (see the module doc for the kinds).

    ``drop(token) -> True`` discards everything from that peer, its EOF included, as a
    cut link would: the peer then shows as ``silent`` (a fault hook for tests).
    ``on_suspect`` runs on the monitor thread; an exception from it is logged and the
    thread goes on. A report racing a ``watch`` that removes its token may still arrive.
    ``kernel_age=False`` forces the portable mode (a wake-up per byte), for tests.

    >>> mon = PeerMonitor(print, interval_s=0.05, misses=4)   # doctest: +SKIP
    >>> mon.watch({"r1": "127.0.0.1:41234"})                  # doctest: +SKIP
    >>> # kill -9 r1's process  ->  prints: r1 closed EOF from 127.0.0.1:41234
    """

    def __init__(self, on_suspect: SuspectCallback, interval_s: float = 0.05, misses: int = 4,
                 connect_timeout_s: float = 0.2, drop: Callable[[str], bool] | None = None,
                 kernel_age: bool = KERNEL_AGE) -> None:
        _check_interval(interval_s, misses)
        super().__init__("liveness-monitor")
        self.on_suspect, self.drop = on_suspect, drop
        self.interval_s, self.misses, self.connect_timeout_s = interval_s, misses, connect_timeout_s
        self.silence_s = interval_s * misses
        self.kernel_age = kernel_age and KERNEL_AGE
        self._lock = threading.Lock()
        self._wanted: dict[str, tuple[str, int]] = {}  # token -> (address, incarnation)
        self._incarnation = 0
        self._peers: dict[str, _Peer] = {}  # the monitor thread's own
        self.thread.start()

    def watch(self, peers: dict[str, str]) -> None:
        """Make ``peers`` ({token: "host:port"}) the set watched. A token kept with the
        same address keeps its connection and its suspicion; a new token, or one with a
        new address, starts afresh."""
        for address in peers.values():
            parse_address(address)
        with self._lock:
            wanted = {}
            for token, address in peers.items():
                old = self._wanted.get(token)
                if old is None or old[0] != address:
                    self._incarnation += 1
                    old = (address, self._incarnation)
                wanted[token] = old
            self._wanted = wanted
        self.wake()

    def close(self) -> None:
        """Stop the thread and close every socket."""
        self.stop()
        for peer in self._peers.values():
            self._close_sock(peer)

    # --- the monitor thread -------------------------------------------------------------

    def before_wait(self) -> float | None:
        self._reconcile()  # a watch() wakes the loop to get here
        deadlines = [p.deadline for p in self._peers.values() if p.phase is not _Phase.SUSPECTED]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def event(self, peer: _Peer, revents: int) -> None:
        if peer.phase is _Phase.CONNECTING:
            self._connected(peer)
        elif peer.phase is _Phase.OPEN:
            self._read(peer)

    def tick(self, now: float) -> None:
        # Up to one beat early is harmless (the age decides) and merges the peers' checks
        # into one wake-up: those checked together get deadlines within a beat of each other.
        for peer in list(self._peers.values()):
            if peer.phase is not _Phase.SUSPECTED and now + self.interval_s >= peer.deadline:
                self._check(peer, now)

    def _reconcile(self) -> None:
        """Open peers newly wanted, close those no longer wanted (or re-added)."""
        with self._lock:
            wanted = dict(self._wanted)
        for token, peer in list(self._peers.items()):
            if wanted.get(token) != (peer.address, peer.incarnation):
                self._close_sock(peer)
                del self._peers[token]
        for token, (address, inc) in wanted.items():
            if token not in self._peers:
                self._peers[token] = peer = _Peer(token, address, inc)
                self._connect(peer)

    def _connect(self, peer: _Peer) -> None:
        """Start a non-blocking connect; a refusal known at once is reported at once."""
        peer.deadline = time.monotonic() + self.connect_timeout_s
        try:
            host, port = parse_address(peer.address)
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV)[0]
            peer.sock = socket.socket(family, kind, proto)
            peer.sock.setblocking(False)
            err = peer.sock.connect_ex(sockaddr)
        except OSError as e:
            return self._report(peer, "closed", f"cannot connect to {peer.address}: {e}")
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            return self._report(peer, "closed", f"connect to {peer.address}: {errno.errorcode.get(err, err)}")
        self.add(peer.sock, select.POLLOUT, peer)

    def _connected(self, peer: _Peer) -> None:
        err = peer.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            return self._report(peer, "closed", f"connect to {peer.address}: {errno.errorcode.get(err, err)}")
        peer.phase = _Phase.OPEN
        peer.heard = time.monotonic()
        peer.deadline = peer.heard + self.silence_s
        # Kernel ages: wake on the peer's close only, never on a heartbeat.
        self.poll.modify(peer.sock, _RDHUP if self.kernel_age else select.POLLIN)

    def _read(self, peer: _Peer) -> bool:
        """Drain the socket; False when the peer was reported. A byte is a heartbeat
        unless ``drop`` cuts this peer."""
        got, ended = _drain(peer.sock)
        cut = self._cut(peer.token)
        if got and not cut and not self.kernel_age:  # the kernel knows when bytes came
            peer.heard = time.monotonic()
        if ended is None:
            return True
        if cut:
            self._close_sock(peer)  # a cut link shows no EOF either: the silence tells
            return True
        self._report(peer, "closed", f"{ended} from {peer.address}")
        return False

    def _check(self, peer: _Peer, now: float) -> None:
        """At the peer's deadline: suspect it, or set the next deadline from its age."""
        if peer.phase is _Phase.CONNECTING:
            return self._report(peer, "silent", f"connect to {peer.address} not done in {self.connect_timeout_s} s")
        if peer.sock is not None and not self._read(peer):
            return
        age = now - peer.heard
        if self.kernel_age and peer.sock is not None and not self._cut(peer.token):
            info = peer.sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _LAST_DATA_RECV + 4)
            age = min(age, struct.unpack_from("I", info, _LAST_DATA_RECV)[0] / 1000)
        if age >= self.silence_s:
            return self._report(peer, "silent", f"no heartbeat from {peer.address} for {age:.3f} s "
                                                f"(limit {self.silence_s:.3f} s)")
        peer.deadline = now + self.silence_s - age

    def _cut(self, token: str) -> bool:
        if self.drop is None:
            return False
        try:
            return bool(self.drop(token))
        except Exception:
            log.exception("liveness monitor: drop(%r) raised; not dropping", token)
            return False

    def _report(self, peer: _Peer, kind: str, detail: str) -> None:
        """Call ``on_suspect`` once for this incarnation, if it is still wanted."""
        self._close_sock(peer)
        peer.phase = _Phase.SUSPECTED
        with self._lock:
            if self._wanted.get(peer.token) != (peer.address, peer.incarnation):
                return
        try:
            self.on_suspect(peer.token, kind, detail)
        except Exception:
            log.exception("liveness monitor: on_suspect(%r, %r) raised", peer.token, kind)

    def _close_sock(self, peer: _Peer) -> None:
        if peer.sock is not None:
            self.remove(peer.sock)
            peer.sock = None


def monitored_peers(members: list[str], me: str, nodes: dict[str, str], ring: int = 2,
                    node_cap: int = 7) -> list[str]:
    """The peers rank ``me`` watches: the next ``ring`` members after it in the ring
    order of ``members`` (wrapping), then up to ``node_cap`` more members on its own node
    (``nodes[token]``, same non-empty label), nearest in ring order first; never itself.

    Why both: ring neighbours give every rank at least ``min(ring, n - 1)`` watchers
    whatever the node layout, so a silent rank is reported by more than one watcher
    (enough for a quorum of 2). Same-node peers see a crash fastest (loopback); in a
    node loss they die with it, and the ring watchers and the lease are the backstop.

    >>> monitored_peers(["a", "b", "c", "d", "e"], "d", {"a": "n0", "d": "n0", "e": "n1"}, ring=2)
    ['e', 'a']
    >>> monitored_peers(["a", "b", "c", "d"], "a", {"a": "n0", "c": "n0", "d": "n0"}, ring=1)
    ['b', 'c', 'd']
    """
    if me not in members or len(set(members)) != len(members) or ring < 0 or node_cap < 0:
        raise ConfigError(f"monitored_peers: {me!r} must be one of {len(members)} distinct members "
                          f"(duplicates: {len(members) - len(set(members))}), ring={ring} and "
                          f"node_cap={node_cap} >= 0")
    i = members.index(me)
    after = members[i + 1:] + members[:i]  # ring order, starting after me
    node = nodes.get(me, "")
    same_node = [t for t in after[ring:] if node and nodes.get(t, "") == node]
    return after[:ring] + same_node[:node_cap]
