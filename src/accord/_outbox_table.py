"""The outbox table and every statement run on it, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Column,
    Double,
    Index,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy import exc as sa_errors

from .exceptions import AdapterError, AdapterUnavailable

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

OUTBOX_TABLE = "accord_outbox"

metadata = MetaData()
outbox_table = Table(
    OUTBOX_TABLE,
    metadata,
    Column("id", String(32), primary_key=True),
    Column("app", String(200), nullable=False),
    Column("kind", String(100), nullable=False),
    Column("record", Text, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("claimed_by", String(200)),
    Column("claimed_until", Double, nullable=False),
    Column("sent_at", Double),
    Index("accord_outbox_app_sent", "app", "sent_at"),
)
_t = outbox_table.c


@contextmanager
def map_db_errors(what: str) -> Iterator[None]:
    """Translate SQLAlchemy errors from the outbox table into accord's; the original stays on `__cause__`."""
    try:
        yield
    except (sa_errors.OperationalError, sa_errors.InterfaceError, OSError, TimeoutError) as exc:
        raise AdapterUnavailable(f"{what}: the database is unreachable: {exc}") from exc
    except sa_errors.DBAPIError as exc:
        if exc.connection_invalidated:
            raise AdapterUnavailable(f"{what}: the database connection was lost: {exc}") from exc
        raise AdapterError(f"{what}: the database failed: {exc}") from exc
    except sa_errors.SQLAlchemyError as exc:
        raise AdapterError(f"{what}: the database failed: {exc}") from exc


async def create_table(engine: AsyncEngine) -> None:
    """Create the table and its index unless they exist."""
    try:
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
    except Exception:
        # Two instances starting together may race on CREATE TABLE; the
        # loser finds the table made by the winner.
        async with engine.connect() as connection:
            exists = await connection.run_sync(
                lambda sync: sync.dialect.has_table(sync, OUTBOX_TABLE)
            )
        if not exists:
            raise


async def insert_row(
    connection: AsyncConnection,
    *,
    row_id: str,
    app: str,
    kind: str,
    record: str,
    owner: str,
    until: float,
) -> None:
    """Write one unsent row, claimed by `owner` until `until`."""
    await connection.execute(
        insert(outbox_table).values(
            id=row_id,
            app=app,
            kind=kind,
            record=record,
            created_at=time.time(),
            claimed_by=owner,
            claimed_until=until,
            sent_at=None,
        )
    )


async def claim_expired(
    engine: AsyncEngine,
    *,
    app: str,
    kinds: Sequence[str],
    owner: str,
    now: float,
    until: float,
    limit: int,
) -> list[Any]:
    """Claim unsent rows of `kinds` whose claim expired before `now`; returns them oldest first."""
    candidates = (
        select(_t.id)
        .where(_t.app == app, _t.sent_at.is_(None), _t.claimed_until < now, _t.kind.in_(kinds))
        .order_by(_t.created_at, _t.id)
        .limit(limit)
    )
    # Look first with a read: on SQLite an UPDATE takes the write lock even
    # when it matches nothing, and most sweeps find nothing.
    async with engine.connect() as connection:
        if (await connection.execute(candidates.limit(1))).first() is None:
            return []
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            candidates = candidates.with_for_update(skip_locked=True)
        # The claimed_until test is repeated in the UPDATE so that, on
        # PostgreSQL, a row another sweep claimed meanwhile is re-checked and
        # skipped; SQLite runs one writer at a time.
        result = await connection.execute(
            update(outbox_table)
            .where(
                _t.id.in_(candidates.scalar_subquery()),
                _t.sent_at.is_(None),
                _t.claimed_until < now,
            )
            .values(claimed_by=owner, claimed_until=until)
            .returning(_t.id, _t.kind, _t.record, _t.created_at)
        )
        return sorted(result.all(), key=lambda row: (row.created_at, row.id))


async def reclaim(
    engine: AsyncEngine, row_id: str, *, owner: str, now: float, until: float
) -> bool:
    """Extend `owner`'s claim on an unsent row, or take it if its claim expired."""
    async with engine.begin() as connection:
        result = await connection.execute(
            update(outbox_table)
            .where(
                _t.id == row_id,
                _t.sent_at.is_(None),
                or_(_t.claimed_by == owner, _t.claimed_until < now),
            )
            .values(claimed_by=owner, claimed_until=until)
        )
    return bool(result.rowcount)


async def release(engine: AsyncEngine, ids: Sequence[str]) -> None:
    """Drop the claims on unsent rows so that the next sweep, anywhere, sends them."""
    async with engine.begin() as connection:
        await connection.execute(
            update(outbox_table)
            .where(_t.id.in_(ids), _t.sent_at.is_(None))
            .values(claimed_until=0.0)
        )


async def mark_sent(engine: AsyncEngine, ids: Sequence[str], now: float) -> None:
    async with engine.begin() as connection:
        await connection.execute(update(outbox_table).where(_t.id.in_(ids)).values(sent_at=now))


async def delete_sent_before(engine: AsyncEngine, app: str, before: float) -> int:
    async with engine.begin() as connection:
        result = await connection.execute(
            delete(outbox_table).where(_t.app == app, _t.sent_at < before)
        )
    return int(result.rowcount or 0)


async def read_page(
    engine: AsyncEngine,
    *,
    app: str,
    kind: str,
    since: float,
    after: tuple[float, str] | None,
    limit: int,
) -> list[Any]:
    """Rows of `kind` sent since `since` or not sent yet, after the `(created_at, id)` key."""
    query = (
        select(_t.id, _t.record, _t.created_at)
        .where(_t.app == app, _t.kind == kind, or_(_t.sent_at.is_(None), _t.sent_at >= since))
        .order_by(_t.created_at, _t.id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(
            or_(_t.created_at > after[0], and_(_t.created_at == after[0], _t.id > after[1]))
        )
    async with engine.connect() as connection:
        return list((await connection.execute(query)).all())


async def count_unsent(connection: AsyncConnection, app: str) -> int:
    query = select(func.count()).where(_t.app == app, _t.sent_at.is_(None))
    return int((await connection.execute(query)).scalar_one())
