"""RabbitMQ pub/sub: a fanout exchange per app, one exclusive auto-delete queue per instance."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from ...config import redact
from ...exceptions import AdapterError, AdapterUnavailable, StateError
from .._link import LinkKeeper
from ._channel import CONNECT_TIMEOUT, map_errors

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage

    from ...pubsub import PubSubListener

logger = logging.getLogger("accord.pubsub.rabbitmq")

PUBLISH_TIMEOUT = 1.0


def frame(channel: str, data: bytes) -> bytes:
    """The channel's byte length, `:`, the channel, then the message bytes."""
    name = channel.encode()
    return b"%d:%s%s" % (len(name), name, data)


def unframe(body: bytes) -> tuple[str, bytes]:
    colon = body.index(b":")
    end = colon + 1 + int(body[:colon])
    return body[colon + 1 : end].decode(), body[end:]


class _Link:
    """One connection with one channel and the exchange declared on it."""

    def __init__(
        self, connection: AbstractConnection, channel: AbstractChannel, exchange: AbstractExchange
    ) -> None:
        self.connection = connection
        self.channel = channel
        self.exchange = exchange

    @property
    def open(self) -> bool:
        return not self.connection.is_closed and not self.channel.is_closed


class RabbitMQPubSubAdapter:
    """Pub/sub over a RabbitMQ fanout exchange.

    Each application has one fanout exchange, `accord.pubsub.<namespace>`;
    each instance reads its own exclusive, auto-delete queue bound to it and
    keeps the channels it subscribed to. Publishes wait for the broker's
    confirmation. The receiving connection reconnects with backoff and
    declares its queue again; messages published while it was down are missed.

    Args:
        url: `amqp://user:password@host:port/vhost` or `amqps://...`.
        publish_timeout: seconds a publish may take before `AdapterUnavailable`. Default 1.
    """

    def __init__(self, url: str, *, publish_timeout: float = PUBLISH_TIMEOUT) -> None:
        self.url = url
        self.publish_timeout = publish_timeout
        self.exchange_name = ""
        self.queue_name = ""
        self._listener: PubSubListener | None = None
        self._channels: set[str] = set()
        self._consumer: _Link | None = None
        self._publisher: _Link | None = None
        self._publisher_lock = asyncio.Lock()
        self._lost = asyncio.Event()
        self._keeper = LinkKeeper(
            "RabbitMQ consumer", url, open=self._open, watch=self._lost.wait, discard=self._discard
        )
        self._closed = False

    def __repr__(self) -> str:
        return f"<RabbitMQPubSubAdapter {redact(self.url)} {self.exchange_name}>"

    # Lifecycle.

    async def connect(self, listener: PubSubListener) -> None:
        if self._closed:
            raise StateError("this RabbitMQ pub/sub adapter is closed")
        self._listener = listener
        self.exchange_name = f"accord.pubsub.{listener.namespace}"[:255]
        self.queue_name = f"{self.exchange_name}.{listener.instance_id}"[:255]
        await self._open()
        self._keeper.start(listener)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._keeper.stop()
        await self._stop()

    async def abort(self) -> None:
        # aio-pika has no way to drop a socket without a close handshake; the
        # exclusive queue disappears with the connection either way.
        await self.close()

    async def _stop(self) -> None:
        for link in (self._consumer, self._publisher):
            if link is not None:
                await _close_quietly(link.connection)
        self._consumer = self._publisher = None

    def is_connected(self) -> bool:
        return self._consumer is not None and self._keeper.up

    async def _link(self, role: str, **channel_options: Any) -> _Link:
        connection: AbstractConnection | None = None
        try:
            with map_errors(self.url):
                connection = await aio_pika.connect(
                    self.url,
                    timeout=CONNECT_TIMEOUT,
                    client_properties={"connection_name": f"{self.queue_name}:{role}"},
                )
                channel = await connection.channel(**channel_options)
                exchange = await channel.declare_exchange(
                    self.exchange_name, aio_pika.ExchangeType.FANOUT, durable=False
                )
        except BaseException:
            if connection is not None:
                await _close_quietly(connection)
            raise
        return _Link(connection, channel, exchange)

    # The receiving connection.

    async def _open(self) -> None:
        link = await self._link("consume", publisher_confirms=False)
        try:
            with map_errors(self.url):
                queue = await link.channel.declare_queue(
                    self.queue_name, exclusive=True, auto_delete=True, durable=False
                )
                await queue.bind(link.exchange)
                await queue.consume(self._on_message, no_ack=True)
        except BaseException:
            await _close_quietly(link.connection)
            raise
        self._lost.clear()

        def on_close(*_: Any) -> None:
            # A late callback from a link already replaced must not count as a new loss.
            if not self._closed and self._consumer is link:
                self._lost.set()

        link.connection.close_callbacks.add(on_close)
        link.channel.close_callbacks.add(on_close)
        self._consumer = link

    async def _discard(self) -> None:
        dead, self._consumer = self._consumer, None
        if dead is not None:
            await _close_quietly(dead.connection)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            channel, data = unframe(message.body)
        except (ValueError, UnicodeDecodeError):
            logger.warning("dropped a malformed message on exchange %s", self.exchange_name)
            return
        if channel in self._channels and self._listener is not None:
            self._listener.deliver(channel, data)

    # Subscriptions: the queue receives every channel of the app, so these only filter.

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    # Publishing.

    async def publish(self, channel: str, data: bytes) -> None:
        if self._closed:
            raise StateError(f"publish on {channel!r}: the RabbitMQ pub/sub adapter is closed")
        message = aio_pika.Message(
            frame(channel, data), delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT
        )
        try:
            async with asyncio.timeout(self.publish_timeout):
                link = await self._ensure_publisher()
                with map_errors(self.url):
                    await link.exchange.publish(message, routing_key="")
        except TimeoutError:
            raise AdapterUnavailable(
                f"publish on {channel!r}: RabbitMQ at {redact(self.url)} did not confirm "
                f"within {self.publish_timeout} s"
            ) from None
        except AdapterError:
            await self._drop_publisher()
            raise

    async def _ensure_publisher(self) -> _Link:
        link = self._publisher
        if link is not None and link.open:
            return link
        async with self._publisher_lock:
            if self._publisher is None or not self._publisher.open:
                await self._drop_publisher()
                self._publisher = await self._link("publish", publisher_confirms=True)
            return self._publisher

    async def _drop_publisher(self) -> None:
        link, self._publisher = self._publisher, None
        if link is not None:
            await _close_quietly(link.connection)

    # Fault injection.

    async def sever(self) -> None:
        link = self._consumer
        if self._closed or link is None:
            return

        async def kill() -> None:
            await _close_quietly(link.connection)
            self._lost.set()

        await self._keeper.sever(kill)

    async def restore(self) -> None:
        await self._keeper.restore()


async def _close_quietly(connection: AbstractConnection) -> None:
    try:
        await asyncio.wait_for(connection.close(), CONNECT_TIMEOUT)
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPError, RuntimeError):
        pass
