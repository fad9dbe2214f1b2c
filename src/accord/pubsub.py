"""PubSubManager: broadcast messages to every instance; the PubSubAdapter protocol and its scheme table."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from . import _codec, _keys
from ._pubsub_subscription import Subscription
from ._registry import load_adapter
from .config import redact
from .exceptions import SerializationError, StateError
from .types import MessageHandler

if TYPE_CHECKING:
    from .app import Application

__all__ = ["ADAPTERS", "Envelope", "PubSubAdapter", "PubSubListener", "PubSubManager"]

ADAPTERS = {
    "memory": "accord.adapters.memory.pubsub:MemoryPubSubAdapter",
    "redis": "accord.adapters.redis.pubsub:RedisPubSubAdapter",
    "rediss": "accord.adapters.redis.pubsub:RedisPubSubAdapter",
    "postgresql": "accord.adapters.postgres.pubsub:PostgresPubSubAdapter",
    "postgres": "accord.adapters.postgres.pubsub:PostgresPubSubAdapter",
    "amqp": "accord.adapters.rabbitmq.pubsub:RabbitMQPubSubAdapter",
    "amqps": "accord.adapters.rabbitmq.pubsub:RabbitMQPubSubAdapter",
}

#: Seconds a publish may wait on an unreachable server before `AdapterUnavailable`.
PUBLISH_TIMEOUT = 1.0
#: Most seconds `close()` lets handler calls already received finish (capped by stop_grace).
CLOSE_GRACE = 5.0
WIRE_VERSION = 1

logger = logging.getLogger("accord.pubsub")


class PubSubListener(Protocol):
    """What an adapter reports to: the manager that owns it."""

    @property
    def namespace(self) -> str:
        """The app's channel namespace; adapters that carry every channel on one
        server-side name (a LISTEN channel, an exchange) derive that name from it."""

    @property
    def instance_id(self) -> str:
        """The instance this listener belongs to; names per-instance server objects."""

    def deliver(self, channel: str, data: bytes) -> None:
        """A message arrived on `channel` (the full, namespaced name); must neither block nor raise."""

    async def connection_changed(self, connected: bool) -> None:
        """The receiving link was lost (`False`) or restored and resubscribed (`True`)."""


class PubSubAdapter(Protocol):
    """What a pub/sub engine must do: move bytes on named channels and report its link.

    Channels given to an adapter are full names (already namespaced). After
    `connect` returns, the adapter calls `listener.connection_changed` on each
    loss and on each restoration (after resubscribing), never for the first connect.
    """

    async def connect(self, listener: PubSubListener) -> None: ...

    async def close(self) -> None: ...

    async def abort(self) -> None:
        """Drop the connection as a crash would: no unsubscribe, no goodbye."""

    async def subscribe(self, channel: str) -> None:
        """Return once messages published on `channel` from now on will be delivered."""

    async def unsubscribe(self, channel: str) -> None: ...

    async def publish(self, channel: str, data: bytes) -> None:
        """Send, or raise `AdapterUnavailable` within the adapter's publish timeout."""

    def is_connected(self) -> bool: ...

    async def sever(self) -> None:
        """Fault injection: drop the receiving link and keep it down until `restore`."""

    async def restore(self) -> None:
        """Let a severed link reconnect; return once it is subscribed again."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message as it crosses the wire, with who sent it, its id and when.

    Args:
        sender: the publishing instance's `instance_id`.
        id: a unique message id (hex).
        timestamp: seconds since the epoch at publish time.
        message: the JSON-compatible message itself.
    """

    sender: str
    id: str
    timestamp: float
    message: Any

    @classmethod
    def new(cls, sender: str, message: Any) -> Envelope:
        return cls(sender, uuid.uuid4().hex, time.time(), message)

    def encode(self, *, what: str = "message") -> bytes:
        wire = {
            "v": WIRE_VERSION,
            "s": self.sender,
            "i": self.id,
            "t": self.timestamp,
            "m": self.message,
        }
        return _codec.encode(wire, what=what)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview | str) -> Envelope:
        wire = _codec.decode(data)
        if not isinstance(wire, dict) or wire.get("v") != WIRE_VERSION or "m" not in wire:
            raise SerializationError("data is not an accord pub/sub envelope")
        return cls(str(wire["s"]), str(wire["i"]), float(wire["t"]), wire["m"])


class _State(enum.Enum):
    NEW = "new"
    CONNECTED = "connected"
    CLOSED = "closed"


class PubSubManager:
    """Broadcasts JSON messages to the instances of one application.

    Channels are namespaced by the app name (and `settings.channel_prefix`),
    so applications sharing a server never see each other's messages. The
    adapter is chosen by `settings.resolved_pubsub_url`.

    Args:
        app: the application.
        adapter: a ready adapter, instead of one built from the URL. Default: from the URL.
        publish_timeout: seconds a publish waits on an unreachable server. Default 1.
    """

    def __init__(
        self,
        app: Application,
        *,
        adapter: PubSubAdapter | None = None,
        publish_timeout: float = PUBLISH_TIMEOUT,
    ) -> None:
        self.app = app
        self.url = app.settings.resolved_pubsub_url
        self.publish_timeout = publish_timeout
        prefix = app.settings.channel_prefix
        self.namespace = _keys.join(prefix, app.name) if prefix else _keys.escape(app.name)
        self.log = type(app.log)(logger, app.log.extra)
        self._adapter = adapter
        self._state = _State.NEW
        self._connecting = asyncio.Lock()
        self._subscriptions: dict[str, dict[MessageHandler, Subscription]] = {}
        # Full server-side channel name -> the channel name subscribers used.
        self._wire_names: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<PubSubManager {redact(self.url)} {self._state.value}>"

    @property
    def instance_id(self) -> str:
        return self.app.instance_id

    def channel_name(self, channel: str) -> str:
        """The server-side name of `channel`: namespace, then the escaped channel."""
        return f"{self.namespace}{_keys.SEPARATOR}{_keys.escape(channel)}"

    def is_connected(self) -> bool:
        """Whether the adapter is connected and receiving."""
        return (
            self._state is _State.CONNECTED
            and self._adapter is not None
            and self._adapter.is_connected()
        )

    @property
    def adapter(self) -> PubSubAdapter | None:
        return self._adapter

    # Lifecycle.

    async def connect(self) -> None:
        """Connect the adapter and apply the subscriptions made so far; idempotent."""
        if self._state is _State.CLOSED:
            raise StateError("the pub/sub manager is closed; create a new Application")
        async with self._connecting:
            if self._state is not _State.NEW:
                return
            if self._adapter is None:
                factory = load_adapter(ADAPTERS, self.url, setting="ACCORD_PUBSUB_URL")
                self._adapter = factory(self.url, publish_timeout=self.publish_timeout)
            await self._adapter.connect(self)
            self._state = _State.CONNECTED
            for channel in list(self._subscriptions):
                await self._adapter.subscribe(self.channel_name(channel))
        self.log.info("pub/sub connected: %s (namespace %r)", redact(self.url), self.namespace)

    async def close(self) -> None:
        """Stop receiving, cancel pending debounced calls, let running handler calls finish."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        tasks = self._stop_subscriptions()
        if self._adapter is not None:
            await self._adapter.close()
        if tasks:
            grace = min(CLOSE_GRACE, self.app.settings.stop_grace)
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                self.log.warning("a pub/sub handler still runs after %s s; cancelling it", grace)
                task.cancel()
        self.log.info("pub/sub closed")

    async def abort(self) -> None:
        """Drop the connection and every handler call as a crash would."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        for task in self._stop_subscriptions():
            task.cancel()
        if self._adapter is not None:
            await self._adapter.abort()

    def _stop_subscriptions(self) -> list[asyncio.Task[None]]:
        tasks = []
        for handlers in self._subscriptions.values():
            for subscription in handlers.values():
                subscription.stop()
                if subscription.task is not None:
                    tasks.append(subscription.task)
        return tasks

    # Subscriptions.

    async def subscribe(
        self, channel: str, handler: MessageHandler, *, debounce: float = 0
    ) -> None:
        """Call `handler(message)` for each message published on `channel` by the instances.

        Messages reach each handler in the order they arrived, one call at a
        time; a handler's exception is logged and the bus carries on.

        Args:
            channel: the channel name (namespaced with the app name on the server).
            handler: an async callable taking the message. Subscribing it twice delivers once.
            debounce: seconds; identical messages within this window (counted
                from the first) make one trailing call, per handler. Default 0 (no debounce).

        Example:
            async def on_reload(message: dict) -> None:
                await plugin.reload(message["name"])

            await app.pub_sub_manager.subscribe("posts", on_reload, debounce=0.5)
        """
        if self._state is _State.CLOSED:
            raise StateError(f"subscribe to {channel!r}: the pub/sub manager is closed")
        if debounce < 0:
            raise ValueError(f"debounce must be >= 0 seconds, got {debounce!r}")
        handlers = self._subscriptions.setdefault(channel, {})
        if handler in handlers:
            handlers[handler].debounce = debounce
            return
        handlers[handler] = Subscription(channel, handler, debounce, self.log)
        self._wire_names[self.channel_name(channel)] = channel
        if len(handlers) == 1 and self._state is _State.CONNECTED and self._adapter is not None:
            await self._adapter.subscribe(self.channel_name(channel))

    async def unsubscribe(self, channel: str, handler: MessageHandler) -> None:
        """Stop calling `handler` for `channel`; pending debounced calls are dropped.

        Args:
            channel: the channel name.
            handler: the handler given to `subscribe`; an unknown one is ignored.
        """
        handlers = self._subscriptions.get(channel)
        if not handlers or handler not in handlers:
            return
        handlers.pop(handler).stop()
        if handlers:
            return
        del self._subscriptions[channel]
        del self._wire_names[self.channel_name(channel)]
        if self._state is _State.CONNECTED and self._adapter is not None:
            await self._adapter.unsubscribe(self.channel_name(channel))

    # Publishing and receiving.

    async def publish(
        self, channel: str, message: Any, *, skip_self: bool = True, only_self: bool = False
    ) -> None:
        """Send `message` to the instances subscribed to `channel`.

        Args:
            channel: the channel name.
            message: JSON-compatible data; anything else raises `SerializationError` here.
            skip_self: the publishing instance does not receive it. Default True.
            only_self: only the publishing instance receives it (nothing goes
                on the wire). Default False.

        Raises:
            SerializationError: the message is not JSON-compatible.
            AdapterUnavailable: the server cannot be reached within `publish_timeout`.
            StateError: the manager is closed.
        """
        if self._state is _State.CLOSED:
            raise StateError(f"publish on {channel!r}: the pub/sub manager is closed")
        envelope = Envelope.new(self.app.instance_id, message)
        data = envelope.encode(what=f"message on channel {channel!r}")
        if not only_self:
            if self._state is _State.NEW:
                # Publishing from a plugin's `load` connects early instead of failing.
                await self.connect()
            adapter = self._adapter
            if adapter is None or self._state is not _State.CONNECTED:
                raise StateError(f"publish on {channel!r}: the pub/sub manager is closed")
            await adapter.publish(self.channel_name(channel), data)
        if only_self or not skip_self:
            # The local copy never crosses the wire, but it is decoded from the
            # same bytes so handlers see exactly what other instances see.
            self._dispatch(channel, Envelope.decode(data))

    def deliver(self, channel: str, data: bytes) -> None:
        """Adapter callback: a message arrived on the full channel name `channel`; never raises."""
        local = self._wire_names.get(channel)
        if local is None:
            return
        try:
            envelope = Envelope.decode(data)
        except (SerializationError, KeyError, TypeError, ValueError):
            self.log.warning("dropped a message on %r that is not an accord envelope", local)
            return
        # The publisher delivers to itself locally when asked, never via the bus.
        if envelope.sender == self.app.instance_id:
            return
        try:
            self._dispatch(local, envelope)
        except Exception:
            # Adapters call this from their reading loop, which must carry on.
            self.log.exception("delivering a message on %r failed", local)

    def _dispatch(self, channel: str, envelope: Envelope) -> None:
        handlers = self._subscriptions.get(channel)
        if handlers:
            for subscription in list(handlers.values()):
                subscription.offer(envelope)

    async def connection_changed(self, connected: bool) -> None:
        """Adapter callback: log the change and emit `pubsub:restored` or `pubsub:lost`."""
        if self._state is not _State.CONNECTED:
            return
        if connected:
            self.log.info("pub/sub connection restored: %s", redact(self.url))
        else:
            self.log.warning("pub/sub connection lost: %s; reconnecting", redact(self.url))
        event = "pubsub:restored" if connected else "pubsub:lost"
        try:
            await self.app.emit(event)
        except Exception:
            self.log.exception("a handler of the %s event failed", event)
