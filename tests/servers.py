"""The servers tests run on: params naming the shared ones, and a redis-server of a test's own.

The shared servers must never be stopped or flushed: a test that stops, pauses or
restarts Redis runs its own `RedisServer`, and a test on the shared Redis deletes
only its own keys.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import redis

#: Params naming the URL fixture (in conftest.py) of each shared server, with its marker.
ON_REDIS = pytest.param("redis_url", id="redis", marks=pytest.mark.redis)
ON_POSTGRES = pytest.param("postgres_url", id="postgres", marks=pytest.mark.postgres)
ON_RABBITMQ = pytest.param("amqp_url", id="rabbitmq", marks=pytest.mark.rabbitmq)

#: How long a starting server may take to answer (an append-only file is replayed first).
START_WAIT = 30.0
#: How many ports to try when another process takes the one we picked before the server binds it.
START_ATTEMPTS = 20


@asynccontextmanager
async def shared_queue_url(request: pytest.FixtureRequest, app_name: str) -> AsyncIterator[str]:
    """The URL of the shared server an `ON_*` param names; on Redis, `app_name`'s queues are deleted after."""
    url: str = request.getfixturevalue(request.param)
    yield url
    if request.param == "redis_url":
        await delete_queue_keys(url, app_name)


async def delete_queue_keys(url: str, app_name: str) -> None:
    """Delete the keys of every queue channel of `app_name` (never FLUSHDB)."""
    import redis.asyncio as aioredis

    from accord._keys import glob_escape
    from accord.adapters.redis.queue import DEAD_INDEX, PREFIX

    client = aioredis.Redis.from_url(url)
    try:
        async for key in client.scan_iter(match=glob_escape(PREFIX + app_name) + "*", count=500):
            await client.delete(key)
        async for job_id, channel in client.hscan_iter(DEAD_INDEX):
            if channel.decode().startswith(app_name):
                await client.hdel(DEAD_INDEX, job_id)
    finally:
        await client.aclose()


class RedisServer:
    """One redis-server process on a free loopback port, in `folder`, killed on exit.

    It keeps no data across a restart unless `persistent` (an append-only file,
    synced on every write). A restart reuses the port, so URLs stay valid.

    Args:
        folder: its working directory (created if missing).
        password: requirepass, if any.
        tls: serve TLS only, with a self-signed certificate for 127.0.0.1.
        persistent: keep the data in an append-only file across restarts.
    """

    def __init__(
        self,
        folder: Path,
        *,
        password: str | None = None,
        tls: bool = False,
        persistent: bool = False,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH; this test runs one of its own", pytrace=False)
        self.binary = binary
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.tls = tls
        self.persistent = persistent
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.kill()

    @property
    def certificate(self) -> Path:
        return self.folder / "cert.pem"

    def url(self, db: int = 0, *, password: str | None = None) -> str:
        secret = password if password is not None else self.password
        auth = f":{secret}@" if secret else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        """Start it and wait until it answers; a restart must get the same port back."""
        if self.port:
            if not self._launch():
                raise RuntimeError(f"redis-server did not come back on port {self.port}")
            return
        for _ in range(START_ATTEMPTS):
            self.port = _free_port()
            if self._launch():
                return
            self.port = 0  # lost a race for the port; try another
        raise RuntimeError("could not start a redis-server of our own")

    def _launch(self) -> bool:
        args = [self.binary, "--bind", "127.0.0.1", "--dir", str(self.folder), "--save", ""]
        args += self._tls_args() if self.tls else ["--port", str(self.port)]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self._answers():
            return True
        self.kill()
        return False

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

    def _answers(self) -> bool:
        """Whether the server on our port answers PING and is really our process."""
        assert self.process is not None
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                # PING waits out the replay of an append-only file (it answers LOADING until then).
                self.run("PING")
                pid = self.info("server")["process_id"]
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.05)
                continue
            return bool(pid == self.process.pid)
        return False

    def _client(self, db: int = 0) -> redis.Redis:
        tls: dict[str, Any] = {"ssl": True, "ssl_cert_reqs": "none"} if self.tls else {}
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            db=db,
            password=self.password,
            socket_connect_timeout=1,
            **tls,
        )

    def run(self, *args: str, db: int = 0) -> Any:
        """Run one command on a short-lived connection of its own."""
        with self._client(db) as client:
            return client.execute_command(*args)

    def info(self, section: str) -> dict[str, Any]:
        with self._client() as client:
            return dict(client.info(section))

    def stop(self) -> None:
        """Shut it down cleanly (SIGTERM): a persistent server has its data on disk."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Kill it at once, paused or not; without persistence every key is lost."""
        self._end(signal.SIGKILL)

    def _end(self, signum: signal.Signals) -> None:
        if self.process is not None:
            self.resume()
            self.process.send_signal(signum)
            self.process.wait(START_WAIT)
            self.process = None

    def pause(self) -> None:
        """Stop the process (SIGSTOP): connections stay open and nothing answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)


def _free_port() -> int:
    """A loopback port nothing listens on now, from the kernel's ephemeral range."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port
