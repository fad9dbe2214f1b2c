"""PostgreSQL queue adapter: SKIP LOCKED claims, NOTIFY wake-ups, leases, jobs in the app's transaction."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text

from accord import AdapterError, QueueError, Settings
from accord.adapters.postgres.queue import PostgresQueueAdapter
from accord.event_queue import Job, JobContext
from accord.testing import cluster, wait_until
from conftest import unique

pytestmark = pytest.mark.postgres

WAIT = 15.0


def schema_of(url: str) -> str:
    return url.rpartition("search_path=")[2]


def new_job(channel: str, n: int = 0, job_id: str | None = None) -> Job:
    return Job(
        id=job_id or uuid.uuid4().hex,
        channel=channel,
        body=b'{"payload": %d, "options": {}}' % n,
        enqueued_at=time.time(),
    )


@pytest.fixture
async def adapter(postgres_url: str) -> AsyncIterator[PostgresQueueAdapter]:
    queue = PostgresQueueAdapter(postgres_url)
    await queue.connect()
    yield queue
    await queue.close()


async def test_tables_live_in_the_schema_of_the_search_path(
    adapter: PostgresQueueAdapter, postgres_url: str
) -> None:
    assert await adapter.enqueue(new_job("c"), 0)
    schema = schema_of(postgres_url)
    connection = await asyncpg.connect(postgres_url.partition("?")[0])
    try:
        count = await connection.fetchval(f'SELECT count(*) FROM "{schema}".accord_jobs')
        tables = await connection.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
        )
    finally:
        await connection.close()
    assert count == 1
    assert {row["table_name"] for row in tables} >= {"accord_jobs", "accord_dead_jobs"}


async def test_concurrent_claimers_never_share_a_job(
    adapter: PostgresQueueAdapter, postgres_url: str
) -> None:
    others = [PostgresQueueAdapter(postgres_url) for _ in range(2)]
    for other in others:
        await other.connect()
    try:
        ids = {uuid.uuid4().hex for _ in range(300)}
        for job_id in ids:
            await adapter.enqueue(new_job("c", job_id=job_id), 0)
        claimed: list[str] = []

        async def drain(queue: PostgresQueueAdapter, name: str) -> None:
            while jobs := await queue.claim("c", name, 7, 30, 0):
                claimed.extend(job.id for job in jobs)
                assert all(await queue.ack(jobs))

        await asyncio.gather(*(drain(q, f"w{i}") for i, q in enumerate([adapter, *others])))
    finally:
        for other in others:
            await other.close()
    assert sorted(claimed) == sorted(ids)


async def test_a_worker_whose_lease_expired_cannot_acknowledge(
    adapter: PostgresQueueAdapter,
) -> None:
    await adapter.enqueue(new_job("c"), 0)
    (stale,) = await adapter.claim("c", "slow", 1, 0.2, 0)
    await asyncio.sleep(0.4)
    assert await adapter.recover("c", 0.2) == 1
    assert await adapter.renew([stale], 30) == [False]
    assert await adapter.ack([stale]) == [False]
    assert not await adapter.retry(stale, 0)
    assert not await adapter.bury(stale)
    (fresh,) = await adapter.claim("c", "fast", 1, 30, 0)
    assert (fresh.attempt, fresh.recoveries) == (1, 1)
    assert fresh.lease != stale.lease
    assert await adapter.ack([stale, fresh]) == [False, True]
    stats = await adapter.stats("c")
    assert (stats.queued, stats.delayed, stats.running, stats.dead) == (0, 0, 0, 0)


async def test_released_jobs_go_before_jobs_already_due(adapter: PostgresQueueAdapter) -> None:
    for n in range(3):
        await adapter.enqueue(new_job("c", n, job_id=f"j{n}"), 0)
    (first,) = await adapter.claim("c", "w", 1, 30, 0)
    await adapter.release([first])
    order = [job.id for job in await adapter.claim("c", "w", 3, 30, 0)]
    assert order == ["j0", "j1", "j2"]


async def test_requeue_of_an_id_that_is_pending_again_raises_and_keeps_the_letter(
    adapter: PostgresQueueAdapter,
) -> None:
    await adapter.enqueue(new_job("c", job_id="k"), 0)
    (job,) = await adapter.claim("c", "w", 1, 30, 0)
    job.failures, job.error = 1, "boom"
    assert await adapter.bury(job)
    assert await adapter.enqueue(new_job("c", 2, job_id="k"), 0)
    with pytest.raises(QueueError, match="pending or running"):
        await adapter.requeue("k", None)
    assert [dead.id for dead in await adapter.dead_letters("c", 10)] == ["k"]


async def test_channels_match_the_prefix_literally_across_both_tables(
    adapter: PostgresQueueAdapter,
) -> None:
    await adapter.enqueue(new_job("a_%:live"), 30)
    await adapter.enqueue(new_job("a_%:gone", job_id="k"), 0)
    (job,) = await adapter.claim("a_%:gone", "w", 1, 30, 0)
    assert await adapter.bury(job)
    # `_` and `%` are LIKE wildcards: these must not match the prefix `a_%:`.
    await adapter.enqueue(new_job("ab%:other"), 0)
    await adapter.enqueue(new_job("a_x:other"), 0)
    assert sorted(await adapter.channels("a_%:")) == ["a_%:gone", "a_%:live"]
    assert sorted(await adapter.channels()) == ["a_%:gone", "a_%:live", "a_x:other", "ab%:other"]
    assert await adapter.channels("b") == []


async def test_a_waiting_claim_is_woken_by_a_publish_elsewhere(
    adapter: PostgresQueueAdapter, postgres_url: str
) -> None:
    await adapter.subscribe("c", "w", 1)
    publisher = PostgresQueueAdapter(postgres_url)
    await publisher.connect()
    try:
        await wait_until(lambda: listening(postgres_url, adapter), WAIT)
        claim = asyncio.create_task(adapter.claim("c", "w", 1, 30, 60))
        await asyncio.sleep(0.3)
        await publisher.enqueue(new_job("c", 5), 0)
        # Without the NOTIFY the claim would sleep its full 60 s.
        jobs = await asyncio.wait_for(claim, WAIT)
    finally:
        await publisher.close()
    assert len(jobs) == 1


async def test_wake_ups_resume_after_the_listening_connection_is_killed(
    adapter: PostgresQueueAdapter, postgres_url: str
) -> None:
    await adapter.subscribe("c", "w", 1)
    await wait_until(lambda: listening(postgres_url, adapter), WAIT)
    (old_pid,) = await listening(postgres_url, adapter)
    connection = await asyncpg.connect(postgres_url.partition("?")[0])
    try:
        await connection.execute("SELECT pg_terminate_backend($1)", old_pid)
    finally:
        await connection.close()

    async def listening_again() -> bool:
        pids = await listening(postgres_url, adapter)
        return bool(pids) and old_pid not in pids

    await wait_until(listening_again, WAIT)
    claim = asyncio.create_task(adapter.claim("c", "w", 1, 30, 60))
    await asyncio.sleep(0.3)
    await adapter.enqueue(new_job("c"), 0)
    assert len(await asyncio.wait_for(claim, WAIT)) == 1


async def listening(url: str, adapter: PostgresQueueAdapter) -> list[int]:
    """The server pids of connections listening on the adapter's NOTIFY channel."""
    connection = await asyncpg.connect(url.partition("?")[0])
    try:
        rows = await connection.fetch(
            "SELECT pid FROM pg_stat_activity WHERE query = $1",
            f'LISTEN "{adapter.notify_channel}"',
        )
    finally:
        await connection.close()
    return [row["pid"] for row in rows]


# Publishing inside the application's own transaction.


def same_database_settings(postgres_url: str, tmp_path: Path) -> Settings:
    name = unique("app")
    return Settings(
        app_name=name,
        storage=str(tmp_path),
        db_url=postgres_url.replace("postgresql://", "postgresql+asyncpg://", 1),
        queue_url=postgres_url,
        pubsub_url=f"memory://{name}",
        lock_url=f"memory://{name}",
    )


async def test_publish_in_a_transaction_writes_the_job_row_in_that_transaction(
    postgres_url: str, tmp_path: Path
) -> None:
    seen: list[Any] = []

    async def process(payload: Any, ctx: JobContext) -> None:
        seen.append(payload)

    settings = same_database_settings(postgres_url, tmp_path)
    async with cluster(2, settings=settings) as (publisher, worker):
        worker.event_queue.subscribe("jobs", process=process)
        async with publisher.db.transaction() as tx:
            await tx.connection.execute(text("CREATE TABLE notes (body text)"))
            await tx.connection.execute(text("INSERT INTO notes VALUES ('hello')"))
            await publisher.event_queue.publish("jobs", "with the note", transaction=tx)
            inside = await tx.connection.scalar(text("SELECT count(*) FROM accord_jobs"))
            assert inside == 1
            assert (await worker.event_queue.stats("jobs")).queued == 0
        await wait_until(lambda: seen == ["with the note"], WAIT)

        with pytest.raises(RuntimeError):
            async with publisher.db.transaction() as tx:
                await publisher.event_queue.publish("jobs", "rolled back", transaction=tx)
                raise RuntimeError("roll back")
        # A publish in a transaction that ran no statement yet is still part of it.
        with pytest.raises(RuntimeError):
            async with publisher.db.transaction() as tx:
                await publisher.event_queue.publish("jobs", "first thing", transaction=tx)
                raise RuntimeError("roll back")
        await asyncio.sleep(0.5)
        stats = await worker.event_queue.stats("jobs")
    assert seen == ["with the note"]
    assert (stats.queued, stats.delayed, stats.running) == (0, 0, 0)


async def test_publish_in_a_transaction_is_idempotent_by_job_id(
    postgres_url: str, tmp_path: Path
) -> None:
    settings = same_database_settings(postgres_url, tmp_path)
    async with cluster(1, settings=settings) as (app,):
        await app.event_queue.publish("jobs", 1, job_id="once")
        async with app.db.transaction() as tx:
            await app.event_queue.publish("jobs", 2, job_id="once", transaction=tx)
        await app.event_queue.publish("jobs", 3, job_id="other", delay=60)
        stats = await app.event_queue.stats("jobs")
    assert (stats.queued, stats.delayed) == (1, 1)


async def test_an_application_schema_other_than_the_queues_still_writes_in_the_transaction(
    postgres_url: str, tmp_path: Path
) -> None:
    app_schema = unique("accord_app")
    base = postgres_url.partition("?")[0]
    connection = await asyncpg.connect(base)
    await connection.execute(f'CREATE SCHEMA "{app_schema}"')
    try:
        settings = same_database_settings(postgres_url, tmp_path).replace(
            db_url=f"{base.replace('postgresql://', 'postgresql+asyncpg://', 1)}"
            f"?search_path={app_schema}"
        )
        async with cluster(1, settings=settings) as (app,):
            async with app.db.transaction() as tx:
                await app.event_queue.publish("jobs", "here", transaction=tx)
                qualified = f'"{schema_of(postgres_url)}".accord_jobs'
                inside = await tx.connection.scalar(text(f"SELECT count(*) FROM {qualified}"))
                assert inside == 1
            assert (await app.event_queue.stats("jobs")).queued == 1
    finally:
        await connection.execute(f'DROP SCHEMA "{app_schema}" CASCADE')
        await connection.close()


async def test_a_search_path_without_an_existing_schema_fails_at_connect(
    postgres_url: str,
) -> None:
    url = postgres_url.replace(schema_of(postgres_url), unique("missing"))
    queue = PostgresQueueAdapter(url)
    with pytest.raises(AdapterError, match="search_path"):
        await queue.connect()
