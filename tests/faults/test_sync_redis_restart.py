"""Redis goes down for the whole cluster: sync messages committed meanwhile are delivered once it is back."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from counting_plugin import Counting, counting

from accord.testing import cluster, wait_until
from conftest import pubsub_settings, unique
from servers import RedisServer

WAIT = 30.0

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.mark.timeout(120)
async def test_messages_committed_while_redis_is_down_arrive_once_after_it_returns(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    settings = pubsub_settings(own_redis.url(), tmp_path, unique("down"))
    async with cluster(2, plugins=[Counting], settings=settings) as (a, b):
        for app in (a, b):
            app.sync_message_manager.outbox.sweep_interval = 0.25
        received = counting(b).counts
        await counting(a).send_sync_message({"n": 0})
        await wait_until(lambda: received[0] == 1, WAIT)

        own_redis.kill()
        await wait_until(lambda: not a.pub_sub_manager.is_connected(), WAIT)
        await wait_until(lambda: not b.pub_sub_manager.is_connected(), WAIT)
        for n in range(1, 21):
            # Neither form raises: the message is kept in the outbox.
            if n % 2:
                await counting(a).send_sync_message({"n": n})
            else:
                async with a.db.transaction() as tx:
                    await counting(a).send_sync_message({"n": n}, transaction=tx)
        assert await a.sync_message_manager.outbox.pending() >= 20  # (+1 if 0 is not marked yet)

        # In a thread: the apps keep running (and retrying) while it starts.
        await asyncio.to_thread(own_redis.start)
        await wait_until(lambda: a.pub_sub_manager.is_connected(), WAIT)
        await wait_until(lambda: b.pub_sub_manager.is_connected(), WAIT)
        await wait_until(lambda: set(received) == set(range(21)), WAIT)
        await wait_until(lambda: _drained(a), WAIT)
        await asyncio.sleep(0)
        assert max(received.values()) == 1
        assert counting(b).resyncs == 0


async def _drained(app: Any) -> bool:
    return bool(await app.sync_message_manager.outbox.pending() == 0)
