"""Cluster membership: claimed instance ids, heartbeats, the live-instance list, on every backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from accord import Application, Settings
from accord.cluster import InstanceInfo, MembershipAdapter
from accord.testing import cluster, stop_abruptly, wait_until
from conftest import unique


def info(instance_id: str, started_at: float = 0.0) -> InstanceInfo:
    return InstanceInfo(
        id=instance_id, host="h", pid=1, started_at=started_at or time.time(), last_beat=time.time()
    )


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
async def adapter(request: pytest.FixtureRequest) -> AsyncIterator[MembershipAdapter]:
    if request.param == "memory":
        from accord.adapters.memory.cluster import MemoryMembershipAdapter

        made: MembershipAdapter = MemoryMembershipAdapter(f"memory://{unique()}")
    elif request.param == "redis":
        from accord.adapters.redis.cluster import RedisMembershipAdapter

        made = RedisMembershipAdapter(request.getfixturevalue("redis_url"))
    else:
        from accord.adapters.postgres.cluster import PostgresMembershipAdapter

        made = PostgresMembershipAdapter(request.getfixturevalue("postgres_url"))
    await made.connect()
    yield made
    await made.close()


async def test_a_live_id_cannot_be_claimed_twice(adapter: MembershipAdapter) -> None:
    app = unique("app")
    assert await adapter.claim(app, info("a", 1.0), ttl=5)
    assert not await adapter.claim(app, info("a", 2.0), ttl=5)
    assert await adapter.claim(unique("other"), info("a"), ttl=5)  # other apps are separate
    assert [i.id for i in await adapter.instances(app, ttl=5)] == ["a"]


async def test_instances_lists_live_ones_oldest_first(adapter: MembershipAdapter) -> None:
    app = unique("app")
    await adapter.claim(app, info("late", 20.0), ttl=5)
    await adapter.claim(app, info("early", 10.0), ttl=5)
    listed = await adapter.instances(app, ttl=5)
    assert [i.id for i in listed] == ["early", "late"]
    assert all(abs(i.last_beat - time.time()) < 5 for i in listed)
    await adapter.leave(app, "early")
    assert [i.id for i in await adapter.instances(app, ttl=5)] == ["late"]


async def test_an_instance_that_stops_beating_expires(adapter: MembershipAdapter) -> None:
    app = unique("app")
    await adapter.claim(app, info("quiet"), ttl=0.3)
    await adapter.claim(app, info("alive"), ttl=0.3)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert await adapter.beat(app, info("alive"), ttl=0.3)
        if [i.id for i in await adapter.instances(app, ttl=0.3)] == ["alive"]:
            break
        await asyncio.sleep(0.05)
    assert [i.id for i in await adapter.instances(app, ttl=0.3)] == ["alive"]
    assert not await adapter.beat(app, info("quiet"), ttl=0.3)
    assert await adapter.claim(app, info("quiet"), ttl=0.3)  # an expired id is free again


async def test_apps_in_a_cluster_see_each_other_and_a_crashed_one_disappears(
    settings: Settings,
) -> None:
    async with cluster(3, settings=settings.replace(heartbeat_interval=0.1)) as apps:
        listed = await apps[0].cluster.instances()
        assert sorted(i.id for i in listed) == sorted(app.instance_id for app in apps)
        crashed = apps[2]
        await stop_abruptly(crashed)

        async def gone() -> bool:
            return crashed.instance_id not in {i.id for i in await apps[0].cluster.instances()}

        await wait_until(gone, timeout=10, interval=0.05)
        assert len(await apps[0].cluster.instances()) == 2
        await apps[1].stop()  # a graceful stop leaves at once
        assert [i.id for i in await apps[0].cluster.instances()] == [apps[0].instance_id]


async def test_a_clashing_instance_id_is_replaced(settings: Settings) -> None:
    first = Application(settings=settings)
    second = Application(settings=settings)
    second.instance_id = first.instance_id
    async with first, second:
        assert second.instance_id != first.instance_id
        listed = {i.id for i in await first.cluster.instances()}
        assert listed == {first.instance_id, second.instance_id}
