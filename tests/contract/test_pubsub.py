"""PubSubManager contract, run inside a 3-instance cluster on every adapter."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from accord import Application, Plugin, SerializationError, Settings, StateError
from accord.testing import cluster, cut_off, reconnect, wait_until
from conftest import Inbox, unique

WAIT = 15.0
ADAPTER_PARAMS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    pytest.param("rabbitmq", id="rabbitmq", marks=pytest.mark.rabbitmq),
]


def bus_url(kind: str, request: pytest.FixtureRequest, name: str) -> str:
    if kind == "memory":
        return f"memory://{name}"
    fixture = {"redis": "redis_url", "postgres": "postgres_url", "rabbitmq": "amqp_url"}[kind]
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture(params=ADAPTER_PARAMS)
def bus_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings for one isolated app whose pub/sub runs on the adapter under test."""
    name = unique("ps")
    return Settings(
        app_name=name,
        storage=str(tmp_path),
        pubsub_url=bus_url(request.param, request, name),
        queue_url=f"memory://{name}",
        lock_url=f"memory://{name}",
    )


@pytest.fixture
async def apps(bus_settings: Settings) -> AsyncIterator[list[Application]]:
    async with cluster(3, settings=bus_settings) as started:
        yield started


async def settle(apps: list[Application]) -> None:
    """Wait until a marker sent after everything else has reached every instance.

    Each adapter delivers one instance's messages in order, so once the
    marker is in, anything published before it has been handled too.
    """
    channel = unique("barrier")
    inboxes = [Inbox() for _ in apps]
    for app, inbox in zip(apps, inboxes, strict=True):
        await app.pub_sub_manager.subscribe(channel, inbox)
    await apps[1].pub_sub_manager.publish(channel, "marker", skip_self=False)
    await wait_until(lambda: all(inbox.messages for inbox in inboxes), WAIT)
    for app, inbox in zip(apps, inboxes, strict=True):
        await app.pub_sub_manager.unsubscribe(channel, inbox)


async def subscribe_all(apps: list[Application], channel: str, **options: Any) -> list[Inbox]:
    inboxes = [Inbox() for _ in apps]
    for app, inbox in zip(apps, inboxes, strict=True):
        await app.pub_sub_manager.subscribe(channel, inbox, **options)
    return inboxes


async def test_publisher_does_not_receive_its_own_message_by_default(
    apps: list[Application],
) -> None:
    a, b, c = await subscribe_all(apps, "news")
    await apps[0].pub_sub_manager.publish("news", {"n": 1})
    await wait_until(lambda: b.messages and c.messages, WAIT)
    await settle(apps)
    assert a.messages == []
    assert b.messages == c.messages == [{"n": 1}]


async def test_skip_self_false_delivers_to_every_instance(apps: list[Application]) -> None:
    inboxes = await subscribe_all(apps, "news")
    await apps[0].pub_sub_manager.publish("news", "hello", skip_self=False)
    await wait_until(lambda: all(inbox.messages for inbox in inboxes), WAIT)
    await settle(apps)
    assert [inbox.messages for inbox in inboxes] == [["hello"]] * 3


async def test_only_self_delivers_to_the_publisher_alone(apps: list[Application]) -> None:
    a, b, c = await subscribe_all(apps, "news")
    await apps[2].pub_sub_manager.publish("news", "me", only_self=True)
    await wait_until(lambda: c.messages, WAIT)
    await settle(apps)
    assert (a.messages, b.messages, c.messages) == ([], [], ["me"])


async def test_debounce_makes_one_trailing_call_per_distinct_message(
    apps: list[Application],
) -> None:
    inboxes = await subscribe_all(apps[1:], "debounced", debounce=1.0)
    for _ in range(6):
        await apps[0].pub_sub_manager.publish("debounced", {"msg": 1})
        await apps[0].pub_sub_manager.publish("debounced", {"msg": 2})
    await wait_until(lambda: all(len(inbox.messages) >= 2 for inbox in inboxes), WAIT)
    # A later, distinct message is handled only after any stray call would have been.
    await apps[0].pub_sub_manager.publish("debounced", {"msg": 3})
    await wait_until(lambda: all(len(inbox.messages) >= 3 for inbox in inboxes), WAIT)
    for inbox in inboxes:
        assert sorted(m["msg"] for m in inbox.messages) == [1, 2, 3]


async def test_debounce_is_kept_per_handler(apps: list[Application]) -> None:
    first, second, plain = Inbox(), Inbox(), Inbox()
    manager = apps[1].pub_sub_manager
    await manager.subscribe("shared", first, debounce=1.0)
    await manager.subscribe("shared", second, debounce=1.0)
    await manager.subscribe("shared", plain)
    for _ in range(6):
        await apps[0].pub_sub_manager.publish("shared", "msg1")
        await apps[0].pub_sub_manager.publish("shared", "msg2")
    await wait_until(lambda: len(first.messages) >= 2 and len(second.messages) >= 2, WAIT)
    await apps[0].pub_sub_manager.publish("shared", "msg3")
    await wait_until(lambda: len(first.messages) >= 3 and len(second.messages) >= 3, WAIT)
    assert sorted(first.messages) == sorted(second.messages) == ["msg1", "msg2", "msg3"]
    assert plain.messages == ["msg1", "msg2"] * 6 + ["msg3"]


async def test_unsubscribe_stops_delivery(apps: list[Application]) -> None:
    _, b, c = await subscribe_all(apps, "news")
    await apps[0].pub_sub_manager.publish("news", 1)
    await wait_until(lambda: b.messages and c.messages, WAIT)
    await apps[1].pub_sub_manager.unsubscribe("news", b)
    await apps[1].pub_sub_manager.unsubscribe("news", b)  # a second time is a no-op
    await apps[0].pub_sub_manager.publish("news", 2)
    await wait_until(lambda: len(c.messages) == 2, WAIT)
    await settle(apps)
    assert b.messages == [1]
    assert c.messages == [1, 2]


class EarlySubscriber(Plugin):
    name = "early"

    async def load(self) -> None:
        self.inbox = Inbox()
        # `load` runs before the pub/sub adapter connects.
        self.connected_at_load = self.app.pub_sub_manager.is_connected()
        await self.app.pub_sub_manager.subscribe("early", self.inbox)


async def test_subscriptions_made_before_connect_apply_on_connect(
    bus_settings: Settings,
) -> None:
    async with cluster(3, plugins=[EarlySubscriber], settings=bus_settings) as apps:
        plugins = [app.plugins["early"] for app in apps]
        assert not any(plugin.connected_at_load for plugin in plugins)  # type: ignore[attr-defined]
        assert all(app.pub_sub_manager.is_connected() for app in apps)
        await apps[0].pub_sub_manager.publish("early", "hi")
        await wait_until(lambda: all(p.inbox.messages for p in plugins[1:]), WAIT)  # type: ignore[attr-defined]
        await settle(apps)
        assert [p.inbox.messages for p in plugins] == [[], ["hi"], ["hi"]]  # type: ignore[attr-defined]


async def test_a_handler_subscribed_twice_is_called_once(apps: list[Application]) -> None:
    inbox = Inbox()
    await apps[1].pub_sub_manager.subscribe("news", inbox)
    await apps[1].pub_sub_manager.subscribe("news", inbox)
    await apps[0].pub_sub_manager.publish("news", "once")
    await wait_until(lambda: inbox.messages, WAIT)
    await settle(apps)
    assert inbox.messages == ["once"]


MESSAGES = [
    0,
    -(2**53),
    3.5,
    "text",
    "unicode: héllo ✓ 日本語 🎉",
    "",
    True,
    False,
    None,
    [],
    [1, "two", None, [3.0]],
    {},
    {"a": 1, "b": [True, {"c": None}], "ü": "ß"},
    {"deep": {"er": {"and": [{"deeper": [1, 2, {"x": "y"}]}]}}},
]


async def test_messages_round_trip_as_json_data(apps: list[Application]) -> None:
    inbox = Inbox()
    await apps[1].pub_sub_manager.subscribe("types", inbox)
    for message in MESSAGES:
        await apps[0].pub_sub_manager.publish("types", message)
    await apps[0].pub_sub_manager.publish("types", (1, 2))  # a tuple arrives as a list
    await wait_until(lambda: len(inbox.messages) == len(MESSAGES) + 1, WAIT)
    assert inbox.messages == [*MESSAGES, [1, 2]]
    for sent, received in zip(MESSAGES, inbox.messages, strict=False):
        assert type(sent) is type(received)


@pytest.mark.parametrize("message", [object(), {1, 2}, b"bytes", {"when": asyncio}])
async def test_a_non_json_message_fails_at_publish(apps: list[Application], message: Any) -> None:
    with pytest.raises(SerializationError, match="'news'"):
        await apps[0].pub_sub_manager.publish("news", message)


async def test_a_failing_handler_is_logged_and_the_bus_carries_on(
    apps: list[Application], caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(message: Any) -> None:
        raise RuntimeError("handler broke")

    inbox = Inbox()
    await apps[1].pub_sub_manager.subscribe("news", broken)
    await apps[1].pub_sub_manager.subscribe("news", inbox)
    with caplog.at_level(logging.ERROR, logger="accord.pubsub"):
        await apps[0].pub_sub_manager.publish("news", "first")
        await apps[0].pub_sub_manager.publish("news", "second")
        await wait_until(lambda: len(inbox.messages) == 2, WAIT)
        await wait_until(lambda: len(caplog.records) >= 2, WAIT)
    assert inbox.messages == ["first", "second"]
    record = caplog.records[0]
    assert "'news'" in record.getMessage() and "broken" in record.getMessage()
    assert record.exc_info is not None and "handler broke" in str(record.exc_info[1])


async def test_each_handler_sees_messages_in_publish_order(apps: list[Application]) -> None:
    inbox = Inbox()
    await apps[1].pub_sub_manager.subscribe("ordered", inbox)
    for n in range(200):
        await apps[0].pub_sub_manager.publish("ordered", n)
    await wait_until(lambda: len(inbox.messages) == 200, WAIT)
    assert inbox.messages == list(range(200))


async def test_concurrent_publishes_all_arrive(apps: list[Application]) -> None:
    inbox = Inbox()
    await apps[1].pub_sub_manager.subscribe("burst", inbox)
    await asyncio.gather(*(apps[0].pub_sub_manager.publish("burst", n) for n in range(300)))
    await wait_until(lambda: len(inbox.messages) == 300, WAIT)
    assert sorted(inbox.messages) == list(range(300))


async def test_channels_are_separate_and_names_escape(apps: list[Application]) -> None:
    plain, colon, other = Inbox(), Inbox(), Inbox()
    await apps[1].pub_sub_manager.subscribe("a:b", colon)
    await apps[1].pub_sub_manager.subscribe("a", plain)
    await apps[1].pub_sub_manager.subscribe("b", other)
    await apps[0].pub_sub_manager.publish("a:b", "colon")
    await apps[0].pub_sub_manager.publish("a", "plain")
    await wait_until(lambda: colon.messages and plain.messages, WAIT)
    await settle(apps)
    assert (colon.messages, plain.messages, other.messages) == (["colon"], ["plain"], [])


async def test_two_apps_on_one_server_never_see_each_other(
    bus_settings: Settings, tmp_path: Path
) -> None:
    other_settings = bus_settings.replace(app_name=unique("other"), storage=str(tmp_path / "o"))
    async with (
        cluster(2, settings=bus_settings) as ours,
        cluster(2, settings=other_settings) as theirs,
    ):
        mine, foreign = Inbox(), Inbox()
        await ours[1].pub_sub_manager.subscribe("news", mine)
        await theirs[1].pub_sub_manager.subscribe("news", foreign)
        await ours[0].pub_sub_manager.publish("news", "ours")
        await theirs[0].pub_sub_manager.publish("news", "theirs")
        await wait_until(lambda: mine.messages and foreign.messages, WAIT)
        await settle(ours)
        await settle(theirs)
        assert (mine.messages, foreign.messages) == (["ours"], ["theirs"])


async def test_close_cancels_pending_debounced_calls(bus_settings: Settings) -> None:
    async with cluster(2, settings=bus_settings) as apps:
        fired, marker = Inbox(), Inbox()
        await apps[1].pub_sub_manager.subscribe("slow", fired, debounce=30.0)
        await apps[1].pub_sub_manager.subscribe("slow", marker)
        await apps[0].pub_sub_manager.publish("slow", "pending")
        await wait_until(lambda: marker.messages, WAIT)
        await apps[1].stop()
        assert fired.messages == []
        with pytest.raises(StateError):
            await apps[1].pub_sub_manager.publish("slow", "after close")


async def test_losing_and_restoring_the_connection_emits_app_events(
    apps: list[Application],
) -> None:
    events: list[str] = []
    target = apps[1]
    target.on("pubsub:lost", lambda: events.append("lost"))
    target.on("pubsub:restored", lambda: events.append("restored"))
    inbox = Inbox()
    await target.pub_sub_manager.subscribe("news", inbox)

    await cut_off(target)
    assert events == ["lost"]
    assert not target.pub_sub_manager.is_connected()
    await reconnect(target)
    assert events == ["lost", "restored"]
    assert target.pub_sub_manager.is_connected()
    # Subscriptions survive the reconnect.
    await apps[0].pub_sub_manager.publish("news", "back")
    await wait_until(lambda: inbox.messages == ["back"], WAIT)
