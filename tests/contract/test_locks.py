"""LockManager contract, run in a 3-instance cluster on every lock adapter (local, Redis, PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest

from accord import (
    Application,
    ConfigError,
    LockAcquireError,
    LockHolder,
    LockLostError,
    Settings,
    StateError,
)
from accord.locks import LockState
from accord.testing import cluster, stop_abruptly, wait_until
from conftest import unique

WAIT = 10.0
ADAPTER_PARAMS = [
    pytest.param("local", id="local"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(params=ADAPTER_PARAMS)
def lock_url(request: pytest.FixtureRequest) -> str:
    if request.param == "local":
        return f"memory://{unique('locks')}"
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


def make_settings(lock_url: str, tmp_path: Path, name: str | None = None) -> Settings:
    name = name or unique("lk")
    return Settings(
        app_name=name,
        storage=str(tmp_path),
        lock_url=lock_url,
        pubsub_url=f"memory://{name}",
        queue_url=f"memory://{name}",
    )


@pytest.fixture
async def apps(lock_url: str, tmp_path: Path) -> AsyncIterator[list[Application]]:
    async with cluster(3, settings=make_settings(lock_url, tmp_path)) as started:
        yield started


# The reference's scenarios.


async def test_acquire_and_release_are_ordered(apps: list[Application]) -> None:
    a, b, _ = apps
    events: list[str] = []
    release = await a.lock_manager.acquire("k", ttl=5)
    events.append("a acquired")

    async def second() -> None:
        lock = await b.lock_manager.acquire("k", ttl=5, timeout=WAIT)
        events.append("b acquired")
        await lock()

    waiter = asyncio.create_task(second())
    await asyncio.sleep(0.1)
    events.append("a releasing")
    assert await release() is True
    await asyncio.wait_for(waiter, WAIT)
    assert events == ["a acquired", "a releasing", "b acquired"]


async def test_a_lease_goes_to_the_next_waiter_when_it_expires(apps: list[Application]) -> None:
    a, b, _ = apps
    first = await a.lock_manager.acquire("k", ttl=0.2)
    started = time.monotonic()
    second = await b.lock_manager.acquire("k", ttl=1, timeout=WAIT)
    waited = time.monotonic() - started
    assert waited >= 0.15, (
        f"the next waiter got the lock after {waited:.3f} s, before the lease ran out"
    )
    assert second.fencing_token > first.fencing_token
    assert await first() is False, "the expired holder's release must not free the new lease"
    with pytest.raises(LockAcquireError):
        await apps[2].lock_manager.try_acquire("k")
    assert await second() is True


async def test_run_exclusive_is_strictly_serialized(apps: list[Application]) -> None:
    inside = 0
    peak = 0
    counter = {"value": 0}

    async def body() -> int:
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        value = counter["value"]
        await asyncio.sleep(0.005)
        counter["value"] = value + 1
        inside -= 1
        return value

    calls = [app.lock_manager.run_exclusive("k", body, ttl=5) for app in apps for _ in range(8)]
    results = await asyncio.wait_for(asyncio.gather(*calls), 60)
    assert peak == 1
    assert counter["value"] == 24
    assert sorted(results) == list(range(24))


async def test_renewal_keeps_a_short_lease_through_a_longer_body(apps: list[Application]) -> None:
    a, b, _ = apps
    finished = asyncio.Event()

    async def body() -> str:
        await asyncio.sleep(0.4)
        finished.set()
        return "done"

    holder = asyncio.create_task(a.lock_manager.run_exclusive("k", body, ttl=0.2))
    await wait_until(lambda: bool(a.lock_manager.held), WAIT)
    # Never preempted: the lock is busy until the body is done.
    while not finished.is_set():
        with pytest.raises(LockAcquireError):
            await b.lock_manager.try_acquire("k")
        await asyncio.sleep(0.05)
    assert await asyncio.wait_for(holder, WAIT) == "done"
    lock = await b.lock_manager.try_acquire("k")
    await lock.release()


async def test_try_acquire_on_a_held_key_raises(apps: list[Application]) -> None:
    a, b, _ = apps
    held = await a.lock_manager.try_acquire("k")
    with pytest.raises(LockAcquireError, match="held"):
        await b.lock_manager.try_acquire("k")
    with pytest.raises(LockAcquireError):
        await a.lock_manager.try_acquire("k")
    await held.release()


async def test_simultaneous_try_acquire_has_exactly_one_winner(apps: list[Application]) -> None:
    attempts = [app.lock_manager.try_acquire("k") for app in apps for _ in range(5)]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, LockAcquireError) for r in losers), losers
    assert await winners[0].release() is True


async def test_try_acquire_with_a_timeout_gets_a_lock_released_meanwhile(
    apps: list[Application],
) -> None:
    a, b, _ = apps
    held = await a.lock_manager.try_acquire("k")

    async def release_soon() -> None:
        await asyncio.sleep(0.05)
        await held.release()

    releasing = asyncio.create_task(release_soon())
    handle = await b.lock_manager.try_acquire("k", timeout=WAIT)
    await releasing
    assert handle.held
    assert handle.fencing_token > held.fencing_token
    await handle.release()


async def test_a_timeout_while_held_raises(apps: list[Application]) -> None:
    a, b, _ = apps
    held = await a.lock_manager.try_acquire("k")
    with pytest.raises(LockAcquireError, match="within 0.05 s"):
        await b.lock_manager.try_acquire("k", timeout=0.05)
    with pytest.raises(LockAcquireError):
        await b.lock_manager.acquire("k", ttl=1, timeout=0.05)
    with pytest.raises(LockAcquireError):
        async with b.lock_manager.lock("k", timeout=0.05):
            pytest.fail("the block must not run without the lock")
    assert await held.release() is True


async def test_extend_keeps_the_lease(apps: list[Application]) -> None:
    a, b, _ = apps
    handle = await a.lock_manager.try_acquire("k")
    await handle.acquire(0.3)
    await asyncio.sleep(0.15)
    await handle.extend(2.0)
    await asyncio.sleep(0.3)  # past the first ttl
    with pytest.raises(LockAcquireError):
        await b.lock_manager.try_acquire("k")
    assert await handle.release() is True
    with pytest.raises(LockAcquireError, match="no active lease"):
        await handle.extend(1)


async def test_releasing_an_unused_handle_frees_the_key(apps: list[Application]) -> None:
    a, b, _ = apps
    handle = await a.lock_manager.try_acquire("k")
    assert handle.state is LockState.RESERVED
    assert await handle.release() is True
    again = await b.lock_manager.try_acquire("k")
    await again.release()


# Fencing tokens.


async def test_fencing_tokens_rise_per_key_across_the_cluster(apps: list[Application]) -> None:
    tokens: dict[str, list[int]] = {"k1": [], "k2": []}
    for round_ in range(4):
        for key in tokens:
            app = apps[round_ % 3]
            async with app.lock_manager.lock(key, ttl=5) as lock:
                tokens[key].append(lock.fencing_token)
    expiring = await apps[0].lock_manager.acquire("k1", ttl=0.1)
    tokens["k1"].append(expiring.fencing_token)
    after = await apps[1].lock_manager.acquire("k1", ttl=1, timeout=WAIT)
    tokens["k1"].append(after.fencing_token)
    await after()
    for key, seen in tokens.items():
        assert seen == sorted(seen) and len(set(seen)) == len(seen), (key, seen)


# Ownership and cancellation.


async def test_a_release_never_frees_another_holders_lock(apps: list[Application]) -> None:
    a, b, c = apps
    stale = await a.lock_manager.acquire("k", ttl=0.1)
    fresh = await b.lock_manager.acquire("k", ttl=5, timeout=WAIT)
    assert await stale.release() is False
    assert await stale.release() is False
    with pytest.raises(LockAcquireError):
        await c.lock_manager.try_acquire("k")
    assert await fresh.release() is True
    assert await fresh.release() is False, "a second release is a no-op"


async def test_cancelling_a_waiter_leaks_no_lease(apps: list[Application]) -> None:
    a, b, c = apps
    held = await a.lock_manager.acquire("k", ttl=5)
    waiter = asyncio.create_task(b.lock_manager.acquire("k", ttl=30))
    await asyncio.sleep(0.1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await held.release()
    lock = await c.lock_manager.try_acquire("k", timeout=WAIT)
    assert not b.lock_manager.held
    await lock.release()


async def test_cancelling_the_body_releases_the_lock(apps: list[Application]) -> None:
    a, b, _ = apps
    started = asyncio.Event()

    async def body() -> None:
        started.set()
        await asyncio.sleep(60)

    task = asyncio.create_task(a.lock_manager.run_exclusive("k", body, ttl=30))
    await asyncio.wait_for(started.wait(), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not a.lock_manager.held
    lock = await b.lock_manager.try_acquire("k")
    await lock.release()


async def test_an_error_in_the_body_propagates_and_releases(apps: list[Application]) -> None:
    a, b, _ = apps

    async def body() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await a.lock_manager.run_exclusive("k", body)
    lock = await b.lock_manager.try_acquire("k")
    await lock.release()


async def test_a_lease_lost_while_the_body_runs_cancels_it(apps: list[Application]) -> None:
    a, b, _ = apps
    reached_end = False

    async def body() -> None:
        nonlocal reached_end
        # A blocked event loop (a long GC pause, a CPU-bound call) cannot
        # renew; the lease runs out meanwhile.
        time.sleep(0.5)
        await asyncio.sleep(5)
        reached_end = True

    with pytest.raises(LockLostError, match="lost"):
        await a.lock_manager.run_exclusive("k", body, ttl=0.2)
    assert not reached_end
    assert not a.lock_manager.held
    lock = await b.lock_manager.try_acquire("k", timeout=WAIT)
    await lock.release()


async def test_the_lock_block_exposes_the_token_and_releases(apps: list[Application]) -> None:
    a, b, _ = apps
    async with a.lock_manager.lock("k", ttl=5) as lock:
        assert lock.key == "k"
        assert lock.held and lock.state is LockState.LEASED
        assert isinstance(lock.fencing_token, int) and lock.fencing_token > 0
        assert a.lock_manager.held == (lock,)
    assert lock.state is LockState.RELEASED
    async with b.lock_manager.lock("k", ttl=5, timeout=WAIT) as second:
        assert second.fencing_token > lock.fencing_token


async def test_a_reservation_becomes_a_lease(apps: list[Application]) -> None:
    a, b, _ = apps
    handle = await a.lock_manager.try_acquire("k")
    with pytest.raises(LockAcquireError, match="no active lease"):
        await handle.extend(1)
    release = await handle.acquire(0.2)
    assert release is handle and handle.state is LockState.LEASED
    # Not renewed: the next waiter gets it once the lease runs out.
    second = await b.lock_manager.acquire("k", ttl=1, timeout=WAIT)
    assert await release() is False
    with pytest.raises(LockAcquireError):
        await handle.acquire(1)
    await second()


async def test_a_reservation_that_ran_out_is_lost(apps: list[Application]) -> None:
    a, b, _ = apps
    handle = await a.lock_manager.try_acquire("k", ttl=0.1)
    taken = await b.lock_manager.acquire("k", ttl=5, timeout=WAIT)
    with pytest.raises(LockLostError, match="ran out"):
        await handle.acquire(1)
    assert handle.state is LockState.LOST and not a.lock_manager.held
    with pytest.raises(LockAcquireError):
        await handle.extend(1)
    assert await handle.release() is False
    assert await taken.release() is True


async def test_an_expired_lease_cannot_be_extended(apps: list[Application]) -> None:
    a, b, _ = apps
    lease = await a.lock_manager.acquire("k", ttl=0.1)
    taken = await b.lock_manager.acquire("k", ttl=5, timeout=WAIT)
    with pytest.raises(LockAcquireError, match="expired or was taken"):
        await lease.extend(5)
    assert lease.state is LockState.LOST
    await taken.release()


async def test_extending_inside_the_block_shortens_the_renewal(apps: list[Application]) -> None:
    a, b, _ = apps
    async with a.lock_manager.lock("k", ttl=30) as lock:
        await lock.extend(0.3)
        assert lock.ttl == 0.3
        await asyncio.sleep(0.7)  # past the new ttl: renewed at its pace, not every 10 s
        with pytest.raises(LockAcquireError):
            await b.lock_manager.try_acquire("k")
    lock_b = await b.lock_manager.try_acquire("k")
    await lock_b.release()


async def test_a_block_that_waited_long_is_still_renewed(apps: list[Application]) -> None:
    a, b, _ = apps
    held = await a.lock_manager.acquire("k", ttl=0.4)
    finished = False

    async def body() -> None:
        nonlocal finished
        await asyncio.sleep(0.5)
        finished = True

    # Waits about 0.4 s (longer than ttl/3), then holds 0.5 s under a 0.3 s lease.
    await b.lock_manager.run_exclusive("k", body, ttl=0.3, timeout=WAIT)
    assert finished
    assert await held.release() is False


async def test_the_handle_runs_a_body_exclusively(apps: list[Application]) -> None:
    a, b, _ = apps
    handle = await a.lock_manager.try_acquire("k")

    async def body() -> str:
        with pytest.raises(LockAcquireError):
            await b.lock_manager.try_acquire("k")
        return "ran"

    assert await handle.run_exclusive(body, ttl=5) == "ran"
    assert handle.state is LockState.RELEASED
    lock = await b.lock_manager.try_acquire("k")
    await lock.release()


async def test_keys_are_scoped_by_application(lock_url: str, tmp_path: Path) -> None:
    async with (
        cluster(1, settings=make_settings(lock_url, tmp_path / "one")) as (one,),
        cluster(1, settings=make_settings(lock_url, tmp_path / "two")) as (two,),
    ):
        first = await one.lock_manager.try_acquire("shared:key")
        second = await two.lock_manager.try_acquire("shared:key")
        # Escaped segments: "a:b" and "a\\:b" are different keys.
        third = await one.lock_manager.try_acquire("shared\\:key")
        for lock in (first, second, third):
            assert await lock.release() is True


def check_lease(holder: LockHolder, ttl: float) -> LockHolder:
    """The holder with `expires_in` checked against the lock's ttl and set to 0, to compare."""
    assert 0 < holder.expires_in <= ttl, holder
    return LockHolder(holder.key, holder.instance_id, holder.token, 0)


async def test_holders_lists_the_locks_of_every_instance(apps: list[Application]) -> None:
    a, b, c = apps
    assert await c.lock_manager.holders() == []
    first = await a.lock_manager.try_acquire("one", ttl=5)
    second = await b.lock_manager.acquire("two", ttl=3)
    async with c.lock_manager.lock("three", ttl=4) as third:
        expected = [
            LockHolder("one", a.instance_id, first.fencing_token, 0),
            LockHolder("three", c.instance_id, third.fencing_token, 0),
            LockHolder("two", b.instance_id, second.fencing_token, 0),
        ]
        ttls = {"one": 5, "two": 3, "three": 4}
        for app in apps:
            holders = await app.lock_manager.holders()
            assert [check_lease(h, ttls[h.key]) for h in holders] == expected
    assert await first.release() is True
    for app in apps:
        holders = await app.lock_manager.holders()
        assert [check_lease(h, 3) for h in holders] == [expected[2]]
    assert await second.release() is True
    assert await a.lock_manager.holders() == []


async def test_holders_follow_a_hand_over_and_an_expiry(apps: list[Application]) -> None:
    a, b, _ = apps
    first = await a.lock_manager.acquire("k", ttl=5)
    waiter = asyncio.create_task(b.lock_manager.acquire("k", ttl=5, timeout=WAIT))
    await asyncio.sleep(0.05)
    assert await first.release() is True
    second = await asyncio.wait_for(waiter, WAIT)
    (holder,) = await a.lock_manager.holders()
    assert check_lease(holder, 5) == LockHolder("k", b.instance_id, second.fencing_token, 0)
    await second.release()
    await a.lock_manager.acquire("k", ttl=0.2)  # never released
    for app in (a, b):
        await wait_until(partial(_no_holders, app), WAIT, message="an expired lease is listed")


async def _no_holders(app: Application) -> bool:
    return await app.lock_manager.holders() == []


async def test_holders_leave_out_other_applications(lock_url: str, tmp_path: Path) -> None:
    # "x_y" as a LIKE pattern would also match "xay": the prefix must be escaped.
    base = unique("lk")
    one_name, other_name = f"{base}_y", f"{base}ay"
    async with (
        cluster(2, settings=make_settings(lock_url, tmp_path / "one", one_name)) as one,
        cluster(1, settings=make_settings(lock_url, tmp_path / "two", other_name)) as (other,),
    ):
        mine = await one[1].lock_manager.try_acquire("k")
        theirs = await other.lock_manager.try_acquire("k")
        also_theirs = await other.lock_manager.try_acquire("only-theirs")
        for app in one:
            holders = await app.lock_manager.holders()
            assert [(h.key, h.instance_id, h.token) for h in holders] == [
                ("k", one[1].instance_id, mine.fencing_token)
            ]
        holders = await other.lock_manager.holders()
        assert [(h.key, h.token) for h in holders] == [
            ("k", theirs.fencing_token),
            ("only-theirs", also_theirs.fencing_token),
        ]
        for lock in (mine, theirs, also_theirs):
            await lock.release()


async def test_holders_give_back_keys_exactly(apps: list[Application]) -> None:
    a, b, _ = apps
    keys = ["a:b", "a\\:b", "a\\", "\\", ":", "*", "%", "_", "x*y?[z]", "50%_off:\\*", "é:ü"]
    locks = {key: await a.lock_manager.try_acquire(key) for key in keys}
    holders = await b.lock_manager.holders()
    assert [h.key for h in holders] == sorted(keys)
    assert {h.key: h.token for h in holders} == {k: lock.fencing_token for k, lock in locks.items()}
    for lock in locks.values():
        await lock.release()
    assert await b.lock_manager.holders() == []


async def test_holders_after_stop_raise(apps: list[Application]) -> None:
    a, _, _ = apps
    await a.stop()
    with pytest.raises(StateError, match="closed"):
        await a.lock_manager.holders()


async def test_stopping_the_app_cancels_bodies_and_releases(apps: list[Application]) -> None:
    a, b, _ = apps
    started = asyncio.Event()

    async def body() -> None:
        started.set()
        await asyncio.sleep(60)

    task = asyncio.create_task(a.lock_manager.run_exclusive("k", body, ttl=30))
    await asyncio.wait_for(started.wait(), WAIT)
    await a.stop()
    with pytest.raises(LockLostError, match="closed"):
        await task
    lock = await b.lock_manager.try_acquire("k")
    await lock.release()
    with pytest.raises(StateError):
        await a.lock_manager.try_acquire("k")


async def test_a_crashed_holders_lease_frees_itself_after_ttl(apps: list[Application]) -> None:
    a, b, _ = apps
    await a.lock_manager.acquire("k", ttl=0.5)
    await stop_abruptly(a)
    with pytest.raises(LockAcquireError):
        await b.lock_manager.try_acquire("k")
    lock = await b.lock_manager.acquire("k", ttl=1, timeout=WAIT)
    await lock.release()


async def test_bad_arguments_are_rejected(apps: list[Application]) -> None:
    manager = apps[0].lock_manager
    with pytest.raises(ValueError, match="ttl"):
        await manager.acquire("k", ttl=0)
    with pytest.raises(ValueError, match="timeout"):
        await manager.acquire("k", ttl=1, timeout=-1)
    with pytest.raises(TypeError, match="str"):
        await manager.try_acquire(42)  # type: ignore[arg-type]
    assert not manager.held


# Behaviour of the manager itself, on the local adapter.


class CountingAdapter:
    """A lock adapter kept by a plugin: the extension point for third parties."""

    def __init__(self, url: str) -> None:
        from accord.adapters.memory.lock import LocalLockAdapter

        self.inner = LocalLockAdapter(f"memory://{unique('custom')}")
        self.url = url
        self.calls = 0
        self.connected = False

    async def connect(self) -> None:
        self.connected = True

    async def close(self) -> None:
        self.connected = False

    async def abort(self) -> None:
        self.connected = False

    async def acquire(
        self, key: str, owner: str, ttl: float, timeout: float | None = 0
    ) -> int | None:
        self.calls += 1
        return await self.inner.acquire(key, owner, ttl, timeout)

    async def release(self, key: str, owner: str) -> bool:
        return await self.inner.release(key, owner)

    async def extend(self, key: str, owner: str, ttl: float) -> bool:
        return await self.inner.extend(key, owner, ttl)

    async def holders(self, prefix: str) -> list[tuple[str, str, int, float]]:
        return await self.inner.holders(prefix)


async def test_a_registered_adapter_can_become_the_default(tmp_path: Path) -> None:
    app = Application(settings=make_settings("local", tmp_path))
    adapter = CountingAdapter("local")
    app.lock_manager.register_adapter("counting", adapter, default=True)
    with pytest.raises(ConfigError, match="already registered"):
        app.lock_manager.register_adapter("counting", CountingAdapter)
    with pytest.raises(ConfigError, match="already registered"):
        app.lock_manager.register_adapter("redis", CountingAdapter)
    async with app:
        async with app.lock_manager.lock("k", ttl=5):
            pass
        assert adapter.calls == 1 and adapter.connected
        assert await app.lock_manager.adapter() is adapter
        with pytest.raises(StateError, match="already uses an adapter"):
            app.lock_manager.register_adapter("late", CountingAdapter, default=True)
    assert not adapter.connected


async def test_an_instance_missing_a_method_is_named_in_the_error(tmp_path: Path) -> None:
    class NoHolders(CountingAdapter):
        holders = None  # type: ignore[assignment]

    app = Application(settings=make_settings("local", tmp_path))
    app.lock_manager.register_adapter("partial", NoHolders("local"), default=True)
    async with app:
        with pytest.raises(ConfigError, match="missing: holders"):
            await app.lock_manager.try_acquire("k")


async def test_locks_can_be_taken_from_load_before_connect(tmp_path: Path) -> None:
    from accord import Plugin

    class Early(Plugin):
        name = "early"

        async def load(self) -> None:
            self.token = await self.app.lock_manager.run_exclusive("boot", self._token, ttl=5)

        async def _token(self) -> int:
            return self.app.lock_manager.held[0].fencing_token

    async with cluster(1, plugins=[Early], settings=make_settings("local", tmp_path)) as (app,):
        plugin = app.plugins["early"]
        assert isinstance(plugin, Early) and plugin.token > 0


async def test_local_entries_are_removed_when_free(tmp_path: Path) -> None:
    from accord.adapters.memory.lock import _TABLES, table_name

    url = f"memory://{unique('locks')}"
    async with cluster(2, settings=make_settings(url, tmp_path)) as (a, b):
        async with a.lock_manager.lock("one"):
            table = _TABLES[table_name(url)]
            assert len(table.entries) == 1
        await b.lock_manager.acquire("two", ttl=0.1)  # never released
        assert len(table.entries) == 1
        await wait_until(lambda: not table.entries, WAIT, message="expired entry not removed")


async def test_local_waiters_are_served_first_come_first_served(tmp_path: Path) -> None:
    url = f"memory://{unique('locks')}"
    async with cluster(3, settings=make_settings(url, tmp_path)) as apps:
        order: list[int] = []
        held = await apps[0].lock_manager.acquire("k", ttl=5)

        async def wait(index: int) -> None:
            lock = await apps[index % 3].lock_manager.acquire("k", ttl=5)
            order.append(index)
            await lock.release()

        waiters = []
        for index in range(6):
            waiters.append(asyncio.create_task(wait(index)))
            await asyncio.sleep(0.01)  # arrival order, not synchronization
        await held.release()
        await asyncio.wait_for(asyncio.gather(*waiters), WAIT)
        assert order == list(range(6))


async def test_a_busy_instance_does_not_starve_another(apps: list[Application]) -> None:
    a, b, _ = apps
    done = asyncio.Event()

    async def busy() -> None:
        while not done.is_set():
            async with a.lock_manager.lock("k", ttl=5):
                await asyncio.sleep(0)

    workers = [asyncio.create_task(busy()) for _ in range(10)]
    try:
        await asyncio.sleep(0.1)
        lock = await b.lock_manager.acquire("k", ttl=5, timeout=WAIT)
        await lock.release()
    finally:
        done.set()
        await asyncio.wait_for(asyncio.gather(*workers), WAIT)


async def test_stopping_the_app_ends_waits_with_state_error(apps: list[Application]) -> None:
    a, b, _ = apps
    held = await a.lock_manager.acquire("k", ttl=30)
    waiter = asyncio.create_task(b.lock_manager.acquire("k", ttl=5))
    await asyncio.sleep(0.1)
    await b.stop()
    with pytest.raises(StateError, match="closed while waiting"):
        await asyncio.wait_for(waiter, WAIT)
    assert await held.release() is True
    lock = await apps[2].lock_manager.try_acquire("k")
    await lock.release()
