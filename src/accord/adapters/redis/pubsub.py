"""Redis pub/sub: PUBLISH auto-pipelined, SUBSCRIBE on a dedicated connection that reconnects."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any, cast

from ...config import redact
from ...exceptions import AdapterError, AdapterUnavailable, StateError
from .._link import LinkKeeper
from ._autopipeline import AutoPipeline, acquire_pipeline, release_pipeline
from ._client import CONNECT_TIMEOUT, map_errors
from ._resp import ReplyError, SubscriberProtocol, open_subscriber

if TYPE_CHECKING:
    from ...pubsub import PubSubListener

logger = logging.getLogger("accord.pubsub.redis")

PUBLISH_TIMEOUT = 1.0
SUBSCRIBE_TIMEOUT = 5.0
#: Seconds of silence after which the subscriber pings; twice that without a byte means dead.
HEALTH_INTERVAL = 15.0

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.:\-]")


class RedisPubSubAdapter:
    """Pub/sub over Redis PUBLISH/SUBSCRIBE.

    Publishes go through the auto-pipelined connection shared per URL:
    publishes made in the same loop turn leave in one write and share a
    round trip, in order. Messages arrive on one dedicated connection, which
    reconnects with backoff and subscribes again after a loss.

    Args:
        url: `redis://[user:password@]host:port/db` or `rediss://...`. Pub/sub
            ignores the database number: channels are shared by the whole server.
        publish_timeout: seconds a publish may take before `AdapterUnavailable`. Default 1.
        pipeline: a ready connection to publish with. Default: the one shared per URL.
    """

    def __init__(
        self,
        url: str,
        *,
        publish_timeout: float = PUBLISH_TIMEOUT,
        pipeline: AutoPipeline | None = None,
    ) -> None:
        self.url = url
        self.publish_timeout = publish_timeout
        #: CLIENT ID of the current subscriber connection (for CLIENT KILL ID in fault tests).
        self.client_id: int | None = None
        self._pipeline = pipeline
        self._shared_pipeline = pipeline is None
        self._listener: PubSubListener | None = None
        self._name = "accord-pubsub"
        self._channels: set[str] = set()
        self._names: dict[bytes, str] = {}
        self._acks: dict[str, list[asyncio.Future[None]]] = {}
        self._protocol: SubscriberProtocol | None = None
        self._keeper = LinkKeeper(
            "Redis subscriber", url, open=self._open, watch=self._watch, discard=self._discard
        )
        self._closed = False

    def __repr__(self) -> str:
        return f"<RedisPubSubAdapter {redact(self.url)}>"

    # Lifecycle.

    async def connect(self, listener: PubSubListener) -> None:
        if self._closed:
            raise StateError("this Redis pub/sub adapter is closed")
        self._listener = listener
        self._name = _UNSAFE_NAME.sub(
            "_", f"accord:pubsub:{listener.namespace}:{listener.instance_id}"
        )
        if self._pipeline is None:
            self._pipeline = acquire_pipeline(self.url)
        try:
            await self._open()
        except BaseException:
            await self._release_pipeline(abort=True)
            raise
        self._keeper.start(listener)

    async def close(self) -> None:
        await self._stop(abort=False)

    async def abort(self) -> None:
        await self._stop(abort=True)

    async def _stop(self, *, abort: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._keeper.stop()
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            if abort:
                protocol.transport.abort()
            else:
                protocol.transport.close()
        await self._release_pipeline(abort=abort)

    async def _release_pipeline(self, *, abort: bool) -> None:
        if self._shared_pipeline and self._pipeline is not None:
            self._pipeline = None
            await release_pipeline(self.url, abort=abort)

    def is_connected(self) -> bool:
        return self._protocol is not None and self._keeper.up

    # The subscriber connection.

    async def _open(self) -> None:
        try:
            protocol, client_id = await open_subscriber(
                self.url, self._on_push, name=self._name, timeout=CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            raise AdapterUnavailable(f"Redis at {redact(self.url)} is unreachable: {exc}") from exc
        except ReplyError as exc:
            raise AdapterError(
                f"Redis at {redact(self.url)} refused the connection: {exc}"
            ) from exc
        self._protocol, self.client_id = protocol, client_id
        # From here on `subscribe` sends its own SUBSCRIBE, so this snapshot misses nothing.
        channels = sorted(self._channels)
        if channels:
            confirmed = asyncio.gather(*(self._expect_ack(channel) for channel in channels))
            protocol.send("SUBSCRIBE", *channels)
            await asyncio.wait(
                {confirmed, cast("asyncio.Future[Any]", protocol.closed)},
                timeout=SUBSCRIBE_TIMEOUT,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not confirmed.done():
                confirmed.cancel()
                if protocol.transport is not None:
                    protocol.transport.abort()
                raise AdapterUnavailable(
                    f"Redis at {redact(self.url)} did not confirm {len(channels)} subscription(s)"
                )
        logger.debug("subscriber connection %s (id %s) up", self._name, client_id)

    async def _watch(self) -> None:
        """Return when the connection closes; ping it when idle and drop it when silent."""
        protocol = self._protocol
        if protocol is None:
            return
        loop = asyncio.get_running_loop()
        while not protocol.closed.done():
            await asyncio.wait({protocol.closed}, timeout=HEALTH_INTERVAL)
            idle = loop.time() - protocol.last_seen
            if protocol.closed.done() or protocol.transport is None:
                return
            if idle > 2 * HEALTH_INTERVAL:
                logger.warning(
                    "subscriber connection %s silent for %.0f s; dropping it", self._name, idle
                )
                protocol.transport.abort()
                return
            if idle >= HEALTH_INTERVAL:
                protocol.send("PING")

    async def _discard(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()

    def _on_push(self, push: list[Any]) -> None:
        kind = push[0]
        if kind == b"message":
            raw = push[1]
            channel = self._names.get(raw)
            if channel is None:
                channel = raw.decode()
                if channel not in self._channels:
                    return
                self._names[raw] = channel
            if self._listener is not None:
                # The manager's deliver never raises, so the parser stays in step.
                self._listener.deliver(channel, push[2])
        elif kind == b"subscribe":
            for waiter in self._acks.pop(push[1].decode(), ()):
                if not waiter.done():
                    waiter.set_result(None)

    def _expect_ack(self, channel: str) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks.setdefault(channel, []).append(waiter)
        return waiter

    # Subscriptions.

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)
        protocol = self._protocol
        if protocol is None or protocol.closed.done():
            return  # applied when the connection is restored
        waiter = self._expect_ack(channel)
        protocol.send("SUBSCRIBE", channel)
        await asyncio.wait(
            {waiter, protocol.closed},
            timeout=SUBSCRIBE_TIMEOUT,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not waiter.done() and not protocol.closed.done():
            logger.warning(
                "Redis did not confirm the subscription to %r within %s s; it applies on reconnect",
                channel,
                SUBSCRIBE_TIMEOUT,
            )

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        self._names.pop(channel.encode(), None)
        protocol = self._protocol
        if protocol is not None and not protocol.closed.done():
            protocol.send("UNSUBSCRIBE", channel)

    # Publishing.

    async def publish(self, channel: str, data: bytes) -> None:
        pipeline = self._pipeline
        if self._closed or pipeline is None:
            raise StateError(f"publish on {channel!r}: the Redis pub/sub adapter is closed")
        try:
            async with asyncio.timeout(self.publish_timeout):
                with map_errors(self.url):
                    await pipeline.send("PUBLISH", channel, data)
        except TimeoutError:
            raise AdapterUnavailable(
                f"publish on {channel!r}: Redis at {redact(self.url)} did not answer "
                f"within {self.publish_timeout} s"
            ) from None

    # Fault injection.

    async def sever(self) -> None:
        pipeline, client_id = self._pipeline, self.client_id
        if self._closed or pipeline is None or client_id is None:
            return

        async def kill() -> None:
            with map_errors(self.url):
                await pipeline.send("CLIENT", "KILL", "ID", client_id)

        await self._keeper.sever(kill)

    async def restore(self) -> None:
        await self._keeper.restore()
