"""Database transactions and their after-commit / after-rollback callbacks, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from accord import Database, StateError


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    await database.connect()
    async with database.transaction() as tx:
        await tx.connection.execute(text("CREATE TABLE items (name VARCHAR(50))"))
    yield database
    await database.close()


async def count(db: Database) -> int:
    async with db.transaction() as tx:
        return int((await tx.connection.execute(text("SELECT count(*) FROM items"))).scalar_one())


async def test_after_commit_runs_after_a_real_commit_in_order(db: Database) -> None:
    events: list[str] = []

    async def second() -> None:
        events.append(f"second saw {await count(db)} row(s)")

    async with db.transaction() as tx:
        await tx.connection.execute(text("INSERT INTO items VALUES ('a')"))
        tx.after_commit(lambda: events.append("first"))
        tx.after_commit(second)
        tx.after_rollback(lambda: events.append("rollback"))
        assert events == []
    assert events == ["first", "second saw 1 row(s)"]
    assert tx.state == "committed"


async def test_rollback_runs_only_after_rollback_callbacks(db: Database) -> None:
    events: list[str] = []
    with pytest.raises(RuntimeError, match="boom"):
        async with db.transaction() as tx:
            await tx.connection.execute(text("INSERT INTO items VALUES ('a')"))
            tx.after_commit(lambda: events.append("commit"))
            tx.after_rollback(lambda: events.append("rollback"))
            raise RuntimeError("boom")
    assert events == ["rollback"]
    assert await count(db) == 0


async def test_a_failing_callback_is_logged_and_the_others_run(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []

    def broken() -> None:
        raise ValueError("callback broke")

    with caplog.at_level(logging.ERROR, logger="accord.db"):
        async with db.transaction() as tx:
            tx.after_commit(broken)
            tx.after_commit(lambda: events.append("still ran"))
    assert events == ["still ran"]
    assert "callback broke" in caplog.text


async def test_nested_use_joins_the_same_transaction(db: Database) -> None:
    events: list[str] = []
    async with db.transaction() as outer:
        await outer.connection.execute(text("INSERT INTO items VALUES ('outer')"))
        async with db.transaction() as inner:
            assert inner is outer
            await inner.connection.execute(text("INSERT INTO items VALUES ('inner')"))
            inner.after_commit(lambda: events.append("inner's callback"))
        async with outer:
            outer.after_commit(lambda: events.append("re-entered"))
        assert events == []  # nothing commits until the outermost block exits
    assert events == ["inner's callback", "re-entered"]
    assert await count(db) == 2


async def test_a_failed_nested_block_rolls_back_everything(db: Database) -> None:
    events: list[str] = []
    with pytest.raises(StateError, match="nested block raised"):
        async with db.transaction() as tx:
            await tx.connection.execute(text("INSERT INTO items VALUES ('a')"))
            tx.after_rollback(lambda: events.append("rolled back"))
            try:
                async with db.transaction():
                    raise KeyError("inner")
            except KeyError:
                pass
    assert events == ["rolled back"]
    assert await count(db) == 0


async def test_callbacks_cannot_be_added_after_the_end(db: Database) -> None:
    async with db.transaction() as tx:
        pass
    with pytest.raises(StateError, match="already committed"):
        tx.after_commit(lambda: None)


async def test_session_rides_on_the_transaction(db: Database) -> None:
    async with db.transaction() as tx:
        await tx.session.execute(text("INSERT INTO items VALUES ('via session')"))
    assert await count(db) == 1


async def test_unreachable_database_is_a_clear_error() -> None:
    from accord import AdapterUnavailable

    database = Database("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    with pytest.raises(AdapterUnavailable, match="cannot connect to the database"):
        await database.connect()
