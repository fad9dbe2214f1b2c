"""RabbitMQ queue adapter: a quorum queue per channel, manual acks, delays through TTL queues."""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from aiormq.abc import DeliveredMessage

from ...config import redact
from ...event_queue import Job, QueueStats
from ...exceptions import StateError
from . import _queue_topology as topo
from ._channel import map_errors
from ._queue_deliveries import Consumer, Copy, Delivery
from ._queue_links import RPC_TIMEOUT, Links, close_quietly
from ._queue_topology import delivery_tag

__all__ = ["RabbitMQQueueAdapter"]

logger = logging.getLogger("accord.queue.rabbitmq")

#: Returns of one message (its worker's connection died) before the broker dead-letters it.
DELIVERY_LIMIT = 20
#: A message due later than this (ms) when it arrives is delayed again.
EARLY_MS = 50


class RabbitMQQueueAdapter:
    """Jobs in RabbitMQ: at least once, each delivery leased for as long as its connection lives.

    Each channel is a durable quorum queue read with manual acknowledgements
    and a prefetch equal to the consumer's concurrency. When an instance
    crashes its connection closes and the broker returns its deliveries at
    once; when it stalls (paused, or a frozen event loop) the broker closes
    its connection after two to three missed heartbeats, and the heartbeat is
    a third of the lease, so its jobs return after about one lease. Every
    acknowledgement is followed by a round trip on the same channel, so a
    worker whose connection the broker closed learns that its completion
    did not count. Delayed jobs go through TTL queues (no broker plugin).

    Job ids chosen by the publisher are marked in a one-message queue per id
    (a confirmed publish that the broker refuses when one is there), which
    makes publishing idempotent while the job is pending or running.

    Args:
        url: `amqp://user:password@host:port/vhost` or `amqps://...`.
        storage: unused (jobs live in RabbitMQ).
        delivery_limit: returns of one message before the broker dead-letters it. Default 20.
    """

    def __init__(
        self,
        url: str,
        *,
        storage: Path | str | None = None,
        delivery_limit: int = DELIVERY_LIMIT,
    ) -> None:
        self.url = url
        self.delivery_limit = delivery_limit
        self._links = Links(url, delivery_limit)
        self._consumers: dict[str, Consumer] = {}
        self._deliveries: dict[str, Delivery] = {}
        self._leases = itertools.count(1)

    def __repr__(self) -> str:
        return f"<RabbitMQQueueAdapter {redact(self.url)}>"

    # Lifecycle.

    async def connect(self) -> None:
        if self._links.up:
            raise StateError("this RabbitMQ queue adapter is already connected")
        self._links.up = True
        try:
            await self._links.control()
        except BaseException:
            self._links.up = False
            raise

    async def close(self) -> None:
        for channel in list(self._consumers):
            await self._stop_consumer(channel)
        await self._links.close()

    async def abort(self) -> None:
        # Closing the connections is what a crash does too: the broker returns
        # every unacknowledged delivery.
        self._consumers.clear()
        self._deliveries.clear()
        await self._links.close()

    # Publishing.

    async def enqueue(self, job: Job, delay: float) -> bool:
        names = await self._links.declare(job.channel)
        keyed = topo.is_keyed(job)
        if keyed and not await self._links.mark(names, job.id):
            return False
        try:
            exchange, key, due = await self._route(names, _ms(delay))
            control = await self._links.control()
            with map_errors(self.url):
                # mandatory: a message no queue takes comes back as an error, never dropped.
                await control.basic_publish(
                    job.body,
                    exchange=exchange,
                    routing_key=key,
                    properties=topo.properties(job, keyed=keyed, due_ms=due),
                    mandatory=True,
                    timeout=RPC_TIMEOUT,
                )
        except BaseException:
            if keyed:
                await self._links.unmark(names, job.id)
            raise
        return True

    async def _route(self, names: topo.Names, delay_ms: int) -> tuple[str, str, int | None]:
        """Exchange, routing key and (past the longest delay) the due time of a message."""
        if delay_ms <= 0:
            return "", names.work, None
        await self._links.declare_delays(names)
        due = int(time.time() * 1000) + delay_ms if delay_ms > topo.MAX_DELAY_MS else None
        return topo.FIRST_EXCHANGE, names.delay_key(min(delay_ms, topo.MAX_DELAY_MS)), due

    # Consuming.

    async def subscribe(self, channel: str, consumer: str, concurrency: int) -> None:
        names = await self._links.declare(channel)
        if channel not in self._consumers:
            self._consumers[channel] = Consumer(names, max(0, concurrency))

    async def unsubscribe(self, channel: str, consumer: str) -> None:
        await self._stop_consumer(channel)

    async def claim(
        self, channel: str, consumer: str, count: int, lease: float, wait: float
    ) -> list[Job]:
        state = self._consumers.get(channel)
        if state is None:
            await self.subscribe(channel, consumer, count)
            state = self._consumers[channel]
        await self._consume(state, consumer, lease)
        deadline = time.monotonic() + wait
        jobs = await self._take(state, count)
        while not jobs and state.open and time.monotonic() < deadline:
            await state.wait(deadline - time.monotonic())
            jobs = await self._take(state, count)
        return jobs

    async def _consume(self, state: Consumer, consumer: str, lease: float) -> None:
        # Consuming starts at the first claim, so an instance whose idle() is
        # False from the start takes no job out of the queue.
        if state.open:
            return
        connection = await self._links.consuming_connection(consumer, lease)
        with map_errors(self.url):
            amqp = await connection.channel(on_return_raises=True)
            await amqp.basic_qos(prefetch_count=state.prefetch)
            state.use(amqp)
            state.tag = f"{consumer}/{uuid.uuid4().hex[:8]}"
            await amqp.basic_consume(state.names.work, state.deliver, consumer_tag=state.tag)
        logger.debug("queue %s: consuming (prefetch %d)", state.names.channel, state.prefetch)

    async def _take(self, state: Consumer, count: int) -> list[Job]:
        jobs: list[Job] = []
        while state.buffer and len(jobs) < count:
            message = state.buffer.popleft()
            amqp = message.channel
            if amqp is not state.amqp or amqp.is_closed:
                continue  # the broker returned it when that channel closed
            due = topo.headers_of(message).get("due")
            if due is not None and int(due) - time.time() * 1000 > EARLY_MS:
                await self._delay_again(state, message, int(due))
                continue
            lease = str(next(self._leases))
            job = topo.job_of(state.names.channel, message, lease=lease)
            self._deliveries[lease] = Delivery(
                state, amqp, delivery_tag(message), topo.is_keyed(job)
            )
            jobs.append(job)
        return jobs

    async def _delay_again(self, state: Consumer, message: DeliveredMessage, due: int) -> None:
        job = topo.job_of(state.names.channel, message)
        exchange, key, new_due = await self._route(state.names, due - int(time.time() * 1000))
        props = topo.properties(job, keyed=topo.is_keyed(job), due_ms=new_due)
        copy = (exchange, key, job.body, props)
        await state.settle(message.channel, [delivery_tag(message)], copy=copy)

    async def _stop_consumer(self, channel: str) -> None:
        state = self._consumers.pop(channel, None)
        if state is None or state.amqp is None or not state.open:
            return
        amqp = state.amqp
        try:
            with map_errors(self.url):
                await amqp.basic_cancel(state.tag, timeout=RPC_TIMEOUT)
        except Exception as exc:
            logger.warning("queue %s: cancelling the consumer failed: %s", channel, exc)
        # Delivered but never claimed: a copy with the same counters goes back (a
        # return by the broker would count as a crash).
        for message in list(state.buffer):
            if message.channel is amqp:
                job = topo.job_of(channel, message)
                copy = (
                    "",
                    state.names.work,
                    job.body,
                    topo.properties(job, keyed=topo.is_keyed(job)),
                )
                await state.settle(amqp, [delivery_tag(message)], copy=copy)
        state.buffer.clear()
        state.amqp = None
        await close_quietly(amqp)

    # Settling: on the channel that delivered the job, which must still be open.

    def _grouped(self, jobs: Sequence[Job]) -> list[list[tuple[int, Delivery]]]:
        groups: dict[int, list[tuple[int, Delivery]]] = {}
        for i, job in enumerate(jobs):
            delivery = self._deliveries.pop(job.lease, None)
            if delivery is not None:
                groups.setdefault(id(delivery.amqp), []).append((i, delivery))
        return list(groups.values())

    async def ack(self, jobs: Sequence[Job]) -> list[bool]:
        results = [False] * len(jobs)
        for group in self._grouped(jobs):
            first = group[0][1]
            names = first.consumer.names
            markers = [names.marker(jobs[i].id) for i, delivery in group if delivery.keyed]
            tags = [delivery.tag for _, delivery in group]
            ok = await first.consumer.settle(first.amqp, tags, markers=markers)
            for i, _ in group:
                results[i] = ok
        return results

    async def renew(self, jobs: Sequence[Job], lease: float) -> list[bool]:
        # A delivery stays leased while its channel lives: check that it does.
        results = [False] * len(jobs)
        for group in self._grouped(jobs):
            first = group[0][1]
            ok = await first.consumer.settle(first.amqp, [])
            for i, delivery in group:
                results[i] = ok
                if ok:
                    self._deliveries[jobs[i].lease] = delivery
        return results

    async def retry(self, job: Job, delay: float) -> bool:
        delivery = self._deliveries.pop(job.lease, None)
        if delivery is None:
            return False
        exchange, key, due = await self._route(delivery.consumer.names, _ms(delay))
        props = topo.properties(job, keyed=delivery.keyed, due_ms=due)
        return await delivery.consumer.settle(
            delivery.amqp, [delivery.tag], copy=(exchange, key, job.body, props)
        )

    async def release(self, jobs: Sequence[Job]) -> None:
        # Released jobs go to the end of the queue (memory puts them first).
        for job in jobs:
            await self.retry(job, 0)

    async def bury(self, job: Job) -> bool:
        delivery = self._deliveries.pop(job.lease, None)
        if delivery is None:
            return False
        names = delivery.consumer.names
        props = topo.properties(job, keyed=delivery.keyed, failed_at=time.time())
        copy: Copy = ("", names.dead, job.body, props)
        markers = [names.marker(job.id)] if delivery.keyed else []
        return await delivery.consumer.settle(
            delivery.amqp, [delivery.tag], copy=copy, markers=markers
        )

    async def recover(self, channel: str, lease: float) -> int:
        # The broker returns the deliveries of a closed connection by itself.
        return 0

    # Dead letters and counts.

    async def dead_letters(self, channel: str, limit: int) -> list[Job]:
        return await self._links.dead_letters(await self._links.declare(channel), limit)

    async def requeue(self, job_id: str, channel: str | None) -> bool:
        # Without a channel, the channels this adapter has used are searched.
        channels = [channel] if channel is not None else self._links.channels
        for name in channels:
            names = await self._links.declare(name)
            scratch = await self._links.scratch()
            try:
                if await self._links.requeue_from(scratch, names, job_id):
                    return True
            finally:
                await close_quietly(scratch)
        return False

    async def purge(self, channel: str) -> int:
        names = await self._links.declare(channel)
        control = await self._links.control()
        with map_errors(self.url):
            reply = await control.queue_purge(names.dead, timeout=RPC_TIMEOUT)
        return int(reply.message_count or 0)

    async def stats(self, channel: str) -> QueueStats:
        """Queued, delayed and dead across the cluster; running counts this instance only.

        AMQP does not report how many deliveries are unacknowledged (the
        management API does), so `running` is this instance's deliveries.
        """
        links = self._links
        names = await links.declare(channel)
        # The delay queues of a channel are made together, at its first delayed job.
        levels = [names.level(k) for k in range(topo.LEVELS)]
        counted = levels if links.has_delays(names) else levels[:1]
        queued, dead, *delays = await links.count([names.work, names.dead, *counted], missing=-1)
        if len(delays) == 1 and delays[0] >= 0:
            delays = await links.count(levels)
        state = self._consumers.get(channel)
        held = sum(1 for d in self._deliveries.values() if d.consumer.names.channel == channel)
        return QueueStats(
            queued=queued,
            delayed=sum(max(0, n) for n in delays),
            running=held + (len(state.buffer) if state is not None else 0),
            dead=dead,
        )

    async def channels(self, prefix: str = "") -> list[str]:
        """Channels starting with `prefix` that this adapter has declared since it was made.

        AMQP cannot list the queues of a vhost (the management HTTP API can,
        and is not used), so this is what this instance published to,
        subscribed to or inspected (`stats`, `dead_letters`, `purge`), not
        every channel of the broker.
        """
        return [channel for channel in self._links.channels if channel.startswith(prefix)]


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))
