"""RedisStore: a cache store in Redis, namespaced, over one auto-pipelined connection per URL."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import redis.exceptions as redis_errors

from ..._cache_base import MISSING, Missing
from ..._cache_glob import compile_glob, server_match, unescape
from ..._keys import escape
from ..._registry import scheme_of
from ...config import REDIS_SCHEMES, redact
from ...exceptions import CacheError, ConfigError, StateError
from ._autopipeline import AutoPipeline, Script, acquire_pipeline, release_pipeline
from ._client import map_errors

if TYPE_CHECKING:
    from ...config import Settings

__all__ = ["RedisStore"]

logger = logging.getLogger("accord.cache")

T = TypeVar("T")

DEFAULT_OP_TIMEOUT = 0.1
SCAN_COUNT = 1000
CAS_ATTEMPTS = 100
#: Seconds between two fail-open warnings of one store; the ones in between are counted.
WARN_EVERY = 5.0

# A new key gets the TTL; an existing one keeps its own (the reference's counter semantics).
INCRBY = Script(
    """
local created = redis.call('EXISTS', KEYS[1]) == 0
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if created then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return value
"""
)

MSET_PX = Script(
    """
for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[i], 'PX', ARGV[#ARGV]) end
return #KEYS
"""
)

# Compare-and-set: write ARGV[3] only if the value is still ARGV[2] (ARGV[1] = '1'),
# or still absent (ARGV[1] = '0'). An existing key keeps its TTL; a new one gets ARGV[4].
CAS = Script(
    """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if current ~= ARGV[2] then return 0 end
elseif current then
  return 0
end
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
else
  redis.call('SET', KEYS[1], ARGV[3], 'KEEPTTL')
end
return 1
"""
)

# Failures that mean "Redis is not there", which fail_open turns into misses.
_OUTAGES = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError, TimeoutError)


class RedisStore:
    """A cache store in Redis: keys at `<namespace>:<escaped key>`, values as JSON bytes.

    Every store of one URL in one event loop shares one auto-pipelining
    connection, so concurrent commands travel together. `reset` and `keys`
    SCAN this namespace only (never FLUSHDB, never KEYS).

    Args:
        namespace: the escaped `<app>:<prefix>` every key lives under.
        settings: the app settings; `resolved_cache_url` is the default URL.
        url: a `redis://` or `rediss://` URL. Default: `ACCORD_CACHE_URL`, else `ACCORD_CLUSTER_URL`.
        fail_open: turn Redis outages into misses (reads) and skipped writes, with a
            logged warning, instead of errors. Counters still raise. Default False.
        op_timeout: with `fail_open`, seconds an operation may take before it counts
            as an outage. Default 0.1.
    """

    authoritative = False

    def __init__(
        self,
        *,
        namespace: str,
        settings: Settings | None = None,
        url: str | None = None,
        fail_open: bool = False,
        op_timeout: float = DEFAULT_OP_TIMEOUT,
    ) -> None:
        url = url or (settings.resolved_cache_url if settings is not None else None)
        if not url:
            raise ConfigError(
                "the 'redis' cache store needs a Redis URL: set ACCORD_CACHE_URL or "
                "ACCORD_CLUSTER_URL (Settings(cache_url=...) or cluster_url=...)"
            )
        if scheme_of(url) not in REDIS_SCHEMES:
            raise ConfigError(
                f"the 'redis' cache store needs a redis:// or rediss:// URL, got {redact(url)!r}"
            )
        if not isinstance(op_timeout, int | float) or not 0 < op_timeout < math.inf:
            raise ConfigError(
                f"redis cache store: op_timeout={op_timeout!r} must be positive seconds"
            )
        self.url = url
        self.namespace = namespace
        self.fail_open = bool(fail_open)
        self.op_timeout = float(op_timeout)
        self._prefix = namespace + ":"
        self._pipe: AutoPipeline | None = None
        self._closed = False
        self._warned_at = -math.inf
        self._updating: dict[str, list[Any]] = {}  # key -> [asyncio.Lock, users]
        self._suppressed = 0

    def __repr__(self) -> str:
        return f"<RedisStore {redact(self.url)} {self.namespace}>"

    def key(self, key: str) -> str:
        """The Redis key of a user key: every server-side name is built here."""
        try:
            return self._prefix + escape(key)
        except AttributeError:
            raise TypeError(f"cache keys are strings, got {type(key).__name__} {key!r}") from None

    def _pipeline(self) -> AutoPipeline:
        pipe = self._pipe
        if pipe is None:
            if self._closed:
                raise StateError(f"the Redis cache store {self.namespace} is closed")
            pipe = self._pipe = acquire_pipeline(self.url)
        return pipe

    async def _run(self, op: str, key: str | None, fallback: T, call: Awaitable[T]) -> T:
        """Await one operation at the adapter boundary: map errors, or fail open."""
        if not self.fail_open:
            try:
                return await call
            except (redis_errors.RedisError, OSError) as exc:
                with map_errors(self.url):
                    raise exc
        try:
            async with asyncio.timeout(self.op_timeout):
                return await call
        except _OUTAGES as exc:
            self._warn(op, key, exc)
            return fallback
        except redis_errors.RedisError as exc:
            with map_errors(self.url):
                raise exc

    def _warn(self, op: str, key: str | None, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at < WARN_EVERY:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more since the last warning)" if self._suppressed else ""
        self._warned_at, self._suppressed = now, 0
        logger.warning(
            "cache store %s at %s: %s%s failed (%s); fail_open treats it as a miss%s",
            self.namespace,
            redact(self.url),
            op,
            f" {key!r}" if key is not None else "",
            type(exc).__name__ if isinstance(exc, TimeoutError) else exc,
            more,
        )

    # Lifecycle.

    async def connect(self) -> None:
        await self._run("connect", None, None, self._pipeline().connect())

    async def close(self) -> None:
        self._closed = True
        if self._pipe is not None:
            self._pipe = None
            await release_pipeline(self.url)

    async def abort(self) -> None:
        self._closed = True
        if self._pipe is not None:
            self._pipe = None
            await release_pipeline(self.url, abort=True)

    # The CacheStore protocol.

    async def get(self, key: str) -> bytes | None:
        reply = self._pipeline().send("GET", self.key(key))
        return await self._run("get", key, None, reply)

    async def get_with_ttl(self, key: str) -> tuple[bytes | None, float | None]:
        """The value and its remaining seconds (None: no expiry), in one round trip."""
        pipe, name = self._pipeline(), self.key(key)
        both = asyncio.gather(pipe.send("GET", name), pipe.send("PTTL", name))
        data, pttl = await self._run("get", key, [None, -2], both)
        return data, _seconds(pttl)

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        reply = self._pipeline().send("MGET", *[self.key(key) for key in keys])
        return await self._run("mget", None, [None] * len(keys), reply)

    async def mget_with_ttl(self, keys: Sequence[str]) -> list[tuple[bytes | None, float | None]]:
        pipe = self._pipeline()
        names = [self.key(key) for key in keys]
        replies = asyncio.gather(pipe.send("MGET", *names), *[pipe.send("PTTL", n) for n in names])
        found, *pttls = await self._run("mget", None, [[None] * len(keys)], replies)
        if not pttls:
            pttls = [-2] * len(keys)
        return [(data, _seconds(pttl)) for data, pttl in zip(found, pttls, strict=True)]

    async def set(self, key: str, data: bytes, ttl: float | None) -> None:
        pipe, name = self._pipeline(), self.key(key)
        reply = (
            pipe.send("SET", name, data)
            if ttl is None
            else pipe.send("SET", name, data, "PX", _ms(ttl))
        )
        await self._run("set", key, None, reply)

    async def mset(self, items: Sequence[tuple[str, bytes]], ttl: float | None) -> None:
        pipe = self._pipeline()
        if ttl is None:
            flat: list[str | bytes] = []
            for key, data in items:
                flat += (self.key(key), data)
            await self._run("mset", None, None, pipe.send("MSET", *flat))
            return
        names = [self.key(key) for key, _ in items]
        values = [data for _, data in items]
        await self._run("mset", None, None, pipe.run_script(MSET_PX, names, [*values, _ms(ttl)]))

    async def delete(self, keys: Sequence[str]) -> None:
        reply = self._pipeline().send("UNLINK", *[self.key(key) for key in keys])
        await self._run("delete", keys[0] if len(keys) == 1 else None, None, reply)

    async def keys(self, pattern: str) -> list[str]:
        match = compile_glob(pattern)
        found: dict[str, None] = {}  # SCAN may return a key twice; keep the first order
        cut = len(self._prefix)
        for name in await self._scan(server_match(self.namespace, pattern), "keys"):
            key = unescape(name[cut:])
            if match(key):
                found[key] = None
        return list(found)

    async def reset(self) -> None:
        pipe = self._pipeline()
        names = await self._scan(server_match(self.namespace, "*"), "reset")
        for start in range(0, len(names), SCAN_COUNT):
            batch = names[start : start + SCAN_COUNT]
            await self._run("reset", None, None, pipe.send("UNLINK", *batch))

    async def ttl(self, key: str) -> float | None | Missing:
        pttl = await self._run("ttl", key, -2, self._pipeline().send("PTTL", self.key(key)))
        return MISSING if pttl == -2 else _seconds(pttl)

    async def incrby(self, key: str, amount: int, ttl: float | None) -> int:
        pipe, name = self._pipeline(), self.key(key)
        call: Awaitable[Any]
        if ttl is None:
            call = pipe.send("INCRBY", name, amount)
        else:
            call = pipe.run_script(INCRBY, [name], [amount, _ms(ttl)])
        try:
            # A counter has no safe "miss": even with fail_open an outage raises.
            return int(await self._run_strict(call))
        except redis_errors.ResponseError as exc:
            if "not an integer" in str(exc) or "overflow" in str(exc):
                raise CacheError(f"cannot increment key {key!r}: {exc}") from exc
            with map_errors(self.url):
                raise

    async def update(
        self, key: str, change: Callable[[bytes | None], bytes | None], ttl: float | None
    ) -> None:
        # One writer per key in this instance, so only instances race each other.
        entry = self._updating.get(key)
        if entry is None:
            entry = self._updating[key] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                await self._compare_and_set(key, change, ttl)
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._updating[key]

    async def _compare_and_set(
        self, key: str, change: Callable[[bytes | None], bytes | None], ttl: float | None
    ) -> None:
        pipe, name = self._pipeline(), self.key(key)
        for attempt in range(CAS_ATTEMPTS):
            if attempt:
                await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
            old = await self._run("update", key, MISSING, pipe.send("GET", name))
            if old is MISSING:  # fail_open and Redis is away: skip the write
                return
            new = change(old)
            if new is None:
                return
            args = [
                "1" if old is not None else "0",
                old or b"",
                new,
                "" if ttl is None or old is not None else _ms(ttl),
            ]
            if await self._run("update", key, 1, pipe.run_script(CAS, [name], args)):
                return
        raise CacheError(
            f"cannot update key {key!r}: it changed under {CAS_ATTEMPTS} attempts in a row"
        )

    # Helpers.

    async def _run_strict(self, call: Awaitable[Any]) -> Any:
        try:
            if self.fail_open:
                async with asyncio.timeout(self.op_timeout):
                    return await call
            return await call
        except redis_errors.ResponseError:
            raise
        except (redis_errors.RedisError, OSError, TimeoutError) as exc:
            with map_errors(self.url):
                if isinstance(exc, TimeoutError):
                    raise redis_errors.TimeoutError(f"no reply within {self.op_timeout} s") from exc
                raise exc

    async def _scan(self, match: str, op: str) -> list[str]:
        pipe = self._pipeline()
        cursor: bytes | str = "0"
        names: list[str] = []
        while True:
            reply = await self._run(
                op, None, [b"0", []], pipe.send("SCAN", cursor, "MATCH", match, "COUNT", SCAN_COUNT)
            )
            cursor, batch = reply
            names += [name.decode(errors="replace") for name in batch]
            if cursor in (b"0", "0"):
                return names


def _ms(ttl: float) -> int:
    return max(1, math.ceil(ttl * 1000))


def _seconds(pttl: int) -> float | None:
    return None if pttl < 0 else pttl / 1000
