"""Cache across a 3-instance cluster on a shared Redis store: wrap(lock=True), counters, near cache."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from accord import Application, Plugin, Settings
from accord.cache import MISSING, Cache
from accord.testing import cluster, cut_off, reconnect, wait_until
from conftest import unique

pytestmark = pytest.mark.redis

WAIT = 15.0
BUS_PARAMS = [
    pytest.param("memory", id="memory-bus"),
    pytest.param("redis", id="redis-bus"),
]


def cluster_settings(tmp_path: Path, redis_url: str, bus: str, **changes: Any) -> Settings:
    """3 instances share Redis for the cache; pub/sub and locks on `bus` (memory or redis)."""
    name = unique("cc")
    bus_url = f"memory://{name}" if bus == "memory" else redis_url
    return Settings(
        app_name=name,
        storage=str(tmp_path),
        cache_url=redis_url,
        pubsub_url=bus_url,
        queue_url=f"memory://{name}",
        lock_url=bus_url,
        **changes,
    )


class Shared(Plugin):
    """Creates the same shared cache on every instance, from `load`."""

    name = "shared"
    cache: Cache

    async def load(self) -> None:
        self.cache = await self.app.cache_manager.create_cache("shared", store="redis")


class Near(Plugin):
    """A near cache (Redis + in-process L1), created from `load` on every instance."""

    name = "near"
    cache: Cache

    async def load(self) -> None:
        self.cache = await self.app.cache_manager.create_cache(
            "near", store="redis", local=True, local_ttl=60
        )


def caches(apps: list[Application], plugin: str) -> list[Cache]:
    return [app.plugins[plugin].cache for app in apps]  # type: ignore[attr-defined]


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.mark.parametrize("bus", ["memory", "redis"])
async def test_wrap_with_lock_computes_once_across_three_instances(
    tmp_path: Path, redis_url: str, bus: str
) -> None:
    calls: list[str] = []

    async with cluster(
        3, plugins=[Shared], settings=cluster_settings(tmp_path, redis_url, bus)
    ) as apps:

        def compute(app: Application) -> Any:
            async def fn() -> dict[str, Any]:
                calls.append(app.instance_id)
                await asyncio.sleep(0.3)  # long enough for every instance to miss
                return {"by": app.instance_id}

            return fn

        shared = caches(apps, "shared")
        results = await asyncio.gather(
            *(
                cache.wrap("config", compute(app), ttl=60, lock=True, lock_timeout=WAIT)
                for app, cache in zip(apps, shared, strict=True)
                for _ in range(10)
            )
        )
        assert len(calls) == 1
        assert all(result == {"by": calls[0]} for result in results)
        await shared[0].reset()


async def test_100_concurrent_increments_from_three_instances_count_exactly_100(
    tmp_path: Path, redis_url: str
) -> None:
    async with cluster(
        3, plugins=[Shared], settings=cluster_settings(tmp_path, redis_url, "memory")
    ) as apps:
        shared = caches(apps, "shared")
        results = await asyncio.gather(*(shared[i % 3].incr("hits", ttl=60) for i in range(100)))
        assert sorted(results) == list(range(1, 101))
        assert [await cache.get("hits") for cache in shared] == [100, 100, 100]
        await shared[0].reset()


async def test_objects_updated_from_three_instances_lose_no_field(
    tmp_path: Path, redis_url: str
) -> None:
    async with cluster(
        3, plugins=[Shared], settings=cluster_settings(tmp_path, redis_url, "memory")
    ) as apps:
        shared = caches(apps, "shared")
        await asyncio.gather(
            *(shared[i % 3].set_value_in_object("o", f"f{i}", i) for i in range(60))
        )
        assert await shared[1].get("o") == {f"f{i}": i for i in range(60)}
        await shared[0].reset()


async def _sees(cache: Cache, key: str, expected: Any) -> bool:
    return bool(await cache.get(key) == expected)


async def _everyone_sees(near: list[Cache], key: str, expected: Any) -> None:
    for cache in near:
        await wait_until(lambda c=cache: _sees(c, key, expected), timeout=WAIT)


@pytest.mark.parametrize("bus", BUS_PARAMS)
async def test_near_cache_writes_invalidate_every_instance(
    tmp_path: Path, redis_url: str, bus: str, raw: aioredis.Redis
) -> None:
    async with cluster(
        3, plugins=[Near], settings=cluster_settings(tmp_path, redis_url, bus)
    ) as apps:
        near = caches(apps, "near")
        await near[0].set("k", 1)
        await _warm(near, "k")
        # Behind the cache's back (no invalidation): every instance still answers from its L1.
        await raw.set(near[0].store.remote.key("k"), b"99")  # type: ignore[attr-defined]
        assert [await cache.get("k") for cache in near] == [1, 1, 1]

        await near[1].set("k", 2)
        await _everyone_sees(near, "k", 2)
        await near[2].delete("k")
        await _everyone_sees(near, "k", None)

        await near[0].mset({"a": 1, "b": 2})
        assert [await cache.mget(["a", "b"]) for cache in near] == [[1, 2]] * 3
        await near[1].mdel(["a", "b"])
        for cache in near:
            await wait_until(lambda c=cache: _mget_is(c, ["a", "b"], [None, None]), timeout=WAIT)

        await near[0].set("n", 1)
        assert [await cache.get("n") for cache in near] == [1, 1, 1]
        await near[2].incr("n")
        await _everyone_sees(near, "n", 2)
        await near[0].set_value_in_object("o", "f", 1)
        assert [await cache.get("o") for cache in near] == [{"f": 1}] * 3
        await near[1].set_value_in_object("o", "g", 2)
        await _everyone_sees(near, "o", {"f": 1, "g": 2})

        await near[0].set("r", "x")
        assert [await cache.get("r") for cache in near] == ["x"] * 3
        await near[2].reset()
        await _everyone_sees(near, "r", None)


async def _warm(caches: list[Cache], key: str) -> None:
    """Read until each near cache holds `key` in its L1.

    A read that overlaps an invalidation in flight (for example the one the
    last `set` published) does not fill the L1, by design; the next one does.
    """
    for cache in caches:
        local = cache.store.local  # type: ignore[attr-defined]

        async def held(c: Cache = cache, local: Any = local) -> bool:
            await c.get(key)
            return local.peek(key) is not MISSING

        await wait_until(held, timeout=WAIT)


async def _mget_is(cache: Cache, keys: list[str], expected: list[Any]) -> bool:
    return bool(await cache.mget(keys) == expected)


@pytest.mark.parametrize("bus", BUS_PARAMS)
async def test_near_cache_is_bypassed_while_cut_off_and_flushed_on_reconnect(
    tmp_path: Path, redis_url: str, bus: str, raw: aioredis.Redis
) -> None:
    async with cluster(
        3, plugins=[Near], settings=cluster_settings(tmp_path, redis_url, bus)
    ) as apps:
        near = caches(apps, "near")
        name = near[0].store.remote.key("k")  # type: ignore[attr-defined]
        await near[0].set("k", 1)
        await _warm(near, "k")

        await cut_off(apps[2])
        # The link is down: instance 2 misses invalidations, so it reads Redis directly.
        await near[0].set("k", 2)
        assert await near[2].get("k") == 2
        await raw.set(name, b"3")  # a change nobody announces
        assert await near[2].get("k") == 3

        await reconnect(apps[2])
        assert await near[2].get("k") == 3
        # The L1 is in use again, and a change announced from now on reaches it.
        await _warm(near[2:], "k")
        await raw.set(name, b"4")
        assert await near[2].get("k") == 3
        await near[1].set("k", 5)
        await _everyone_sees(near, "k", 5)
        await near[0].reset()


async def test_near_cache_l1_is_flushed_when_the_link_comes_back(
    tmp_path: Path, redis_url: str, raw: aioredis.Redis
) -> None:
    async with cluster(
        2, plugins=[Near], settings=cluster_settings(tmp_path, redis_url, "memory")
    ) as apps:
        near = caches(apps, "near")
        await near[0].set("k", 1)
        await _warm(near[1:], "k")
        # An invalidation lost on the way: Redis changed, instance 1's L1 still says 1.
        await raw.set(near[0].store.remote.key("k"), b"7")  # type: ignore[attr-defined]
        assert await near[1].get("k") == 1
        await cut_off(apps[1])
        await reconnect(apps[1])
        assert await near[1].get("k") == 7
        await near[0].reset()


async def test_near_cache_l1_entries_expire_with_the_redis_key(
    tmp_path: Path, redis_url: str
) -> None:
    async with cluster(
        2, plugins=[Near], settings=cluster_settings(tmp_path, redis_url, "memory")
    ) as apps:
        near = caches(apps, "near")
        await near[0].set("k", "short", ttl=0.3)
        assert await near[1].get("k") == "short"
        # local_ttl is 60 s, but the L1 copy lives no longer than the Redis key.
        await wait_until(lambda: _sees(near[1], "k", None), timeout=WAIT)
