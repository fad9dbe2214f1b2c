"""Deliveries of the RabbitMQ queue adapter: one consumer per channel, and settling what it got."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Sequence

from aiormq.abc import AbstractChannel, DeliveredMessage
from aiormq.exceptions import DeliveryError
from pamqp import commands as spec

from ...exceptions import AdapterError
from . import _queue_topology as topo
from ._queue_links import LOST, RPC_TIMEOUT

logger = logging.getLogger("accord.queue.rabbitmq")

#: What `settle` publishes before acknowledging: exchange, routing key, body, properties.
Copy = tuple[str, str, bytes, spec.Basic.Properties]


class Consumer:
    """This instance's consumption of one channel: one AMQP channel with publisher confirms.

    Deliveries wait in `buffer` until a claim takes them; the prefetch (the
    concurrency) bounds how many the broker sends before some are settled.
    """

    __slots__ = ("amqp", "arrived", "buffer", "names", "outstanding", "prefetch", "tag")

    def __init__(self, names: topo.Names, prefetch: int) -> None:
        self.names = names
        self.prefetch = prefetch
        self.amqp: AbstractChannel | None = None
        self.tag = ""
        self.buffer: collections.deque[DeliveredMessage] = collections.deque()
        # Tags delivered on `amqp` and not settled yet, oldest first.
        self.outstanding: dict[int, None] = {}
        self.arrived = asyncio.Event()

    def use(self, amqp: AbstractChannel) -> None:
        """Consume on `amqp` from now on; what the previous channel delivered is gone."""
        self.amqp = amqp
        self.buffer.clear()
        self.outstanding = {}

    @property
    def open(self) -> bool:
        return self.amqp is not None and not self.amqp.is_closed

    async def deliver(self, message: DeliveredMessage) -> None:
        if message.channel is self.amqp:
            self.outstanding[topo.delivery_tag(message)] = None
            self.buffer.append(message)
            self.arrived.set()

    async def wait(self, timeout: float) -> None:
        """Return when a delivery arrives or after `timeout` seconds."""
        self.arrived.clear()
        if self.buffer or timeout <= 0:
            return
        try:
            # asyncio.timeout, not wait_for: no task per wait on this hot path.
            async with asyncio.timeout(timeout):
                await self.arrived.wait()
        except TimeoutError:
            pass

    async def settle(
        self,
        amqp: AbstractChannel,
        tags: Sequence[int],
        *,
        copy: Copy | None = None,
        markers: Sequence[str] = (),
    ) -> bool:
        """Acknowledge `tags` on `amqp` after publishing `copy`; False if the channel died.

        The copy (a retry, a dead letter) is confirmed before the
        acknowledgement, so a crash between the two runs the job twice rather
        than never.
        """
        if amqp.is_closed:
            return False
        try:
            for marker in markers:
                await amqp.queue_delete(marker, timeout=RPC_TIMEOUT)
            if copy is not None:
                await self._publish(amqp, tags, copy)
            for tag, multiple in self._acks(amqp, tags):
                await amqp.basic_ack(tag, multiple=multiple, wait=False)
            # basic.ack has no reply: a round trip after it proves the channel was
            # alive when the acknowledgements arrived, so they took effect.
            await amqp.basic_qos(prefetch_count=self.prefetch, timeout=RPC_TIMEOUT)
        except LOST as exc:
            logger.debug("queue %s: settling failed: %s", self.names.channel, exc)
            return False
        return True

    def _acks(self, amqp: AbstractChannel, tags: Sequence[int]) -> list[tuple[int, bool]]:
        """The ack frames for `tags`: one `multiple` ack covers the oldest outstanding run."""
        if amqp is not self.amqp:
            return [(tag, False) for tag in tags]
        wanted = set(tags)
        upto = 0
        for tag in self.outstanding:
            if tag not in wanted:
                break
            upto = tag
        for tag in tags:
            self.outstanding.pop(tag, None)
        frames = [(upto, True)] if upto else []
        return frames + [(tag, False) for tag in sorted(wanted) if tag > upto]

    async def _publish(self, amqp: AbstractChannel, tags: Sequence[int], copy: Copy) -> None:
        exchange, key, body, props = copy
        try:
            await amqp.basic_publish(
                body,
                exchange=exchange,
                routing_key=key,
                properties=props,
                mandatory=True,
                timeout=RPC_TIMEOUT,
            )
        except DeliveryError as exc:
            # Refused: hand the delivery back rather than acknowledge a job stored nowhere.
            for tag in tags:
                self.outstanding.pop(tag, None)
                await amqp.basic_nack(tag, requeue=True, wait=False)
            raise AdapterError(
                f"queue {self.names.channel}: RabbitMQ refused job {props.message_id}: {exc}"
            ) from exc


@dataclasses.dataclass(slots=True)
class Delivery:
    """A claimed job's delivery: the lease is valid while `amqp` is open."""

    consumer: Consumer
    amqp: AbstractChannel
    tag: int
    keyed: bool
