"""Cache contract, read-through: wrap and wrap_with_condition on the memory and Redis stores."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from accord import Application, SerializationError, Settings
from accord.cache import MISSING, Cache
from conftest import unique

STORE_PARAMS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
]


@pytest.fixture(params=STORE_PARAMS)
async def cache(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Cache]:
    name = unique("wrap")
    extra = {}
    if request.param == "redis":
        extra["cache_url"] = request.getfixturevalue("redis_url")
    settings = Settings(
        app_name=name,
        storage=str(tmp_path),
        pubsub_url=f"memory://{name}",
        lock_url=f"memory://{name}",
        cache_store=request.param,
        **extra,
    )
    async with Application(settings=settings) as app:
        cache = await app.cache_manager.create_cache("w")
        yield cache
        await cache.reset()


class Counter:
    """An async computation that counts its calls and can be held open."""

    def __init__(self, result: Any = "value", *, error: Exception | None = None) -> None:
        self.calls = 0
        self.result = result
        self.error = error
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self) -> Any:
        self.calls += 1
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.result


async def test_wrap_computes_on_a_miss_and_reads_after(cache: Cache) -> None:
    fn = Counter({"n": 1})
    assert await cache.wrap("k", fn) == {"n": 1}
    assert await cache.wrap("k", fn) == {"n": 1}
    assert fn.calls == 1
    assert await cache.get("k") == {"n": 1}


async def test_wrap_accepts_a_plain_function_and_a_ttl(cache: Cache) -> None:
    assert await cache.wrap("k", lambda: [1, 2], ttl=30) == [1, 2]
    remaining = await cache.ttl("k")
    assert isinstance(remaining, float) and remaining <= 30


async def test_wrap_stores_none_like_any_value(cache: Cache) -> None:
    fn = Counter(None)
    assert await cache.wrap("k", fn) is None
    assert await cache.wrap("k", fn) is None
    assert fn.calls == 1
    assert await cache.get("k", MISSING) is None


async def test_100_concurrent_misses_call_fn_once(cache: Cache) -> None:
    fn = Counter({"big": list(range(10))})
    fn.release.clear()
    calls = [asyncio.ensure_future(cache.wrap("k", fn, ttl=60)) for _ in range(100)]
    await asyncio.sleep(0.05)
    fn.release.set()
    results = await asyncio.gather(*calls)
    assert fn.calls == 1
    assert all(result == {"big": list(range(10))} for result in results)
    results[0]["big"].append("mine")  # every caller has its own copy
    assert results[1] == {"big": list(range(10))}


async def test_when_fn_raises_every_waiter_gets_the_error_and_nothing_is_stored(
    cache: Cache,
) -> None:
    fn = Counter(error=RuntimeError("backend down"))
    fn.release.clear()
    calls = [asyncio.ensure_future(cache.wrap("k", fn)) for _ in range(20)]
    await asyncio.sleep(0.05)
    fn.release.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert fn.calls == 1
    assert all(isinstance(result, RuntimeError) for result in results)
    assert await cache.get("k", MISSING) is MISSING
    fn.error = None
    assert await cache.wrap("k", fn) == "value"  # the next call tries again
    assert fn.calls == 2


async def test_a_waiter_that_is_cancelled_does_not_cancel_the_others(cache: Cache) -> None:
    fn = Counter()
    fn.release.clear()
    first = asyncio.ensure_future(cache.wrap("k", fn))
    second = asyncio.ensure_future(cache.wrap("k", fn))
    await asyncio.sleep(0.05)
    first.cancel()
    fn.release.set()
    assert await second == "value"
    assert first.cancelled()
    assert fn.calls == 1


async def test_wrap_of_an_unencodable_result_raises_and_stores_nothing(cache: Cache) -> None:
    with pytest.raises(SerializationError, match="'k'"):
        await cache.wrap("k", lambda: object())
    assert await cache.get("k", MISSING) is MISSING


async def test_wrap_with_condition_bypasses_the_cache_when_use_cache_is_false(
    cache: Cache,
) -> None:
    await cache.set("k", "cached")
    fn = Counter("fresh")
    assert await cache.wrap_with_condition("k", fn, use_cache=False) == "fresh"
    assert await cache.get("k") == "cached"  # not written either
    assert await cache.wrap_with_condition("other", fn, use_cache=False) == "fresh"
    assert await cache.get("other", MISSING) is MISSING


async def test_wrap_with_condition_stores_only_truthy_results_by_default(cache: Cache) -> None:
    for falsy in (None, 0, "", [], {}, False):
        fn = Counter(falsy)
        assert await cache.wrap_with_condition("k", fn) == falsy
        assert await cache.get("k", MISSING) is MISSING
    fn = Counter({"ok": 1})
    assert await cache.wrap_with_condition("k", fn, ttl=30) == {"ok": 1}
    assert await cache.wrap_with_condition("k", fn) == {"ok": 1}
    assert fn.calls == 1


async def test_wrap_with_condition_uses_the_predicate_plain_or_async(cache: Cache) -> None:
    assert await cache.wrap_with_condition("a", lambda: 0, is_cacheable=lambda r: True) == 0
    assert await cache.get("a", MISSING) == 0

    async def never(result: Any) -> bool:
        return False

    assert await cache.wrap_with_condition("b", lambda: "x", is_cacheable=never) == "x"
    assert await cache.get("b", MISSING) is MISSING


async def test_wrap_with_condition_reads_a_hit_even_if_falsy(cache: Cache) -> None:
    await cache.set("k", 0)
    fn = Counter("recomputed")
    assert await cache.wrap_with_condition("k", fn) == 0
    assert fn.calls == 0
