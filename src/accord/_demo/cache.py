"""Demo step for the cache: per-instance memory store, wrap single-flight, TTL, LRU, JSON-only values."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable

from ..cache import Cache
from ..config import Settings
from ..exceptions import AccordError, SerializationError
from ..testing import cluster, wait_until


async def run(say: Callable[[str], None]) -> None:
    async with cluster(3, name="demo") as apps:
        await apps[0].cache.set("greeting", {"text": "hello"})
        here, there = await apps[0].cache.get("greeting"), await apps[1].cache.get("greeting")
        say(f"instance 1 set 'greeting'; instance 1 reads {here}, instance 2 reads {there}")
        say(
            "the default store is 'memory': one cache per instance, nothing shared "
            "(set ACCORD_CACHE_STORE=redis and ACCORD_CACHE_URL to share one)"
        )

        calls = 0

        async def load_config() -> dict[str, int]:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.05)  # a slow database read
            return {"token_ttl": 3600}

        results = await asyncio.gather(
            *(apps[0].cache.wrap("config", load_config, ttl=60) for _ in range(50))
        )
        say(
            f"50 concurrent wrap('config') calls on a miss ran the loader {calls} time(s); "
            f"all got {results[0]}"
        )

        await apps[0].cache.set("session", "abc", ttl=0.2)
        left = await apps[0].cache.ttl("session")
        await wait_until(lambda: _gone(apps[0].cache, "session"), timeout=5)
        say(f"'session' was set with ttl=0.2 s ({left:.2f} s left at once); it is gone now")

        small = await apps[0].cache_manager.create_cache("small", max=3)
        for key in ("a", "b", "c", "d"):
            await small.set(key, key.upper())
        say(f"a cache with max=3 after writing a, b, c, d keeps {sorted(await small.keys())}")

        hits = [await apps[2].cache.incr("hits") for _ in range(3)]
        say(f"counters: incr('hits') three times gives {hits}")

        try:
            await apps[0].cache.set("bad", {"when": object()})
        except SerializationError as exc:
            say(f"values are JSON-compatible data only, never pickled: {exc}")

        await _shared(say)


async def _gone(cache: Cache, key: str) -> bool:
    return await cache.get(key) is None


async def _shared(say: Callable[[str], None]) -> None:
    settings = Settings.from_env()
    if settings.resolved_cache_url is None:
        say("no shared store configured, so the cross-instance step is skipped")
        return
    try:
        with tempfile.TemporaryDirectory(prefix="accord-demo-") as folder:
            shared = settings.replace(app_name="demo", storage=folder)
            async with cluster(3, settings=shared) as apps:
                caches = [
                    await app.cache_manager.create_cache("demo", store="redis") for app in apps
                ]
                await caches[0].set("greeting", {"text": "hello from 1"}, ttl=30)
                seen = [await cache.get("greeting") for cache in caches[1:]]
                say(f"with the Redis store, instances 2 and 3 read what instance 1 set: {seen}")
                await caches[0].reset()
    except (AccordError, OSError) as exc:
        say(f"the shared store at ACCORD_CACHE_URL did not answer ({type(exc).__name__})")
