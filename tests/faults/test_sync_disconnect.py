"""Disconnect: an instance's Redis subscriber connection is killed while 1,000 sync messages are sent."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from counting_plugin import Counting, counting

from accord import Application
from accord.testing import cluster, cut_off, reconnect, wait_until
from conftest import pubsub_settings, unique

MESSAGES = 1000
#: Kill the receiver's subscriber connection when it has handled this many messages.
KILL_AT = 150
#: Then kill it again and keep it down from this many messages sent ...
HOLD_AT = 500
#: ... until this many more are sent.
HELD_DOWN_FOR = 200
WAIT = 60.0

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transactional", [False, True], ids=["no-tx", "tx"])
async def test_killing_the_subscriber_connection_loses_no_sync_message(
    redis_url: str, db_url: str, tmp_path: Path, transactional: bool
) -> None:
    settings = pubsub_settings(redis_url, tmp_path, unique("disc")).replace(db_url=db_url)
    async with cluster(2, plugins=[Counting], settings=settings) as (sender, receiver):
        events: list[str] = []
        receiver.on("pubsub:lost", lambda: events.append("lost"))
        receiver.on("pubsub:restored", lambda: events.append("restored"))
        received = counting(receiver).counts
        sent = [0]
        faults = asyncio.create_task(inject_faults(receiver, redis_url, received, sent))

        for n in range(MESSAGES):
            if transactional:
                async with sender.db.transaction() as tx:
                    await counting(sender).send_sync_message({"n": n}, transaction=tx)
            else:
                await counting(sender).send_sync_message({"n": n})
            sent[0] += 1
        await asyncio.wait_for(faults, WAIT)

        expected = set(range(MESSAGES))
        await wait_until(
            lambda: set(received) == expected or counting(receiver).resyncs > 0,
            WAIT,
            message=f"{len(expected - set(received))} message(s) neither handled nor resynced",
        )
        # Let late duplicates (a publish retried by a sweep) arrive before counting them.
        await wait_until(lambda: _drained(sender), WAIT)
        assert events == ["lost", "restored"] * 2
        lost = expected - set(received)
        twice = sorted(n for n, seen in received.items() if seen > 1)
        assert (len(lost), twice, counting(receiver).resyncs) == (0, [], 0)
        # The held-down link missed messages for sure; they came back through the replay.
        assert receiver.sync_message_manager.recovered >= HELD_DOWN_FOR


async def inject_faults(
    app: Application, redis_url: str, received: Counter[int], sent: list[int]
) -> None:
    """Kill `app`'s own subscriber connection (CLIENT KILL ID), then kill it and hold it down."""
    await wait_until(lambda: len(received) >= KILL_AT, WAIT)
    adapter = app.pub_sub_manager.adapter
    client_id = getattr(adapter, "client_id", None)
    assert client_id is not None
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.execute_command("CLIENT", "KILL", "ID", client_id) == 1
    finally:
        await client.aclose()
    await wait_until(
        lambda: (
            getattr(adapter, "client_id", None) != client_id and app.pub_sub_manager.is_connected()
        ),
        WAIT,
    )
    # cut_off kills the connection by its CLIENT ID too, and keeps it from reconnecting.
    await wait_until(lambda: sent[0] >= HOLD_AT, WAIT)
    await cut_off(app)
    held_from = sent[0]
    await wait_until(lambda: sent[0] >= held_from + HELD_DOWN_FOR, WAIT)
    await reconnect(app)


async def _drained(app: Application) -> bool:
    return await app.sync_message_manager.outbox.pending() == 0
