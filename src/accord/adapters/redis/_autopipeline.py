"""Auto-pipelining Redis connection: concurrent commands share one socket and one round trip."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import weakref
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import redis.exceptions as redis_errors

from ...config import redact
from ...exceptions import StateError
from ._client import CONNECT_TIMEOUT, SOCKET_TIMEOUT
from ._resp import connection_options
from ._wire import Arg, Incomplete, pack, parse

__all__ = ["AutoPipeline", "Script", "acquire_pipeline", "release_pipeline"]

logger = logging.getLogger("accord.redis")


class Script:
    """A Lua script run by SHA, loaded on first use (`AutoPipeline.run_script`).

    Args:
        source: the Lua source.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class _Connection(asyncio.Protocol):
    """One socket: replies are matched to waiters in order, as the bytes arrive."""

    def __init__(self, owner: AutoPipeline) -> None:
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.outbox: list[bytes] = []
        self.flush_scheduled = False
        self.buffer = b""
        self.progress = self.loop.time()
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.lost or redis_errors.ConnectionError(
            f"connection to Redis lost: {exc or 'closed by the server'}"
        )
        self.transport = None
        self.fail(self.lost)
        self.owner._lost(self)

    def fail(self, exc: BaseException) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data if self.buffer else data
        pos, size, waiters = 0, len(buf), self.waiters
        self.progress = self.loop.time()
        try:
            while pos < size:
                reply, pos = parse(buf, pos)
                waiter = waiters.popleft()
                if waiter.done():  # the caller gave up (timeout or cancel); drop the reply
                    continue
                if isinstance(reply, Exception):
                    waiter.set_exception(reply)
                else:
                    waiter.set_result(reply)
        except Incomplete:
            pass
        except (ValueError, IndexError, redis_errors.InvalidResponse) as exc:
            # A stream out of step cannot be trusted again; drop it, callers see the error.
            self.lost = redis_errors.ConnectionError(f"Redis sent a malformed reply: {exc!r}")
            self.abort()
            return
        self.buffer = buf[pos:] if pos < size else b""

    def send(self, data: bytes, waiter: asyncio.Future[Any]) -> None:
        if not self.waiters and not self.flush_scheduled and self.transport is not None:
            # Nothing in flight: write now, a lone caller pays no extra loop turn.
            self.progress = self.loop.time()
            self.waiters.append(waiter)
            self.transport.write(data)
            return
        self.waiters.append(waiter)
        self.outbox.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        outbox, self.outbox = self.outbox, []
        if self.transport is not None and outbox:
            self.transport.write(b"".join(outbox))

    def stalled(self, timeout: float) -> bool:
        return bool(self.waiters) and self.loop.time() - self.progress > timeout

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class AutoPipeline:
    """One multiplexed connection: commands sent in the same loop turn go out in one write.

    Meant for short, non-blocking commands (GET, SET, MGET, SCAN, EVALSHA, ...):
    never BLPOP, SUBSCRIBE, WATCH or MULTI across awaits, which need their own
    connection. A caller that stops waiting (timeout, cancel) does not disturb
    the others; its reply is read and dropped. A lost connection fails the
    commands in flight with redis-py's `ConnectionError` and reconnects on the
    next command. Error replies raise redis-py's `ResponseError` family, so the
    adapters' `map_errors` applies unchanged.

    Args:
        url: a `redis://` or `rediss://` URL (credentials and db are honoured).
        connect_timeout: seconds to connect and authenticate. Default `CONNECT_TIMEOUT`.
        reply_timeout: seconds without any reply while commands are in flight
            after which the connection is dropped. Default `SOCKET_TIMEOUT`.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        reply_timeout: float = SOCKET_TIMEOUT,
    ) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self._options = connection_options(url)
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._queued: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self._conn else "idle"
        return f"<AutoPipeline {redact(self.url)} {state}>"

    def send(self, *args: Arg) -> asyncio.Future[Any]:
        """Queue one command now and return the future of its reply (no await needed to queue)."""
        if self._closed:
            raise StateError(f"the Redis connection to {redact(self.url)} is closed")
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        conn = self._conn
        if conn is not None and conn.transport is not None:
            conn.send(pack(args), waiter)
            return waiter
        self._queued.append((pack(args), waiter))
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        return waiter

    async def execute(self, *args: Arg) -> Any:
        """Send one command and return its reply."""
        return await self.send(*args)

    async def run_script(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """Run a Lua script by SHA; the first run on a server that lacks it sends the source."""
        try:
            return await self.send("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:
            return await self.send("EVAL", script.source, len(keys), *keys, *args)

    async def connect(self) -> None:
        """Connect now (otherwise the first command connects)."""
        await self.execute("PING")

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        options = self._options
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), options["host"], options["port"], ssl=options["ssl"]
                )
                handshake = []
                if options["password"] is not None:
                    user = [options["username"]] if options["username"] else []
                    handshake.append(self._direct(conn, "AUTH", *user, options["password"]))
                if options["db"]:
                    handshake.append(self._direct(conn, "SELECT", options["db"]))
                for step in handshake:
                    await step
        except BaseException as exc:
            if conn is not None:
                conn.abort()
            error = exc
            if isinstance(exc, TimeoutError | OSError):
                error = redis_errors.ConnectionError(
                    f"cannot connect to Redis at {redact(self.url)}: {exc!r}"
                )
            self._fail_queued(error)
            if not isinstance(exc, Exception):
                raise
            logger.debug("connect to %s failed: %r", redact(self.url), exc)
            return
        finally:
            self._connecting = None
        if self._closed:
            conn.abort()
            return
        self._conn = conn
        queued, self._queued = self._queued, []
        for data, waiter in queued:
            conn.send(data, waiter)
        self._arm_watchdog()

    def _direct(self, conn: _Connection, *args: Arg) -> asyncio.Future[Any]:
        waiter: asyncio.Future[Any] = conn.loop.create_future()
        conn.send(pack(args), waiter)
        return waiter

    def _fail_queued(self, exc: BaseException) -> None:
        queued, self._queued = self._queued, []
        for _, waiter in queued:
            if not waiter.done():
                waiter.set_exception(exc)

    def _arm_watchdog(self) -> None:
        # A hung server answers nothing; without this, callers with no timeout of
        # their own would wait forever on a socket that never errors.
        interval = max(0.05, min(1.0, self.reply_timeout / 4))
        self._watchdog = asyncio.get_running_loop().call_later(interval, self._check_stall)

    def _check_stall(self) -> None:
        conn = self._conn
        if conn is None:
            return
        if conn.stalled(self.reply_timeout):
            logger.warning(
                "no reply from Redis at %s for %.1f s; dropping the connection",
                redact(self.url),
                self.reply_timeout,
            )
            conn.lost = redis_errors.TimeoutError(
                f"no reply from Redis at {redact(self.url)} within {self.reply_timeout} s"
            )
            conn.abort()
            return
        self._arm_watchdog()

    def _lost(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None
            if self._watchdog is not None:
                self._watchdog.cancel()
            if not self._closed:
                logger.warning("connection to Redis at %s lost: %s", redact(self.url), conn.lost)

    async def close(self) -> None:
        """Close the socket; commands still in flight fail."""
        self.abort()

    def abort(self) -> None:
        """Drop the socket at once, as a crash would."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.lost = StateError(f"the Redis connection to {redact(self.url)} is closed")
            conn.abort()
        self._fail_queued(StateError(f"the Redis connection to {redact(self.url)} is closed"))


_shared: dict[
    tuple[str, int], tuple[weakref.ref[asyncio.AbstractEventLoop], AutoPipeline, int]
] = {}


def acquire_pipeline(url: str) -> AutoPipeline:
    """The auto-pipelining connection shared by everything in this event loop that uses `url`.

    Every call must be paired with `release_pipeline(url)`; the socket closes with the last one.
    """
    loop = asyncio.get_running_loop()
    key = (url, id(loop))
    entry = _shared.get(key)
    if entry is None or entry[0]() is not loop:
        pipeline, users = AutoPipeline(url), 0
    else:
        _, pipeline, users = entry
    _shared[key] = (weakref.ref(loop), pipeline, users + 1)
    return pipeline


async def release_pipeline(url: str, *, abort: bool = False) -> None:
    """Give back one `acquire_pipeline(url)`; the last release closes (or aborts) the socket."""
    key = (url, id(asyncio.get_running_loop()))
    entry = _shared.get(key)
    if entry is None:
        return
    loop_ref, pipeline, users = entry
    if users > 1:
        _shared[key] = (loop_ref, pipeline, users - 1)
        return
    del _shared[key]
    if abort:
        pipeline.abort()
    else:
        await pipeline.close()
