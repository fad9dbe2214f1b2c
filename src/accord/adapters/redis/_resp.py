"""A lean RESP2 connection for a Redis subscriber: pushes are parsed as they arrive, without a task per message."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from ...exceptions import AdapterError, AdapterUnavailable

CRLF = b"\r\n"
_MESSAGE = b"*3\r\n$7\r\nmessage\r\n"
_PUSHES = frozenset({b"message", b"subscribe", b"unsubscribe", b"pong"})

#: Receives every push that is not a reply to a command: ("message", channel, data),
#: ("subscribe", channel, count), ("unsubscribe", channel, count) or ("pong", data).
PushHandler = Callable[[list[Any]], None]


class ReplyError(Exception):
    """Redis answered a command with an error reply."""


class _Incomplete(Exception):
    pass


def pack(*args: str | bytes | int) -> bytes:
    """One command in RESP2: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def _parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    end = buf.find(CRLF, pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    if kind == 36:  # $ bulk string
        size = int(buf[pos + 1 : end])
        if size < 0:
            return None, end + 2
        start, stop = end + 2, end + 2 + size
        if len(buf) < stop + 2:
            raise _Incomplete
        return bytes(buf[start:stop]), stop + 2
    if kind == 42:  # * array
        count = int(buf[pos + 1 : end])
        pos = end + 2
        items = []
        for _ in range(max(count, 0)):
            item, pos = _parse(buf, pos)
            items.append(item)
        return (items if count >= 0 else None), pos
    if kind == 58:  # : integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 43:  # + simple string
        return bytes(buf[pos + 1 : end]), end + 2
    if kind == 45:  # - error
        return ReplyError(buf[pos + 1 : end].decode(errors="replace")), end + 2
    raise AdapterError(f"Redis sent an unexpected reply type {chr(kind)!r}")


class SubscriberProtocol(asyncio.Protocol):
    """Holds one subscriber connection: commands get replies in order, pushes go to `on_push`."""

    def __init__(self, on_push: PushHandler) -> None:
        self.on_push = on_push
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        #: Loop time of the last byte received (the health check reads it).
        self.last_seen = self.loop.time()
        self._buffer = bytearray()
        self._replies: deque[asyncio.Future[Any]] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        while self._replies:
            waiter = self._replies.popleft()
            if not waiter.done():
                waiter.set_exception(AdapterUnavailable(f"Redis closed the connection: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.last_seen = self.loop.time()
        buf = self._buffer
        buf += data
        pos = 0
        size = len(buf)
        try:
            while pos < size:
                if buf.startswith(_MESSAGE, pos):
                    # The hot path: a published message, parsed without recursion.
                    channel, at = _parse(buf, pos + len(_MESSAGE))
                    payload, pos = _parse(buf, at)
                    self.on_push([b"message", channel, payload])
                    continue
                reply, pos = _parse(buf, pos)
                self._route(reply)
        except _Incomplete:
            pass
        except (AdapterError, ValueError) as exc:
            # A corrupt stream cannot be resynchronised; drop it and reconnect.
            if self.transport is not None:
                self.transport.abort()
            self.connection_lost(exc)
        del buf[:pos]

    def _route(self, reply: Any) -> None:
        # Our commands (AUTH, CLIENT) never answer with an array, so any array is a push.
        if isinstance(reply, list) and reply and reply[0] in _PUSHES:
            self.on_push(reply)
            return
        if self._replies:
            waiter = self._replies.popleft()
            if waiter.done():
                return
            if isinstance(reply, ReplyError):
                waiter.set_exception(reply)
            else:
                waiter.set_result(reply)

    def send(self, *args: str | bytes | int) -> None:
        if self.transport is None or self.transport.is_closing():
            raise AdapterUnavailable("the Redis subscriber connection is closed")
        self.transport.write(pack(*args))

    async def command(self, *args: str | bytes | int) -> Any:
        """Send a command that gets a reply (only before the first SUBSCRIBE)."""
        waiter: asyncio.Future[Any] = self.loop.create_future()
        self._replies.append(waiter)
        self.send(*args)
        return await waiter


def connection_options(url: str) -> dict[str, Any]:
    """Host, port, credentials and TLS context of a `redis://` or `rediss://` URL."""
    parts = urlsplit(url)
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    options: dict[str, Any] = {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 6379,
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "ssl": None,
    }
    if parts.scheme == "rediss":
        context = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
        if query.get("ssl_cert_reqs", "").lower() in ("none", "cert_none"):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if query.get("ssl_certfile"):
            context.load_cert_chain(query["ssl_certfile"], query.get("ssl_keyfile"))
        options["ssl"] = context
    return options


async def open_subscriber(
    url: str, on_push: PushHandler, *, name: str, timeout: float
) -> tuple[SubscriberProtocol, int]:
    """Connect, authenticate and name a subscriber connection; returns it and its CLIENT ID."""
    options = connection_options(url)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, protocol = await loop.create_connection(
            lambda: SubscriberProtocol(on_push),
            options["host"],
            options["port"],
            ssl=options["ssl"],
        )
        try:
            if options["password"] is not None:
                credentials = [options["username"]] if options["username"] else []
                await protocol.command("AUTH", *credentials, options["password"])
            await protocol.command("CLIENT", "SETNAME", name)
            client_id = int(await protocol.command("CLIENT", "ID"))
        except BaseException:
            if protocol.transport is not None:
                protocol.transport.abort()
            raise
    return protocol, client_id
