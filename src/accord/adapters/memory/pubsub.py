"""In-process pub/sub: one bus per name, shared by every Application of the process."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ...exceptions import StateError

if TYPE_CHECKING:
    from ...pubsub import PubSubListener

logger = logging.getLogger("accord.pubsub.memory")


class _Bus:
    """Who listens to which channel on one named bus."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: set[MemoryPubSubAdapter] = set()
        self.channels: dict[str, set[MemoryPubSubAdapter]] = {}

    def join(self, channel: str, adapter: MemoryPubSubAdapter) -> None:
        self.channels.setdefault(channel, set()).add(adapter)

    def leave(self, channel: str, adapter: MemoryPubSubAdapter) -> None:
        listeners = self.channels.get(channel)
        if listeners is not None:
            listeners.discard(adapter)
            if not listeners:
                del self.channels[channel]


# Bus name -> bus. A bus lives while an adapter is connected to it, so two
# test clusters run one after the other never share stale subscribers.
_buses: dict[str, _Bus] = {}


def bus_name(url: str) -> str:
    """`memory://` -> "" (the default bus); `memory://xyz` -> "xyz"."""
    return url.partition("://")[2].strip("/")


class MemoryPubSubAdapter:
    """Pub/sub between the Applications of one process, on a bus chosen by name.

    Args:
        url: `memory://` for the default bus, `memory://name` for a private one.
        publish_timeout: accepted for a uniform signature; an in-process publish never waits.
    """

    def __init__(self, url: str = "memory://", *, publish_timeout: float = 1.0) -> None:
        self.url = url
        self.name = bus_name(url)
        self._bus: _Bus | None = None
        self._listener: PubSubListener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channels: set[str] = set()
        self._severed = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<MemoryPubSubAdapter {self.name or '(default)'!r}>"

    async def connect(self, listener: PubSubListener) -> None:
        if self._closed:
            raise StateError("this memory pub/sub adapter is closed")
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self._attach()

    def _attach(self) -> None:
        bus = _buses.get(self.name)
        if bus is None:
            bus = _buses[self.name] = _Bus(self.name)
        bus.members.add(self)
        for channel in self._channels:
            bus.join(channel, self)
        self._bus = bus

    def _detach(self) -> None:
        bus, self._bus = self._bus, None
        if bus is None:
            return
        bus.members.discard(self)
        for channel in self._channels:
            bus.leave(channel, self)
        if not bus.members and _buses.get(bus.name) is bus:
            del _buses[bus.name]

    async def close(self) -> None:
        self._closed = True
        self._detach()

    async def abort(self) -> None:
        await self.close()

    def is_connected(self) -> bool:
        return self._bus is not None

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)
        if self._bus is not None:
            self._bus.join(channel, self)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        if self._bus is not None:
            self._bus.leave(channel, self)

    async def publish(self, channel: str, data: bytes) -> None:
        if self._closed:
            raise StateError("this memory pub/sub adapter is closed")
        # A severed adapter still publishes: only its receiving side is cut.
        bus = _buses.get(self.name)
        if bus is not None:
            for adapter in tuple(bus.channels.get(channel, ())):
                adapter._receive(channel, data)
        # Yield as a network publish would, so a tight publishing loop lets the
        # handlers it feeds run instead of queueing everything first.
        await asyncio.sleep(0)

    def _receive(self, channel: str, data: bytes) -> None:
        listener, loop = self._listener, self._loop
        if listener is None or loop is None or self._bus is None:
            return
        try:
            same_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            same_loop = False
        if same_loop:
            listener.deliver(channel, data)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(listener.deliver, channel, data)

    async def sever(self) -> None:
        if self._bus is None or self._listener is None:
            return
        self._severed = True
        self._detach()
        logger.warning("memory bus %r: receiving side severed", self.name)
        await self._listener.connection_changed(False)

    async def restore(self) -> None:
        if not self._severed or self._closed or self._listener is None:
            return
        self._severed = False
        self._attach()
        await self._listener.connection_changed(True)
