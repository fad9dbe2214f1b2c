"""NearStore: an in-process L1 in front of a shared store, invalidated on every instance through pub/sub."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from ._cache_base import Missing
from ._keys import join
from .adapters.memory.cache import MemoryStore

if TYPE_CHECKING:
    from .app import Application
    from .cache import CacheStore

__all__ = ["NearStore"]

T = TypeVar("T")

CHANNEL = "accord.cache"
#: Invalidation counters are kept per stripe of keys, so memory stays bounded.
STRIPES = 64
#: Seconds `close` waits for invalidations still being published.
CLOSE_GRACE = 2.0


class NearStore:
    """A shared store with a bounded, short-lived in-process copy (L1) in front of it.

    Every write on any instance drops the written keys from the L1 of every
    instance: locally at once, elsewhere through `app.pub_sub_manager`. The L1
    is used only while the pub/sub link is up; it is flushed when the link is
    lost and again when it is restored, so a missed invalidation cannot serve
    stale data for long. A read that races an invalidation does not refill the
    L1 (each stripe of keys carries an invalidation counter, checked on fill).
    In the worst case (a lost publish that no reconnect reveals) an entry is
    stale for at most `ttl` seconds.

    Args:
        remote: the shared store (its `get_with_ttl` is used when it has one).
        app: the application whose pub/sub manager carries invalidations.
        log: the logger for warnings.
        prefix: the cache prefix; caches sharing a prefix share invalidations.
        max: the most entries in the L1. Default 1000.
        ttl: the longest an L1 entry lives, in seconds. Default 5.
    """

    authoritative = False

    def __init__(
        self,
        remote: CacheStore,
        *,
        app: Application,
        log: logging.LoggerAdapter[logging.Logger],
        prefix: str,
        max: int = 1000,
        ttl: float | None = 5.0,
    ) -> None:
        self.remote = remote
        self.app = app
        self.log = log
        self.local = MemoryStore(max=max)
        self.local_ttl = 5.0 if ttl is None else ttl
        self.channel = join(CHANNEL, prefix)
        self.enabled = False
        self.peek = self.local.peek  # the Cache's synchronous fast path
        self._epoch = 0
        self._stripes = [0] * STRIPES
        self._subscribed = False
        self._stopping = False
        self._publishing: set[asyncio.Future[None]] = set()
        self._get_with_ttl: Callable[[str], Awaitable[tuple[bytes | None, float | None]]] | None
        self._get_with_ttl = getattr(remote, "get_with_ttl", None)
        self._mget_with_ttl: (
            Callable[[Sequence[str]], Awaitable[list[tuple[bytes | None, float | None]]]] | None
        ) = getattr(remote, "mget_with_ttl", None)

    def __repr__(self) -> str:
        state = "on" if self.enabled else "off"
        return f"<NearStore L1 {len(self.local)}/{self.local.max} {state} over {self.remote!r}>"

    # L1 bookkeeping.

    def _token(self, key: str) -> tuple[int, int]:
        return self._epoch, self._stripes[hash(key) % STRIPES]

    def _fill(
        self, key: str, token: tuple[int, int], data: bytes | None, ttl: float | None
    ) -> None:
        if data is None or not self.enabled or token != self._token(key):
            return
        try:
            self.local.put(key, data, self.local_ttl if ttl is None else min(ttl, self.local_ttl))
        except orjson.JSONDecodeError:
            pass  # not JSON: never cached locally; the Cache reports it as a miss

    def forget(self, keys: Sequence[str]) -> None:
        """Drop `keys` from this instance's L1 (and stop in-flight reads from refilling them)."""
        stripes = self._stripes
        for key in keys:
            stripes[hash(key) % STRIPES] += 1
        self.local.discard(keys)

    def forget_all(self) -> None:
        self._epoch += 1
        self.local.clear()

    # Pub/sub wiring.

    async def _on_message(self, message: Any) -> None:
        if not isinstance(message, dict):
            return
        if message.get("all"):
            self.forget_all()
        keys = message.get("keys")
        if isinstance(keys, list):
            self.forget([key for key in keys if isinstance(key, str)])

    def _on_lost(self, *args: Any) -> None:
        if self.enabled:
            self.log.warning(
                "near cache %s: pub/sub link lost; local copies flushed and bypassed", self.channel
            )
        self.enabled = False
        self.forget_all()

    def _on_restored(self, *args: Any) -> None:
        # The event itself says the link is back and resubscribed; the adapter may
        # report `is_connected()` only after its handlers have run.
        self.forget_all()
        self.enabled = not self._stopping
        self.log.info("near cache %s: pub/sub link restored; local copies flushed", self.channel)

    def _on_stopping(self, *args: Any) -> None:
        # From the start of stop on, invalidations may no longer arrive.
        self._stopping = True
        self.enabled = False
        self.forget_all()

    def _pubsub_up(self) -> bool:
        is_connected = getattr(self.app.pub_sub_manager, "is_connected", None)
        return bool(is_connected()) if callable(is_connected) else False

    def _announce(self, message: dict[str, Any]) -> None:
        # In the background: delivery to other instances is asynchronous anyway, and
        # a pub/sub outage must not hold every write for the publish timeout.
        task = asyncio.ensure_future(self._publish(message))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish(self, message: dict[str, Any]) -> None:
        try:
            await self.app.pub_sub_manager.publish(self.channel, message, skip_self=True)
        except Exception as exc:
            self.log.warning(
                "near cache %s: could not publish an invalidation (%s); other instances may "
                "serve the old value for up to %.1f s",
                self.channel,
                exc,
                self.local_ttl,
            )

    async def _write(self, keys: Sequence[str] | None, call: Awaitable[T]) -> T:
        self.forget_all() if keys is None else self.forget(keys)
        try:
            return await call
        finally:
            # Again after the write: a read that began before it may have refilled the L1.
            self.forget_all() if keys is None else self.forget(keys)
            self._announce({"all": True} if keys is None else {"keys": list(keys)})

    # The CacheStore protocol.

    async def connect(self) -> None:
        await self.remote.connect()
        if not self._subscribed:
            await self.app.pub_sub_manager.subscribe(self.channel, self._on_message)
            self.app.on("pubsub:lost", self._on_lost)
            self.app.on("pubsub:restored", self._on_restored)
            self.app.on("before_stop", self._on_stopping)
            self._subscribed = True
        self.forget_all()
        self.enabled = self._pubsub_up()

    async def close(self) -> None:
        self._detach()
        if self._publishing:
            # Let invalidations already under way go out before the link closes.
            await asyncio.wait(list(self._publishing), timeout=CLOSE_GRACE)
        if self._subscribed:
            try:
                await self.app.pub_sub_manager.unsubscribe(self.channel, self._on_message)
            except Exception as exc:  # pub/sub closes before the caches; nothing left to undo
                self.log.debug("near cache %s: unsubscribe skipped (%s)", self.channel, exc)
        await self.remote.close()

    async def abort(self) -> None:
        self._detach()
        for task in list(self._publishing):
            task.cancel()
        await self.remote.abort()

    def _detach(self) -> None:
        self.enabled = False
        self.forget_all()
        for event, handler in (
            ("pubsub:lost", self._on_lost),
            ("pubsub:restored", self._on_restored),
            ("before_stop", self._on_stopping),
        ):
            self.app.off(event, handler)

    async def get(self, key: str) -> bytes | None:
        token = self._token(key)
        if self._get_with_ttl is not None:
            data, ttl = await self._get_with_ttl(key)
        else:
            data, ttl = await self.remote.get(key), None
        self._fill(key, token, data, ttl)
        return data

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        tokens = [self._token(key) for key in keys]
        if self._mget_with_ttl is not None:
            pairs = await self._mget_with_ttl(keys)
        else:
            pairs = [(data, None) for data in await self.remote.mget(keys)]
        for key, token, (data, ttl) in zip(keys, tokens, pairs, strict=True):
            self._fill(key, token, data, ttl)
        return [data for data, _ in pairs]

    async def set(self, key: str, data: bytes, ttl: float | None) -> None:
        await self._write([key], self.remote.set(key, data, ttl))

    async def mset(self, items: Sequence[tuple[str, bytes]], ttl: float | None) -> None:
        await self._write([key for key, _ in items], self.remote.mset(items, ttl))

    async def delete(self, keys: Sequence[str]) -> None:
        await self._write(keys, self.remote.delete(keys))

    async def reset(self) -> None:
        await self._write(None, self.remote.reset())

    async def incrby(self, key: str, amount: int, ttl: float | None) -> int:
        return await self._write([key], self.remote.incrby(key, amount, ttl))

    async def update(
        self, key: str, change: Callable[[bytes | None], bytes | None], ttl: float | None
    ) -> None:
        await self._write([key], self.remote.update(key, change, ttl))

    async def keys(self, pattern: str) -> list[str]:
        return await self.remote.keys(pattern)

    async def ttl(self, key: str) -> float | None | Missing:
        return await self.remote.ttl(key)
