"""The RabbitMQ queue adapter's connections, and what it declares and counts on them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection
from aiormq.exceptions import (
    AMQPError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
    PublishError,
)
from pamqp import commands as spec
from yarl import URL

from ...event_queue import Job
from ...exceptions import AdapterError, AdapterUnavailable, QueueError, StateError
from . import _queue_topology as topo
from ._channel import CONNECT_TIMEOUT, map_errors

logger = logging.getLogger("accord.queue.rabbitmq")

RPC_TIMEOUT = 10.0
#: How long a job id stays marked if its job never ends (its publisher died midway).
MARKER_EXPIRES = 7 * 24 * 3600.0
#: Dead letters looked through at most to find one to requeue.
REQUEUE_SCAN = 100_000
#: Errors that mean a channel or its connection is gone.
LOST = (AMQPError, ChannelInvalidStateError, ConnectionError, OSError, TimeoutError)


class Links:
    """Two connections: one to publish and inspect (confirms), one to consume.

    The consuming connection is plain (not aio-pika's robust one): delivery
    tags belong to the channel that delivered them, and a reconnect that
    reopened channels would make old tags acknowledge other messages.

    Args:
        url: the broker URL.
        delivery_limit: the work queues' `x-delivery-limit`.
    """

    def __init__(self, url: str, delivery_limit: int) -> None:
        self.url = url
        self.delivery_limit = delivery_limit
        self.publisher: AbstractConnection | None = None
        self.consuming: AbstractConnection | None = None
        self._control: AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self._declared: dict[str, topo.Names] = {}
        self._delays: set[str] = set()
        self._exchanges = False
        self.up = False

    @property
    def channels(self) -> list[str]:
        """The channels this adapter has declared (and so can look up dead letters in)."""
        return list(self._declared)

    async def open(self, role: str, heartbeat: int | None = None) -> AbstractConnection:
        url = URL(self.url)
        if heartbeat is not None:
            url = url.update_query(heartbeat=str(heartbeat))
        properties: dict[str, Any] = {"connection_name": f"accord queue {role}"}
        with map_errors(self.url):
            connection: AbstractConnection = await asyncio.wait_for(
                aiormq.connect(url, client_properties=properties), CONNECT_TIMEOUT
            )
        return connection

    async def control(self) -> AbstractChannel:
        """The publishing channel (publisher confirms), reopened after a channel error."""
        if not self.up:
            raise StateError("the RabbitMQ queue adapter is not connected")
        control = self._control
        if control is not None and not control.is_closed:
            return control
        async with self._lock:
            if self._control is None or self._control.is_closed:
                if self.publisher is None or self.publisher.is_closed:
                    self.publisher = await self.open("publish")
                with map_errors(self.url):
                    self._control = await self.publisher.channel(on_return_raises=True)
            return self._control

    async def scratch(self) -> AbstractChannel:
        """A short-lived channel: closing it returns what it got and did not acknowledge."""
        await self.control()
        if self.publisher is None:
            raise AdapterUnavailable("the RabbitMQ publishing connection closed")
        with map_errors(self.url):
            return await self.publisher.channel(publisher_confirms=False)

    async def consuming_connection(self, consumer: str, lease: float) -> AbstractConnection:
        """The consuming connection; its heartbeat makes a stalled instance lose its deliveries.

        The broker closes a connection after two to three missed heartbeats,
        so a heartbeat of a third of the lease returns a stalled instance's
        jobs after about one lease.
        """
        async with self._lock:
            if self.consuming is None or self.consuming.is_closed:
                heartbeat = max(1, int(lease // 3))
                self.consuming = await self.open(f"consume {consumer}", heartbeat=heartbeat)
            return self.consuming

    async def close(self) -> None:
        self.up = False
        connections = [self.consuming, self.publisher]
        self.consuming = self.publisher = self._control = None
        for connection in connections:
            if connection is not None:
                await close_quietly(connection)

    # Declarations.

    async def declare(self, channel: str) -> topo.Names:
        """The channel's work and dead-letter queues, declared once by this adapter."""
        names = self._declared.get(channel)
        if names is not None:
            return names
        names = topo.names_of(channel)
        control = await self.control()
        try:
            with map_errors(self.url):
                arguments = topo.work_arguments(names, self.delivery_limit)
                await control.queue_declare(names.work, durable=True, arguments=arguments)
                await control.queue_declare(names.dead, durable=True)
        except AdapterError as exc:
            if isinstance(exc.__cause__, ChannelPreconditionFailed):
                raise AdapterError(
                    f"queue {channel}: RabbitMQ has queue {names.work!r} with other arguments "
                    f"({exc.__cause__}); delete it, or use the delivery_limit it was made with"
                ) from exc.__cause__
            raise
        self._declared[channel] = names
        return names

    def has_delays(self, names: topo.Names) -> bool:
        return names.work in self._delays

    async def declare_delays(self, names: topo.Names) -> None:
        """The delay exchanges (shared) and the channel's 32 delay queues with their bindings."""
        if names.work in self._delays:
            return
        control = await self.control()
        with map_errors(self.url):
            # No reply to wait for: these are sent back to back, then one
            # declaration with a reply makes any error among them surface.
            if not self._exchanges:
                for level in range(topo.LEVELS - 1, -2, -1):
                    await control.exchange_declare(
                        topo.level_exchange(level), exchange_type="topic", durable=True, nowait=True
                    )
                for level in range(topo.LEVELS):
                    await control.exchange_bind(
                        topo.level_exchange(level - 1),
                        topo.level_exchange(level),
                        topo.pass_pattern(level),
                        nowait=True,
                    )
            for level in range(topo.LEVELS):
                queue = names.level(level)
                arguments = topo.level_arguments(level)
                await control.queue_declare(queue, durable=True, arguments=arguments, nowait=True)
                await control.queue_bind(
                    queue, topo.level_exchange(level), names.level_pattern(level), nowait=True
                )
            await control.queue_bind(
                names.work, topo.DELIVER_EXCHANGE, names.deliver_pattern(), nowait=True
            )
            await control.queue_declare(names.work, passive=True, timeout=RPC_TIMEOUT)
        self._exchanges = True
        self._delays.add(names.work)

    async def count(self, queues: Sequence[str], *, missing: int = 0) -> list[int]:
        """Ready messages in each of `queues`; a queue that does not exist counts `missing`."""
        counts: list[int] = []
        scratch = await self.scratch()
        try:
            for queue in queues:
                try:
                    with map_errors(self.url):
                        reply = await scratch.queue_declare(
                            queue, passive=True, timeout=RPC_TIMEOUT
                        )
                    counts.append(int(reply.message_count or 0))
                except AdapterUnavailable:
                    raise
                except AdapterError as exc:
                    if not isinstance(exc.__cause__, ChannelNotFoundEntity):
                        raise
                    # The broker closed the channel over the missing queue.
                    counts.append(missing)
                    scratch = await self.scratch()
        finally:
            await close_quietly(scratch)
        return counts

    # Job ids chosen by publishers.

    async def mark(self, names: topo.Names, job_id: str) -> bool:
        """Mark `job_id` as pending or running; False if it already is.

        The marker is a queue that holds one message at most and refuses a
        second publish (a nack): a test-and-set the whole cluster sees.
        """
        control = await self.control()
        marker = names.marker(job_id)
        with map_errors(self.url):
            arguments = topo.marker_arguments(int(MARKER_EXPIRES * 1000))
            await control.queue_declare(marker, durable=True, arguments=arguments)
            try:
                await control.basic_publish(
                    b"", routing_key=marker, properties=spec.Basic.Properties(delivery_mode=2)
                )
            except PublishError:
                raise
            except DeliveryError:
                return False
        return True

    async def unmark(self, names: topo.Names, job_id: str) -> None:
        try:
            control = await self.control()
            with map_errors(self.url):
                await control.queue_delete(names.marker(job_id), timeout=RPC_TIMEOUT)
        except Exception as exc:
            logger.warning(
                "queue %s: job %s: unmarking its id failed: %s", names.channel, job_id, exc
            )

    # Dead letters.

    async def dead_letters(self, names: topo.Names, limit: int) -> list[Job]:
        jobs: list[Job] = []
        scratch = await self.scratch()
        try:
            with map_errors(self.url):
                while len(jobs) < limit:
                    message = await scratch.basic_get(names.dead, timeout=RPC_TIMEOUT)
                    if not isinstance(message.delivery, spec.Basic.GetOk):
                        break
                    jobs.append(
                        topo.job_of(names.channel, message, delivery_limit=self.delivery_limit)
                    )
        finally:
            # Never acknowledged, the letters go back to their places in the queue.
            await close_quietly(scratch)
        return jobs

    async def requeue_from(self, scratch: AbstractChannel, names: topo.Names, job_id: str) -> bool:
        """Move dead job `job_id` of `names` back to its work queue; False if it is not there."""
        with map_errors(self.url):
            # One transaction: the fresh copy and the removal of the letter happen together.
            await scratch.tx_select()
            for _ in range(REQUEUE_SCAN):
                message = await scratch.basic_get(names.dead, timeout=RPC_TIMEOUT)
                if not isinstance(message.delivery, spec.Basic.GetOk):
                    return False
                if message.header.properties.message_id == job_id:
                    break
            else:
                return False
            tag = topo.delivery_tag(message)
            dead = topo.job_of(names.channel, message, delivery_limit=self.delivery_limit)
            keyed = topo.is_keyed(dead)
            if keyed and not await self.mark(names, job_id):
                raise QueueError(
                    f"queue {names.channel}: job {job_id} is pending or running; not requeued"
                )
            fresh = Job(
                id=job_id,
                channel=names.channel,
                body=dead.body,
                enqueued_at=dead.enqueued_at,
                attempt=dead.attempt + 1,
                keyed=keyed,
            )
            props = topo.properties(fresh, keyed=keyed)
            await scratch.basic_publish(fresh.body, routing_key=names.work, properties=props)
            await scratch.basic_ack(tag)
            await scratch.tx_commit(timeout=RPC_TIMEOUT)
        return True


async def close_quietly(target: AbstractConnection | AbstractChannel) -> None:
    try:
        await asyncio.wait_for(target.close(), CONNECT_TIMEOUT)
    except (*LOST, RuntimeError, AdapterUnavailable):
        pass
