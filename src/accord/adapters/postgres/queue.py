"""PostgreSQL queue adapter: a jobs table claimed with FOR UPDATE SKIP LOCKED, woken by NOTIFY."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

from ...config import redact
from ...event_queue import Job, QueueStats
from ...exceptions import AdapterError, QueueError, StateError
from ._pool import create_pool, map_errors
from ._queue_sql import IDENTITY, Queries
from ._queue_wakeups import Wakeups

if TYPE_CHECKING:
    from ...db import Database, Transaction

__all__ = ["PostgresQueueAdapter"]

logger = logging.getLogger("accord.queue.postgres")

RECOVER_BATCH = 500
#: Connections at most in each of the two pools (publishing; claiming and acknowledging).
POOL_SIZE = 10
#: When due jobs exist but other claimers hold them, look again this soon.
BUSY_RETRY = 0.05


class PostgresQueueAdapter:
    """Jobs in PostgreSQL tables, shared by every instance using the same database and schema.

    A claim leases rows with `FOR UPDATE SKIP LOCKED`, so claimers never
    wait for each other; the lease is an expiry column renewed while the job
    runs and checked by every acknowledgement. Publishes NOTIFY waiting
    claimers. Leasing, acknowledging and recovering run with
    `synchronous_commit = off` (a server crash can undo the last moments of
    them, which at-least-once delivery absorbs); publishes commit as the URL
    says (durable by default; add `&synchronous_commit=off` to trade that
    for speed). When the application database is the same server and
    database, `publish(..., transaction=tx)` writes the job in `tx` itself.

    Args:
        url: `postgresql://user@host:port/db`; `?search_path=schema` chooses where the tables live.
        storage: unused (jobs live in PostgreSQL).
        pool: a ready asyncpg pool to use for everything. Default: pools of its own.
    """

    def __init__(
        self, url: str, *, storage: Path | str | None = None, pool: asyncpg.Pool | None = None
    ) -> None:
        self.url = url
        self._given = pool
        self._pool: asyncpg.Pool | None = None
        self._fast: asyncpg.Pool | None = None
        self._queries: Queries | None = None
        self._identity: tuple[Any, ...] = ()
        self.notify_channel = ""
        self._wakeups = Wakeups()
        self._same_server: weakref.WeakKeyDictionary[Database, bool] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"<PostgresQueueAdapter {redact(self.url)}>"

    # Lifecycle.

    async def connect(self) -> None:
        if self._pool is not None:
            raise StateError("this PostgreSQL queue adapter is already connected")
        pool = (
            self._given
            if self._given is not None
            else await create_pool(self.url, min_size=1, max_size=POOL_SIZE)
        )
        try:
            with map_errors(self.url):
                async with pool.acquire() as connection, connection.transaction():
                    schema = await connection.fetchval("SELECT current_schema()")
                    if schema is None:
                        raise AdapterError(
                            f"PostgreSQL at {redact(self.url)}: no schema of the search_path "
                            "exists; create it or fix ?search_path= in ACCORD_QUEUE_URL"
                        )
                    queries = Queries.for_schema(schema)
                    # Instances starting together must not race on CREATE ... IF NOT EXISTS.
                    await connection.execute(
                        "SELECT pg_advisory_xact_lock(hashtext($1))", queries.jobs
                    )
                    await connection.execute(queries.schema)
                    self._identity = tuple(await connection.fetchrow(IDENTITY, queries.jobs))
            fast = (
                self._given
                if self._given is not None
                else await create_pool(
                    self.url,
                    min_size=1,
                    max_size=POOL_SIZE,
                    server_settings={"synchronous_commit": "off"},
                )
            )
        except BaseException:
            if self._given is None:
                pool.terminate()
            raise
        self._pool, self._fast, self._queries = pool, fast, queries
        digest = hashlib.blake2b(queries.jobs.encode(), digest_size=10).hexdigest()
        # NOTIFY channels are per database: the schema's digest keeps schemas apart.
        self.notify_channel = f"accord_jobs_{digest}"

    async def close(self) -> None:
        await self._wakeups.stop()
        for pool in self._detach_pools():
            await pool.close()

    async def abort(self) -> None:
        for pool in self._detach_pools():
            pool.terminate()
        await self._wakeups.stop()

    def _detach_pools(self) -> list[asyncpg.Pool]:
        """Forget both pools; returns those this adapter opened (a given pool is not closed)."""
        pools = {self._pool, self._fast} - {None, self._given}
        self._pool = self._fast = None
        return [pool for pool in pools if pool is not None]

    def _ready(self) -> tuple[asyncpg.Pool, asyncpg.Pool, Queries]:
        if self._pool is None or self._fast is None or self._queries is None:
            raise StateError("the PostgreSQL queue adapter is not connected")
        return self._pool, self._fast, self._queries

    # Wake-ups.

    async def subscribe(self, channel: str, consumer: str, concurrency: int) -> None:
        self._ready()
        self._wakeups.listen(self.url, self.notify_channel)

    async def unsubscribe(self, channel: str, consumer: str) -> None:
        pass

    # Publishing.

    async def enqueue(self, job: Job, delay: float) -> bool:
        pool, _, queries = self._ready()
        with map_errors(self.url):
            rows = await pool.fetch(queries.enqueue, *self._enqueue_args(job, delay))
        return bool(rows)

    async def enqueue_in_transaction(
        self, transaction: Transaction, job: Job, delay: float
    ) -> bool | None:
        """Write `job` in the application's `transaction` when it runs on this same database.

        Returns None (the manager then uses the outbox) when the application
        database is another server, another database, or not PostgreSQL.
        """
        _, _, queries = self._ready()
        database = transaction.database
        if database.dialect != "postgresql":
            return None
        raw = await transaction.connection.get_raw_connection()
        connection = raw.driver_connection
        if not isinstance(connection, asyncpg.Connection):
            return None
        with map_errors(self.url):
            if not connection.is_in_transaction():
                # SQLAlchemy begins the database transaction at its first statement.
                await transaction.connection.exec_driver_sql("SELECT 1")
            same = self._same_server.get(database)
            if same is None:
                row = await connection.fetchrow(IDENTITY, queries.jobs)
                same = self._same_server[database] = tuple(row) == self._identity
                if not same:
                    logger.info(
                        "queue: the application database %s is not the queue's database; "
                        "jobs published in a transaction go through the outbox",
                        redact(database.url),
                    )
            if not same or not connection.is_in_transaction():
                return None
            rows = await connection.fetch(queries.enqueue, *self._enqueue_args(job, delay))
        return bool(rows)

    def _enqueue_args(self, job: Job, delay: float) -> tuple[Any, ...]:
        return (
            job.channel,
            job.id,
            job.body,
            job.enqueued_at,
            job.attempt,
            job.failures,
            job.recoveries,
            job.error,
            max(0.0, float(delay)),
            self.notify_channel,
        )

    # Claiming.

    async def claim(
        self, channel: str, consumer: str, count: int, lease: float, wait: float
    ) -> list[Job]:
        _, fast, queries = self._ready()
        digest = hashlib.md5(channel.encode()).hexdigest()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            # Read the counter first: a NOTIFY that lands during the query is not lost.
            since = self._wakeups.current(digest)
            with map_errors(self.url):
                rows = await fast.fetch(queries.claim, channel, count, consumer, float(lease))
            if rows:
                rows.sort(key=lambda row: (row["due_at"], row["seq"]))
                return [_job(channel, row, lease=row["lease"]) for row in rows]
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            with map_errors(self.url):
                due = await fast.fetchval(queries.next_due, channel)
            timeout = remaining
            if due is not None:
                # Due rows that were not claimed are held by another claimer's lock.
                timeout = min(remaining, due if due > 0 else BUSY_RETRY)
            await self._wakeups.wait(digest, since, timeout)

    # Acknowledging and putting back.

    async def ack(self, jobs: Sequence[Job]) -> list[bool]:
        return await self._per_job(jobs, "ack")

    async def renew(self, jobs: Sequence[Job], lease: float) -> list[bool]:
        return await self._per_job(jobs, "renew", float(lease))

    async def _per_job(self, jobs: Sequence[Job], statement: str, *extra: Any) -> list[bool]:
        if not jobs:
            return []
        _, fast, queries = self._ready()
        with map_errors(self.url):
            rows = await fast.fetch(
                getattr(queries, statement),
                [job.channel for job in jobs],
                [job.id for job in jobs],
                [job.lease for job in jobs],
                *extra,
            )
        held = {(row[0], row[1], row[2]) for row in rows}
        return [(job.channel, job.id, job.lease) in held for job in jobs]

    async def retry(self, job: Job, delay: float) -> bool:
        return await self._put_back(job, max(0.0, float(delay)))

    async def release(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            await self._put_back(job, None)

    async def _put_back(self, job: Job, delay: float | None) -> bool:
        _, fast, queries = self._ready()
        with map_errors(self.url):
            rows = await fast.fetch(
                queries.put_back, *_settle_args(job), delay, self.notify_channel
            )
        return bool(rows)

    async def bury(self, job: Job) -> bool:
        _, fast, queries = self._ready()
        with map_errors(self.url):
            rows = await fast.fetch(queries.bury, *_settle_args(job))
        return bool(rows)

    async def recover(self, channel: str, lease: float) -> int:
        # Each row carries its own expiry, so `lease` is not needed here.
        _, fast, queries = self._ready()
        total = 0
        while True:
            with map_errors(self.url):
                count = await fast.fetchval(
                    queries.recover, channel, self.notify_channel, RECOVER_BATCH
                )
            total += int(count)
            if count < RECOVER_BATCH:
                return total

    # Dead letters and counts.

    async def dead_letters(self, channel: str, limit: int) -> list[Job]:
        if limit <= 0:
            return []
        pool, _, queries = self._ready()
        with map_errors(self.url):
            rows = await pool.fetch(queries.dead_letters, channel, limit)
        return [_job(channel, row, failed_at=row["failed_at"]) for row in rows]

    async def requeue(self, job_id: str, channel: str | None) -> bool:
        pool, _, queries = self._ready()
        with map_errors(self.url):
            async with pool.acquire() as connection:
                if channel is None:
                    channel = await connection.fetchval(queries.dead_channel, job_id)
                    if channel is None:
                        return False
                async with connection.transaction():
                    row = await connection.fetchrow(queries.unbury, channel, job_id)
                    if row is None:
                        return False
                    added = await connection.fetch(
                        queries.requeue,
                        channel,
                        job_id,
                        row["body"],
                        row["enqueued_at"],
                        row["attempt"] + 1,
                        self.notify_channel,
                    )
                    if not added:
                        # Raising rolls the transaction back: the dead letter stays.
                        raise QueueError(
                            f"queue {channel}: job {job_id} is pending or running; not requeued"
                        )
        return True

    async def purge(self, channel: str) -> int:
        pool, _, queries = self._ready()
        with map_errors(self.url):
            status = await pool.execute(queries.purge, channel)
        return int(status.rsplit(" ", 1)[-1])

    async def stats(self, channel: str) -> QueueStats:
        pool, _, queries = self._ready()
        with map_errors(self.url):
            row = await pool.fetchrow(queries.stats, channel)
        return QueueStats(
            queued=row["queued"], delayed=row["delayed"], running=row["running"], dead=row["dead"]
        )

    async def channels(self, prefix: str = "") -> list[str]:
        """Channels starting with `prefix` with rows in the jobs or dead-letter table.

        A subscription alone leaves no row, so a channel without jobs is not listed.
        """
        pool, _, queries = self._ready()
        with map_errors(self.url):
            rows = await pool.fetch(queries.channels, prefix)
        return [row["channel"] for row in rows]


def _settle_args(job: Job) -> tuple[Any, ...]:
    """The leased row's key and lease, then the counters the manager set ($1 to $7)."""
    return (
        job.channel,
        job.id,
        job.lease,
        job.attempt,
        job.failures,
        job.recoveries,
        job.error,
    )


def _job(channel: str, row: Any, *, lease: str = "", failed_at: float | None = None) -> Job:
    return Job(
        id=row["id"],
        channel=channel,
        body=bytes(row["body"]),
        enqueued_at=row["enqueued_at"],
        attempt=row["attempt"],
        failures=row["failures"],
        recoveries=row["recoveries"],
        error=row["error"],
        lease=lease,
        failed_at=failed_at,
    )
