"""LocalLockAdapter: in-process locks with FIFO waiters, in a table shared by name within the process."""

from __future__ import annotations

import asyncio
import time
from collections import deque

__all__ = ["LocalLockAdapter"]


class _Waiter:
    __slots__ = ("future", "owner", "ttl")

    def __init__(self, owner: str, ttl: float, future: asyncio.Future[int | None]) -> None:
        self.owner = owner
        self.ttl = ttl
        self.future = future


class _Entry:
    """A held key; it exists only while someone holds the key."""

    __slots__ = ("expires_at", "owner", "timer", "timer_at", "token", "waiters")

    def __init__(self, owner: str, token: int, expires_at: float) -> None:
        self.owner = owner
        self.token = token
        self.expires_at = expires_at
        self.waiters: deque[_Waiter] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0


class _Table:
    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}
        # One counter for every key of the table: tokens rise per key although
        # entries are dropped when free. Tables live as long as the process.
        self.fence = 0


_TABLES: dict[str, _Table] = {}


def table_name(url: str) -> str:
    """`local` and `memory://` name the process default table; `memory://x` the table `x`."""
    return url.partition("://")[2] if "://" in url else ""


class LocalLockAdapter:
    """Locks inside this process: the default, and the reference for the other adapters.

    Every adapter given the same URL shares one table, so several
    Applications in one process form a cluster. Waiters are served first
    come, first served; a key's entry is removed as soon as it is free.

    Args:
        url: `local` (the process default table) or `memory://name`. Default "local".
    """

    def __init__(self, url: str = "local") -> None:
        self.url = url
        self._table = _TABLES.setdefault(table_name(url), _Table())

    def __repr__(self) -> str:
        return f"<LocalLockAdapter {self.url!r} keys={len(self._table.entries)}>"

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def abort(self) -> None:
        pass

    def held_keys(self) -> list[str]:
        """Keys held right now, in this adapter's table."""
        now = time.monotonic()
        return [key for key, entry in self._table.entries.items() if entry.expires_at > now]

    async def holders(self, prefix: str) -> list[tuple[str, str, int, float]]:
        now = time.monotonic()
        return [
            (key, entry.owner, entry.token, entry.expires_at - now)
            for key, entry in self._table.entries.items()
            if entry.expires_at > now and key.startswith(prefix)
        ]

    async def acquire(
        self, key: str, owner: str, ttl: float, timeout: float | None = 0
    ) -> int | None:
        entry = self._current(key)
        if entry is None:
            entry = _Entry(owner, self._next_token(), time.monotonic() + ttl)
            self._table.entries[key] = entry
            self._arm(key, entry)
            return entry.token
        if timeout == 0:
            return None
        loop = asyncio.get_running_loop()
        waiter = _Waiter(owner, ttl, loop.create_future())
        entry.waiters.append(waiter)
        timer = None if timeout is None else loop.call_later(timeout, self._give_up, key, waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            self._withdraw(key, waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def release(self, key: str, owner: str) -> bool:
        entry = self._table.entries.get(key)
        if entry is None or entry.owner != owner:
            return False
        held = entry.expires_at > time.monotonic()
        self._hand_over(key, entry)
        return held

    async def extend(self, key: str, owner: str, ttl: float) -> bool:
        entry = self._current(key)
        if entry is None or entry.owner != owner:
            return False
        entry.expires_at = time.monotonic() + ttl
        self._arm(key, entry)  # a shorter lease needs an earlier timer
        return True

    def _next_token(self) -> int:
        self._table.fence += 1
        return self._table.fence

    def _current(self, key: str) -> _Entry | None:
        """The live entry of `key`, after handing over a lease that ran out."""
        entry = self._table.entries.get(key)
        if entry is not None and entry.expires_at <= time.monotonic():
            self._hand_over(key, entry)
            entry = self._table.entries.get(key)
        return entry

    def _hand_over(self, key: str, entry: _Entry) -> None:
        """The lease ended: give the key to the first waiter still waiting, or drop the entry."""
        while entry.waiters:
            waiter = entry.waiters.popleft()
            if waiter.future.done():
                continue
            entry.owner = waiter.owner
            entry.token = self._next_token()
            entry.expires_at = time.monotonic() + waiter.ttl
            try:
                waiter.future.set_result(entry.token)
            except RuntimeError:  # the waiter's event loop is closed
                continue
            self._arm(key, entry)
            return
        if entry.timer is not None:
            entry.timer.cancel()
        if self._table.entries.get(key) is entry:
            del self._table.entries[key]

    def _arm(self, key: str, entry: _Entry) -> None:
        # One timer per entry; one that fires early just re-arms itself.
        if entry.timer is not None and entry.timer_at <= entry.expires_at:
            return
        if entry.timer is not None:
            entry.timer.cancel()
        loop = asyncio.get_running_loop()
        entry.timer_at = entry.expires_at
        entry.timer = loop.call_later(
            max(0.0, entry.expires_at - time.monotonic()), self._on_timer, key, entry
        )

    def _on_timer(self, key: str, entry: _Entry) -> None:
        entry.timer = None
        if self._table.entries.get(key) is not entry:
            return
        if entry.expires_at <= time.monotonic():
            self._hand_over(key, entry)
        else:
            self._arm(key, entry)

    def _give_up(self, key: str, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        entry = self._table.entries.get(key)
        if entry is not None and waiter in entry.waiters:
            entry.waiters.remove(waiter)
        waiter.future.set_result(None)

    def _withdraw(self, key: str, waiter: _Waiter) -> None:
        entry = self._table.entries.get(key)
        if entry is None:
            return
        if waiter in entry.waiters:
            entry.waiters.remove(waiter)
        elif entry.owner == waiter.owner:
            # The key was handed over just as the waiter was cancelled: pass it on.
            self._hand_over(key, entry)
