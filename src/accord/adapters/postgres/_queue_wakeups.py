"""Wake-ups of the PostgreSQL queue adapter: LISTEN on one connection, per-channel counters."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg

from ...config import redact
from ._pool import connect, map_errors

logger = logging.getLogger("accord.queue.postgres")

BACKOFF_MAX = 5.0


class Wakeups:
    """Counters of NOTIFY wake-ups per channel digest, and the claimers waiting for the next one.

    A claimer reads `current(digest)` before it queries, and waits with that
    value: a NOTIFY that lands between the query and the wait is not lost.
    """

    def __init__(self) -> None:
        self.generations: dict[str, int] = {}
        self.waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None

    def current(self, digest: str) -> int:
        return self.generations.get(digest, 0)

    def notify(self, digest: str) -> None:
        self.generations[digest] = self.current(digest) + 1
        for waiter in self.waiters.pop(digest, ()):
            if not waiter.done():
                waiter.set_result(None)

    def wake_all(self) -> None:
        for digest in list(self.waiters):
            self.notify(digest)

    async def wait(self, digest: str, since: int, timeout: float) -> None:
        """Return after a wake-up newer than `since`, or after `timeout` seconds."""
        if self.current(digest) != since or timeout <= 0:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(digest, set()).add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            pass
        finally:
            waiting = self.waiters.get(digest)
            if waiting is not None:
                waiting.discard(waiter)

    # The listening connection.

    def listen(self, url: str, channel: str) -> None:
        """Start listening on `channel` (once); reconnects with backoff until `stop`."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._listen(url, channel), name="accord-queue-postgres-listen"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _listen(self, url: str, channel: str) -> None:
        # LISTEN needs one connection for its whole life, outside the pools.
        backoff = 0.05
        while True:
            lost = asyncio.Event()
            connection: asyncpg.Connection | None = None
            try:
                connection = await connect(url)
                connection.add_termination_listener(_on_close(lost))
                with map_errors(url):
                    await connection.add_listener(channel, self._notified)
                backoff = 0.05
                # Jobs published while nobody listened were not announced.
                self.wake_all()
                await lost.wait()
                raise ConnectionError("the listening connection closed")
            except Exception as exc:
                logger.warning(
                    "queue wake-ups from %s interrupted (%s); claimers poll until listening "
                    "again in %.2f s",
                    redact(url),
                    exc,
                    backoff,
                )
            finally:
                if connection is not None and not connection.is_closed():
                    connection.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _notified(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        self.notify(payload)


def _on_close(event: asyncio.Event) -> Any:
    return lambda _connection: event.set()
