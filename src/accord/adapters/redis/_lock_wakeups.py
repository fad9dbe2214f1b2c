"""Release announcements for the lock keys this process waits for: a Redis channel per key."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any

from ...config import redact
from .._lock_waiters import MAX_SLEEP, Waiters
from ._client import map_errors, new_client

if TYPE_CHECKING:
    import redis.asyncio as aioredis

logger = logging.getLogger("accord.locks.redis")

#: A release of key K is announced on CHANNEL_PREFIX + K.
CHANNEL_PREFIX = "accord:lock-released:"
#: How long a waiter waits for its subscription before relying on polling alone.
LISTEN_WAIT = 2.0
#: A channel nobody here has waited on for this long is unsubscribed.
IDLE = 30.0
#: How often the listener looks for idle channels.
HOUSEKEEPING = 1.0


class RedisWakeups:
    """Subscribes to the channel of each key a head waits for, and wakes it on a release.

    Only processes that wait for a key receive its announcements, so a
    release costs nothing to the instances that do not care. One connection
    of its own carries every subscription; it is re-established (and every
    waiter woken, since announcements may have been missed) after a failure.

    Args:
        url: the Redis URL.
        waiters: the queues to wake.
    """

    def __init__(self, url: str, waiters: Waiters) -> None:
        self.url = url
        self._waiters = waiters
        self._wanted: dict[str, float] = {}  # channel -> when a waiter last asked for it
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._pubsub: Any = None
        self._task: asyncio.Task[None] | None = None
        # A channel of its own keeps the connection subscribed while nobody waits.
        self.name = f"accord-lock-wakeups-{uuid.uuid4().hex[:12]}"
        self._home = f"accord:lock-listener:{self.name}"

    @staticmethod
    def channel(key: str) -> str:
        return CHANNEL_PREFIX + key

    async def listen(self, key: str, deadline: float | None) -> None:
        """Make sure releases of `key` are heard; waits for that at most `LISTEN_WAIT` seconds."""
        loop = asyncio.get_running_loop()
        channel = self.channel(key)
        self._wanted[channel] = loop.time()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="accord-lock-wakeups")
        future = self._confirmed.get(channel)
        if future is None:
            future = self._confirmed[channel] = loop.create_future()
            if self._pubsub is not None:
                try:
                    with map_errors(self.url):
                        await self._pubsub.subscribe(channel)
                except Exception as exc:  # the listener resubscribes when it reconnects
                    logger.debug("subscribing to %s failed: %s", channel, exc)
        if future.done():
            return
        wait = LISTEN_WAIT if deadline is None else min(LISTEN_WAIT, deadline - loop.time())
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                await asyncio.shield(future)
        except TimeoutError:
            logger.debug("not subscribed to %s yet; waiting by polling", channel)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.05
        while True:
            # Named, so that it can be told apart in CLIENT LIST.
            client = new_client(self.url, socket_timeout=None, client_name=self.name)
            pubsub = client.pubsub()
            try:
                with map_errors(self.url):
                    for channel, future in list(self._confirmed.items()):
                        if future.done():
                            self._confirmed[channel] = loop.create_future()
                    subscribed = set(self._wanted)
                    await pubsub.subscribe(self._home, *subscribed)
                    self._pubsub = pubsub
                    # Channels asked for while that ran; later ones subscribe themselves.
                    missing = set(self._wanted) - subscribed
                    if missing:
                        await pubsub.subscribe(*missing)
                    next_sweep = loop.time() + HOUSEKEEPING
                    while True:
                        message = await pubsub.get_message(timeout=HOUSEKEEPING)
                        if message is not None and self._handle(message):
                            backoff = 0.05
                        if loop.time() >= next_sweep:
                            next_sweep = loop.time() + HOUSEKEEPING
                            await self._drop_idle(pubsub, loop.time())
            except Exception as exc:
                logger.warning(
                    "lock wake-ups from %s interrupted (%s); resubscribing in %.2f s",
                    redact(self.url),
                    exc,
                    backoff,
                )
            finally:
                self._pubsub = None
                await _close_quietly(pubsub, client)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_SLEEP)

    def _handle(self, message: dict[str, Any]) -> bool:
        """Dispatch one message; True when it confirms the connection is back."""
        channel = _text(message["channel"])
        kind = message["type"]
        if kind == "message":
            self._waiters.wake(channel[len(CHANNEL_PREFIX) :])
        elif kind == "subscribe":
            if channel == self._home:
                # (Re)connected: releases during the gap were not heard.
                self._waiters.wake_all()
                return True
            future = self._confirmed.get(channel)
            if future is not None and not future.done():
                future.set_result(None)
        return False

    async def _drop_idle(self, pubsub: Any, now: float) -> None:
        idle = [
            channel
            for channel, asked in self._wanted.items()
            if now - asked > IDLE and not self._waiters.waiting(channel[len(CHANNEL_PREFIX) :])
        ]
        for channel in idle:
            del self._wanted[channel]
            self._confirmed.pop(channel, None)
        if idle:
            await pubsub.unsubscribe(*idle)


def _text(data: bytes | str) -> str:
    return data.decode() if isinstance(data, bytes) else data


async def _close_quietly(pubsub: Any, client: aioredis.Redis) -> None:
    try:
        await pubsub.aclose()
        await client.aclose()
    except Exception:  # the connection is already broken; nothing to clean
        pass
