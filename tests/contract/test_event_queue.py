"""EventQueue contract, run on every queue adapter (add a param to QUEUE_PARAMS for a new one)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from accord import (
    Application,
    JobNotFound,
    Plugin,
    QueueError,
    SerializationError,
    Settings,
    StateError,
)
from accord.event_queue import JobContext
from accord.testing import cluster, stop_abruptly, wait_until
from servers import ON_POSTGRES, ON_RABBITMQ, ON_REDIS, delete_queue_keys, shared_queue_url

WAIT = 15.0

QUEUE_PARAMS = [pytest.param("memory", id="memory"), ON_REDIS, ON_POSTGRES, ON_RABBITMQ]

ClusterFactory = Callable[..., AbstractAsyncContextManager[list[Application]]]


@pytest.fixture(params=QUEUE_PARAMS)
async def queue_url(request: pytest.FixtureRequest, app_name: str) -> AsyncIterator[str]:
    """The URL of the queue adapter under test, isolated for this test."""
    if request.param == "memory":
        yield f"memory://{app_name}"
        return
    async with shared_queue_url(request, app_name) as url:
        yield url


@pytest.fixture
def make_cluster(queue_url: str, storage: Path, app_name: str) -> ClusterFactory:
    """`async with make_cluster(n, **settings) as apps:` on the adapter under test."""

    @asynccontextmanager
    async def make(
        n: int = 1, *, plugins: tuple[type[Plugin], ...] = (), **overrides: Any
    ) -> AsyncIterator[list[Application]]:
        settings = Settings(
            app_name=app_name,
            storage=str(storage),
            queue_url=queue_url,
            pubsub_url=f"memory://{app_name}",
            lock_url=f"memory://{app_name}",
            **overrides,
        )
        async with cluster(n, plugins=plugins, settings=settings) as apps:
            yield apps

    return make


class Recorder:
    """A `process` that records payloads, contexts and how many run at once."""

    def __init__(self, duration: float = 0.0, fail: bool = False) -> None:
        self.duration = duration
        self.fail = fail
        self.payloads: list[Any] = []
        self.contexts: list[JobContext] = []
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.cancelled = 0

    async def __call__(self, payload: Any, ctx: JobContext) -> None:
        self.payloads.append(payload)
        self.contexts.append(ctx)
        self.starts.append(time.monotonic())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.duration:
                await asyncio.sleep(self.duration)
            if self.fail:
                raise ValueError(f"failing on purpose: {payload!r}")
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
            self.ends.append(time.monotonic())

    def __repr__(self) -> str:
        return f"Recorder({self.payloads!r})"


async def settle(seconds: float = 0.5) -> None:
    """Let background work run when a test asserts that something does NOT happen."""
    await asyncio.sleep(seconds)


# Connection and subscription.


async def test_publish_before_start_or_after_stop_raises(make_cluster: ClusterFactory) -> None:
    async with make_cluster(1) as (app,):
        pass
    with pytest.raises(StateError):
        await app.event_queue.publish("jobs", {"n": 1})
    fresh = Application(settings=app.settings)
    with pytest.raises(StateError):
        await fresh.event_queue.publish("jobs", {"n": 1})
    assert not fresh.event_queue.is_connected()


async def test_subscribe_before_connect_in_load_and_after_start(
    make_cluster: ClusterFactory,
) -> None:
    early = Recorder()

    class Worker(Plugin):
        name = "worker"

        async def load(self) -> None:
            self.app.event_queue.subscribe("early", process=early)

    late = Recorder()
    async with make_cluster(1, plugins=(Worker,)) as (app,):
        assert app.event_queue.is_connected()
        app.event_queue.subscribe("late", process=late)
        await app.event_queue.publish("early", {"n": 1})
        await app.event_queue.publish("late", {"n": 2})
        await wait_until(lambda: early.payloads and late.payloads, WAIT)
    assert early.payloads == [{"n": 1}]
    assert late.payloads == [{"n": 2}]


async def test_publishing_needs_no_local_subscription(make_cluster: ClusterFactory) -> None:
    seen = Recorder()
    async with make_cluster(2) as (publisher, worker):
        worker.event_queue.subscribe("jobs", process=seen)
        job_id = await publisher.event_queue.publish("jobs", {"text": "é", "list": [1, 2.5, None]})
        await wait_until(lambda: seen.payloads, WAIT)
    assert seen.payloads == [{"text": "é", "list": [1, 2.5, None]}]
    assert seen.contexts[0].id == job_id
    assert seen.contexts[0].channel == "jobs"
    assert seen.contexts[0].retried == 0
    assert seen.contexts[0].options["max_retries"] == 0


async def test_second_subscription_is_ignored_with_a_warning(
    make_cluster: ClusterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = Recorder(), Recorder()
    async with make_cluster(1) as (app,):
        app.event_queue.subscribe("jobs", process=first)
        with caplog.at_level(logging.WARNING):
            app.event_queue.subscribe("jobs", process=second)
        await app.event_queue.publish("jobs", 1)
        await wait_until(lambda: first.payloads, WAIT)
    assert "already subscribed" in caplog.text
    assert second.payloads == []


async def test_payload_that_is_not_json_raises_at_publish(make_cluster: ClusterFactory) -> None:
    async with make_cluster(1) as (app,):
        with pytest.raises(SerializationError, match="jobs"):
            await app.event_queue.publish("jobs", {"when": object()})


async def test_bad_options_are_refused(make_cluster: ClusterFactory) -> None:
    async with make_cluster(1) as (app,):
        with pytest.raises(QueueError, match="max_retries"):
            await app.event_queue.publish("jobs", 1, max_retries=-1)
        with pytest.raises(QueueError, match="timeout"):
            await app.event_queue.publish("jobs", 1, timeout="soon")  # type: ignore[arg-type]
        with pytest.raises(QueueError, match="job_id"):
            await app.event_queue.publish("jobs", 1, job_id="")
        with pytest.raises(QueueError, match="concurrency"):
            app.event_queue.subscribe("jobs", process=Recorder(), concurrency="2")  # type: ignore[arg-type]
        with pytest.raises(QueueError, match="channel"):
            await app.event_queue.publish("", 1)
        assert (await app.event_queue.stats("jobs")).queued == 0


async def test_unsubscribe_stops_claiming(make_cluster: ClusterFactory) -> None:
    seen = Recorder()
    async with make_cluster(1) as (app,):
        app.event_queue.subscribe("jobs", process=seen)
        await app.event_queue.publish("jobs", 1)
        await wait_until(lambda: seen.payloads, WAIT)
        await app.event_queue.unsubscribe("jobs")
        await app.event_queue.publish("jobs", 2)
        await settle()
        assert seen.payloads == [1]
        assert (await app.event_queue.stats("jobs")).queued == 1


# Back-pressure, concurrency and order.


async def test_idle_false_claims_nothing(make_cluster: ClusterFactory) -> None:
    seen = Recorder()
    ready = False
    async with make_cluster(1) as (app,):
        app.event_queue.subscribe("jobs", process=seen, idle=lambda: ready, interval=0.05)
        await app.event_queue.publish("jobs", 1)
        await settle()
        assert seen.payloads == []
        stats = await app.event_queue.stats("jobs")
        assert (stats.queued, stats.running) == (1, 0)
        ready = True
        await wait_until(lambda: seen.payloads == [1], WAIT)


async def test_concurrency_one_is_fifo(make_cluster: ClusterFactory) -> None:
    seen = Recorder()
    async with make_cluster(1) as (app,):
        for n in range(20):
            await app.event_queue.publish("jobs", n)
        app.event_queue.subscribe("jobs", process=seen)
        await wait_until(lambda: len(seen.payloads) == 20, WAIT)
    assert seen.payloads == list(range(20))
    assert seen.max_in_flight == 1


async def test_concurrency_two_caps_jobs_in_flight(make_cluster: ClusterFactory) -> None:
    seen = Recorder(duration=0.5)
    async with make_cluster(1) as (app,):
        for n in range(5):
            await app.event_queue.publish("jobs", n)
        started = time.monotonic()
        app.event_queue.subscribe("jobs", process=seen, concurrency=2)
        await wait_until(lambda: len(seen.ends) == 5, WAIT)
        elapsed = time.monotonic() - started
    assert seen.max_in_flight == 2
    # Three waves of 0.5 s: the cap holds (never less), and no poll is waited for.
    assert 1.45 <= elapsed < 4.0, elapsed


async def test_concurrency_zero_or_less_runs_all_at_once(make_cluster: ClusterFactory) -> None:
    seen = Recorder(duration=0.5)
    async with make_cluster(1) as (app,):
        for n in range(5):
            await app.event_queue.publish("jobs", n)
        app.event_queue.subscribe("jobs", process=seen, concurrency=0)
        await wait_until(lambda: len(seen.ends) == 5, WAIT)
    assert seen.max_in_flight == 5


async def test_next_job_starts_when_a_slot_frees_not_at_the_next_poll(
    make_cluster: ClusterFactory,
) -> None:
    seen = Recorder(duration=0.3)
    async with make_cluster(1) as (app,):
        app.event_queue.subscribe("jobs", process=seen, interval=30)
        await app.event_queue.publish("jobs", 1)
        await app.event_queue.publish("jobs", 2)
        await wait_until(lambda: len(seen.ends) == 2, WAIT)
        # A publish wakes a waiting consumer too.
        await settle(0.2)
        sent = time.monotonic()
        await app.event_queue.publish("jobs", 3)
        await wait_until(lambda: len(seen.starts) == 3, WAIT)
    # The poll interval is 30 s (capped at 1 s per claim); both gaps are far below it.
    assert seen.starts[1] - seen.ends[0] < 0.5
    assert seen.starts[2] - sent < 0.5


async def test_jobs_spread_across_instances(make_cluster: ClusterFactory) -> None:
    recorders = [Recorder(duration=0.05) for _ in range(3)]
    async with make_cluster(3) as apps:
        for app, recorder in zip(apps, recorders, strict=True):
            app.event_queue.subscribe("jobs", process=recorder)
        for n in range(30):
            await apps[0].event_queue.publish("jobs", n)
        await wait_until(lambda: sum(len(r.ends) for r in recorders) == 30, WAIT)
    done = sorted(p for r in recorders for p in r.payloads)
    assert done == list(range(30))
    assert all(r.payloads for r in recorders), [len(r.payloads) for r in recorders]


async def test_shared_channel_is_not_prefixed_with_the_app_name(
    queue_url: str, storage: Path, app_name: str
) -> None:
    seen = Recorder()
    base = Settings(storage=str(storage), queue_url=queue_url, lock_url=f"memory://{app_name}")
    channel = f"{app_name}-shared"
    async with (
        cluster(1, settings=base.replace(app_name=f"{app_name}a")) as (one,),
        cluster(1, settings=base.replace(app_name=f"{app_name}b")) as (two,),
    ):
        two.event_queue.subscribe(channel, process=seen, shared=True)
        await one.event_queue.publish(channel, "private")
        await one.event_queue.publish(channel, "shared", shared=True)
        await wait_until(lambda: seen.payloads, WAIT)
        await settle(0.3)
        assert seen.payloads == ["shared"]
        assert (await one.event_queue.stats(channel)).queued == 1
    if queue_url.startswith("redis"):
        for name in (f"{app_name}a", f"{app_name}b", channel):
            await delete_queue_keys(queue_url, name)


# Listing channels.


async def test_channels_lists_channels_with_delayed_or_dead_jobs(
    make_cluster: ClusterFactory,
) -> None:
    doomed = Recorder(fail=True)
    async with make_cluster(1) as (app,):
        assert await app.event_queue.channels() == []
        await app.event_queue.publish("later", "soon", delay=60)
        app.event_queue.subscribe("failing", process=doomed, interval=0.05)
        await app.event_queue.publish("failing", "poison")
        await wait_until(lambda: app.event_queue.counters.get("dead") == 1, WAIT)
        await app.event_queue.unsubscribe("failing")
        listed = await app.event_queue.channels()
        later = await app.event_queue.stats(listed[1])
        failing = await app.event_queue.stats(listed[0])
    assert listed == ["failing", "later"]
    assert (later.queued, later.delayed, later.running, later.dead) == (0, 1, 0, 0)
    assert (failing.queued, failing.delayed, failing.running, failing.dead) == (0, 0, 0, 1)
    with pytest.raises(StateError):
        await app.event_queue.channels()


async def test_channels_of_other_apps_and_shared_channels_are_not_listed(
    queue_url: str, storage: Path, app_name: str
) -> None:
    base = Settings(storage=str(storage), queue_url=queue_url, lock_url=f"memory://{app_name}")
    # The other app's name extends this one's: only whole app names match.
    async with (
        cluster(1, settings=base.replace(app_name=app_name)) as (app,),
        cluster(1, settings=base.replace(app_name=f"{app_name}b")) as (other,),
    ):
        await app.event_queue.publish("mine", 1, delay=60)
        await other.event_queue.publish("theirs", 2, delay=60)
        await other.event_queue.publish("mine-too", 3, delay=60)
        # Shared names, one of them spelled like a channel of this app.
        await app.event_queue.publish(f"{app_name}-shared", 4, delay=60, shared=True)
        await app.event_queue.publish(f"{app_name}:lookalike", 5, delay=60, shared=True)
        assert (await app.event_queue.stats(f"{app_name}:lookalike", shared=True)).delayed == 1
        assert await app.event_queue.channels() == ["mine"]
        assert await other.event_queue.channels() == ["mine-too", "theirs"]


async def test_channel_names_with_separators_and_glob_characters_round_trip(
    make_cluster: ClusterFactory,
) -> None:
    names = ["a:b", "a", "b", "*", "x*y?", "[z]", "back\\slash:", ":", "\\:\\"]
    async with make_cluster(1) as (app,):
        for n, name in enumerate(names):
            await app.event_queue.publish(name, n, delay=60)
        listed = await app.event_queue.channels()
        delayed = [(await app.event_queue.stats(name)).delayed for name in listed]
    assert listed == sorted(names)
    assert delayed == [1] * len(names)


async def test_channels_seen_by_another_instance(
    make_cluster: ClusterFactory, queue_url: str
) -> None:
    async with make_cluster(2) as (publisher, observer):
        await publisher.event_queue.publish("jobs", 1, delay=60)
        observer.event_queue.subscribe("idle", process=Recorder())
        await wait_until(lambda: all(c.subscribed for c in observer.event_queue.consumers), WAIT)
        seen = await observer.event_queue.channels()
    if queue_url.startswith("amqp"):
        # AMQP cannot list queues: an instance lists what it declared itself.
        assert seen == ["idle"]
    elif queue_url.startswith("redis"):
        # A subscription leaves the channel's stream and consumer group.
        assert seen == ["idle", "jobs"]
    else:
        # Only jobs make a channel exist here.
        assert seen == ["jobs"]


# Scheduling and idempotency.


async def test_delay_defers_a_job(make_cluster: ClusterFactory) -> None:
    seen = Recorder()
    async with make_cluster(1) as (app,):
        app.event_queue.subscribe("jobs", process=seen, interval=0.05)
        sent = time.monotonic()
        await app.event_queue.publish("jobs", "later", delay=0.8)
        await app.event_queue.publish("jobs", "now")
        await wait_until(lambda: len(seen.payloads) == 2, WAIT)
        assert (await app.event_queue.stats("jobs")).delayed == 0
    assert seen.payloads == ["now", "later"]
    assert seen.starts[1] - sent >= 0.75


# Any id a caller chooses is checked, including one shaped like the ids publish draws.
@pytest.mark.parametrize("key", ["report-7", uuid.uuid4().hex], ids=["plain", "uuid-hex"])
async def test_job_id_makes_publish_idempotent_while_pending(
    make_cluster: ClusterFactory, key: str
) -> None:
    seen = Recorder(duration=0.3)
    async with make_cluster(1) as (app,):
        first = await app.event_queue.publish("jobs", 1, job_id=key)
        second = await app.event_queue.publish("jobs", 2, job_id=key)
        assert first == second == key
        app.event_queue.subscribe("jobs", process=seen)
        await wait_until(lambda: len(seen.starts) == 1, WAIT)
        await app.event_queue.publish("jobs", 3, job_id=key)  # running: still a no-op
        await wait_until(lambda: len(seen.ends) == 1, WAIT)
        await settle(0.5)
        assert seen.payloads == [1]
        await app.event_queue.publish("jobs", 4, job_id=key)  # done: a new job
        await wait_until(lambda: len(seen.ends) == 2, WAIT)
    assert seen.payloads == [1, 4]


# Failures, timeouts, dead letters.


async def test_failing_job_runs_max_retries_plus_one_times_then_is_dead(
    make_cluster: ClusterFactory,
) -> None:
    seen = Recorder(fail=True)
    async with make_cluster(1) as (app,):
        app.event_queue.subscribe("jobs", process=seen, interval=0.05)
        job_id = await app.event_queue.publish("jobs", {"n": 1}, max_retries=3, backoff=0.05)
        await wait_until(lambda: len(seen.ends) == 4, WAIT)
        await wait_until(lambda: app.event_queue.counters.get("dead") == 1, WAIT)
        await settle(0.5)
        assert len(seen.payloads) == 4
        assert [ctx.retried for ctx in seen.contexts] == [0, 1, 2, 3]
        dead = await app.event_queue.dead_letters("jobs")
        stats = await app.event_queue.stats("jobs")
    assert [d.id for d in dead] == [job_id]
    assert dead[0].payload == {"n": 1}
    assert dead[0].failures == 4
    assert dead[0].retried == 3
    assert "failing on purpose" in (dead[0].error or "")
    assert (stats.queued, stats.delayed, stats.running, stats.dead) == (0, 0, 0, 1)


async def test_retries_back_off_exponentially(make_cluster: ClusterFactory) -> None:
    seen = Recorder(fail=True)
    async with make_cluster(1) as (app,):
        app.event_queue.subscribe("jobs", process=seen, interval=0.05)
        await app.event_queue.publish("jobs", 1, max_retries=2, backoff=0.4)
        await wait_until(lambda: len(seen.starts) == 3, WAIT)
    first_gap = seen.starts[1] - seen.ends[0]
    second_gap = seen.starts[2] - seen.ends[1]
    # Jitter keeps each wait within [50 %, 100 %] of 0.4 s, then of 0.8 s.
    assert first_gap >= 0.19
    assert second_gap >= 0.39


async def test_timeout_cancels_the_job_and_counts_as_a_failure(
    make_cluster: ClusterFactory,
) -> None:
    seen = Recorder(duration=10)
    async with make_cluster(1) as (app,):
        app.event_queue.subscribe("jobs", process=seen, interval=0.05)
        job_id = await app.event_queue.publish(
            "jobs", "slow", timeout=0.5, max_retries=1, backoff=0.05
        )
        await wait_until(lambda: app.event_queue.counters.get("dead") == 1, WAIT)
        dead = await app.event_queue.dead_letters("jobs")
    assert len(seen.starts) == 2
    assert seen.cancelled == 2
    assert all(ctx.signal.is_set() for ctx in seen.contexts)
    assert [d.id for d in dead] == [job_id]
    assert "timed out" in (dead[0].error or "")
    assert all(end - start < 5 for start, end in zip(seen.starts, seen.ends, strict=True))


async def test_requeue_and_purge_dead_letters(make_cluster: ClusterFactory) -> None:
    attempts: list[Any] = []

    async def flaky(payload: Any, ctx: JobContext) -> None:
        attempts.append((payload, ctx.retried))
        if len(attempts) <= 2:
            raise RuntimeError("not yet")

    async with make_cluster(1) as (app,):
        app.event_queue.subscribe("jobs", process=flaky, interval=0.05)
        first = await app.event_queue.publish("jobs", "a")
        second = await app.event_queue.publish("jobs", "b")
        await wait_until(lambda: app.event_queue.counters.get("dead") == 2, WAIT)
        assert {d.id for d in await app.event_queue.dead_letters("jobs")} == {first, second}
        await app.event_queue.requeue(first)
        await wait_until(lambda: len(attempts) == 3, WAIT)
        assert attempts[2] == ("a", 1)
        with pytest.raises(JobNotFound):
            await app.event_queue.requeue(first)
        assert await app.event_queue.purge("jobs") == 1
        assert await app.event_queue.dead_letters("jobs") == []
        with pytest.raises(JobNotFound):
            await app.event_queue.requeue(second, channel="jobs")
        assert app.event_queue.counters.get("completed") == 1


# Transactions.


async def test_publish_in_a_transaction_waits_for_commit(make_cluster: ClusterFactory) -> None:
    seen = Recorder()
    async with make_cluster(2) as (publisher, worker):
        worker.event_queue.subscribe("jobs", process=seen)
        async with publisher.db.transaction() as tx:
            job_id = await publisher.event_queue.publish("jobs", "committed", transaction=tx)
            await settle(0.3)
            assert seen.payloads == []
        await wait_until(lambda: seen.payloads == ["committed"], WAIT)
        assert seen.contexts[0].id == job_id
        with pytest.raises(RuntimeError):
            async with publisher.db.transaction() as tx:
                await publisher.event_queue.publish("jobs", "rolled back", transaction=tx)
                raise RuntimeError("roll back")
        await settle()
        assert seen.payloads == ["committed"]
        stats = await worker.event_queue.stats("jobs")
        assert (stats.queued, stats.delayed, stats.running) == (0, 0, 0)


# Stopping and crashing.


async def test_graceful_close_waits_for_the_job_in_flight(make_cluster: ClusterFactory) -> None:
    seen = Recorder(duration=1.0)
    async with make_cluster(2) as (worker, observer):
        worker.event_queue.subscribe("jobs", process=seen)
        await observer.event_queue.publish("jobs", 1)
        await wait_until(lambda: seen.starts, WAIT)
        await worker.stop()
        assert len(seen.ends) == 1
        assert seen.cancelled == 0
        stats = await observer.event_queue.stats("jobs")
        assert (stats.queued, stats.running) == (0, 0)


async def test_close_releases_jobs_that_outlive_the_grace(make_cluster: ClusterFactory) -> None:
    slow = Recorder(duration=30)
    quick = Recorder()
    async with make_cluster(2, stop_grace=0.3) as (worker, survivor):
        worker.event_queue.subscribe("jobs", process=slow)
        await survivor.event_queue.publish("jobs", "long")
        await wait_until(lambda: slow.starts, WAIT)
        survivor.event_queue.subscribe("jobs", process=quick)
        await worker.stop()
        assert slow.cancelled == 1
        assert slow.contexts[0].signal.is_set()
        await wait_until(lambda: quick.payloads == ["long"], WAIT)
    assert quick.contexts[0].retried == 1


async def test_jobs_of_a_crashed_instance_are_redelivered_after_the_lease(
    make_cluster: ClusterFactory,
) -> None:
    doomed = Recorder(duration=30)
    rescue = Recorder()
    async with make_cluster(2, queue_lease=1.0, queue_check_interval=0.2) as (victim, survivor):
        victim.event_queue.subscribe("jobs", process=doomed, concurrency=2)
        await survivor.event_queue.publish("jobs", "a")
        await survivor.event_queue.publish("jobs", "b")
        await wait_until(lambda: len(doomed.starts) == 2, WAIT)
        survivor.event_queue.subscribe("jobs", process=rescue, concurrency=2)
        await settle(0.2)
        assert rescue.payloads == []
        await stop_abruptly(victim)
        await wait_until(lambda: len(rescue.payloads) == 2, WAIT)
        await wait_until(lambda: survivor.event_queue.counters.get("completed") == 2, WAIT)
    assert sorted(rescue.payloads) == ["a", "b"]
    assert [ctx.retried for ctx in rescue.contexts] == [1, 1]


async def test_leases_are_renewed_while_a_long_job_runs(make_cluster: ClusterFactory) -> None:
    # A job several leases long; the lease stays above 1 s so that a busy CI
    # machine does not miss the RabbitMQ heartbeats that stand for it.
    seen = Recorder(duration=3.5)
    async with make_cluster(2, queue_lease=1.2, queue_check_interval=0.1) as apps:
        for app in apps:
            app.event_queue.subscribe("jobs", process=seen, concurrency=2)
        await apps[0].event_queue.publish("jobs", "long", timeout=10)
        await wait_until(lambda: seen.ends, WAIT)
        await settle(0.5)
    assert len(seen.starts) == 1
    assert sum(app.event_queue.counters.get("completed", 0) for app in apps) == 1


async def test_a_job_that_keeps_killing_its_worker_is_dead_lettered(
    make_cluster: ClusterFactory,
) -> None:
    runs: list[int] = []
    async with make_cluster(3, queue_lease=0.6, queue_check_interval=0.1) as apps:
        tasks: list[asyncio.Task[None]] = []

        def killer(app: Application) -> Callable[[Any, JobContext], Any]:
            async def process(payload: Any, ctx: JobContext) -> None:
                runs.append(ctx.retried)
                tasks.append(asyncio.create_task(stop_abruptly(app)))
                await asyncio.sleep(30)

            return process

        for app in apps:
            app.event_queue.subscribe("jobs", process=killer(app))
        job_id = await apps[0].event_queue.publish("jobs", "poison", max_recoveries=1)
        await wait_until(lambda: len(runs) == 2, WAIT)
        survivor = await _survivor(apps)
        await wait_until(lambda: survivor.event_queue.counters.get("dead") == 1, WAIT)
        dead = await survivor.event_queue.dead_letters("jobs")
        await asyncio.gather(*tasks)
    assert runs == [0, 1]
    assert [d.id for d in dead] == [job_id]
    assert "died" in (dead[0].error or "")


async def _survivor(apps: list[Application]) -> Application:
    await wait_until(lambda: sum(app.event_queue.is_connected() for app in apps) == 1, WAIT)
    return next(app for app in apps if app.event_queue.is_connected())


# The memory adapter keeps what is queued across a graceful restart.


async def test_memory_queue_saves_and_reloads_queued_jobs(storage: Path, app_name: str) -> None:
    settings = Settings(app_name=app_name, storage=str(storage), queue_url=f"memory://{app_name}")
    seen = Recorder()
    async with cluster(2, settings=settings) as (one, two):
        await one.event_queue.publish("jobs", 1)
        await two.event_queue.publish("jobs", 2, delay=0.3)
        await one.event_queue.publish("jobs", 3, job_id="three")
    assert list((storage / "event_queue").glob("*.json"))
    async with cluster(1, settings=settings) as (app,):
        assert await app.event_queue.publish("jobs", 4, job_id="three") == "three"
        app.event_queue.subscribe("jobs", process=seen)
        await wait_until(lambda: len(seen.payloads) == 3, WAIT)
        await settle(0.3)
    assert sorted(seen.payloads) == [1, 2, 3]
    assert not list((storage / "event_queue").glob("*.json"))


async def test_memory_queue_does_not_save_after_a_crash(storage: Path, app_name: str) -> None:
    settings = Settings(app_name=app_name, storage=str(storage), queue_url=f"memory://{app_name}")
    async with cluster(1, settings=settings) as (app,):
        await app.event_queue.publish("jobs", 1)
        await stop_abruptly(app)
    assert not list((storage / "event_queue").glob("*.json"))
