"""Demo step for locks: two instances contend for a key, fencing tokens rise, a stalled holder loses its lease."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ..exceptions import LockAcquireError, LockLostError
from ..locks import LockManager
from ..testing import cluster


class FencedStore:
    """A storage row that accepts a write only with a higher fencing token than the last one."""

    def __init__(self) -> None:
        self.value: str | None = None
        self.token = 0

    def write(self, value: str, token: int) -> bool:
        # As `UPDATE ... SET value = :v, token = :t WHERE token < :t` would.
        if token <= self.token:
            return False
        self.value, self.token = value, token
        return True


async def run(say: Callable[[str], None]) -> None:
    async with cluster(3, name="demo") as apps:
        first, second, third = (app.lock_manager for app in apps)
        events: list[str] = []

        async def report(name: str, manager_index: int) -> None:
            manager = apps[manager_index].lock_manager
            started = time.monotonic()
            async with manager.lock("report:daily", ttl=5) as lock:
                waited = time.monotonic() - started
                events.append(
                    f"instance {manager_index + 1} ran {name} after waiting {waited:.2f} s "
                    f"(fencing token {lock.fencing_token})"
                )
                await asyncio.sleep(0.2)

        await asyncio.gather(report("the daily report", 0), report("the daily report", 1))
        say("two instances ask for the lock 'report:daily' at once; one waits for the other:")
        for event in events:
            say(f"  {event}")

        tokens = []
        for manager in (third, first, second):
            async with manager.lock("report:daily") as lock:
                tokens.append(lock.fencing_token)
        say(f"each acquisition gets a higher fencing token, whichever instance takes it: {tokens}")

        held = await first.try_acquire("report:daily")
        try:
            await second.try_acquire("report:daily")
        except LockAcquireError as exc:
            say(f"try_acquire on a held key fails at once: {exc}")
        await held.release()

        await _stalled_holder(say, first, second)


async def _stalled_holder(
    say: Callable[[str], None], first: LockManager, second: LockManager
) -> None:
    store = FencedStore()
    stale_token = 0
    holding = asyncio.Event()

    async def stalled() -> None:
        nonlocal stale_token
        try:
            async with first.lock("ledger", ttl=0.3) as lock:
                stale_token = lock.fencing_token
                store.write("written by instance 1", lock.fencing_token)
                holding.set()
                # A stall: a long GC pause or a blocking call. Nothing runs, so
                # the lease cannot be renewed and runs out meanwhile.
                time.sleep(0.8)  # noqa: ASYNC251 - the stall is the point
                await asyncio.sleep(1)
                say("  (never printed: the body does not run on past a lost lease)")
        except LockLostError as exc:
            say(f"instance 1 wakes up after the stall; its body is cancelled: {exc}")

    async def next_holder() -> int:
        await holding.wait()
        async with second.lock("ledger", ttl=5, timeout=5) as lock:
            store.write("written by instance 2", lock.fencing_token)
            return lock.fencing_token

    say("instance 1 holds 'ledger' (ttl 0.3 s, renewed) and stalls for 0.8 s")
    _, token = await asyncio.gather(stalled(), next_holder())
    say(f"instance 2 took 'ledger' once the lease had run out, with token {token}")
    accepted = store.write("late write by instance 1", stale_token)
    say(
        f"instance 1's late write with its old token {stale_token} is "
        f"{'accepted' if accepted else 'rejected'} by the fenced storage, "
        f"which keeps {store.value!r}"
    )
