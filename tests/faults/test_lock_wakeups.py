"""The connection that carries release announcements is killed: it comes back and waiters get through."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from accord import Settings
from accord.testing import cluster, wait_until
from conftest import unique

WAIT = 20.0


def settings_for(lock_url: str, tmp_path: Path) -> Settings:
    name = unique("wake")
    return Settings(
        app_name=name,
        storage=str(tmp_path),
        lock_url=lock_url,
        pubsub_url=f"memory://{name}",
        queue_url=f"memory://{name}",
    )


@pytest.mark.redis
async def test_the_redis_listener_comes_back_after_its_connection_is_killed(
    redis_url: str, tmp_path: Path
) -> None:
    async with cluster(2, settings=settings_for(redis_url, tmp_path)) as (a, b):
        held = await a.lock_manager.acquire("k", ttl=30)
        waiter = asyncio.create_task(b.lock_manager.acquire("k", ttl=5, timeout=WAIT * 2))
        adapter: Any = await b.lock_manager.adapter()
        wakeups = adapter._wakeups
        channel = wakeups.channel(f"{b.name}:k")
        await wait_until(lambda: _confirmed(wakeups, channel), WAIT, message="never subscribed")

        client = aioredis.Redis.from_url(redis_url)
        try:
            ids = [c["id"] for c in await client.client_list() if c.get("name") == wakeups.name]
            assert len(ids) == 1, ids
            await client.client_kill_filter(_id=ids[0])

            async def back() -> bool:
                clients = await client.client_list()
                now = [c["id"] for c in clients if c.get("name") == wakeups.name]
                return bool(now) and now != ids and _confirmed(wakeups, channel)

            await wait_until(back, WAIT, message="the listener did not come back")
        finally:
            await client.aclose()
        await held.release()
        lock = await asyncio.wait_for(waiter, WAIT)
        assert lock.fencing_token > held.fencing_token
        await lock.release()


@pytest.mark.postgres
async def test_the_postgres_listener_comes_back_after_its_backend_is_terminated(
    postgres_url: str, tmp_path: Path
) -> None:
    async with cluster(2, settings=settings_for(postgres_url, tmp_path)) as (a, b):
        held = await a.lock_manager.acquire("k", ttl=30)
        waiter = asyncio.create_task(b.lock_manager.acquire("k", ttl=5, timeout=WAIT * 2))
        adapter: Any = await b.lock_manager.adapter()
        wakeups = adapter._wakeups
        await wait_until(lambda: bool(wakeups._listening), WAIT, message="never listening")
        pid = wakeups._connection.get_server_pid()

        connection = await asyncpg.connect(postgres_url)
        try:
            assert await connection.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await connection.close()

        def back() -> bool:
            current = wakeups._connection
            return (
                current is not None and current.get_server_pid() != pid and bool(wakeups._listening)
            )

        await wait_until(back, WAIT, message="the listener did not come back")
        await held.release()
        lock = await asyncio.wait_for(waiter, WAIT)
        assert lock.fencing_token > held.fencing_token
        await lock.release()


def _confirmed(wakeups: Any, channel: str) -> bool:
    future = wakeups._confirmed.get(channel)
    return future is not None and future.done()
