"""What only the Redis cache store does: key layout, namespace-scoped SCAN, PX TTLs, fail_open."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from accord import AdapterUnavailable, Application, ConfigError, Settings
from accord.adapters.redis import _autopipeline
from accord.cache import MISSING, Cache
from conftest import unique
from servers import RedisServer

pytestmark = pytest.mark.redis


def app_settings(tmp_path: Path, url: str, name: str | None = None) -> Settings:
    name = name or unique("rc")
    return Settings(
        app_name=name, storage=str(tmp_path), cache_url=url, pubsub_url=f"memory://{name}"
    )


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def private(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


async def test_keys_are_app_prefix_key_with_escaped_segments_and_px_ttls(
    tmp_path: Path, redis_url: str, raw: aioredis.Redis
) -> None:
    async with Application(settings=app_settings(tmp_path, redis_url)) as app:
        cache = await app.cache_manager.create_cache("c", prefix="auth:v2", store="redis")
        await cache.set("user:1", {"id": 1}, ttl=1.5)
        await cache.set("plain", "x")
        names = sorted(name.decode() for name in await raw.keys(f"{app.name}:*"))
        assert names == [f"{app.name}:auth\\:v2:plain", f"{app.name}:auth\\:v2:user\\:1"]
        assert await raw.get(f"{app.name}:auth\\:v2:user\\:1") == b'{"id":1}'
        assert 1000 < await raw.pttl(f"{app.name}:auth\\:v2:user\\:1") <= 1500
        assert await raw.pttl(f"{app.name}:auth\\:v2:plain") == -1
        await cache.reset()


async def test_reset_and_keys_touch_one_namespace_of_one_app_only(
    tmp_path: Path, redis_url: str, raw: aioredis.Redis
) -> None:
    first, second = unique("rc"), unique("rc")
    unrelated = {
        f"{first}:other:k": b"1",  # another prefix of the same app
        f"{first}:p*x:k": b"1",  # a prefix the glob 'p*' would match if unescaped
        f"{first}:p:k": b"1",  # a lookalike written by someone else, same name
        f"{first}x:p\\*:k": b"1",  # another app whose name starts with this one
        f"{unique('free')}": b"1",  # a key of nobody
    }
    await raw.mset(unrelated)
    try:
        async with (
            Application(settings=app_settings(tmp_path / "a", redis_url, first)) as app_a,
            Application(settings=app_settings(tmp_path / "b", redis_url, second)) as app_b,
        ):
            glob_prefix = await app_a.cache_manager.create_cache("g", prefix="p*", store="redis")
            sibling = await app_a.cache_manager.create_cache("s", prefix="p*y", store="redis")
            same_prefix_other_app = await app_b.cache_manager.create_cache(
                "g", prefix="p*", store="redis"
            )
            for cache in (glob_prefix, sibling, same_prefix_other_app):
                await cache.mset({"k": 1, "k2": 2})
            assert sorted(await glob_prefix.keys()) == ["k", "k2"]
            await glob_prefix.reset()
            assert await glob_prefix.keys() == []
            assert sorted(await sibling.keys()) == ["k", "k2"]
            assert sorted(await same_prefix_other_app.keys()) == ["k", "k2"]
            assert await raw.exists(*unrelated) == len(unrelated)
            await sibling.reset()
            await same_prefix_other_app.reset()
    finally:
        await raw.delete(*unrelated)


async def test_reset_and_keys_use_scan_never_keys_or_flushdb(
    tmp_path: Path, private: RedisServer
) -> None:
    async with Application(settings=app_settings(tmp_path, private.url())) as app:
        cache = await app.cache_manager.create_cache("c", store="redis")
        await cache.mset({f"k{i}": i for i in range(2500)})
        assert len(await cache.keys()) == 2500
        assert len(await cache.keys("k1*")) == 1111
        await cache.reset()
        assert await cache.keys() == []
    stats = private.info("commandstats")
    assert "cmdstat_scan" in stats
    for forbidden in ("cmdstat_keys", "cmdstat_flushdb", "cmdstat_flushall"):
        assert forbidden not in stats


async def test_caches_on_one_url_share_one_connection(tmp_path: Path, redis_url: str) -> None:
    async with (
        Application(settings=app_settings(tmp_path / "a", redis_url)) as one,
        Application(settings=app_settings(tmp_path / "b", redis_url)) as two,
    ):
        caches = [
            await app.cache_manager.create_cache(name, store="redis")
            for app in (one, two)
            for name in ("x", "y")
        ]
        for cache in caches:
            await cache.set("k", 1)
        pipes = {id(cache.store._pipe) for cache in caches}  # type: ignore[attr-defined]
        assert len(pipes) == 1
        for cache in caches:
            await cache.reset()


async def test_the_redis_store_needs_a_url(tmp_path: Path) -> None:
    async with Application(settings=Settings(app_name=unique("rc"), storage=str(tmp_path))) as app:
        with pytest.raises(ConfigError, match="ACCORD_CACHE_URL or ACCORD_CLUSTER_URL"):
            await app.cache_manager.create_cache("c", store="redis")
        with pytest.raises(ConfigError, match="redis://"):
            await app.cache_manager.create_cache("c", store="redis", url="http://x")


async def test_an_unreachable_redis_is_an_error_without_fail_open(
    tmp_path: Path, private: RedisServer
) -> None:
    async with Application(settings=app_settings(tmp_path, private.url())) as app:
        cache = await app.cache_manager.create_cache("c", store="redis")
        await cache.set("k", 1)
        private.kill()
        with pytest.raises(AdapterUnavailable, match="Redis"):
            await cache.get("k")
        with pytest.raises(AdapterUnavailable):
            await cache.set("k", 2)


async def _exercise_outage(cache: Cache) -> None:
    assert await cache.get("k") is None
    assert await cache.get("k", MISSING) is MISSING
    assert await cache.mget(["k", "j"]) == [None, None]
    assert await cache.keys() == []
    assert await cache.ttl("k") is MISSING
    await cache.set("k", 2)
    await cache.mset({"a": 1})
    await cache.delete("k")
    await cache.reset()
    await cache.set_value_in_object("o", "f", 1)
    assert await cache.wrap("w", lambda: "computed") == "computed"
    with pytest.raises(AdapterUnavailable):
        await cache.incr("n")  # a counter has no safe answer during an outage


async def test_fail_open_turns_a_dead_redis_into_misses(
    tmp_path: Path, private: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with Application(settings=app_settings(tmp_path, private.url())) as app:
        cache = await app.cache_manager.create_cache("c", store="redis", fail_open=True)
        await cache.set("k", 1)
        assert await cache.get("k") == 1
        private.kill()
        with caplog.at_level(logging.WARNING, logger="accord.cache"):
            await _exercise_outage(cache)
        assert "fail_open treats it as a miss" in caplog.text
        assert caplog.text.count("fail_open treats it as a miss") == 1  # rate-limited
        private.start()  # same port, empty (no persistence)
        await cache.set("k", 3)
        assert await cache.get("k") == 3


async def test_fail_open_bounds_each_operation_on_a_hung_redis(
    tmp_path: Path, private: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with Application(settings=app_settings(tmp_path, private.url())) as app:
        cache = await app.cache_manager.create_cache(
            "c", store="redis", fail_open=True, op_timeout=0.2
        )
        await cache.set("k", 1)
        private.pause()
        try:
            with caplog.at_level(logging.WARNING, logger="accord.cache"):
                # Each call gives up after op_timeout instead of waiting on the socket.
                async with asyncio.timeout(30):
                    await _exercise_outage(cache)
            assert "TimeoutError" in caplog.text
        finally:
            private.resume()
        # Writes that timed out were still sent, and may apply once Redis resumes;
        # what matters is that the connection stays in step.
        await _autopipeline_settles(cache)


async def _autopipeline_settles(cache: Cache) -> None:
    """Replies to the abandoned commands arrive after resume; the connection stays in step."""
    for _ in range(3):
        await cache.set("probe", "p")
        assert await cache.get("probe") == "p"
    await cache.delete("probe")


async def test_fail_open_does_not_hide_a_wrong_type(tmp_path: Path, redis_url: str) -> None:
    async with Application(settings=app_settings(tmp_path, redis_url)) as app:
        cache = await app.cache_manager.create_cache("c", store="redis", fail_open=True)
        await cache.set("s", "text")
        with pytest.raises(Exception, match="not an integer"):
            await cache.incr("s")
        await cache.reset()


def test_the_shared_connection_table_is_empty_after_apps_stop() -> None:
    assert not [key for key in _autopipeline._shared if key[0].startswith("redis://127.0.0.1:64")]
