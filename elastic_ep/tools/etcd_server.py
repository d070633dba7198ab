"""A local etcd server process: what the tests, the demo and the benchmarks run.

Loopback only, free ports, a temporary data directory, stopped by its PID. With
``tls=TLSFiles`` it serves HTTPS and requires client certificates. Production
deployments run their own etcd cluster (see ``deploy/``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

from elastic_ep.errors import ConfigError, EtcdUnavailableError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TLSFiles:
    """PEM files: the CA, the server's certificate and key (for 127.0.0.1)."""

    ca: str
    cert: str
    key: str


class EtcdServer:
    """``with EtcdServer() as srv: client = connect(srv.config())``.

    ``restart()`` stops and starts it on the same ports and data (a restart mid-run).
    """

    def __init__(
        self,
        data_dir: str | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        tls: TLSFiles | None = None,
        binary: str | None = None,
        start_timeout_s: float = 20.0,
    ) -> None:
        self.binary = binary or shutil.which("etcd") or ""
        if not self.binary:
            raise ConfigError(
                "no etcd binary on PATH; install it (Debian: apt-get install etcd-server) or pass binary="
            )
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="elastic-ep-etcd-")
        os.makedirs(self.data_dir, exist_ok=True)
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.tls = tls
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(self.data_dir, "etcd.log")

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> "EtcdServer":
        url = f"{self.scheme}://127.0.0.1:{self.client_port}"
        cmd = [
            self.binary,
            "--name", "elastic-ep",
            "--data-dir", os.path.join(self.data_dir, "data"),
            "--listen-client-urls", url,
            "--advertise-client-urls", url,
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", f"elastic-ep=http://127.0.0.1:{self.peer_port}",
            "--logger", "zap",
            "--log-level", "warn",
        ]
        if self.tls:
            cmd += ["--cert-file", self.tls.cert, "--key-file", self.tls.key,
                    "--trusted-ca-file", self.tls.ca, "--client-cert-auth"]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise EtcdUnavailableError(f"etcd exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.client_port), timeout=0.2):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise EtcdUnavailableError(f"etcd did not listen on {self.endpoint} in {self.start_timeout_s} s; see {self.log_path}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGKILL by PID (what a crash looks like; the data dir keeps what was committed)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "EtcdServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
