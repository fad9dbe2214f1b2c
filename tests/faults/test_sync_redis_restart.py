"""Redis goes down for the whole cluster: sync messages committed meanwhile are delivered once it is back."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from accord import Plugin, Settings
from accord.testing import cluster, wait_until
from conftest import unique

WAIT = 30.0

pytestmark = [pytest.mark.redis, pytest.mark.slow]


class Tally(Plugin):
    name = "tally"

    async def load(self) -> None:
        self.counts: Counter[int] = Counter()
        self.resyncs = 0

    async def handle_sync_message(self, message: Any) -> None:
        self.counts[message["n"]] += 1

    async def on_resync(self) -> None:
        self.resyncs += 1


class OwnRedis:
    """A redis-server of this test's own, without persistence, on a free loopback port."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH; this test restarts one", pytrace=False)
        self.binary, self.folder = binary, folder
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.folder)]
        self.process = subprocess.Popen(
            [self.binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = aioredis.Redis(port=self.port, socket_connect_timeout=1)
        try:
            await wait_until(lambda: _pings(client), WAIT, interval=0.05)
        finally:
            await client.aclose()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


async def _pings(client: aioredis.Redis) -> bool:
    try:
        return bool(await client.ping())
    except (aioredis.ConnectionError, OSError):
        return False


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    yield server
    server.kill()


@pytest.mark.timeout(120)
async def test_messages_committed_while_redis_is_down_arrive_once_after_it_returns(
    own_redis: OwnRedis, tmp_path: Path
) -> None:
    await own_redis.start()
    name = unique("down")
    settings = Settings(
        app_name=name,
        storage=str(tmp_path),
        pubsub_url=own_redis.url,
        queue_url=f"memory://{name}",
        lock_url=f"memory://{name}",
    )
    async with cluster(2, plugins=[Tally], settings=settings) as (a, b):
        for app in (a, b):
            app.sync_message_manager.outbox.sweep_interval = 0.25
        received = b.plugins["tally"].counts  # type: ignore[attr-defined]
        await a.plugins["tally"].send_sync_message({"n": 0})
        await wait_until(lambda: received[0] == 1, WAIT)

        own_redis.kill()
        await wait_until(lambda: not a.pub_sub_manager.is_connected(), WAIT)
        await wait_until(lambda: not b.pub_sub_manager.is_connected(), WAIT)
        for n in range(1, 21):
            # Neither form raises: the message is kept in the outbox.
            if n % 2:
                await a.plugins["tally"].send_sync_message({"n": n})
            else:
                async with a.db.transaction() as tx:
                    await a.plugins["tally"].send_sync_message({"n": n}, transaction=tx)
        assert await a.sync_message_manager.outbox.pending() >= 20  # (+1 if 0 is not marked yet)

        await own_redis.start()
        await wait_until(lambda: a.pub_sub_manager.is_connected(), WAIT)
        await wait_until(lambda: b.pub_sub_manager.is_connected(), WAIT)
        await wait_until(lambda: set(received) == set(range(21)), WAIT)
        await wait_until(lambda: _drained(a), WAIT)
        await asyncio.sleep(0)
        assert max(received.values()) == 1
        assert b.plugins["tally"].resyncs == 0  # type: ignore[attr-defined]


async def _drained(app: Any) -> bool:
    return bool(await app.sync_message_manager.outbox.pending() == 0)
