"""Release announcements for the lock keys this process waits for: a LISTEN channel per key."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg

from ...config import redact
from .._lock_waiters import MAX_SLEEP, Waiters
from ._pool import connect

logger = logging.getLogger("accord.locks.postgres")

#: A release of the key with digest D is announced on CHANNEL_PREFIX + D (an identifier < 64 bytes).
CHANNEL_PREFIX = "accord_lock_"
#: How long a waiter waits for its LISTEN before relying on polling alone.
LISTEN_WAIT = 2.0
#: A channel nobody here has waited on for this long is unlistened.
IDLE = 30.0
#: How often the listener looks for idle channels.
HOUSEKEEPING = 1.0


class PostgresWakeups:
    """LISTENs on the channel of each key a head waits for, and wakes it on a NOTIFY.

    Only processes that wait for a key receive its notifications. LISTEN needs
    one connection for its whole life, outside the pool; it is re-established
    (and every waiter woken, since notifications may have been missed) after
    a failure.

    Args:
        url: the PostgreSQL URL.
        waiters: the queues to wake, keyed by the digest of the lock's name.
    """

    def __init__(self, url: str, waiters: Waiters) -> None:
        self.url = url
        self._waiters = waiters
        self._wanted: dict[str, float] = {}  # digest -> when a waiter last asked for it
        self._listening: set[str] = set()
        self._connection: asyncpg.Connection | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One statement at a time: asyncpg refuses concurrent ones on a connection.
        self._statements = asyncio.Lock()

    @staticmethod
    def channel(digest: str) -> str:
        return CHANNEL_PREFIX + digest

    async def listen(self, digest: str, deadline: float | None) -> None:
        """Make sure releases of the key are heard; waits for that at most `LISTEN_WAIT` seconds."""
        loop = asyncio.get_running_loop()
        self._wanted[digest] = loop.time()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="accord-lock-wakeups")
        if digest in self._listening:
            return
        wait = LISTEN_WAIT if deadline is None else min(LISTEN_WAIT, deadline - loop.time())
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                await self._ready.wait()
                async with self._statements:
                    connection = self._connection
                    if connection is not None and digest not in self._listening:
                        await connection.add_listener(self.channel(digest), self._notified)
                        self._listening.add(digest)
        except TimeoutError:
            logger.debug("not listening on %s yet; waiting by polling", self.channel(digest))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            logger.debug("LISTEN %s failed: %s", self.channel(digest), exc)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            lost = asyncio.Event()
            connection: asyncpg.Connection | None = None
            try:
                connection = await connect(self.url)
                connection.add_termination_listener(_setter(lost))
                async with self._statements:
                    self._listening = set()
                    for digest in list(self._wanted):
                        await connection.add_listener(self.channel(digest), self._notified)
                        self._listening.add(digest)
                    self._connection = connection
                self._ready.set()
                backoff = 0.05
                # (Re)connected: releases during the gap were not heard.
                self._waiters.wake_all()
                while not lost.is_set():
                    try:
                        async with asyncio.timeout(HOUSEKEEPING):
                            await lost.wait()
                    except TimeoutError:
                        await self._drop_idle(connection)
                raise ConnectionError("the listening connection closed")
            except Exception as exc:
                logger.warning(
                    "lock wake-ups from %s interrupted (%s); listening again in %.2f s",
                    redact(self.url),
                    exc,
                    backoff,
                )
            finally:
                self._ready.clear()
                self._connection = None
                self._listening = set()
                if connection is not None and not connection.is_closed():
                    connection.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_SLEEP)

    async def _drop_idle(self, connection: asyncpg.Connection) -> None:
        now = asyncio.get_running_loop().time()
        idle = [
            digest
            for digest, asked in self._wanted.items()
            if now - asked > IDLE and not self._waiters.waiting(digest)
        ]
        async with self._statements:
            for digest in idle:
                del self._wanted[digest]
                if digest in self._listening:
                    self._listening.discard(digest)
                    await connection.remove_listener(self.channel(digest), self._notified)

    def _notified(self, _connection: Any, _pid: int, channel: str, _payload: str) -> None:
        self._waiters.wake(channel[len(CHANNEL_PREFIX) :])


def _setter(event: asyncio.Event) -> Any:
    return lambda _connection: event.set()
