"""Redis queue adapter: which keys name a channel, and listing channels with SCAN."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from accord.adapters.redis.queue import DEAD_INDEX, RedisQueueAdapter, channel_of, keys_of
from accord.event_queue import Job
from conftest import unique
from servers import delete_queue_keys

pytestmark = pytest.mark.redis


def new_job(channel: str, job_id: str | None = None) -> Job:
    return Job(
        id=job_id or uuid.uuid4().hex,
        channel=channel,
        body=b'{"payload": 0, "options": {}}',
        enqueued_at=time.time(),
    )


@pytest.fixture
def app() -> str:
    return unique("app")


@pytest.fixture
async def adapter(redis_url: str, app: str) -> AsyncIterator[RedisQueueAdapter]:
    queue = RedisQueueAdapter(redis_url)
    await queue.connect()
    yield queue
    await queue.close()
    await delete_queue_keys(redis_url, app)


@pytest.mark.parametrize("channel", ["app:jobs", "app:a\\:b*c", "x:", "\\\\", ""])
def test_every_key_of_a_channel_names_it(channel: str) -> None:
    assert {channel_of(key) for key in keys_of(channel)} == {channel}


def test_other_keys_name_no_channel() -> None:
    assert channel_of(DEAD_INDEX) is None
    assert channel_of("accord:queue:app\\:jobs:unknown") is None
    assert channel_of("accord:cache:app\\:jobs:stream") is None
    # An unescaped separator inside the name: not a key `keys_of` builds.
    assert channel_of("accord:queue:app:jobs:stream") is None


async def test_channels_scan_only_keys_under_the_prefix(
    adapter: RedisQueueAdapter, redis_url: str, app: str
) -> None:
    await adapter.enqueue(new_job(f"{app}:live"), 0)
    await adapter.enqueue(new_job(f"{app}:later"), 60)
    await adapter.subscribe(f"{app}:idle", "w", 1)
    # `*` and `?` are glob characters: the prefix `{app}*:` must not match `{app}b:`.
    await adapter.enqueue(new_job(f"{app}*:star"), 0)
    await adapter.enqueue(new_job(f"{app}b:other"), 0)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.set(f"accord:queue:{app}\\:live:unknown", b"not a channel key")
    finally:
        await client.aclose()
    assert sorted(await adapter.channels(f"{app}:")) == [
        f"{app}:idle",
        f"{app}:later",
        f"{app}:live",
    ]
    assert await adapter.channels(f"{app}*:") == [f"{app}*:star"]
    assert await adapter.channels(f"{app}?:") == []
