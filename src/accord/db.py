"""Database: the SQLAlchemy async engine, transactions and their after-commit hooks."""

from __future__ import annotations

import contextvars
import enum
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy import MetaData, event
from sqlalchemy import inspect as inspect_schema
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine

from .config import redact
from .exceptions import AdapterUnavailable, StateError
from .types import Callback

logger = logging.getLogger("accord.db")

SQLITE_BUSY_TIMEOUT = 30.0

_current: contextvars.ContextVar[Transaction | None] = contextvars.ContextVar(
    "accord_transaction", default=None
)


class DatabaseState(enum.Enum):
    NEW = "new"
    CONNECTED = "connected"
    CLOSED = "closed"


class Transaction:
    """One database transaction, with callbacks that run once it has ended.

    `tx.connection` is the `AsyncConnection` the transaction runs on and
    `tx.session` an `AsyncSession` bound to it. Entering the same transaction
    again (`async with tx:`, or `db.transaction()` while one is active in the
    task) joins it: the commit happens when the outermost block exits. If a
    joined block raises, the whole transaction rolls back.
    """

    def __init__(self, database: Database, connection: AsyncConnection) -> None:
        self.database = database
        self.connection = connection
        self._session: AsyncSession | None = None
        self._after_commit: list[Callback] = []
        self._after_rollback: list[Callback] = []
        self._depth = 0
        self._failed = False
        self.state = "active"

    @property
    def session(self) -> AsyncSession:
        if self._session is None:
            self._session = AsyncSession(bind=self.connection, expire_on_commit=False)
        return self._session

    @property
    def active(self) -> bool:
        return self.state == "active"

    def after_commit(self, callback: Callback) -> None:
        """Run `callback` (plain or async, no arguments) after a real commit, in order."""
        self._check_active("after_commit")
        self._after_commit.append(callback)

    def after_rollback(self, callback: Callback) -> None:
        """Run `callback` (plain or async, no arguments) if the transaction rolls back."""
        self._check_active("after_rollback")
        self._after_rollback.append(callback)

    def _check_active(self, what: str) -> None:
        if not self.active:
            raise StateError(f"{what}: the transaction has already {self.state}")

    async def __aenter__(self) -> Transaction:
        self._check_active("entering a transaction")
        self._depth += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._depth -= 1
        if exc_type is not None:
            self._failed = True
        if self._depth > 0:
            return
        if self._failed:
            await self._finish(commit=False)
            if exc_type is None:
                raise StateError(
                    "the transaction was rolled back because a nested block raised; "
                    "let the error propagate or catch it outside the transaction"
                )
        else:
            await self._finish(commit=True)

    async def _finish(self, *, commit: bool) -> None:
        try:
            if commit:
                if self._session is not None:
                    await self._session.flush()
                await self.connection.commit()
            else:
                await self.connection.rollback()
        except BaseException:
            self.state = "rolled back"
            await self._close()
            await self._run(self._after_rollback, "after_rollback")
            raise
        self.state = "committed" if commit else "rolled back"
        await self._close()
        if commit:
            await self._run(self._after_commit, "after_commit")
        else:
            await self._run(self._after_rollback, "after_rollback")

    async def _close(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self.connection.close()

    @staticmethod
    async def _run(callbacks: list[Callback], kind: str) -> None:
        for callback in callbacks:
            try:
                result = callback()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("%s callback %r failed; the others still run", kind, callback)


class Database:
    """The application database: a SQLAlchemy async engine.

    Args:
        url: a SQLAlchemy URL, `sqlite+aiosqlite:///path` or `postgresql+asyncpg://...`.
            A PostgreSQL URL may carry `?search_path=schema`.
        **engine_options: passed to `create_async_engine`.

    Example:
        async with app.db.transaction() as tx:
            await tx.connection.execute(text("insert into notes values (:t)"), {"t": "hi"})
            tx.after_commit(lambda: print("visible to everyone now"))
    """

    def __init__(self, url: str, **engine_options: Any) -> None:
        self.url = url
        self._engine_options = engine_options
        self._engine: AsyncEngine | None = None
        self.state = DatabaseState.NEW

    def __repr__(self) -> str:
        return f"Database({redact(self.url)!r}, state={self.state.value})"

    @property
    def dialect(self) -> str:
        """`sqlite` or `postgresql`."""
        return "sqlite" if self.url.startswith("sqlite") else "postgresql"

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise StateError("the database is not connected; start the application first")
        return self._engine

    async def connect(self) -> None:
        if self.state is DatabaseState.CONNECTED:
            return
        if self.state is DatabaseState.CLOSED:
            raise StateError("the database was closed; create a new Application")
        url, options = self._engine_arguments()
        self._engine = create_async_engine(url, **options)
        if self.dialect == "sqlite":
            event.listen(self._engine.sync_engine, "connect", _sqlite_pragmas)
        try:
            async with self._engine.connect():
                pass
        except Exception as exc:
            await self._engine.dispose()
            self._engine = None
            raise AdapterUnavailable(
                f"cannot connect to the database {redact(self.url)}: {exc}"
            ) from exc
        self.state = DatabaseState.CONNECTED
        logger.debug("database connected: %s", redact(self.url))

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None
        self.state = DatabaseState.CLOSED

    async def create_tables(self, metadata: MetaData) -> None:
        """Create the tables (and indexes) of `metadata` that do not exist yet."""
        async with self.engine.begin() as connection:
            await connection.run_sync(metadata.create_all)

    async def missing_tables(self, metadata: MetaData) -> list[str]:
        """The names of `metadata`'s tables that this database does not have."""
        names = [table.name for table in metadata.sorted_tables]
        async with self.engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: [name for name in names if not inspect_schema(sync).has_table(name)]
            )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """Open a transaction, or join the one already open in this task."""
        current = _current.get()
        if current is not None and current.database is self and current.active:
            async with current:
                yield current
            return
        connection = await self.engine.connect()
        try:
            await connection.begin()
        except BaseException:
            await connection.close()
            raise
        tx = Transaction(self, connection)
        token = _current.set(tx)
        try:
            async with tx:
                yield tx
        finally:
            _current.reset(token)

    def _engine_arguments(self) -> tuple[str, dict[str, Any]]:
        options = dict(self._engine_options)
        if self.dialect == "sqlite":
            path = self.url.partition(":///")[2]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            options.setdefault("connect_args", {"timeout": SQLITE_BUSY_TIMEOUT})
            return self.url, options
        parts = urlsplit(self.url)
        query = dict(parse_qsl(parts.query))
        search_path = query.pop("search_path", None)
        if search_path:
            connect_args = options.setdefault("connect_args", {})
            connect_args.setdefault("server_settings", {})["search_path"] = search_path
        options.setdefault("pool_pre_ping", True)
        return urlunsplit(parts._replace(query=urlencode(query))), options


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets several instances (or processes) on one SQLite file read while
    # one writes; busy_timeout makes writers wait instead of failing at once.
    # synchronous=NORMAL in WAL mode survives a process crash and can lose only
    # the last commits on power loss; it removes one disk flush per commit.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT * 1000)}")
    cursor.close()
