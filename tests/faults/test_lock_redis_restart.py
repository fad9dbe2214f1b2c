"""Redis faults: a restart that loses every key, a server that stops answering."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from accord import AdapterError, AdapterUnavailable, Application, LockLostError, Settings
from accord.adapters.redis.lock import FENCE, RedisLockAdapter
from accord.testing import cluster
from conftest import unique
from servers import RedisServer

WAIT = 20.0

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as instance:
        yield instance


def settings_for(prefix: str, server: RedisServer, tmp_path: Path) -> Settings:
    name = unique(prefix)
    return Settings(
        app_name=name,
        storage=str(tmp_path),
        lock_url=server.url(),
        pubsub_url=f"memory://{name}",
        queue_url=f"memory://{name}",
    )


async def acquire_when_back(app: Application, key: str) -> int:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            lock = await app.lock_manager.acquire(key, ttl=5, timeout=WAIT)
        except AdapterError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
            continue
        await lock.release()
        return lock.fencing_token


async def test_tokens_keep_rising_across_a_restart_that_loses_the_counter(
    server: RedisServer, tmp_path: Path
) -> None:
    async with cluster(2, settings=settings_for("restart", server, tmp_path)) as (a, b):
        before = []
        for _ in range(20):
            async with a.lock_manager.lock("k", ttl=5) as lock:
                before.append(lock.fencing_token)
        assert before == sorted(before)

        started = asyncio.Event()

        async def body() -> None:
            started.set()
            await asyncio.sleep(60)

        holder = asyncio.create_task(a.lock_manager.run_exclusive("held", body, ttl=1.0))
        await asyncio.wait_for(started.wait(), WAIT)
        waiter = asyncio.create_task(b.lock_manager.acquire("held", ttl=5, timeout=WAIT * 2))
        await asyncio.sleep(0.2)

        server.kill()
        server.start()
        assert server.run("GET", FENCE) is None, "the restart should have lost the counter"

        # The holder's lease vanished with the restart: its body is cancelled.
        with pytest.raises(LockLostError):
            await asyncio.wait_for(holder, WAIT)
        # The waiter gets through once the server is back.
        got = await asyncio.wait_for(waiter, WAIT * 2)
        assert got.fencing_token > max(before)
        await got.release()

        after = await acquire_when_back(a, "k")
        assert after > max(before), (after, max(before))


async def test_a_server_that_stops_answering_cancels_the_body_in_time(
    server: RedisServer, tmp_path: Path
) -> None:
    async with cluster(2, settings=settings_for("stall", server, tmp_path)) as (a, b):
        for app in (a, b):
            # Each command may take 0.5 s here (10 s by default).
            adapter = RedisLockAdapter(server.url(), command_timeout=0.5)
            app.lock_manager.register_adapter("impatient", adapter, default=True)
        started = asyncio.Event()
        finished = False

        async def body() -> None:
            nonlocal finished
            started.set()
            await asyncio.sleep(30)
            finished = True

        holder = asyncio.create_task(a.lock_manager.run_exclusive("k", body, ttl=1.0))
        await asyncio.wait_for(started.wait(), WAIT)
        server.pause()
        try:
            # Renewal cannot be confirmed: the body is stopped before the lease ends.
            with pytest.raises(LockLostError, match="ran out|did not finish"):
                await asyncio.wait_for(holder, WAIT)
            assert not finished
            with pytest.raises(AdapterUnavailable, match="did not answer within 0.5 s"):
                await b.lock_manager.try_acquire("other")
        finally:
            server.resume()
        lock = await b.lock_manager.acquire("k", ttl=1, timeout=WAIT)
        await lock.release()
