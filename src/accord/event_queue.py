"""EventQueue: durable jobs run once somewhere in the cluster, and the QueueAdapter protocol."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import _keys
from ._codec import encode
from ._queue_outbox import publish_in_transaction, register_outbox
from ._queue_types import (
    DEFAULT_BACKOFF,
    DEFAULT_BACKOFF_MAX,
    DEFAULT_INTERVAL,
    DEFAULT_MAX_RECOVERIES,
    DEFAULT_TIMEOUT,
    DeadLetter,
    IdleFunc,
    Job,
    JobContext,
    ProcessFunc,
    QueueState,
    QueueStats,
    check_options,
    check_subscription,
    dead_letter,
    new_job_id,
)
from ._registry import load_adapter
from .exceptions import JobNotFound, QueueError, StateError

if TYPE_CHECKING:
    from ._queue_consumer import Consumer
    from ._queue_runtime import Runtime
    from .app import Application
    from .db import Transaction

__all__ = [
    "ADAPTERS",
    "DeadLetter",
    "EventQueue",
    "Job",
    "JobContext",
    "QueueAdapter",
    "QueueStats",
]

#: scheme -> "module:attribute" of the adapter class, imported on first use.
ADAPTERS: dict[str, str] = {
    "memory": "accord.adapters.memory.queue:MemoryQueueAdapter",
    "redis": "accord.adapters.redis.queue:RedisQueueAdapter",
    "rediss": "accord.adapters.redis.queue:RedisQueueAdapter",
    "postgresql": "accord.adapters.postgres.queue:PostgresQueueAdapter",
    "postgres": "accord.adapters.postgres.queue:PostgresQueueAdapter",
    "amqp": "accord.adapters.rabbitmq.queue:RabbitMQQueueAdapter",
    "amqps": "accord.adapters.rabbitmq.queue:RabbitMQQueueAdapter",
}


class QueueAdapter(Protocol):
    """I/O of one queue engine; `EventQueue` owns the meaning (loops, caps, timeouts, retries).

    Adapter classes are built as `cls(url, storage=Path)` (`storage` is the
    application's storage folder) with no I/O in `__init__`. Every `channel`
    is a full channel name. Every method may raise `AdapterError`.

    Optional: `async def enqueue_in_transaction(self, transaction, job, delay) -> bool | None`
    writes the job in an application database transaction; None when it
    cannot (then the manager uses the outbox).
    """

    async def connect(self) -> None:
        """Open connections; raise `AdapterUnavailable` if the engine cannot be reached."""

    async def close(self) -> None:
        """Close connections; jobs stay in the engine (the memory adapter saves them)."""

    async def abort(self) -> None:
        """Drop connections as a crash would: no ack, no release, no save."""

    async def subscribe(self, channel: str, consumer: str, concurrency: int) -> None:
        """This instance (`consumer`) will claim from `channel`, at most `concurrency` at once (≤ 0: no cap)."""

    async def unsubscribe(self, channel: str, consumer: str) -> None:
        """This instance stops claiming from `channel`; its jobs were acked or released already."""

    async def enqueue(self, job: Job, delay: float) -> bool:
        """Store a new job, due after `delay` seconds; False (and no change) if `job.id` is pending or running."""

    async def claim(
        self, channel: str, consumer: str, count: int, lease: float, wait: float
    ) -> list[Job]:
        """Lease up to `count` due jobs, oldest due first, for `lease` seconds; [] if none.

        With none due, first wait up to `wait` seconds, returning as soon as one arrives.
        """

    async def ack(self, jobs: Sequence[Job]) -> list[bool]:
        """Delete finished jobs; per job, False if its lease was lost (the job is not touched)."""

    async def renew(self, jobs: Sequence[Job], lease: float) -> list[bool]:
        """Extend the leases to `lease` seconds from now; per job, False if the lease was lost."""

    async def retry(self, job: Job, delay: float) -> bool:
        """Put a failed job back, due after `delay` seconds; False if the lease was lost."""

    async def release(self, jobs: Sequence[Job]) -> None:
        """Put unfinished jobs back, due now (a stop); jobs whose lease was lost are skipped."""

    async def bury(self, job: Job) -> bool:
        """Move a job to the channel's dead letters; False if the lease was lost."""

    async def recover(self, channel: str, lease: float) -> int:
        """Put back the jobs of `channel` whose `lease` expired, `attempt` and `recoveries` + 1; count."""

    async def dead_letters(self, channel: str, limit: int) -> list[Job]:
        """Up to `limit` dead jobs of `channel`, oldest first."""

    async def requeue(self, job_id: str, channel: str | None) -> bool:
        """Put a dead job back, due now: failures and recoveries reset, attempt + 1.

        With `channel` None, look for the id in every channel. False if no such
        dead job; `QueueError` if a job with that id is pending or running.
        """

    async def purge(self, channel: str) -> int:
        """Delete the dead letters of `channel`; returns how many."""

    async def stats(self, channel: str) -> QueueStats:
        """Counts of queued, delayed, running and dead jobs of `channel`."""

    async def channels(self, prefix: str = "") -> list[str]:
        """The channels whose names start with `prefix` ("": all) that exist in the engine.

        A channel exists while it has jobs queued, delayed, running or dead,
        or while the engine keeps something declared for it (a consumer
        group, a queue). Any order; no duplicates. An engine that cannot
        list what it holds returns what this instance has declared, and says
        so in its docstring.
        """


class EventQueue:
    """Jobs published anywhere in the cluster and run once, on any subscribed instance.

    Built by the application as `app.event_queue`; see DESIGN.md section 6.

    Args:
        app: the application this queue belongs to.
    """

    def __init__(self, app: Application) -> None:
        self.app = app
        self.state = QueueState.NEW
        self._adapter: QueueAdapter | None = None
        self._consumers: dict[str, Consumer] = {}
        self._runtime: Runtime | None = None
        register_outbox(self)

    def __repr__(self) -> str:
        return f"<EventQueue {self.app.name!r} {self.state.value}>"

    def use_adapter(self, adapter: QueueAdapter) -> None:
        """Use a ready adapter instance instead of the one `queue_url` names (before `connect`)."""
        if self.state is not QueueState.NEW:
            raise StateError("use_adapter: the event queue is already connected")
        self._adapter = adapter

    @property
    def adapter(self) -> QueueAdapter:
        if self._adapter is None:
            raise StateError("the event queue has no adapter yet; it is created on connect")
        return self._adapter

    def channel_name(self, channel: str, *, shared: bool = False) -> str:
        """The full channel name: prefixed with the app name unless `shared`."""
        if not isinstance(channel, str) or not channel:
            raise QueueError(f"a channel name must be a non-empty string, got {channel!r}")
        return _keys.escape(channel) if shared else _keys.join(self.app.name, channel)

    @property
    def counters(self) -> dict[str, int]:
        """What this instance did since it started: claimed, completed, failed, retried, dead, ..."""
        return dict(self._runtime.counters) if self._runtime is not None else {}

    def is_connected(self) -> bool:
        """Whether jobs can be published (between connect and the end of close)."""
        return self.state in (QueueState.CONNECTED, QueueState.RUNNING, QueueState.CLOSING)

    def subscribe(
        self,
        channel: str,
        *,
        process: ProcessFunc,
        idle: IdleFunc | None = None,
        concurrency: int = 1,
        interval: float = DEFAULT_INTERVAL,
        shared: bool = False,
    ) -> None:
        """Run `process(payload, ctx)` for jobs of `channel` on this instance.

        One consumer per channel per instance: a second `subscribe` of the
        same channel is ignored with a warning. Consumers begin after the
        plugins' `after_start` (or at once when subscribing later).

        Args:
            channel: the channel name.
            process: async callable `(payload, ctx: JobContext)`; returning acknowledges the job.
            idle: back-pressure hook; no job is claimed while it returns False. Default: always.
            concurrency: jobs in flight on this instance at most; ≤ 0 for no cap. Default 1.
            interval: seconds between polls when the adapter cannot push. Default 0.25.
            shared: do not prefix the channel with the app name. Default False.

        Example:
            app.event_queue.subscribe("tasks", process=run_task, concurrency=3)
        """
        from ._queue_consumer import Consumer

        name = self.channel_name(channel, shared=shared)
        if name in self._consumers:
            self.app.log.warning(
                "queue %s: already subscribed on this instance; second subscription ignored",
                channel,
            )
            return
        check_subscription(channel, process, concurrency, interval)
        consumer = Consumer(self, name, channel, process, idle, concurrency, interval)
        self._consumers[name] = consumer
        if self.state is QueueState.RUNNING:
            self.runtime.spawn(self.runtime.start_consumer(consumer), f"subscribe {channel}")

    async def unsubscribe(self, channel: str, *, shared: bool = False) -> None:
        """Stop consuming `channel` here: wait for in-flight jobs (stop grace), release the rest.

        Args:
            channel: the channel name given to `subscribe`.
            shared: as given to `subscribe`.
        """
        name = self.channel_name(channel, shared=shared)
        consumer = self._consumers.pop(name, None)
        if consumer is None:
            return
        await consumer.stop(self.app.settings.stop_grace)
        if self._adapter is not None and consumer.subscribed:
            await self._adapter.unsubscribe(name, self.app.instance_id)

    async def publish(
        self,
        channel: str,
        payload: Any,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = 0,
        delay: float = 0,
        job_id: str | None = None,
        transaction: Transaction | None = None,
        backoff: float = DEFAULT_BACKOFF,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        max_recoveries: int = DEFAULT_MAX_RECOVERIES,
        shared: bool = False,
    ) -> str:
        """Queue a job on `channel`; returns its id. No local subscription is needed.

        Args:
            channel: the channel name.
            payload: JSON-compatible data given to `process`.
            timeout: seconds a run may take before it is cancelled (a failure); ≤ 0 for none.
                Default 15.
            max_retries: failed runs retried before the job is dead-lettered. Default 0.
            delay: seconds before the job is due. Default 0.
            job_id: a job id; publishing is a no-op while a job with that id is pending
                or running. Default: a new random id.
            transaction: queue the job only if this database transaction commits.
            backoff: seconds before the first retry; doubles each retry, with jitter. Default 1.
            backoff_max: the longest wait between retries. Default 300.
            max_recoveries: deliveries whose worker died before the job is dead-lettered.
                Default 5.
            shared: do not prefix the channel with the app name. Default False.

        Example:
            await app.event_queue.publish("tasks", {"id": 7}, timeout=60, max_retries=3)
        """
        name = self.channel_name(channel, shared=shared)
        options = check_options(
            channel, timeout, max_retries, delay, backoff, backoff_max, max_recoveries
        )
        keyed = job_id is not None
        job_id = new_job_id(channel, job_id)
        body = encode({"payload": payload, "options": options}, what=f"job payload on {channel!r}")
        if transaction is not None:
            await publish_in_transaction(self, transaction, name, job_id, body, delay)
            return job_id
        self._require_connected(f"publish to {channel!r}")
        job = Job(id=job_id, channel=name, body=body, enqueued_at=time.time(), keyed=keyed)
        if not await self.adapter.enqueue(job, delay):
            self.app.log.debug("queue %s: job %s is already pending; publish ignored", name, job_id)
        return job_id

    # Dead letters and inspection.

    async def dead_letters(
        self, channel: str, *, limit: int = 100, shared: bool = False
    ) -> list[DeadLetter]:
        """The dead letters of `channel`, oldest first.

        Args:
            channel: the channel name.
            limit: how many at most. Default 100.
            shared: as given to `publish`.
        """
        self._require_connected("dead_letters")
        jobs = await self.adapter.dead_letters(self.channel_name(channel, shared=shared), limit)
        return [dead_letter(job, channel) for job in jobs]

    async def requeue(
        self, job_id: str, *, channel: str | None = None, shared: bool = False
    ) -> None:
        """Queue a dead job again, with its retries and crash count reset.

        Args:
            job_id: the dead job's id.
            channel: its channel; needed only when two channels hold dead jobs with this id.
            shared: as given to `publish`.
        """
        self._require_connected("requeue")
        name = self.channel_name(channel, shared=shared) if channel is not None else None
        if not await self.adapter.requeue(job_id, name):
            raise JobNotFound(f"no dead job {job_id!r}" + (f" on {channel!r}" if channel else ""))

    async def purge(self, channel: str, *, shared: bool = False) -> int:
        """Delete the dead letters of `channel`; returns how many were deleted."""
        self._require_connected("purge")
        return await self.adapter.purge(self.channel_name(channel, shared=shared))

    async def stats(self, channel: str, *, shared: bool = False) -> QueueStats:
        """Counts of queued, delayed, running and dead jobs of `channel` (cluster-wide)."""
        self._require_connected("stats")
        return await self.adapter.stats(self.channel_name(channel, shared=shared))

    async def channels(self) -> list[str]:
        """The names of this application's channels that exist in the queue engine, sorted.

        A channel exists while it has jobs queued, delayed, running or dead,
        or while the engine keeps a consumer group or queue for it (Redis
        keeps a channel's stream once it was subscribed to). The names are
        the ones `publish` and `stats` take, so each can be passed to
        `stats()` as is.

        Channels published or subscribed with `shared=True` are never
        listed: their names carry no application prefix, so they are in no
        application's namespace (ask for them by name, with `shared=True`).

        On RabbitMQ, which cannot list queues over AMQP, only the channels
        this instance has declared since it connected are listed: those it
        published to, subscribed to, or inspected.

        Example:
            for channel in await app.event_queue.channels():
                print(channel, await app.event_queue.stats(channel))
        """
        self._require_connected("channels")
        prefix = _keys.join(self.app.name, "")
        found = set()
        for name in await self.adapter.channels(prefix):
            if name.startswith(prefix):
                channel = _keys.unescape(name[len(prefix) :])
                if channel:
                    found.add(channel)
        return sorted(found)

    # Lifecycle, driven by the application.

    async def connect(self) -> None:
        """Create and connect the adapter `queue_url` names."""
        if self.state is not QueueState.NEW:
            raise StateError(f"event queue is {self.state.value}; it connects once")
        settings = self.app.settings
        if self._adapter is None:
            factory = load_adapter(
                ADAPTERS, settings.resolved_queue_url, setting="ACCORD_QUEUE_URL"
            )
            self._adapter = factory(settings.resolved_queue_url, storage=Path(settings.storage))
        await self.adapter.connect()
        from ._queue_runtime import Runtime

        self._runtime = Runtime(self)
        self.state = QueueState.CONNECTED

    async def start_consumers(self) -> None:
        """Begin claiming on every subscribed channel, and start lease renewal and recovery."""
        if self.state is not QueueState.CONNECTED:
            raise StateError(f"start_consumers: event queue is {self.state.value}")
        self.state = QueueState.RUNNING
        for consumer in list(self._consumers.values()):
            await self.runtime.start_consumer(consumer)
        # After the subscriptions, so the first recovery pass covers every channel.
        self.runtime.start()

    async def close(self) -> None:
        """Stop claiming, wait for in-flight jobs (`stop_grace`), release the rest, disconnect."""
        if self.state in (QueueState.NEW, QueueState.CLOSED, QueueState.CLOSING):
            self.state = QueueState.CLOSED
            return
        self.state = QueueState.CLOSING
        await self.runtime.shutdown(self.app.settings.stop_grace)
        self.state = QueueState.CLOSED
        await self.adapter.close()
        self.app.log.info("event queue closed")

    async def abort(self) -> None:
        """Drop everything as a crash would: no drain, no ack, no release."""
        if self.state in (QueueState.NEW, QueueState.CLOSED):
            self.state = QueueState.CLOSED
            return
        self.state = QueueState.CLOSED
        if self._runtime is not None:
            await self._runtime.crash()
        if self._adapter is not None:
            await self._adapter.abort()

    # Internals shared with the consumer machinery.

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise StateError("the event queue is not connected")
        return self._runtime

    @property
    def consumers(self) -> list[Consumer]:
        return list(self._consumers.values())

    def _require_connected(self, what: str) -> None:
        if not self.is_connected():
            raise StateError(f"{what}: the event queue is {self.state.value} (not started?)")
