"""A lean RESP2 connection for a Redis subscriber: pushes are parsed as they arrive, without a task per message."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import redis.exceptions as redis_errors

from ...exceptions import AdapterUnavailable
from ._wire import Arg, Incomplete, pack, parse

_MESSAGE = b"*3\r\n$7\r\nmessage\r\n"
_PUSHES = frozenset({b"message", b"subscribe", b"unsubscribe", b"pong"})

#: Receives every push that is not a reply to a command: ("message", channel, data),
#: ("subscribe", channel, count), ("unsubscribe", channel, count) or ("pong", data).
PushHandler = Callable[[list[Any]], None]

#: What a command's error reply raises: `_wire.reply_error` picks the redis-py class
#: (`AuthenticationError` for a bad password, `ResponseError` otherwise).
ReplyError = redis_errors.RedisError


class SubscriberProtocol(asyncio.Protocol):
    """Holds one subscriber connection: commands get replies in order, pushes go to `on_push`."""

    def __init__(self, on_push: PushHandler) -> None:
        self.on_push = on_push
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        #: Loop time of the last byte received (the health check reads it).
        self.last_seen = self.loop.time()
        self._buffer = b""
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
        buf = self._buffer + data if self._buffer else data
        pos = 0
        size = len(buf)
        try:
            while pos < size:
                if buf.startswith(_MESSAGE, pos):
                    # The hot path: a published message, parsed without recursion.
                    channel, at = parse(buf, pos + len(_MESSAGE))
                    payload, pos = parse(buf, at)
                    self.on_push([b"message", channel, payload])
                    continue
                reply, pos = parse(buf, pos)
                self._route(reply)
        except Incomplete:
            pass
        except (ValueError, redis_errors.InvalidResponse) as exc:
            # A corrupt stream cannot be resynchronised; drop it and reconnect.
            if self.transport is not None:
                self.transport.abort()
            self.connection_lost(exc)
            return
        self._buffer = buf[pos:] if pos < size else b""

    def _route(self, reply: Any) -> None:
        # Our commands (AUTH, CLIENT) never answer with an array, so any array is a push.
        if isinstance(reply, list) and reply and reply[0] in _PUSHES:
            self.on_push(reply)
            return
        if self._replies:
            waiter = self._replies.popleft()
            if waiter.done():
                return
            if isinstance(reply, Exception):
                waiter.set_exception(reply)
            else:
                waiter.set_result(reply)

    def send(self, *args: Arg) -> None:
        if self.transport is None or self.transport.is_closing():
            raise AdapterUnavailable("the Redis subscriber connection is closed")
        self.transport.write(pack(args))

    async def command(self, *args: Arg) -> Any:
        """Send a command that gets a reply (only before the first SUBSCRIBE)."""
        waiter: asyncio.Future[Any] = self.loop.create_future()
        self._replies.append(waiter)
        self.send(*args)
        return await waiter


def connection_options(url: str) -> dict[str, Any]:
    """Host, port, credentials, database number and TLS context of a `redis://` or `rediss://` URL."""
    parts = urlsplit(url)
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    db = query.get("db", parts.path.strip("/"))
    options: dict[str, Any] = {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 6379,
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "db": int(db) if db else 0,
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
