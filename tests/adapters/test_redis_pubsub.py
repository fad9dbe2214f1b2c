"""Redis pub/sub adapter: reconnects, bounded publish failures, pipelining, wire details."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from accord import AdapterUnavailable, Application
from accord.adapters.redis.pubsub import RedisPubSubAdapter
from accord.testing import cluster, wait_until
from conftest import Inbox, pubsub_settings
from servers import RedisServer

pytestmark = pytest.mark.redis

WAIT = 15.0


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def track_events(app: Application) -> list[str]:
    events: list[str] = []
    app.on("pubsub:lost", lambda: events.append("lost"))
    app.on("pubsub:restored", lambda: events.append("restored"))
    return events


async def test_server_restart_reconnects_and_resubscribes(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    async with cluster(2, settings=pubsub_settings(own_redis.url(), tmp_path)) as apps:
        events = track_events(apps[1])
        inbox = Inbox()
        await apps[1].pub_sub_manager.subscribe("news", inbox)

        own_redis.kill()
        await wait_until(lambda: events == ["lost"], WAIT)
        assert not apps[1].pub_sub_manager.is_connected()
        started = time.monotonic()
        with pytest.raises(AdapterUnavailable):
            await apps[0].pub_sub_manager.publish("news", "while down")
        assert time.monotonic() - started < 5.0  # bounded, never a hang

        own_redis.start()
        await wait_until(lambda: events == ["lost", "restored"], WAIT)
        assert apps[1].pub_sub_manager.is_connected()

        async def delivered() -> bool:
            # The publishing pool reconnects on first use; retry until it does.
            try:
                await apps[0].pub_sub_manager.publish("news", "back")
            except AdapterUnavailable:
                return False
            return True

        await wait_until(delivered, WAIT, interval=0.2)
        await wait_until(lambda: "back" in inbox.messages, WAIT)
        assert "while down" not in inbox.messages


async def test_a_hung_server_fails_publish_within_the_timeout(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    async with cluster(2, settings=pubsub_settings(own_redis.url(), tmp_path)) as apps:
        await apps[0].pub_sub_manager.publish("news", "warm up the pool")
        own_redis.pause()
        try:
            started = time.monotonic()
            with pytest.raises(AdapterUnavailable, match="did not answer within 1.0 s"):
                await apps[0].pub_sub_manager.publish("news", "stuck")
            assert time.monotonic() - started < 5.0
        finally:
            own_redis.resume()
        inbox = Inbox()
        await apps[1].pub_sub_manager.subscribe("after", inbox)
        await apps[0].pub_sub_manager.publish("after", "resumed")
        await wait_until(lambda: inbox.messages == ["resumed"], WAIT)


async def test_killing_the_subscriber_connection_reconnects(redis_url: str, tmp_path: Path) -> None:
    async with cluster(2, settings=pubsub_settings(redis_url, tmp_path)) as apps:
        events = track_events(apps[1])
        inbox = Inbox()
        await apps[1].pub_sub_manager.subscribe("news", inbox)
        adapter = apps[1].pub_sub_manager.adapter
        assert isinstance(adapter, RedisPubSubAdapter)
        old_id = adapter.client_id

        admin = aioredis.Redis.from_url(redis_url)
        try:
            # Our own connection, by its id: never every pub/sub client of the server.
            await admin.execute_command("CLIENT", "KILL", "ID", old_id)
        finally:
            await admin.aclose()

        await wait_until(lambda: events == ["lost", "restored"], WAIT)
        assert adapter.client_id != old_id
        await apps[0].pub_sub_manager.publish("news", "after the kill")
        await wait_until(lambda: inbox.messages == ["after the kill"], WAIT)


async def test_the_subscriber_connection_is_named_after_the_instance(
    redis_url: str, tmp_path: Path
) -> None:
    async with cluster(1, settings=pubsub_settings(redis_url, tmp_path)) as apps:
        adapter = apps[0].pub_sub_manager.adapter
        assert isinstance(adapter, RedisPubSubAdapter)
        admin = aioredis.Redis.from_url(redis_url)
        try:
            clients = await admin.client_list()
        finally:
            await admin.aclose()
        mine = [c for c in clients if int(c["id"]) == adapter.client_id]
        assert len(mine) == 1
        assert apps[0].instance_id in mine[0]["name"]
        assert apps[0].name in mine[0]["name"]


async def test_start_fails_clearly_when_redis_is_unreachable(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = Application(settings=pubsub_settings(f"redis://127.0.0.1:{port}/0", tmp_path))
    with pytest.raises(AdapterUnavailable, match="unreachable"):
        await app.start()


async def test_channels_are_namespaced_on_the_server(redis_url: str, tmp_path: Path) -> None:
    settings = pubsub_settings(redis_url, tmp_path).replace(channel_prefix="tenant:7")
    async with cluster(1, settings=settings) as apps:
        manager = apps[0].pub_sub_manager
        assert manager.channel_name("a:b") == f"tenant\\:7:{apps[0].name}:a\\:b"
        watcher = aioredis.Redis.from_url(redis_url)
        pubsub = watcher.pubsub()
        try:
            await pubsub.subscribe(manager.channel_name("a:b"))
            await pubsub.get_message(timeout=2)  # the subscribe confirmation
            await manager.publish("a:b", {"x": 1})
            raw = await pubsub.get_message(ignore_subscribe_messages=True, timeout=WAIT)
        finally:
            await pubsub.aclose()
            await watcher.aclose()
        assert raw is not None
        assert b'"m":{"x":1}' in raw["data"] and apps[0].instance_id.encode() in raw["data"]


async def test_foreign_payloads_are_dropped_with_a_warning(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with cluster(2, settings=pubsub_settings(redis_url, tmp_path)) as apps:
        inbox = Inbox()
        manager = apps[1].pub_sub_manager
        await manager.subscribe("news", inbox)
        raw = aioredis.Redis.from_url(redis_url)
        try:
            with caplog.at_level(logging.WARNING, logger="accord.pubsub"):
                await raw.publish(manager.channel_name("news"), b"not json")
                await raw.publish(manager.channel_name("news"), b'{"some": "json"}')
                await apps[0].pub_sub_manager.publish("news", "valid")
                await wait_until(lambda: inbox.messages == ["valid"], WAIT)
        finally:
            await raw.aclose()
        drops = [r for r in caplog.records if "not an accord envelope" in r.getMessage()]
        assert len(drops) == 2


async def test_large_messages_and_many_concurrent_publishers(
    redis_url: str, tmp_path: Path
) -> None:
    async with cluster(2, settings=pubsub_settings(redis_url, tmp_path)) as apps:
        inbox = Inbox()
        await apps[1].pub_sub_manager.subscribe("bulk", inbox)
        big = {"blob": "x" * 1_000_000}
        await apps[0].pub_sub_manager.publish("bulk", big)
        await wait_until(lambda: len(inbox.messages) == 1, WAIT)
        assert inbox.messages[0] == big

        async def publisher(k: int) -> None:
            for n in range(250):
                await apps[0].pub_sub_manager.publish("bulk", [k, n])

        await asyncio.gather(*(publisher(k) for k in range(16)))
        await wait_until(lambda: len(inbox.messages) == 1 + 16 * 250, WAIT)
        # Each publisher's own messages keep their order.
        for k in range(16):
            assert [n for kk, n in inbox.messages[1:] if kk == k] == list(range(250))
