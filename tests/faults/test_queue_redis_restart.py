"""Redis restart under a running consumer: queued jobs persist (AOF) and consumers resume."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from accord import AdapterUnavailable, Settings
from accord.event_queue import JobContext
from accord.testing import cluster, wait_until

WAIT = 30.0

pytestmark = [pytest.mark.redis, pytest.mark.slow]


class PersistentRedis:
    """A throwaway redis-server with an append-only file, on a free loopback port."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not on PATH; it is needed to restart a server", pytrace=False
            )
        self.binary = binary
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        options = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        options += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        self.process = subprocess.Popen(
            [self.binary, *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + WAIT
        while True:
            try:
                client.ping()
                break
            except (redis.ConnectionError, redis.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=WAIT)
            self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=WAIT)
            self.process = None


@pytest.mark.timeout(120)
async def test_queued_jobs_survive_a_redis_restart_and_consumers_resume(
    tmp_path: Path, app_name: str
) -> None:
    server = PersistentRedis(tmp_path / "redis")
    server.start()
    seen: list[Any] = []
    ready = True

    async def process(payload: Any, ctx: JobContext) -> None:
        seen.append(payload)

    settings = Settings(
        app_name=app_name,
        storage=str(tmp_path / "storage"),
        queue_url=server.url,
        lock_url=f"memory://{app_name}",
        queue_lease=2.0,
        queue_check_interval=0.3,
    )
    try:
        async with cluster(1, settings=settings) as (app,):
            app.event_queue.subscribe("jobs", process=process, idle=lambda: ready, interval=0.05)
            for n in range(3):
                await app.event_queue.publish("jobs", n)
            await wait_until(lambda: len(seen) == 3, WAIT)
            ready = False
            await asyncio.sleep(0.2)
            for n in range(3, 6):
                await app.event_queue.publish("jobs", n, delay=0.5 if n == 5 else 0)
            server.stop()
            with pytest.raises(AdapterUnavailable):
                await app.event_queue.publish("jobs", "while down")
            # Claims fail and back off while the server is down.
            ready = True
            await asyncio.sleep(1.0)
            server.start()
            await wait_until(lambda: len(seen) == 6, WAIT)
            await app.event_queue.publish("jobs", 6)
            await wait_until(lambda: len(seen) == 7, WAIT)
            stats = await app.event_queue.stats("jobs")
    finally:
        server.kill()
    assert sorted(seen) == list(range(7))
    assert (stats.queued, stats.delayed, stats.running, stats.dead) == (0, 0, 0, 0)
