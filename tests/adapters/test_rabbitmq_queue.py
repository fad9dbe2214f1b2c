"""RabbitMQ queue adapter: TTL delays, leases held by the connection, job ids, dead letters."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import pytest
from pamqp import commands as spec

from accord import AdapterError, QueueError
from accord.adapters.rabbitmq._queue_topology import names_of
from accord.adapters.rabbitmq.queue import RabbitMQQueueAdapter
from accord.event_queue import Job
from accord.testing import wait_until
from conftest import unique

pytestmark = pytest.mark.rabbitmq

WAIT = 15.0


def new_job(channel: str, n: int = 0, job_id: str | None = None) -> Job:
    """A job as `EventQueue.publish` makes it: a chosen id is keyed (checked on enqueue)."""
    return Job(
        id=job_id or uuid.uuid4().hex,
        channel=channel,
        body=json.dumps({"payload": n, "options": {}}).encode(),
        enqueued_at=time.time(),
        keyed=job_id is not None,
    )


def payload(job: Job) -> object:
    return json.loads(job.body)["payload"]


@pytest.fixture
def channel() -> str:
    return unique("app") + ":jobs"


@pytest.fixture
async def adapter(amqp_url: str) -> AsyncIterator[RabbitMQQueueAdapter]:
    queue = RabbitMQQueueAdapter(amqp_url)
    await queue.connect()
    yield queue
    await queue.close()


@pytest.fixture
async def other(amqp_url: str) -> AsyncIterator[RabbitMQQueueAdapter]:
    queue = RabbitMQQueueAdapter(amqp_url)
    await queue.connect()
    yield queue
    await queue.close()


async def claim_all(
    queue: RabbitMQQueueAdapter, channel: str, count: int, *, lease: float = 30
) -> list[Job]:
    jobs: list[Job] = []
    deadline = time.monotonic() + WAIT
    while len(jobs) < count and time.monotonic() < deadline:
        jobs += await queue.claim(channel, "w", count - len(jobs), lease, 0.5)
    return jobs


async def test_delayed_jobs_arrive_in_due_order_and_never_early(
    adapter: RabbitMQQueueAdapter, channel: str
) -> None:
    await adapter.subscribe(channel, "w", 1)
    sent = time.monotonic()
    for delay in (0.9, 0.05, 0.37, 0.0):
        await adapter.enqueue(new_job(channel, int(delay * 1000)), delay)
    assert (await adapter.stats(channel)).delayed == 3
    arrivals: list[tuple[object, float]] = []
    while len(arrivals) < 4:
        for job in await claim_all(adapter, channel, 1):
            arrivals.append((payload(job), time.monotonic() - sent))
            assert await adapter.ack([job]) == [True]
    assert [n for n, _ in arrivals] == [0, 50, 370, 900]
    assert all(elapsed >= n / 1000 - 0.01 for n, elapsed in arrivals), arrivals
    stats = await adapter.stats(channel)
    assert (stats.queued, stats.delayed, stats.running, stats.dead) == (0, 0, 0, 0)


async def test_a_retry_keeps_its_counters_through_the_delay_queues(
    adapter: RabbitMQQueueAdapter, channel: str
) -> None:
    await adapter.enqueue(new_job(channel, 1), 0)
    (job,) = await claim_all(adapter, channel, 1)
    job.attempt, job.failures, job.error = 1, 1, "ValueError: boom"
    assert await adapter.retry(job, 0.2)
    (again,) = await claim_all(adapter, channel, 1)
    assert (again.attempt, again.failures, again.recoveries) == (1, 1, 0)
    assert again.error == "ValueError: boom"
    assert again.enqueued_at == job.enqueued_at
    assert await adapter.ack([job, again]) == [False, True]


async def test_prefetch_is_the_concurrency(
    adapter: RabbitMQQueueAdapter, other: RabbitMQQueueAdapter, channel: str
) -> None:
    await adapter.subscribe(channel, "w", 2)
    for n in range(5):
        await adapter.enqueue(new_job(channel, n), 0)
    first = await claim_all(adapter, channel, 2)
    await asyncio.sleep(0.3)
    assert await adapter.claim(channel, "w", 5, 30, 0.3) == []
    assert [payload(job) for job in first] == [0, 1]
    assert (await other.stats(channel)).queued == 3
    assert await adapter.ack(first) == [True, True]
    assert [payload(job) for job in await claim_all(adapter, channel, 2)] == [2, 3]


async def test_unclaimed_deliveries_go_back_unchanged_on_unsubscribe(
    adapter: RabbitMQQueueAdapter, other: RabbitMQQueueAdapter, channel: str
) -> None:
    await adapter.subscribe(channel, "w", 3)
    for n in range(3):
        await adapter.enqueue(new_job(channel, n), 0)
    (running,) = await adapter.claim(channel, "w", 1, 30, WAIT)
    await wait_until(lambda: len(adapter._consumers[channel].buffer) == 2, WAIT)
    assert await adapter.ack([running]) == [True]
    await adapter.unsubscribe(channel, "w")
    rest = await claim_all(other, channel, 2)
    assert sorted(payload(job) for job in rest) == [1, 2]
    assert [(job.attempt, job.recoveries) for job in rest] == [(0, 0), (0, 0)]


async def test_a_worker_whose_connection_was_closed_cannot_acknowledge(
    adapter: RabbitMQQueueAdapter, other: RabbitMQQueueAdapter, channel: str
) -> None:
    consumer = unique("w")
    await adapter.enqueue(new_job(channel, 7), 0)
    (job,) = await adapter.claim(channel, consumer, 1, 30, WAIT)
    close_connection(f"accord queue consume {consumer}")
    (again,) = await claim_all(other, channel, 1)
    assert (again.attempt, again.recoveries) == (1, 1)
    assert await adapter.renew([job], 30) == [False]
    assert await adapter.ack([job]) == [False]
    assert await other.ack([again]) == [True]
    await other.unsubscribe(channel, "w")
    # The adapter consumes again on a new connection at its next claim.
    await adapter.enqueue(new_job(channel, 8), 0)
    (fresh,) = await claim_all(adapter, channel, 1)
    assert payload(fresh) == 8
    assert await adapter.ack([fresh]) == [True]


def close_connection(name: str) -> None:
    """Have the broker close the connection named `name` (as it does when heartbeats stop)."""
    ctl = shutil.which("rabbitmqctl") or "rabbitmqctl"
    listing = subprocess.run(
        [ctl, "list_connections", "-q", "--no-table-headers", "pid", "client_properties"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    pids = [line.split("\t")[0] for line in listing.splitlines() if f'"{name}"' in line]
    assert len(pids) == 1, listing
    subprocess.run([ctl, "close_connection", pids[0], "test"], check=True, capture_output=True)


async def test_a_chosen_job_id_is_published_once_while_pending_or_running(
    adapter: RabbitMQQueueAdapter, other: RabbitMQQueueAdapter, channel: str
) -> None:
    assert await adapter.enqueue(new_job(channel, 1, job_id="report-7"), 0)
    assert not await other.enqueue(new_job(channel, 2, job_id="report-7"), 0)
    (job,) = await claim_all(adapter, channel, 1)
    assert not await other.enqueue(new_job(channel, 3, job_id="report-7"), 0)
    job.failures, job.error = 1, "boom"
    assert await adapter.bury(job)
    assert await other.enqueue(new_job(channel, 4, job_id="report-7"), 0)
    with pytest.raises(QueueError, match="pending or running"):
        await adapter.requeue("report-7", channel)
    assert [dead.id for dead in await adapter.dead_letters(channel, 10)] == ["report-7"]
    (fresh,) = await claim_all(adapter, channel, 1)
    assert payload(fresh) == 4
    assert await adapter.ack([fresh]) == [True]
    assert await adapter.requeue("report-7", channel)
    assert (await adapter.stats(channel)).dead == 0
    (requeued,) = await claim_all(adapter, channel, 1)
    assert (payload(requeued), requeued.attempt, requeued.failures) == (1, 1, 0)


async def test_listing_dead_letters_leaves_them_in_order(
    adapter: RabbitMQQueueAdapter, channel: str
) -> None:
    for n in range(5):
        await adapter.enqueue(new_job(channel, n, job_id=f"d{n}"), 0)
    for job in await claim_all(adapter, channel, 5):
        job.failures, job.error = 1, f"failed {job.id}"
        assert await adapter.bury(job)
    first = await adapter.dead_letters(channel, 3)
    everything = await adapter.dead_letters(channel, 100)
    assert [job.id for job in first] == ["d0", "d1", "d2"]
    assert [job.id for job in everything] == ["d0", "d1", "d2", "d3", "d4"]
    assert everything[4].error == "failed d4"
    assert everything[4].failed_at is not None
    assert await adapter.purge(channel) == 5
    assert await adapter.dead_letters(channel, 100) == []


async def test_the_broker_dead_letters_a_job_past_the_delivery_limit(
    amqp_url: str, channel: str
) -> None:
    await RabbitMQQueueAdapter(amqp_url, delivery_limit=1).connect()
    for _ in range(2):
        crasher = RabbitMQQueueAdapter(amqp_url, delivery_limit=1)
        await crasher.connect()
        if _ == 0:
            await crasher.enqueue(new_job(channel, 9), 0)
        await claim_all(crasher, channel, 1)
        await crasher.abort()
    observer = RabbitMQQueueAdapter(amqp_url, delivery_limit=1)
    await observer.connect()
    try:
        await wait_until(lambda: _dead_count(observer, channel), WAIT)
        (dead,) = await observer.dead_letters(channel, 10)
    finally:
        await observer.close()
    assert payload(dead) == 9
    assert "RabbitMQ's limit" in (dead.error or "")
    assert dead.recoveries >= 2


async def _dead_count(queue: RabbitMQQueueAdapter, channel: str) -> bool:
    return (await queue.stats(channel)).dead == 1


async def test_a_message_due_later_than_it_arrives_is_delayed_again(
    adapter: RabbitMQQueueAdapter, amqp_url: str, channel: str
) -> None:
    await adapter.subscribe(channel, "w", 1)
    due = int(time.time() * 1000) + 600
    job = new_job(channel, 3)
    connection = await aiormq.connect(amqp_url)
    try:
        publisher = await connection.channel()
        headers = {"a": 0, "f": 0, "r": 0, "t": job.enqueued_at, "due": due}
        await publisher.basic_publish(
            job.body,
            routing_key=names_of(channel).work,
            properties=spec.Basic.Properties(message_id=job.id, headers=headers, delivery_mode=2),
        )
    finally:
        await connection.close()
    (arrived,) = await claim_all(adapter, channel, 1)
    assert time.time() * 1000 >= due - 60
    assert (arrived.id, arrived.attempt) == (job.id, 0)
    assert await adapter.ack([arrived]) == [True]


async def test_publishing_resumes_after_the_broker_closes_the_connection(
    amqp_url: str, channel: str
) -> None:
    name = unique("pub")
    queue = RabbitMQQueueAdapter(amqp_url)
    queue._links.open = _named(queue._links.open, name)  # type: ignore[method-assign]
    await queue.connect()
    try:
        assert await queue.enqueue(new_job(channel, 1), 0)
        close_connection(f"accord queue publish {name}")

        async def publishes() -> bool:
            try:
                return await queue.enqueue(new_job(channel, 2), 0)
            except AdapterError:
                return False

        await wait_until(publishes, WAIT)
        assert (await queue.stats(channel)).queued >= 2
    finally:
        await queue.close()


def _named(open_connection: Any, suffix: str) -> Any:
    """Give the adapter's publishing connection a name this test can find."""

    async def opened(role: str, heartbeat: int | None = None) -> Any:
        return await open_connection(f"{role} {suffix}", heartbeat)

    return opened


async def test_a_queue_made_with_other_arguments_is_reported_with_the_fix(
    amqp_url: str, channel: str
) -> None:
    first = RabbitMQQueueAdapter(amqp_url, delivery_limit=3)
    second = RabbitMQQueueAdapter(amqp_url, delivery_limit=4)
    await first.connect()
    await second.connect()
    try:
        await first.enqueue(new_job(channel), 0)
        with pytest.raises(AdapterError, match="delivery_limit"):
            await second.enqueue(new_job(channel), 0)
    finally:
        await first.close()
        await second.close()


async def test_channels_are_those_this_adapter_declared(
    adapter: RabbitMQQueueAdapter, other: RabbitMQQueueAdapter, channel: str
) -> None:
    app = channel.partition(":")[0] + ":"
    elsewhere = unique("app") + ":"
    await adapter.enqueue(new_job(channel), 0)
    await adapter.subscribe(app + "idle", "w", 1)
    await adapter.stats(app + "inspected")
    await adapter.enqueue(new_job(elsewhere + "jobs"), 0)
    assert sorted(await adapter.channels(app)) == [app + "idle", app + "inspected", channel]
    assert await adapter.channels(elsewhere) == [elsewhere + "jobs"]
    # The queues exist on the broker, but AMQP cannot list them for another adapter:
    # it knows a channel once it used it.
    assert await other.channels(app) == []
    assert (await other.stats(channel)).queued == 1
    assert await other.channels(app) == [channel]
    assert await other.channels(elsewhere) == []


def test_names_are_safe_routing_words_and_fit_the_broker_limits() -> None:
    odd = names_of("app:é.*#~ x")
    assert odd.work.startswith("accord.job.")
    base = odd.work.removeprefix("accord.job.")
    assert not set(base) & set(".*# ")
    assert names_of("app:é.*#~ x") != names_of("app:é.*#~ y")
    # What AMQP allows in a queue name (the client refuses anything else).
    assert re.fullmatch(r"[A-Za-z0-9_:.+-]*", odd.work), odd.work
    long = names_of("a" * 300 + "é" * 100)
    assert re.fullmatch(r"[A-Za-z0-9_:.+-]*", long.work), long.work
    longest = max(long.level(31), long.marker("k" * 500), long.dead, key=len)
    assert len(longest.encode()) <= 255
    assert len(long.delay_key(2**32 - 1).encode()) <= 255
    assert len(long.level_pattern(0).encode()) <= 255
