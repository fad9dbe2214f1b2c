"""Waiting for a lock on an engine that announces releases: a queue per key, wake-ups, hand-overs."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from ..exceptions import AdapterError

logger = logging.getLogger("accord.locks")

#: One attempt: the fencing token, or None and the seconds the holder has left (None: unknown).
Attempt = Callable[[], Awaitable[tuple[int | None, float | None]]]

#: Ensures releases of a key are announced to this process, waiting at most until a loop time.
Listening = Callable[[str, float | None], Awaitable[None]]

#: Longest sleep of the head between attempts, in case a release notification is lost.
MAX_SLEEP = 2.0
#: Sleep when the holder's remaining time is unknown.
NO_HINT_SLEEP = 0.005
#: Margin after the holder's expiry, so the next attempt finds the key expired.
EXPIRY_MARGIN = 0.001
#: Hand-overs in a row inside one process before a release goes to the whole cluster.
COHORT_LIMIT = 8


class Waiter:
    """A coroutine of this process waiting for a key."""

    __slots__ = ("active", "future", "granted", "held_for", "owner", "signalled", "ttl")

    def __init__(self, owner: str, ttl: float) -> None:
        self.owner = owner
        self.ttl = ttl
        self.future: asyncio.Future[None] | None = None
        self.granted: int | None = None
        self.active = True
        # Set when the previous head took the key: it is held here, for this long.
        self.held_for: float | None = None
        self.signalled = False

    def wake(self) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(None)
        else:
            # Between two waits: the next wait returns at once.
            self.signalled = True


class Waiters:
    """The waiting side of a lock adapter whose engine announces releases.

    Coroutines of this process that wait for one key line up first come, first
    served; only the first (the head) asks the engine, so a release wakes one
    attempt per process instead of one per coroutine. The head registers for
    a wake-up before each attempt, so a release between a failed attempt and
    the wait is never missed; it also wakes when the holder's lease runs out,
    and at least every `MAX_SLEEP` seconds in case a notification was lost.
    Once waiting, it rides out engine errors (a restart, a dropped
    connection) until its timeout.

    A holder of this process that releases while others here wait hands the
    lock straight to the first of them (`successor`, then `deliver`): one
    request instead of a release, a notification and an attempt. At most
    `COHORT_LIMIT` hand-overs follow each other before a release goes to the
    whole cluster, so other processes are not starved.
    """

    def __init__(self) -> None:
        self._queues: dict[str, deque[Waiter]] = {}
        self._streaks: dict[str, int] = {}

    def wake(self, key: str) -> None:
        """A release of `key` was announced: the head tries again."""
        queue = self._queues.get(key)
        if queue:
            queue[0].wake()

    def wake_all(self) -> None:
        """Notifications may have been missed (a reconnect): every head tries again."""
        for queue in list(self._queues.values()):
            if queue:
                queue[0].wake()

    def waiting(self, key: str) -> bool:
        """Whether a coroutine of this process waits for `key`."""
        return bool(self._queues.get(key))

    def successor(self, key: str) -> Waiter | None:
        """The waiter to hand `key` over to on release, or None for a release to the cluster."""
        queue = self._queues.get(key)
        streak = self._streaks.pop(key, 0)
        if not queue or streak >= COHORT_LIMIT:
            return None
        for waiter in queue:
            if waiter.active and waiter.granted is None:
                self._streaks[key] = streak + 1
                return waiter
        return None

    @staticmethod
    def deliver(waiter: Waiter, token: int) -> bool:
        """Give the handed-over lock to `waiter`; False if it stopped waiting meanwhile."""
        if not waiter.active:
            return False
        waiter.granted = token
        waiter.wake()
        return True

    async def acquire(
        self,
        key: str,
        attempt: Attempt,
        timeout: float | None,
        listening: Listening,
        *,
        owner: str,
        ttl: float,
        label: str | None = None,
    ) -> int | None:
        """Attempt until the key is taken or `timeout` runs out (None: for ever; 0: once).

        Args:
            key: the name wake-ups are announced under.
            attempt: one try at taking the lock.
            timeout: seconds to wait; None waits for ever, 0 tries once.
            listening: makes sure announcements are received.
            owner: who waits, so that a hand-over can name it.
            ttl: the lease the waiter asks for, for a hand-over.
            label: how log lines name the lock. Default: `key`.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        if timeout == 0 or not self._queues.get(key):
            # Nobody here waits for the key: try at once, without queueing.
            token, _ = await attempt()
            if token is not None or timeout == 0:
                return token
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        waiter = Waiter(owner, ttl)
        queue.append(waiter)
        token = None
        try:
            token = await self._wait(key, queue, waiter, attempt, deadline, listening, label or key)
            return token
        finally:
            waiter.active = False
            was_head = queue[0] is waiter
            queue.remove(waiter)
            if queue:
                if was_head:
                    # The new head need not ask the engine while the key is held here.
                    queue[0].held_for = None if token is None else ttl
                    queue[0].wake()
            elif self._queues.get(key) is queue:
                del self._queues[key]

    async def _wait(
        self,
        key: str,
        queue: deque[Waiter],
        waiter: Waiter,
        attempt: Attempt,
        deadline: float | None,
        listening: Listening,
        label: str,
    ) -> int | None:
        loop = asyncio.get_running_loop()
        failures = 0
        listened = False
        while True:
            future: asyncio.Future[None] = loop.create_future()
            waiter.future = future
            if waiter.signalled:
                waiter.signalled = False
                future.set_result(None)
            delay: float | None = None  # not the head: sleep until woken
            if queue[0] is waiter and waiter.held_for is not None:
                # Held by a holder of this process: it hands over or announces
                # its release; wake at its expiry in case it does neither.
                delay = min(waiter.held_for + EXPIRY_MARGIN, MAX_SLEEP)
                waiter.held_for = None
                if not listened:
                    await listening(key, deadline)
                    listened = True
            elif queue[0] is waiter:
                try:
                    token, remaining = await attempt()
                except AdapterError as exc:
                    if waiter.granted is not None:
                        return waiter.granted
                    if deadline is not None and loop.time() >= deadline:
                        raise
                    failures += 1
                    delay = min(0.05 * 2 ** min(failures, 6), MAX_SLEEP)
                    logger.warning(
                        "waiting for lock %r: %s; trying again in %.2f s", label, exc, delay
                    )
                else:
                    # A hand-over needs the key held, so it never races a success.
                    if waiter.granted is not None:
                        return waiter.granted
                    if token is not None:
                        return token
                    if not listened:
                        await listening(key, deadline)
                        listened = True
                        continue
                    failures = 0
                    delay = NO_HINT_SLEEP if remaining is None else remaining + EXPIRY_MARGIN
                    delay = min(delay, MAX_SLEEP)
            if waiter.granted is not None:
                return waiter.granted
            if deadline is not None:
                now = loop.time()
                if now >= deadline:
                    return None
                delay = deadline - now if delay is None else min(delay, deadline - now)
            if not future.done():
                handle = None if delay is None else loop.call_later(delay, _settle, future)
                try:
                    await future
                finally:
                    if handle is not None:
                        handle.cancel()
            if waiter.granted is not None:
                return waiter.granted


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
