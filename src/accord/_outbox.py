"""The transactional outbox: records written in a transaction, relayed after commit, recovered after a crash."""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from . import _codec
from . import _outbox_table as store
from ._outbox_table import OUTBOX_TABLE, map_db_errors, outbox_table
from .exceptions import StateError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from .app import Application
    from .db import Transaction

__all__ = ["OUTBOX_TABLE", "Outbox", "Sender", "map_db_errors", "outbox_table"]

#: Seconds an instance owns the sending of a row it wrote or claimed.
CLAIM_LEASE = 5.0
#: Seconds between looks for rows that a crashed instance left unsent.
SWEEP_INTERVAL = 1.0
#: Seconds a sent row is kept, so that instances which lost their link can replay it.
RETENTION = 3600.0
#: Seconds between deletions of rows older than the retention.
PRUNE_INTERVAL = 60.0
#: Rows claimed, marked or read per statement.
BATCH = 500
#: A relay re-claims a row first when less than this many seconds of its lease are left.
LEASE_MARGIN = 1.0
#: Longest pause, in seconds, before rows of a kind whose sender keeps failing are tried again.
MAX_BACKOFF = 10.0
#: Seconds sent rows wait to be marked, so that one UPDATE marks many.
MARK_DELAY = 0.25

#: Sends one record: called with the row id and the record, after commit.
Sender = Callable[[str, dict[str, Any]], Awaitable[None]]

logger = logging.getLogger("accord.outbox")


class _State(enum.Enum):
    NEW = "new"
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass(slots=True)
class _Row:
    id: str
    kind: str
    record: dict[str, Any]
    claimed_until: float


class Outbox:
    """Rows written in the caller's transaction and handed to a sender once it commits.

    The instance that commits sends its rows right after the commit. Rows
    that nobody sent (the instance crashed in between, or the sender failed)
    are claimed and sent by any instance once their claim lease expires;
    the claim is an atomic UPDATE (with `FOR UPDATE SKIP LOCKED` on
    PostgreSQL), so two instances never send the same row at once. A row can
    still be sent twice (a sender that stalls past its lease, a crash after
    sending but before the row is marked), so senders give receivers the row
    id to drop duplicates with.

    Args:
        app: the application; rows live in `app.db`, tagged with `app.name`.
    """

    def __init__(self, app: Application) -> None:
        self.app = app
        self.claim_lease = CLAIM_LEASE
        self.sweep_interval = SWEEP_INTERVAL
        self.retention = RETENTION
        self.log = type(app.log)(logger, app.log.extra)
        self._senders: dict[str, Sender] = {}
        self._state = _State.NEW
        self._schema_ready = False
        self._pending: dict[int, list[_Row]] = {}
        self._deferred: list[_Row] = []
        self._sent: list[str] = []
        self._marked = asyncio.Event()
        self._wake = asyncio.Event()
        # Kind -> (seconds of the current pause, when it ends) while its sender fails.
        self._backoff: dict[str, tuple[float, float]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._last_prune = 0.0

    def register(self, kind: str, sender: Sender) -> None:
        """Send rows of `kind` with `sender(row_id, record)` after commit, and after a crash.

        Args:
            kind: a short name for one kind of record ("sync", "queue").
            sender: an async callable; it may be called more than once for one
                row, so it should pass the row id on for de-duplication. If it
                raises, the row is tried again by the next sweep.
        """
        current = self._senders.get(kind)
        if current is not None and current != sender:
            raise ValueError(f"outbox kind {kind!r} already has a sender ({current!r})")
        self._senders[kind] = sender

    async def add(self, tx: Transaction, kind: str, record: dict[str, Any]) -> str:
        """Write `record` in `tx`; it is sent once `tx` commits and dropped if it rolls back.

        Args:
            tx: the transaction, from `app.db.transaction()`.
            kind: a kind given to `register`.
            record: JSON-compatible data handed to the sender.

        Returns:
            The row id, which the sender receives too.
        """
        if kind not in self._senders:
            raise ValueError(f"outbox kind {kind!r} has no sender; call outbox.register first")
        if self._state is _State.CLOSED:
            raise StateError(f"outbox add ({kind}): the application is stopping")
        data = _codec.encode(record, what=f"outbox record of kind {kind!r}")
        row = _Row(uuid.uuid4().hex, kind, _codec.decode(data), time.time() + self.claim_lease)
        connection = tx.connection
        with map_db_errors(f"outbox add ({kind})"):
            if not self._schema_ready:
                # Written before connect (from a plugin's load): create the table in
                # this transaction rather than on a second connection, which SQLite
                # would block behind this transaction's write lock.
                await connection.run_sync(store.metadata.create_all)
            await store.insert_row(
                connection,
                row_id=row.id,
                app=self.app.name,
                kind=kind,
                record=data.decode(),
                owner=self.app.instance_id,
                until=row.claimed_until,
            )
        key = id(tx)
        batch = self._pending.get(key)
        if batch is None:
            batch = self._pending[key] = []
            tx.after_commit(partial(self._committed, key))
            tx.after_rollback(partial(self._rolled_back, key))
        batch.append(row)
        return row.id

    # Lifecycle.

    async def connect(self) -> None:
        """Create the table if needed, send what was committed before, start sweeping."""
        if self._state is not _State.NEW:
            return
        await store.create_table(self.app.db.engine)
        self._schema_ready = True
        self._state = _State.CONNECTED
        self._tasks = [
            asyncio.create_task(self._sweep_loop(), name="accord-outbox-sweep"),
            asyncio.create_task(self._mark_loop(), name="accord-outbox-mark"),
        ]
        deferred, self._deferred = self._deferred, []
        if deferred:
            await self._send(deferred)

    async def close(self) -> None:
        """Stop sweeping and mark what was sent; rows not sent are left to other instances."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        await self._cancel_tasks()
        if self._schema_ready:
            try:
                await self._flush_marks()
                await self._release(row.id for row in self._deferred)
            except Exception as exc:
                self.log.warning("outbox: could not mark sent rows on close (%s)", exc)
        self._deferred = []

    async def abort(self) -> None:
        """Stop at once, as a crash would: nothing is marked or released."""
        self._state = _State.CLOSED
        await self._cancel_tasks()

    async def _cancel_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                self.log.error("outbox task failed: %r", result)

    # Sending.

    def _rolled_back(self, key: int) -> None:
        self._pending.pop(key, None)

    async def _committed(self, key: int) -> None:
        rows = self._pending.pop(key, [])
        if not rows:
            return
        if self._state is _State.NEW:
            self._deferred.extend(rows)
        elif self._state is _State.CONNECTED:
            await self._send(rows)

    async def _send(self, rows: list[_Row]) -> None:
        failed: list[str] = []
        for row in rows:
            if self._state is not _State.CONNECTED:
                return
            try:
                if time.time() > row.claimed_until - LEASE_MARGIN and not await self._reclaim(row):
                    continue
                await self._senders[row.kind](row.id, row.record)
            except Exception as exc:
                # The first failure is worth a warning; the rest of an outage is not.
                self.log.log(
                    logging.DEBUG if row.kind in self._backoff else logging.WARNING,
                    "outbox: sending %s row %s failed (%s: %s); a sweep retries it",
                    row.kind,
                    row.id,
                    type(exc).__name__,
                    exc,
                )
                failed.append(row.id)
                self._back_off(row.kind)
            else:
                self._backoff.pop(row.kind, None)
                self._sent.append(row.id)
                self._marked.set()
        if failed:
            try:
                await self._release(failed)
            except Exception as exc:
                self.log.warning("outbox: could not release %d failed row(s): %s", len(failed), exc)
            self._wake.set()

    async def _reclaim(self, row: _Row) -> bool:
        now = time.time()
        until = now + self.claim_lease
        owner = self.app.instance_id
        if not await store.reclaim(self.app.db.engine, row.id, owner=owner, now=now, until=until):
            self.log.debug("outbox: %s row %s was sent or claimed elsewhere", row.kind, row.id)
            return False
        row.claimed_until = until
        return True

    async def _release(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        for start in range(0, len(ids), BATCH):
            await store.release(self.app.db.engine, ids[start : start + BATCH])

    async def _mark_loop(self) -> None:
        # Marking rows sent is off the sending path and batched: a row sent
        # but not yet marked is at worst sent again, and receivers drop it.
        while True:
            await self._marked.wait()
            # Well within the claim, or another instance's sweep would send it again.
            await asyncio.sleep(min(MARK_DELAY, self.claim_lease / 4))
            self._marked.clear()
            try:
                await self._flush_marks()
            except Exception as exc:
                self.log.warning("outbox: marking rows sent failed (%s); retrying", exc)
                self._marked.set()
                await asyncio.sleep(1.0)

    async def _flush_marks(self) -> None:
        while self._sent:
            ids = self._sent[:BATCH]
            await store.mark_sent(self.app.db.engine, ids, time.time())
            del self._sent[: len(ids)]

    # Recovery.

    async def sweep(self) -> int:
        """Claim and send rows whose claim expired (their writer crashed or failed); returns how many."""
        total = 0
        while self._state is _State.CONNECTED and self._senders:
            rows = await self._claim()
            if rows:
                self.log.info("outbox: sending %d row(s) left unsent", len(rows))
                await self._send(rows)
            total += len(rows)
            if len(rows) < BATCH:
                break
        return total

    async def _claim(self) -> list[_Row]:
        now = time.time()
        until = now + self.claim_lease
        kinds = self._ready_kinds(now)
        if not kinds:
            return []
        claimed = await store.claim_expired(
            self.app.db.engine,
            app=self.app.name,
            kinds=kinds,
            owner=self.app.instance_id,
            now=now,
            until=until,
            limit=BATCH,
        )
        rows = []
        for entry in claimed:
            try:
                record = _codec.decode(entry.record)
            except Exception:
                self.log.error("outbox: %s row %s is not valid JSON; skipped", entry.kind, entry.id)
                continue
            rows.append(_Row(entry.id, entry.kind, record, until))
        return rows

    async def _sweep_loop(self) -> None:
        while True:
            try:
                await self.sweep()
                if time.time() - self._last_prune >= PRUNE_INTERVAL:
                    await self.prune()
                    self._last_prune = time.time()
            except Exception as exc:
                self.log.warning("outbox sweep failed (%s: %s); retrying", type(exc).__name__, exc)
            # Jitter keeps instances started together from sweeping in lockstep.
            delay = self.sweep_interval * random.uniform(0.8, 1.2)
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass
            self._wake.clear()

    def wake(self) -> None:
        """Sweep now instead of at the next interval, retrying every kind (a link came back)."""
        self._backoff.clear()
        self._wake.set()

    def _back_off(self, kind: str) -> None:
        # A sender that fails (its server is down) is not handed rows every
        # sweep: each claim and release is a write to the database.
        pause = min(self._backoff.get(kind, (self.sweep_interval / 2, 0.0))[0] * 2, MAX_BACKOFF)
        self._backoff[kind] = (pause, time.time() + pause)

    def _ready_kinds(self, now: float) -> list[str]:
        return [kind for kind in self._senders if self._backoff.get(kind, (0.0, 0.0))[1] <= now]

    async def prune(self) -> int:
        """Delete rows sent longer ago than the retention; returns how many."""
        before = time.time() - self.retention
        count = await store.delete_sent_before(self.app.db.engine, self.app.name, before)
        if count:
            self.log.debug("outbox: pruned %d sent row(s)", count)
        return count

    async def replay(self, kind: str, since: float) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Committed rows of `kind` sent since `since` (epoch seconds) or not sent yet, oldest first.

        Args:
            kind: the record kind.
            since: seconds since the epoch; rows sent before it are skipped.
        """
        after: tuple[float, str] | None = None
        while True:
            rows = await store.read_page(
                self.app.db.engine,
                app=self.app.name,
                kind=kind,
                since=since,
                after=after,
                limit=BATCH,
            )
            for row in rows:
                yield row.id, _codec.decode(row.record)
            if len(rows) < BATCH:
                return
            after = (rows[-1].created_at, rows[-1].id)

    async def pending(self, connection: AsyncConnection | None = None) -> int:
        """How many rows of this application are not sent yet (for status views and tests)."""
        if connection is not None:
            return await store.count_unsent(connection, self.app.name)
        async with self.app.db.engine.connect() as conn:
            return await store.count_unsent(conn, self.app.name)
