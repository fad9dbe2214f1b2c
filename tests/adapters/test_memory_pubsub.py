"""Memory pub/sub adapter and manager details: named buses, a lone instance, early publishes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from accord import Application, Plugin, StateError
from accord.adapters.memory import pubsub as memory_pubsub
from accord.testing import cluster, stop_abruptly, wait_until
from conftest import Inbox, pubsub_settings, unique

WAIT = 5.0


async def test_a_single_instance_delivers_to_itself_with_skip_self_false(tmp_path: Path) -> None:
    async with Application(settings=pubsub_settings(None, tmp_path)) as app:
        assert app.pub_sub_manager.url == "memory://"
        inbox = Inbox()
        await app.pub_sub_manager.subscribe("self", inbox)
        await app.pub_sub_manager.publish("self", "skipped")
        await app.pub_sub_manager.publish("self", "delivered", skip_self=False)
        await wait_until(lambda: inbox.messages, WAIT)
        assert inbox.messages == ["delivered"]


async def test_the_default_bus_is_shared_and_named_buses_are_private(tmp_path: Path) -> None:
    shared = pubsub_settings(None, tmp_path)
    private = shared.replace(pubsub_url=f"memory://{unique('bus')}", storage=str(tmp_path / "p"))
    async with (
        Application(settings=shared) as first,
        Application(settings=shared) as second,
        Application(settings=private) as apart,
    ):
        on_second, on_apart = Inbox(), Inbox()
        await second.pub_sub_manager.subscribe("news", on_second)
        await apart.pub_sub_manager.subscribe("news", on_apart)
        await first.pub_sub_manager.publish("news", "hello")
        # The memory bus hands a message to every subscriber inside `publish`,
        # so a wrong delivery would already be queued next to the right one.
        await wait_until(lambda: on_second.messages, WAIT)
        assert (on_second.messages, on_apart.messages) == (["hello"], [])


async def test_a_bus_is_dropped_when_its_last_instance_leaves(tmp_path: Path) -> None:
    url = f"memory://{unique('bus')}"
    name = memory_pubsub.bus_name(url)
    async with cluster(2, settings=pubsub_settings(url, tmp_path)) as apps:
        await apps[0].pub_sub_manager.subscribe("news", Inbox())
        assert name in memory_pubsub._buses
    assert name not in memory_pubsub._buses


class EarlyPublisher(Plugin):
    name = "early_publisher"

    async def load(self) -> None:
        await self.app.pub_sub_manager.publish("boot", {"from": self.app.instance_id})


async def test_publishing_from_load_connects_early(tmp_path: Path) -> None:
    settings = pubsub_settings(f"memory://{unique('bus')}", tmp_path)
    async with Application(settings=settings) as listener:
        inbox = Inbox()
        await listener.pub_sub_manager.subscribe("boot", inbox)
        async with Application(plugins=[EarlyPublisher], settings=settings) as publisher:
            await wait_until(lambda: inbox.messages, WAIT)
            assert inbox.messages == [{"from": publisher.instance_id}]


async def test_plain_functions_work_as_handlers(tmp_path: Path) -> None:
    seen: list[Any] = []
    async with cluster(2, settings=pubsub_settings(f"memory://{unique()}", tmp_path)) as apps:
        await apps[1].pub_sub_manager.subscribe("plain", seen.append)  # type: ignore[arg-type]
        await apps[0].pub_sub_manager.publish("plain", 1)
        await wait_until(lambda: seen == [1], WAIT)


async def test_bad_arguments_and_closed_managers_fail_clearly(tmp_path: Path) -> None:
    async with cluster(1, settings=pubsub_settings(f"memory://{unique()}", tmp_path)) as apps:
        manager = apps[0].pub_sub_manager
        with pytest.raises(ValueError, match="debounce"):
            await manager.subscribe("x", Inbox(), debounce=-1)
        await manager.unsubscribe("never", Inbox())  # unknown: ignored
    with pytest.raises(StateError):
        await manager.subscribe("x", Inbox())
    with pytest.raises(StateError):
        await manager.publish("x", 1)


async def test_abort_cancels_running_handlers(tmp_path: Path) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def stuck(message: Any) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with cluster(2, settings=pubsub_settings(f"memory://{unique()}", tmp_path)) as apps:
        await apps[1].pub_sub_manager.subscribe("work", stuck)
        await apps[0].pub_sub_manager.publish("work", 1)
        await asyncio.wait_for(started.wait(), WAIT)
        await stop_abruptly(apps[1])
        await asyncio.wait_for(cancelled.wait(), WAIT)
        assert not apps[1].pub_sub_manager.is_connected()
