"""Demo step for pub/sub: broadcast, skip_self, only_self, per-handler debounce, a lost link."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..testing import cluster, cut_off, reconnect, wait_until


class Inbox:
    """A handler that keeps what it receives."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def __call__(self, message: Any) -> None:
        self.messages.append(message)


async def run(say: Callable[[str], None]) -> None:
    async with cluster(3, name="demo") as apps:
        inboxes = [Inbox() for _ in apps]
        for app, inbox in zip(apps, inboxes, strict=True):
            await app.pub_sub_manager.subscribe("greetings", inbox)
        say("each instance subscribed to 'greetings'")

        await apps[0].pub_sub_manager.publish("greetings", {"hello": "from 1"})
        await wait_until(lambda: bool(inboxes[1].messages and inboxes[2].messages))
        say(
            f"instance 1 published; 2 got {inboxes[1].messages[0]}, 3 got "
            f"{inboxes[2].messages[0]}, 1 got {len(inboxes[0].messages)} "
            "(skip_self is the default)"
        )

        await apps[1].pub_sub_manager.publish("greetings", "to everyone", skip_self=False)
        await wait_until(lambda: all("to everyone" in inbox.messages for inbox in inboxes))
        say("with skip_self=False the publisher receives its own message too")

        await apps[2].pub_sub_manager.publish("greetings", "note to self", only_self=True)
        await wait_until(lambda: "note to self" in inboxes[2].messages)
        others = sum("note to self" in inbox.messages for inbox in inboxes[:2])
        say(f"only_self=True stays on instance 3 (the others got it {others} times)")

        quick, slow = Inbox(), Inbox()
        await apps[1].pub_sub_manager.subscribe("reload", quick, debounce=0.2)
        await apps[1].pub_sub_manager.subscribe("reload", slow, debounce=0.4)
        for _ in range(6):
            await apps[0].pub_sub_manager.publish("reload", {"table": "posts"})
            await apps[0].pub_sub_manager.publish("reload", {"table": "users"})
        await wait_until(lambda: len(quick.messages) == 2 and len(slow.messages) == 2)
        say(
            "12 'reload' messages (6 per table) within the debounce window became "
            f"{len(quick.messages)} calls for one handler and {len(slow.messages)} for "
            "the other: debounce is kept per handler and per distinct message"
        )

        events: list[str] = []
        apps[2].on("pubsub:lost", lambda: events.append("pubsub:lost"))
        apps[2].on("pubsub:restored", lambda: events.append("pubsub:restored"))
        await cut_off(apps[2])
        await apps[0].pub_sub_manager.publish("greetings", "while 3 was away")
        await reconnect(apps[2])
        await apps[0].pub_sub_manager.publish("greetings", "welcome back")
        await wait_until(lambda: "welcome back" in inboxes[2].messages)
        missed = "while 3 was away" not in inboxes[2].messages
        say(
            f"instance 3 was cut off the bus and came back: app events {', '.join(events)}; "
            f"it {'missed' if missed else 'still got'} the message sent meanwhile "
            "(plain pub/sub is at-most-once; sync messages replay what was missed)"
        )
