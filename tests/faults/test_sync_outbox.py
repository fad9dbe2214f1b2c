"""The outbox under faults: crashed writers, concurrent sweeps, failing senders, pruning."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import exc as sa_errors
from sqlalchemy import insert, select, text

from accord import AdapterError, AdapterUnavailable, Application, Plugin, Settings
from accord._outbox import Outbox, map_db_errors, outbox_table
from accord.testing import cluster, stop_abruptly, wait_until
from conftest import unique

WAIT = 15.0


class Recorder:
    """An outbox sender that records what it was given, and can fail on demand."""

    def __init__(self, name: str, calls: Counter[str], *, fail: int = 0) -> None:
        self.name = name
        self.calls = calls
        self.records: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail

    async def __call__(self, row_id: str, record: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        if self.fail > 0:
            self.fail -= 1
            raise ConnectionError("sender is down")
        self.calls[row_id] += 1
        self.records.append((row_id, record))


class Memo(Plugin):
    name = "memo"

    async def load(self) -> None:
        self.received: list[Any] = []

    async def handle_sync_message(self, message: Any) -> None:
        self.received.append(message)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def outbox_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    name = unique("ob")
    db_url = None
    if request.param == "postgres":
        base = request.getfixturevalue("postgres_url")
        db_url = base.replace("postgresql://", "postgresql+asyncpg://", 1)
    bus = f"memory://{name}"
    return Settings(
        app_name=name,
        storage=str(tmp_path),
        db_url=db_url,
        pubsub_url=bus,
        queue_url=bus,
        lock_url=bus,
    )


@pytest.fixture
async def apps(outbox_settings: Settings) -> AsyncIterator[list[Application]]:
    async with cluster(3, plugins=[Memo], settings=outbox_settings) as started:
        for app in started:
            app.sync_message_manager.outbox.sweep_interval = 0.2
        yield started


def outbox(app: Application) -> Outbox:
    return app.sync_message_manager.outbox


async def drained(app: Application) -> bool:
    return await outbox(app).pending() == 0


async def insert_orphans(app: Application, kind: str, count: int) -> list[str]:
    """Rows as a crashed instance leaves them: committed, unsent, claim expired."""
    ids = [unique("row") for _ in range(count)]
    now = time.time()
    async with app.db.transaction() as tx:
        await tx.connection.execute(
            insert(outbox_table),
            [
                {
                    "id": row_id,
                    "app": app.name,
                    "kind": kind,
                    "record": f'{{"n": {n}}}',
                    "created_at": now + n * 1e-6,
                    "claimed_by": "crashed-instance",
                    "claimed_until": 0.0,
                    "sent_at": None,
                }
                for n, row_id in enumerate(ids)
            ],
        )
    return ids


async def test_a_record_is_sent_after_commit_by_the_committing_instance(
    apps: list[Application],
) -> None:
    calls: Counter[str] = Counter()
    senders = [Recorder(app.instance_id, calls) for app in apps]
    for app, sender in zip(apps, senders, strict=True):
        outbox(app).register("probe", sender)
    async with apps[0].db.transaction() as tx:
        row_id = await outbox(apps[0]).add(tx, "probe", {"job": 1, "tags": ("a", "b")})
        await asyncio.sleep(0.05)
        assert calls == Counter()
    assert senders[0].records == [(row_id, {"job": 1, "tags": ["a", "b"]})]
    await wait_until(lambda: drained(apps[0]), WAIT)


async def test_a_rolled_back_record_is_never_sent(apps: list[Application]) -> None:
    calls: Counter[str] = Counter()
    for app in apps:
        outbox(app).register("probe", Recorder(app.instance_id, calls))
    with pytest.raises(RuntimeError):
        async with apps[0].db.transaction() as tx:
            await outbox(apps[0]).add(tx, "probe", {"job": 1})
            raise RuntimeError("roll back")
    async with apps[0].db.transaction() as tx:
        rows = (await tx.connection.execute(select(outbox_table.c.id))).all()
    assert rows == []
    for app in apps:
        assert await outbox(app).sweep() == 0
    assert calls == Counter()


async def test_register_and_add_refuse_mistakes(apps: list[Application]) -> None:
    box = outbox(apps[0])
    first = Recorder("a", Counter())
    box.register("probe", first)
    box.register("probe", first)  # the same sender again is fine
    with pytest.raises(ValueError, match="already has a sender"):
        box.register("probe", Recorder("b", Counter()))
    with pytest.raises(ValueError, match="no sender"):
        async with apps[0].db.transaction() as tx:
            await box.add(tx, "unknown", {})


async def test_a_crash_between_commit_and_relay_is_recovered_by_a_survivor(
    apps: list[Application],
) -> None:
    a, b, c = apps
    outbox(a).claim_lease = 0.5
    async with a.db.transaction() as tx:
        await tx.connection.execute(text("SELECT 1"))
        # Runs before the relay's own after-commit callback, like a crash would.
        tx.after_commit(lambda: stop_abruptly(a))
        await a.plugins["memo"].send_sync_message({"type": "reload"}, transaction=tx)
    memos = [b.plugins["memo"], c.plugins["memo"]]
    await wait_until(lambda: all(m.received for m in memos), WAIT)  # type: ignore[attr-defined]
    await wait_until(lambda: drained(b), WAIT)
    for memo in memos:
        assert memo.received == [{"type": "reload"}]  # type: ignore[attr-defined]


async def test_concurrent_sweeps_send_each_orphan_once(apps: list[Application]) -> None:
    calls: Counter[str] = Counter()
    for app in apps:
        outbox(app).register("probe", Recorder(app.instance_id, calls))
    ids = await insert_orphans(apps[0], "probe", 700)
    for _ in range(3):
        await asyncio.gather(*(outbox(app).sweep() for app in apps))
    await wait_until(lambda: len(calls) == len(ids), WAIT)
    assert set(calls) == set(ids)
    assert max(calls.values()) == 1
    await wait_until(lambda: drained(apps[0]), WAIT)


async def test_a_failed_send_is_retried_by_the_sweep(apps: list[Application]) -> None:
    calls: Counter[str] = Counter()
    flaky = Recorder(apps[0].instance_id, calls, fail=1)
    outbox(apps[0]).register("probe", flaky)
    async with apps[0].db.transaction() as tx:
        row_id = await outbox(apps[0]).add(tx, "probe", {"n": 1})
    assert calls == Counter()  # the first attempt failed
    await wait_until(lambda: calls[row_id] == 1, WAIT)
    await wait_until(lambda: drained(apps[0]), WAIT)


async def test_a_transaction_longer_than_the_lease_still_sends_once(
    apps: list[Application],
) -> None:
    calls: Counter[str] = Counter()
    for app in apps:
        outbox(app).register("probe", Recorder(app.instance_id, calls))
    outbox(apps[0]).claim_lease = 0.2
    async with apps[0].db.transaction() as tx:
        row_id = await outbox(apps[0]).add(tx, "probe", {"slow": True})
        await asyncio.sleep(0.5)  # the claim written with the row expires meanwhile
        outbox(apps[0]).claim_lease = 5.0  # the relay's renewed claim is a normal one
    assert calls[row_id] == 1
    for app in apps:
        await outbox(app).sweep()
    await wait_until(lambda: drained(apps[0]), WAIT)
    assert calls == Counter({row_id: 1})


async def test_sent_rows_are_pruned_after_the_retention(apps: list[Application]) -> None:
    app = apps[0]
    for n in range(5):
        await app.plugins["memo"].send_sync_message({"n": n})
    await wait_until(lambda: drained(app), WAIT)
    assert await outbox(app).prune() == 0  # still within the retention
    outbox(app).retention = 0.0
    assert await outbox(app).prune() == 5
    async with app.db.transaction() as tx:
        assert (await tx.connection.execute(select(outbox_table.c.id))).all() == []


async def test_unsent_rows_are_never_pruned(apps: list[Application]) -> None:
    app = apps[0]
    await insert_orphans(app, "unregistered", 3)
    outbox(app).retention = 0.0
    assert await outbox(app).prune() == 0
    assert await outbox(app).pending() == 3


def test_database_errors_reach_callers_as_accord_errors() -> None:
    refused = sa_errors.OperationalError("INSERT", {}, ConnectionRefusedError(111, "refused"))
    with (
        pytest.raises(AdapterUnavailable, match="outbox add") as unreachable,
        map_db_errors("outbox add"),
    ):
        raise refused
    assert unreachable.value.__cause__ is refused
    duplicate = sa_errors.IntegrityError("INSERT", {}, ValueError("duplicate key"))
    with pytest.raises(AdapterError) as failed, map_db_errors("outbox add"):
        raise duplicate
    assert not isinstance(failed.value, AdapterUnavailable)
    assert failed.value.__cause__ is duplicate
