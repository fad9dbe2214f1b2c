"""A throwaway redis-server on a free loopback port, for cache tests that stop, pause or inspect it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis


class PrivateRedis:
    """One redis-server process of our own (no persistence), started on a free port in 6400-6499.

    Args:
        folder: its working directory.
        password: requirepass, if any.
    """

    def __init__(self, folder: Path, *, password: str | None = None, tls: bool = False) -> None:
        self.folder = folder
        self.password = password
        self.tls = tls
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def certificate(self) -> Path:
        return self.folder / "cert.pem"

    def url(self, db: int = 0, *, password: str | None = None) -> str:
        secret = password if password is not None else self.password
        auth = f":{secret}@" if secret else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/{db}"

    def _tls_args(self) -> list[str]:
        key = self.folder / "key.pem"
        if not self.certificate.exists():
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
                + ["-keyout", str(key), "-out", str(self.certificate), "-subj", "/CN=127.0.0.1"]
                + ["-addext", "subjectAltName=IP:127.0.0.1"],
                check=True,
                capture_output=True,
            )
        return ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"] + [
            "--tls-cert-file", str(self.certificate), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(self.certificate),
        ]  # fmt: skip

    def start(self) -> None:
        for _ in range(20):
            self.port = self.port or _free_port()
            args = ["redis-server", "--bind", "127.0.0.1"]
            args += self._tls_args() if self.tls else ["--port", str(self.port)]
            args += ["--save", "", "--appendonly", "no", "--dir", str(self.folder)]
            if self.password:
                args += ["--requirepass", self.password]
            self.process = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            if self._answers():
                return
            self.kill()
            self.port = 0  # lost a race for the port; try another
        raise RuntimeError("could not start a private redis-server")

    def _answers(self) -> bool:
        deadline = time.monotonic() + 10
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                pid = self.info("server")["process_id"]
            except redis.ConnectionError:
                time.sleep(0.05)
                continue
            return bool(pid == self.process.pid)  # the server answering is really ours
        return False

    def _client(self, db: int = 0) -> redis.Redis:
        tls: dict[str, Any] = {"ssl": True, "ssl_cert_reqs": "none"} if self.tls else {}
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password, **tls)

    def run(self, *args: str, db: int = 0) -> Any:
        """Run one command on a short-lived connection of its own."""
        with self._client(db) as client:
            return client.execute_command(*args)

    def info(self, section: str) -> dict[str, Any]:
        with self._client() as client:
            return dict(client.info(section))

    def kill(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)


def _free_port() -> int:
    start = 6400 + (os.getpid() * 7 + time.monotonic_ns()) % 100
    for offset in range(100):
        port = 6400 + (start - 6400 + offset) % 100
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 6400-6499")
