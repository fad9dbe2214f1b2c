"""SyncMessageManager contract: after-commit delivery in a cluster, on every pub/sub adapter."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from accord import Application, Plugin, SerializationError, Settings, StateError
from accord.testing import cluster, cut_off, reconnect, wait_until
from conftest import unique

WAIT = 15.0
PARAMS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    pytest.param("rabbitmq", id="rabbitmq", marks=pytest.mark.rabbitmq),
]


class Notes(Plugin):
    """Keeps the notes table in memory; reloads it when another instance says so."""

    name = "notes"

    async def load(self) -> None:
        self.received: list[Any] = []
        self.read: list[list[str]] = []
        self.resyncs = 0

    async def handle_sync_message(self, message: Any) -> None:
        async with self.db.transaction() as tx:
            rows = await tx.connection.execute(text("SELECT body FROM notes ORDER BY body"))
            self.read.append([row[0] for row in rows])
        self.received.append(message)

    async def on_resync(self) -> None:
        self.resyncs += 1


class Quiet(Plugin):
    """Does not override handle_sync_message, so it is never subscribed."""

    name = "quiet"


@pytest.fixture(params=PARAMS)
def sync_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """One isolated app: pub/sub on the adapter under test, one database for the cluster."""
    name = unique("sm")
    db_url = None
    if request.param == "memory":
        pubsub_url = f"memory://{name}"
    elif request.param == "redis":
        pubsub_url = request.getfixturevalue("redis_url")
    elif request.param == "rabbitmq":
        pubsub_url = request.getfixturevalue("amqp_url")
    else:
        pubsub_url = request.getfixturevalue("postgres_url")
        db_url = pubsub_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    return Settings(
        app_name=name,
        storage=str(tmp_path),
        db_url=db_url,
        pubsub_url=pubsub_url,
        queue_url=f"memory://{name}",
        lock_url=f"memory://{name}",
    )


@pytest.fixture
async def apps(sync_settings: Settings) -> AsyncIterator[list[Application]]:
    async with cluster(2, plugins=[Notes, Quiet], settings=sync_settings) as started:
        async with started[0].db.transaction() as tx:
            await tx.connection.execute(text("CREATE TABLE notes (body VARCHAR(100))"))
        yield started


def notes(app: Application) -> Notes:
    plugin = app.plugins["notes"]
    assert isinstance(plugin, Notes)
    return plugin


async def settle(sender: Application, receiver: Application) -> None:
    """Send a marker without a transaction and wait for it: anything sent before has arrived."""
    marker = {"marker": unique()}
    await notes(sender).send_sync_message(marker)
    await wait_until(lambda: marker in notes(receiver).received, WAIT)


async def barrier(sender: Application, receiver: Application) -> None:
    """A plain pub/sub round trip: what `sender` published before it has reached `receiver`."""
    channel, seen = unique("barrier"), []

    async def inbox(message: Any) -> None:
        seen.append(message)

    await receiver.pub_sub_manager.subscribe(channel, inbox)
    await sender.pub_sub_manager.publish(channel, "marker")
    await wait_until(lambda: seen, WAIT)
    await receiver.pub_sub_manager.unsubscribe(channel, inbox)


async def add_note(app: Application, body: str, message: Any, *, commit: bool = True) -> None:
    class Rollback(Exception):
        pass

    try:
        async with app.db.transaction() as tx:
            await tx.connection.execute(text("INSERT INTO notes VALUES (:b)"), {"b": body})
            await notes(app).send_sync_message(message, transaction=tx)
            if not commit:
                raise Rollback
    except Rollback:
        pass


async def test_committed_message_runs_once_on_the_other_instance_after_commit(
    apps: list[Application],
) -> None:
    a, b = apps
    async with a.db.transaction() as tx:
        await tx.connection.execute(text("INSERT INTO notes VALUES ('first')"))
        await notes(a).send_sync_message({"type": "reload"}, transaction=tx)
        # The relay has had every chance to run early, and did not. (A sync
        # message sent here would join this transaction, so the check uses pub/sub.)
        await barrier(a, b)
        assert {"type": "reload"} not in notes(b).received
    await wait_until(lambda: {"type": "reload"} in notes(b).received, WAIT)
    await settle(a, b)
    index = notes(b).received.index({"type": "reload"})
    assert notes(b).read[index] == ["first"]  # the handler saw the committed row
    assert notes(b).received.count({"type": "reload"}) == 1
    assert notes(a).received == []  # the sender's own handler does not run


async def test_rolled_back_message_is_never_handled_and_nothing_waits(
    apps: list[Application],
) -> None:
    a, b = apps
    started = time.monotonic()
    await add_note(a, "gone", {"type": "rolled back"}, commit=False)
    assert time.monotonic() - started < WAIT  # no timer held the rollback
    assert await a.sync_message_manager.outbox.pending() == 0
    await add_note(a, "kept", {"type": "committed"})
    await wait_until(lambda: {"type": "committed"} in notes(b).received, WAIT)
    await settle(a, b)
    assert {"type": "rolled back"} not in notes(b).received
    assert notes(b).read[notes(b).received.index({"type": "committed"})] == ["kept"]


async def test_without_a_transaction_the_message_is_published_at_once(
    apps: list[Application],
) -> None:
    a, b = apps
    await notes(a).send_sync_message({"n": 1})
    await wait_until(lambda: notes(b).received == [{"n": 1}], WAIT)
    assert await a.sync_message_manager.outbox.pending() <= 1  # marked sent in the background


async def test_messages_from_one_instance_arrive_in_order(apps: list[Application]) -> None:
    a, b = apps
    for n in range(30):
        await add_note(a, f"n{n}", n)
    await wait_until(lambda: len(notes(b).received) == 30, WAIT)
    assert notes(b).received == list(range(30))


async def test_skip_self_false_reaches_the_sender_too(apps: list[Application]) -> None:
    a, b = apps
    await a.sync_message_manager.publish("notes", "everyone", skip_self=False)
    await wait_until(lambda: "everyone" in notes(a).received, WAIT)
    await wait_until(lambda: "everyone" in notes(b).received, WAIT)
    await settle(a, b)
    assert notes(a).received.count("everyone") == notes(b).received.count("everyone") == 1


async def test_only_self_stays_on_the_sender_and_waits_for_commit(apps: list[Application]) -> None:
    a, b = apps
    async with a.db.transaction() as tx:
        await tx.connection.execute(text("INSERT INTO notes VALUES ('mine')"))
        await a.sync_message_manager.publish("notes", "me", transaction=tx, only_self=True)
        assert notes(a).received == []
    assert notes(a).received == ["me"]
    assert notes(a).read == [["mine"]]
    await settle(a, b)
    assert "me" not in notes(b).received


async def test_a_non_json_message_fails_at_publish_and_writes_nothing(
    apps: list[Application],
) -> None:
    a, _ = apps
    with pytest.raises(SerializationError, match="'notes'"):
        async with a.db.transaction() as tx:
            await notes(a).send_sync_message({"when": object()}, transaction=tx)
    with pytest.raises(SerializationError):
        await notes(a).send_sync_message({1, 2})
    assert await a.sync_message_manager.outbox.pending() == 0


async def test_only_overriding_plugins_are_subscribed(apps: list[Application]) -> None:
    for app in apps:
        assert app.sync_message_manager.channels == frozenset({"notes"})


async def test_duplicate_deliveries_are_handled_once(apps: list[Application]) -> None:
    a, b = apps
    payload = {"id": unique("dup"), "origin": a.instance_id, "skip_self": True, "message": "dup"}
    for _ in range(3):
        await a.pub_sub_manager.publish("sync.notes", payload)
    await settle(a, b)
    assert notes(b).received.count("dup") == 1
    assert b.sync_message_manager.duplicates_dropped >= 2


async def test_a_failing_handler_does_not_stop_the_others(apps: list[Application]) -> None:
    a, b = apps
    calls: list[Any] = []

    async def broken(message: Any) -> None:
        raise RuntimeError("handler broke")

    async def extra(message: Any) -> None:
        calls.append(message)

    await b.sync_message_manager.subscribe("notes", broken)
    await b.sync_message_manager.subscribe("notes", extra)
    await b.sync_message_manager.subscribe("notes", extra)  # a second time is a no-op
    await notes(a).send_sync_message("x")
    await wait_until(lambda: calls == ["x"] and notes(b).received == ["x"], WAIT)
    await b.sync_message_manager.unsubscribe("notes", extra)
    await b.sync_message_manager.unsubscribe("notes", broken)
    await notes(a).send_sync_message("y")
    await wait_until(lambda: notes(b).received == ["x", "y"], WAIT)
    assert calls == ["x"]


class EarlySender(Plugin):
    """Sends a sync message from `load`, before any adapter is connected."""

    name = "early"

    async def load(self) -> None:
        self.received: list[Any] = []
        await self.send_sync_message({"from": "load"})

    async def handle_sync_message(self, message: Any) -> None:
        self.received.append(message)


async def test_a_message_sent_during_load_is_delivered_after_start(
    sync_settings: Settings,
) -> None:
    async with cluster(2, plugins=[EarlySender], settings=sync_settings) as apps:
        # The second instance loads while the first runs, so the first receives
        # the second's message once the second has connected.
        first = apps[0].plugins["early"]
        await wait_until(lambda: first.received == [{"from": "load"}], WAIT)  # type: ignore[attr-defined]


async def test_a_message_sent_while_an_instance_starts_reaches_it(
    sync_settings: Settings,
) -> None:
    async with cluster(1, plugins=[Notes], settings=sync_settings) as (a,):
        async with a.db.transaction() as tx:
            await tx.connection.execute(text("CREATE TABLE notes (body VARCHAR(100))"))
        late = Application(plugins=[Notes], settings=sync_settings)
        # `late` exists (and will read the database in `load`) but is not
        # subscribed yet when this is sent; it catches up from the outbox.
        await notes(a).send_sync_message("while starting")
        async with late:
            await wait_until(lambda: notes(late).received == ["while starting"], WAIT)
            await settle(a, late)
            assert notes(late).received.count("while starting") == 1


async def test_a_severed_instance_replays_what_it_missed(apps: list[Application]) -> None:
    a, b = apps
    await cut_off(b)
    for n in range(20):
        await add_note(a, f"n{n}", {"n": n})
    await notes(a).send_sync_message({"n": "no transaction"})
    await reconnect(b)
    expected = [{"n": n} for n in range(20)] + [{"n": "no transaction"}]
    await wait_until(lambda: len(notes(b).received) >= len(expected), WAIT)
    await settle(a, b)
    received = [m for m in notes(b).received if "marker" not in m]
    assert sorted(map(str, received)) == sorted(map(str, expected))
    assert notes(b).resyncs == 0


async def test_an_outage_longer_than_the_retention_calls_on_resync(
    apps: list[Application],
) -> None:
    a, b = apps
    events: list[Any] = []
    b.on("sync:resync", events.append)
    b.sync_message_manager.outbox.retention = 0.0  # every outage is longer
    await cut_off(b)
    await notes(a).send_sync_message("missed")
    await reconnect(b)
    await wait_until(lambda: notes(b).resyncs == 1, WAIT)
    assert events == [["notes"]]


async def test_publish_after_stop_raises(sync_settings: Settings) -> None:
    async with cluster(1, plugins=[Notes], settings=sync_settings) as apps:
        app = apps[0]
    with pytest.raises(StateError):
        await notes(app).send_sync_message("late")
