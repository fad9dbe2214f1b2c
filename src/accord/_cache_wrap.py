"""Read-through for a Cache: one computation per key at a time, optionally one in the cluster."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ._cache_base import MISSING
from ._codec import decode
from .exceptions import StateError

if TYPE_CHECKING:
    from ._cache_api import Cache

__all__ = ["DEFAULT_LOCK_TIMEOUT", "DEFAULT_LOCK_TTL", "Compute", "Predicate", "ReadThrough"]

#: A `wrap` computation: a plain or async callable without arguments.
Compute = Callable[[], Any]
#: `wrap_with_condition`'s predicate: plain or async.
Predicate = Callable[[Any], bool | Awaitable[bool]]
#: What a computation leaves: (stored, the stored bytes) or (False, the unstored result).
Outcome = tuple[bool, Any]

DEFAULT_LOCK_TTL = 30.0
DEFAULT_LOCK_TIMEOUT = 30.0


class ReadThrough:
    """The computations in flight for one cache, keyed by cache key.

    Each runs as its own task, so a caller that is cancelled leaves it running
    for the others; every caller awaits it through `asyncio.shield`.

    Args:
        cache: the cache whose store, codec and lock manager the computations use.
    """

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self._flights: dict[str, asyncio.Future[Outcome]] = {}

    async def run(
        self,
        key: str,
        fn: Compute,
        ttl: float | None,
        predicate: Predicate | None,
        lock: tuple[float, float] | None,
    ) -> Any:
        """Join the computation of `key`, starting it if none is in flight; return its result."""
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(self._fill(key, fn, ttl, predicate, lock))
            self._flights[key] = flight
            flight.add_done_callback(functools.partial(self._landed, key))
        try:
            stored, payload = await asyncio.shield(flight)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if flight.cancelled() and task is not None and not task.cancelling():
                raise StateError(
                    f"cache {self.cache.name!r} closed while computing {key!r}"
                ) from None
            raise
        # Each caller decodes its own copy, so no two callers share a mutable result.
        return decode(payload) if stored else payload

    def cancel(self) -> None:
        for flight in list(self._flights.values()):
            flight.cancel()

    def _landed(self, key: str, flight: asyncio.Future[Outcome]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # retrieved here so an error nobody awaits is not logged as lost

    async def _fill(
        self,
        key: str,
        fn: Compute,
        ttl: float | None,
        predicate: Predicate | None,
        lock: tuple[float, float] | None,
    ) -> Outcome:
        if lock is None:
            return await self._compute(key, fn, ttl, predicate)
        cache = self.cache
        lock_ttl, lock_timeout = lock
        name = cache.lock_name(key)
        async with cache.app.lock_manager.lock(name, ttl=lock_ttl, timeout=lock_timeout):
            # Another instance may have computed it while this one waited for the lock.
            data = await cache.store.get(key)
            if data is not None and cache._decode(key, data, MISSING) is not MISSING:
                return True, data
            outcome = await self._compute(key, fn, ttl, predicate)
        return outcome

    async def _compute(
        self, key: str, fn: Compute, ttl: float | None, predicate: Predicate | None
    ) -> Outcome:
        result = await call(fn)
        if predicate is not None:
            verdict = predicate(result)
            if inspect.isawaitable(verdict):
                verdict = await verdict
            if not verdict:
                return False, result
        data = self.cache._encode(key, result)
        await self.cache.store.set(key, data, ttl)
        return True, data


async def call(fn: Compute) -> Any:
    """Call a plain or async function without arguments and return its result."""
    result = fn()
    if inspect.isawaitable(result):
        result = await result
    return result
